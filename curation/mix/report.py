"""``report.html`` and ``report.json`` of a mixture: proportions and length distributions at a glance.

What a training lead checks before launching a stage: did every source get its share of the budget
(target against selected, in tokens), how the tokens split by mode and modality, how long the rows
are (a source of 30-token captions and one of 8,000-token documents need different packing), and
which sources had to repeat (the epoch ledger).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import polars as pl

from curation.html import CSS, esc, number, percent, svg_histogram
from curation.io import commit

_EXTRA_CSS = """
.legend i{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px;border-radius:2px}
td .bar{display:inline-block;vertical-align:middle;width:160px}.bar i.t{background:#e0803a}
.dev-ok{color:#2a7d3c}.dev-bad{color:#b3261e}
"""


def _bars(rows: list[tuple[str, float, float | None]], title: str) -> str:
    """Horizontal bars: each row's share, with its target share as a tick when there is one."""
    width, row_h, pad_l = 560, 22, 170
    height = 28 + row_h * len(rows)
    top = max([max(v, t or 0) for _, v, t in rows] or [1]) or 1
    out = [
        (
            f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">'
        ),
        f'<text x="8" y="15" class="t">{esc(title)}</text>',
    ]
    pw = width - pad_l - 70
    for i, (label, value, target) in enumerate(rows):
        y = 24 + i * row_h
        w = pw * value / top
        out.append(f'<text x="{pad_l - 6}" y="{y + 13}" text-anchor="end">{esc(label)}</text>')
        out.append(
            f'<rect x="{pad_l}" y="{y + 3}" width="{max(w, 0.5):.1f}" height="{row_h - 8}">'
            f"<title>{esc(label)}: {100 * value:.2f}%</title></rect>"
        )
        if target is not None:
            tx = pad_l + pw * target / top
            out.append(
                f'<line x1="{tx:.1f}" y1="{y}" x2="{tx:.1f}" y2="{y + row_h - 2}" '
                f'style="stroke:#e0803a;stroke-width:2"><title>target {100 * target:.2f}%</title></line>'
            )
        out.append(f'<text x="{pad_l + w + 4:.1f}" y="{y + 13}">{100 * value:.1f}%</text>')
    out.append("</svg>")
    return "".join(out)


def _length_histograms(sel: pl.DataFrame, bins: int = 30) -> dict[str, dict[str, Any]]:
    """Tokens per row, per source, on a log scale (row lengths span four orders of magnitude)."""
    out = {}
    for source in sorted(sel["mix_source"].unique().to_list()):
        tokens = sel.filter(pl.col("mix_source") == source)["tokens"].to_numpy()
        tokens = tokens[tokens > 0]
        if not len(tokens):
            continue
        lo, hi = np.log10(tokens.min()), np.log10(tokens.max())
        if hi <= lo:
            hi = lo + 1
        counts, edges = np.histogram(np.log10(tokens), bins=bins, range=(lo, hi))
        out[source] = {
            "edges": [round(float(10**e), 1) for e in edges],
            "counts": counts.tolist(),
            "p50": float(np.median(tokens)),
            "p95": float(np.quantile(tokens, 0.95)),
            "max": int(tokens.max()),
        }
    return out


def write_mix_report(root: str, manifest: dict[str, Any], sel: pl.DataFrame) -> str:
    """Write ``root/report.html`` and ``root/report.json``; return the HTML path."""
    hists = _length_histograms(sel)
    data = {k: v for k, v in manifest.items() if k not in ("shards", "recipe")}
    data["length_histograms"] = hists
    commit.write_text(f"{root}/report.json", json.dumps(data, indent=2, ensure_ascii=False))
    commit.write_text(f"{root}/report.html", _html(manifest, hists))
    return f"{root}/report.html"


def _html(m: dict[str, Any], hists: dict[str, dict[str, Any]]) -> str:
    unit = m["unit"]
    t = m["totals"]
    b = m["budget"]
    target_total = sum(s["target"] for s in m["sources"].values()) or 1
    share_key = "tokens" if unit == "tokens" else "rows"
    got_total = sum(s[share_key] for s in m["sources"].values()) or 1
    bars = _bars(
        [(name, s[share_key] / got_total, s["target"] / target_total) for name, s in m["sources"].items()],
        f"share of the mixture by source ({share_key}); orange tick: the recipe's target",
    )

    def split(group: dict[str, dict[str, int]], title: str) -> str:
        total = sum(v["tokens"] for v in group.values()) or 1
        return _bars([(k, v["tokens"] / total, None) for k, v in group.items()], title)

    rows = []
    for name, s in m["sources"].items():
        dev = s["deviation"]
        cls = "dev-ok" if abs(dev) <= max(1, s["tokens"] // max(s["rows"], 1)) else "dev-bad"
        rows.append(
            f"<tr><td>{esc(name)}</td><td>{esc(s['pool'])}</td><td class=r>{number(s['rows'])}</td>"
            f"<td class=r>{number(s['tokens'])}</td><td class=r>{number(s['text_tokens'])}</td>"
            f"<td class=r>{number(s['visual_tokens'])}</td><td class=r>{number(s['target'])}</td>"
            f"<td class='r {cls}'>{dev:+,}</td><td class=r>{s['epochs']:.2f}</td>"
            f"<td class=r>{number(s['available']['rows'])}</td></tr>"
        )
    ledger = []
    for name, s in m["sources"].items():
        for e in s["ledger"]:
            ledger.append(
                f"<tr><td>{esc(name)}</td><td class=r>{e['epoch']}</td><td class=r>{number(e['rows'])}</td>"
                f"<td class=r>{number(e['tokens'])}</td><td>{'whole pass' if e['complete'] else 'partial'}"
                f"</td></tr>"
            )
    hist_svgs = "".join(
        svg_histogram(h["edges"], h["counts"], f"{name}: tokens/row, median {h['p50']:,.0f}")
        for name, h in hists.items()
    )
    mode_rows = "".join(
        f"<tr><td>{esc(k)}</td><td class=r>{number(v['rows'])}</td><td class=r>{number(v['tokens'])}</td>"
        f"<td class=r>{percent(v['tokens'], t['tokens'])}</td></tr>"
        for k, v in m["modes"].items()
    )
    requested = number(b["requested"]) if isinstance(b["requested"], int) else b["requested"]
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>mixture {esc(m["name"])}</title><style>{CSS}{_EXTRA_CSS}</style></head><body>
<h1>Mixture {esc(m["name"])}</h1>
<p class="meta">recipe hash <code>{esc(m["recipe_hash"])}</code> · seed {m["seed"]} · tokenizer
<code>{esc(m["tokenizer"]["source"])}</code> · budget in {unit}: requested {esc(requested)},
target {number(b["target"])}, selected {number(b["selected"])} \
(deviation {b["deviation"]:+,}, {b["deviation_pct"]:+.4f}%)</p>
<div class="totals">
<div class="tot"><b>{number(t["rows"])}</b>rows ({number(t["unique_rows"])} distinct)</div>
<div class="tot"><b>{number(t["tokens"])}</b>tokens</div>
<div class="tot"><b>{number(t["text_tokens"])}</b>text tokens</div>
<div class="tot"><b>{number(t["visual_tokens"])}</b>visual tokens</div>
<div class="tot"><b>{number(t["shards"])}</b>shards</div></div>
<h2>Proportions</h2><div class="hists">{bars}
{split(m["modalities"], "tokens by modality")}{split(m["modes"], "tokens by mode")}</div>
<h2>Sources</h2>
<table><thead><tr><th>source</th><th>pool</th><th class=r>rows</th><th class=r>tokens</th>\
<th class=r>text</th>
<th class=r>visual</th><th class=r>target ({unit})</th><th class=r>deviation</th><th class=r>epochs</th>
<th class=r>rows available</th></tr></thead><tbody>{"".join(rows)}</tbody></table>
<h2>Modes</h2><table><thead><tr><th>mode</th><th class=r>rows</th><th class=r>tokens</th>\
<th class=r>share</th>
</tr></thead><tbody>{mode_rows}</tbody></table>
<h2>Length distributions</h2><p class="meta">Tokens per row (text and visual), log-scaled bins.</p>
<div class="hists">{hist_svgs}</div>
<h2>Epoch ledger</h2><p class="meta">How many passes each source took; a source is repeated only when its
recipe allows it (upsample: true).</p>
<table><thead><tr><th>source</th><th class=r>epoch</th><th class=r>rows</th><th class=r>tokens</th>\
<th>pass</th>
</tr></thead><tbody>{"".join(ledger)}</tbody></table>
</body></html>
"""
