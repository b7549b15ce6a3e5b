"""Text decontamination scan: `ContainmentIndex.scan` against datasketch MinHash LSH and a plain 13-gram scan.

    python benchmarks/bench_decontam.py [--docs 100000] [--items 2000] [--cache bench-out/decontam]
                                        [--repeat 3] [--baseline-docs N] [--query-docs 10000]
                                        [--skip datasketch plain per-doc] [--json results.json]

Corpus (generated, seeded, cached as Parquet under `--cache`; no downloads): `--docs` documents of
200-2,000 words of English-like text: a Zipf-Mandelbrot vocabulary of 50,000 words (150 real function
words on top, then made-up words built from syllables, a few hyphenated compounds and numbers), in
sentences with commas, question marks, paragraphs, and hard line wrapping in 30% of documents; 2% of
documents carry some non-ASCII dashes, ellipses and accented words (the tokenizer's non-ASCII path).
Benchmark: `--items` QA items, a question of 10-60 words, 4 options of 1-8 words and the answer (the
text of the correct option). 1% of documents hold one item in their middle, rendered with labels in one
of four layouts ("Question: ... A) ... Answer: ...", "Q: ... (A) ...", ...); independently, 30% of these
are re-cased (upper, lower or title), 30% re-wrapped at a width of 30-100 characters (a tenth of the
breaks hyphenating a word: "contami-\\nnation"), 20% with one or two question words replaced.

Methods, each over the same documents and items, in one process:
- ours: `ContainmentIndex(items as segments [question, 4 options, answer]).scan(docs)`, n=5, threshold
  0.5 (the defaults). Best of `--repeat` runs by CPU time (other jobs may share the cores). Also, on the
  first `--query-docs` documents, the same index called once per document (`query`).
- datasketch: `MinHashLSH(threshold=0.5, num_perm=128)` over each item's text (segments joined by
  spaces); per document a `MinHash` of its word 5-gram shingles (lower-cased `\\w+` words), `update_batch`,
  then `lsh.query`: a document is flagged with every candidate returned (no re-check). Jaccard 0.5 is a
  lenient near-duplicate threshold (datasketch's default is 0.9, which can only find less).
- plain: GPT-3 style. Normalise (NFKC, lower case, punctuation to spaces, split on whitespace); the
  13-grams of every item (of each segment, since n-grams across a label never match) as tuples in a
  Python dict (13-gram -> items); per document, every 13-gram looked up. A document is flagged with
  every item sharing at least one 13-gram.

Reported: docs/s and MB/s (UTF-8 bytes of the documents, wall clock), CPU seconds / wall seconds (the
cores a method actually used), MB/s per core (MB / CPU seconds), recall (planted documents flagged with
their planted item), false positives (clean documents flagged). `--baseline-docs N` runs the two
baselines on the first N documents only (planted ones are spread evenly, so a prefix holds its share).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import time
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.dedup.text import ContainmentIndex
from curation.io import commit

log = logging.getLogger("bench_decontam")

FUNCTION_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "one",
    "all",
    "we",
    "their",
    "has",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "can",
    "had",
    "its",
    "into",
    "than",
    "them",
    "these",
    "two",
    "may",
    "only",
    "other",
    "some",
    "time",
    "could",
    "new",
    "very",
    "first",
    "also",
    "any",
    "about",
    "after",
    "our",
    "over",
    "such",
    "most",
    "then",
    "out",
    "what",
    "up",
    "my",
    "like",
    "through",
    "years",
    "between",
    "where",
    "did",
    "many",
    "those",
    "both",
    "should",
    "each",
    "under",
    "while",
    "because",
    "before",
    "much",
    "well",
    "way",
    "even",
    "made",
    "state",
    "people",
    "three",
    "must",
    "still",
    "do",
    "how",
    "being",
    "against",
    "own",
    "same",
    "during",
    "used",
    "since",
    "without",
    "city",
    "world",
    "part",
    "here",
    "however",
    "another",
    "long",
    "around",
    "number",
    "great",
    "small",
    "within",
    "work",
    "might",
    "day",
    "high",
    "life",
    "place",
    "large",
    "found",
    "area",
    "next",
    "found",
    "early",
    "given",
    "often",
    "back",
    "among",
]
ONSETS = [
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "z",
    "br",
    "cr",
    "dr",
    "fr",
    "gr",
    "pr",
    "tr",
    "bl",
    "cl",
    "fl",
    "gl",
    "pl",
    "sl",
    "st",
    "sp",
    "sc",
    "sh",
    "ch",
    "th",
    "wh",
    "qu",
]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "ea", "ou", "ai", "io", "ie"]
CODAS = [""] * 8 + ["n", "r", "s", "t", "l", "m", "nd", "nt", "st", "rt", "ng", "ck"]
NON_ASCII_WORDS = [
    "café",
    "naïve",
    "résumé",
    "Zürich",
    "São",
    "façade",
    "Müller",
    "coöperate",
    "señor",
    "élite",
]


def make_vocab(rng: np.random.Generator, size: int) -> list[str]:
    words = dict.fromkeys(FUNCTION_WORDS)
    while len(words) < size:
        r = rng.random()
        if r < 0.01:
            w = str(int(rng.integers(2, 2100)))
        else:
            w = "".join(
                ONSETS[rng.integers(len(ONSETS))]
                + VOWELS[rng.integers(len(VOWELS))]
                + CODAS[rng.integers(len(CODAS))]
                for _ in range(int(rng.integers(1, 4)))
            )
            if r > 0.99 and len(words) > 1000:  # compounds: "well-known"
                w += "-" + list(words)[int(rng.integers(200, 1000))]
        words.setdefault(w)
    return list(words)


class Text:
    """Sentences of Zipf-distributed words, built for whole batches with numpy and Arrow string kernels."""

    # after a word: 0-2 inside a sentence, 4-7 ending one, 8 a wrapped line; 9-10 in non-ASCII documents only
    SEPS = (" ", ", ", "; ", " ", ". ", "? ", "! ", ".\n\n", "\n", " — ", "… ")

    def __init__(self, rng: np.random.Generator, vocab_size: int = 50_000, zipf_a: float = 1.07):
        self.rng = rng
        self.vocab = make_vocab(rng, vocab_size)
        ranks = np.arange(len(self.vocab)) + 2.7
        self.cdf = np.cumsum(ranks**-zipf_a)
        self.cdf /= self.cdf[-1]
        lower = pa.array(self.vocab)
        self.forms = pa.concat_arrays([lower, pa.array([w[:1].upper() + w[1:] for w in self.vocab])])
        self.seps = pa.array(self.SEPS)

    def words(self, k: int) -> np.ndarray:
        return np.searchsorted(self.cdf, self.rng.random(k)).clip(0, len(self.vocab) - 1)

    def docs(self, lengths: np.ndarray, wrapped: np.ndarray, non_ascii: np.ndarray) -> list[str]:
        """One document per entry of `lengths` (words); `wrapped`: hard line breaks; `non_ascii`: dashes,
        ellipses, accented words."""
        rng, total = self.rng, int(lengths.sum())
        starts = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        doc_of = np.repeat(np.arange(len(lengths)), lengths)
        ids = self.words(total)
        end = rng.random(total) < 1 / 14  # sentence ends
        end[starts[1:] - 1] = True
        u = rng.random(total)
        sep = np.where(u < 0.08, 1, np.where(u < 0.085, 2, 0))
        sep = np.where(wrapped[doc_of] & (rng.random(total) < 1 / 11), 8, sep)
        sep = np.where(non_ascii[doc_of] & (rng.random(total) < 0.02), 9, sep)
        v = rng.random(total)
        sep = np.where(end, np.where(v < 0.8, 4, np.where(v < 0.88, 5, np.where(v < 0.9, 6, 7))), sep)
        sep = np.where(end & non_ascii[doc_of] & (v < 0.05), 10, sep)
        capital = np.roll(end, 1)
        capital[starts[:-1]] = True
        forms = pc.take(self.forms, pa.array(ids + capital * len(self.vocab)))
        tokens = pc.binary_join_element_wise(forms, pc.take(self.seps, pa.array(sep)), "")
        docs = pc.binary_join(pa.ListArray.from_arrays(pa.array(starts.astype(np.int32)), tokens), "")
        out = docs.to_pylist()
        for i in np.flatnonzero(non_ascii):  # accented words, as in names and loan words
            ws = out[i].split(" ")
            for j in rng.integers(0, len(ws), 3):
                ws[j] = NON_ASCII_WORDS[int(rng.integers(len(NON_ASCII_WORDS)))]
            out[i] = " ".join(ws)
        return [d.strip() for d in out]

    def phrase(self, k: int) -> str:
        return " ".join(self.vocab[i] for i in self.words(k))


def make_items(text: Text, n: int) -> list[list[str]]:
    """Segments per item: question, four options, answer (the correct option's text)."""
    rng, items = text.rng, []
    for _ in range(n):
        q = text.phrase(int(rng.integers(10, 61)))
        opts = [text.phrase(int(rng.integers(1, 9))) for _ in range(4)]
        items.append([q[:1].upper() + q[1:] + "?", *opts, opts[int(rng.integers(4))]])
    return items


LAYOUTS = [
    "Question: {q}\nA) {o[0]}\nB) {o[1]}\nC) {o[2]}\nD) {o[3]}\nAnswer: {a}",
    "Q: {q} Options: (A) {o[0]} (B) {o[1]} (C) {o[2]} (D) {o[3]}. Correct answer: ({L}) {a}",
    "{q}\nA. {o[0]}\nB. {o[1]}\nC. {o[2]}\nD. {o[3]}\nThe answer is {L}. {a}",
    "Quiz time! {q} a) {o[0]}; b) {o[1]}; c) {o[2]}; d) {o[3]}. Answer: {a}.",
]


def render(item: list[str], rng: np.random.Generator, vocab: list[str]) -> tuple[str, list[str]]:
    """A leaked copy of `item` with labels, and the variants applied to it."""
    q, *opts, answer = item
    variants = []
    if rng.random() < 0.2:  # one or two question words replaced
        ws = q.split()
        for _ in range(int(rng.integers(1, 3))):
            ws[int(rng.integers(len(ws)))] = vocab[int(rng.integers(200, 20000))]
        q = " ".join(ws)
        variants.append("edited")
    s = LAYOUTS[int(rng.integers(len(LAYOUTS)))].format(q=q, o=opts, a=answer, L="ABCD"[opts.index(answer)])
    if rng.random() < 0.3:
        s = [str.upper, str.lower, str.title][int(rng.integers(3))](s)
        variants.append("recased")
    if rng.random() < 0.3:
        s = wrap(s, int(rng.integers(30, 101)), rng)
        variants.append("rewrapped")
    return s, variants


def wrap(s: str, width: int, rng: np.random.Generator) -> str:
    """Hard line breaks at `width`; a tenth of the breaks split a long word with a hyphen."""
    lines, line = [], ""
    for w in s.split():
        if line and len(line) + 1 + len(w) > width:
            if len(w) >= 6 and rng.random() < 0.1:
                cut = int(rng.integers(2, len(w) - 2))
                lines.append(f"{line} {w[:cut]}-")
                line = w[cut:]
                continue
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}" if line else w
    return "\n".join([*lines, line])


def generate(
    n_docs: int, n_items: int, seed: int
) -> tuple[list[str], list[list[str]], np.ndarray, list[str]]:
    """Documents, items, the planted item of each document (-1: clean) and the planted copies' variants."""
    rng = np.random.default_rng(seed)
    text = Text(rng)
    items = make_items(text, n_items)
    planted = np.full(n_docs, -1, dtype=np.int64)
    hosts = np.linspace(0, n_docs - 1, max(1, n_docs // 100)).round().astype(np.int64)  # 1%, spread evenly
    planted[hosts] = rng.integers(0, n_items, len(hosts))
    variants = [""] * n_docs
    docs: list[str] = []
    batch = 5000
    for b in range(0, n_docs, batch):
        k = min(batch, n_docs - b)
        docs += text.docs(rng.integers(200, 2001, k), rng.random(k) < 0.3, rng.random(k) < 0.02)
        log.info("generated %d/%d documents", len(docs), n_docs)
    for i in hosts:
        copy, v = render(items[planted[i]], rng, text.vocab)
        d = docs[i]
        mid = d.find(" ", len(d) // 2)
        docs[i] = f"{d[:mid]}\n\n{copy}\n\n{d[mid + 1 :]}"
        variants[i] = ",".join(v) or "verbatim"
    return docs, items, planted, variants


def load_corpus(cache: Path, n_docs: int, n_items: int, seed: int):
    path = cache / f"corpus-{n_docs}-{n_items}-{seed}.parquet"
    items_path = path.with_suffix(".items.json")
    if path.exists() and items_path.exists():
        t = pq.read_table(path)
        return (
            t["text"].to_pylist(),
            json.loads(items_path.read_text()),
            t["planted"].to_numpy(),
            t["variants"].to_pylist(),
        )
    t0 = time.perf_counter()
    docs, items, planted, variants = generate(n_docs, n_items, seed)
    cache.mkdir(parents=True, exist_ok=True)
    items_path.write_text(json.dumps(items))  # the corpus file, committed last, says both are whole
    with commit.open_committed(path) as f:
        pq.write_table(pa.table({"text": docs, "planted": planted, "variants": variants}), f)
    log.info("corpus generated in %.1fs: %s", time.perf_counter() - t0, path)
    return docs, items, planted, variants


# ---------------------------------------------------------------- the three methods
# Each takes (items, docs) and returns the set of (doc, item) pairs it flags, plus its timing.


def build_ours(items) -> ContainmentIndex:
    t = timed(lambda: ContainmentIndex([(str(i), segs) for i, segs in enumerate(items)]))
    log.info(
        "ContainmentIndex of %d items: %d n-grams, built in %.2fs",
        len(items),
        len(t["result"]._keys),
        t["wall"],
    )
    return t["result"]


def run_ours(items, docs, repeat: int):
    idx = build_ours(items)
    runs = [timed(lambda: idx.scan(docs)) for _ in range(repeat)]
    log.info("scan runs (cpu s): %s", [round(r["cpu"], 2) for r in runs])
    best = min(runs, key=lambda r: r["cpu"])
    doc, item, _ = best.pop("result")
    return set(zip(doc.tolist(), [int(idx.ids[i]) for i in item.tolist()])), best


def run_ours_per_doc(items, docs):
    """The same index, one `query` call per document (how a caller without batches would use it)."""
    idx = build_ours(items)
    t = timed(lambda: {(d, int(key)) for d, text in enumerate(docs) for key, _ in idx.query(text)})
    return t.pop("result"), t


def _ds_words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def run_datasketch(items, docs, shingle: int = 5, num_perm: int = 128, threshold: float = 0.5):
    from datasketch import MinHash, MinHashLSH

    def minhash(text: str) -> MinHash:
        w = _ds_words(text)
        m = MinHash(num_perm=num_perm)
        m.update_batch([" ".join(w[i : i + shingle]).encode() for i in range(max(1, len(w) - shingle + 1))])
        return m

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    for i, segs in enumerate(items):
        lsh.insert(i, minhash(" ".join(segs)))

    def scan():
        return {(d, i) for d, text in enumerate(docs) for i in lsh.query(minhash(text))}

    t = timed(scan)
    return t.pop("result"), t


_PUNCT = re.compile(r"[^\w\s]+")


def _plain_tokens(text: str) -> list[str]:
    return _PUNCT.sub(" ", unicodedata.normalize("NFKC", text).lower()).split()


def run_plain(items, docs, n: int = 13):
    grams: dict[tuple[str, ...], set[int]] = {}
    for i, segs in enumerate(items):
        for seg in segs:
            t = _plain_tokens(seg)
            for j in range(len(t) - n + 1):
                grams.setdefault(tuple(t[j : j + n]), set()).add(i)

    def scan():
        found = set()
        for d, text in enumerate(docs):
            t = _plain_tokens(text)
            for g in zip(*(t[j:] for j in range(n))):
                hit = grams.get(g)
                if hit:
                    found.update((d, i) for i in hit)
        return found

    t = timed(scan)
    return t.pop("result"), t


def timed(fn) -> dict:
    c0, t0 = time.process_time(), time.perf_counter()
    result = fn()
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "result": result}


def evaluate(pairs: set, planted: np.ndarray, n_docs: int) -> dict:
    flagged = {d for d, _ in pairs}
    hosts = np.flatnonzero(planted[:n_docs] >= 0)
    found = sum((int(d), int(planted[d])) in pairs for d in hosts)
    clean_flagged = sum(1 for d in flagged if planted[d] < 0)
    return {
        "planted": len(hosts),
        "found": found,
        "recall": found / max(1, len(hosts)),
        "false_positives": clean_flagged,
        "clean_docs": int(n_docs - len(hosts)),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=2_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path("bench-out/decontam"))
    ap.add_argument("--repeat", type=int, default=3, help="runs of ours; the best is reported")
    ap.add_argument("--baseline-docs", type=int, default=None, help="run the baselines on this prefix only")
    ap.add_argument("--query-docs", type=int, default=10_000, help="prefix for ours, one `query` call a doc")
    ap.add_argument("--skip", nargs="*", default=[], choices=["datasketch", "plain", "per-doc"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    docs, items, planted, variants = load_corpus(args.cache, args.docs, args.items, args.seed)
    sizes = np.fromiter((len(d.encode()) for d in docs), dtype=np.int64, count=len(docs))
    words = np.fromiter((d.count(" ") + d.count("\n") + 1 for d in docs), dtype=np.int64, count=len(docs))
    log.info(
        "%d docs, %.0f MB, %.0f-%.0f words (mean %.0f), %d planted, %d items; %d non-ASCII docs",
        len(docs),
        sizes.sum() / 1e6,
        words.min(),
        words.max(),
        words.mean(),
        (planted >= 0).sum(),
        len(items),
        sum(not d.isascii() for d in docs),
    )

    nb = min(args.baseline_docs or len(docs), len(docs))
    nq = min(args.query_docs, len(docs))
    runs = [
        (
            "ours: ContainmentIndex.scan (n=5, containment >= 0.5)",
            len(docs),
            lambda: run_ours(items, docs, args.repeat),
        )
    ]
    if "per-doc" not in args.skip:
        runs.append(
            (
                "ours, one ContainmentIndex.query call per document",
                nq,
                lambda: run_ours_per_doc(items, docs[:nq]),
            )
        )
    if "plain" not in args.skip:
        runs.append(("plain Python 13-gram set scan (GPT-3 style)", nb, lambda: run_plain(items, docs[:nb])))
    if "datasketch" not in args.skip:
        runs.append(
            (
                "datasketch MinHashLSH (128 perm, word 5-grams, Jaccard >= 0.5)",
                nb,
                lambda: run_datasketch(items, docs[:nb]),
            )
        )
    results = []
    for name, n, fn in runs:
        log.info("running %s on %d docs", name, n)
        pairs, t = fn()
        mb = float(sizes[:n].sum() / 1e6)
        r = {
            "method": name,
            "docs": n,
            "MB": round(mb, 1),
            "wall_s": round(t["wall"], 2),
            "cpu_s": round(t["cpu"], 2),
            "cores_used": round(t["cpu"] / t["wall"], 2),
            "docs_per_s": round(n / t["wall"]),
            "MB_per_s": round(mb / t["wall"], 2),
            "MB_per_s_per_core": round(mb / t["cpu"], 2),
            **evaluate(pairs, planted, n),
        }
        by_variant: dict[str, list[int]] = {}
        for d in np.flatnonzero(planted[:n] >= 0):
            by_variant.setdefault(variants[d], [0, 0])[0] += 1
            by_variant[variants[d]][1] += (int(d), int(planted[d])) in pairs
        r["recall_by_variant"] = {k: f"{f}/{c}" for k, (c, f) in sorted(by_variant.items())}
        results.append(r)
        log.info("%s", r)

    print(
        f"\n{len(docs):,} docs ({sizes.sum() / 1e6:,.0f} MB), {len(items):,} items, "
        f"{(planted >= 0).sum():,} planted; {cpu_model()}, {os.cpu_count()} CPUs\n"
    )
    print("| method | docs | docs/s | MB/s | cores used | MB/s per core | recall | false positives |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['method']} | {r['docs']:,} | {r['docs_per_s']:,} | {r['MB_per_s']:.1f} "
            f"| {r['cores_used']:.2f} | {r['MB_per_s_per_core']:.1f} "
            f"| {r['recall']:.3f} ({r['found']}/{r['planted']}) "
            f"| {r['false_positives']} / {r['clean_docs']:,} |"
        )
    for r in results:
        print(f"\n{r['method']}: found by variant: {r['recall_by_variant']}")
    if args.json:
        summary = {"docs": len(docs), "items": len(items), "cpu": cpu_model(), "results": results}
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
