"""Safe calculator: whitelist, bounds, exact values vs a Fraction reference, and the tool-call protocol.

The property tests run ~10,000 generated inputs in total (random text and random arithmetic trees); they are
derandomized so CI is reproducible, and they write no example database into the repository.
"""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modern_llm.inference.tools import (
    MAX_BITS,
    MAX_EXPR_CHARS,
    CalculatorError,
    calculator_completion,
    check_calculation,
    extract_calculations,
    format_number,
    safe_eval,
    safe_eval_exact,
)

PROPERTY_SETTINGS = dict(
    deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)

# --------------------------------------------------------------------------------------------------------------
# Hand-written behaviour
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("48/2", 24),
        ("16-3-4", 9),
        ("2+3*4", 14),
        ("(2+3)*4", 20),
        ("-2**2", -4),  # ** binds tighter than unary minus, as in Python
        ("2**-1", 0.5),
        ("2**3**2", 512),  # right-associative
        ("7//2", 3),
        ("-7//2", -4),
        ("7%3", 1),
        ("-7%3", 2),
        ("0.1+0.2", 0.3),  # exact rational arithmetic, not 0.30000000000000004
        ("2-.5", 1.5),
        ("30*.25", 7.5),
        ("1,000*3", 3000),
        ("1,234,567+1", 1234568),
        ("2,500.5*2", 5001),
        ("  ( 3 )  ", 3),
        ("+5", 5),
        ("--5", 5),
        ("16**0.5", 4),
        ("10/4", 2.5),
        ("1/3", 1 / 3),
        ("9**99", 9**99),
    ],
)
def test_safe_eval_values(expr, expected):
    value = safe_eval(expr)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("expr", "found"),
    [
        ("x+1", "a name ('x')"),
        ("__import__('os')", "a function call"),
        ("abs(-3)", "a function call"),
        ("(1).real", "attribute access"),
        ("[1, 2][0]", "subscripting"),
        ("'a'*3", "a string"),
        ("1 < 2", "a comparison"),
        ("1 and 2", "a boolean operator"),
        ("1 if 1 else 2", "a conditional expression"),
        ("lambda: 1", "a lambda"),
        ("[i for i in (1, 2)]", "a comprehension"),
        ("1,2", "a comma"),
        ("12,34", "a comma"),
        ("True+1", "a boolean"),
        ("1j", "complex"),
        ("3 & 1", "operator BitAnd"),
        ("~3", "operator Invert"),
        ("not 1", "operator Not"),
        ("2 @ 3", "operator MatMult"),
        ("0x10", "plain decimal"),
        ("1_000", "plain decimal"),
        ("1e3", "plain decimal"),
        ("...", "Ellipsis"),
        ("", "empty"),
        ("   ", "empty"),
        ("1 +", "not a valid arithmetic expression"),
        ("import os", "not a valid arithmetic expression"),
        ("1\x002", "not a valid arithmetic expression"),
        ("1/0", "division by zero"),
        ("1//0", "division by zero"),
        ("5%0", "division by zero"),
        ("0**-1", "division by zero"),
        ("(-8)**(1/3)", "negative number"),
        ("2**101", "exponent"),
        ("9**9**9", "exponent"),
        ("99**99", f"{MAX_BITS} bits"),
        ("2**100*2**100*2**100*2**100*2**100", f"{MAX_BITS} bits"),
        ("9" * 200, f"{MAX_BITS} bits"),
        ("1+" * 120 + "1", "nests deeper"),
        ("-" * 200 + "1", "nests deeper"),
        ("1" * (MAX_EXPR_CHARS + 1), "characters long"),
    ],
)
def test_safe_eval_rejects_with_a_message_naming_what_was_found(expr, found):
    with pytest.raises(CalculatorError) as info:
        safe_eval(expr)
    assert found in str(info.value)


def test_calculator_error_is_a_value_error_and_non_strings_are_rejected():
    assert issubclass(CalculatorError, ValueError)
    with pytest.raises(CalculatorError, match="must be a string"):
        safe_eval(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (24, "24"),
        (-3, "-3"),
        (3.0, "3"),
        (0.5, "0.5"),
        (10 / 3, "3.3333"),
        (Fraction(2, 3), "0.6667"),
        (Fraction(-7, 2), "-3.5"),
        (Fraction(1, 8), "0.125"),
        (Fraction(1, 300000), "0.000003333"),
        (1e-7, "0.0000001"),
    ],
)
def test_format_number(value, text):
    assert format_number(value) == text


def test_format_number_rejects_non_numbers():
    with pytest.raises(TypeError):
        format_number("3")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        format_number(float("inf"))


@pytest.mark.parametrize(
    ("text", "insert"),
    [
        ("Natalia sold 48/2 = <<48/2=", "24>>"),
        ("<<16-3-4=", "9>>"),
        ("So <<10/3=", "3.3333>>"),
        ("<<1,000*3=", "3000>>"),
        ("done <<2+2=4>> then <<3*3=", "9>>"),
        ("The total is calc(3*(2+5))", " = 21"),
        ("calc(7/2)", " = 3.5"),
        ("x" * 10_000 + " <<2*3=", "6>>"),  # only the tail is scanned, wherever the span sits
        ("<<" + " " * 250 + "1=", "1>>"),
        # Not a request (or not a complete one): leave the model alone.
        ("<<48/2=24>>", None),
        ("<<48/2", None),
        ("no tool call here =", None),
        ("<<x+1=", None),  # invalid expression
        ("<<1/0=", None),
        ("<<=", None),
        ("<<a=b=", None),
        ("calc((1+2)", None),  # final ")" closes the inner group; calc( is still open
        ("calc(1+2) = 3", None),  # already answered
        ("mycalc(1+2)", None),
        ("calc(abs(2))", None),
        ("", None),
    ],
)
def test_calculator_completion(text, insert):
    assert calculator_completion(text) == insert


def test_extract_and_check_calculations():
    solution = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n"
        "It costs <<10/3=3.33>>3.33 each, <<7*8=54>> wrong, <<3/4=3/4>> and <<x=2>>.\n#### 72"
    )
    calculations = extract_calculations(solution)
    assert calculations == [
        ("48/2", "24"),
        ("48+24", "72"),
        ("10/3", "3.33"),
        ("7*8", "54"),
        ("3/4", "3/4"),
        ("x", "2"),
    ]
    assert [check_calculation(e, c) for e, c in calculations] == [True, True, True, False, True, None]
    assert check_calculation("10/3", "3.4") is False
    assert check_calculation("7/2", "3") is True  # a whole-number claim may round
    assert check_calculation("2*3", "six") is False
    assert check_calculation("1000*2", "2,000") is True


@pytest.mark.data
def test_every_gsm8k_annotation_parses_and_checks(shared_data):
    n_calculations = 0
    for split in ("train", "test"):
        for line in (shared_data / "gsm8k" / f"{split}.jsonl").read_text().splitlines():
            for expr, claimed in extract_calculations(json.loads(line)["answer"]):
                n_calculations += 1
                assert check_calculation(expr, claimed) is True, (expr, claimed)
    assert n_calculations > 20_000


# --------------------------------------------------------------------------------------------------------------
# Property tests (10,000 generated inputs in total)
# --------------------------------------------------------------------------------------------------------------

CALCULATOR_ALPHABET = list("0123456789.,+-*/%()<>= \t\nxejJ_'\"[]{}#@&|^~!:;\\") + ["calc(", "<<", "**", "//"]
random_text = st.one_of(
    st.lists(st.sampled_from(CALCULATOR_ALPHABET), max_size=60).map("".join),
    st.text(max_size=MAX_EXPR_CHARS + 20),
)


def _assert_number_or_calculator_error(expr: str) -> None:
    try:
        value = safe_eval(expr)
    except CalculatorError:
        return
    assert type(value) in (int, float)
    assert value == value and abs(value) != float("inf")


@settings(max_examples=3000, **PROPERTY_SETTINGS)
@given(random_text)
def test_random_text_gives_a_number_or_a_calculator_error(text):
    _assert_number_or_calculator_error(text)
    insert = calculator_completion(text)
    assert insert is None or isinstance(insert, str)
    for expr, claimed in extract_calculations(text):
        assert check_calculation(expr, claimed) in (True, False, None)


# Random arithmetic trees: ("num", text) | ("neg", tree) | ("op", symbol, left, right) | ("pow", base, exponent)
literals = st.one_of(
    st.integers(0, 60).map(str),
    st.sampled_from(["0.5", ".25", "1.5", "2.75", "10.0", "0.1", "1,000", "12,345"]),
)
trees = st.recursive(
    literals.map(lambda text: ("num", text)),
    lambda children: st.one_of(
        children.map(lambda child: ("neg", child)),
        st.tuples(st.just("op"), st.sampled_from(["+", "-", "*", "/", "//", "%"]), children, children),
        st.tuples(st.just("pow"), children, st.integers(-3, 4)),
    ),
    max_leaves=12,
)


class _Rejected(Exception):
    """The reference semantics say the calculator must refuse this expression."""


def _reference(tree) -> Fraction:
    """Independent exact evaluator: what safe_eval must return (or refuse) for a rendered tree."""
    kind = tree[0]
    if kind == "num":
        value = Fraction(tree[1].replace(",", ""))
    elif kind == "neg":
        value = -_reference(tree[1])
    elif kind == "pow":
        base, exponent = _reference(tree[1]), tree[2]
        if base == 0 and exponent < 0:
            raise _Rejected
        value = base**exponent
    else:
        _, symbol, left_tree, right_tree = tree
        left, right = _reference(left_tree), _reference(right_tree)
        if symbol in ("/", "//", "%") and right == 0:
            raise _Rejected
        value = {
            "+": lambda: left + right,
            "-": lambda: left - right,
            "*": lambda: left * right,
            "/": lambda: left / right,
            "//": lambda: Fraction(left // right),
            "%": lambda: left % right,
        }[symbol]()
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_BITS:
        raise _Rejected
    return value


def _render(tree) -> str:
    kind = tree[0]
    if kind == "num":
        return tree[1]
    if kind == "neg":
        return f"-({_render(tree[1])})"
    if kind == "pow":
        return f"({_render(tree[1])})**({tree[2]})"
    _, symbol, left, right = tree
    return f"({_render(left)}) {symbol} ({_render(right)})"


@settings(max_examples=5000, **PROPERTY_SETTINGS)
@given(trees)
def test_random_trees_match_the_fraction_reference(tree):
    expr = _render(tree)
    try:
        expected = _reference(tree)
    except _Rejected:
        expected = None
    if expected is None or len(expr) > MAX_EXPR_CHARS:
        with pytest.raises(CalculatorError):
            safe_eval(expr)
        return
    assert safe_eval_exact(expr) == expected
    value = safe_eval(expr)
    if expected.denominator == 1:
        assert type(value) is int and value == expected
    else:
        assert type(value) is float and value == float(expected)


@settings(max_examples=2000, **PROPERTY_SETTINGS)
@given(trees, st.sampled_from(["", "So she has ", "x = 3\n"]))
def test_inserted_results_roundtrip_through_extract_and_check(tree, prefix):
    expr = _render(tree)
    insert = calculator_completion(f"{prefix}<<{expr}=")
    try:
        safe_eval(expr)
    except CalculatorError:
        assert insert is None
        return
    assert insert is not None and insert.endswith(">>")
    completed = f"{prefix}<<{expr}={insert}"
    assert extract_calculations(completed) == [(expr, insert[:-2])]
    assert check_calculation(expr, insert[:-2]) is True
