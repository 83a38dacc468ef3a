"""The calculator tool, evaluated safely: an AST walker over numbers and + - * / ( ), never eval().

Why a walker and not eval(): the expression comes from model output, i.e. from whoever wrote the prompt.
eval() of it (even with empty builtins) reaches attributes, comprehensions and `**` towers that hang the
process; the walker accepts a whitelist of node types and nothing else, computes exactly with Fraction,
and bounds the size of every intermediate number, so no input can run long or use much memory.
"""

from __future__ import annotations

import ast
import json
from fractions import Fraction
from typing import Any

MAX_CHARS = 200  # longer "expressions" are not arithmetic a calculator tool is asked for
MAX_NODES = 64
MAX_DIGITS = 40  # bound on numerators/denominators: a product tower cannot grow without limit
_SYMBOLS = str.maketrans({"×": "*", "÷": "/", "−": "-", "（": "(", "）": ")", "，": ","})


class CalculatorError(ValueError):
    """The expression is not plain arithmetic, or cannot be evaluated (division by zero, too large)."""


def _check_size(x: Fraction) -> Fraction:
    if max(abs(x.numerator), x.denominator).bit_length() > MAX_DIGITS * 3.33:
        raise CalculatorError("number too large")
    return x


def _walk(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _walk(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # bool is not arithmetic
        return _check_size(Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        v = _walk(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div):
        a, b = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Add):
            return _check_size(a + b)
        if isinstance(node.op, ast.Sub):
            return _check_size(a - b)
        if isinstance(node.op, ast.Mult):
            return _check_size(a * b)
        if b == 0:
            raise CalculatorError("division by zero")
        return _check_size(a / b)
    raise CalculatorError(f"not allowed in arithmetic: {type(node).__name__}")


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression; CalculatorError for anything else."""
    if not isinstance(expression, str):
        raise CalculatorError(f"expression must be a string, got {type(expression).__name__}")
    text = expression.translate(_SYMBOLS).replace(",", "").strip()  # "1,234" is a thousands separator here
    if not text or len(text) > MAX_CHARS:
        raise CalculatorError(f"expression must have 1 to {MAX_CHARS} characters")
    if "**" in text or "//" in text:
        raise CalculatorError("only + - * / and parentheses are allowed")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError) as e:
        raise CalculatorError(f"not an arithmetic expression: {e.__class__.__name__}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError("expression too long")
    return _walk(tree)


def format_number(x: Fraction) -> str:
    """Integers as digits ("16086"); other values as a decimal with up to 6 places, trailing zeros cut."""
    if x.denominator == 1:
        return str(x.numerator)
    s = f"{float(x):.6f}".rstrip("0").rstrip(".")
    return s if s not in ("-0", "") else "0"


def calculate(expression: str) -> str:
    """The tool's reply text: the result as digits (what the SFT data's tool results look like)."""
    return format_number(evaluate(expression))


def run_calculator_call(name: str, arguments: str | dict[str, Any]) -> tuple[bool, str]:
    """(valid, tool result text) for one parsed call; an invalid call gets an "error: ..." result.

    Valid means: the function is `calculator`, arguments are an object with a string "expression",
    and the calculator accepts that expression.
    """
    if name != "calculator":
        return False, f"error: unknown tool {name!r}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return False, "error: arguments are not JSON"
    if not isinstance(arguments, dict) or not isinstance(arguments.get("expression"), str):
        return False, 'error: arguments must be {"expression": "..."}'
    try:
        return True, calculate(arguments["expression"])
    except CalculatorError as e:
        return False, f"error: {e}"
