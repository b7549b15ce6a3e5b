"""Text decontamination: normalisation invariants, containment of items inside documents, MinHash near-dups."""

from __future__ import annotations

import itertools
import pickle
import random

import pytest

from curation.dedup.text import ContainmentIndex, NearDupIndex, ngrams, normalize, tokens

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
