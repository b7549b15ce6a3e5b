"""The contamination report of ``curation audit`` (:mod:`curation.audit` runs the scan): is this corpus
contaminated with benchmark X, and where?

The ``decontaminate`` stage's matches over a corpus (nothing but the matched rows is written) become

- ``report.json``, for machines. Stable names (docs/decontamination.md)::

    benchmarks.<name>.items                  items in the benchmark
    benchmarks.<name>.contaminated_items     items with at least one match in the corpus
    benchmarks.<name>.matches[]              every match, strongest first:
        benchmark_item, sample_id, modality, method, score, source_uri, source_offset
    benchmarks.<name>.not_indexed[]          items (and files, rows) that cannot be matched at all, and why
    benchmarks.<name>.partially_indexed[]    parts of items that are not matched (a short question, an
                                             unreadable image) while another part of the item is

- ``report.html``, for people: contamination rate per benchmark, then each match side by side
  (benchmark question and image next to the corpus row's text and image), strongest first.

The scan itself lives in ``DIR/scan`` (a pool with no shards: its rejects are the matched rows), so an
interrupted audit resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.dedup.index import METHODS, BenchmarkIndex
from curation.html import CSS, esc, number, percent, svg_histogram, thumbnail
from curation.io import commit

log = logging.getLogger(__name__)

FORMAT = "curation.audit/1"
HTML_MATCHES_PER_BENCHMARK = 200


def write_reports(index: BenchmarkIndex, scan: str, stats: dict[str, Any], out: str, **header: Any) -> dict:
    """``report.json`` and ``report.html`` in ``out`` from a finished scan (a pool whose rejects are the
    matched rows) and its run's stats; returns the report's data."""
    data = build_report(index, scan, stats, **header)
    wanted = {(m["benchmark"], m["benchmark_item"]) for m in _all_matches(data)}
    catalog = {(it.benchmark, it.item_id): it for it in index.items if (it.benchmark, it.item_id) in wanted}
    out_dir = Path(out)
    commit.write_text(out_dir / "report.json", json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    commit.write_text(out_dir / "report.html", render_html(data, catalog, _corpus_rows(scan, data)))
    return data


def _reject_files(scan: str) -> list[str]:
    folder = Path(scan) / "rejects"
    return sorted(str(p) for p in folder.glob("*.parquet")) if folder.exists() else []


def build_report(index: BenchmarkIndex, scan: str, stats: dict[str, Any], **header: Any) -> dict[str, Any]:
    """report.json's content from the index summary and the matched rows in ``scan``'s rejects."""
    summary = index.summary()
    benchmarks: dict[str, dict[str, Any]] = {}
    for name, info in summary["benchmarks"].items():
        benchmarks[name] = {
            "items": info["items"],
            "items_with_images": info["with_images"],
            "items_with_video": info["with_video"],
            "contaminated_items": 0,
            "contamination_rate": 0.0,
            "matched_rows": 0,
            "by_method": {},
            "matches": [],
            "not_indexed": [],
            "partially_indexed": [],
        }
    whole = {(x["benchmark"], x["item"]) for x in summary["not_indexed"] if x["part"] in ("item", "file")}
    for x in summary["not_indexed"]:
        b = benchmarks.setdefault(
            x["benchmark"],
            {
                "items": 0,
                "contaminated_items": 0,
                "contamination_rate": 0.0,
                "matched_rows": 0,
                "by_method": {},
                "matches": [],
                "not_indexed": [],
                "partially_indexed": [],
            },
        )
        entry = {k: x[k] for k in ("item", "part", "reason")}
        if x["part"] in ("item", "file"):
            b["not_indexed"].append(entry)
        elif (x["benchmark"], x["item"]) not in whole:
            b["partially_indexed"].append(entry)
        else:  # the reasons why a whole item is not indexed, next to it
            b["not_indexed"].append(entry)
    rows_by_benchmark: dict[str, set] = defaultdict(set)
    contaminated_rows = 0
    unreadable = Counter()
    for path in _reject_files(scan):
        table = pq.read_table(
            path,
            columns=[
                "id",
                "modality",
                "source_uri",
                "source_offset",
                "reject_stage",
                "reject_reason",
                "reject_detail",
            ],
        )
        ingest = table.filter(pc.equal(table["reject_stage"], "ingest"))
        unreadable.update(ingest["reject_reason"].to_pylist())
        hits = table.filter(pc.equal(table["reject_stage"], "decontaminate"))
        contaminated_rows += hits.num_rows
        for row in hits.to_pylist():
            try:
                matches = json.loads(row["reject_detail"] or "[]")
            except ValueError:
                continue
            for m in matches:
                b = benchmarks.setdefault(
                    m["benchmark"],
                    {
                        "items": 0,
                        "contaminated_items": 0,
                        "matched_rows": 0,
                        "by_method": {},
                        "matches": [],
                        "not_indexed": [],
                        "partially_indexed": [],
                    },
                )
                b["matches"].append(
                    {
                        "benchmark_item": m["benchmark_item"],
                        "sample_id": row["id"],
                        "modality": m["modality"],
                        "method": m["method"],
                        "score": m["score"],
                        "source_uri": row["source_uri"],
                        "source_offset": row["source_offset"],
                        "row_modality": row["modality"],
                    }
                )
                rows_by_benchmark[m["benchmark"]].add(row["id"])
    for name, b in benchmarks.items():
        b["matches"].sort(key=lambda m: (-m["score"], m["benchmark_item"], m["sample_id"]))
        b["contaminated_items"] = len({m["benchmark_item"] for m in b["matches"]})
        b["contamination_rate"] = round(b["contaminated_items"] / b["items"], 6) if b["items"] else 0.0
        b["matched_rows"] = len(rows_by_benchmark[name])
        b["by_method"] = dict(Counter(m["method"] for m in b["matches"]).most_common())
    ingest_stats = next((s for s in stats.get("stages", []) if s.get("name") == "ingest"), {})
    return {
        "format": FORMAT,
        **header,
        "config": summary["config"],
        "methods": list(METHODS),
        "rows_scanned": ingest_stats.get("rows_in", 0),
        "rows_unreadable": sum(unreadable.values()),
        "unreadable_by_reason": dict(unreadable),
        "rows_contaminated": contaminated_rows,
        "index_seconds": summary["build_seconds"],
        "benchmarks": benchmarks,
    }


def _all_matches(data: dict[str, Any]):
    """Matches the HTML may show: the strongest rows of each benchmark."""
    for name, b in data["benchmarks"].items():
        rows: set[str] = set()
        for m in b["matches"]:
            if len(rows) >= HTML_MATCHES_PER_BENCHMARK and m["sample_id"] not in rows:
                continue
            rows.add(m["sample_id"])
            yield {"benchmark": name, **m}


def _corpus_rows(scan: str, data: dict[str, Any]) -> dict[str, dict]:
    """The matched rows shown in the HTML (text, first image or frame), by id."""
    wanted = {m["sample_id"] for m in _all_matches(data)}
    rows: dict[str, dict] = {}
    for path in _reject_files(scan):
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(
            batch_size=64, columns=["id", "text", "texts", "image", "images", "frames"]
        ):
            ids = batch.column(0).to_pylist()
            take = [i for i, x in enumerate(ids) if x in wanted and x not in rows]
            if take:
                for row in batch.take(take).to_pylist():
                    rows[row["id"]] = row
    return rows


# ----------------------------------------------------------------------------------------------- html

_CSS_EXTRA = """
.m{display:grid;grid-template-columns:70px 1fr 1fr;gap:10px;background:#fff;border:1px solid #dde;
border-radius:8px;padding:8px;margin:8px 0}.m .s{font-size:18px;font-weight:600}\
.m .meth{font-size:11px;color:#556}
.side{display:flex;gap:8px;min-width:0}\
.side img,.side .ph{width:110px;height:110px;object-fit:contain;flex:none}
.side .tx{font-size:12px;white-space:pre-wrap;word-break:break-word;max-height:150px;overflow:auto}
.side .k{color:#667;font-size:11px}mark{background:#ffe58a}details{margin:8px 0}
"""


def _snippet(text: str, question: str, width: int = 320) -> tuple[str, tuple[int, int] | None]:
    """The part of ``text`` around the benchmark question (located by its first words), and that span."""
    words = re.findall(r"\w+", question.lower())
    for k in (6, 4, 3):
        if len(words) >= k:
            pattern = r"\W+".join(re.escape(w) for w in words[:k])
            m = re.search(pattern, text, re.IGNORECASE)
            if m:
                start = max(0, m.start() - width // 3)
                end = min(len(text), start + width)
                return text[start:end], (m.start() - start, m.end() - start)
    return text[:width], None


def render_html(data: dict[str, Any], catalog: dict, rows: dict[str, dict], thumb_px: int = 110) -> str:
    def thumb(blob: bytes | None) -> str:
        uri, why = thumbnail(blob, thumb_px) if blob else (None, "no image")
        return f'<img src="{uri}" alt="">' if uri else f'<div class="ph">{esc(why)}</div>'

    b_rows = []
    for name, b in data["benchmarks"].items():
        rate = b.get("contamination_rate", 0.0)
        methods = " ".join(
            f'<span class="pill">{esc(m)}: {number(c)}</span>' for m, c in b.get("by_method", {}).items()
        )
        b_rows.append(
            f'<tr><td><a href="#b-{esc(name)}">{esc(name)}</a></td><td class="r">{number(b["items"])}</td>'
            f'<td class="r">{number(b["contaminated_items"])}</td><td class="r">{rate * 100:.2f}%</td>'
            f'<td><div class="bar"><i style="width:{min(100.0, rate * 100):.1f}%"></i></div></td>'
            f'<td class="r">{number(b.get("matched_rows", 0))}</td><td>{methods}</td>'
            f'<td class="r">{number(len({x["item"] for x in b.get("not_indexed", [])}))}</td>'
            f'<td class="r">{number(len({x["item"] for x in b.get("partially_indexed", [])}))}</td></tr>'
        )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Contamination audit</title>",
        f"<style>{CSS}{_CSS_EXTRA}</style></head><body>",
        "<h1>Contamination audit</h1>",
        f'<p class="meta">registry <code>{esc(data.get("registry"))}</code> · corpus '
        + ", ".join(f"<code>{esc(c)}</code>" for c in data.get("corpus", []))
        + "</p>",
        '<div class="totals">',
        f'<div class="tot"><b>{number(data["rows_scanned"])}</b>rows scanned</div>',
        (
            f'<div class="tot"><b>{number(data["rows_contaminated"])}</b>rows contaminated '
            f"({percent(data['rows_contaminated'], data['rows_scanned'])})</div>"
        ),
        f'<div class="tot"><b>{number(data["rows_unreadable"])}</b>rows unreadable (not scanned)</div>',
        f'<div class="tot"><b>{number(round(data.get("seconds", 0), 1))} s</b>wall time</div></div>',
        (
            "<h2>Benchmarks</h2><table><thead><tr><th>benchmark</th><th class=r>items</th>"
            "<th class=r>contaminated</th><th class=r>rate</th><th></th><th class=r>rows</th>"
            "<th>matches by method</th><th class=r>not indexed</th><th class=r>partly indexed</th>"
            "</tr></thead><tbody>" + "".join(b_rows) + "</tbody></table>"
        ),
        (
            '<p class="meta">Scores are 0-1 per method: share of the item\'s word n-grams found in the row '
            "(text_containment), estimated Jaccard (text_minhash), 1 - verified distance/255 (image_hash), "
            "share of the row's frames matching in order (video_keyframes); *_question also requires the "
            "item's question in the row.</p>"
        ),
    ]
    for name, b in data["benchmarks"].items():
        parts.append(
            f'<h2 id="b-{esc(name)}">{esc(name)}: {number(b["contaminated_items"])} of '
            f"{number(b['items'])} items contaminated, {number(len(b['matches']))} matches</h2>"
        )
        if b["matches"]:
            scores = [m["score"] for m in b["matches"]]
            edges = [i / 20 for i in range(21)]
            counts = [
                sum(1 for s in scores if edges[i] <= s < edges[i + 1] or (i == 19 and s == 1.0))
                for i in range(20)
            ]
            parts.append(f'<div class="hists">{svg_histogram(edges, counts, "match scores")}</div>')
        for key, label in (
            ("not_indexed", "not indexed (cannot be matched)"),
            ("partially_indexed", "partly indexed (matched through their other parts)"),
        ):
            if b.get(key):
                lis = "".join(
                    f"<li><code>{esc(x['item'])}</code> {esc(x['part'])}: {esc(x['reason'])}</li>"
                    for x in b[key][:500]
                )
                n_items = len({x["item"] for x in b[key]})
                parts.append(f"<details><summary>{number(n_items)} {label}</summary><ul>{lis}</ul></details>")
        pairs: dict[tuple[str, str], dict] = {}  # one card per (item, row), listing every method that matched
        for m in b["matches"]:
            card = pairs.setdefault((m["benchmark_item"], m["sample_id"]), {**m, "methods": []})
            card["methods"].append(f"{m['method']} {m['score']:.2f}")
        shown = list(pairs.values())[:HTML_MATCHES_PER_BENCHMARK]
        if len(pairs) > len(shown):
            parts.append(
                f'<p class="meta">Showing the {len(shown)} strongest of {number(len(pairs))} (item, row) '
                "pairs; report.json has every match.</p>"
            )
        for m in shown:
            item = catalog.get((name, m["benchmark_item"]))
            row = rows.get(m["sample_id"], {})
            question = item.question if item else ""
            q_text = item.text if item else "(item not found in the registry any more)"
            b_img = item.images[0] if item and item.images else None
            text = row.get("text") or " ".join(t for t in (row.get("texts") or []) if t) or ""
            snippet, span = _snippet(text, question)
            snippet_html = (
                (
                    esc(snippet[: span[0]])
                    + "<mark>"
                    + esc(snippet[span[0] : span[1]])
                    + "</mark>"
                    + esc(snippet[span[1] :])
                )
                if span
                else esc(snippet)
            )
            media = (
                row.get("image")
                or next((x for x in (row.get("images") or []) if x), None)
                or next((x for x in (row.get("frames") or []) if x), None)
            )
            parts.append(
                f'<div class="m"><div><div class="s">{m["score"]:.2f}</div><div class="meth">'
                f"{'<br>'.join(esc(x) for x in m['methods'])}</div></div>"
                f'<div class="side">{thumb(b_img) if b_img or m["modality"] != "text" else ""}<div>'
                f'<div class="k">benchmark item <code>{esc(m["benchmark_item"])}</code></div>'
                f'<div class="tx">{esc(q_text)}</div></div></div>'
                f'<div class="side">{thumb(media) if media or m["modality"] != "text" else ""}<div>'
                f'<div class="k">row <code>{esc(m["sample_id"][:12])}</code> · '
                f"<code>{esc(os.path.basename(str(m.get('source_uri'))))}#"
                f"{esc(m.get('source_offset'))}</code></div>"
                f'<div class="tx">{snippet_html}</div></div></div></div>'
            )
    parts.append("</body></html>")
    return "".join(parts)
