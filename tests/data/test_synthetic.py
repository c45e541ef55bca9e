"""Synthetic arithmetic problems: determinism, correct annotations (re-checked by the calculator), knobs, CLI."""

from __future__ import annotations

import json
import random
import re

import pytest

from modern_llm.data.synthetic import answer_from_solution, generate_dataset, main, make_problem
from modern_llm.inference.tools import check_calculation, extract_calculations, safe_eval

ALL_SETTINGS = [
    dict(n_steps=(1, 3), max_operand=10, ops=("+", "-", "*")),
    dict(n_steps=(4, 8), max_operand=1000, ops=("+", "-", "*", "/")),
    dict(n_steps=5, max_operand=2, ops=("*", "/", "-")),
    dict(n_steps=6, max_operand=50, ops=("+",)),
    dict(n_steps=6, max_operand=50, ops=("*",)),
]


def test_same_seed_same_data_and_prefix_stability():
    a = generate_dataset(50, seed=7)
    assert a == generate_dataset(50, seed=7)
    assert a[:20] == generate_dataset(20, seed=7)  # problem i does not depend on n
    assert a != generate_dataset(50, seed=8)
    assert len({p["question"] for p in a}) > 45


def test_make_problem_uses_only_the_given_rng():
    first = make_problem(random.Random(3), 4, 30)
    random.seed(12345)  # the global RNG must not matter
    assert make_problem(random.Random(3), 4, 30) == first
    assert set(first) == {"question", "solution", "answer", "n_steps"}


@pytest.mark.parametrize("settings", ALL_SETTINGS)
def test_every_calculation_is_correct_and_chains_to_the_answer(settings):
    for problem in generate_dataset(300, seed=1, **settings):
        calculations = extract_calculations(problem["solution"])
        assert len(calculations) == problem["n_steps"]
        previous_result = None
        for expr, claimed in calculations:
            assert check_calculation(expr, claimed) is True, (expr, claimed)
            value = safe_eval(expr)
            assert isinstance(value, int) and value >= 1  # integers only, never negative (or zero)
            assert str(value) == claimed
            left_operand = int(re.match(r"\d+", expr).group(0))
            if previous_result is not None:
                assert left_operand == previous_result  # each step continues from the last total
            previous_result = value
            assert expr[len(str(left_operand))] in settings["ops"]
        assert problem["answer"] == str(previous_result)
        assert answer_from_solution(problem["solution"]) == problem["answer"]
        assert problem["solution"].splitlines()[-1] == f"#### {problem['answer']}"


def test_difficulty_knobs():
    easy = generate_dataset(200, n_steps=(1, 2), max_operand=10, seed=0)
    hard = generate_dataset(200, n_steps=(6, 8), max_operand=1000, seed=0)
    easy_steps = [len(extract_calculations(p["solution"])) for p in easy]
    hard_steps = [len(extract_calculations(p["solution"])) for p in hard]
    assert set(easy_steps) == {1, 2} and set(hard_steps) == {6, 7, 8}
    assert max(int(p["answer"]) for p in easy) < max(int(p["answer"]) for p in hard)
    fixed = generate_dataset(30, n_steps=5, seed=0)
    assert all(p["n_steps"] == 5 for p in fixed)


def test_operands_respect_max_operand():
    for problem in generate_dataset(200, n_steps=(1, 6), max_operand=9, seed=4):
        for expr, _ in extract_calculations(problem["solution"]):
            _, op, operand = re.fullmatch(r"(\d+)([-+*/])(\d+)", expr).groups()
            assert 1 <= int(operand) <= 9
            if op in "*/":
                assert 2 <= int(operand) <= 3  # multipliers/divisors up to isqrt(max_operand)


def test_questions_read_like_word_problems():
    for problem in generate_dataset(50, seed=2):
        question = problem["question"]
        assert question.endswith("?")
        assert "{" not in question and "{" not in problem["solution"]  # every template slot was filled
        assert not re.search(r"\b1 (marbles|stickers|coins|books)\b", question)  # singular for a count of 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n_steps=0), "n_steps"),
        (dict(n_steps=(3, 2)), "n_steps"),
        (dict(max_operand=1), "max_operand"),
        (dict(ops=("-", "/")), "'\\+' or '\\*'"),
        (dict(ops=("+", "^")), "subset"),
    ],
)
def test_bad_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_dataset(3, **kwargs)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("a\nb\n#### 72", "72"),
        ("#### 2,125\n", "2125"),
        ("x #### 1 #### -4 ", "-4"),
        ("#### 5\nextra text", "5"),
        ("no marker", None),
        ("####   ", None),
    ],
)
def test_answer_from_solution(text, answer):
    assert answer_from_solution(text) == answer


def test_cli_writes_jsonl(tmp_path, capsys):
    out = tmp_path / "sub" / "synth.jsonl"
    assert main(["--n", "5", "--min-steps", "2", "--max-steps", "3", "--ops", "+-", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == generate_dataset(5, (2, 3), 20, 0, ("+", "-"))
    with pytest.raises(SystemExit):
        main(["--ops", "/"])
    assert "'+' or '*'" in capsys.readouterr().err
