"""Per-snippet cost of the think-with-image sandbox, against a plain interpreter doing the same work.

Each snippet is ``result = image.crop(...)`` on a 640x480 image. Three ways, each sequentially and two at
a time: ``plain`` (``python -I -c``: import PIL and numpy, decode, crop, encode; no isolation at all),
the sandbox here, and with ``--compare-old PATH`` an older ``sandbox.py`` imported by path (for example
``git show HEAD~1:curation/synth/sandbox.py > /tmp/old_sandbox.py``). Wall and CPU (children's user +
system) per snippet, and the ratio to ``plain``. Run it on a quiet machine; the numbers in
docs/sandbox.md say which machine gave them.

    python benchmarks/bench_sandbox.py -n 20 --compare-old /tmp/old_sandbox.py
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

CODE = "result = image.crop((100, 80, 420, 320)).resize((640, 480))"
PLAIN = f"""
import io, sys
import numpy as np
from PIL import Image
image = Image.open(io.BytesIO(sys.stdin.buffer.read()))
image.load()
{CODE}
buf = io.BytesIO()
result.save(buf, "PNG")
sys.stdout.buffer.write(buf.getvalue())
"""


def picture() -> bytes:
    img = Image.radial_gradient("L").resize((640, 480)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def plain(data: bytes) -> None:
    out = subprocess.run([sys.executable, "-I", "-c", PLAIN], input=data, capture_output=True, check=True)
    assert out.stdout.startswith(b"\x89PNG")


def sandboxed(module) -> Callable[[bytes], None]:
    def one(data: bytes) -> None:
        r = module.run_code(CODE, data)
        assert r.ok, (r.reason, r.detail)

    return one


def measure(fn: Callable[[bytes], None], data: bytes, n: int, workers: int) -> tuple[float, float]:
    """(wall, CPU) seconds per snippet; CPU is what the children used (the sandboxes and bwrap)."""
    before, start = os.times(), time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda _: fn(data), range(n)))
    wall, after = time.perf_counter() - start, os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return wall / n, cpu / n


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20, help="snippets per measurement")
    ap.add_argument("--compare-old", metavar="PATH", help="an older sandbox.py to measure as well")
    args = ap.parse_args()
    from curation.synth import sandbox

    data = picture()
    ways = {"plain python -I": plain, "sandbox (this)": sandboxed(sandbox)}
    if args.compare_old:
        ways["sandbox (old)"] = sandboxed(load(args.compare_old, "old_sandbox"))
    print(
        f"layers here: {', '.join(sandbox.check_sandbox().layers)}; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for fn in ways.values():  # warm the page cache and the probe
        fn(data)
    print(f"{'':18} {'workers':>7} {'wall s':>8} {'CPU s':>8} {'wall x':>7} {'CPU x':>7}")
    for workers in (1, 2):
        base = None
        for name, fn in ways.items():
            wall, cpu = measure(fn, data, args.n, workers)
            base = base or (wall, cpu)
            print(f"{name:18} {workers:>7} {wall:8.3f} {cpu:8.3f} {wall / base[0]:7.2f} {cpu / base[1]:7.2f}")


if __name__ == "__main__":
    main()
