"""Text drawn with real fonts (DejaVu for Latin, WenQuanYi Micro Hei for Chinese), for OCR to read back.
``scripts/setup.sh`` installs the fonts (Debian: fonts-dejavu-core, fonts-wqy-microhei)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONTS = {
    "sans": "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "serif": "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
    "mono": "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
    "bold": "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "cjk": "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
}


def render(
    lines: list[str],
    font: str,
    size: int,
    fg="black",
    bg="white",
    pad=20,
    angle=0,
    noise=0.0,
    blur=0.0,
    fmt="PNG",
) -> bytes:
    """Lines of text drawn with a TrueType font, then turned, noised or blurred; encoded as ``fmt``."""
    f = ImageFont.truetype(FONTS[font], size)
    step = int(size * 1.6)
    w = max(f.getbbox(t)[2] for t in lines) + 2 * pad
    img = Image.new("RGB", (w, step * len(lines) + 2 * pad), bg)
    draw = ImageDraw.Draw(img)
    for k, t in enumerate(lines):
        draw.text((pad, pad + k * step), t, font=f, fill=fg)
    if noise:
        a = np.asarray(img, float) + np.random.default_rng(0).normal(0, noise, (img.height, img.width, 3))
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    if angle:
        img = img.rotate(angle, expand=True, fillcolor=bg)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()
