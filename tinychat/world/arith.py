"""Arithmetic problems: easy ones a small model should learn to answer, hard ones it should hand to a tool.

Why two levels: a 6M-parameter model can learn two-digit addition from text but not 3-digit multiplication,
so "easy" problems are answered directly and "hard" ones go through the calculator tool. A problem is
identified by its canonical expression; problems chosen for evaluation are excluded from every training
file, pretraining included (see `Problem.key` and splits.Reserved).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tinychat.world.facts import Lang

# Byte for byte the spec of tinychat.agent.builtin.calculator, so a trained prompt is the served one.
CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression with + - * / and parentheses and return the exact result.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example: 17 * 23"}},
            "required": ["expression"],
            "additionalProperties": False,
        },
    },
}


@dataclass(frozen=True)
class Problem:
    expr: str  # canonical, calculator-ready: "17 * 23", "(12 + 7) * 3"
    value: int  # what the calculator tool returns, as digits
    level: str  # "easy" | "hard"
    a: int = 0
    b: int = 0
    op: str = ""  # "+", "-", "*", "/" for two-operand problems; "" for compound expressions

    @property
    def key(self) -> str:
        return self.expr


def easy(rng: random.Random) -> Problem:
    kind = rng.choice("++--*")
    if kind == "+":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return Problem(f"{a} + {b}", a + b, "easy", a, b, "+")
    if kind == "-":
        a = rng.randint(10, 99)
        b = rng.randint(1, a)
        return Problem(f"{a} - {b}", a - b, "easy", a, b, "-")
    a, b = rng.randint(2, 9), rng.randint(2, 19)
    return Problem(f"{a} * {b}", a * b, "easy", a, b, "*")


def hard(rng: random.Random) -> Problem:
    kind = rng.choice(("*", "*", "+", "-", "/", "()"))
    if kind == "*":
        a, b = rng.randint(13, 999), rng.randint(13, 99)
        return Problem(f"{a} * {b}", a * b, "hard", a, b, "*")
    if kind == "+":
        a, b = rng.randint(1000, 9999), rng.randint(1000, 9999)
        return Problem(f"{a} + {b}", a + b, "hard", a, b, "+")
    if kind == "-":
        a = rng.randint(1000, 9999)
        b = rng.randint(100, a)
        return Problem(f"{a} - {b}", a - b, "hard", a, b, "-")
    if kind == "/":
        b, q = rng.randint(3, 40), rng.randint(12, 999)
        return Problem(f"{b * q} / {b}", q, "hard", b * q, b, "/")
    a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(3, 30)
    return Problem(f"({a} + {b}) * {c}", (a + b) * c, "hard")


def sample(rng: random.Random, level: str, exclude: set[str], n: int, seen: set[str] | None = None) -> list[Problem]:
    """n distinct problems of a level, none of whose keys is in `exclude` (nor repeated)."""
    gen = easy if level == "easy" else hard
    seen = set() if seen is None else seen
    out: list[Problem] = []
    for _ in range(n * 50):
        if len(out) == n:
            break
        p = gen(rng)
        if p.key in exclude or p.key in seen:
            continue
        seen.add(p.key)
        out.append(p)
    return out


def columns(a: int, op: str, b: int) -> list[str]:
    """Written arithmetic, one column a step from the units up: the steps a worked answer shows before its result.

    Why (docs/speedrun.md, round 25): the tiny model answers an easy sum directly only after ~900 drill steps, but
    learns these steps in ~250. Each step is a one-digit fact with the carry or borrow of the step before, then
    in brackets the result so far: the step's last digit in front of the bracket before (the last step puts its
    whole value there), so the answer is the last bracket, leading zeros dropped. "+": "7 + 6 = 13 (3)",
    "4 + 2 + 1 = 7 (73)" (47 + 26 = 73). "-" (a >= b): "10 - 7 = 3 (3)", "9 - 7 - 1 = 1 (13)" (90 - 77 = 13; a
    borrowed column shows its 1 in front). "*" (b of one digit, a of any): "7 * 6 = 42 (2)", "7 * 1 + 4 = 11 (112)"
    (16 * 7 = 112; the factor with more digits is taken by columns).
    Why the brackets (round 33): without them the answer is read back from the steps right to left, which the
    2-digit drill teaches for two columns only; a year's four columns read back wrong ("1942 + 40" worked right,
    then "Answer: 1996"), 2 of 60 such problems on one seed. Copying the bracket before with one digit in front is
    the same small step at every length: 33 of 60 after the same anneal.
    """
    if op == "*":
        if b >= 10 and a < 10:
            a, b = b, a
        if b >= 10:
            raise ValueError(f"columns multiplies by one digit only, not {a} * {b}")
    elif op == "-" and a < b:
        raise ValueError(f"columns subtracts a smaller number only, not {a} - {b}")
    elif op not in "+-":
        raise ValueError(f"columns does + - * only, not {op!r}")
    da, db = [int(c) for c in reversed(str(a))], [int(c) for c in reversed(str(b))]
    steps: list[str] = []
    values: list[int] = []  # each step's value, for the brackets
    carry = 0
    for i in range(max(len(da), len(db)) if op == "+" else len(da)):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        if op == "+":
            s = x + y + carry
            steps.append(f"{x} + {y} = {s}" if i == 0 else f"{x} + {y} + {carry} = {s}")
            carry = s // 10
        elif op == "-":
            borrow = int(x - y - carry < 0)
            left = f"1{x}" if borrow else f"{x}"
            s = 10 * borrow + x - y - carry
            steps.append(f"{left} - {y} = {s}" if i == 0 else f"{left} - {y} - {carry} = {s}")
            carry = borrow
        else:
            s = x * b + carry
            steps.append(f"{b} * {x} = {s}" if i == 0 else f"{b} * {x} + {carry} = {s}")
            carry = s // 10
        values.append(s)
    so_far = ""
    for i, v in enumerate(values):
        so_far = (str(v) if i == len(values) - 1 else str(v % 10)) + so_far  # a last carry stays whole: 8 + 4 + 1 = 13
        steps[i] += f" ({so_far})"
    return steps


def step_facts() -> set[str]:
    """The easy problems that worked answers state as steps: one digit with one digit ("7 * 6"), and a borrowed
    column ("13 - 7"). The eval sets leave them out, since every worked answer teaches them (evalsets._arith)."""
    out = {f"{a} {op} {b}" for a in range(10) for b in range(10) for op in "+*"}
    return out | {f"{a} - {b}" for a in range(20) for b in range(10) if b <= a}


def worked(a: int, op: str, b: int, lang: Lang, lead: bool = False) -> list[str]:
    """The column steps of a + b, a - b or a * b as sentences of `lang` ("7 + 6 = 13." / "7 + 6 = 13。").
    lead: the first step names the problem ("1987 - 1923: 7 - 3 = 4."), for a solution whose numbers come from
    earlier steps rather than from the question (multistep's)."""
    end, colon = (".", ": ") if lang == "en" else ("。", "：")
    steps = [s + end for s in columns(a, op, b)]
    if lead:
        steps[0] = f"{a} {op} {b}{colon}{steps[0]}"
    return steps


_SYMBOL = {"*": "×", "/": "÷"}
_Q_EN = ("What is {e}?", "Calculate {e}.", "Compute {e}.", "How much is {e}?", "What does {e} equal?")
_Q_ZH = ("{e}等于多少？", "计算{e}。", "请算一下{e}。", "{e}是多少？", "{e}的结果是多少？")
_WORDS_EN = {
    "+": "What is the sum of {a} and {b}?",
    "-": "What is {a} minus {b}?",
    "*": "What is {a} times {b}?",
    "/": "What is {a} divided by {b}?",
}
_WORDS_ZH = {
    "+": "{a}加{b}等于多少？",
    "-": "{a}减{b}等于多少？",
    "*": "{a}乘以{b}等于多少？",
    "/": "{a}除以{b}等于多少？",
}


def display(p: Problem, rng: random.Random) -> str:
    """The expression as a person might type it: ASCII operators or × and ÷."""
    if rng.random() < 0.5:
        return p.expr
    return "".join(_SYMBOL.get(ch, ch) for ch in p.expr)


def question(p: Problem, lang: Lang, rng: random.Random) -> str:
    if p.op and rng.random() < 0.3:
        return (_WORDS_EN if lang == "en" else _WORDS_ZH)[p.op].format(a=p.a, b=p.b)
    return rng.choice(_Q_EN if lang == "en" else _Q_ZH).format(e=display(p, rng))


_TEXT_EN = (
    "{e} = {v}",
    "{a} plus {b} equals {v}.",
    "{a} minus {b} equals {v}.",
    "{a} times {b} is {v}.",
    "{a} divided by {b} is {v}.",
)
_TEXT_ZH = ("{e} = {v}", "{a}加{b}等于{v}。", "{a}减{b}等于{v}。", "{a}乘以{b}等于{v}。", "{a}除以{b}等于{v}。")
_OP_IDX = {"+": 1, "-": 2, "*": 3, "/": 4}
_STORY_EN = {
    "+": "A baker made {a} loaves in the morning and {b} more in the afternoon, so there were {v} loaves in all.",
    "-": "A library had {a} books and lent out {b}, so {v} books were left on the shelves.",
    "*": "There are {a} boxes with {b} apples in each box, which makes {v} apples.",
    "/": "{a} sweets shared equally among {b} children gives each child {v} sweets.",
}
_STORY_ZH = {
    "+": "面包师上午做了{a}个面包，下午又做了{b}个，一共有{v}个面包。",
    "-": "图书馆原有{a}本书，借出了{b}本，还剩{v}本。",
    "*": "有{a}个箱子，每个箱子里有{b}个苹果，一共有{v}个苹果。",
    "/": "把{a}颗糖平均分给{b}个孩子，每个孩子得到{v}颗。",
}


def text_line(p: Problem, lang: Lang, rng: random.Random) -> str:
    """One pretraining line stating the problem and its result."""
    if not p.op:
        return f"{display(p, rng)} = {p.value}"
    r = rng.random()
    if r < 0.15:
        return (_STORY_EN if lang == "en" else _STORY_ZH)[p.op].format(a=p.a, b=p.b, v=p.value)
    table = _TEXT_EN if lang == "en" else _TEXT_ZH
    tmpl = table[0] if r < 0.6 else table[_OP_IDX[p.op]]
    return tmpl.format(e=display(p, rng), a=p.a, b=p.b, v=p.value)
