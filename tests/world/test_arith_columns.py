"""tinychat.world.arith.columns / worked and the worked answers built on them: every step is true, each
bracket is the bracket before with the step's last digit in front (the last step's whole value), and the last
bracket is the result."""

from __future__ import annotations

import random
import re

import pytest

from tinychat.world import arith, multistep
from tinychat.world.answers import check
from tinychat.world.entities import build_world
from tinychat.world.sft import worked_answer

STEP = re.compile(r"^(1?\d|\d+) ([-+*]) (\d+)(?: ([-+]) (\d))? = (\d+) \((\d+)\)$")


def _true_and_read_back(steps: list[str]) -> int:
    """Checks each step's arithmetic and bracket from its text and returns the number the last bracket holds."""
    so_far = ""
    for i, s in enumerate(steps):
        m = STEP.match(s.rstrip(".。"))
        assert m, s
        x, op, y, op2, z, v, bracket = m.groups()
        got = {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op]
        got = got + (int(z) if op2 == "+" else -int(z)) if op2 else got
        assert got == int(v), s
        so_far = (v if i == len(steps) - 1 else v[-1]) + so_far
        assert bracket == so_far, s
    return int(so_far)


@pytest.mark.parametrize(
    ("a", "op", "b", "steps"),
    [
        (47, "+", 26, ["7 + 6 = 13 (3)", "4 + 2 + 1 = 7 (73)"]),
        (87, "+", 45, ["7 + 5 = 12 (2)", "8 + 4 + 1 = 13 (132)"]),  # the last carry stays in the last value
        (90, "-", 77, ["10 - 7 = 3 (3)", "9 - 7 - 1 = 1 (13)"]),  # a borrowed column shows its 1 in front
        (2003, "-", 1987, ["13 - 7 = 6 (6)", "10 - 8 - 1 = 1 (16)", "10 - 9 - 1 = 0 (016)", "2 - 1 - 1 = 0 (0016)"]),
        (7, "*", 16, ["7 * 6 = 42 (2)", "7 * 1 + 4 = 11 (112)"]),
        (16, "*", 7, ["7 * 6 = 42 (2)", "7 * 1 + 4 = 11 (112)"]),
    ],
)
def test_columns_examples(a: int, op: str, b: int, steps: list[str]) -> None:
    assert arith.columns(a, op, b) == steps


def test_columns_read_back_to_the_value_for_random_problems() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        op = rng.choice("+-*")
        a, b = rng.randint(0, 10 ** rng.randint(1, 7)), rng.randint(0, 10 ** rng.randint(1, 7))
        if op == "-":
            a, b = max(a, b), min(a, b)
        if op == "*":
            b = rng.randint(0, 9)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert _true_and_read_back(arith.columns(a, op, b)) == value, (a, op, b)


@pytest.mark.parametrize(("a", "op", "b"), [(3, "-", 5), (12, "*", 13), (6, "/", 3)])
def test_columns_refuses_what_it_cannot_write(a: int, op: str, b: int) -> None:
    with pytest.raises(ValueError, match="columns"):
        arith.columns(a, op, b)


def test_every_easy_problem_has_a_worked_answer_that_grades_right() -> None:
    rng = random.Random(1)
    for p in arith.sample(rng, "easy", set(), 400):
        for lang in ("en", "zh"):
            reply = worked_answer(p, lang)
            steps = reply.split("\n")[0].split(". ") if lang == "en" else reply.split("\n")[:-1]
            assert _true_and_read_back(steps) == p.value, reply
            assert check(reply, {"answer": str(p.value), "check": "number"}), reply


def test_multistep_solutions_work_their_arithmetic_by_columns() -> None:
    w = build_world(0, "micro")
    rng = random.Random(2)
    seen = 0
    for kind in multistep.NUMERIC_KINDS:
        for _ in range(20):
            p = multistep.make(w, kind, rng, "trained")
            if p is None:
                continue
            seen += 1
            for lang in ("en", "zh"):
                lead = next(i for i, s in enumerate(p.steps[lang]) if re.match(r"^\d+ [-+] \d+[:：]", s))
                expr, first = re.split(r"[:：] ?", p.steps[lang][lead], maxsplit=1)
                assert (
                    _true_and_read_back([first, *p.steps[lang][lead + 1 :]]) == int(p.answer[lang]) == eval_expr(expr)
                )
    assert seen >= 20


def eval_expr(expr: str) -> int:
    x, op, y = expr.split()
    return int(x) + int(y) if op == "+" else int(x) - int(y)
