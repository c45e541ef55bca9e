"""A safe calculator tool for generation, and helpers to re-check calculator annotations in solutions.

Design choices
- No eval/exec, ever. ``safe_eval`` parses with ``ast.parse(mode="eval")`` and walks a whitelist: numeric
  literals written in plain decimal ("12", "1.5", ".5"), unary + and -, binary + - * / // % **, and
  parentheses. Anything else (names, attributes, calls, subscripts, comparisons, strings, comprehensions,
  lambdas, tuples, hex/underscore/exponent literals, complex numbers, ...) raises ``CalculatorError`` naming it.
- Exact arithmetic: every value is a ``fractions.Fraction`` until the end, so "0.1+0.2" is exactly 0.3 and
  "48/2" is the int 24. The result is an ``int`` when it is whole, else the nearest ``float``. Only a power
  with a fractional exponent ("16**0.5") goes through floating point.
- Always bounded, so model output can never hang the engine or exhaust memory: input <= MAX_EXPR_CHARS
  characters, AST depth <= MAX_AST_DEPTH, integer exponents |e| <= MAX_EXPONENT, and every literal and
  intermediate result has numerator and denominator of at most MAX_BITS bits (~120 decimal digits); a power
  is rejected *before* computing it when its result would exceed that. Division/modulo by zero, 0 to a
  negative power and fractional powers of negative numbers are CalculatorErrors too.
- Thousands separators are accepted when well-formed ("1,000*3" == 3000): commas must split digits into groups
  of three. Any other comma is an error, since the calculator has no tuples or function arguments.
- ``%`` is Python's modulo (not percent), as in the GSM8K calculator annotations' Python-like syntax.

Tool-call protocol (what the generation engine does with ``calculator_completion``)
- GSM8K style: when the generated text ends with an open ``<<expr=`` span, the engine force-inserts the result
  followed by ``>>`` (e.g. "... 48/2=<<48/2=" -> insert "24>>"). The model then continues after the span.
- Function style: when the text ends with a complete ``calc(expr)``, the engine inserts " = <result>".
- If the expression is invalid the function returns None and the model's own continuation stands.
- Footgun: call it after every generated token. If the tokenizer emits "=" fused with later characters
  (e.g. a token "=2"), the text never ends at "=" and no result is inserted for that span.
- Results are formatted by ``format_number`` from the exact value: whole numbers without ".0", others rounded
  to ROUND_DECIMALS decimals with trailing zeros removed ("10/3" -> "3.3333", "1/8" -> "0.125"), never in
  scientific notation, so every inserted result is itself a valid calculator literal.
"""

from __future__ import annotations

import ast
import math
import re
import warnings
from fractions import Fraction

MAX_EXPR_CHARS = 256
MAX_AST_DEPTH = 100
MAX_EXPONENT = 100
MAX_BITS = 400
ROUND_DECIMALS = 4


class CalculatorError(ValueError):
    """The expression is not one the calculator accepts, or its value is undefined or too large."""


# ---------------------------------------------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------------------------------------------

# A run of digits split by commas into groups of three, not touching other digits, dots or commas.
_THOUSANDS_RE = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])")
_PLAIN_DECIMAL_RE = re.compile(r"\d+(?:\.\d*)?|\.\d+")

_BINARY_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
_UNARY_OPS = (ast.UAdd, ast.USub)

# Human-readable names for the node types people (and models) most often try; others use the class name.
_NODE_DESCRIPTIONS = {
    ast.Name: "a name",
    ast.Attribute: "attribute access",
    ast.Call: "a function call",
    ast.Subscript: "subscripting",
    ast.Compare: "a comparison",
    ast.BoolOp: "a boolean operator",
    ast.IfExp: "a conditional expression",
    ast.Lambda: "a lambda",
    ast.Tuple: "a comma (tuple)",
    ast.List: "a list",
    ast.Dict: "a dict",
    ast.Set: "a set",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a comprehension",
    ast.JoinedStr: "an f-string",
    ast.Starred: "a starred expression",
    ast.NamedExpr: "an assignment expression",
}


def _normalize_source(expr: str) -> str:
    if not isinstance(expr, str):
        raise CalculatorError(f"expression must be a string, got {type(expr).__name__}")
    if len(expr) > MAX_EXPR_CHARS:
        raise CalculatorError(f"expression is {len(expr)} characters long; the limit is {MAX_EXPR_CHARS}")
    source = expr.strip()
    if not source:
        raise CalculatorError("empty expression")
    return _THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", ""), source)


def _parse(source: str) -> ast.expr:
    try:
        with warnings.catch_warnings():  # e.g. SyntaxWarning for "1 is 1": we reject those trees anyway
            warnings.simplefilter("ignore")
            tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError, OverflowError) as error:
        # ValueError: null bytes on some Python versions; RecursionError/MemoryError: parser limits.
        detail = getattr(error, "msg", None) or type(error).__name__
        raise CalculatorError(f"not a valid arithmetic expression ({detail}): {source!r}") from None
    return tree.body


def _check_depth(root: ast.expr) -> None:
    """Reject trees deeper than MAX_AST_DEPTH, iteratively, so evaluation's recursion is bounded."""
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_AST_DEPTH:
            raise CalculatorError(f"expression nests deeper than {MAX_AST_DEPTH} operations")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _describe(node: ast.AST, source: str) -> str:
    if isinstance(node, ast.Constant):
        kind = {
            str: "a string",
            bytes: "a bytes literal",
            bool: "a boolean",
            complex: "a complex number",
        }.get(type(node.value), f"the literal {node.value!r}")
    else:
        kind = _NODE_DESCRIPTIONS.get(type(node), f"a {type(node).__name__} node")
    segment = ast.get_source_segment(source, node)
    return f"{kind} ({segment!r})" if segment else kind


# ---------------------------------------------------------------------------------------------------------------
# Exact evaluation
# ---------------------------------------------------------------------------------------------------------------


def _check_size(value: Fraction) -> Fraction:
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_BITS:
        raise CalculatorError(f"a value exceeds {MAX_BITS} bits (about {int(MAX_BITS * 0.30103)} digits)")
    return value


def _literal(node: ast.Constant, source: str) -> Fraction:
    segment = ast.get_source_segment(source, node) or ""
    # Only plain decimals: rejects 0x10, 1_000, 1e400, 1j and bools (which ast also reports as Constants).
    if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
        raise CalculatorError(f"{_describe(node, source)} is not allowed; only numbers are")
    if not _PLAIN_DECIMAL_RE.fullmatch(segment):
        raise CalculatorError(f"number literal {segment!r} must be written in plain decimal digits")
    return _check_size(Fraction(segment))  # from the text, so "0.1" is exactly 1/10


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {float(exponent):g} is outside the allowed range +-{MAX_EXPONENT}")
    if base == 0 and exponent < 0:
        raise CalculatorError("division by zero (0 raised to a negative power)")
    if exponent.denominator == 1:
        n = abs(exponent.numerator)
        # |base**n| has at least n*(bits(base)-1)+1 bits. Refuse when that is already too many, so huge powers
        # are never allocated; otherwise the result has at most MAX_BITS + n bits and is checked exactly.
        if n * max(base.numerator.bit_length(), base.denominator.bit_length()) > MAX_BITS + n:
            raise CalculatorError(f"power result would exceed {MAX_BITS} bits")
        return _check_size(base**exponent.numerator)
    if base < 0:
        raise CalculatorError("a fractional power of a negative number is not a real number")
    try:
        result = math.pow(float(base), float(exponent))
    except OverflowError:
        raise CalculatorError("power result is too large") from None
    return _check_size(Fraction(result))


def _binary(op: ast.operator, left: Fraction, right: Fraction) -> Fraction:
    if isinstance(op, ast.Pow):
        return _power(left, right)
    if isinstance(op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
        raise CalculatorError("division by zero")
    if isinstance(op, ast.Add):
        return _check_size(left + right)
    if isinstance(op, ast.Sub):
        return _check_size(left - right)
    if isinstance(op, ast.Mult):
        return _check_size(left * right)
    if isinstance(op, ast.Div):
        return _check_size(left / right)
    if isinstance(op, ast.FloorDiv):
        return _check_size(Fraction(left // right))
    return _check_size(left % right)  # ast.Mod: sign follows the divisor, as in Python


def _evaluate(node: ast.expr, source: str) -> Fraction:
    if isinstance(node, ast.Constant):
        return _literal(node, source)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, _UNARY_OPS):
        operand = _evaluate(node.operand, source)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and isinstance(node.op, _BINARY_OPS):
        # Evaluate left to right, like Python, so the first error reported is the leftmost one.
        left = _evaluate(node.left, source)
        right = _evaluate(node.right, source)
        return _binary(node.op, left, right)
    if isinstance(node, (ast.UnaryOp, ast.BinOp)):
        symbol = type(node.op).__name__
        raise CalculatorError(
            f"operator {symbol} is not allowed in {_describe(node, source)}; use + - * / // % **"
        )
    raise CalculatorError(f"{_describe(node, source)} is not allowed; only numbers, + - * / // % ** and ()")


def safe_eval_exact(expr: str) -> Fraction:
    """Exact rational value of an arithmetic expression; raises CalculatorError for anything else."""
    source = _normalize_source(expr)
    root = _parse(source)
    _check_depth(root)
    return _evaluate(root, source)


def safe_eval(expr: str) -> int | float:
    """Value of an arithmetic expression: int when whole, else float. Raises CalculatorError, nothing else."""
    value = safe_eval_exact(expr)
    if value.denominator == 1:
        return value.numerator
    return float(value)


# ---------------------------------------------------------------------------------------------------------------
# Formatting and the tool-call protocol
# ---------------------------------------------------------------------------------------------------------------


def _fraction_to_decimal_text(value: Fraction, decimals: int) -> str:
    """Exact decimal text of ``value`` (whose denominator divides 10**decimals), trailing zeros removed."""
    scaled = value * 10**decimals
    sign = "-" if scaled < 0 else ""
    digits = str(abs(scaled.numerator)).rjust(decimals + 1, "0")
    whole, fraction = digits[: len(digits) - decimals], digits[len(digits) - decimals :].rstrip("0")
    return f"{sign}{whole}.{fraction}" if fraction else f"{sign}{whole}"


def format_number(value: int | float | Fraction) -> str:
    """Text a calculator writes back: "24", "-3", "0.5", "3.3333" (ROUND_DECIMALS places, no trailing zeros).

    Rounding is exact (half-to-even on the true value), so ``check_calculation(expr, format_number(...))``
    always holds. Values smaller than the rounding step keep ROUND_DECIMALS significant digits instead of
    becoming "0" ("1/300000" -> "0.000003333"). Never uses scientific notation, so the text parses again.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
        raise TypeError(f"format_number expects an int, float or Fraction, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"format_number: cannot format {value}")
    exact = Fraction(value)  # a float's exact binary value; rounding below hides its representation error
    if exact.denominator == 1:
        return str(exact.numerator)
    decimals = ROUND_DECIMALS
    while round(exact, decimals) == 0:  # tiny value: move to its first significant digit
        decimals += 1
    decimals += ROUND_DECIMALS - 1 if decimals > ROUND_DECIMALS else 0
    return _fraction_to_decimal_text(round(exact, decimals), decimals)


_CALC_CALL_RE = re.compile(r"(?<![\w.])calc\(")


def _open_gsm8k_span(text: str) -> str | None:
    """Expression of a trailing ``<<expr=`` span, or None when the text does not end with one."""
    if not text.endswith("="):
        return None
    # Only the tail can hold a valid span (the expression is at most MAX_EXPR_CHARS), so the cost per call
    # stays constant however long the generated text grows.
    start = text.rfind("<<", max(0, len(text) - MAX_EXPR_CHARS - 3))
    if start == -1:
        return None
    span = text[start + 2 : -1]
    if ">>" in span or "=" in span or not span.strip():
        return None
    return span


def _closed_calc_call(text: str) -> str | None:
    """Argument of a trailing, balanced ``calc(expr)``, or None."""
    if not text.endswith(")"):
        return None
    matches = list(_CALC_CALL_RE.finditer(text, max(0, len(text) - MAX_EXPR_CHARS - 8)))
    if not matches:
        return None
    inner = text[matches[-1].end() : -1]
    depth = 0
    for char in inner:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:  # the final ")" closes something opened inside, not calc( itself
            return None
    return inner if depth == 0 and inner.strip() else None


def calculator_completion(text: str) -> str | None:
    """Text to force-insert after ``text`` if it ends with a calculator request, else None.

    "... <<48/2=" -> "24>>";  "... calc(3*(2+5))" -> " = 21";  invalid expression or no request -> None.
    """
    expr = _open_gsm8k_span(text)
    if expr is not None:
        suffix, prefix = ">>", ""
    else:
        expr = _closed_calc_call(text)
        if expr is None:
            return None
        suffix, prefix = "", " = "
    try:
        value = safe_eval_exact(expr)
    except CalculatorError:
        return None
    return f"{prefix}{format_number(value)}{suffix}"


# ---------------------------------------------------------------------------------------------------------------
# Re-checking annotated solutions (error analysis)
# ---------------------------------------------------------------------------------------------------------------

_ANNOTATION_RE = re.compile(r"<<([^<>=]*)=([^<>=]*)>>")


def extract_calculations(text: str) -> list[tuple[str, str]]:
    """Every ``<<expr=result>>`` annotation in ``text`` as (expr, claimed result) strings, in order."""
    return [(m.group(1).strip(), m.group(2).strip()) for m in _ANNOTATION_RE.finditer(text)]


def check_calculation(expr: str, claimed: str) -> bool | None:
    """Whether ``claimed`` is the value of ``expr``, up to rounding at the claimed precision.

    "10/3" vs "3.33" is correct (0.005 tolerance for 2 decimals), vs "3.3" correct, vs "3.4" wrong; "7/2" vs
    "3" is correct too (a whole-number claim may round). A claim that is not a number is wrong. Returns None
    when ``expr`` itself is not a valid expression (nothing to check against).
    """
    try:
        value = safe_eval_exact(expr)
    except CalculatorError:
        return None
    try:
        claimed_value = safe_eval_exact(claimed)
    except CalculatorError:
        return False
    decimals_match = re.fullmatch(r"-?[\d,]*\.(\d+)", claimed.strip())
    if decimals_match is None and re.fullmatch(r"-?[\d,]+\.?", claimed.strip()) is None:
        return value == claimed_value  # e.g. a claimed fraction "3/4": must be exact
    decimals = len(decimals_match.group(1)) if decimals_match else 0
    return abs(value - claimed_value) <= Fraction(1, 2 * 10**decimals)
