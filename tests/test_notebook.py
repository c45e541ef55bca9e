"""notebooks/demo.ipynb executes top to bottom in a fresh kernel (nbclient), offline, on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "notebooks" / "demo.ipynb"


@pytest.mark.slow
def test_demo_notebook_runs_headless(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="pip install nbformat nbclient ipykernel")
    nbclient = pytest.importorskip("nbclient", reason="pip install nbformat nbclient ipykernel")
    pytest.importorskip("ipykernel", reason="pip install ipykernel")
    monkeypatch.setenv("MODERN_LLM_DEMO_WORKDIR", str(tmp_path / "work"))
    monkeypatch.delenv("MODERN_LLM_DEMO_CHECKPOINT", raising=False)
    monkeypatch.delenv("MODERN_LLM_DEMO_VERIFIER", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "commit the notebook without outputs"
    )
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails
    text = "\n".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    assert "greedy accuracy:" in text
    assert "best_of_n:" in text and "pass_at_n:" in text
    assert "P(correct | right answer)" in text and "verifier ROC-AUC" in text
    assert (tmp_path / "work" / "lm").is_dir()  # the inline model went to the work folder, not the repo
    assert not os.environ.get("MODERN_LLM_DEMO_CHECKPOINT")
