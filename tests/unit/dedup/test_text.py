"""Text decontamination: normalisation invariants, containment of items inside documents, MinHash
near-dups."""

from __future__ import annotations

import itertools
import pickle
import random
import textwrap

import numpy as np
import pytest

from curation.dedup.text import (
    _ASCII_FORM,
    ContainmentIndex,
    NearDupIndex,
    _split,
    _token_hashes,
    _token_stream,
    ngrams,
    normalize,
    tokens,
)

# A made-up vocabulary: random text over it shares no meaningful phrases with the items.
_RNG = random.Random(0)
VOCAB = [
    "".join(_RNG.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_RNG.randint(2, 9))) for _ in range(5000)
]

QUESTION = (
    "Looking at the chart in the figure, which of the four regions showed the largest relative increase "
    "in average rainfall between the first and the second decade of the survey period?"
)


def words(rng: random.Random, k: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(k))


def reword(text: str, changes: int, rng: random.Random) -> str:
    """Replace `changes` words spread evenly over the text."""
    ws = text.split()
    for i in range(changes):
        ws[(i + 1) * len(ws) // (changes + 1)] = rng.choice(VOCAB)
    return " ".join(ws)


@pytest.fixture(scope="module")
def items() -> list[tuple[str, str]]:
    rng = random.Random(1)
    return [(f"q{i}", words(rng, rng.randint(8, 40))) for i in range(200)] + [("chart", QUESTION)]


@pytest.fixture(scope="module")
def cindex(items) -> ContainmentIndex:
    return ContainmentIndex(items)


@pytest.fixture(scope="module")
def nindex(items) -> NearDupIndex:
    pytest.importorskip("rensa")
    return NearDupIndex(items)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("The Quick Brown FOX", "the quick brown fox"),
        ("ＡＢＣ１２３ ｆｕｌｌ－ｗｉｄｔｈ", "abc123 full-width"),  # NFKC full-width forms
        ("ﬁne straße", "fine strasse"),  # ligature, casefold
        ("Café naïve résumé", "cafe naive resume"),  # accents stripped
        ("Hello, world!!! (really?) — yes: “quoted” 'text'", "hello world really yes quoted text"),
        ("one   two\n\nthree\tfour\r\nfive", "one two three four five"),  # whitespace, line breaks
        ("a test of contami-\nnation in\n  re-wrapped lines", "a test of contamination in rewrapped lines"),
        ("soft\u00adhyphen zero\u200bwidth", "softhyphen zerowidth"),  # invisible format characters
        ("東京タワーは\n何メートル？", "東京タワーは何メートル"),  # CJK re-wrapped, full-width punctuation
    ],
)
def test_normalize_invariants(a, b):
    assert normalize(a) == normalize(b)


def test_normalize_keeps_letters_of_all_scripts_and_digits():
    assert normalize("Привет мир 123 مرحبا 안녕하세요") == "привет мир 123 مرحبا 안녕하세요"
    assert normalize("10-20") == "10 20"  # a hyphen between digits is a range, not a broken word


def test_tokens_cjk_are_characters_and_ngrams_are_hashed_sets():
    assert tokens("What is 東京タワー?") == ["what", "is", "東", "京", "タ", "ワ", "ー"]
    assert tokens("안녕 세계") == ["안녕", "세계"]  # Hangul is spaced: word tokens
    g = ngrams(tokens("a b c a b c"), 2)
    assert g.dtype.name == "uint64" and len(g) == 3  # ab, bc, ca: a set
    assert len(ngrams(["a"], 2)) == 0


def test_question_inside_a_long_document_is_found(cindex):
    rng = random.Random(2)
    doc = words(rng, 1000) + "\n" + QUESTION.upper().replace(" the ", "\nthe ") + "\n" + words(rng, 1000)
    hits = dict(cindex.query(doc))
    assert hits["chart"] >= 0.9
    assert cindex.scores(words(rng, 2000)).max() < 0.1


def test_reworded_question_stays_above_threshold_and_degrades_gracefully(cindex):
    rng = random.Random(3)
    chart = cindex.ids.index("chart")
    scores = []
    for changes in range(7):
        doc = words(rng, 300) + " " + reword(QUESTION, changes, rng) + " " + words(rng, 300)
        scores.append(float(cindex.scores(doc)[chart]))
    assert scores[0] == 1.0
    assert all(s >= cindex.threshold for s in scores[:3]), scores  # up to 2 words changed in 31
    assert all(a > b for a, b in itertools.pairwise(scores)), scores  # each change costs a little
    assert scores[1] - scores[2] < 0.25, scores


def test_short_items_use_their_length_and_tiny_items_are_skipped():
    idx = ContainmentIndex([("short", "What colour is the bus?"), ("tiny", "what is this")], n=8)
    assert idx.ids == ["short"] and idx.skipped == ["tiny"]
    assert idx.query("a photo. What colour is the bus? Red.") == [("short", 1.0)]
    assert idx.query("what colour is the car") == []


def test_no_false_positives_on_unrelated_documents(cindex, nindex):
    rng = random.Random(4)
    for _ in range(1000):
        doc = words(rng, rng.randint(20, 400))
        assert cindex.query(doc) == []
        assert nindex.query(doc) == []


def test_near_dup_finds_lightly_edited_copy_only(nindex, items):
    rng = random.Random(5)
    edited = reword(QUESTION, 1, rng).replace(",", ";").lower() + "\n"
    hits = nindex.query(edited)
    assert hits and hits[0][0] == "chart" and hits[0][1] >= 0.8
    assert [i for i, _ in nindex.query(items[7][1])] == ["q7"]
    assert nindex.query(words(rng, 30)) == []
    # A whole item inside a long document is not a near-duplicate: that is containment's job.
    assert nindex.query(words(rng, 500) + " " + QUESTION) == []


def test_indexes_pickle_round_trip(cindex, nindex):
    doc = "intro text " + QUESTION + " outro"
    for idx in (cindex, nindex):
        copy = pickle.loads(pickle.dumps(idx))
        assert copy.query(doc) == idx.query(doc) != []


def test_containment_index_for_10k_items_is_compact():
    rng = random.Random(6)
    many = [(f"item-{i}", words(rng, rng.randint(8, 40))) for i in range(10_000)]
    idx = ContainmentIndex(many)
    n_grams = int(idx._sizes.sum())
    blob = pickle.dumps(idx)
    assert len(blob) < 24 * n_grams + 40 * len(idx), (len(blob), n_grams)
    assert pickle.loads(blob).query(words(rng, 100) + " " + many[1234][1]) == [("item-1234", 1.0)]


# ---------------------------------------------------------------- batch scan (ContainmentIndex.scan)


def test_batch_tokenizer_equals_tokens_on_random_unicode():
    """The vectorised tokenizer (ASCII fast path, ASCII forms, normalize) hashes exactly `tokens(text)`."""
    rng = random.Random(7)
    tricky = list(
        "aZ09 -\n\t\r\x0b\x0c\x1c\x1f\x00\x01_.,'–—’“”…é\u0301ßﬁＡ１"
        "\u00ad\u200b\u2010\u2011\u00a0東京タワーا안녕²™½Ǆ"
    )
    texts = []
    for _ in range(3000):
        k = rng.randint(0, 40)
        if rng.random() < 0.4:
            texts.append("".join(rng.choice(tricky[:14]) for _ in range(k)))  # ASCII only
        elif rng.random() < 0.9:
            texts.append(
                "".join(
                    rng.choice(tricky) if rng.random() < 0.85 else chr(rng.randint(0x80, 0x2FFFF))
                    for _ in range(k)
                )
            )
        else:
            texts.append(None)
    for text, got in zip(texts, _split(*_token_stream(texts)), strict=True):
        assert got.tolist() == _token_hashes(tokens(text or "")).tolist(), repr(text)


def test_every_ascii_form_tokenises_like_normalize():
    """Each BMP character that the fast path replaces by ASCII, in contexts that exercise the hyphen join."""
    chars = [chr(c) for c in range(0x80, 0x10000) if _ASCII_FORM[chr(c)] is not None]
    assert {"é", "’", "—", "\u00a0", "ﬁ", "\u2010"} <= set(chars) and "\u200b" not in chars  # ZWSP is deleted
    texts = [
        f"ab{c}cd ab-{c}cd xy{c}-cd a-{c} {c}-b x-\n{c}y 1{c}2 {c}{c} é{c} {c}É A{c}B p{c}-{d}q"
        for c, d in zip(chars, chars[1:] + chars[:1])
    ]
    got = _split(*_token_stream(texts))
    assert [t for t, g in zip(texts, got) if g.tolist() != _token_hashes(tokens(t)).tolist()] == []


def _quiz(q: str, options: list[str], answer: str) -> str:
    labelled = [f"{'ABCD'[k]}) {o}" for k, o in enumerate(options)]
    return "\n".join([f"Question: {q}", *labelled, f"Answer: {answer}"])


def test_scan_equals_per_document_query(cindex, items):
    rng = random.Random(8)
    docs = []
    for i in range(300):
        body = words(rng, rng.randint(0, 300))
        if i % 3 == 0:  # an item inside, sometimes reworded
            _, text = items[rng.randrange(len(items))]
            body = f"{body}\n{reword(text, rng.randint(0, 3), rng)}\n{words(rng, 50)}"
        docs.append(body if i % 17 else None)
    for thr in (None, 0.0, 0.3):
        doc, item, score = cindex.scan(docs, threshold=thr)
        if thr is None:
            assert len(set(doc.tolist())) >= 60  # most of the 94 planted items are found
        assert (np.diff(doc) >= 0).all()
        got = [[] for _ in docs]
        for d, i, s in zip(doc.tolist(), item.tolist(), score.tolist()):
            got[d].append((cindex.ids[i], s))
        assert got == [cindex.query(d or "", threshold=thr) for d in docs]
        tiny = cindex.scan(docs, threshold=thr, batch_bytes=100)  # one or two documents a batch
        assert all((a == b).all() for a, b in zip(tiny, (doc, item, score)))


def test_segments_make_a_labelled_copy_score_one():
    q = "Which of the four regions showed the largest relative increase in average rainfall over the decade"
    options = [
        "the northern coastal plain region",
        "the southern highlands",
        "the eastern river delta and its islands",
        "the west",
    ]
    rng = random.Random(9)
    leaked = words(rng, 300) + "\n" + _quiz(q, options, options[2]) + "\n" + words(rng, 300)
    joined = ContainmentIndex([("x", " ".join([q, *options, options[2]]))])
    segmented = ContainmentIndex([("x", [q, *options, options[2]])])
    assert joined.query(leaked, threshold=0.0)[0][1] < 0.85
    assert segmented.query(leaked) == [("x", 1.0)]
    # 12 + 1 + 0 + 3 + 0 n-grams: none spans two segments, segments shorter than n (5) add none, and the
    # answer (a repeat of an option) adds nothing new
    assert segmented._sizes.tolist() == [16]
    assert segmented.query(" ".join(options), threshold=0.0) == [("x", 4 / 16)]


def test_short_segments_min_tokens_and_skipping():
    idx = ContainmentIndex(
        [
            (
                "q",
                ["What colour is the bus?", "red", "blue"],
            ),  # 5 tokens: n-grams of 5 from the question only
            ("short", ["Name the bus", "a red one"]),  # longest 3 < min(n, min_tokens): skipped
            ("few", ["bus", "red"]),  # 2 tokens in all < min_tokens
            ("four", ["what is the bus", "red"]),  # longest 4 = min_tokens: one 4-gram
        ]
    )
    assert idx.ids == ["q", "four"] and idx.skipped == ["short", "few"]
    assert idx.query("Q: what colour is the bus? A) red B) blue") == [("q", 1.0)]
    assert idx.query("so, What is the BUS?") == [("four", 1.0)]
    assert idx.query("what colour is the car, red or blue") == []


def test_recased_rewrapped_and_typographic_copies_are_found_unrelated_are_not(cindex):
    rng = random.Random(11)
    chart = cindex.ids.index("chart")
    wrapped = "\n".join(textwrap.wrap(QUESTION, 23)).replace("increase", "in-\ncrease")
    typographic = QUESTION.replace(" ", "\u00a0", 3).replace(",", " —").replace("?", "’?")
    typographic = typographic.replace("e", "é", 5)
    copies = [QUESTION.upper(), QUESTION.title(), wrapped, typographic, reword(QUESTION, 1, rng)]
    docs = [f"{words(rng, 500)}\n\n{c}\n\n{words(rng, 500)}" for c in copies]
    docs += [words(rng, rng.randint(200, 2000)) for _ in range(200)]
    doc, item, score = cindex.scan(docs)
    assert doc.tolist() == list(range(len(copies))) and (item == chart).all()
    assert score.tolist()[:4] == [1.0] * 4 and score[4] >= 0.7


def test_scan_after_pickling_and_on_empty_input(cindex):
    doc = "intro " + QUESTION + " outro"
    copy = pickle.loads(pickle.dumps(cindex))
    assert copy._table is None and copy.query(doc) == cindex.query(doc) == [("chart", 1.0)]
    assert all(len(a) == 0 for a in cindex.scan([]))
    assert all(len(a) == 0 for a in ContainmentIndex([]).scan(["some text", None]))
