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


def test_every_step_is_bounded_not_only_powers() -> None:
    assert evaluate("2 ** 2000 * 2 ** 2000") == 2**4000
    for expression in (
        "2 ** 4000 * 2 ** 4000",
        " * ".join(["2 ** 4000"] * 20),
        "(2 ** 3000 * 2 ** 1000) * 2 ** 1000",
        "2 ** 4096 + 2 ** 4096",
    ):
        with pytest.raises(CalculatorError, match="too large"):
            evaluate(expression)


async def test_the_calculator_tool_runs_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    import agents.tools
    from agents.tools import CALCULATOR

    threads: list[str] = []

    def recording(expression: str) -> int | float:
        threads.append(threading.current_thread().name)
        return evaluate(expression)

    monkeypatch.setattr(agents.tools, "evaluate", recording)
    assert await CALCULATOR.fn({"expression": "12 * 7"}) == 84
    assert threads and threads[0].startswith("tools") and threads[0] != "MainThread"
    # Integers past 2**53 are answered exactly, as their digits.
    assert await CALCULATOR.fn({"expression": "2 ** 100"}) == str(2**100)
    assert await CALCULATOR.fn({"expression": "-(2 ** 60)"}) == str(-(2**60))
    assert await CALCULATOR.fn({"expression": "2 ** 53"}) == 2**53
