"""Shared test setup: offline Hugging Face, deterministic torch, and the shared-data locator."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# tiny test models are fastest single-threaded (no intra-op sync), and a loaded box is not oversubscribed
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path | None:
    env = os.environ.get("MODERN_LLM_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture
def shared_data():
    """Path to ../shared/data (or $MODERN_LLM_DATA_DIR); skips the test when it is absent."""
    d = _shared_data_dir()
    if d is None:
        pytest.skip("real datasets not found: set MODERN_LLM_DATA_DIR or place them in ../shared/data")
    return d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
