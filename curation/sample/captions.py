"""Captions: English and foreign-language descriptions of a scene, and the caption dirt of web crawls.

Clean captions are generated from the same scene that is drawn (:mod:`curation.sample.scenes`), with
varied templates, so a CLIP-style model can learn to match them and a mismatched caption really is
wrong. Captions in German, French, Spanish and Chinese describe the same content with simpler templates
(the ``non_english_caption`` dirt). Words come from ``captions.json``.

    >>> from curation.sample.scenes import make_scene
    >>> rng = random.Random(1)
    >>> caption_en(make_scene(rng), rng)
    'A pink background with a white circle.'
"""

from __future__ import annotations

import random

from curation.sample.vocabulary import load

_VOCAB = load("captions")
NUMBERS_EN = dict(enumerate(_VOCAB["numbers_en"], start=1))
BOILERPLATE_CAPTIONS: tuple[str, ...] = _VOCAB["boilerplate_captions"]
REPEATED_PHRASES: tuple[str, ...] = _VOCAB["repeated_phrases"]

# Other languages: correct content, simpler templates. Per language: nouns, colour forms and the numbers
# 1-5 from the data file; list joiner, background phrase and templates in the functions below.
LANGS = ("de", "fr", "es", "zh")
_WORDS = _VOCAB["languages"]
_DE_NOUNS = _WORDS["de"]["nouns"]  # (singular, plural, gender)
_DE_COLOURS = _WORDS["de"]["colours"]  # (noun, dative adjective)
_FR_NOUNS = _WORDS["fr"]["nouns"]
_FR_COLOURS = _WORDS["fr"]["colours"]  # (masculine, feminine)
_ES_NOUNS = _WORDS["es"]["nouns"]
_ES_COLOURS = _WORDS["es"]["colours"]  # (masculine, feminine, masculine plural, feminine plural)
_ZH_NOUNS = _WORDS["zh"]["nouns"]  # (noun, measure word)
_ZH_COLOURS = _WORDS["zh"]["colours"]
_NUMBERS = {lang: _WORDS[lang]["numbers"] for lang in LANGS}


def _plural(noun: str) -> str:
    return noun + "es" if noun.endswith("s") else noun + "s"


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join_en(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _bg_en(bg: tuple, rng: random.Random) -> str:
    if bg[0] == "flat":
        return _a(f"{bg[1]} background")
    return rng.choice((f"a gradient from {bg[1]} to {bg[2]}", _a(f"{bg[1]}-to-{bg[2]} gradient background")))


def _items_en(groups: list) -> str:
    parts = []
    for shape, colour, n, size in groups:
        if n == 1:
            parts.append(_a(f"{size} {colour} {shape}" if size else f"{colour} {shape}"))
        else:
            parts.append(f"{NUMBERS_EN[n]} {colour} {_plural(shape)}")
    return _join_en(parts)


def _quoted_words(phrase: str) -> tuple[str, str]:
    """('word' | 'words', 'is' | 'are') for a sign phrase."""
    return ("words", "are") if " " in phrase else ("word", "is")


def scene_phrase_en(scene: dict, rng: random.Random) -> str:
    """The core noun phrase describing a scene ("a red circle and two blue squares on ...")."""
    kind = scene["kind"]
    if kind == "shapes":
        return f"{_items_en(scene['groups'])} on {_bg_en(scene['bg'], rng)}"
    if kind == "sign":
        word, _ = _quoted_words(scene["phrase"])
        return rng.choice(
            (
                f"a sign that reads '{scene['phrase']}'",
                _a(f"{scene['board']} sign with the {word} '{scene['phrase']}' in {scene['ink']} letters"),
                _a(f"{scene['board']} board with '{scene['phrase']}' written on it"),
            )
        )
    names = []
    for obj in scene["objects"]:
        if obj["obj"] == "house":
            small = "small " if obj["size"] < 0.22 and rng.random() < 0.6 else ""
            names.append(
                rng.choice(
                    (
                        f"a {small}house",
                        _a(f"{small}{obj['colour']} house"),
                        _a(f"{small}{obj['colour']} house with a {obj['roof']} roof"),
                    )
                )
            )
        elif obj["obj"] == "tree":
            names.append(rng.choice(("a tree", "a green tree")))
        else:
            names.append(rng.choice(("a car", _a(f"{obj['colour']} car"))))
    main = names[0] + "".join(link + name for link, name in zip((" next to ", " and "), names[1:]))
    mods = ["on green grass"] if scene["ground"] else []
    if scene["sun"] and scene["sky"]:
        mods.append(rng.choice(("under a yellow sun and a blue sky", "on a sunny day with a blue sky")))
    elif scene["sun"]:
        mods.append(rng.choice(("under a yellow sun", "on a sunny day", "with a yellow sun in the corner")))
    elif scene["sky"]:
        mods.append("under a blue sky")
    if not scene["sky"]:
        mods.append(("against " if scene["ground"] else "on ") + _a(f"{scene['bg'][1]} background"))
    return " ".join([main, *mods])


def caption_en(scene: dict, rng: random.Random) -> str:
    """A clean English caption derived from the scene, with varied templates."""
    core = scene_phrase_en(scene, rng)
    kind = scene["kind"]
    if kind == "shapes":
        items, bg = core.split(" on ", 1)
        caption = rng.choice(
            (
                f"{_cap(items)} on {bg}.",
                f"{_cap(items)} against {bg}.",
                f"A picture of {items} on {bg}.",
                f"{_cap(bg)} with {items}.",
                f"Simple drawing of {items}.",
                f"Clip art: {items} on {bg}.",
                f"{_cap(items)}.",
            )
        )
        if scene["label"]:
            phrase, _, where = scene["label"]
            word, verb = _quoted_words(phrase)
            caption += f" The {word} '{phrase}' {verb} written at the {where}."
        return caption
    prefix = rng.choice(("", "", "Photo of ", "A drawing of ", "Illustration: ")) if kind == "objects" else ""
    return _cap(prefix + core) + "."


def _fr_colour(colour: str, gender: str, n: int) -> str:
    word = _FR_COLOURS[colour][gender == "f"]
    if n > 1 and colour not in ("orange", "brown") and not word.endswith("s"):
        word += "s"
    return word


def _item_foreign(lang: str, noun: str, colour: str | None, n: int) -> str:
    """One noun phrase ("zwei Kreise in Rot", "deux carrés bleus", "两个蓝色的正方形")."""
    if lang == "zh":
        word, measure = _ZH_NOUNS[noun]
        return f"{_NUMBERS['zh'][n - 1]}{measure}{_ZH_COLOURS[colour] + '的' if colour else ''}{word}"
    nouns = {"de": _DE_NOUNS, "fr": _FR_NOUNS, "es": _ES_NOUNS}[lang]
    sing, plur, gender = nouns[noun]
    if n == 1:
        num = {
            "de": "eine" if gender == "f" else "ein",
            "fr": "une" if gender == "f" else "un",
            "es": "una" if gender == "f" else "un",
        }[lang]
    else:
        num = _NUMBERS[lang][n - 1]
    head = f"{num} {sing if n == 1 else plur}"
    if not colour:
        return head
    if lang == "de":
        return f"{head} in {_DE_COLOURS[colour][0]}"
    if lang == "fr":
        return f"{head} {_fr_colour(colour, gender, n)}"
    return f"{head} {_ES_COLOURS[colour][(gender == 'f') + 2 * (n > 1)]}"


def _join_foreign(lang: str, parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    sep, last = {"de": (", ", " und "), "fr": (", ", " et "), "es": (", ", " y "), "zh": ("、", "和")}[lang]
    return sep.join(parts[:-1]) + last + parts[-1]


def _bg_foreign(lang: str, bg: tuple) -> str:
    if bg[0] == "flat":
        c = bg[1]
        return {
            "de": f"auf {_DE_COLOURS[c][1]} Hintergrund",
            "fr": f"sur un fond {_FR_COLOURS[c][0]}",
            "es": f"sobre un fondo {_ES_COLOURS[c][0]}",
            "zh": f"{_ZH_COLOURS[c]}背景上",
        }[lang]
    a, b = bg[1], bg[2]
    fr_de = "d'" if _FR_COLOURS[a][0][0] in "aeiou" else "de "
    return {
        "de": f"auf einem Farbverlauf von {_DE_COLOURS[a][0]} zu {_DE_COLOURS[b][0]}",
        "fr": f"sur un dégradé {fr_de}{_FR_COLOURS[a][0]} à {_FR_COLOURS[b][0]}",
        "es": f"sobre un degradado de {_ES_COLOURS[a][0]} a {_ES_COLOURS[b][0]}",
        "zh": f"从{_ZH_COLOURS[a]}到{_ZH_COLOURS[b]}的渐变背景上",
    }[lang]


def caption_foreign(scene: dict, lang: str, rng: random.Random) -> str:
    """A caption in German, French, Spanish or Chinese that describes the same content."""
    kind = scene["kind"]
    if kind == "sign":
        p = scene["phrase"]
        return {
            "de": f"Ein Schild mit der Aufschrift '{p}'.",
            "fr": f"Un panneau qui indique « {p} ».",
            "es": f"Un letrero que dice «{p}».",
            "zh": f"一个写着“{p}”的标牌。",
        }[lang]
    if kind == "shapes":
        items = _join_foreign(lang, [_item_foreign(lang, s, c, n) for s, c, n, _ in scene["groups"]])
        bg = _bg_foreign(lang, scene["bg"])
        if lang == "zh":
            return rng.choice((f"{bg}有{items}。", f"图中{bg}有{items}。"))
        lead = {
            "de": ("Zu sehen: ", "Ein Bild: ", ""),
            "fr": ("Une image avec ", "Dessin simple : ", ""),
            "es": ("Una imagen con ", "Dibujo simple: ", ""),
        }[lang]
        return _cap(rng.choice(lead) + f"{items} {bg}.")
    items = _join_foreign(lang, [_item_foreign(lang, o["obj"], o.get("colour"), 1) for o in scene["objects"]])
    if lang == "zh":
        return f"图中有{items}" + ("，天上有一个黄色的太阳" if scene["sun"] else "") + "。"
    sun = {"de": " unter einer gelben Sonne", "fr": " sous un soleil jaune", "es": " bajo un sol amarillo"}[
        lang
    ]
    return _cap(items + (sun if scene["sun"] else "") + ".")


# --------------------------------------------------------------------------------------------
# Caption dirt
# --------------------------------------------------------------------------------------------


def _cp1252_caption(caption: str, rng: random.Random) -> bytes:
    """The caption with typographic characters, encoded as Windows-1252: invalid UTF-8."""
    text = rng.choice((f"“{caption}”", f"{caption} — © Café Müller", f"{caption} (naïve style, à la carte)"))
    data = text.encode("cp1252")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return data
    raise AssertionError("cp1252 caption unexpectedly valid UTF-8")  # pragma: no cover


def _near_caption(caption: str, rng: random.Random) -> str:
    """Same or slightly edited caption, as a re-upload of the same picture would carry."""
    edit = rng.randrange(4)
    if edit == 0:
        return caption
    if edit == 1:
        return caption.rstrip(".").lower()
    if edit == 2:
        return "Photo: " + caption
    return caption.replace(" and ", " & ", 1) if " and " in caption else caption + " HD"
