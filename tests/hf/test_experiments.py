"""The one-command HF experiment runner on a tiny random GPT-2 and the task fixtures (seconds, not hours)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modern_llm.hf import experiments as ex
from modern_llm.utils.records import RECORD_KEYS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tasks"
CHEAP_RUNS = ["sst2-zeroshot", "sst2-fewshot", "sst2-lora", "samsum-zeroshot", "samsum-lora", "gsm8k-fewshot"]


def _argv(tiny_dirs, tmp_path: Path, *extra: str) -> list[str]:
    # The fixtures are tiny: 4 SST-2 train / 3 validation rows, 2 SAMSum test dialogues, 1 GSM8K train row.
    return [
        "--model",
        str(tiny_dirs["gpt2"]),  # a real BPE tokenizer: " negative"/" positive" differ at once
        "--data-dir",
        str(FIXTURES),
        "--record-dir",
        str(tmp_path / "rec"),
        "--log",
        str(tmp_path / "LOG.md"),
        "--work-dir",
        str(tmp_path / "work"),
        "--sst2-shots",
        "2",
        "--sst2-train-limit",
        "4",
        "--sst2-steps",
        "2",
        "--samsum-train-split",
        "test[:1]",
        "--samsum-eval-split",
        "test[1:]",
        "--samsum-steps",
        "1",
        "--gsm8k-eval-limit",
        "2",
        "--gsm8k-shots",
        "1",
        "--gsm8k-max-new-tokens",
        "4",
        "--batch-size",
        "1",
        "--eval-batch-size",
        "2",
        *extra,
    ]


def test_runner_writes_records_log_and_a_summary_generated_from_them(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # trainer side files (if any) stay in the temp dir
    assert ex.main(_argv(tiny_dirs, tmp_path, "--only", *CHEAP_RUNS)) == 0
    records = ex.load_records(tmp_path / "rec")
    assert set(records) == set(CHEAP_RUNS)
    for name, record in records.items():
        assert set(RECORD_KEYS) <= set(record), name
        assert (tmp_path / "rec" / "predictions" / f"{name}.jsonl").is_file()
    assert records["sst2-fewshot"]["protocol"]["shots"] == 2
    assert records["sst2-lora"]["protocol"]["eval_method"] == "verbalizer"
    assert (
        records["sst2-lora"]["protocol"]["n_eval"] == records["sst2-zeroshot"]["protocol"]["n_examples"] == 3
    )
    assert "disjoint slice test[1:]" in records["samsum-lora"]["protocol"]["note"]
    # One dated log entry per run, its meaning generated from the records.
    log = (tmp_path / "LOG.md").read_text()
    assert log.count("## ") == len(CHEAP_RUNS) and "best prompting baseline" in log
    # Every metric cell in the summary is the record's value (round trip), missing runs are listed.
    summary = (tmp_path / "rec" / "SUMMARY.md").read_text()
    for name, record in records.items():
        row = next(line for line in summary.splitlines() if line.startswith(f"| `{name}`"))
        for metric in ex.TASK_METRICS[record["task"]]:
            assert f"| {100 * record['metrics'][metric]:.1f} |" in row + "|", (name, metric)
        if record["task"] == "sst2":  # the share predicted "positive" comes from the predictions file
            rate = ex.predicted_positive_rate(tmp_path / "rec" / "predictions" / f"{name}.jsonl")
            assert f"| {100 * rate:.1f} |" in row
    assert "Not run yet: `sst2-qlora`" in summary and "Not run yet: `gsm8k-lora`" in summary
    # A second invocation skips what exists.
    before = (tmp_path / "rec" / "sst2-zeroshot.json").read_text()
    assert ex.main(_argv(tiny_dirs, tmp_path, "--only", "sst2-zeroshot")) == 0
    assert (tmp_path / "rec" / "sst2-zeroshot.json").read_text() == before


def _record(task: str, method: str, value: float, shots: int = 0) -> dict:
    metric = ex.TASK_METRICS[task][0]
    protocol = {"method": method, "shots": shots, "split": "validation", "n_examples": 10}
    if method in ("lora", "qlora"):
        protocol |= {"train_split": "train[:8]", "steps": 2, "batch_size": 4, "eval_split": "validation"}
        protocol["n_eval"] = 10
    return {
        "task": task,
        "metrics": {metric: value},
        "protocol": protocol,
        "duration_s": 1.0,
        "device": "cpu",
    }


def test_log_meaning_reports_negative_results_against_the_best_baseline():
    records = {
        "sst2-zeroshot": _record("sst2", "verbalizer", 0.50),
        "sst2-fewshot": _record("sst2", "verbalizer", 0.70, shots=4),
        "sst2-lora": _record("sst2", "lora", 0.65),
        "sst2-qlora": _record("sst2", "qlora", 0.80),
    }
    assert ex.best_baseline(records, "sst2") == ("sst2-fewshot", 0.70)
    _, meaning = ex.describe_result("sst2-lora", records)
    assert "does NOT beat" in meaning and "sst2-fewshot" in meaning and "-5.0 points" in meaning
    _, meaning = ex.describe_result("sst2-qlora", records)
    assert meaning.startswith("QLoRA (NF4 base) beats") and "+10.0 points" in meaning
    records["sst2-lora"]["metrics"]["accuracy"] = 0.70  # equal to the best baseline
    _, meaning = ex.describe_result("sst2-lora", records)
    assert "does NOT beat" in meaning and "a tie" in meaning


def test_cli_help_list_and_bad_config(tiny_dirs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ex.main(["--help"])
    assert exit_info.value.code == 0 and "sst2_steps" in capsys.readouterr().out
    assert ex.main(_argv(tiny_dirs, tmp_path, "--list")) == 0
    assert "sst2-qlora" in capsys.readouterr().out and not (tmp_path / "rec").exists()
    with pytest.raises(SystemExit):
        ex.main(["--runs", json.dumps(["nope"])])
    with pytest.raises(SystemExit):
        ex.main(["--bogus-knob", "1"])


def test_predicted_positive_rate_from_predictions_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"extracted": e}) + "\n" for e in [1, 1, 0, None]))
    assert ex.predicted_positive_rate(path) == 0.5  # an unparseable answer is not "positive"
    assert ex.predicted_positive_rate(tmp_path / "missing.jsonl") is None
