"""Text matching for benchmark decontamination: normalisation, n-gram containment, MinHash near-duplicates.

Two questions, two indexes, both built once from the benchmark items and shared with every worker
(plain numpy arrays and lists, so `ray.put(index)` stores one compact copy in the object store):

- `ContainmentIndex`: is (most of) a benchmark item *inside* this training document? Score is
  |ngrams(item) ∩ ngrams(doc)| / |ngrams(item)|, relative to the item, so a 20-word question pasted
  into a 2,000-word page still scores ~1.0. Jaccard would score it ~0.01 (DESIGN.md, Known traps).
- `NearDupIndex`: is this text a light edit of a *whole* benchmark item? MinHash + LSH over token
  shingles, estimated Jaccard.

Both see text as `tokens` (words of `normalize`), so case, Unicode forms, accents, punctuation,
whitespace, line re-wrapping and hyphenated line breaks do not change a match. They hash tokens in
batches with numpy (`_token_stream`), which gives exactly the hashes of `tokens` without running
Python per token: `ContainmentIndex.scan` reads ~140 MB/s of English text per core
(benchmarks/bench_decontam.py).

    idx = ContainmentIndex([("mmlu/17", ["Which gas do plants absorb?", "oxygen", "carbon dioxide"]), ...])
    ref = ray.put(idx)                      # once; workers call ray.get(ref).scan(batch_texts)
    doc, item, score = idx.scan(texts)      # every (text, item) with containment >= the threshold
    idx.query(doc_text)                     # [("mmlu/17", 0.93)]: one text
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["ContainmentIndex", "NearDupIndex", "ngrams", "normalize", "tokens"]

# Scripts written without spaces between words: every character is a token. Han (CJK ideographs and
# extensions, compatibility ideographs), Hiragana, Katakana, Thai, Lao, Khmer, Myanmar. Hangul is not
# here: Korean puts spaces between words, so word tokens work for it.
_CHAR_SCRIPTS = (
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\U00020000-\U0003134f"
)
_TOKEN_RE = re.compile(f"[{_CHAR_SCRIPTS}]|[^\\s{_CHAR_SCRIPTS}]+")
_CHAR_SCRIPT_GAP_RE = re.compile(f"(?<=[{_CHAR_SCRIPTS}]) (?=[{_CHAR_SCRIPTS}])")
# A hyphen between two letters, optionally followed by a line break: "contami-\nnation", "e-mail".
# Both spellings of a compound ("well-known", "wellknown") and a word split at a line end then agree.
# Digits are excluded so that "10-20" does not become "1020".
_LETTER = r"[^\W\d_]"
_HYPHEN_JOIN_RE = re.compile(f"(?<={_LETTER})[-\u2010]\\s*(?={_LETTER})")


class _CharMap(dict):
    """`str.translate` table filled on first sight of each code point (so it costs nothing to build).

    Combining marks (Mn, after NFD) and invisible format characters (Cf: soft hyphen, zero-width
    space/joiners, BOM) are deleted; punctuation, symbols, separators and control characters become a
    space; letters and digits of every script are kept.
    """

    def __missing__(self, cp: int):
        cat = unicodedata.category(chr(cp))
        if cat in ("Mn", "Cf"):
            out = None
        elif cat[0] in "PSZC":
            out = " "
        else:
            out = cp
        self[cp] = out
        return out


_CHAR_MAP = _CharMap()


def normalize(text: str) -> str:
    """Canonical form of `text` for matching; two renderings of the same words give the same string.

    Steps and why:
    - NFKC, then casefold: full-width "ＡＢＣ１" and ligatures "ﬁ" become "abc1", "fi"; "ß" ~ "ss".
    - Accents are stripped (NFD, drop combining marks, NFC): copies of benchmark text often lose or
      gain diacritics ("café"/"cafe", vocalised/unvocalised Arabic and Hebrew). Only consistency
      matters, since items and documents go through the same function; letters of all scripts are
      kept, and NFC afterwards recomposes Hangul syllables.
    - A hyphen between letters is removed, with any line break after it: "contami-\\nnation" and
      "contamination" agree, and so do "e-mail" and "email".
    - Punctuation and symbols become spaces; all whitespace (newlines included) collapses to one
      space, so re-wrapped lines do not matter.
    - Spaces between two characters of scripts written without spaces (Chinese, Japanese, Thai...)
      are removed, so re-wrapping such text does not matter either.

    >>> normalize("Ｔhe  Contami-\\nnation, café!")
    'the contamination cafe'
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _HYPHEN_JOIN_RE.sub("", text)
    text = unicodedata.normalize("NFD", text).translate(_CHAR_MAP)
    text = " ".join(unicodedata.normalize("NFC", text).split())
    return _CHAR_SCRIPT_GAP_RE.sub("", text)


def tokens(text: str) -> list[str]:
    """Words of `normalize(text)`; each character of Chinese, Japanese, Thai, Lao, Khmer, Myanmar is
    one token.

    >>> tokens("What is 東京タワー?")
    ['what', 'is', '東', '京', 'タ', 'ワ', 'ー']
    """
    return _TOKEN_RE.findall(normalize(text))


_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constants (golden ratio, splitmix64)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)  # masks of the k low bytes


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place: a bijection on uint64 that spreads every input bit over all outputs."""
    with np.errstate(over="ignore"):
        h ^= h >> np.uint64(30)
        h *= _MIX1
        h ^= h >> np.uint64(27)
        h *= _MIX2
        h ^= h >> np.uint64(31)
    return h


def _word_hashes(buf: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """64-bit hash of each token `buf[starts[i] : starts[i] + lens[i]]` (UTF-8 bytes, none of them zero).

    The token's bytes read as little-endian uint64 words (zero-padded), folded by a polynomial and then
    `_mix`: vectorised, and exact for tokens of up to 8 bytes (most words): different short tokens never
    share a hash. `buf` needs 8 readable bytes after every token start.
    """
    words = np.ndarray((len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))  # unaligned 8-byte loads
    h = words[starts] & _LOW_BYTES[np.minimum(lens, 8)]
    more, j = np.flatnonzero(lens > 8), 8
    with np.errstate(over="ignore"):
        while len(more):  # longer tokens: 8 bytes more per round
            rest = lens[more] - j
            h[more] = h[more] * _MUL + (words[starts[more] + j] & _LOW_BYTES[np.minimum(rest, 8)])
            more, j = more[rest > 8], j + 8
    return _mix(h)


def _token_hashes(toks: list[str]) -> np.ndarray:
    """Hash of each token (`_word_hashes` of its UTF-8 bytes): the token hash everywhere in this module."""
    parts = [t.encode() for t in toks]
    lens = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    starts = np.cumsum(lens + 1) - lens - 1
    return _word_hashes(np.frombuffer(b"\0".join(parts) + bytes(9), dtype=np.uint8), starts, lens)


# The batch tokenizer (`_token_stream`) reads bytes: an ASCII text as it is (upper case folded and
# punctuation dropped by `_BYTE_MAP`, hyphen joins found with numpy); a text whose non-ASCII characters
# all have an ASCII form (`_ascii_form`: typographic quotes, dashes, accented Latin letters) as that
# ASCII; any other text through `normalize` first. All give exactly `tokens(text)`;
# tests/unit/dedup/test_text.py checks it on random Unicode and on every character with an ASCII form.
# `_BYTE_MAP`: ASCII letters to lower case, digits kept, bytes >= 0x80 kept (UTF-8 of normalised text),
# everything else 0, a separator.
_BYTE_MAP = bytes(
    c + 32 if 65 <= c <= 90 else c if (97 <= c <= 122 or 48 <= c <= 57 or c >= 128) else 0 for c in range(256)
)
_ASCII_LETTER = np.array([chr(c).isalpha() for c in range(128)] + [False] * 128)
_ASCII_SPACE = np.array([chr(c).isspace() for c in range(128)] + [False] * 128)  # what `\s` matches in ASCII
# Between two texts: not a space and not a letter, so no hyphen join crosses it; its middle byte becomes
# `_BOUNDARY`, a one-byte token that no text can produce (control characters are separators), so an
# n-gram across two texts contains it and matches nothing. Eight zero bytes end the stream, for the
# 8-byte loads of `_word_hashes`.
_SEP = b"\0\0\0"
_BOUNDARY = 1
_PAD = 8
_CHAR_SCRIPT_RE = re.compile(f"[{_CHAR_SCRIPTS}]")
_NON_ASCII_RE = re.compile(r"[^\x00-\x7f]+")


def _ascii_form(ch: str) -> str | None:
    """ASCII text that tokenises as the non-ASCII character `ch` does, wherever it stands; None if none.

    The hyphen join in `normalize` reads the NFKC, case-folded text, so `ch` may be replaced by that form
    when it is ASCII ("ﬁ" -> "fi", no-break space -> " ", "…" -> "..."); a letter by its accent-stripped
    form when that is ASCII letters ("é" -> "e": still letters, as the join sees them); U+2010 HYPHEN by
    "-"; a space by " "; punctuation, symbols and controls, which `normalize` turns into spaces, by "'"
    (like them, neither space nor letter nor hyphen for the join). Format characters (deleted by
    `normalize`, so they glue their neighbours together) and anything starting with a combining mark
    (it composes with the character before) have none. tests/unit/dedup/test_text.py checks every character.
    """
    if unicodedata.combining(unicodedata.normalize("NFKD", ch)[0]):
        return None
    folded = unicodedata.normalize("NFKC", ch).casefold()
    if folded.isascii():
        return folded
    if folded == "\u2010":
        return "-"
    if folded.isalpha():
        bare = "".join(c for c in unicodedata.normalize("NFD", folded) if unicodedata.category(c) != "Mn")
        bare = unicodedata.normalize("NFC", bare)
        return bare if bare.isascii() and bare.isalpha() else None
    if folded.isspace():
        return " "
    cats = {unicodedata.category(c) for c in folded}
    if all(c[0] in "PS" or c in ("Cc", "Co", "Cn", "Cs") for c in cats) and "\u2010" not in folded:
        return "'"
    return None


class _AsciiForms(dict):
    """`_ascii_form` of each character, computed on first sight."""

    def __missing__(self, ch: str) -> str | None:
        self[ch] = out = _ascii_form(ch)
        return out


_ASCII_FORM = _AsciiForms()


class _NoAsciiForm(Exception):
    pass


def _ascii_run(m: re.Match) -> str:
    out = [_ASCII_FORM[c] for c in m.group()]
    if None in out:
        raise _NoAsciiForm
    return "".join(out)


def _text_bytes(text: str | None) -> bytes:
    """What the byte tokenizer reads for one text: ASCII that tokenises as `text` does, or else
    `normalize(text)` with the characters of unspaced scripts spaced apart."""
    if not text:
        return b""
    if text.isascii():  # O(1) in CPython
        return text.encode("ascii")
    try:  # typographic quotes, dashes, accented Latin letters: no need for the full `normalize`
        return _NON_ASCII_RE.sub(_ascii_run, text).encode("ascii")
    except _NoAsciiForm:
        return _CHAR_SCRIPT_RE.sub(r" \g<0> ", normalize(text)).encode()


def _token_stream(texts: Iterable[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Token hashes of all `texts` end to end, each text followed by one boundary token; and where those are.

    Returns `(th, bounds)`: `th[bounds[i - 1] + 1 : bounds[i]]` equals `_token_hashes(tokens(texts[i]))`.
    Vectorised over the whole batch, so the per-text Python cost is about one `isascii` and one
    `encode`: the bytes are mapped (`bytes.translate`), hyphen joins deleted, runs of separators
    squeezed to one zero byte, and every token hashed from its bytes in place (`_word_hashes`).
    """
    parts = [_text_bytes(t) for t in texts]
    lens = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    raw = np.frombuffer(_SEP.join(parts) + _SEP + bytes(_PAD), dtype=np.uint8)
    mapped = np.frombuffer(bytearray(raw.tobytes().translate(_BYTE_MAP)), dtype=np.uint8)
    mapped[np.cumsum(lens + len(_SEP)) - 2] = _BOUNDARY
    is_tok = mapped != 0
    keep = is_tok.copy()  # token bytes and the first separator after each token
    keep[1:] |= is_tok[:-1]
    keep[-_PAD:] = True
    # Hyphen joins, as `_HYPHEN_JOIN_RE` on ASCII: letter, "-", any spaces, letter -> the letters meet.
    hy = np.flatnonzero(raw == ord("-"))
    hy = hy[hy > 0]
    hy = hy[_ASCII_LETTER[raw[hy - 1]]]
    if len(hy):
        end = hy + 1
        todo = np.flatnonzero(_ASCII_SPACE[raw[end]])
        while len(todo):  # the raw text ends with _SEP, never a space: this stops
            end[todo] += 1
            todo = todo[_ASCII_SPACE[raw[end[todo]]]]
        join = _ASCII_LETTER[raw[end]]
        keep[_ranges(hy[join], end[join])] = False
    squeezed = mapped[keep]  # "tok\0tok\0...\1\0tok\0...", then the padding
    ends = np.flatnonzero(squeezed[:-_PAD] == 0)
    starts = np.zeros_like(ends)
    starts[1:] = ends[:-1] + 1
    th = _word_hashes(squeezed, starts, ends - starts)
    bounds = np.flatnonzero(squeezed[starts] == _BOUNDARY)
    return th, bounds


def _ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Concatenated `arange(start, stop)` for each pair, vectorised."""
    lens = stops - starts
    return np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())


def _split(th: np.ndarray, bounds: np.ndarray) -> list[np.ndarray]:
    """Per-text token hashes of a `_token_stream`."""
    starts = np.concatenate(([0], bounds[:-1] + 1))
    return [th[s:e] for s, e in zip(starts.tolist(), bounds.tolist())]


def _ngram_poly(th: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash of every n-gram of token hashes `th` (in order, with repeats): n starts it, so a
    4-gram and a 5-gram never share a hash. Its top bits are already well mixed (each is a sum of
    products of mixed token hashes), which is what `ContainmentIndex`'s prefilter reads."""
    m = len(th) - n + 1
    if n < 1 or m < 1:
        return np.empty(0, dtype=np.uint64)
    acc = np.full(m, n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            np.multiply(acc, _MUL, out=acc)
            np.add(acc, th[i : i + m], out=acc)
    return acc


def _ngram_hashes(th: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of every n-gram of token hashes `th`: `_ngram_poly`, then `_mix` (MinHash wants every
    bit mixed)."""
    return _mix(_ngram_poly(th, n))


def ngrams(toks: list[str], n: int) -> np.ndarray:
    """The set of hashed token n-grams of `toks`: sorted unique uint64 (empty if fewer than n tokens).

    An array rather than a Python set: it is 8 bytes an n-gram, and intersections (`np.intersect1d`,
    `np.isin`) and index look-ups are vectorised.
    """
    return np.unique(_ngram_hashes(_token_hashes(toks), n))


class ContainmentIndex:
    """Inverted index from n-gram hash to benchmark items; scores containment of each item in documents.

    Args:
        items: `(item_id, text)` pairs, the benchmark. `text` is one string or several segments
            (question, each option, answer, context...): n-grams never span two segments, and an item's
            n-grams are the union over its segments. A leaked copy renders the fields with labels between
            them ("Options:", "A.", "Answer:"), so n-grams across a field boundary of a concatenated item
            never match, and a verbatim copy of a concatenated item scores only about 0.5.
        n: n-gram length in tokens. Default 5, not the 8-13 used for long LLM benchmarks: VQA-style
            questions are often 6-15 words, and one changed word removes up to n n-grams. With n=5 a
            30-word question with two words changed keeps ~63% of its n-grams; with n=8 it keeps ~40%,
            and a 10-word question has only 3 8-grams. Five consecutive words of ordinary text are
            already specific, and the threshold asks for many of them.
        threshold: containment at or above which `query` and `scan` report an item. Default 0.5: a
            verbatim copy scores ~1.0 and light rewording (a few words changed, as in paraphrased leaks)
            stays above 0.5 with about one changed word per 15 (a 31-word question: 0.81 with one word
            changed, 0.63 with two, 0.44 with three), while an unrelated document sharing a stock phrase
            ("which of the following is") reaches only a few n-grams of an item.
        min_tokens: items with fewer tokens (all segments together) are not indexed (listed in
            `skipped`). Default 4: below that ("what is this?") a verbatim hit is common in ordinary text
            and says nothing about contamination.

    Short items and segments: an item uses k = min(n, its longest segment) tokens an n-gram, and only
    its segments of at least k tokens count. So a one-segment item shorter than n but at least
    `min_tokens` long is a single k-gram, found only when it appears verbatim; and in an item whose
    question has n tokens or more, one-word options ("Paris", "B") add nothing: as n-grams of their own
    length they would match ordinary text by chance, and each extra length is one more pass over every
    document. An item of several segments none of which reaches min(n, min_tokens) tokens is skipped.

    Storage: sorted unique n-gram hashes (uint64), CSR offsets (int64) and item postings (int32), plus
    per-item n-gram counts: about 20 bytes an n-gram, pickled as a few flat buffers. The prefilter
    table of `scan` (a byte per slot, 32 or more slots per key, at most 16 MiB) is built on first use
    in each process and never pickled.
    """

    def __init__(
        self,
        items: Iterable[tuple[str, str | Sequence[str]]],
        *,
        n: int = 5,
        threshold: float = 0.5,
        min_tokens: int = 4,
    ):
        if n < 1 or min_tokens < 1:
            raise ValueError("n and min_tokens must be >= 1")
        self.n, self.threshold, self.min_tokens = n, threshold, min_tokens
        self.ids: list[str] = []
        self.skipped: list[str] = []
        keys, segments = [], []
        for item_id, text in items:
            keys.append(item_id)
            segments.append([text] if isinstance(text, str) else list(text))
        seg_tokens = iter(_split(*_token_stream(s for segs in segments for s in segs)))
        per_item: list[np.ndarray] = []
        lengths: set[int] = set()
        for item_id, segs in zip(keys, segments):
            toks = [next(seg_tokens) for _ in segs]
            longest = max(map(len, toks), default=0)
            k = min(n, longest)
            if sum(map(len, toks)) < min_tokens or k < min(n, min_tokens):
                self.skipped.append(item_id)
                continue
            lengths.add(k)
            per_item.append(np.unique(np.concatenate([_ngram_poly(t, k) for t in toks if len(t) >= k])))
            self.ids.append(item_id)
        self._ns = sorted(lengths)  # n-gram lengths a document must be cut into: n, and short items' lengths
        self._sizes = np.array([len(g) for g in per_item], dtype=np.int32)
        flat = np.concatenate(per_item) if per_item else np.empty(0, dtype=np.uint64)
        owner = np.repeat(np.arange(len(per_item), dtype=np.int32), self._sizes)
        order = np.argsort(flat, kind="stable")
        flat, self._postings = flat[order], owner[order]
        self._keys, starts = np.unique(flat, return_index=True)
        self._offsets = np.append(starts, len(flat)).astype(np.int64)
        self._table: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_table": None}  # derived, and larger than the keys for small indexes

    def _prefilter(self) -> tuple[np.ndarray, np.uint64]:
        """One byte per value of the top `bits` bits of an n-gram hash, set where some key falls: with
        2^bits >= 32x the keys it passes at most 3% of a document's n-grams, plus the true hits, on to the
        exact `searchsorted`, which costs ~100 ns each against ~5 ns for the table. Capped at 16 MiB
        (2 million keys): larger tables fall out of the cache and are slower."""
        bits = int(np.clip(np.ceil(np.log2(max(len(self._keys), 1))) + 5, 12, 24))
        shift = np.uint64(64 - bits)
        if self._table is None:
            self._table = np.zeros(1 << bits, dtype=bool)
            self._table[self._keys >> shift] = True
        return self._table, shift

    def scan(
        self, texts: Sequence[str | None], threshold: float | None = None, *, batch_bytes: int = 1 << 19
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Containment of the indexed items in each of `texts`: the batch form of `query`, and the fast one.

        Returns `(doc, item, score)`, one entry per (text, item) pair that shares at least one n-gram and
        scores >= `threshold` (default: the index's): `doc` indexes `texts` (int64), `item` indexes `ids`
        (int64), `score` is the containment (float64). Sorted by `doc`, best score first within a text
        (ties in `ids` order). None and empty texts match nothing.

        Texts are tokenised and hashed a batch at a time, all with numpy (`_token_stream`), so the Python
        cost per text is a few hundred nanoseconds. `batch_bytes` (characters per batch) is small on
        purpose: at 512 KiB the working set stays in a core's L2 cache, 1.75x the speed of 4 MiB batches
        (BENCHMARKS.md, "Text decontamination scan").

            doc, item, score = idx.scan(texts)
            first = np.unique(doc, return_index=True)[1]          # each matching text's best item
            best = {int(doc[j]): (idx.ids[item[j]], float(score[j])) for j in first}
        """
        thr = self.threshold if threshold is None else threshold
        out = [(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64))]
        start, size = 0, 0
        for end, text in enumerate(texts, 1):
            size += len(text or "")
            if size >= batch_bytes or end == len(texts):
                if self.ids:
                    doc, item, score = self._scan_batch(texts[start:end], thr)
                    out.append((doc + start, item, score))
                start, size = end, 0
        doc, item, score = (np.concatenate(a) for a in zip(*out))
        return doc, item, score

    def _scan_batch(self, texts: Sequence[str | None], thr: float):
        th, bounds = _token_stream(texts)
        table, shift = self._prefilter()
        docs, poss = [], []
        for k in self._ns:
            grams = _ngram_poly(th, k)
            at = np.flatnonzero(table[grams >> shift])  # the few n-grams that may be keys
            grams = grams[at]
            pos = np.searchsorted(self._keys, grams)
            pos[pos == len(self._keys)] = 0
            hit = self._keys[pos] == grams
            at, pos = at[hit], pos[hit]
            doc = np.searchsorted(bounds, at)  # text of the n-gram's first token
            inside = at + k - 1 < bounds[doc]  # n-grams across a boundary never match anyway; now exactly
            docs.append(doc[inside])
            poss.append(pos[inside])
        n_keys, n_items = len(self._keys), len(self.ids)
        # Each distinct n-gram of a text counts once, then adds one to every item holding it.
        pair = np.unique(np.concatenate(docs) * n_keys + np.concatenate(poss))
        doc, pos = np.divmod(pair, n_keys)
        lo, hi = self._offsets[pos], self._offsets[pos + 1]
        pair, counts = np.unique(
            np.repeat(doc, hi - lo) * n_items + self._postings[_ranges(lo, hi)], return_counts=True
        )
        doc, item = np.divmod(pair, n_items)
        score = counts / self._sizes[item]
        keep = score >= thr
        doc, item, score = doc[keep], item[keep], score[keep]
        order = np.lexsort((-score, doc))  # stable: ties stay in item order
        return doc[order], item[order], score[order]

    def scores(self, doc_text: str) -> np.ndarray:
        """Containment of every indexed item in `doc_text`: float64 array aligned with `ids`."""
        out = np.zeros(len(self.ids))
        _, item, score = self.scan([doc_text], threshold=0.0)
        out[item] = score
        return out

    def query(self, doc_text: str, threshold: float | None = None) -> list[tuple[str, float]]:
        """Items whose containment in `doc_text` is >= `threshold` (default: the index's), best first."""
        _, item, score = self.scan([doc_text], threshold)
        return [(self.ids[i], float(s)) for i, s in zip(item.tolist(), score.tolist())]


def _rensa():
    try:
        import rensa
    except ImportError as e:  # declared as the `dedup` extra; never installed at run time
        raise ImportError("NearDupIndex needs rensa: pip install 'rensa>=0.5,<0.6'") from e
    return rensa


def _lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.2) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising weighted false-positive/negative area.

    The same criterion as datasketch's MinHashLSH, with false negatives weighted 4x: every LSH
    candidate is checked against its signature afterwards, so a false positive costs one comparison,
    while a false negative is a leaked benchmark item.
    """
    s = np.linspace(0.0, 1.0, 1001)
    best, best_cost = (1, num_perm), np.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - s**r) ** b
            fp = np.trapezoid(np.where(s < threshold, p, 0.0), s)
            fn = np.trapezoid(np.where(s >= threshold, 1.0 - p, 0.0), s)
            cost = fp_weight * fp + (1.0 - fp_weight) * fn
            if cost < best_cost:
                best, best_cost = (b, r), cost
    return best


class NearDupIndex:
    """MinHash LSH over token shingles: finds near-copies of *whole* benchmark items (estimated Jaccard).

    Signatures come from rensa (Rust), which `benchmarks/bench_minhash.py` measures at many times
    datasketch's speed for the same shingles; the shingles are hashed n-grams of the same token hashes
    as `ContainmentIndex` (`_token_stream`), handed to rensa as one flat uint64 buffer. Banding and
    candidate lookup are numpy arrays (sorted band keys per band), so the index pickles compactly for
    the Ray object store.

    Args:
        items: `(item_id, text)` pairs, the benchmark.
        threshold: estimated Jaccard at or above which `query` reports an item. Default 0.8: a copy
            with a few words edited, re-punctuated or re-wrapped keeps well over 0.8 of its shingles
            (normalisation already removes formatting), while two different questions from the same
            template share far fewer. For "item inside a longer document" use `ContainmentIndex`.
        num_perm: MinHash permutations. Default 128: the Jaccard estimate has a standard error of
            about sqrt(J(1-J)/128) ~ 0.035 at J=0.8, enough to separate 0.8 from 0.5; doubling it
            doubles signature time and memory for a small gain.
        shingle: tokens per shingle. Default 2 (word bigrams), not the 5+ used for web pages: items
            are short and each edited word removes up to `shingle` shingles. One word changed in a
            30-word question leaves Jaccard ~0.88 with bigrams, ~0.81 with 3-grams (a coin flip at
            threshold 0.8), ~0.71 with 5-grams. Bigrams still separate different questions: two
            30-word questions from one template differing in 3 words have Jaccard ~0.66.
        seed: MinHash seed; queries must use the index's seed, which they do.
    """

    def __init__(
        self,
        items: Iterable[tuple[str, str]],
        *,
        threshold: float = 0.8,
        num_perm: int = 128,
        shingle: int = 2,
        seed: int = 1,
    ):
        self.threshold, self.num_perm, self.shingle, self.seed = threshold, num_perm, shingle, seed
        self.bands, self.rows = _lsh_params(threshold, num_perm)
        self.ids: list[str] = []
        self.skipped: list[str] = []
        items = list(items)
        kept = []
        for (item_id, _), th in zip(items, _split(*_token_stream(text for _, text in items))):
            (self.ids if len(th) else self.skipped).append(item_id)
            if len(th):
                kept.append(th)
        self._sigs = self._signatures(kept)
        keys = self._band_keys(self._sigs)  # (bands, items)
        self._order = np.argsort(keys, axis=1, kind="stable").astype(np.int32)
        self._keys = np.take_along_axis(keys, self._order, axis=1)

    def __len__(self) -> int:
        return len(self.ids)

    def signatures(self, texts: list[str]) -> np.ndarray:
        """MinHash signatures (uint32, one row a text) of the token shingles of `texts`."""
        return self._signatures(_split(*_token_stream(texts)))

    def _signatures(self, token_hashes: list[np.ndarray]) -> np.ndarray:
        grams = [np.unique(_ngram_hashes(th, max(1, min(self.shingle, len(th))))) for th in token_hashes]
        if not grams:
            return np.empty((0, self.num_perm), dtype=np.uint32)
        offsets = np.zeros(len(grams) + 1, dtype=np.uint64)
        np.cumsum([len(g) for g in grams], out=offsets[1:])
        matrix = _rensa().RMinHash.digest_matrix_from_flat_token_hashes(
            np.concatenate(grams), offsets, self.num_perm, self.seed
        )
        return np.array(matrix.to_rows(), dtype=np.uint32)

    def _band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """One uint64 key per (band, signature): a hash of the band's `rows` values."""
        bands = sigs[:, : self.bands * self.rows].reshape(len(sigs), self.bands, self.rows).astype(np.uint64)
        with np.errstate(over="ignore"):
            acc = np.zeros((len(sigs), self.bands), dtype=np.uint64)
            for i in range(self.rows):
                acc = acc * _MUL + bands[:, :, i]
        return acc.T.copy()

    def query(self, text: str, threshold: float | None = None) -> list[tuple[str, float]]:
        """Items whose estimated Jaccard with `text` is >= `threshold` (default: the index's), best first."""
        return self.query_batch([text], threshold)[0]

    def query_batch(
        self, texts: Sequence[str | None], threshold: float | None = None
    ) -> list[list[tuple[str, float]]]:
        """`query` for each of `texts`, with one tokenising pass and one signature call for the batch."""
        thr = self.threshold if threshold is None else threshold
        out: list[list[tuple[str, float]]] = [[] for _ in texts]
        if not self.ids or not len(texts):
            return out
        ths = _split(*_token_stream(texts))
        live = np.array([i for i, th in enumerate(ths) if len(th)], dtype=np.int64)
        if not len(live):
            return out
        sigs = self._signatures([ths[i] for i in live])
        qkeys = self._band_keys(sigs)  # (bands, live texts)
        n_items, pairs = len(self.ids), []
        for band in range(self.bands):  # candidates: any band key equal to the item's
            lo = np.searchsorted(self._keys[band], qkeys[band], side="left")
            hi = np.searchsorted(self._keys[band], qkeys[band], side="right")
            if (hi > lo).any():
                q = np.repeat(np.arange(len(live)), hi - lo)
                pairs.append(q * n_items + self._order[band, _ranges(lo, hi)])
        if not pairs:
            return out
        q, c = np.divmod(np.unique(np.concatenate(pairs)), n_items)
        est = (self._sigs[c] == sigs[q]).mean(axis=1)
        keep = est >= thr
        q, c, est = q[keep], c[keep], est[keep]
        for j in np.lexsort((c, -est, q)):  # per text, best first (ties in ids order)
            out[int(live[q[j]])].append((self.ids[int(c[j])], float(est[j])))
        return out
