"""Error analysis on hand-written examples: every category of every task, plus the step checker's guards."""

from __future__ import annotations

import json

import pytest

from modern_llm.evaluation import analysis as an
from modern_llm.utils.records import read_record

# ---------------------------------------------------------------------------------------------------------------
# SST-2
# ---------------------------------------------------------------------------------------------------------------

SST2 = [
    ({"sentence": "a charming and often affecting journey .", "label": 1}, 1, "correct"),
    ({"sentence": "this is not a good movie .", "label": 0}, "positive", "negation"),
    ({"sentence": "the plot does n't hold together .", "label": 0}, 1, "negation"),
    ({"sentence": "beautiful to look at , but empty inside .", "label": 0}, 1, "contrast"),
    ({"sentence": "a total bore from start to finish .", "label": 0}, "Sentiment: positive", "other"),
    ({"sentence": "not bad , but not great either .", "label": 0}, 1, "negation"),  # negation wins
    ({"sentence": "never boring for a second .", "label": 1}, 1, "correct"),
    ({"text": "an utter delight .", "label": "positive"}, "maybe?", "unparsed"),
]


def test_sst2_every_category_and_rates():
    examples, preds, expected = zip(*SST2)
    result = an.analyze_sst2(list(examples), list(preds), k=1)
    assert result["counts"] == {"correct": 2, "negation": 3, "contrast": 1, "other": 1, "unparsed": 1}
    assert sum(result["counts"].values()) == result["n"] == 8
    # examples are kept per category, capped at k, in input order
    assert [e["index"] for e in result["examples"]["negation"]] == [1]
    assert result["examples"]["negation"][0]["cue_word"] == "not"
    assert result["examples"]["contrast"][0]["cue_word"] == "but"
    # negation sentences: 4 (one correct "never boring"), 3 wrong; contrast 1/1; other 2 (1 wrong, 1 unparsed)
    assert result["support"] == {"negation": 4, "contrast": 1, "other": 3}
    assert result["rates"]["negation"] == pytest.approx(3 / 4)
    assert result["rates"]["contrast"] == 1.0
    assert result["rates"]["other"] == pytest.approx(2 / 3)
    assert result["rates"]["overall"] == pytest.approx(6 / 8)


@pytest.mark.parametrize(
    "value, label",
    [(1, 1), (0, 0), (True, 1), ("negative", 0), (" Positive. ", 1), ("1", 1), ("The review is negative", 0),
     ("positive or negative", None), ("", None), (None, None), (2, None)],
)  # fmt: skip
def test_parse_sentiment(value, label):
    assert an.parse_sentiment(value) == label


def test_sst2_bad_input_names_the_example():
    with pytest.raises(ValueError, match="sst2 example 0"):
        an.analyze_sst2([{"label": 1}], [1])
    with pytest.raises(ValueError, match="2 examples but 1 predictions"):
        an.analyze_sst2([{"sentence": "a", "label": 1}] * 2, [1])


# ---------------------------------------------------------------------------------------------------------------
# Math
# ---------------------------------------------------------------------------------------------------------------

GSM8K_EXAMPLE = {
    "question": "Janet's ducks lay 16 eggs per day. She eats three and bakes with four. She sells the rest "
    "for $2 each. How much does she make every day?",
    "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every "
    "day at the farmer's market.\n#### 18",
}

MATH = [
    (GSM8K_EXAMPLE["answer"], "correct"),
    ("She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs and makes 9 * 2 = $18.\nThe answer is 18.", "correct"),
    # a wrong calculator annotation
    (
        "She sells 16-3-4 = <<16-3-4=8>>8 eggs.\nShe makes 8*2 = <<8*2=16>>16 dollars.\n#### 16",
        "arithmetic_slip",
    ),
    # a wrong inline step, no annotations
    ("She sells 16 - 3 - 4 = 9 eggs, and makes 9 * 2 = $20 a day.\n#### 20", "arithmetic_slip"),
    # every step right, wrong plan (forgot the muffins)
    ("She sells 16 - 3 = 13 eggs.\nShe makes 13 * 2 = 26 dollars.\n#### 26", "wrong_plan"),
    ("She sells 9 eggs and makes 18 dollars.", "extraction_failure"),  # no final-answer marker
    ("She makes 9 * 2 = 18.\n#### eighteen", "extraction_failure"),  # marker, but no number after it
    (None, "extraction_failure"),
]


def test_math_every_category():
    preds, expected = zip(*MATH)
    result = an.analyze_math([GSM8K_EXAMPLE] * len(MATH), list(preds), k=10, task="gsm8k")
    got = {i: cat for cat, exs in result["examples"].items() for i in (e["index"] for e in exs)}
    assert [got[i] for i in range(len(MATH))] == list(expected)
    assert result["counts"] == {"correct": 2, "arithmetic_slip": 2, "wrong_plan": 1, "extraction_failure": 3}
    slip = result["examples"]["arithmetic_slip"][1]
    assert slip["wrong_steps"] == [{"expr": "9 * 2", "claimed": "$20", "ok": False, "source": "inline"}]
    assert result["examples"]["arithmetic_slip"][0]["wrong_steps"][0]["source"] == "annotation"
    assert result["examples"]["wrong_plan"][0]["extracted"] == "26"


def test_correct_answer_with_a_slip_counts_as_correct_and_custom_extractor():
    pred = "2 + 2 = 5, anyway the result: 18"
    assert an.classify_math(pred, "18")[0] == "extraction_failure"
    category, evidence = an.classify_math(pred, "18", extract=lambda t: t.rsplit(":", 1)[-1].strip())
    assert category == "correct" and len(evidence["wrong_steps"]) == 1


def test_analyze_uses_the_tasks_grading_rule_and_flags_format_violations():
    """Through ``analyze`` the task's lenient extractor decides "correct" (so counts match the eval's
    accuracy); a wrong answer with no final-answer marker is a format violation, not a plan error."""
    from modern_llm.data.task_datasets import TaskExample

    example = TaskExample("t-0", GSM8K_EXAMPLE["question"], "18", solution=GSM8K_EXAMPLE["answer"])
    preds = [
        "She makes 18 dollars.",  # no marker, but the task grader reads the last number: correct
        "She sells 16 - 3 = 13 eggs and makes 13 * 2 = 26 dollars.",  # wrong, unmarked
        "She sells 16 - 3 = 13 eggs.\n#### 26",  # wrong, marked, steps right
        "She sells some eggs.",  # no number at all
    ]
    result = an.analyze("gsm8k", [example] * 4, preds, k=4)
    assert result["counts"] == {"correct": 1, "arithmetic_slip": 0, "wrong_plan": 1, "extraction_failure": 2}
    failures = result["examples"]["extraction_failure"]
    assert [(e["index"], e["extracted"], e["format_ok"]) for e in failures] == [
        (1, "26", False),
        (3, None, False),
    ]
    assert result["examples"]["correct"][0]["question"].startswith("Janet")


def test_analyze_routes_sst2_and_samsum_task_examples():
    from modern_llm.data.task_datasets import TaskExample

    sst = [TaskExample("s0", "not a good movie .", "negative", label=0)]
    assert an.analyze("SST-2", sst, ["Sentiment: positive"])["counts"]["negation"] == 1
    sam = [TaskExample("d0", DIALOGUE["dialogue"], DIALOGUE["summary"])]
    assert an.analyze("samsum", sam, ["Hannah meets Peter."])["counts"]["hallucinated_entity"] == 1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2 + 2 = 5", [False]),
        ("2 + 2 = 4", [True]),
        ("10/3 = 3.33 and 10/3 = 3.4", [True, False]),  # claims rounded at their written precision
        ("$80,000 + $50,000 = $130,000", [True]),
        ("1/4 = 25% of it", [True]),
        ("4 * 60 / 5 = 4 * 12 = 48", [True, True]),  # chain of equal expressions
        ("2 + 3 = 5 + 1 = 6", [True, True]),  # running total
        ("he read 25 / 1/3 = 75 pages", [True]),  # a tight fraction is one number
        ("3 x 4 = 12 and 3 × 5 = 16", [True, False]),
        ("120 – 80 - 15 = 25", [True]),  # en dash as minus
        ("so 8, 8 * 2 = 16", [True]),  # list comma is a boundary
        ("16 - 3 = <<16-3=13>>13 eggs", [True]),  # annotation + the same visible step counted once
        # guards: these are not checkable arithmetic steps and must not be reported as slips
        ("200 GB * 40% = 80 GB", []),  # unit words cut the expression: only its tail is visible
        ("9 hours * 2/3 = 6 hours", []),
        ("3x + 4 = 28", []),
        ("the sun sets at 6:00+48=6:48 PM", []),
        ("5 - 1 - 1/2 = 3 1/2 hours", []),  # mixed number
        ("17/3 = 5 and 2/3 loads", []),
        ("192 / 1.2 = 1.2Y / 1.2", []),  # algebra
        ("$350 000 x 5/100 = $17500", []),  # space-grouped thousands
        ("x = 5", []),
    ],
)
def test_check_steps(text, expected):
    assert [s.ok for s in an.check_steps(text)] == expected


def test_extract_final_answer_takes_the_last_marker():
    assert an.extract_final_answer("#### 5\nwait, recheck\n#### 1,234.50") == "1234.5"
    assert an.extract_final_answer("so \\boxed{42}") == "42"
    assert an.extract_final_answer("Answer: $7") == "7"
    assert an.extract_final_answer("The final answer is -3.") == "-3"
    assert an.extract_final_answer("I think 7") is None


def test_reference_solutions_of_gsm8k_are_all_correct_with_few_inline_false_slips(shared_data):
    """The GSM8K references must classify as correct, their calculator annotations must all check out,
    and the inline checker may flag only a small fraction (the dataset's own typos, e.g. "8*3 = 240")."""
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()]
    result = an.analyze_math(rows, [r["answer"] for r in rows], k=0, task="gsm8k")
    assert result["counts"]["correct"] == len(rows)
    steps = [s for r in rows for s in an.check_steps(r["answer"])]
    assert all(s.ok for s in steps if s.source == "annotation")
    inline = [s for s in steps if s.source == "inline"]
    assert len(inline) > 100 and sum(not s.ok for s in inline) / len(inline) < 0.03


# ---------------------------------------------------------------------------------------------------------------
# SAMSum
# ---------------------------------------------------------------------------------------------------------------

DIALOGUE = {
    "dialogue": "Hannah: Hey, do you have Betty's number?\r\nAmanda: Lemme check\r\nAmanda: Sorry, can't find it."
    "\r\nAmanda: Ask Larry\r\nHannah: Bye",
    "summary": "Hannah needs Betty's number but Amanda doesn't have it. She needs to contact Larry.",
}

SAMSUM = [
    ("Hannah asks Amanda for Betty's number. They'll ask Larry.", {"ok"}),
    ("Hannah needs a phone number. She will ask Larry.", {"missing_speaker"}),
    ("Hannah and Amanda will call Larry and Peter on Monday.", {"hallucinated_entity"}),
    ("Hannah meets Peter.", {"missing_speaker", "hallucinated_entity"}),
    ("", {"missing_speaker"}),
]


def test_samsum_every_category():
    preds, expected = zip(*SAMSUM)
    result = an.analyze_samsum([DIALOGUE] * len(SAMSUM), list(preds), k=10)
    for i, cats in enumerate(expected):
        got = {c for c, exs in result["examples"].items() if any(e["index"] == i for e in exs)}
        assert got == cats, (i, got)
    assert result["counts"] == {"ok": 1, "missing_speaker": 3, "hallucinated_entity": 2}
    assert result["examples"]["hallucinated_entity"][0]["hallucinated"] == ["Peter", "Monday"]
    assert result["examples"]["missing_speaker"][0]["missing_speakers"] == ["Amanda"]


def test_dialogue_speakers_and_capitalised_words():
    assert an.dialogue_speakers(DIALOGUE["dialogue"]) == ["Hannah", "Amanda"]
    assert an.dialogue_speakers("Mary Jane: hi\nhttp: x\nBob: yo\nMary Jane: ok") == ["Mary Jane", "Bob"]
    assert an.capitalised_words("They'll meet Tom's sister. She isn't sure. I agree.") == ["Tom"]


# ---------------------------------------------------------------------------------------------------------------
# Files and CLI
# ---------------------------------------------------------------------------------------------------------------


def test_write_analysis_record_examples_png_and_log(tmp_path):
    examples, preds, _ = zip(*SST2)
    result = an.analyze_sst2(list(examples), list(preds))
    paths = an.write_analysis(
        result, tmp_path / "out", "sst2-demo", model="tiny", log_path=tmp_path / "LOG.md"
    )
    record = read_record(paths["record"])
    assert record["task"] == "sst2" and record["model"] == "tiny"
    assert record["metrics"]["n_negation"] == 3 and record["metrics"]["frac_correct"] == pytest.approx(0.25)
    saved = json.loads(paths["examples"].read_text())
    assert saved["counts"] == result["counts"] and saved["examples"]["contrast"][0]["index"] == 3
    assert paths["figure"].read_bytes()[:4] == b"\x89PNG" and paths["figure"].stat().st_size > 1000
    log = (tmp_path / "LOG.md").read_text()
    assert "error analysis: sst2-demo" in log and "negation=3" in log


def test_cli_reads_mixed_task_jsonl(tmp_path):
    rows = [{"task": "sst2", **ex, "prediction": pred} for ex, pred, _ in SST2] + [
        {"task": "gsm8k", **GSM8K_EXAMPLE, "prediction": pred} for pred, _ in MATH
    ]
    rows.append({"task": "samsum", "example": DIALOGUE, "prediction": SAMSUM[1][0]})  # nested form
    file = tmp_path / "preds.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "out"
    assert an.main(["--predictions", str(file), "--out-dir", str(out), "--no-log", "-k", "2"]) == 0
    names = sorted(p.name for p in out.iterdir())
    for task in ("sst2", "gsm8k", "samsum"):
        assert {f"preds-{task}.json", f"preds-{task}_examples.json", f"preds-{task}.png"} <= set(names)
    assert read_record(out / "preds-gsm8k.json")["metrics"]["n_wrong_plan"] == 1
    samsum = json.loads((out / "preds-samsum_examples.json").read_text())
    assert samsum["counts"]["missing_speaker"] == 1


def test_cli_errors_name_the_line(tmp_path):
    file = tmp_path / "bad.jsonl"
    file.write_text('{"task": "sst2", "sentence": "ok", "label": 1, "prediction": 1}\n{"task": "sst2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'prediction'"):
        an.main(["--predictions", str(file), "--out-dir", str(tmp_path), "--no-log"])
    file.write_text('{"sentence": "ok", "label": 1, "prediction": 1}\n')
    with pytest.raises(ValueError, match="--task"):
        an.main(["--predictions", str(file), "--out-dir", str(tmp_path), "--no-log"])
    assert (
        an.main(["--predictions", str(file), "--task", "sst2", "--out-dir", str(tmp_path), "--no-log"]) == 0
    )
    with pytest.raises(FileNotFoundError):
        an.main(["--predictions", str(tmp_path / "missing.jsonl")])
    with pytest.raises(ValueError, match="no error analysis for task"):
        an.analyze("squad", [], [])


def test_join_predictions_by_id_uses_the_tasks_own_examples(tmp_path, shared_data):
    import json as _json

    from modern_llm.data.task_datasets import get_task
    from modern_llm.evaluation.analysis import join_predictions_by_id

    first = get_task("sst2").load("validation", data_dir=shared_data, limit=2)
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(_json.dumps({"id": ex.id, "output": ex.answer}) for ex in first))
    groups = join_predictions_by_id(path, "sst2", "validation", "output", str(shared_data))
    examples, preds = groups["sst2"]
    assert [e.id for e in examples] == [e.id for e in first] and preds == [e.answer for e in first]
    path.write_text(_json.dumps({"id": "nope", "output": "x"}))
    with pytest.raises(ValueError, match="p.jsonl:1"):
        join_predictions_by_id(path, "sst2", "validation", "output", str(shared_data))
