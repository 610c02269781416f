"""Scene description <-> caption text.

The grammar (one surface form per meaning when writing; a few synonyms accepted when reading):

    caption   := object [position] | object relation object
    object    := ("a" | "an") [size] colour shape
    position  := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"
    relation  := "above" | "below" | "to the left of" | "to the right of"

e.g. "a red circle", "a small blue square on the left", "a green triangle above a yellow circle".
``parse_caption(caption(scene)) == scene.described()`` for every scene; text outside the grammar raises a
ValueError that names the first word that does not fit.
"""
from __future__ import annotations

import re

from ldm.shapes.scene import Scene, SceneObject
from ldm.shapes.vocab import COLOURS, POSITIONS, RELATIONS, SHAPES, SIZES

POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATION_PHRASES: dict[str, str] = {
    "above": "above",
    "below": "below",
    "left of": "to the left of",
    "right of": "to the right of",
}
# accepted when parsing, besides the phrases above
_POSITION_SYNONYMS = {"in the centre": "center", "in the middle": "center", "on top": "top"}
_RELATION_SYNONYMS = {"left of": "left of", "right of": "right of", "on the left of": "left of",
                      "on the right of": "right of", "under": "below", "over": "above", "on top of": "above"}
# what may follow the first object: phrase -> (kind, meaning); the longest phrase wins
_READ_TAIL = {
    **{phrase: ("position", p) for p, phrase in POSITION_PHRASES.items()},
    **{phrase: ("position", p) for phrase, p in _POSITION_SYNONYMS.items()},
    **{phrase: ("relation", r) for r, phrase in RELATION_PHRASES.items()},
    **{phrase: ("relation", r) for phrase, r in _RELATION_SYNONYMS.items()},
}
assert set(POSITION_PHRASES) == set(POSITIONS) and set(RELATION_PHRASES) == set(RELATIONS)


def _noun_phrase(obj: SceneObject) -> str:
    words = ([obj.size] if obj.size else []) + [obj.colour, obj.shape]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def caption(scene: Scene) -> str:
    """The caption of a scene's description (its placements play no part)."""
    if not isinstance(scene, Scene):
        raise ValueError(f"scene must be a Scene, got {type(scene).__name__}")
    first = _noun_phrase(scene.objects[0])
    if scene.relation is None:
        position = scene.objects[0].position
        return f"{first} {POSITION_PHRASES[position]}" if position else first
    return f"{first} {RELATION_PHRASES[scene.relation]} {_noun_phrase(scene.objects[1])}"


class _Words:
    """A cursor over the words of a caption, for the recursive-descent parser below."""

    def __init__(self, text: str):
        self.text = text
        self.words = re.sub(r"[.!,;]+\s*$", "", text.strip().lower()).split()
        self.i = 0

    def peek(self) -> str | None:
        return self.words[self.i] if self.i < len(self.words) else None

    def take_phrase(self, phrases: dict):
        """Consume the longest phrase of ``phrases`` starting here; return its meaning (or None)."""
        for phrase in sorted(phrases, key=lambda p: -len(p.split())):
            n = len(phrase.split())
            if self.words[self.i : self.i + n] == phrase.split():
                self.i += n
                return phrases[phrase]
        return None

    def fail(self, expected: str) -> ValueError:
        found = f"{self.peek()!r} (word {self.i + 1})" if self.peek() is not None else "the end of the text"
        return ValueError(f"caption {self.text!r} is outside the shapes grammar: expected {expected}, found {found}")


def _parse_object(words: _Words) -> SceneObject:
    if words.peek() in ("a", "an"):
        words.i += 1
    size = None
    if words.peek() in SIZES:
        size = words.peek()
        words.i += 1
    colour = words.peek()
    if colour not in COLOURS:
        raise words.fail(f"a colour from {tuple(COLOURS)}")
    words.i += 1
    shape = words.peek()
    if shape not in SHAPES:
        raise words.fail(f"a shape from {SHAPES}")
    words.i += 1
    return SceneObject(colour, shape, size)


def parse_caption(text: str) -> Scene:
    """The description (``placements=None``) a caption of the shapes grammar states."""
    if not isinstance(text, str):
        raise ValueError(f"caption must be a string, got {type(text).__name__}")
    words = _Words(text)
    first = _parse_object(words)
    if words.peek() is None:
        return Scene((first,))
    tail = words.take_phrase(_READ_TAIL)
    if tail is None:
        positions, relations = tuple(POSITION_PHRASES.values()), tuple(RELATION_PHRASES.values())
        raise words.fail(f"the end, a position {positions} or a relation {relations}")
    kind, meaning = tail
    if kind == "position":
        if words.peek() is not None:
            raise words.fail("the end of the caption after a position")
        return Scene((SceneObject(first.colour, first.shape, first.size, meaning),))
    relation = meaning
    second = _parse_object(words)
    if words.peek() is not None:
        raise words.fail("the end of the caption after the second object")
    return Scene((first, second), relation)
