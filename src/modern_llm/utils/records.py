"""Result records (one JSON per run under ``experiments/<area>/``) and the dated experiment log.

Design choices
- Every number in the README/report comes from a record written by the code that measured it, so the record
  carries what is needed to trust and reproduce it: the exact command, the git commit, seed, device, dtype,
  start time and duration, and the evaluation protocol (tokenizer, context, split, shots, N, ...).
- ``git_commit`` and ``command`` are filled in automatically; outside a git checkout the commit is "unknown"
  rather than an error (records must still be writable from an installed package).
- Records are written atomically (temp file + rename) so an interrupted run never leaves half a JSON file.

Footguns
- JSON has no NaN/inf: non-finite metric values are stored as ``null``, never as invalid JSON.
- Tensors/numpy scalars in metrics are converted to Python numbers; anything else that JSON cannot hold is an
  error naming the metric.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RECORD_KEYS = (
    "name",
    "task",
    "model",
    "metrics",
    "protocol",
    "command",
    "git_commit",
    "seed",
    "device",
    "dtype",
    "started",
    "duration_s",
)


def _rev_parse(cwd: str | Path | None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=str(cwd) if cwd else None,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def git_commit(cwd: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` in ``cwd``; by default the working directory, then this package's checkout.

    Returns "unknown" outside a git repository.
    """
    if cwd is not None:
        return _rev_parse(cwd) or "unknown"
    return _rev_parse(None) or _rev_parse(Path(__file__).resolve().parent) or "unknown"


@functools.cache
def run_commit() -> str:
    """The commit this process started from: ``git_commit()`` at its first call, then the same answer.

    Records of long runs must name the code that ran, not whatever HEAD is when they finish (commits made
    meanwhile in the same checkout); ``now_iso()``, which every run calls for its start time, pins it.
    """
    return git_commit()


def current_command() -> str:
    """``sys.argv`` joined and shell-quoted (``python`` prefixed for ``.py`` scripts) so it can be re-run."""
    argv = [os.path.basename(a) if i == 0 and not a.endswith(".py") else a for i, a in enumerate(sys.argv)]
    if sys.argv and sys.argv[0].endswith(".py"):
        argv = ["python", *argv]
    return " ".join(shlex.quote(a) for a in argv)


def now_iso() -> str:
    run_commit()  # pin the commit when a run takes its start time
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _iso(started: Any) -> str:
    if isinstance(started, dt.datetime):
        return started.astimezone().isoformat(timespec="seconds")
    if isinstance(started, (int, float)):
        return dt.datetime.fromtimestamp(started).astimezone().isoformat(timespec="seconds")
    if isinstance(started, str) and started:
        return started
    raise ValueError(f"started must be a datetime, a UNIX timestamp or an ISO string, got {started!r}")


def _plain(value: Any, where: str) -> Any:
    """Convert to JSON-safe Python values; non-finite floats become None."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()  # 0-d tensor / numpy scalar
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    raise ValueError(
        f"{where}: cannot store a {type(value).__name__} in a JSON record; convert it to a number/str"
    )


def write_record(
    path: str | Path,
    name: str,
    task: str,
    model: str,
    metrics: dict[str, Any],
    protocol: dict[str, Any],
    seed: int | None,
    device: str,
    dtype: str,
    started: Any,
    duration_s: float,
    command: str | None = None,
) -> Path:
    """Write one result record as JSON at ``path`` (a ``.json`` file, parent folders created); return it."""
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"record path must end in .json, got {path}")
    if not name:
        raise ValueError("record name must be non-empty (e.g. 'lm-small-tinystories')")
    if not isinstance(metrics, dict) or not isinstance(protocol, dict):
        raise ValueError(
            "metrics and protocol must be dicts (protocol: tokenizer, context, split, shots, N, ...)"
        )
    record = {
        "name": name,
        "task": task,
        "model": model,
        "metrics": _plain(metrics, "metrics"),
        "protocol": _plain(protocol, "protocol"),
        "command": command if command is not None else current_command(),
        "git_commit": run_commit(),
        "seed": seed,
        "device": device,
        "dtype": dtype,
        "started": _iso(started),
        "duration_s": round(float(duration_s), 3),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def write_summary_record(
    path: str | Path,
    summary: dict[str, Any],
    *,
    name: str,
    task: str,
    model: str,
    protocol: dict[str, Any],
    seed: int | None,
    started: Any,
    t0: float,
) -> Path:
    """``write_record`` for a training stage: the numeric entries of a ``Trainer.fit`` summary are the
    metrics, device and dtype come from the summary, duration is measured from ``t0`` (``time.time()``)."""
    numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return write_record(
        path,
        name=name,
        task=task,
        model=model,
        metrics=numbers,
        protocol=protocol,
        seed=seed,
        device=summary["device"],
        dtype=summary["dtype"],
        started=started,
        duration_s=time.time() - t0,
    )


def read_record(path: str | Path) -> dict[str, Any]:
    """Load a record and check it has every key of the schema (errors name the file and the missing keys)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    missing = [k for k in RECORD_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: record is missing keys {missing}")
    return data


def save_cached_result(path: str | Path, key: Any, value: Any) -> Path:
    """Write ``{"key": key, "value": value}`` whole, then move it into place: a killed run leaves no half file.

    A long run keeps one such file per finished unit of work (a seed), so a crash or a kill loses only the
    unit in progress, and separate processes can each finish a seed that a final run then aggregates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, "value": value}, indent=1, allow_nan=True) + "\n")
    tmp.replace(path)
    return path


def load_cached_result(path: str | Path, key: Any) -> Any | None:
    """The value saved by ``save_cached_result`` when it was made with the same ``key`` (a JSON-able dict of
    the settings that determine it), else None; an unreadable file is an error that says how to recover."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete it to recompute this result") from err
    if not isinstance(saved, dict) or "key" not in saved or "value" not in saved:
        raise ValueError(f"{path}: not a cached result (no key/value); delete it to recompute this result")
    return saved["value"] if saved["key"] == json.loads(json.dumps(key)) else None


def append_log(
    entry_title: str,
    what: str,
    command: str,
    result: str,
    meaning: str,
    path: str | Path = "experiments/LOG.md",
) -> Path:
    """Append a dated entry (what was run, how, what came out, what it means) to the experiment log."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "" if path.is_file() else "# Experiment log\n\nNewest entries at the bottom.\n"
    entry = (
        f"\n## {dt.date.today().isoformat()} — {entry_title}\n\n"
        f"- **What:** {what}\n"
        f"- **Command:** `{command}`\n"
        f"- **Result:** {result}\n"
        f"- **Meaning:** {meaning}\n"
    )
    with open(path, "a") as fh:
        fh.write(header + entry)
    return path
