"""Pool report: ``report.json`` for machines and one self-contained ``report.html`` for people.

Both are derived only from what ``curation run`` already wrote (docs/pool-format.md): manifest.json and
stats.json give every number; the shard and reject Parquet files give example rows to look at. The
report is what a person opens to judge a recipe ("did the aesthetic filter eat all the charts?"), so
it shows numbers *and* pictures: rejected samples next to their reason make a bad threshold obvious.

Pools can hold millions of rows, so reading is bounded: only the needed columns are read, batch by
batch, and reading stops as soon as enough examples are collected. Rejected rows are found with a
cheap pass over three short string columns; image bytes are then read only for the chosen rows.
Images are untrusted (that is why many of them were rejected), so thumbnailing never raises and never
decodes anything larger than :data:`MAX_PREVIEW_PIXELS`.
"""

from __future__ import annotations

import base64
import bisect
import html
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

MAX_PREVIEW_PIXELS = 50_000_000
"""Refuse to decode images above this many pixels: a 30000x30000 PNG is 2.7 GB of RGB once decoded."""
CAPTION_CHARS = 300
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
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


# ---------------------------------------------------------------------------------------------- format
def _n(x: Any) -> str:
    """Counts with thousands separators; missing numbers as a dash rather than a crash."""
    if x is None:
        return "—"
    return f"{x:,}" if isinstance(x, int) else f"{x:,.2f}"


def _pct(part: Any, whole: Any) -> str:
    return f"{100.0 * part / whole:.1f}%" if part is not None and whole else "—"


def _num(v: float) -> str:
    """Compact axis label: 4 significant digits is plenty for a histogram edge."""
    return f"{v:.4g}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    v, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            break
        v /= 1024
    return f"{n:,} B" if unit == "B" else f"{v:,.1f} {unit}"


def _esc(s: Any) -> str:
    """HTML-escape anything, also dropping control characters that are invalid in HTML text."""
    if isinstance(s, bytes):
        s = s.decode("utf-8", "replace")
    return html.escape(_CONTROL.sub("\ufffd", str(s)), quote=True)


def _caption(row: dict) -> str:
    text = row.get("text")
    if text is None and row.get("texts"):
        text = " ".join(t for t in row["texts"] if t)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = (text or "").strip()
    return text if len(text) <= CAPTION_CHARS else text[: CAPTION_CHARS - 1] + "…"


# ---------------------------------------------------------------------------------------------- svg
def svg_histogram(
    edges: list[float], counts: list[int], title: str = "", width: int = 360, height: int = 150
) -> str:
    """A bar chart as inline SVG; each bar carries a native ``<title>`` tooltip (no JS needed)."""
    pad_l, pad_r, pad_t, pad_b = 44, 8, 20, 22
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b
    out = [
        (
            f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">'
        ),
        f'<text x="{pad_l}" y="13" class="t">{_esc(title)}</text>',
    ]
    counts = [int(c or 0) for c in counts or []]
    if len(edges or []) != len(counts) + 1:
        edges = list(range(len(counts) + 1))  # contract says n+1 edges; label bins by index otherwise
    top = max(counts, default=0)
    if not top:
        out.append(
            f'<text x="{pad_l + pw / 2}" y="{pad_t + ph / 2}" text-anchor="middle">no data</text></svg>'
        )
        return "".join(out)
    bw = pw / len(counts)
    for i, c in enumerate(counts):
        h = ph * c / top
        out.append(
            f'<rect x="{pad_l + i * bw:.2f}" y="{pad_t + ph - h:.2f}" width="{max(bw - 1, 0.5):.2f}" '
            f'height="{h:.2f}"><title>[{_num(edges[i])}, {_num(edges[i + 1])}): {c:,}</title></rect>'
        )
    base = pad_t + ph
    out += [
        f'<line x1="{pad_l}" y1="{base}" x2="{pad_l + pw}" y2="{base}"/>',
        f'<text x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end">{top:,}</text>',
        f'<text x="{pad_l - 4}" y="{base}" text-anchor="end">0</text>',
        f'<text x="{pad_l}" y="{height - 6}">{_num(edges[0])}</text>',
        f'<text x="{pad_l + pw}" y="{height - 6}" text-anchor="end">{_num(edges[-1])}</text></svg>',
    ]
    return "".join(out)


# ---------------------------------------------------------------------------------------------- thumbs
def _image_size_unchecked(data: bytes) -> tuple[int, int] | None:
    """Header-only size of an image PIL refused as a decompression bomb, for the placeholder text.

    Runs the format plugins' header parsers directly (what ``Image.open`` does before its bomb check)
    instead of lowering the process-wide ``Image.MAX_IMAGE_PIXELS``, which would unguard other threads.
    """
    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            if accept is None or accept(data[:16]):
                return factory(io.BytesIO(data), "").size
        except Exception as e:  # noqa: BLE001 - any plugin may fail on any bytes
            log.debug("%s header parser failed: %s", fmt, e)
    return None


def thumbnail(data: bytes | None, px: int = 128) -> tuple[str | None, str]:
    """``(data_uri, "")`` for a decodable image, else ``(None, why)``; never raises."""
    if not data:
        return None, "no image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # lazy: parses the header only
    except Image.DecompressionBombError:
        size = _image_size_unchecked(data)
        return None, f"too large to preview ({size[0]} x {size[1]})" if size else "too large to preview"
    except UnidentifiedImageError:
        return None, "cannot decode: unknown image format"
    except Exception as e:  # noqa: BLE001
        return None, f"cannot decode: {_short_error(e)}"
    w, h = img.size
    if w * h > MAX_PREVIEW_PIXELS:
        return None, f"too large to preview ({w} x {h})"
    try:
        if img.format == "JPEG":
            img.draft("RGB", (px, px))  # DCT scaling: decode at 1/2..1/8 size, much faster
        img.thumbnail((px, px))
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=80)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, unsupported mode: all just a placeholder
        return None, f"cannot decode: {_short_error(e)}"
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), ""


def _short_error(e: Exception) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return msg if len(msg) <= 80 else msg[:79] + "…"


def _row_thumbnail(row: dict, px: int) -> tuple[str | None, str]:
    """Thumbnail of the row's image; interleaved rows and videos use their first decodable image."""
    if row.get("image"):
        return thumbnail(row["image"], px)
    blobs = [b for b in (row.get("images") or row.get("frames") or []) if b]
    why = "no image"
    for blob in blobs:
        uri, why = thumbnail(blob, px)
        if uri:
            return uri, ""
    return None, why


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


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:24px;color:#1d2330;background:#fafbfc}
h1{margin:0 0 4px}h2{margin:32px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}
code,.id{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
.meta{color:#556}.totals{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.tot{background:#fff;border:1px solid #dde;border-radius:8px;padding:8px 14px}
.tot b{display:block;font-size:20px}
table{border-collapse:collapse;width:100%;background:#fff}th,td{padding:6px 10px;text-align:left}
th{background:#eef0f5}tbody tr:nth-child(even){background:#f5f6fa}td.r,th.r{text-align:right}
.bar{background:#dfe6f3;height:8px;border-radius:4px;min-width:80px}.bar i{display:block;height:8px;
border-radius:4px;background:#4a78c2}
.pill{display:inline-block;background:#fde8e8;border-radius:10px;padding:0 8px;margin:1px;font-size:12px}
.pill.kept{background:#e6f4ea}
.hists{display:flex;flex-wrap:wrap;gap:12px}svg.hist{background:#fff;border:1px solid #dde;border-radius:6px}
svg.hist rect{fill:#4a78c2}svg.hist rect:hover{fill:#e0803a}svg.hist text{font-size:10px;fill:#445}
svg.hist text.t{font-size:12px;font-weight:600}svg.hist line{stroke:#889}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:12px}
.card{background:#fff;border:1px solid #dde;border-radius:8px;padding:8px;overflow:hidden;margin:0}
.card img,.ph{display:block;margin:0 auto 6px;max-width:100%}
.ph{background:#d8dbe2;color:#444;display:flex;align-items:center;justify-content:center;
text-align:center;font-size:12px;padding:6px;box-sizing:border-box}
.card figcaption{font-size:12px;word-break:break-word}.card .cap{margin:4px 0}.card .k{color:#667}
"""


def _card(row: dict, px: int, rejected: bool) -> str:
    uri, why = _row_thumbnail(row, px)
    pic = (
        f'<img src="{uri}" alt="{_esc(row.get("id"))}" loading="lazy">'
        if uri
        else f'<div class="ph" style="width:{px}px;height:{px}px">{_esc(why)}</div>'
    )
    info = [f'<div class="id" title="{_esc(row.get("id"))}">{_esc(str(row.get("id"))[:16])}…</div>']
    if rejected:
        info.append(
            f'<div class="k">{_esc(row.get("reject_stage"))} / {_esc(row.get("reject_reason"))}</div>'
        )
        if row.get("reject_detail"):
            info.append(f'<div class="k">{_esc(row["reject_detail"])}</div>')
    info.append(f'<div class="cap">{_esc(_caption(row)) or "<i>(no caption)</i>"}</div>')
    scores = [f"{k[6:]}={v:.3g}" for k, v in row.items() if k.startswith("score_") and v is not None]
    extra = [f"{row['width']}×{row['height']}"] if row.get("width") and row.get("height") else []
    extra += [f"lang={row['lang']}"] if row.get("lang") else []
    if scores or extra:
        info.append(f'<div class="k">{_esc(" · ".join(extra + scores))}</div>')
    return f'<figure class="card">{pic}<figcaption>{"".join(info)}</figcaption></figure>'


def _html(data: dict, examples: list[dict], kept: list[dict], px: int) -> str:
    t = data["totals"]
    tot = [
        ("rows in", _n(t["rows_in"])),
        ("rows out", f"{_n(t['rows_out'])} ({_pct(t['rows_out'], t['rows_in'])})"),
        ("rejected", f"{_n(t['rows_rejected'])} ({_pct(t['rows_rejected'], t['rows_in'])})"),
        ("shards", _n(t["shards"])),
        ("bytes", _bytes(t["bytes"])),
        ("elapsed", f"{_n(t['elapsed_s'])} s"),
        ("rows/s", _n(t["rows_per_s"])),
    ]
    anchors = {(e["stage"], e["reason"]): f"reject-{i}" for i, e in enumerate(examples)}
    first_in = (data["stages"][0]["rows_in"] if data["stages"] else None) or t["rows_in"]
    rows = []
    for s in data["stages"]:
        drops = "".join(
            f'<a class="pill" href="#{anchors.get((s["name"], r), "")}">{_esc(r)}: {_n(c)}</a>'
            for r, c in sorted(s["drops"].items(), key=lambda kv: -kv[1])
        )
        if s["outcomes"]:  # what happened to the rows it kept
            drops += "".join(
                f'<span class="pill kept">{_esc(v)}: {_n(c)}</span>' for v, c in s["outcomes"].items()
            )
        width = 100.0 * (s["rows_out"] or 0) / first_in if first_in else 0
        dropped = (
            s["rows_in"] - s["rows_out"] if s["rows_in"] is not None and s["rows_out"] is not None else None
        )
        rows.append(
            f'<tr><td>{_esc(s["name"])}</td><td class="r">{_n(s["rows_in"])}</td>'
            f'<td class="r">{_n(s["rows_out"])}</td><td class="r">{_pct(s["rows_out"], s["rows_in"])}</td>'
            f'<td><div class="bar"><i style="width:{width:.1f}%"></i></div></td>'
            f'<td class="r">{_n(dropped)}</td><td>{drops}</td><td class="r">{_n(s["seconds"])}</td></tr>'
        )
    hists = [
        svg_histogram(h.get("edges") or [], h.get("counts") or [], f"{s['name']} · {name}")
        for s in data["stages"]
        for name, h in sorted(s["histograms"].items())
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Curation report: {_esc(Path(data['pool']).name)}</title><style>{_CSS}</style></head><body>",
        (
            f'<header><h1>Curation report</h1><div class="meta">pool <code>{_esc(data["pool"])}</code> · '
            f'recipe <code>{_esc(data["recipe_hash"])}</code></div><div class="totals">'
        ),
        *(f'<div class="tot"><span class="meta">{k}</span><b>{v}</b></div>' for k, v in tot),
        "</div></header>",
        (
            '<section id="stages"><h2>Stages</h2><table><thead><tr><th>stage</th><th class="r">rows in</th>'
            '<th class="r">rows out</th><th class="r">kept</th><th>funnel</th><th class="r">dropped</th>'
            '<th>drops by reason (green: outcomes of kept rows)</th><th class="r">seconds</th></tr></thead><tbody>'
        ),
        *rows,
        "</tbody></table></section>",
        '<section id="histograms"><h2>Histograms</h2><div class="hists">',
        *(hists or ['<p class="meta">No histograms in stats.json.</p>']),
        "</div></section>",
        f'<section id="kept"><h2>Kept samples ({len(kept)} from the first shards)</h2><div class="grid">',
        *(_card(r, px, False) for r in kept),
        "</div></section>",
        '<section id="rejects"><h2>Rejected samples</h2>',
    ]
    for e in examples:
        parts.append(
            f'<section class="reason" id="{anchors[(e["stage"], e["reason"])]}" '
            f'data-reason="{_esc(e["reason"])}" data-stage="{_esc(e["stage"])}">'
            f'<h3>{_esc(e["reason"])} <span class="meta">(stage {_esc(e["stage"])}, '
            f'{_n(e["count"])} rows; {len(e["rows"])} shown)</span></h3><div class="grid">'
        )
        parts += [_card(r, px, True) for r in e["rows"]]
        parts.append("</div></section>")
    parts.append("</section></body></html>\n")
    return "\n".join(parts)


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temp file and rename, so an interrupted run never leaves half a report behind."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
    _write_atomic(json_path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    _write_atomic(html_path, _html(data, examples, kept, thumb_px))
    log.info(
        "wrote %s and %s (%d kept, %d reject examples)",
        html_path,
        json_path,
        len(kept),
        sum(len(e["rows"]) for e in examples),
    )
    return html_path, json_path
