"""Text matching for benchmark decontamination: normalisation, n-gram containment, MinHash near-duplicates.

Two questions, two indexes, both built once from the benchmark items and shared with every worker
(plain numpy arrays and lists, so `ray.put(index)` stores one compact copy in the object store):

- `ContainmentIndex`: is (most of) a benchmark item *inside* this training document? Score is
  |ngrams(item) ∩ ngrams(doc)| / |ngrams(item)|, relative to the item, so a 20-word question pasted
  into a 2,000-word page still scores ~1.0. Jaccard would score it ~0.01 (DESIGN.md, Known traps).
- `NearDupIndex`: is this text a light edit of a *whole* benchmark item? MinHash + LSH over token
  shingles, estimated Jaccard.

Both see text through `normalize` and `tokens`, so case, Unicode forms, accents, punctuation,
whitespace, line re-wrapping and hyphenated line breaks do not change a match.

    idx = ContainmentIndex([("mmlu/17", "Which gas do plants absorb ...?"), ...])
    ref = ray.put(idx)                      # once; workers call ray.get(ref).query(doc_text)
    idx.query(doc_text)                     # [("mmlu/17", 0.93)]
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

import numpy as np
import xxhash

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
    """Words of `normalize(text)`; each character of Chinese, Japanese, Thai, Lao, Khmer, Myanmar is one token.

    >>> tokens("What is 東京タワー?")
    ['what', 'is', '東', '京', 'タ', 'ワ', 'ー']
    """
    return _TOKEN_RE.findall(normalize(text))


_xxh3 = xxhash.xxh3_64_intdigest
_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constants (golden ratio, splitmix64)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _token_hashes(toks: list[str]) -> np.ndarray:
    return np.fromiter((_xxh3(t.encode()) for t in toks), dtype=np.uint64, count=len(toks))


def _ngram_hashes(th: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of every n-gram of token hashes `th` (in order, with repeats), vectorised.

    A polynomial over the token hashes, then the splitmix64 finaliser; `n` is mixed in, so a 4-gram
    and a 5-gram never share a hash.
    """
    m = len(th) - n + 1
    if n < 1 or m < 1:
        return np.empty(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        acc = np.full(m, n, dtype=np.uint64)
        for i in range(n):
            acc = acc * _MUL + th[i : i + m]
        acc ^= acc >> np.uint64(30)
        acc *= _MIX1
        acc ^= acc >> np.uint64(27)
        acc *= _MIX2
        acc ^= acc >> np.uint64(31)
    return acc


def ngrams(toks: list[str], n: int) -> np.ndarray:
    """The set of hashed token n-grams of `toks`: sorted unique uint64 (empty if fewer than n tokens).

    An array rather than a Python set: it is 8 bytes an n-gram, and intersections (`np.intersect1d`,
    `np.isin`) and index look-ups are vectorised.
    """
    return np.unique(_ngram_hashes(_token_hashes(toks), n))


class ContainmentIndex:
    """Inverted index from n-gram hash to benchmark items; scores containment of each item in a document.

    Args:
        items: `(item_id, text)` pairs, the benchmark.
        n: n-gram length in tokens. Default 5, not the 8-13 used for long LLM benchmarks: VQA-style
            questions are often 6-15 words, and one changed word removes up to n n-grams. With n=5 a
            30-word question with two words changed keeps ~63% of its n-grams; with n=8 it keeps ~40%,
            and a 10-word question has only 3 8-grams. Five consecutive words of ordinary text are
            already specific, and the threshold asks for many of them.
        threshold: containment at or above which `query` reports an item. Default 0.5: a verbatim copy
            scores ~1.0 and light rewording (a few words changed, as in paraphrased leaks) stays above
            0.5 with about one changed word per 15 (a 31-word question: 0.81 with one word changed,
            0.63 with two, 0.44 with three), while an unrelated document sharing a stock phrase ("which
            of the following is") reaches only a few n-grams of an item.
        min_tokens: items with fewer tokens are not indexed (listed in `skipped`). Default 4. An item
            shorter than n but at least this long uses n = its length: a single n-gram, so it is found
            only when the whole normalised item appears verbatim. Below 4 tokens ("what is this?") a
            verbatim hit is common in ordinary text and says nothing about contamination.

    Storage: sorted unique n-gram hashes (uint64), CSR offsets (int64) and item postings (int32), plus
    per-item n-gram counts: about 20 bytes an n-gram, pickled as a few flat buffers.
    """

    def __init__(
        self,
        items: Iterable[tuple[str, str]],
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
        per_item: list[np.ndarray] = []
        lengths: set[int] = set()
        for item_id, text in items:
            toks = tokens(text)
            if len(toks) < min_tokens:
                self.skipped.append(item_id)
                continue
            k = min(n, len(toks))
            lengths.add(k)
            per_item.append(ngrams(toks, k))
            self.ids.append(item_id)
        self._ns = sorted(lengths)  # n-gram lengths a document must be cut into: n, and short items' lengths
        self._sizes = np.array([len(g) for g in per_item], dtype=np.int32)
        flat = np.concatenate(per_item) if per_item else np.empty(0, dtype=np.uint64)
        owner = np.repeat(np.arange(len(per_item), dtype=np.int32), self._sizes)
        order = np.argsort(flat, kind="stable")
        flat, self._postings = flat[order], owner[order]
        self._keys, starts = np.unique(flat, return_index=True)
        self._offsets = np.append(starts, len(flat)).astype(np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def scores(self, doc_text: str) -> np.ndarray:
        """Containment of every indexed item in `doc_text`: float64 array aligned with `ids`."""
        th = _token_hashes(tokens(doc_text))
        counts = np.zeros(len(self.ids), dtype=np.int64)
        if not self.ids:
            return counts.astype(np.float64)
        grams = np.unique(np.concatenate([_ngram_hashes(th, k) for k in self._ns]))
        pos = np.searchsorted(self._keys, grams)
        pos = pos[pos < len(self._keys)]
        pos = pos[self._keys[pos] == grams[: len(pos)]]
        # Gather the posting lists of the matched n-grams (CSR ranges) and count hits per item.
        starts, ends = self._offsets[pos], self._offsets[pos + 1]
        lens = ends - starts
        if lens.sum():
            flat_pos = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
            counts += np.bincount(self._postings[flat_pos], minlength=len(self.ids))
        return counts / self._sizes

    def query(self, doc_text: str, threshold: float | None = None) -> list[tuple[str, float]]:
        """Items whose containment in `doc_text` is >= `threshold` (default: the index's), best first."""
        thr = self.threshold if threshold is None else threshold
        s = self.scores(doc_text)
        hits = np.flatnonzero(s >= thr)
        hits = hits[np.argsort(-s[hits], kind="stable")]
        return [(self.ids[i], float(s[i])) for i in hits]


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
    datasketch's speed for the same shingles; the shingle hashes are the same xxh3 n-gram hashes as
    `ContainmentIndex`, handed to rensa as one flat uint64 buffer. Banding and candidate lookup are
    numpy arrays (sorted band keys per band), so the index pickles compactly for the Ray object store.

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
        texts = []
        for item_id, text in items:
            if tokens(text):
                self.ids.append(item_id)
                texts.append(text)
            else:
                self.skipped.append(item_id)
        self._sigs = self.signatures(texts)
        keys = self._band_keys(self._sigs)  # (bands, items)
        self._order = np.argsort(keys, axis=1, kind="stable").astype(np.int32)
        self._keys = np.take_along_axis(keys, self._order, axis=1)

    def __len__(self) -> int:
        return len(self.ids)

    def signatures(self, texts: list[str]) -> np.ndarray:
        """MinHash signatures (uint32, one row a text) of the token shingles of `texts`."""
        grams = []
        for text in texts:
            th = _token_hashes(tokens(text))
            grams.append(np.unique(_ngram_hashes(th, max(1, min(self.shingle, len(th))))))
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
        thr = self.threshold if threshold is None else threshold
        if not self.ids or not tokens(text):
            return []
        sig = self.signatures([text])
        qkeys = self._band_keys(sig)[:, 0]
        cands = set()
        for band, key in enumerate(qkeys):
            lo = np.searchsorted(self._keys[band], key, side="left")
            hi = np.searchsorted(self._keys[band], key, side="right")
            cands.update(self._order[band, lo:hi].tolist())
        if not cands:
            return []
        c = np.fromiter(cands, dtype=np.int64, count=len(cands))
        est = (self._sigs[c] == sig[0]).mean(axis=1)
        keep = est >= thr
        c, est = c[keep], est[keep]
        order = np.argsort(-est, kind="stable")
        return [(self.ids[i], float(e)) for i, e in zip(c[order], est[order])]
