from __future__ import annotations

import pytest

from agents.calculator import evaluate
from agents.errors import CalculatorError


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("12 * 7", 84),
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("7 / 2", 3.5),
        ("84 / 2", 42),
        ("7 // 2", 3),
        ("-7 % 3", 2),
        ("2 ** 10", 1024),
        ("2^10", 1024),
        ("3 × 4 ÷ 6", 2),
        ("-(-3)", 3),
        ("1_000 + 1", 1001),
        ("1e3 + 0.5", 1000.5),
        ("0.1 + 0.2", 0.1 + 0.2),
    ],
)
def test_evaluates(expression: str, value: float) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("", "empty"),
        ("1 / 0", "division by zero"),
        ("1 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("9 ** 9 ** 9", "too large"),
        ("10.0 ** 400", "too large"),
        ("__import__('os')", "not an arithmetic expression"),
        ("abs(-1)", "not an arithmetic expression"),
        ("x + 1", "not an arithmetic expression"),
        ("1 if 1 else 2", "not an arithmetic expression"),
        ("[1, 2]", "not an arithmetic expression"),
        ("1 +", "not an arithmetic expression"),
        ("(" * 300 + "1" + ")" * 300, "longer than"),
        ("-" * 100 + "1", "nested too deeply"),
        ("1 < 2", "not an arithmetic expression"),
        ("1e400 - 1e400", "finite"),
    ],
)
def test_refuses(expression: str, message: str) -> None:
    with pytest.raises(CalculatorError, match=message):
        evaluate(expression)
