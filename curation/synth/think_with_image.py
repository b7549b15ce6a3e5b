"""The ``think_with_image`` stage: run each trace's code in the sandbox and insert what it produced.

A think-with-image row arrives *before* execution (docs/sft-format.md): a user turn about ``images[0]``,
an assistant turn with one fenced ``python`` block, and the final answer. This stage runs that block in
:func:`curation.synth.sandbox.run_code` with ``images[0]`` as the input, appends the output image to
``images`` and inserts a ``tool`` turn right after the code's turn::

    {"role": "tool", "content": [{"type": "image", "index": 1}, {"type": "text", "text": "what it printed"}]}

(the text part only when the code printed something). The row keeps its id. A row that already has a
``tool`` turn passes through untouched, so running the stage twice changes nothing.

Reject reasons: ``bad_messages`` (not a JSON list of messages), ``no_code`` (no python block, or more
than one), ``code_does_not_parse``, ``no_input_image`` (missing or undecodable ``images[0]``), and from
the sandbox ``sandbox_timeout``, ``sandbox_memory``, ``sandbox_blocked`` (the detail names the
operation), ``sandbox_error`` (the exception), ``no_output_image``, ``bad_output_image``. Where the
sandbox's kernel layers are missing (docs/sandbox.md) the stage does not run at all: ``preflight``
stops the run before any data is read, and a worker that lacks them fails its batch
(:class:`~curation.synth.sandbox.SandboxUnavailable`) rather than running code unconfined.
"""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from curation.stage import NotReady, Stage, mark_rejected, register
from curation.synth.sandbox import DEFAULT_MAX_OUTPUT_PIXELS, SandboxResult, check_sandbox, run_code

log = logging.getLogger(__name__)

MODE = "think_with_image"
_FENCE = re.compile(r"```python[ \t]*\r?\n(.*?)```", re.DOTALL)
_SANDBOX_REASONS = {
    "timeout": "sandbox_timeout",
    "memory": "sandbox_memory",
    "blocked": "sandbox_blocked",
    "error": "sandbox_error",
    "no_output": "no_output_image",
    "bad_output": "bad_output_image",
    "bad_input": "no_input_image",
}


class _Reject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


@register
class ThinkWithImage(Stage):
    """Execute think-with-image code in the sandbox; insert the tool turn with its output image.

    Sandbox calls run concurrently, one per CPU of ``resources.num_cpus`` (each is a process).
    """

    name: ClassVar[str] = "think_with_image"
    reads: ClassVar[tuple[str, ...]] = ("messages", "images", "mode")
    writes: ClassVar[tuple[str, ...]] = ("messages", "images")
    default_modalities: ClassVar[tuple[str, ...]] = ("sft",)

    timeout_s: float = 10.0  # wall clock per snippet, interpreter start included
    memory_mb: int = 512  # address space per snippet on top of PIL and numpy
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS  # larger output images are rejected

    def preflight(self) -> None:
        """On the driver, before any data is read: the sandbox's required kernel layers are here
        (bubblewrap namespaces, a separate uid, seccomp), or the run stops with what to install."""
        check = check_sandbox()
        if not check.ok:
            raise NotReady(check.message())

    def setup(self) -> None:
        """Probe again on the worker (another machine may lack a layer) and run a trivial snippet once:
        a sandbox that cannot run anything fails here, not row by row."""
        self.preflight()
        probe = self._run("result = image", _probe_png())
        if not probe.ok:
            raise RuntimeError(
                f"think_with_image: the sandbox does not work here: {probe.reason}: {probe.detail}"
            )
        landlock = any(x.startswith("landlock") for x in probe.layers)
        (log.info if landlock else log.warning)(
            "think_with_image: sandbox layers %s%s (%.2f s per snippet)",
            ", ".join(probe.layers),
            "" if landlock else "; no Landlock here (the mount namespace still confines files)",
            probe.elapsed,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        mask = pc.and_(self.applies(batch), pc.equal(pc.fill_null(batch["mode"], ""), MODE))
        positions = pc.indices_nonzero(mask)
        if not len(positions):
            return batch
        active = batch.take(positions)
        messages, images = active["messages"].to_pylist(), active["images"].to_pylist()
        reasons: list[str | None] = [None] * len(messages)
        details: list[str | None] = [None] * len(messages)
        traces = {}
        for i, (msgs, imgs) in enumerate(zip(messages, images)):
            try:
                trace = _prepare(msgs, imgs)
            except _Reject as r:
                reasons[i], details[i] = r.reason, r.detail
                continue
            if trace is not None:
                traces[i] = trace
        workers = max(1, round(self.resources.num_cpus))
        with ThreadPoolExecutor(workers) as pool:
            results = dict(zip(traces, pool.map(lambda i: self._run(traces[i][2], images[i][0]), traces)))
        done, new_messages, new_images = [], [], []
        for i, (msgs, turn, _code) in traces.items():
            r = results[i]
            if not r.ok:
                reasons[i], details[i] = _SANDBOX_REASONS.get(r.reason, "sandbox_error"), r.detail
                continue
            content: list[dict[str, Any]] = [{"type": "image", "index": len(images[i])}]
            if r.stdout.strip():
                content.append({"type": "text", "text": r.stdout})
            msgs.insert(turn + 1, {"role": "tool", "content": content})
            done.append(i)
            new_messages.append(json.dumps(msgs, ensure_ascii=False))
            new_images.append([*images[i], r.image])
        if done:
            at = positions.to_numpy()[done]
            batch = _replace(batch, "messages", at, pa.array(new_messages, pa.string()))
            batch = _replace(batch, "images", at, pa.array(new_images, pa.list_(pa.binary())))
        return mark_rejected(
            batch, positions, self.label, pa.array(reasons, pa.string()), pa.array(details, pa.string())
        )

    def _run(self, code: str, image: bytes) -> SandboxResult:
        return run_code(
            code,
            image,
            timeout_s=self.timeout_s,
            memory_mb=self.memory_mb,
            max_output_pixels=self.max_output_pixels,
        )


def _prepare(messages: str | None, images: list | None) -> tuple[list, int, str] | None:
    """(messages, index of the code's assistant turn, code) for a row to run; None for a row that already
    has its tool turn. Raises _Reject for a row that cannot run."""
    try:
        msgs = json.loads(messages) if messages is not None else None
    except json.JSONDecodeError as e:
        raise _Reject("bad_messages", f"messages is not JSON: {e}") from None
    if (
        not isinstance(msgs, list)
        or not msgs
        or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs)
    ):
        raise _Reject("bad_messages", "messages must be a non-empty JSON list of {role, content} objects")
    if any(m["role"] == "tool" for m in msgs):
        return None
    blocks = [
        (i, code)
        for i, m in enumerate(msgs)
        if m["role"] == "assistant"
        for code in _FENCE.findall(_text(m.get("content")))
    ]
    if len(blocks) != 1:
        where = ", ".join(f"message {i}" for i, _ in blocks)
        raise _Reject(
            "no_code",
            f"{len(blocks)} ```python blocks in assistant turns ({where}); expected one"
            if blocks
            else "no ```python block in an assistant turn",
        )
    turn, code = blocks[0]
    try:
        compile(code, "<think_with_image>", "exec", dont_inherit=True)
    except SyntaxError as e:
        raise _Reject("code_does_not_parse", f"line {e.lineno}: {e.msg}") from None
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes, absurd nesting
        raise _Reject("code_does_not_parse", f"{type(e).__name__}: {e}") from None
    if not images or images[0] is None:
        raise _Reject("no_input_image", "images[0] is missing: the code has nothing to work on")
    return msgs, turn, code


def _text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def _replace(batch: pa.Table, name: str, at: np.ndarray, values: pa.Array) -> pa.Table:
    """``batch`` with column ``name`` taking ``values`` at row positions ``at``."""
    column = batch[name].combine_chunks()
    lookup = np.arange(batch.num_rows)
    lookup[at] = batch.num_rows + np.arange(len(at))
    merged = pa.concat_arrays([column, values.cast(column.type)]).take(pa.array(lookup))
    return batch.set_column(batch.schema.get_field_index(name), name, merged)


def _probe_png() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    return buf.getvalue()
