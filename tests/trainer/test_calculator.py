"""The calculator sandbox: arithmetic and string counting work; known escape attempts are refused
before anything large is computed and leave the process unharmed."""

from __future__ import annotations

import os
import sys
import threading
import tracemalloc

import pytest
from nanorun.trainer.chat.calculator import MAX_OUTPUT_CHARS, Refused, calculate, evaluate


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", "7"),
        ("12 * (3 + 4) / 2", "42"),
        ("7 / 2", "3.5"),
        ("7 // 2", "3"),
        ("-7 % 3", "2"),
        ("2 ** 10", "1024"),
        ("1,234 * 2", "2468"),
        ("10 / 3", "3.3333333333"),
        ("0.1 + 0.2", "0.3"),
        ('"strawberry".count("r")', "3"),
        ("'banana'.count('an')", "2"),
        ('"Hello".upper()', "HELLO"),
        ('"ab" * 3', "ababab"),
        ('"abc".find("c")', "2"),
        ("2 ** -1", "0.5"),
        ("2.5 ** 2", "6.25"),
    ],
)
def test_arithmetic_and_string_counting_are_evaluated(expression, expected):
    assert calculate(expression) == expected


ESCAPES = [
    # names, builtins and imports
    "__import__('os').system('echo pwned')",
    "__builtins__",
    "open('/etc/passwd').read()",
    "eval('1+1')",
    "exec('import os')",
    "globals()",
    "len('abc')",
    "import os",
    "x",
    "x := 1",
    # attribute and dunder access
    "().__class__.__bases__[0].__subclasses__()",
    "''.__class__.__mro__[1].__subclasses__()",
    "'a'.__class__",
    "(1).__class__",
    "'abc'.format(1)",
    "'{0.__class__}'.format(1)",
    "'a'.join(['b'])",
    "'x'.count.__self__",
    "'abc'.count('a', 0)",
    "'abc'.count(x='a')",
    # lambdas, comprehensions, containers, subscripts
    "(lambda: 1)()",
    "[x for x in range(10)]",
    "{x: 1 for x in 'ab'}",
    "(x for x in 'ab')",
    "[1, 2, 3]",
    "(1, 2)",
    "{'a': 1}",
    "'abc'[0]",
    "1 if 1 else 2",
    "1 < 2",
    "not 1",
    "True + 1",
    "None",
    "...",
    "b'bytes'",
    "1j * 1j",
    "f'{1}'",
    # resource exhaustion: huge numbers, deep nesting, long strings
    "9 ** 9 ** 9",
    "2 ** 100000000",
    "10 ** 10 ** 10",
    "(-2) ** 99999999",
    "99999999999999999999 ** 30",
    "2 ** 511 * 2 ** 511",
    "1e308 * 10",
    "1e308 ** 2",
    "10.0 ** 400",
    "(" * 200 + "1" + ")" * 200,
    "-" * 250 + "1",
    "1" + "+1" * 200,
    "'a' * 10 ** 9",
    "'ab' * 100000",
    "'" + "a" * 300 + "'",
    "1" * 300,
    "2 ** 600",
    "1 / 0",
    "1 % 0",
    "0 ** -1",
    "(-8) ** 0.5",
    "",
    "   ",
    "1 +",
    "\x00",
]


# What evaluating any refused expression may allocate: parsing the deepest one takes about 110 KiB,
# while computing any of the huge values refused above would take from 200 KB ('ab' * 100000) to
# gigabytes. Measured with tracemalloc, which counts allocations whatever the machine's load.
PEAK_BYTES = 160 * 1024


@pytest.mark.parametrize("expression", ESCAPES)
def test_escape_attempts_are_refused_without_harm(expression, tmp_path):
    threads_before = threading.active_count()
    tracemalloc.start()
    try:
        assert calculate(expression) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"{peak} bytes: the value was computed before it was refused"
    # the process is unharmed: no new threads, builtins intact, the working directory untouched
    assert threading.active_count() == threads_before
    assert __builtins__ is not None and callable(len) and sys.modules["os"] is os
    assert calculate("2 + 2") == "4"


def test_refusal_says_why():
    with pytest.raises(Refused, match="too large"):
        evaluate("2 ** 100000000")
    with pytest.raises(Refused, match="Name is not allowed"):
        evaluate("x + 1")
    with pytest.raises(Refused, match="Lambda is not allowed"):
        evaluate("(lambda: 1) + 1")


def test_results_longer_than_the_output_limit_are_refused():
    digits = "9" * (MAX_OUTPUT_CHARS // 2 + 1)
    assert calculate(f"{digits} * {digits}") is None
    assert calculate("9" * 10 + " * 2") == str(9_999_999_999 * 2)


def test_non_string_input_is_refused():
    assert calculate(None) is None  # type: ignore[arg-type]
    assert calculate(42) is None  # type: ignore[arg-type]
