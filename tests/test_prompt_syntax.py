"""The A1111 prompt parser against A1111's own documented examples (its docstrings)."""

from __future__ import annotations

import pytest

from sdkit.prompt_syntax import entry_at, has_syntax, parse_attention, schedule


def _close(got, want):
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want])


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("unbalanced)", [("unbalanced)", 1.0)]),
        ("[unbalanced", [("unbalanced", 1 / 1.1)]),
        ("unbalanced]", [("unbalanced]", 1.0)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.573),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ],
        ),
        ("(abc:1.2:3)", [("abc:1.2", 3.0)]),
        ("(abc: 1.5 )", [("abc", 1.5)]),
        ("a:1.5) b", [("a:1.5) b", 1.0)]),
        ("((a)[b])", [("a", 1.21), ("b", 1.0)]),
        ("", [("", 1.0)]),
        ("a \\\\ b", [("a \\ b", 1.0)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("(a BREAK b:2)", [("a", 2.0), ("BREAK", -1.0), ("b", 2.0)]),
        ("BREAKFAST", [("BREAKFAST", 1.0)]),
    ],
)
def test_parse_attention_matches_a1111(text, want):
    _close(parse_attention(text), want)


def _g(prompt, steps=10):
    return [list(x) for x in schedule(prompt, steps)]


@pytest.mark.parametrize(
    ("prompt", "want"),
    [
        ("test", [[10, "test"]]),
        ("a [b:3]", [[3, "a "], [10, "a b"]]),
        ("a [b: 3]", [[3, "a "], [10, "a b"]]),
        ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
        ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
        ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
        ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
        ("a [unbalanced", [[10, "a [unbalanced"]]),
        ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
        ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
        ("[a|(b:1.1)]", [[i, "a" if i % 2 else "(b:1.1)"] for i in range(1, 11)]),
        ("[fe|]male", [[i, "female" if i % 2 else "male"] for i in range(1, 11)]),
        ("[fe|||]male", [[i, "female" if i % 4 == 1 else "male"] for i in range(1, 11)]),
        ("a [b:c:0.25] d", [[2, "a b d"], [10, "a c d"]]),
        ("a [b::4] c", [[4, "a b c"], [10, "a  c"]]),
        ("a | b [c:2]", [[10, "a | b [c:2]"]]),  # `|` outside brackets: unreadable, kept
        ("a [b:c:20]", [[10, "a b"]]),  # beyond the last step: never switches
        ("(masterpiece:1.2) cat", [[10, "(masterpiece:1.2) cat"]]),
    ],
)
def test_schedule_matches_a1111(prompt, want):
    assert _g(prompt) == want


def test_fantasy_landscape_comment_example():
    p = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
    )
    assert _g(p, 100) == [
        [25, "fantasy landscape with a mountain and an oak in foreground shoddy"],
        [50, "fantasy landscape with a lake and an oak in foreground in background shoddy"],
        [60, "fantasy landscape with a lake and an oak in foreground in background masterful"],
        [75, "fantasy landscape with a lake and an oak in background masterful"],
        [100, "fantasy landscape with a lake and a christmas tree in background masterful"],
    ]


def test_decimal_when_rules():
    # current A1111: "1.0" is a fraction (all steps); old timelines: step 1
    assert _g("[a:b:1.0]") == [[10, "a"]]
    assert [list(x) for x in schedule("[a:b:1.0]", 10, old_timelines=True)] == [
        [1, "a"],
        [10, "b"],
    ]


def test_entry_at_uses_a1111s_zero_based_steps():
    ends = [3, 10]
    assert [entry_at(ends, i) for i in range(6)] == [0, 0, 0, 0, 1, 1]
    alt = list(range(1, 11))
    assert [entry_at(alt, i) for i in range(4)] == [0, 0, 1, 2]


@pytest.mark.parametrize(
    ("prompt", "syntax"),
    [
        ("a red circle on a blue background", False),
        ("photo: a cat, 4k", False),
        ("a (red) circle", True),
        ("a [red:blue:2] circle", True),
        ("a [red|blue] circle", True),
        ("a BREAK b", True),
        ("\\(literal\\)", True),
        ("", False),
    ],
)
def test_has_syntax(prompt, syntax):
    assert has_syntax(prompt, 20) is syntax
