"""
The calculator tool: plain arithmetic and a few string methods give GSM8K-style answers; anything else
is refused with None, fast; a bug inside it is logged, not lost.
"""

import logging
import time

import pytest

from nanochat import calculator
from nanochat.calculator import eval_calculator


@pytest.mark.parametrize("expr, expected", [
    ("48/2", "24"), ("0.2*50", "10"), ("12/60", "0.2"), ("2+3*4", "14"), ("(1+2)**3", "27"),
    ("7//2", "3"), ("7 % 3", "1"), ("-5+2", "-3"), ("1,200*3", "3600"),
    ('"strawberry".count("r")', "3"), ("len('hello')", "5"), ("'abc'.upper()", "ABC"),
    ("'ABC'.lower()", "abc"), ("max(3, 9, 4)", "9"),
])
def test_calculator_evaluates_arithmetic_and_string_ops(expr, expected):
    assert eval_calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')", "open('/etc/passwd').read()", "().__class__.__base__",
    "'a'.__class__", "x + 1", "lambda: 1", "[i for i in range(10)]", "9**9**9", "2**100000",
    "'a' * 10**9", "'abc'.format(1)", "1/0", "", "import os", "exec('1')", "getattr('a', 'upper')()",
])
def test_calculator_refuses_anything_else(expr):
    assert eval_calculator(expr) is None


def test_calculator_is_fast():
    start = time.perf_counter()
    for _ in range(200):
        assert eval_calculator("123*456 + 'strawberry'.count('r')") == str(123 * 456 + 3)
    assert time.perf_counter() - start < 1.0


def test_an_unexpected_error_inside_the_calculator_is_logged_and_raised(monkeypatch, caplog):
    def broken(value):
        raise KeyError("a bug")
    monkeypatch.setattr(calculator, "_check_size", broken)
    with caplog.at_level(logging.ERROR, logger="nanochat.calculator"):
        with pytest.raises(KeyError):
            eval_calculator("1+2")
    assert "calculator failed on '1+2'" in caplog.text
    assert "KeyError" in caplog.text
    # a refusal is not an error: nothing logged
    caplog.clear()
    monkeypatch.undo()
    assert eval_calculator("__import__('os')") is None
    assert caplog.text == ""
