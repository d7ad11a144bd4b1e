"""The tests' own rule, read from their code: no test sleeps to let broker time pass (it moves
the broker's clock), and every wait for real asynchrony goes through `eventually`."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

TESTS = Path(__file__).resolve().parent
MAX_SLEEP = 0.1  # seconds: a pause between polls or to let threads interleave, never a wait
POLLING_HELPERS = TESTS / "support.py"  # where `eventually` lives


def is_sleep(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name == "sleep"


def literal_seconds(call: ast.Call) -> float | None:
    """The sleep's duration when the code spells it as a number."""
    if call.args and isinstance(call.args[0], ast.Constant):
        value = call.args[0].value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def long_sleeps(source: str, filename: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if is_sleep(node):
            assert isinstance(node, ast.Call)
            seconds = literal_seconds(node)
            if seconds is not None and seconds > MAX_SLEEP:
                found.append(f"line {node.lineno}: sleep({seconds:g})")
    return found


def hand_rolled_waits(source: str, filename: str) -> list[str]:
    return [
        f"line {loop.lineno}: a while loop that sleeps"
        for loop in ast.walk(ast.parse(source, filename=filename))
        if isinstance(loop, ast.While) and any(is_sleep(n) for n in ast.walk(loop))
    ]


def offences(check: Callable[[str, str], list[str]], skip: Path | None = None) -> list[str]:
    return [
        f"{path.name} {offence}"
        for path in sorted(TESTS.glob("*.py"))
        if path != skip
        for offence in check(path.read_text(), str(path))
    ]


def test_no_test_sleeps_longer_than_a_tenth_of_a_second() -> None:
    assert offences(long_sleeps) == []


def test_waits_for_real_asynchrony_go_through_eventually() -> None:
    assert offences(hand_rolled_waits, skip=POLLING_HELPERS) == []


def test_the_checks_catch_what_they_are_for() -> None:
    source = (
        "import time, asyncio\n"
        "from time import sleep\n"
        "time.sleep(1.2)\n"
        "sleep(2)\n"
        "async def f():\n"
        "    await asyncio.sleep(0.5)\n"
        "time.sleep(0.05)\n"
        "while True:\n"
        "    time.sleep(0.01)\n"
    )
    assert long_sleeps(source, "example.py") == [
        "line 3: sleep(1.2)",
        "line 4: sleep(2)",
        "line 6: sleep(0.5)",
    ]
    assert hand_rolled_waits(source, "example.py") == ["line 8: a while loop that sleeps"]
