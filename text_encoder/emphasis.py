"""Prompt emphasis syntax of AUTOMATIC1111's stable-diffusion-webui: text -> [(piece, weight), ...].

    parse_emphasis("a (red:1.5) cat")   ->  [("a ", 1.0), ("red", 1.5), (" cat", 1.0)]

Grammar (webui ``modules/prompt_parser.py``, ``parse_prompt_attention``, v1.7+ which allows spaces around the
explicit weight):

    (text)         weight x 1.1                  ((text)) -> 1.1 * 1.1, nesting multiplies
    [text]         weight / 1.1 (x 1/1.1)
    (text:1.3)     weight x 1.3; spaces allowed: "(text : 1.3 )"; sign allowed: "(text:-1)"
    \\( \\) \\[ \\] \\\\   literal ( ) [ ] \\      a lone backslash before anything else is dropped
    BREAK          (upper case, a whole word) ends the current 75-token chunk; see text_encoder.prompts
    anything else  text; a ":" that does not start a weight is text

Unbalanced brackets as the webui: a stray ")" or "]" is literal text; a "(" or "[" never closed applies to
everything after it (unclosed "(" first, then unclosed "[", each in opening order); ":1.3)" with no "(" open is
literal text. A closer only closes its own kind: in "(a [b:2)" the ":2)" closes the "(", and the "[" stays open.

Weights are products of floats taken in the webui's order (a piece is multiplied when each enclosing bracket
closes, innermost first), so they match it to the last bit: "a (((house:1.3))" gives house
1.0 * 1.3 * 1.1 * 1.1 == 1.5730000000000004. Adjacent pieces with equal weights are merged (float equality) as
the webui does, which decides how the text is cut for tokenization ("a(b:1)c" is the one word "abc"); empty
pieces are kept where the webui keeps them.

One deliberate difference: the webui marks BREAK with the weight -1 and then lets enclosing brackets multiply
that marker, so "(a BREAK b)" there encodes the word "break" with weight -1.1 instead of breaking. Here BREAK is
the sentinel object ``BREAK`` (``("BREAK", -1.0)``, test with ``piece is BREAK``), which brackets never scale and
merging never touches, so BREAK breaks wherever it stands. Text that merely reads "BREAK" with weight -1 (only
reachable with contrived input such as "(BRE()AK:-1)") is a different object and stays text.

A malformed explicit weight (``"(x:1.2.3)"``, ``"(x:.)"``) raises ValueError; the webui fails there too.
"""
from __future__ import annotations

import re

ROUND_MULTIPLIER = 1.1  # (text)
SQUARE_MULTIPLIER = 1 / 1.1  # [text]

BREAK: tuple[str, float] = ("BREAK", -1.0)  # the chunk-break sentinel; compare with `is`, not `==`

# One token of the emphasis grammar per match; alternatives are tried in this order.
_TOKEN = re.compile(
    r"""
      \\(?P<escaped>[()\[\]\\]?)            # \( \) \[ \] \\ -> that character; a lone \ -> nothing
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)      # ":1.3)" closes the innermost "(" with an explicit weight
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)             # plain text up to the next special character, or a lone ":"
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")  # the keyword eats the whitespace around it


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Prompt text -> [(piece, weight), ...] with BREAK sentinels; at least one entry (``[("", 1.0)]`` if empty).

    Concatenating the pieces (without the sentinels) gives the prompt without its emphasis markup.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")

    pieces: list[list | tuple] = []  # [piece, weight] (mutable while brackets close) or the BREAK sentinel
    open_round: list[int] = []  # index into pieces where each still-open "(" started
    open_square: list[int] = []

    def scale(start: int, multiplier: float) -> None:
        for p in pieces[start:]:
            if p is not BREAK:
                p[1] *= multiplier

    def add_text(s: str) -> None:
        for i, part in enumerate(_BREAK.split(s)):
            if i > 0:
                pieces.append(BREAK)
            pieces.append([part, 1.0])

    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        if kind == "escaped":
            pieces.append([m["escaped"], 1.0])
        elif kind == "open":
            (open_round if m["open"] == "(" else open_square).append(len(pieces))
        elif kind == "weight" and open_round:
            scale(open_round.pop(), _weight(m["weight"], text))
        elif kind == "close" and m["close"] == ")" and open_round:
            scale(open_round.pop(), ROUND_MULTIPLIER)
        elif kind == "close" and m["close"] == "]" and open_square:
            scale(open_square.pop(), SQUARE_MULTIPLIER)
        else:  # text, a stray closer, or ":1.3)" with no "(" open: all literal
            add_text(m[0])

    for start in open_round:  # unclosed brackets reach to the end of the prompt
        scale(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale(start, SQUARE_MULTIPLIER)

    merged: list[list | tuple] = []
    for p in pieces:
        prev = merged[-1] if merged else None
        if p is not BREAK and prev is not None and prev is not BREAK and prev[1] == p[1]:
            prev[0] += p[0]
        else:
            merged.append(p)
    if not merged:
        return [("", 1.0)]
    return [p if p is BREAK else (p[0], p[1]) for p in merged]


def _weight(s: str, text: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise ValueError(f"emphasis weight {s!r} in prompt {text!r} is not a number; write e.g. (word:1.3)") from None
