"""The ``curation`` command.

Exit codes: 0 success, 1 the run failed, 2 bad usage or an invalid recipe (nothing was written).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from curation import __version__, secrets
from curation.io.fs import StorageError


def _cmd_sample(args: argparse.Namespace) -> int:
    from curation.sample import write_sample_corpus

    summary = write_sample_corpus(
        args.out,
        rows=args.rows,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
        benchmark_rate=args.benchmark_rate,
    )
    print(f"sample corpus: {args.out} ({summary.get('rows', args.rows):,} rows; see {args.out}/corpus.json)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from curation.pipeline import run_pipeline
    from curation.recipe import load_pipeline
    from curation.spec import RecipeError
    from curation.stage import NotReady
    from curation.stats import summary_table

    try:
        recipe = load_pipeline(args.recipe, args.set or [])
    except RecipeError as e:
        print(f"error: {secrets.redact(e)}", file=sys.stderr)
        return 2
    try:
        result = run_pipeline(recipe, address=args.address, overwrite=args.overwrite, progress=not args.quiet)
    except (FileExistsError, NotReady, StorageError) as e:
        print(f"error: {secrets.redact(e)}", file=sys.stderr)
        return 1 if getattr(e, "partial", False) else 2  # 1: the run had started writing
    print(summary_table(result.stats))
    print(
        f"pool:   {result.pool}  ({result.manifest['totals']['rows']:,} rows in "
        f"{result.manifest['totals']['shards']} shards)"
    )
    if result.report:
        print(f"report: {result.report}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    import yaml

    from curation.audit import run_audit
    from curation.io.detect import UndetectedSource
    from curation.spec import RecipeError

    match = {}
    for item in args.match or []:
        key, sep, value = item.partition("=")
        if not sep:
            print(
                f"error: --match {item!r}: expected KEY=VALUE, e.g. --match text_threshold=0.6",
                file=sys.stderr,
            )
            return 2
        match[key.strip()] = yaml.safe_load(value)
    try:
        result = run_audit(
            args.benchmarks,
            args.corpus,
            args.out,
            registry_set=args.set or [],
            match=match,
            address=args.address,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (RecipeError, UndetectedSource, FileExistsError, StorageError) as e:
        # the audit composes a pipeline: name its parameters as the command line does
        print(
            f"error: {secrets.redact(e)}".replace(
                "invalid recipe curation audit", "invalid audit options"
            ).replace("stages.0.decontaminate.match.", "--match "),
            file=sys.stderr,
        )
        return 2
    data = result.data
    print(f"{'benchmark':<24}{'items':>8}{'contaminated':>14}{'rate':>9}{'rows':>8}  not indexed / partly")
    for name, b in data["benchmarks"].items():
        print(
            f"{name:<24}{b['items']:>8,}{b['contaminated_items']:>14,}{100 * b['contamination_rate']:>8.2f}%"
            f"{b['matched_rows']:>8,}  {len({x['item'] for x in b['not_indexed']}):,} / "
            f"{len({x['item'] for x in b['partially_indexed']}):,}"
        )
    print(
        f"rows scanned: {data['rows_scanned']:,}  contaminated: {data['rows_contaminated']:,}  "
        f"unreadable: {data['rows_unreadable']:,}"
    )
    print(f"report: {result.report_html}\njson:   {result.report_json}")
    return 0


def _cmd_mix(args: argparse.Namespace) -> int:
    from curation.mix.builder import build_mixtures, iter_plan
    from curation.mix.recipe import load_mix_recipe
    from curation.spec import RecipeError

    try:
        recipe = load_mix_recipe(args.recipe, args.set or [])
        results = build_mixtures(
            recipe,
            only=args.only,
            address=args.address,
            overwrite=args.overwrite,
            progress=not args.quiet,
            dry_run=args.dry_run,
        )
    except (RecipeError, FileExistsError, StorageError) as e:
        print(f"error: {secrets.redact(e)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ImportError) as e:  # the tokenizer
        print(f"error: tokenizer: {secrets.redact(e)}", file=sys.stderr)
        return 2
    for line in iter_plan(results):
        print(line)
    for r in results:
        if args.dry_run:
            print(f"{r.name}: dry run, nothing written (would write {r.path})")
        else:
            print(
                f"{r.name}: {r.path}  ({r.manifest['totals']['shards']} shards)"
                + (f"\n  report: {r.report}" if r.report else "")
            )
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from curation.calibrate import calibrate

    try:
        html, js = calibrate(
            args.pool,
            args.score,
            thresholds=args.thresholds or (),
            keep=args.keep or (),
            examples=args.examples,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {secrets.redact(e)}", file=sys.stderr)
        return 2
    data = json.loads(js.read_text())
    print(f"{'threshold':>12}  {'kept':>10}  {'share':>7}")
    for c in data["cuts"]:
        print(f"{c['threshold']:>12.4g}  {c['kept']:>10,}  {100 * c['kept_fraction']:>6.1f}%")
    print(f"report: {html}\njson:   {js}")
    return 0


def _cmd_stages(args: argparse.Namespace) -> int:
    from curation.filters import registry as stage_registry
    from curation.stage import describe

    registry = stage_registry()
    if args.json:
        print(json.dumps({n: describe(c) for n, c in sorted(registry.items())}, indent=2, default=str))
        return 0
    for name, cls in sorted(registry.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:<22}{doc}")
        params = {k: v for k, v in describe(cls).items() if k not in ("instance", "resources", "modalities")}
        if params:
            print(f"{'':<22}params: " + ", ".join(f"{k}={v!r}" for k, v in params.items()))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from curation.report import write_report

    html, js = write_report(args.pool)
    print(f"report: {html}\njson:   {js}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from curation.train.config import ConfigError, load_config
    from curation.train.train import train

    sets = list(args.set or [])
    sets += [f"stage={args.stage}"] if args.stage else []
    sets += [f"mixture={args.mixture}"] + ([f"out={args.out}"] if args.out else [])
    sets += [f"resume={args.resume}"] if args.resume else []
    sets += [f"init={args.init}"] if args.init else []
    try:
        summary = train(load_config(args.config, sets))
    except ConfigError as e:
        print(f"error: {secrets.redact(e)}", file=sys.stderr)
        return 2
    if summary:  # rank 0
        print(
            f"stage {summary['stage']}: {summary['steps']} steps, loss {summary['first_loss']:.4f} -> "
            f"{summary['last_loss']:.4f}; {summary['tokens_per_s']:,.0f} tokens/s, "
            f"{summary['images_per_s']:,.1f} images/s, "
            f"data wait {100 * summary['data_wait_share']:.1f}% of step time"
        )
        print(f"checkpoint: {summary['checkpoint']}\nloss plot:  {summary['plot']}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from curation.train.config import ConfigError
    from curation.train.merge import merge_checkpoints

    try:
        merged = merge_checkpoints(args.checkpoints, args.out, args.weights)
    except ConfigError as e:
        print(f"error: {secrets.redact(e)}", file=sys.stderr)
        return 2
    for m in merged["merged_from"]:
        print(f"{m['weight']:.3f}  {m['path']}  (stage {m['stage']}, step {m['step']})")
    print(f"merged: {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curation",
        description="Curate multimodal training data for vision-language models on Ray, and build mixtures.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "sample",
        help="write a deterministic sample corpus (all input formats, with realistic dirt)",
        description="Write a deterministic sample corpus: image-text pairs as WebDataset, Parquet and "
        "JSONL, interleaved and text documents, a small benchmark set, and truth.parquet "
        "labelling the dirt injected in each row.",
    )
    p.add_argument("out", help="output folder")
    p.add_argument("--rows", type=int, default=5000, help="total rows across sources (default 5000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    p.add_argument(
        "--benchmark-rate",
        type=float,
        default=0.01,
        help="share of rows of each source planted with a benchmark copy (default 0.01)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser(
        "run",
        help="run a curation pipeline recipe as a Ray Data job and write a pool",
        description="Run a pipeline recipe (pipelines/*.yaml) on local Ray, or on a cluster with "
        "--address / RAY_ADDRESS. Rerunning into the same folder resumes.",
    )
    p.add_argument("recipe", help="pipeline YAML")
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set vars.corpus=/data --set stages.1.image_size.min_side=64",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="empty an earlier output of curation there first (never a folder curation did not write)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "audit",
        help="find benchmark items in a corpus: report.json and report.html",
        description="Scan a corpus (pool folders, source files, folders or globs, local or s3://) "
        "for the items of every benchmark in a registry (text, images, video) and write "
        "OUT/report.json and OUT/report.html. Rerunning into OUT resumes.",
    )
    p.add_argument("--benchmarks", required=True, metavar="REGISTRY.yaml", help="benchmark registry YAML")
    p.add_argument(
        "--corpus", required=True, nargs="+", metavar="PATH", help="pools, files, folders or globs"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a registry key, e.g. vars.corpus=/d"
    )
    p.add_argument(
        "--match",
        action="append",
        metavar="KEY=VALUE",
        help="matching threshold, e.g. --match text_threshold=0.6 (see docs/decontamination.md)",
    )
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="empty an earlier audit in OUT first: scan and reports (never a folder curation did not write)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser(
        "mix",
        help="build training mixtures from pools to exact token budgets",
        description="Build the mixtures of a mixture recipe (mixtures/*.yaml) from pools: tokens counted "
        "as the model counts them, deterministic sampling, sharded Parquet/WebDataset "
        "with manifest.json and report.html per mixture. Rerunning resumes.",
    )
    p.add_argument("recipe", help="mixture YAML")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set vars.pools=/data/pools --set mixtures.stage2.budget=50M",
    )
    p.add_argument("--only", action="append", metavar="NAME", help="build only this mixture (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="count and plan, print the plan, write nothing")
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="empty the earlier folders of these mixtures first (never a folder curation did not write)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_mix)

    p = sub.add_parser(
        "calibrate",
        help="kept fraction and borderline rows at several thresholds of a score (HTML)",
        description="For a score column of a pool (shards and rejects), show how much each threshold "
        "keeps and the rows just above and below it, to pick a threshold by eye.",
    )
    p.add_argument("pool", help="pool folder (local)")
    p.add_argument("--score", required=True, help="score column, e.g. score_clip_score")
    p.add_argument("--thresholds", type=float, nargs="+", help="thresholds to show")
    p.add_argument(
        "--keep", type=float, nargs="+", help="kept fractions to show (their thresholds are computed)"
    )
    p.add_argument("--examples", type=int, default=6, help="rows shown on each side of each threshold")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("stages", help="list the registered stages and their parameters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_stages)

    p = sub.add_parser("report", help="(re)write report.html and report.json of a pool folder")
    p.add_argument("pool")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "train",
        help="train the reference model on a mixture: stage 0, 1, 2, 3 or sft",
        description="Train the reference vision-language model (ViT, 2x2-merging projector, M-RoPE "
        "decoder) on a mixture for one stage: 0 vision encoder (sigmoid loss), 1 projector "
        "only, 2 everything, 3 annealing, sft assistant turns. Under torchrun, one rank "
        "per GPU. See docs/train.md.",
    )
    p.add_argument("mixture", help="mixture folder written by `curation mix` (local or s3://)")
    p.add_argument(
        "--stage", choices=["0", "1", "2", "3", "sft"], help="stage (default: the config's, else 2)"
    )
    p.add_argument(
        "--config", default=None, metavar="FILE", help="training config YAML (default: the tiny model)"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set steps=200 --set lm.layers=8 --set optim.lr=3e-4",
    )
    p.add_argument(
        "--out", default=None, help="run folder: checkpoints, log.jsonl, loss plot (default runs/train)"
    )
    p.add_argument(
        "--init", default=None, metavar="CKPT", help="start from these weights (an earlier stage's)"
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="CKPT",
        help="continue this run (checkpoint file or run folder): weights, optimizer, data position",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "merge",
        help="average the weights of checkpoints (annealed on different mixtures)",
        description="Average the model weights of checkpoints of one architecture into one "
        "checkpoint (Keye-VL's model merging after annealing).",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    p.add_argument("--out", required=True, help="merged checkpoint file")
    p.add_argument("--weights", type=float, nargs="+", help="weighted average (default: equal weights)")
    p.set_defaults(func=_cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    secrets.install()  # before anything can log or fail: credentials never print (curation.secrets)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("ray", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
