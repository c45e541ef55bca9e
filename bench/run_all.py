"""Run every benchmark in ``bench/`` and print one combined table from ``experiments/bench/*.json``.

    python bench/run_all.py                      # run all bench scripts (defaults), then print the table
    python bench/run_all.py --only train_throughput
    python bench/run_all.py --no-run             # just print the table of the records already written

Design choices
- A benchmark is any ``bench/*.py`` other than this file and ``_``-prefixed helpers; each runs as its own
  process with its default arguments (the defaults are the documented protocol), so one crashing or
  leaking benchmark cannot skew the next. Scripts are discovered, not listed, so new ones join automatically.
- The table is built only from the JSON records (``modern_llm.utils.records``), never from the scripts'
  stdout: what is printed is exactly what the README/report can cite. Nested metrics are flattened with "/".
- Exit status is non-zero when any benchmark failed, after still printing the table of what exists.

Never run by the test suite (benchmarks take minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


def discover(only: list[str] | None, skip: list[str]) -> list[Path]:
    """Benchmark scripts in run order (alphabetical), filtered by stem."""
    scripts = sorted(
        p for p in BENCH_DIR.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_")
    )
    known = {p.stem for p in scripts}
    unknown = [s for s in (only or []) + skip if s not in known]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; present in {BENCH_DIR}: {sorted(known)}")
    return [p for p in scripts if (not only or p.stem in only) and p.stem not in skip]


def run_script(script: Path, timeout_s: float) -> tuple[int, float]:
    """Run one benchmark from the repo root; its output streams through. Returns (exit code, seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    try:
        code = subprocess.run(
            [sys.executable, str(script)], cwd=REPO_ROOT, env=env, timeout=timeout_s
        ).returncode
    except subprocess.TimeoutExpired:
        print(f"{script.name}: timed out after {timeout_s:.0f} s", file=sys.stderr)
        code = 124
    return code, time.perf_counter() - start


def flatten(metrics: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            rows.extend(flatten(value, name))
        else:
            rows.append((name, value))
    return rows


def load_records(folder: Path) -> list[tuple[Path, dict]]:
    from modern_llm.utils.records import read_record

    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            records.append((path, read_record(path)))
        except (ValueError, json.JSONDecodeError) as err:
            print(f"skipping {path}: {err}", file=sys.stderr)
    return records


def format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def print_table(records: list[tuple[Path, dict]]) -> None:
    if not records:
        print("no records in experiments/bench/")
        return
    for path, rec in records:
        print(
            f"\n## {rec['name']}  ({path.name}; {rec['device']}, {rec['dtype']}, "
            f"{rec['started']}, commit {str(rec['git_commit'])[:8]})"
        )
        rows = flatten(rec["metrics"])
        width = max(len(name) for name, _ in rows) if rows else 10
        for name, value in rows:
            print(f"  {name:{width}s}  {format_value(value):>12s}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run all bench/*.py scripts and print their records")
    parser.add_argument("--only", default="", help="comma list of script stems to run (default: all)")
    parser.add_argument("--skip", default="", help="comma list of script stems to skip")
    parser.add_argument("--no-run", action="store_true", help="only print the table of existing records")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per benchmark")
    parser.add_argument("--records", default=str(REPO_ROOT / "experiments" / "bench"))
    args = parser.parse_args(argv)

    only = [s for s in args.only.split(",") if s] or None
    skip = [s for s in args.skip.split(",") if s]
    failed = []
    if not args.no_run:
        for script in discover(only, skip):
            print(f"\n>>> {script.relative_to(REPO_ROOT)}", flush=True)
            code, seconds = run_script(script, args.timeout)
            status = "ok" if code == 0 else f"FAILED (exit {code})"
            print(f"<<< {script.name}: {status} in {seconds:.0f} s", flush=True)
            if code != 0:
                failed.append(script.name)
    print_table(load_records(Path(args.records)))
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
