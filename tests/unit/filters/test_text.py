"""Caption filters (filters/text.py) on small inline batches: scores persist, thresholds decide, rejects carry
reasons."""

from __future__ import annotations

from tests.helpers.batches import batch, reasons, stage


def test_caption_filters():
    texts = [
        "A red circle on a white background.",
        None,
        "   ",
        "best price best price best price best price",
        "Click here to download",
        "IMG_2034.JPG",
        "Ein roter Kreis auf weißem Hintergrund.",
        "a red circle and a red square",
    ]
    b = batch(*[{"text": t} for t in texts])
    assert reasons(stage("caption_length", min=3)(b)) == [
        None,
        "too_short",
        "too_short",
        None,
        None,
        "too_short",
        None,
        None,
    ]
    assert reasons(stage("caption_repetition")(b)) == [
        None,
        None,
        None,
        "repeated_phrase",
        None,
        None,
        None,
        None,
    ]
    assert reasons(stage("caption_boilerplate")(b)) == [
        None,
        None,
        None,
        None,
        "boilerplate",
        "boilerplate",
        None,
        None,
    ]
    out = stage("caption_language", languages=["en"])(b)
    assert out["lang"].to_pylist()[0] == "en" and out["lang"].to_pylist()[6] == "de"
    assert reasons(out)[6] == "language_not_allowed" and reasons(out)[0] is None
    assert "detected de" in out["reject_detail"].to_pylist()[6]
    assert reasons(out)[1] == "language_not_allowed"  # no text, no language


def test_stages_skip_other_modalities_unless_asked():
    b = batch({"text": "tiny"}, modality="text")
    assert reasons(stage("caption_length", min=3)(b)) == [None]
    assert reasons(stage("caption_length", min=3, modalities=["text"])(b)) == ["too_short"]
    # the score column exists even when no row applied, so every batch has one schema
    assert "score_caption_length" in stage("caption_length")(b).column_names
