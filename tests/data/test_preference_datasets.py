"""Preference pairs: JSONL formats (HH-RLHF, UltraFeedback, explicit), error messages, on-policy pair building."""

from __future__ import annotations

import gzip
import json

import pytest

from modern_llm.data.preference_datasets import (
    PreferencePair,
    Sample,
    build_math_pairs,
    load_preference_jsonl,
    render_prompt,
    save_preference_jsonl,
    split_hh_pair,
)


def _write(path, rows, gz=False):
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


HH_CHOSEN = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken cross?"
HH_REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: No."


def test_hh_rlhf_transcripts_split_at_the_last_shared_assistant_turn(tmp_path):
    path = _write(tmp_path / "hh.jsonl.gz", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}], gz=True)
    (pair,) = load_preference_jsonl(path)
    assert pair.prompt == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke"},
    ]
    assert pair.chosen == "Why did the chicken cross?"
    assert pair.rejected == "No."
    # the plain rendering reproduces the original transcript exactly
    assert render_prompt(pair.prompt, None, chat=False) + " " + pair.chosen == HH_CHOSEN


def test_hh_pair_whose_completions_share_a_prefix():
    # both answers start with "Sure" -> the prompt must still end at the Assistant marker
    prompt, c, r = split_hh_pair(
        "\n\nHuman: q\n\nAssistant: Sure, yes", "\n\nHuman: q\n\nAssistant: Sure, no", "x:1"
    )
    assert prompt == [{"role": "user", "content": "q"}]
    assert (c, r) == ("Sure, yes", "Sure, no")


def test_ultrafeedback_format(tmp_path):
    row = {
        "prompt": "What is 2+2?",
        "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}],
        "score_chosen": 9.0,
    }
    (pair,) = load_preference_jsonl(_write(tmp_path / "uf.jsonl", [row]))
    assert pair.prompt == [{"role": "user", "content": "What is 2+2?"}]
    assert (pair.chosen, pair.rejected) == ("4", "5")


def test_explicit_and_conversational_forms_and_roundtrip(tmp_path):
    rows = [
        {"prompt": "Q: 1+1\nA:", "chosen": " 2", "rejected": " 3"},
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}],
        },
    ]
    pairs = load_preference_jsonl(_write(tmp_path / "x.jsonl", rows))
    assert pairs[0] == PreferencePair("Q: 1+1\nA:", " 2", " 3")
    assert pairs[1].prompt == [{"role": "user", "content": "hi"}] and pairs[1].chosen == "hello"
    again = load_preference_jsonl(save_preference_jsonl(pairs, tmp_path / "out.jsonl"))
    assert again == pairs


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('{"chosen": "a"}', "missing field"),
        ('{"chosen": "no markers", "rejected": "at all"}', "Assistant"),
        (
            '{"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user"}]}',
            "role",
        ),
        (
            '{"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]}',
            "assistant",
        ),
        ("[1, 2]", "JSON object"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path = _write(tmp_path / "bad.jsonl", [good, "", line])
    with pytest.raises(ValueError, match=message) as err:
        load_preference_jsonl(path)
    assert f"{path}:3" in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_preference_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no preference pairs"):
        load_preference_jsonl(_write(tmp_path / "empty.jsonl", [""]))


def test_real_hh_rlhf_harmless_base_test_file(shared_data):
    path = shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    pairs = load_preference_jsonl(path)
    assert len(pairs) == 2312  # SOURCE.md
    assert all(isinstance(p.prompt, list) and p.prompt[-1]["role"] == "user" for p in pairs)
    assert pairs[0].prompt[0]["content"] == "what are some pranks with a pen i can do?"
    assert sum(p.chosen != p.rejected for p in pairs) > 2300


def test_chat_rendering_uses_the_template():
    from modern_llm.data.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["hello world"] * 20, 300)
    text = render_prompt([{"role": "user", "content": "hi"}], tok, chat=True)
    assert text == "<|endoftext|><|user|>\nhi<|end|>\n<|assistant|>\n"
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        render_prompt([{"role": "user", "content": "hi"}], tok, chat=True)


def _s(text, correct, finish="eos"):
    return Sample(text, None, correct, finish)


def test_build_math_pairs_chosen_correct_rejected_incorrect():
    samples = [
        [_s("a1", True), _s("a2", False), _s("a3", False), _s("a1", True)],  # mixed
        [_s("b1", True), _s("b2", True)],  # all correct -> no pair
        [_s("c1", False), _s("c2", False)],  # all wrong -> no pair
        [_s("d1", True, "length"), _s("d2", False)],  # the only correct one was truncated -> no pair
    ]
    pairs, stats = build_math_pairs(["p0", "p1", "p2", "p3"], samples, max_pairs_per_question=3, seed=0)
    assert {p.prompt for p in pairs} == {"p0"}
    assert all(p.chosen == "a1" and p.rejected in {"a2", "a3"} for p in pairs)
    assert len(pairs) == 2  # two distinct rejected texts, duplicates of "a1" collapse
    assert stats.n_with_pair == 1 and stats.n_all_correct == 1 and stats.n_all_wrong == 1
    assert stats.sample_accuracy == pytest.approx(5 / 10)
    again, _ = build_math_pairs(["p0", "p1", "p2", "p3"], samples, max_pairs_per_question=3, seed=0)
    assert again == pairs  # deterministic
    with pytest.raises(ValueError, match="max_pairs_per_question"):
        build_math_pairs(["p"], [[]], max_pairs_per_question=0)


def test_strict_pairs_drop_lucky_guesses_as_chosen():
    # "8 - 9 = 1" reaches the right answer 1 through a wrong step: a lucky guess, never chosen under strict
    lucky = Sample("8 - 9 = 1\n#### 1", "1", True, "eos", steps_ok=False)
    sound = Sample("10 - 9 = 1\n#### 1", "1", True, "eos", steps_ok=True)
    unchecked = Sample("#### 1", "1", True, "eos", steps_ok=None)
    wrong = Sample("10 - 9 = 2\n#### 2", "2", False, "eos", steps_ok=False)
    loose, _ = build_math_pairs(["p"], [[lucky, wrong]], max_pairs_per_question=2, seed=0)
    assert [p.chosen for p in loose] == [lucky.text]
    strict, stats = build_math_pairs(["p"], [[lucky, wrong]], max_pairs_per_question=2, seed=0, strict=True)
    assert strict == [] and stats.n_with_pair == 0
    strict, _ = build_math_pairs(["p"], [[lucky, sound, unchecked, wrong]], 4, seed=0, strict=True)
    assert {p.chosen for p in strict} == {sound.text, unchecked.text}


def test_sampled_solutions_carry_the_step_check():
    from types import SimpleNamespace

    from modern_llm.data.preference_datasets import _graded
    from modern_llm.data.task_datasets import get_task

    task = get_task("arithmetic")
    example = SimpleNamespace(answer="1")
    graded = _graded(
        task, example, SimpleNamespace(text="She has 8 - 9 = 1 left.\n#### 1", finish_reason="eos")
    )
    assert graded.correct and graded.steps_ok is False and not graded.is_good(strict=True)
    assert graded.is_good(strict=False)


def test_gold_fallback_pairs_the_reference_with_wrong_samples_only_where_nothing_is_good():
    samples = [
        [_s("a1", True), _s("a2", False)],  # has a correct sample: gold not used
        [_s("c1", False), _s("c2", False)],  # all wrong: gold becomes chosen
        [_s("b1", True), _s("b2", True)],  # all correct: still no pair (nothing to reject)
    ]
    gold = ["gold0", "gold1", "gold2"]
    pairs, stats = build_math_pairs(["p0", "p1", "p2"], samples, 2, seed=0, gold=gold)
    by_prompt = {}
    for p in pairs:
        by_prompt.setdefault(p.prompt, []).append(p)
    assert [p.chosen for p in by_prompt["p0"]] == ["a1"] and "chosen" not in by_prompt["p0"][0].meta
    assert {p.chosen for p in by_prompt["p1"]} == {"gold1"}
    assert {p.rejected for p in by_prompt["p1"]} == {"c1", "c2"}
    assert all(p.meta["chosen"] == "gold" for p in by_prompt["p1"]) and "p2" not in by_prompt
    assert stats.n_gold_pairs == 2 and stats.n_pairs == 3 and stats.n_with_pair == 2
    without, plain = build_math_pairs(["p0", "p1", "p2"], samples, 2, seed=0)
    assert len(without) == 1 and plain.n_gold_pairs == 0
    with pytest.raises(ValueError, match="gold solutions"):
        build_math_pairs(["p0", "p1"], samples[:2], 2, gold=["only one"])
