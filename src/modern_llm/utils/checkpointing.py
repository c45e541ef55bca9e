"""Atomic, resumable checkpoints: ``<root>/step_XXXXXXX/{model.safetensors, trainer_state.pt, config.yaml}``.

Design choices
- Weights go to safetensors (no pickle, mmap-able, loadable without our code). Everything needed to continue
  the run bit-exactly (optimizer, scheduler, RNG streams, data position, step, config) goes to
  ``trainer_state.pt``, which holds only tensors and plain Python values so it loads with
  ``torch.load(weights_only=True)`` (no arbitrary unpickling). RNG states are therefore stored as tensors.
- A checkpoint is written into a hidden temp folder next to the target and renamed into place only when every
  file is complete, so a crash mid-save never leaves a half-written ``step_*`` folder and never touches the
  previous checkpoints. Pruning to ``keep_last_k`` happens after the rename.
- "Latest" = the highest step folder. A damaged one is *reported* (file named, previous checkpoint suggested)
  rather than silently skipped, so a resume never quietly rewinds training.

Footguns
- Tied weights (embedding = LM head) share storage; safetensors refuses shared tensors. We save one name per
  storage and, on load, accept missing names only when they alias a loaded tensor in the live model.
- ``torch.compile`` wraps the model (``_orig_mod.`` key prefix): always save/load the original module.
- ``os.replace`` of a directory fails if the target exists; re-saving a step moves the old folder aside first.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
CHECKPOINTS_SUBDIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or does not match the model; the message names the file."""


# ----------------------------------------------------------------------------------------------- names


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """All ``step_*`` folders under ``root`` as (step, path), oldest first (temp folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, a checkpoints root, or a run folder (its ``checkpoints/`` newest entry)."""
    path = Path(path)
    if (path / STATE_FILE).exists() or (path / MODEL_FILE).exists() or _STEP_RE.match(path.name):
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {path}")
        return path
    for root in (path, path / CHECKPOINTS_SUBDIR):
        newest = latest_checkpoint(root)
        if newest is not None:
            return newest
    raise FileNotFoundError(
        f"no checkpoint found at {path} (looked for step_* folders in it and in {path / CHECKPOINTS_SUBDIR}); "
        "pass a step_XXXXXXX folder or a run's out_dir"
    )


def _previous_hint(ckpt: Path) -> str:
    m = _STEP_RE.match(ckpt.name)
    older = [p for s, p in list_checkpoints(ckpt.parent) if m and s < int(m.group(1))]
    if older:
        return f"resume from the previous checkpoint instead: --train.resume {older[-1]}"
    return "no earlier checkpoint exists next to it; start fresh with --train.resume none and a new out_dir"


# ----------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """Torch CPU/CUDA, numpy and Python RNG states as tensors + plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": py_version,
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npd = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npd["keys"].numpy().astype(np.uint32),
            npd["pos"],
            npd["has_gauss"],
            npd["cached_gaussian"],
        )
    )
    pyd = state["python"]
    random.setstate((pyd["version"], tuple(int(x) for x in pyd["internal"].tolist()), pyd["gauss_next"]))
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            # Different GPU count than when saved: restore what maps, leave the rest seeded.
            cuda_states = cuda_states[: torch.cuda.device_count()]
        for i, s in enumerate(cuda_states):
            torch.cuda.set_rng_state(s, i)


# ----------------------------------------------------------------------------------------------- weights


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def model_tensors(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """State-dict tensors to save, one name per shared storage (tied weights kept once, first name wins)."""
    if trainable_only:
        items = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    else:
        items = list(model.state_dict(keep_vars=False).items())
    seen: set[tuple] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in items:
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def _alias_names(model: torch.nn.Module) -> dict[str, set[str]]:
    """name -> all state-dict names sharing its storage (including itself)."""
    groups: dict[tuple, set[str]] = {}
    sd = model.state_dict(keep_vars=True)
    for name, t in sd.items():
        groups.setdefault(_storage_key(t), set()).add(name)
    return {name: groups[_storage_key(t)] for name, t in sd.items()}


def load_model_weights(model: torch.nn.Module, file: str | Path, trainable_only: bool = False) -> None:
    """Load ``model.safetensors`` into ``model``; strict except for names tied to a loaded tensor."""
    file = Path(file)
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"{file}: cannot read the weights ({err}); the file is truncated or corrupted. "
            + _previous_hint(file.parent)
        ) from err
    aliases = _alias_names(model)
    expected = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else set(aliases)
    unexpected = sorted(set(tensors) - set(aliases))
    missing = sorted(n for n in expected if not (aliases.get(n, {n}) & set(tensors)))
    if unexpected or missing:
        raise CheckpointError(
            f"{file}: weights do not match the model (missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}); "
            "was it saved from a different architecture/config?"
        )
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise CheckpointError(f"{file}: {err}") from err


# ----------------------------------------------------------------------------------------------- save/load


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def remove_stale_temp_dirs(root: str | Path) -> None:
    """Delete leftovers of saves that were killed before their rename (never a ``step_*`` folder)."""
    root = Path(root)
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and child.name.startswith(_TMP_PREFIX):
                shutil.rmtree(child, ignore_errors=True)


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    trainer_state: dict[str, Any],
    config: dict[str, Any] | None = None,
    *,
    trainable_only: bool = False,
    extra_files: Callable[[Path], None] | None = None,
    keep_last_k: int = 0,
) -> Path:
    """Write ``root/step_XXXXXXX`` atomically and prune to ``keep_last_k`` (0 = keep all); return its path.

    ``extra_files(folder)`` may add files (e.g. ``tokenizer/``) into the temp folder before the rename.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(model_tensors(model, trainable_only), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        torch.save(trainer_state, tmp / STATE_FILE)
        if config is not None:
            (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        if extra_files is not None:
            extra_files(tmp)
        _fsync_tree(tmp)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last_k > 0:
        prune_checkpoints(root, keep_last_k)
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.replace(tmp, final)
        return
    # Re-saving an existing step (e.g. after resuming from an older checkpoint): swap, then drop the old one.
    old = final.with_name(f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(root: str | Path, keep_last_k: int) -> list[Path]:
    """Delete all but the newest ``keep_last_k`` step folders; return the deleted paths."""
    ckpts = list_checkpoints(root)
    doomed = [p for _, p in ckpts[:-keep_last_k]] if keep_last_k > 0 else []
    for p in doomed:
        shutil.rmtree(p)
    return doomed


def load_trainer_state(ckpt: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read ``trainer_state.pt`` with ``weights_only=True``; damaged files raise CheckpointError."""
    file = Path(ckpt) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; the checkpoint is incomplete. " + _previous_hint(Path(ckpt)))
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, disallowed global...
        raise CheckpointError(
            f"{file}: cannot be loaded ({type(err).__name__}: {err}); the file is truncated or corrupted. "
            + _previous_hint(Path(ckpt))
        ) from err
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{file}: not a trainer state (no 'step' entry). " + _previous_hint(Path(ckpt)))
    return state


def load_checkpoint(
    ckpt: str | Path,
    model: torch.nn.Module,
    *,
    trainable_only: bool = False,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Validate both files, then load the weights into ``model``; return the trainer state dict.

    The trainer state is read first so that a damaged checkpoint is rejected before the model is modified.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt}")
    state = load_trainer_state(ckpt, map_location)
    weights = ckpt / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing; the checkpoint is incomplete. " + _previous_hint(ckpt))
    load_model_weights(model, weights, trainable_only=trainable_only)
    return state


def read_checkpoint_config(ckpt: str | Path) -> dict[str, Any]:
    """The resolved config saved with a checkpoint (``config.yaml``) as a dict."""
    file = Path(ckpt) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.yaml in this checkpoint")
    with contextlib.suppress(yaml.YAMLError):
        data = yaml.safe_load(file.read_text())
        if isinstance(data, dict):
            return data
    raise CheckpointError(f"{file}: not a YAML mapping; the checkpoint is corrupted")
