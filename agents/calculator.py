"""Safe arithmetic: the expression is parsed and walked, never evaluated as code."""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable
from typing import Final

from agents.errors import CalculatorError

MAX_EXPRESSION_CHARS: Final = 256
MAX_DEPTH: Final = 64
#: Largest integer, in bits, of the result and of every step towards it; keeps
#: ``9**9**9`` (or a long product of large powers) from eating the server.  With at
#: most 256 characters, that bounds the whole evaluation to a few hundred operations
#: on numbers of at most this size: microseconds.
MAX_INT_BITS: Final = 4096

Number = int | float

_BINARY: Final[dict[type[ast.operator], Callable[[Number, Number], Number]]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: Final[dict[type[ast.unaryop], Callable[[Number], Number]]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_ALIASES: Final = (("×", "*"), ("÷", "/"), ("−", "-"), ("^", "**"))
_ALLOWED_CHARS: Final = re.compile(r"[0-9+\-*/%().\s_eE]*")


def evaluate(expression: str) -> Number:
    """Evaluate an arithmetic expression: numbers, ``+ - * / // % **`` (or ``^``), parentheses.

    Raises:
        CalculatorError: anything else, a division by zero, or a result too large.
    """
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("the expression is empty")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    text = expression.strip()
    for alias, op in _ALIASES:
        text = text.replace(alias, op)
    if not _ALLOWED_CHARS.fullmatch(text):
        raise CalculatorError(f"not an arithmetic expression: {expression!r}")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from exc
    value = _eval(tree.body, 0)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CalculatorError("the result is not a finite number")
        if value.is_integer() and abs(value) < 2**53:
            return int(value)
    return value


def _eval(node: ast.expr, depth: int) -> Number:
    if depth > MAX_DEPTH:
        raise CalculatorError("the expression is nested too deeply")
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise CalculatorError(f"not a number: {node.value!r}")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand, depth + 1))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left = _eval(node.left, depth + 1)
        right = _eval(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        elif isinstance(node.op, ast.Mult):
            _check_product(left, right)
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError as exc:
            raise CalculatorError("division by zero") from exc
        except OverflowError as exc:
            raise CalculatorError("the result is too large") from exc
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise CalculatorError("the result is too large")
        return value
    raise CalculatorError(f"unsupported syntax: {ast.unparse(node)!r}")


def _check_product(left: Number, right: Number) -> None:
    # Checked before multiplying: the product of two big integers is not even computed.
    if (
        isinstance(left, int)
        and isinstance(right, int)
        and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1
    ):
        raise CalculatorError("the result is too large")


def _check_power(base: Number, exponent: Number) -> None:
    if base == 0 and exponent < 0:
        raise CalculatorError("division by zero")
    magnitude = abs(base)
    if magnitude > 1 and abs(exponent) * math.log2(magnitude) > MAX_INT_BITS:
        raise CalculatorError("the result is too large")
