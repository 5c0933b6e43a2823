"""The calculator tool the chat model calls between `<|python_start|>` and `<|python_end|>`.

    >>> from nanorun.trainer.chat.calculator import calculate
    >>> calculate("12 * (3 + 4) / 2")
    '42'
    >>> calculate('"strawberry".count("r")')
    '3'
    >>> calculate("__import__('os')") is None
    True

Expressions are parsed with `ast` and evaluated by a small interpreter over an allow-list of node
types, never with `eval`: numbers, strings, `+ - * / // % **`, unary minus, parentheses, and a few
methods on string literals (`"...".count(...)`, `.upper()`, ...). There are no names, attributes
other than those methods, imports, subscripts, lambdas or comprehensions, so there is nothing to
escape to. Each step is bounded before it runs: integers stay under `MAX_INT_BITS`, strings under
`MAX_STR_LEN`, the expression under `MAX_EXPR_CHARS` and `MAX_DEPTH` levels, evaluation under
`TIME_LIMIT_S`, and the printed result under `MAX_OUTPUT_CHARS`. Anything outside the bounds is
refused (`None`), which the engine reports to the model as an empty tool output.
"""

from __future__ import annotations

import ast
import math
import operator
import time
from collections.abc import Callable
from typing import Any

MAX_EXPR_CHARS = 256
MAX_DEPTH = 24
MAX_INT_BITS = 512
MAX_STR_LEN = 1024
MAX_OUTPUT_CHARS = 128
TIME_LIMIT_S = 0.05

STRING_METHODS: dict[str, int] = {  # method -> max positional args; every argument must be a string
    "count": 1,
    "find": 1,
    "startswith": 1,
    "endswith": 1,
    "upper": 0,
    "lower": 0,
    "strip": 0,
}

BINARY_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


class Refused(ValueError):
    """The expression is outside what the calculator evaluates."""


def _check_number(value: Any) -> Any:
    if isinstance(value, bool):
        raise Refused("booleans are not numbers here")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise Refused("integer too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise Refused("result is not a finite number")
    if isinstance(value, str) and len(value) > MAX_STR_LEN:
        raise Refused("string too long")
    return value


def _bounded_pow(base: Any, exp: Any) -> Any:
    if isinstance(base, str) or isinstance(exp, str):
        raise Refused("** needs numbers")
    if isinstance(exp, int) and isinstance(base, int):
        if exp < 0:
            return _check_number(float(base) ** exp) if base != 0 else _refuse("division by zero")
        # |base|**exp has about exp * bit_length(base) bits: refuse before computing it
        if abs(base) > 1 and exp * (abs(base).bit_length() - 1) > MAX_INT_BITS:
            raise Refused("power too large")
        return base**exp
    if abs(exp) > 10_000:
        raise Refused("exponent too large")
    try:
        result = float(base) ** float(exp)
    except (OverflowError, ZeroDivisionError) as e:
        raise Refused(str(e)) from None
    if isinstance(result, complex):
        raise Refused("complex result")
    return _check_number(result)


def _refuse(reason: str) -> Any:
    raise Refused(reason)


def _binary(op: ast.operator, left: Any, right: Any) -> Any:
    fn = BINARY_OPS.get(type(op))
    if fn is None:
        raise Refused(f"operator {type(op).__name__} is not allowed")
    if fn is operator.pow:
        return _bounded_pow(left, right)
    if isinstance(left, str) or isinstance(right, str):
        if fn is operator.add and isinstance(left, str) and isinstance(right, str):
            if len(left) + len(right) > MAX_STR_LEN:
                raise Refused("string too long")
            return left + right
        if fn is operator.mul and {type(left), type(right)} == {str, int}:
            text, times = (left, right) if isinstance(left, str) else (right, left)
            if times * len(text) > MAX_STR_LEN:
                raise Refused("string too long")
            return text * times
        raise Refused("strings support only + and * by an integer")
    both_ints = isinstance(left, int) and isinstance(right, int)
    if fn is operator.mul and both_ints and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
        raise Refused("integer too large")
    try:
        return _check_number(fn(left, right))
    except (ZeroDivisionError, OverflowError) as e:
        raise Refused(str(e)) from None


class _Evaluator:
    def __init__(self) -> None:
        self.deadline = time.monotonic() + TIME_LIMIT_S

    def eval(self, node: ast.AST, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise Refused("expression nested too deeply")
        if time.monotonic() > self.deadline:
            raise Refused("time limit")
        if isinstance(node, ast.Expression):
            return self.eval(node.body, depth + 1)
        if isinstance(node, ast.Constant):
            if type(node.value) not in (int, float, str):
                raise Refused(f"constant {node.value!r} is not allowed")
            return _check_number(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = self.eval(node.operand, depth + 1)
            if isinstance(value, str):
                raise Refused("unary operator on a string")
            return -value if isinstance(node.op, ast.USub) else +value
        if isinstance(node, ast.BinOp):
            return _binary(node.op, self.eval(node.left, depth + 1), self.eval(node.right, depth + 1))
        if isinstance(node, ast.Call):
            return self.call(node, depth)
        raise Refused(f"{type(node).__name__} is not allowed")

    def call(self, node: ast.Call, depth: int) -> Any:
        func = node.func
        if not isinstance(func, ast.Attribute) or func.attr not in STRING_METHODS or node.keywords:
            raise Refused("only string methods " + ", ".join(STRING_METHODS) + " can be called")
        target = self.eval(func.value, depth + 1)
        args = [self.eval(a, depth + 1) for a in node.args]
        if not isinstance(target, str) or not all(isinstance(a, str) for a in args):
            raise Refused("string methods take strings")
        if len(args) != STRING_METHODS[func.attr]:
            raise Refused(f".{func.attr}() takes {STRING_METHODS[func.attr]} argument(s)")
        return _check_number(getattr(str, func.attr)(target, *args))


def _format(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        text = str(int(value))  # "48 / 2" -> "24", the way GSM8K's worked answers write it
    elif isinstance(value, float):
        text = repr(round(value, 10))
    else:
        text = str(value)
    if len(text) > MAX_OUTPUT_CHARS:
        raise Refused("output too long")
    return text


def evaluate(expression: str) -> str:
    """The result of `expression` as text; raises `Refused` with the reason when it is not allowed."""
    if not isinstance(expression, str):
        raise Refused("expression must be a string")
    expression = expression.strip()
    if not expression:
        raise Refused("empty expression")
    if len(expression) > MAX_EXPR_CHARS:
        raise Refused("expression too long")
    if "'" not in expression and '"' not in expression:
        expression = expression.replace(",", "")  # "1,234 * 2": thousands separators, as in GSM8K
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise Refused("not a valid expression") from None
    try:
        return _format(_Evaluator().eval(tree))
    except RecursionError:
        raise Refused("expression nested too deeply") from None


def calculate(expression: str) -> str | None:
    """The result of `expression` as text, or None when it is refused (what the engine calls)."""
    try:
        return evaluate(expression)
    except Refused:
        return None
