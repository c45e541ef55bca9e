"""Result records and the experiment log."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from modern_llm.utils import records
from modern_llm.utils.logging import MetricLogger, read_metrics


def _record(path, **kw):
    args = dict(
        name="lm-tiny",
        task="tinystories",
        model="modern-decoder-tiny",
        metrics={"ppl": torch.tensor(12.5), "bpb": np.float32(1.25), "acc": float("nan"), "n": 10},
        protocol={"context": 256, "split": "validation", "shots": [0, 3]},
        seed=0,
        device="cpu",
        dtype="fp32",
        started=dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.timezone.utc),
        duration_s=12.34567,
    )
    args.update(kw)
    return records.write_record(path, **args)


def test_write_record_schema_and_conversions(tmp_path):
    path = _record(tmp_path / "exp" / "lm.json")
    data = records.read_record(path)
    assert tuple(data) == records.RECORD_KEYS
    assert data["metrics"] == {"ppl": 12.5, "bpb": 1.25, "acc": None, "n": 10}  # NaN -> null (valid JSON)
    assert data["protocol"]["shots"] == [0, 3]
    assert data["started"].startswith("2024-05-01T") and data["duration_s"] == 12.346
    assert data["command"] == records.current_command()
    assert sys.argv[-1].split("/")[-1] in data["command"] or len(sys.argv) == 1
    json.loads(path.read_text())  # strict JSON


def test_git_commit_inside_and_outside_a_repo(tmp_path):
    assert records.git_commit(tmp_path) == "unknown"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "-C", str(tmp_path), "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert records.git_commit(tmp_path) == head.stdout.strip()
    assert len(records.git_commit(tmp_path)) == 40


def test_record_validation(tmp_path):
    with pytest.raises(ValueError, match=".json"):
        _record(tmp_path / "lm.txt")
    with pytest.raises(ValueError, match="metrics.obj"):
        _record(tmp_path / "lm.json", metrics={"obj": object()})
    with pytest.raises(ValueError, match="started"):
        _record(tmp_path / "lm.json", started=None)
    explicit = _record(tmp_path / "x.json", command="modern-llm lm --config c.yaml", started=0.0)
    assert records.read_record(explicit)["command"] == "modern-llm lm --config c.yaml"


def test_append_log_dated_entries(tmp_path):
    log = tmp_path / "experiments" / "LOG.md"
    records.append_log("tiny LM", "pretrain 100 steps", "modern-llm lm", "ppl 12.5", "it learns", path=log)
    records.append_log("second", "w", "c", "r", "m", path=log)
    text = log.read_text()
    assert text.startswith("# Experiment log")
    assert text.count("# Experiment log") == 1 and text.count("\n## ") == 2
    assert f"## {dt.date.today().isoformat()} — tiny LM" in text
    assert "- **Command:** `modern-llm lm`" in text and "- **Meaning:** it learns" in text


def test_metric_logger_widens_header_and_truncates_on_resume(tmp_path):
    ml = MetricLogger(tmp_path)
    ml.log(1, {"train/loss": 2.0})
    ml.log(2, {"train/loss": 1.5, "eval/loss": 1.7})
    ml.log(3, {"train/loss": 1.0})
    ml.close()
    assert read_metrics(tmp_path) == [
        {"step": 1, "train/loss": 2.0},
        {"step": 2, "train/loss": 1.5, "eval/loss": 1.7},
        {"step": 3, "train/loss": 1.0},
    ]
    MetricLogger(tmp_path, resume_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    MetricLogger(tmp_path).close()  # fresh run: empty log
    assert read_metrics(tmp_path) == []
    with pytest.raises(TypeError, match="Python number"):
        MetricLogger(tmp_path).log(1, {"x": torch.tensor(1.0)})


def test_records_name_the_commit_the_run_started_from(tmp_path, monkeypatch):
    # a long run's record must not take the HEAD of commits made in the checkout while it ran
    records.run_commit.cache_clear()
    monkeypatch.setattr(records, "git_commit", lambda cwd=None: "a" * 40)
    try:
        started = records.now_iso()  # a run takes its start time: the commit is pinned
        monkeypatch.setattr(records, "git_commit", lambda cwd=None: "b" * 40)
        path = records.write_record(
            tmp_path / "r.json", "n", "t", "m", {"x": 1.0}, {}, 0, "cpu", "fp32", started, 1.0
        )
        assert json.loads(path.read_text())["git_commit"] == "a" * 40
    finally:
        records.run_commit.cache_clear()
