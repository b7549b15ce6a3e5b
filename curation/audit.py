"""``curation audit``: scan a corpus against every benchmark of a registry and write the contamination report.

Runs the ``decontaminate`` stage over the corpus as a pipeline (sources detected from the paths, see
:mod:`curation.io.detect`; nothing but the matched rows is written), in ``OUT/scan``, so an interrupted audit
resumes where it stopped; then writes ``report.json`` and ``report.html`` (:mod:`curation.dedup.audit`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from curation.dedup.audit import write_reports
from curation.dedup.index import BenchmarkIndex
from curation.dedup.registry import load_benchmarks
from curation.io import outputs
from curation.io.detect import detect_sources
from curation.pipeline import run_pipeline
from curation.recipe import pipeline_from_dict

log = logging.getLogger(__name__)


@dataclass
class AuditResult:
    out: str
    report_json: str
    report_html: str
    data: dict[str, Any]


def run_audit(
    registry: str,
    corpus: Sequence[str],
    out: str,
    *,
    registry_set: Sequence[str] = (),
    match: dict[str, Any] | None = None,
    address: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    num_cpus: int | None = None,
) -> AuditResult:
    """Scan ``corpus`` (pools, source files or folders) against every benchmark of ``registry``.

    ``out`` must not overlap the corpus, the registry or a benchmark file, and must be new, empty or an
    earlier audit (:class:`curation.io.outputs.OutputError` otherwise, before anything is written);
    ``overwrite`` empties an earlier audit there first. One audit writes ``out`` at a time."""
    t0 = time.perf_counter()
    registry = str(Path(registry).resolve()) if "://" not in registry else registry
    specs = load_benchmarks(registry, list(registry_set))  # a broken registry fails here, before Ray starts
    out = out if "://" in out else os.path.abspath(out)
    outputs.check_overlap(
        out,
        [("--corpus", c) for c in corpus]
        + [("--benchmarks", registry)]
        + [(f"benchmark {b.name}", p) for b in specs for p in b.paths],
    )
    outputs.check_writable(out, "audit", overwrite)
    sources = detect_sources(list(corpus))
    for s in sources:
        log.info("corpus source %s: %s %s, %d files", s.name, s.format, s.modality, len(s.paths))
    scan = os.path.join(os.path.abspath(out), "scan")
    raw = {
        "name": "audit",
        "sources": [asdict(s) for s in sources],
        "stages": [
            {
                "decontaminate": {
                    "benchmarks": registry,
                    "registry_set": list(registry_set),
                    "match": dict(match or {}),
                }
            }
        ],
        "output": {"path": scan, "formats": [], "write_rejects": True, "report": False},
        "execution": {"num_cpus": num_cpus} if num_cpus else {},
    }
    recipe = pipeline_from_dict(raw, "curation audit")
    with outputs.lock(out, "curation audit"):
        outputs.claim(out, "audit", overwrite)  # with overwrite, the earlier scan and reports go too
        result = run_pipeline(recipe, address=address, progress=progress)
        stage = recipe.stages[0]
        index = getattr(stage, "index", None) or BenchmarkIndex.build(registry, registry_set, stage.match)
        data = write_reports(
            index,
            scan,
            result.stats,
            out,
            registry=registry,
            corpus=list(corpus),
            sources=[asdict(s) for s in sources],
            seconds=time.perf_counter() - t0,
        )
    out_dir = Path(out)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    log.info(
        "audit: %d rows scanned, %d contaminated; %s",
        data["rows_scanned"],
        data["rows_contaminated"],
        html_path,
    )
    return AuditResult(str(out_dir), str(json_path), str(html_path), data)
