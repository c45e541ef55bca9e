"""Atomic safetensors checkpoints: tied weights, RNG round trip, corruption reports, crash-safe writes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from modern_llm.utils import checkpointing as ckpt_io


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.tensor(2.0))


def save(root, step, model=None, **kw):
    model = model or Tied()
    return ckpt_io.save_checkpoint(
        root, step, model, {"step": step, "note": "x"}, {"train": {"lr": 1.0}}, **kw
    )


def test_tied_weights_round_trip(tmp_path):
    src = Tied()
    path = save(tmp_path, 3, src)
    stored = load_file(str(path / ckpt_io.MODEL_FILE))
    assert (
        "head.weight" not in stored and "emb.weight" in stored and "scale" in stored
    )  # one name per storage
    dst = Tied()
    state = ckpt_io.load_checkpoint(path, dst)
    assert state == {"step": 3, "note": "x"}
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), name
    assert dst.head.weight.data_ptr() == dst.emb.weight.data_ptr()  # still tied after loading
    assert ckpt_io.read_checkpoint_config(path) == {"train": {"lr": 1.0}}


def test_mismatched_model_is_rejected_with_names(tmp_path):
    path = save(tmp_path, 1)
    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ckpt_io.CheckpointError, match="missing.*0.weight"):
        ckpt_io.load_checkpoint(path, other)


def test_trainable_only_saves_just_the_adapter_like_params(tmp_path):
    src = Tied()
    src.emb.weight.requires_grad_(False)
    path = save(tmp_path, 1, src, trainable_only=True)
    assert set(load_file(str(path / ckpt_io.MODEL_FILE))) == {"proj.weight", "proj.bias"}
    dst = Tied()
    dst.emb.weight.requires_grad_(False)
    ckpt_io.load_checkpoint(path, dst, trainable_only=True)
    assert torch.equal(dst.proj.weight, src.proj.weight)


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = ckpt_io.capture_rng_state()
    expect = (torch.rand(3), np.random.normal(size=3), random.random(), random.gauss(0, 1))
    torch.save(state, tmp_path / "rng.pt")
    ckpt_io.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.normal(size=3), random.random(), random.gauss(0, 1))
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2:] == got[2:]


def test_failed_write_leaves_no_partial_folder_and_keeps_previous(tmp_path, monkeypatch):
    first = save(tmp_path, 1)
    before = sorted(p.name for p in first.iterdir())

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001"]  # no step_2, no temp folder
    assert sorted(p.name for p in first.iterdir()) == before

    def hook_fails(folder):
        (folder / "tokenizer").mkdir()
        raise RuntimeError("tokenizer export failed")

    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="tokenizer"):
        save(tmp_path, 2, extra_files=hook_fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001"]


def test_resave_same_step_replaces_atomically(tmp_path):
    a, b = Tied(), Tied()
    save(tmp_path, 5, a)
    path = save(tmp_path, 5, b)
    dst = Tied()
    ckpt_io.load_checkpoint(path, dst)
    assert torch.equal(dst.proj.weight, b.proj.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000005"]


def test_keep_last_k_and_latest_resolution(tmp_path):
    for step in (1, 2, 10, 3):
        save(tmp_path / "run" / "checkpoints", step, keep_last_k=3)
    root = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in ckpt_io.list_checkpoints(root)] == [2, 3, 10]
    assert ckpt_io.latest_checkpoint(root).name == "step_0000010"
    assert ckpt_io.resolve_checkpoint(tmp_path / "run").name == "step_0000010"  # run folder
    assert ckpt_io.resolve_checkpoint(root).name == "step_0000010"  # checkpoints root
    assert ckpt_io.resolve_checkpoint(root / "step_0000002").name == "step_0000002"
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        ckpt_io.resolve_checkpoint(tmp_path / "empty")


@pytest.mark.parametrize("victim", [ckpt_io.MODEL_FILE, ckpt_io.STATE_FILE])
def test_truncated_file_gives_clear_error_and_model_is_untouched(tmp_path, victim):
    save(tmp_path, 1)
    latest = save(tmp_path, 2)
    f = latest / victim
    f.write_bytes(f.read_bytes()[:40])
    model = Tied()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ckpt_io.CheckpointError) as err:
        ckpt_io.load_checkpoint(latest, model)
    assert str(f) in str(err.value) and "step_0000001" in str(err.value)
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())


def test_missing_file_and_stale_temp_dirs(tmp_path):
    path = save(tmp_path, 1)
    (path / ckpt_io.MODEL_FILE).unlink()
    with pytest.raises(ckpt_io.CheckpointError, match="model.safetensors: missing"):
        ckpt_io.load_checkpoint(path, Tied())
    (tmp_path / ".tmp-step_0000002-dead").mkdir()
    ckpt_io.remove_stale_temp_dirs(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000001"]
