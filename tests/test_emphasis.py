"""text_encoder.emphasis against the webui's documented examples and hand-derived weights.

Expected weights are written as the product the webui forms (a piece is multiplied as each enclosing bracket
closes, innermost first; unclosed "(" then unclosed "[" at the end), so float equality is exact.
"""
from __future__ import annotations

import pytest

from text_encoder.emphasis import BREAK, parse_emphasis

R = 1.1  # (x)
S = 1 / 1.1  # [x]


@pytest.mark.parametrize(
    "text, expected",
    [
        # the webui's own doctests (modules/prompt_parser.py)
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
             (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
        ),  # fmt: skip
        # the brief's examples
        ("a (red:1.5) cat", [("a ", 1.0), ("red", 1.5), (" cat", 1.0)]),
        ("((x))", [("x", 1.1 * 1.1)]),
        ("[x]", [("x", 1 / 1.1)]),
        ("[[x]]", [("x", S * S)]),
        ("\\(x\\)", [("(x)", 1.0)]),
        ("\\[x\\]", [("[x]", 1.0)]),
        ("(a [b] c:2)", [("a ", 2.0), ("b", S * 2.0), (" c", 2.0)]),
        ("([x])", [("x", S * R)]),
        ("[(x)]", [("x", R * S)]),
        # explicit weights: spaces, signs, leading dot; a ":" not followed by a number and ")" is text
        ("(x: 1.5 )", [("x", 1.5)]),
        ("(x:-1)", [("x", -1.0)]),
        ("(x:.5)", [("x", 0.5)]),
        ("(a:b)", [("a:b", 1.1)]),
        ("(a:2", [("a:2", 1.1)]),  # no ")" after the number: text, and the "(" stays open
        ("a:b", [("a:b", 1.0)]),
        ("[x:2]", [("x:2", S)]),  # an explicit weight only closes "("
        # unbalanced brackets
        ("a) b]", [("a) b]", 1.0)]),  # stray closers are literal
        ("x:1.5) y", [("x:1.5) y", 1.0)]),  # explicit weight with no "(" open: literal
        ("a (b c", [("a ", 1.0), ("b c", 1.1)]),  # unclosed "(" applies to the rest
        ("a [b", [("a ", 1.0), ("b", S)]),
        ("(a [b", [("a ", R), ("b", R * S)]),  # at the end: unclosed "(" first, then "["
        ("[a (b:2)", [("a ", S), ("b", 2.0 * S)]),
        ("(a [b:2)", [("a ", 2.0), ("b", 2.0 * S)]),  # ":2)" closes the "(", the "[" stays open
        ("(a)) b", [("a", 1.1), (") b", 1.0)]),
        # escapes and backslashes
        ("\\\\", [("\\", 1.0)]),
        ("a \\ b", [("a  b", 1.0)]),  # a lone backslash is dropped
        ("(a)\\((b)", [("a", 1.1), ("(", 1.0), ("b", 1.1)]),
        ("(a)\\(b)", [("a", 1.1), ("(b)", 1.0)]),  # the escaped "(" opens nothing, so ")" is a stray closer
        ("(a)\\x(b)", [("a", 1.1), ("x", 1.0), ("b", 1.1)]),  # "\x": the backslash goes, x stays
        # empty input and empty brackets
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
        ("a () b", [("a  b", 1.0)]),
    ],
)
def test_parse(text, expected):
    out = parse_emphasis(text)
    assert out == expected
    assert all(type(t) is str and type(w) is float for t, w in out)


def test_adjacent_equal_weights_merge():
    assert parse_emphasis("(a)(b)") == [("ab", 1.1)]
    assert parse_emphasis("a(b:1)c") == [("abc", 1.0)]  # one piece, so tokenized as the word "abc" (as the webui)
    assert parse_emphasis("(a)((b))") == [("a", 1.1), ("b", 1.1 * 1.1)]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),  # the keyword eats the whitespace around it
        ("a\nBREAK\n b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("BREAK a", [("", 1.0), BREAK, ("a", 1.0)]),
        ("a BREAK", [("a", 1.0), BREAK, ("", 1.0)]),
        ("a BREAK BREAK b", [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # brackets do not scale the sentinel (webui: -1.1)
        ("(x:-1) BREAK (y:-1)", [("x", -1.0), ("", 1.0), BREAK, ("", 1.0), ("y", -1.0)]),
    ],
)
def test_break(text, expected):
    out = parse_emphasis(text)
    assert out == expected
    assert [p is BREAK for p in out] == [p is BREAK for p in expected]


@pytest.mark.parametrize("text", ["aBREAKb", "break", "Break", "BREAKS", "(BREAK_)"])
def test_break_is_only_the_upper_case_word(text):
    assert all(p is not BREAK for p in parse_emphasis(text))


def test_text_spelling_break_with_weight_minus_one_is_not_a_break():
    out = parse_emphasis("(BRE()AK:-1)")  # "BRE" + "" + "AK" merge into a text piece "BREAK" of weight -1
    assert out == [("BREAK", -1.0)] and out[0] is not BREAK


@pytest.mark.parametrize("text", ["(x:1.2.3)", "(x:.)", "(x:..)"])
def test_malformed_weight_raises(text):
    with pytest.raises(ValueError, match="weight"):
        parse_emphasis(text)


@pytest.mark.parametrize("bad", [None, 3, b"a (b)", ["a"]])
def test_non_string_raises(bad):
    with pytest.raises(ValueError, match="text must be a str"):
        parse_emphasis(bad)
