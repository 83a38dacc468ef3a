"""The calculator tool: exact arithmetic on + - * / ( ), and a refusal for everything else (never eval())."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinychat.agent.calculator import CalculatorError, calculate, evaluate, run_calculator_call


@pytest.mark.parametrize(
    ("expr", "want"),
    [
        ("17 * 23", "391"),
        ("(12 + 7) * 3", "57"),
        ("12 + 7 * 3", "33"),
        ("14560 / 28", "520"),
        ("7 / 2", "3.5"),
        ("1 / 3", "0.333333"),
        ("-5 + +3", "-2"),
        ("383 × 42", "16086"),  # the symbols people (and tinyworld questions) write
        ("14560 ÷ 28", "520"),
        ("1,234 + 1", "1235"),
        ("2.5 * 4", "10"),
        (" ( ( 1 ) ) ", "1"),
    ],
)
def test_arithmetic(expr: str, want: str) -> None:
    assert calculate(expr) == want


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('echo hi')",
        "open('/etc/passwd').read()",
        "(1).__class__",
        "x + 1",
        "2 ** 10",
        "9 ** 9 ** 9",
        "7 // 2",
        "7 % 2",
        "1 << 5",
        "True + 1",
        "'a' * 3",
        "[1, 2][0]",
        "lambda: 1",
        "[i for i in range(10)]",
        "1 if 1 else 2",
        "1 < 2",
        "1j * 2",
        "1 / 0",
        "10" + " * 10" * 60,  # the product tower grows past the size bound long before memory does
        "1" * 250,
        "",
        "1 +",
        "1e308 * 10",
    ],
)
def test_refuses_anything_but_arithmetic(expr: str) -> None:
    with pytest.raises(CalculatorError):
        evaluate(expr)


def test_exact_fractions() -> None:
    assert evaluate("1 / 3 * 3") == 1  # exact, no 0.9999
    assert evaluate("0.1 + 0.2") == Fraction(3, 10)


def test_tool_call_validity() -> None:
    assert run_calculator_call("calculator", '{"expression": "2 * 21"}') == (True, "42")
    assert run_calculator_call("calculator", {"expression": "2 * 21"}) == (True, "42")
    for name, args in [
        ("search", {"expression": "1 + 1"}),
        ("calculator", {"expr": "1 + 1"}),
        ("calculator", "not json"),
        ("calculator", {"expression": 12}),
        ("calculator", {"expression": "__import__('os')"}),
    ]:
        ok, text = run_calculator_call(name, args)
        assert not ok and text.startswith("error:"), (name, args, text)


# Random expression trees over small integers: the walker's value equals the tree's value.
_leaf = st.integers(-999, 999).map(lambda n: (str(n) if n >= 0 else f"({n})", Fraction(n)))


def _combine(children: st.SearchStrategy) -> st.SearchStrategy:
    def build(a: tuple[str, Fraction], op: str, b: tuple[str, Fraction]) -> tuple[str, Fraction]:
        value = {"+": a[1] + b[1], "-": a[1] - b[1], "*": a[1] * b[1]}[op]
        return f"({a[0]} {op} {b[0]})", value

    return st.builds(build, children, st.sampled_from("+-*"), children)


@settings(max_examples=60, deadline=None)
@given(st.recursive(_leaf, _combine, max_leaves=8))
def test_matches_tree_value(tree: tuple[str, Fraction]) -> None:
    text, value = tree
    assert evaluate(text) == value
