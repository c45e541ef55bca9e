"""The README's main job, in its seconds-long --fast form: every stage runs and the card is written."""

import json

import pytest

from modern_llm.quickstart import main


@pytest.mark.slow
def test_quickstart_fast_writes_report_card(tmp_path, capsys):
    assert main(["--fast", "--out", str(tmp_path), "--save-to", str(tmp_path / "saved")]) == 0
    card = (tmp_path / "report_card.md").read_text()
    for stage in ("| base |", "| sft |", "| dpo |", "| dpo+verifier |"):
        assert stage in card
    assert "bits/byte" in card and "What each stage added" in card
    assert (tmp_path / "stages.png").stat().st_size > 1000
    assert (tmp_path / "pretrain" / "loss_curve.png").is_file()
    assert (tmp_path / "quickstart.json").is_file()  # the pipeline's result record
    run_record = json.loads((tmp_path / "quickstart_run.json").read_text())
    assert run_record["name"] == "quickstart-fast" and run_record["metrics"]["total_wall_s"] > 0
    assert "pretrain_bpb" in run_record["metrics"]
    stages = json.loads((tmp_path / "quickstart_stages.json").read_text())["metrics"]
    assert set(stages) == {"base", "sft", "dpo", "dpo+verifier"}
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "quickstart_run.json",
        "quickstart_stages.json",
        "report_card.md",
        "stages.png",
    ]
    # both records render as one regular table each in the report (no long form)
    from modern_llm.evaluation import report_tables as rt

    records, skipped = rt.load_records(tmp_path / "saved")
    assert not skipped and len(records) == 2
    for rec in records:
        tables = rt.tables_for_records([rec], "quickstart")
        assert tables and not any(t.long for t in tables), rec.path
    assert "report card" in capsys.readouterr().out


def test_card_does_not_call_a_one_question_change_a_gain(tmp_path):
    from modern_llm.quickstart import report_card, sampling_noise

    assert sampling_noise(0.5, 100) == pytest.approx(0.0707, abs=1e-4)
    assert sampling_noise(0.3, 0) == 0.0
    stages = {"base": 0.05, "sft": 0.30, "dpo": 0.31}
    summary = {s: {"accuracy": [v, 0.0], "verifier_at_n": [v, 0.0]} for s, v in stages.items()}
    gains = [
        {"stage": "base", "metric": "accuracy", "value": [0.05, 0.0]},
        {"stage": "sft", "metric": "accuracy", "value": [0.30, 0.0], "gain": [0.25, 0.0]},
        {"stage": "dpo", "metric": "accuracy", "value": [0.31, 0.0], "gain": [0.01, 0.0]},
    ]
    aligned = {"summary": summary, "stage_gains": gains, "protocol": {"n_eval_questions": 100}}
    pre = {"step": 1, "params": 10, "sample": "x"}
    card = report_card(tmp_path, pre, aligned, 60.0)
    assert "sft: accuracy +0.250 ± 0.000 (helped)" in card
    assert "dpo: accuracy +0.010 ± 0.000 (no clear change)" in card
