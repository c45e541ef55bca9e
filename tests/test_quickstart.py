"""The README's main job, in its seconds-long --fast form: every stage runs and the card is written."""

import pytest

from modern_llm.quickstart import main


@pytest.mark.slow
def test_quickstart_fast_writes_report_card(tmp_path, capsys):
    assert main(["--fast", "--out", str(tmp_path)]) == 0
    card = (tmp_path / "report_card.md").read_text()
    for stage in ("| base |", "| sft |", "| dpo |", "| dpo+verifier |"):
        assert stage in card
    assert "bits/byte" in card and "What each stage added" in card
    assert (tmp_path / "stages.png").stat().st_size > 1000
    assert (tmp_path / "pretrain" / "loss_curve.png").is_file()
    assert (tmp_path / "quickstart.json").is_file()  # the pipeline's result record
    assert "report card" in capsys.readouterr().out
