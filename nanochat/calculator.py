"""
The calculator: the engine's tool. `<|python_start|>2*3<|python_end|>` in a generated row is evaluated
here and its result forced back into the stream. Arithmetic and a few string methods only, checked
node by node against an AST whitelist, in-process and fast (no sandbox process: nothing but the
whitelisted operations can run). Anything else is refused (None); sizes and time are bounded, so a
refusal is also what a huge power, a long string or a slow expression gets.
"""

import ast
import logging
import math
import time

logger = logging.getLogger(__name__)

_ALLOWED_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
_ALLOWED_UNARY = (ast.UAdd, ast.USub)
_STR_METHODS = {"count", "upper", "lower", "strip", "replace", "startswith", "endswith", "find", "index",
                "split", "join", "title", "capitalize", "isdigit", "isalpha"}
_FUNCTIONS = {"len": len, "abs": abs, "round": round, "min": min, "max": max, "int": int, "float": float,
              "str": str, "sum": sum}
_MAX_STR = 10_000
_MAX_INT_BITS = 4096


class _CalculatorRefusal(Exception):
    pass


def _check_size(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise _CalculatorRefusal("number too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise _CalculatorRefusal("not finite")
    if isinstance(value, str) and len(value) > _MAX_STR:
        raise _CalculatorRefusal("string too long")
    if isinstance(value, (list, tuple)):
        if len(value) > _MAX_STR:
            raise _CalculatorRefusal("list too long")
        for v in value:
            _check_size(v)
    return value


def _eval_node(node, deadline):
    if time.monotonic() > deadline:
        raise _CalculatorRefusal("time limit")
    if isinstance(node, ast.Expression):
        return _eval_node(node.body, deadline)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (int, float, str)) and not isinstance(node.value, bool):
            return _check_size(node.value)
        raise _CalculatorRefusal("constant type")
    if isinstance(node, (ast.List, ast.Tuple)):
        return _check_size([_eval_node(e, deadline) for e in node.elts])
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, _ALLOWED_UNARY):
        v = _eval_node(node.operand, deadline)
        if not isinstance(v, (int, float)):
            raise _CalculatorRefusal("unary on non-number")
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.BinOp) and isinstance(node.op, _ALLOWED_BINOPS):
        a, b = _eval_node(node.left, deadline), _eval_node(node.right, deadline)
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
        if isinstance(node.op, ast.Pow):
            if not numbers or abs(b) > 100 or (isinstance(a, int) and abs(a).bit_length() * abs(b) > _MAX_INT_BITS):
                raise _CalculatorRefusal("power too large")
        elif isinstance(node.op, ast.Mult) and not numbers:
            # "ab" * 3 is allowed, but its size is bounded before it is built
            count = b if isinstance(a, str) else a
            text = a if isinstance(a, str) else b
            if not (isinstance(text, str) and isinstance(count, int)) or len(text) * max(count, 0) > _MAX_STR:
                raise _CalculatorRefusal("string repetition")
        elif isinstance(node.op, ast.Add) and not numbers:
            if not (isinstance(a, str) and isinstance(b, str)):
                raise _CalculatorRefusal("mixed addition")
        elif not numbers:
            raise _CalculatorRefusal("arithmetic on non-numbers")
        op = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y,
              ast.Div: lambda x, y: x / y, ast.FloorDiv: lambda x, y: x // y, ast.Mod: lambda x, y: x % y,
              ast.Pow: lambda x, y: x ** y}[type(node.op)]
        return _check_size(op(a, b))
    if isinstance(node, ast.Call) and not node.keywords:
        args = [_eval_node(a, deadline) for a in node.args]
        if isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
            return _check_size(_FUNCTIONS[node.func.id](*args))
        if isinstance(node.func, ast.Attribute) and node.func.attr in _STR_METHODS:
            target = _eval_node(node.func.value, deadline)
            if not isinstance(target, str):
                raise _CalculatorRefusal("method on non-string")
            return _check_size(getattr(target, node.func.attr)(*args))
        raise _CalculatorRefusal("call")
    raise _CalculatorRefusal(type(node).__name__)


def _format_result(value):
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.10g}"
    return str(value)


def eval_calculator(expr, timeout=1.0):
    """Evaluate a calculator expression from the model's tool call. Returns the result as a string,
    or None for anything that is not plain arithmetic / whitelisted string operations, malformed,
    too big, or too slow. Integral floats print without '.0' (48/2 -> '24'), as GSM8K writes them."""
    if not isinstance(expr, str) or len(expr) > 1000:
        return None
    expr = expr.strip().replace(",", "") if _looks_numeric(expr) else expr.strip()
    if not expr:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
        value = _eval_node(tree, time.monotonic() + timeout)
    except (_CalculatorRefusal, SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError,
            RecursionError, MemoryError, AttributeError, IndexError):
        return None
    except Exception:
        # not a refusal but a bug in the calculator: say so (the engine goes on without a result)
        logger.exception("calculator failed on %r", expr)
        raise
    return _format_result(value)


def _looks_numeric(expr):
    # thousands separators ("1,200 * 3") are removed only in pure arithmetic, not inside string literals
    return all(c in "0123456789+-*/().,% " for c in expr)
