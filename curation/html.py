"""What every HTML report of the tool is built from (pool, mixture, audit and calibration pages): the shared
stylesheet, escaping, number formats, inline SVG histograms and image thumbnails, and a card for a row.

Pages are single self-contained files (no JS, no external assets), so images go in as ``data:`` URIs.
Images are untrusted (that is why many of them were rejected), so thumbnailing never raises and never decodes
anything larger than :data:`MAX_PREVIEW_PIXELS`.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import re
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

MAX_PREVIEW_PIXELS = 50_000_000
"""Refuse to decode images above this many pixels: a 30000x30000 PNG is 2.7 GB of RGB once decoded."""
CAPTION_CHARS = 300
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


# ---------------------------------------------------------------------------------------------- format
def number(x: Any) -> str:
    """Counts with thousands separators; missing numbers as a dash rather than a crash."""
    if x is None:
        return "—"
    return f"{x:,}" if isinstance(x, int) else f"{x:,.2f}"


def percent(part: Any, whole: Any) -> str:
    """``part`` as a share of ``whole`` (``12.5%``); a dash when either is missing or ``whole`` is 0."""
    return f"{100.0 * part / whole:.1f}%" if part is not None and whole else "—"


def _num(v: float) -> str:
    """Compact axis label: 4 significant digits is plenty for a histogram edge."""
    return f"{v:.4g}"


def esc(s: Any) -> str:
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
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">'
        ),
        f'<text x="{pad_l}" y="13" class="t">{esc(title)}</text>',
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


# ---------------------------------------------------------------------------------------------- page
#: The stylesheet every report page shares (pool, mixture, audit, calibration); pages append their own.
CSS = """
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


def row_card(row: dict, px: int, rejected: bool) -> str:
    """A row of a pool as a card: its first picture, id, caption, scores, and for a ``rejected`` row the
    stage, reason and detail that rejected it (the report's examples, the calibration page's borderline
    rows)."""
    uri, why = _row_thumbnail(row, px)
    pic = (
        f'<img src="{uri}" alt="{esc(row.get("id"))}" loading="lazy">'
        if uri
        else f'<div class="ph" style="width:{px}px;height:{px}px">{esc(why)}</div>'
    )
    info = [f'<div class="id" title="{esc(row.get("id"))}">{esc(str(row.get("id"))[:16])}…</div>']
    if rejected:
        info.append(f'<div class="k">{esc(row.get("reject_stage"))} / {esc(row.get("reject_reason"))}</div>')
        if row.get("reject_detail"):
            info.append(f'<div class="k">{esc(row["reject_detail"])}</div>')
    info.append(f'<div class="cap">{esc(_caption(row)) or "<i>(no caption)</i>"}</div>')
    scores = [f"{k[6:]}={v:.3g}" for k, v in row.items() if k.startswith("score_") and v is not None]
    extra = [f"{row['width']}×{row['height']}"] if row.get("width") and row.get("height") else []
    extra += [f"lang={row['lang']}"] if row.get("lang") else []
    if scores or extra:
        info.append(f'<div class="k">{esc(" · ".join(extra + scores))}</div>')
    return f'<figure class="card">{pic}<figcaption>{"".join(info)}</figcaption></figure>'
