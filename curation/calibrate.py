"""``curation calibrate POOL --score COLUMN``: pick a threshold by looking at what it keeps.

A score column (CLIP similarity, a judge's rating, a language confidence) means little as a number;
what a person needs is, at each candidate threshold, how much of the data survives and what the rows
just above and just below the cut look like. This reads every scored row of a pool (its shards and
rejects: a score filter run with ``annotate_only: true`` or ``keep_fraction`` keeps them all scored)
and writes ``calibrate-COLUMN.html`` (a histogram with the thresholds marked, the kept fraction at
each, and the borderline rows on either side as thumbnails) and ``calibrate-COLUMN.json``.

    curation calibrate pools/demo --score score_clip_score --thresholds 0.2 0.25 0.3
    curation calibrate pools/demo --score score_clip_score --keep 0.9 0.5 0.3    # thresholds from fractions
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from curation.html import CSS, esc, number, row_card, svg_histogram
from curation.io import commit

DEFAULT_KEEP = (0.9, 0.7, 0.5, 0.3, 0.1)
_CARD_COLUMNS = [
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
]


def _files(pool: Path) -> list[str]:
    return [str(p) for d in ("shards", "rejects") for p in sorted((pool / d).glob("*.parquet"))]


def calibrate(
    pool: str | Path,
    score: str,
    *,
    thresholds: Sequence[float] = (),
    keep: Sequence[float] = (),
    examples: int = 6,
    thumb_px: int = 112,
    bins: int = 40,
) -> tuple[Path, Path]:
    """Write the calibration page for ``score`` of a local pool; return (html, json) paths.

    ``thresholds`` are used as given; ``keep`` fractions become the thresholds that keep them (the score
    of the ``ceil(f * n)``-th best row); with neither, ``keep`` defaults to 90/70/50/30/10%.
    """
    pool = Path(pool)
    files = _files(pool)
    if not files:
        raise FileNotFoundError(f"{pool}: no Parquet shards or rejects (is it a pool folder?)")
    ds = pads.dataset(files, format="parquet")
    if score not in ds.schema.names:
        scores = [n for n in ds.schema.names if n.startswith("score_")]
        raise ValueError(f"{pool} has no column '{score}' (score columns: {', '.join(scores) or 'none'})")
    table = ds.to_table(columns=[score])
    values = table[score].drop_null().to_numpy().astype(np.float64)
    if not len(values):
        raise ValueError(f"{pool}: no row has a '{score}'")
    desc = np.sort(values)[::-1]
    cuts: list[dict[str, Any]] = []
    for t in thresholds:
        cuts.append({"threshold": float(t), "asked": "threshold"})
    for f in keep or (DEFAULT_KEEP if not thresholds else ()):
        if not 0 < f <= 1:
            raise ValueError(f"--keep {f}: expected a fraction in (0, 1]")
        cuts.append({"threshold": float(desc[math.ceil(f * len(desc)) - 1]), "asked": f"keep {100 * f:g}%"})
    cuts.sort(key=lambda c: c["threshold"])
    n = len(values)
    asc = desc[::-1]
    for c in cuts:
        kept = int((values >= c["threshold"]).sum())
        c.update(
            kept=kept,
            kept_fraction=kept / n,
            below=_borderline(ds, score, asc, c["threshold"], examples, below=True),
            above=_borderline(ds, score, asc, c["threshold"], examples, below=False),
        )
    counts, edges = np.histogram(values, bins=bins)
    data = {
        "pool": str(pool),
        "score": score,
        "rows_scored": n,
        "quantiles": {
            f"p{q}": float(np.quantile(values, q / 100)) for q in (1, 5, 10, 25, 50, 75, 90, 95, 99)
        },
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "cuts": [{k: v for k, v in c.items() if k not in ("below", "above")} for c in cuts],
    }
    stem = f"calibrate-{score}"
    json_path, html_path = pool / f"{stem}.json", pool / f"{stem}.html"
    commit.write_text(json_path, json.dumps(data, indent=2))
    commit.write_text(html_path, _html(data, cuts, edges, counts, thumb_px))
    return html_path, json_path


def _borderline(
    ds: pads.Dataset, score: str, asc: np.ndarray, threshold: float, k: int, below: bool
) -> list[dict]:
    """The ``k`` rows closest to the threshold on one side: what the cut decides about.

    ``asc`` (every score, sorted) gives the score range of those rows, so only they are read with their media.
    """
    cut = int(np.searchsorted(asc, threshold, side="left"))
    wanted = asc[max(0, cut - k) : cut] if below else asc[cut : cut + k]
    if not len(wanted):
        return []
    cond = pc.field(score) < threshold if below else pc.field(score) >= threshold
    cols = [c for c in _CARD_COLUMNS if c in ds.schema.names] + [score]
    lo, hi = float(wanted.min()), float(wanted.max())
    rows = ds.to_table(
        columns=cols, filter=cond & (pc.field(score) >= lo) & (pc.field(score) <= hi)
    ).to_pylist()
    rows.sort(key=lambda r: r[score], reverse=below)
    return rows[:k]


def _html(data: dict, cuts: list[dict], edges: np.ndarray, counts: np.ndarray, px: int) -> str:
    score = data["score"]
    hist = svg_histogram(
        edges.tolist(),
        counts.tolist(),
        f"{score}: {data['rows_scored']:,} scored rows",
        width=760,
        height=200,
    )
    # mark the thresholds on the histogram (same geometry as svg_histogram: 44 px left pad, 8 right)
    lo, hi = float(edges[0]), float(edges[-1])
    marks = "".join(
        f'<line x1="{44 + (760 - 52) * (c["threshold"] - lo) / ((hi - lo) or 1):.1f}" y1="20" '
        f'x2="{44 + (760 - 52) * (c["threshold"] - lo) / ((hi - lo) or 1):.1f}" y2="178" '
        f'style="stroke:#e0803a;stroke-width:2"><title>{c["threshold"]:.4g}: keeps '
        f"{100 * c['kept_fraction']:.1f}%</title></line>"
        for c in cuts
    )
    hist = hist.replace("</svg>", marks + "</svg>")
    rows = "".join(
        f"<tr><td class=r>{c['threshold']:.4g}</td><td>{esc(c['asked'])}</td><td class=r>"
        f"{number(c['kept'])}</td><td class=r>{100 * c['kept_fraction']:.1f}%</td></tr>"
        for c in cuts
    )
    sections = []
    for c in cuts:
        below = "".join(row_card(r, px, False) for r in c["below"]) or "<p class=meta>none</p>"
        above = "".join(row_card(r, px, False) for r in c["above"]) or "<p class=meta>none</p>"
        sections.append(
            f"<h2>{esc(score)} ≥ {c['threshold']:.4g} keeps {100 * c['kept_fraction']:.1f}% "
            f"({number(c['kept'])} rows)</h2><h3>just above: kept</h3><div class=grid>{above}</div>"
            f"<h3>just below: dropped</h3><div class=grid>{below}</div>"
        )
    q = " · ".join(f"{k} {v:.4g}" for k, v in data["quantiles"].items())
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">\
<title>calibrate {esc(score)}</title>
<style>{CSS}</style></head><body><h1>Calibrate {esc(score)}</h1>
<p class="meta">{esc(data["pool"])} · {data["rows_scored"]:,} rows scored (shards and rejects) · \
{esc(q)}</p>
<div class="hists">{hist}</div>
<table><thead><tr><th class=r>threshold</th><th>from</th><th class=r>rows kept</th><th class=r>kept</th></tr>\
</thead>
<tbody>{rows}</tbody></table>{"".join(sections)}</body></html>
"""
