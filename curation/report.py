"""Pool report: ``report.json`` for machines and one self-contained ``report.html`` for people.

Both are derived only from what ``curation run`` already wrote (docs/pool-format.md): manifest.json and
stats.json give every number; the shard and reject Parquet files give example rows to look at. The
report is what a person opens to judge a recipe ("did the aesthetic filter eat all the charts?"), so
it shows numbers *and* pictures: rejected samples next to their reason make a bad threshold obvious.

Pools can hold millions of rows, so reading is bounded: only the needed columns are read, batch by
batch, and reading stops as soon as enough examples are collected. Rejected rows are found with a
cheap pass over three short string columns; image bytes are then read only for the chosen rows.
What the page is built from (styles, cards, thumbnails of untrusted images) is :mod:`curation.html`.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curation.html import CSS, esc, number, percent, row_card, svg_histogram
from curation.io import commit

log = logging.getLogger(__name__)

_ROW_COLUMNS = (
    "id",
    "source",
    "modality",
    "text",
    "texts",
    "image",
    "images",
    "frames",
    "width",
    "height",
    "lang",
    "reject_stage",
    "reject_reason",
    "reject_detail",
)


# ---------------------------------------------------------------------------------------------- format
def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    v, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            break
        v /= 1024
    return f"{n:,} B" if unit == "B" else f"{v:,.1f} {unit}"


# ---------------------------------------------------------------------------------------------- reading
def _columns(pf: pq.ParquetFile, wanted: Iterable[str]) -> list[str]:
    names = pf.schema_arrow.names
    wanted = set(wanted)
    return [c for c in names if c in wanted or c.startswith("score_")]


def _head_rows(paths: list[Path], limit: int, batch_size: int = 32) -> list[dict]:
    """First ``limit`` rows across ``paths`` in order, reading as few batches as possible."""
    rows: list[dict] = []
    for path in paths:
        if len(rows) >= limit:
            break
        with pq.ParquetFile(path) as pf:
            for batch in pf.iter_batches(batch_size=batch_size, columns=_columns(pf, _ROW_COLUMNS)):
                rows += batch.slice(0, limit - len(rows)).to_pylist()
                if len(rows) >= limit:
                    break
    return rows


def _pick_rejects(paths: list[Path], per_key: int, expected: set[tuple[str, str]]):
    """Cheap pass over (reject_stage, reject_reason): first ``per_key`` row positions per reason.

    Returns ``({key: [(path, row_index, id)]}, {key: rows seen})``. Stops once every reason that
    stats.json announced has enough examples; counts are then partial and only used as a fallback.
    """
    picks: dict[tuple[str, str], list] = {}
    seen: dict[tuple[str, str], int] = {}
    for path in paths:
        with pq.ParquetFile(path) as pf:
            cols = [c for c in ("id", "reject_stage", "reject_reason") if c in pf.schema_arrow.names]
            pos = 0
            for batch in pf.iter_batches(batch_size=8192, columns=cols):
                d = batch.to_pydict()
                none = [None] * batch.num_rows
                for i, (rid, stage, reason) in enumerate(
                    zip(d.get("id", none), d.get("reject_stage", none), d.get("reject_reason", none))
                ):
                    key = (stage or "?", reason or "unknown")
                    seen[key] = seen.get(key, 0) + 1
                    lst = picks.setdefault(key, [])
                    if len(lst) < per_key:
                        lst.append((path, pos + i, rid))
                pos += batch.num_rows
                if expected and all(len(picks.get(k, ())) >= per_key for k in expected):
                    return picks, seen
    return picks, seen


def _take_rows(path: Path, indices: list[int], batch_size: int = 64) -> dict[int, dict]:
    """Rows at ``indices`` of one file, reading only the row groups (and batches) that hold them."""
    out: dict[int, dict] = {}
    with pq.ParquetFile(path) as pf:
        cols = _columns(pf, _ROW_COLUMNS)
        starts = [0]
        for g in range(pf.metadata.num_row_groups):
            starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
        groups: dict[int, list[int]] = {}
        for i in sorted(set(indices)):
            groups.setdefault(bisect.bisect_right(starts, i) - 1, []).append(i)
        for g, want in groups.items():
            pos = starts[g]
            for batch in pf.iter_batches(batch_size=batch_size, row_groups=[g], columns=cols):
                sel = [i for i in want if pos <= i < pos + batch.num_rows]
                if sel:
                    taken = batch.take(pa.array([i - pos for i in sel])).to_pylist()
                    out.update(zip(sel, taken))
                pos += batch.num_rows
                if pos > want[-1]:
                    break
    return out


def _pool_files(pool: Path, manifest: dict) -> tuple[list[Path], list[Path]]:
    """Shard and reject Parquet paths: the manifest's order, or the folder listing when it has none."""
    shards = [pool / s["parquet"]["path"] for s in manifest.get("shards", []) if s.get("parquet")]
    rejects = [pool / r["path"] for r in manifest.get("rejects", []) if r.get("path")]
    shards = shards or sorted((pool / "shards").glob("*.parquet"))
    rejects = rejects or sorted((pool / "rejects").glob("*.parquet"))
    return [p for p in shards if p.exists()], [p for p in rejects if p.exists()]


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        log.warning("%s missing; report will have gaps", path)
        return {}


# ---------------------------------------------------------------------------------------------- build
def _report_data(pool: Path, manifest: dict, stats: dict, examples: list[dict], kept: list[dict]) -> dict:
    mt = manifest.get("totals", {})
    shards = manifest.get("shards", [])
    nbytes = mt.get("bytes")
    if nbytes is None and shards:
        nbytes = sum((s.get(k) or {}).get("bytes") or 0 for s in shards for k in ("parquet", "tar"))
    rows_in, elapsed = stats.get("rows_in"), stats.get("elapsed_s")
    rps = stats.get("rows_per_s")
    if rps is None and rows_in is not None and elapsed:
        rps = rows_in / elapsed
    if mt.get("rows") is not None and stats.get("rows_out") is not None and mt["rows"] != stats["rows_out"]:
        log.warning("manifest totals.rows=%s but stats rows_out=%s", mt["rows"], stats["rows_out"])
    stages = []
    for s in stats.get("stages", []):
        ri, ro = s.get("rows_in"), s.get("rows_out")
        stages.append(
            {
                "name": s.get("name"),
                "rows_in": ri,
                "rows_out": ro,
                "kept_pct": round(100.0 * ro / ri, 1) if ri and ro is not None else None,
                "drops": dict(s.get("drops") or {}),
                "outcomes": dict(s.get("outcomes") or {}),
                "seconds": s.get("seconds"),
                "histograms": s.get("histograms") or {},
            }
        )
    return {
        "format": "curation.report/1",
        "pool": str(pool),
        "recipe_hash": manifest.get("recipe_hash"),
        "totals": {
            "rows_in": rows_in,
            "rows_out": stats.get("rows_out"),
            "rows_rejected": stats.get("rows_rejected", mt.get("rejected")),
            "shards": mt.get("shards", len(shards)),
            "bytes": nbytes,
            "elapsed_s": elapsed,
            "rows_per_s": rps,
        },
        "stages": stages,
        "rejects": [{k: e[k] for k in ("stage", "reason", "count", "ids")} for e in examples],
        "kept_examples": [r.get("id") for r in kept],
    }


def _html(data: dict, examples: list[dict], kept: list[dict], px: int) -> str:
    t = data["totals"]
    tot = [
        ("rows in", number(t["rows_in"])),
        ("rows out", f"{number(t['rows_out'])} ({percent(t['rows_out'], t['rows_in'])})"),
        ("rejected", f"{number(t['rows_rejected'])} ({percent(t['rows_rejected'], t['rows_in'])})"),
        ("shards", number(t["shards"])),
        ("bytes", _bytes(t["bytes"])),
        ("elapsed", f"{number(t['elapsed_s'])} s"),
        ("rows/s", number(t["rows_per_s"])),
    ]
    anchors = {(e["stage"], e["reason"]): f"reject-{i}" for i, e in enumerate(examples)}
    first_in = (data["stages"][0]["rows_in"] if data["stages"] else None) or t["rows_in"]
    rows = []
    for s in data["stages"]:
        drops = "".join(
            f'<a class="pill" href="#{anchors.get((s["name"], r), "")}">{esc(r)}: {number(c)}</a>'
            for r, c in sorted(s["drops"].items(), key=lambda kv: -kv[1])
        )
        if s["outcomes"]:  # what happened to the rows it kept
            drops += "".join(
                f'<span class="pill kept">{esc(v)}: {number(c)}</span>' for v, c in s["outcomes"].items()
            )
        width = 100.0 * (s["rows_out"] or 0) / first_in if first_in else 0
        dropped = (
            s["rows_in"] - s["rows_out"] if s["rows_in"] is not None and s["rows_out"] is not None else None
        )
        rows.append(
            f'<tr><td>{esc(s["name"])}</td><td class="r">{number(s["rows_in"])}</td>'
            f'<td class="r">{number(s["rows_out"])}</td>'
            f'<td class="r">{percent(s["rows_out"], s["rows_in"])}</td>'
            f'<td><div class="bar"><i style="width:{width:.1f}%"></i></div></td>'
            f'<td class="r">{number(dropped)}</td><td>{drops}</td>'
            f'<td class="r">{number(s["seconds"])}</td></tr>'
        )
    hists = [
        svg_histogram(h.get("edges") or [], h.get("counts") or [], f"{s['name']} · {name}")
        for s in data["stages"]
        for name, h in sorted(s["histograms"].items())
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Curation report: {esc(Path(data['pool']).name)}</title><style>{CSS}</style></head><body>",
        (
            f'<header><h1>Curation report</h1><div class="meta">pool <code>{esc(data["pool"])}</code> · '
            f'recipe <code>{esc(data["recipe_hash"])}</code></div><div class="totals">'
        ),
        *(f'<div class="tot"><span class="meta">{k}</span><b>{v}</b></div>' for k, v in tot),
        "</div></header>",
        (
            '<section id="stages"><h2>Stages</h2><table><thead><tr><th>stage</th><th class="r">rows in</th>'
            '<th class="r">rows out</th><th class="r">kept</th><th>funnel</th><th class="r">dropped</th>'
            '<th>drops by reason (green: outcomes of kept rows)</th><th class="r">seconds</th></tr></thead>'
            "<tbody>"
        ),
        *rows,
        "</tbody></table></section>",
        '<section id="histograms"><h2>Histograms</h2><div class="hists">',
        *(hists or ['<p class="meta">No histograms in stats.json.</p>']),
        "</div></section>",
        f'<section id="kept"><h2>Kept samples ({len(kept)} from the first shards)</h2><div class="grid">',
        *(row_card(r, px, False) for r in kept),
        "</div></section>",
        '<section id="rejects"><h2>Rejected samples</h2>',
    ]
    for e in examples:
        parts.append(
            f'<section class="reason" id="{anchors[(e["stage"], e["reason"])]}" '
            f'data-reason="{esc(e["reason"])}" data-stage="{esc(e["stage"])}">'
            f'<h3>{esc(e["reason"])} <span class="meta">(stage {esc(e["stage"])}, '
            f'{number(e["count"])} rows; {len(e["rows"])} shown)</span></h3><div class="grid">'
        )
        parts += [row_card(r, px, True) for r in e["rows"]]
        parts.append("</div></section>")
    parts.append("</section></body></html>\n")
    return "\n".join(parts)


def write_report(
    pool: str | Path, *, thumbs_per_reason: int = 8, thumbs_kept: int = 16, thumb_px: int = 128
) -> tuple[Path, Path]:
    """Write POOL/report.html and POOL/report.json from the pool's manifest.json, stats.json, shards
    and rejects. Returns their paths ``(html, json)``."""
    pool = Path(pool).resolve()
    manifest, stats = _load_json(pool / "manifest.json"), _load_json(pool / "stats.json")
    shard_paths, reject_paths = _pool_files(pool, manifest)
    kept = _head_rows(shard_paths, thumbs_kept) if thumbs_kept > 0 else []

    # Reasons in stats order (stage, then most frequent first); reasons only found in rejects/ follow.
    expected = {}
    for s in stats.get("stages", []):
        for reason, count in sorted((s.get("drops") or {}).items(), key=lambda kv: -kv[1]):
            expected[(s.get("name"), reason)] = count
    picks, seen = _pick_rejects(reject_paths, thumbs_per_reason, set(expected)) if reject_paths else ({}, {})
    by_file: dict[Path, list[int]] = {}
    for lst in picks.values():
        for path, idx, _ in lst:
            by_file.setdefault(path, []).append(idx)
    fetched = {(p, i): row for p, idxs in by_file.items() for i, row in _take_rows(p, idxs).items()}
    examples = []
    for key in [*expected, *(k for k in picks if k not in expected)]:
        lst = picks.get(key, [])
        examples.append(
            {
                "stage": key[0],
                "reason": key[1],
                "count": expected.get(key, seen.get(key)),
                "ids": [i for _, _, i in lst],
                "rows": [fetched[(p, i)] for p, i, _ in lst],
            }
        )

    data = _report_data(pool, manifest, stats, examples, kept)
    html_path, json_path = pool / "report.html", pool / "report.json"
    commit.write_text(json_path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    commit.write_text(html_path, _html(data, examples, kept, thumb_px))
    log.info(
        "wrote %s and %s (%d kept, %d reject examples)",
        html_path,
        json_path,
        len(kept),
        sum(len(e["rows"]) for e in examples),
    )
    return html_path, json_path
