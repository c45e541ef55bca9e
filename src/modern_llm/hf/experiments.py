"""The Hugging Face finetuning results in one command: prompting baselines vs LoRA / QLoRA on SST-2, GSM8K
and SAMSum with one registry model (default SmolLM2-135M-Instruct), records, log entries and a summary table.

    python scripts/run_hf_experiments.py --config configs/hf/smollm2_cpu.yaml --data-dir ../shared/data
    python scripts/run_hf_experiments.py --config configs/hf/smollm2_cpu.yaml --only sst2-lora --force
    python scripts/run_hf_experiments.py --summary-only          # rebuild experiments/hf/SUMMARY.md

Runs (``RUNS``, in the order they execute; each writes ``<record_dir>/<name>.json`` + predictions JSONL):
- ``sst2-zeroshot`` / ``sst2-fewshot``: label-word (verbalizer) scoring on SST-2 validation, 0 and k shots.
- ``sst2-lora`` / ``sst2-qlora``: LoRA on a full-precision base / on a 4-bit NF4 base, trained on the first
  ``sst2_train_limit`` train sentences to write the label word, graded by the same verbalizer scorer.
- ``samsum-zeroshot`` / ``samsum-lora``: generation, ROUGE. Only SAMSum's test split exists locally, so LoRA
  trains on ``samsum_train_split`` and both are graded on the disjoint ``samsum_eval_split`` (checked by id).
- ``gsm8k-fewshot`` / ``gsm8k-lora``: generation, exact match of the final number, first ``gsm8k_eval_limit``
  test questions; LoRA trains on the first ``gsm8k_train_limit`` train solutions and is prompted zero-shot.

Design choices
- Nothing here measures anything itself: prompting runs call ``hf.prompting_baselines.evaluate_task`` and
  finetuning runs call ``hf.finetune.finetune``, the same functions behind ``modern-llm prompt-baseline`` and
  ``modern-llm hf-finetune``, so this module only fixes the protocol and collects the records.
- Resumable: a run whose record exists is skipped unless ``--force``; long CPU jobs can be restarted and each
  record can be committed as it lands. A finetuning run always starts fresh (``train.resume = "none"``).
- Every log entry's "meaning" and the summary table are generated from the records (comparison with the best
  prompting baseline of the same task, on the same evaluation examples), never typed by hand, so negative
  results are reported exactly like positive ones.
- ``threads`` (default 1): on a shared, oversubscribed CPU one intra-op thread per process is much faster than
  two (OpenMP threads spin-waiting on each other).

Footguns
- The SmolLM2 weights available offline are a Q4_1 GGUF de-quantised to fp32 (see ``hf.registry``); every
  record says so in ``protocol.weights``. QLoRA re-quantises those weights to NF4 on top.
- SST-2 LoRA is trained with the SFT loss on the label word and evaluated by label-word logits (chat format:
  bare word, the assistant turn's first token); both use the task's one prompt format.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modern_llm.config.base import config_help, config_to_dict, load_config

log = logging.getLogger(__name__)

RUNS = (
    "sst2-zeroshot",
    "sst2-fewshot",
    "sst2-lora",
    "samsum-zeroshot",
    "gsm8k-fewshot",
    "samsum-lora",
    "sst2-qlora",
    "gsm8k-lora",
)
# Metrics shown in the summary (and compared in the log) per task; the first one decides "beats".
TASK_METRICS = {
    "sst2": ("accuracy", "f1"),
    "gsm8k": ("accuracy", "no_answer_rate"),
    "samsum": ("rougeL", "rouge1", "rouge2"),
}
METRIC_LABELS = {"accuracy": "accuracy", "no_answer_rate": "no answer", "f1": "F1"}
DERIVED_LABELS = {"predicted_positive": "predicted 'positive'"}  # from predictions files, see load_records
TASK_TITLES = {
    "sst2": "SST-2 (sentiment; accuracy / F1 of 'positive')",
    "gsm8k": "GSM8K (exact match of the final number)",
    "samsum": "SAMSum (ROUGE F-measure, rouge-score with stemming)",
}


@dataclass
class HFExperimentsConfig:
    model: str = "smollm2-135m-instruct"
    data_dir: str | None = None  # default: $MODERN_LLM_DATA_DIR
    record_dir: str = "experiments/hf"
    log: str = "experiments/LOG.md"
    work_dir: str = "runs/hf_experiments"  # adapters, trainer checkpoints (not committed)
    runs: list[str] = field(default_factory=lambda: list(RUNS))
    threads: int = 1
    seed: int = 0
    eval_batch_size: int = 16
    # SST-2
    sst2_eval_limit: int | None = None  # None = the whole validation split (872)
    sst2_shots: int = 4
    sst2_train_limit: int = 512
    sst2_steps: int = 48
    # GSM8K
    gsm8k_eval_limit: int = 50
    gsm8k_shots: int = 4
    gsm8k_max_new_tokens: int = 256
    gsm8k_train_limit: int = 512
    gsm8k_steps: int = 32
    # SAMSum (only the test split exists locally)
    samsum_train_split: str = "test[:400]"
    samsum_eval_split: str = "test[600:700]"
    samsum_steps: int = 40
    # LoRA / training
    lora_r: int = 8
    lora_alpha: float = 16.0
    lr: float = 3e-4
    batch_size: int = 8  # examples per optimizer step
    micro_batch_size: int | None = None  # < batch_size: gradient accumulation (memory; long SAMSum dialogues)
    warmup_steps: int = 4
    max_length: int = 512

    def __post_init__(self) -> None:
        unknown = [r for r in self.runs if r not in RUNS]
        if unknown:
            raise ValueError(f"runs: unknown run name(s) {unknown}; choose from {list(RUNS)}")
        for key in ("threads", "eval_batch_size", "batch_size", "sst2_train_limit", "gsm8k_train_limit"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        micro = self.micro_batch_size
        if micro is not None and (micro < 1 or self.batch_size % micro):
            raise ValueError(f"micro_batch_size={micro} must be >= 1 and divide batch_size={self.batch_size}")
        if self.sst2_eval_limit is not None and self.sst2_eval_limit < 1:
            raise ValueError(f"sst2_eval_limit={self.sst2_eval_limit} must be >= 1 or null (all 872)")


# ---------------------------------------------------------------------------------------------- helpers


def _data_dir(cfg: HFExperimentsConfig) -> str | None:
    return cfg.data_dir or os.environ.get("MODERN_LLM_DATA_DIR")


def _sst2_eval_split(cfg: HFExperimentsConfig) -> str:
    return "validation" if cfg.sst2_eval_limit is None else f"validation[:{cfg.sst2_eval_limit}]"


def _gsm8k_eval_split(cfg: HFExperimentsConfig) -> str:
    return f"test[:{cfg.gsm8k_eval_limit}]"


SAMSUM_NOTE = (
    "SAMSum train/validation are not available offline: LoRA is trained on test split slice {train} and "
    "every SAMSum number here is measured on the disjoint slice {eval} (non-standard protocol; not comparable "
    "to published SAMSum test scores)"
)


def _write_predictions(path: Path, predictions: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in predictions))
    return path


class _ModelCache:
    """Loads the base model once for all prompting runs of one invocation."""

    def __init__(self, name: str):
        self.name, self._loaded = name, None

    def get(self):
        if self._loaded is None:
            from modern_llm.hf.registry import load_model

            self._loaded = load_model(self.name, dtype="float32", device="cpu")
        return self._loaded


# ---------------------------------------------------------------------------------------------- runs


def run_prompting(
    cfg: HFExperimentsConfig,
    models: _ModelCache,
    name: str,
    task_name: str,
    eval_spec: str,
    shots: int,
    method: str,
    max_new_tokens: int | None = None,
    note: str | None = None,
) -> Path:
    """One prompting baseline -> its record path."""
    from modern_llm.data.task_datasets import get_task
    from modern_llm.hf.finetune import load_split
    from modern_llm.hf.prompting_baselines import evaluate_task, shot_pool_for, write_baseline_record
    from modern_llm.utils.records import now_iso

    started, t0 = now_iso(), time.time()
    task = get_task(task_name)
    examples = load_split(task, eval_spec, _data_dir(cfg), None)
    pool, pool_split = shot_pool_for(task, _data_dir(cfg), eval_spec.split("[")[0]) if shots else ([], None)
    model, tokenizer = models.get()
    result = evaluate_task(
        model,
        tokenizer,
        task,
        examples,
        shots=shots,
        shot_pool=pool,
        chat=None,
        method=method,
        max_new_tokens=max_new_tokens,
        batch_size=cfg.eval_batch_size,
        seed=cfg.seed,
    )
    record_dir = Path(cfg.record_dir)
    preds = _write_predictions(record_dir / "predictions" / f"{name}.jsonl", result["predictions"])
    extra: dict[str, Any] = {"data_dir": _data_dir(cfg), "predictions": str(preds), "threads": cfg.threads}
    if note:
        extra["note"] = note
    return write_baseline_record(
        record_dir / f"{name}.json",
        name=name,
        model_name=cfg.model,
        model=model,
        task=task,
        split=eval_spec,
        n_examples=len(examples),
        shots=shots,
        shot_source=pool_split,
        chat=result["chat"],
        method=method,
        max_new_tokens=max_new_tokens or task.max_new_tokens,
        metrics=result["metrics"],
        seed=cfg.seed,
        started=started,
        duration_s=time.time() - t0,
        extra_protocol=extra,
    )


def run_finetuning(
    cfg: HFExperimentsConfig,
    name: str,
    task_name: str,
    method: str,
    train_spec: str,
    eval_spec: str,
    steps: int,
    eval_method: str = "generate",
    max_new_tokens: int | None = None,
    note: str | None = None,
) -> Path:
    """One LoRA/QLoRA run through ``hf.finetune.finetune`` -> its record path."""
    from modern_llm.config.train_config import TrainConfig
    from modern_llm.hf.finetune import FinetuneConfig, finetune

    out_dir = Path(cfg.work_dir) / name
    micro = cfg.micro_batch_size or cfg.batch_size
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a fresh run; stale checkpoints would be resumed or mixed in
    train = TrainConfig(
        out_dir=str(out_dir),
        seed=cfg.seed,
        device="cpu",
        dtype="fp32",
        batch_size=micro,
        grad_accum_steps=cfg.batch_size // micro,
        max_steps=steps,
        lr=cfg.lr,
        warmup_steps=min(cfg.warmup_steps, steps),
        weight_decay=0.0,
        log_every=max(1, steps // 6),
        eval_batches=4,  # the loss-based eval is a side number; the task metric uses the whole eval set
        progress=False,
        tensorboard=False,
        resume="none",
    )
    record = Path(cfg.record_dir) / f"{name}.json"
    result = finetune(
        FinetuneConfig(
            model=cfg.model,
            task=task_name,
            method=method,
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            data_dir=_data_dir(cfg),
            train_split=train_spec,
            eval_split=eval_spec,
            eval_limit=None,
            max_length=cfg.max_length,
            max_new_tokens=max_new_tokens,
            eval_method=eval_method,
            eval_batch_size=cfg.eval_batch_size,
            eval_before=False,  # the prompting records are the "before" numbers, on the same examples
            name=name,
            record=str(record),
            note=note,
            train=train,
        )
    )
    shutil.copyfile(
        result["predictions"], _ensure_parent(Path(cfg.record_dir) / "predictions" / f"{name}.jsonl")
    )
    return record


def _ensure_parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def run_plan(cfg: HFExperimentsConfig, models: _ModelCache) -> dict[str, Callable[[], Path]]:
    """Run name -> a zero-argument function that performs it and returns its record path."""
    sst2_eval, gsm8k_eval = _sst2_eval_split(cfg), _gsm8k_eval_split(cfg)
    samsum_note = SAMSUM_NOTE.format(train=cfg.samsum_train_split, eval=cfg.samsum_eval_split)
    sst2_train = f"train[:{cfg.sst2_train_limit}]"
    gsm8k_train = f"train[:{cfg.gsm8k_train_limit}]"
    gsm8k_tokens = cfg.gsm8k_max_new_tokens
    return {
        "sst2-zeroshot": lambda: run_prompting(
            cfg, models, "sst2-zeroshot", "sst2", sst2_eval, 0, "verbalizer"
        ),
        "sst2-fewshot": lambda: run_prompting(
            cfg, models, "sst2-fewshot", "sst2", sst2_eval, cfg.sst2_shots, "verbalizer"
        ),
        "sst2-lora": lambda: run_finetuning(
            cfg, "sst2-lora", "sst2", "lora", sst2_train, sst2_eval, cfg.sst2_steps, "verbalizer"
        ),
        "sst2-qlora": lambda: run_finetuning(
            cfg, "sst2-qlora", "sst2", "qlora", sst2_train, sst2_eval, cfg.sst2_steps, "verbalizer"
        ),
        "samsum-zeroshot": lambda: run_prompting(
            cfg, models, "samsum-zeroshot", "samsum", cfg.samsum_eval_split, 0, "generate", note=samsum_note
        ),
        "samsum-lora": lambda: run_finetuning(
            cfg,
            "samsum-lora",
            "samsum",
            "lora",
            cfg.samsum_train_split,
            cfg.samsum_eval_split,
            cfg.samsum_steps,
            note=samsum_note,
        ),
        "gsm8k-fewshot": lambda: run_prompting(
            cfg, models, "gsm8k-fewshot", "gsm8k", gsm8k_eval, cfg.gsm8k_shots, "generate", gsm8k_tokens
        ),
        "gsm8k-lora": lambda: run_finetuning(
            cfg,
            "gsm8k-lora",
            "gsm8k",
            "lora",
            gsm8k_train,
            gsm8k_eval,
            cfg.gsm8k_steps,
            max_new_tokens=gsm8k_tokens,
        ),
    }


# ---------------------------------------------------------------------------------------------- reading records


def predicted_positive_rate(predictions: Path) -> float | None:
    """Share of SST-2 predictions that are "positive" (label 1), from a run's predictions JSONL."""
    if not predictions.is_file():
        return None
    labels = [json.loads(line)["extracted"] for line in predictions.read_text().splitlines() if line.strip()]
    return sum(label == 1 for label in labels) / len(labels) if labels else None


def load_records(record_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Records of this module's runs found in ``record_dir``, by run name.

    Each gets a ``derived`` dict computed from its committed predictions file (SST-2: ``predicted_positive``,
    which exposes a scorer that always answers one class), so derived numbers are generated, not typed.
    """
    from modern_llm.utils.records import read_record

    found = {}
    for name in RUNS:
        path = Path(record_dir) / f"{name}.json"
        if path.is_file():
            record = read_record(path)
            record["derived"] = {}
            if record["task"] == "sst2":
                rate = predicted_positive_rate(Path(record_dir) / "predictions" / f"{name}.jsonl")
                record["derived"]["predicted_positive"] = rate
            found[name] = record
    return found


def _method_of(record: dict[str, Any]) -> str:
    protocol = record["protocol"]
    if "lora" in protocol or protocol.get("method") in ("lora", "qlora", "full"):
        return {"lora": "LoRA", "qlora": "QLoRA (NF4 base)", "full": "full finetune"}[protocol["method"]]
    shots = protocol.get("shots", 0)
    return "zero-shot" if shots == 0 else f"{shots}-shot"


def _is_prompting(record: dict[str, Any]) -> bool:
    return record["protocol"].get("method") not in ("lora", "qlora", "full")


def _eval_set(record: dict[str, Any]) -> str:
    protocol = record["protocol"]
    split = protocol.get("eval_split") or protocol.get("split")
    n = protocol.get("n_eval") or protocol.get("n_examples")
    return f"{split} (n={n})"


def _train_set(record: dict[str, Any]) -> str:
    protocol = record["protocol"]
    if _is_prompting(record):
        shots = protocol.get("shots", 0)
        return f"{shots} demos from {protocol['shot_source']}" if shots else "none"
    per_step = protocol["batch_size"] * protocol.get("grad_accum_steps", 1)
    return f"{protocol['train_split']}, {protocol['steps']} steps x {per_step}"


def best_baseline(records: dict[str, dict[str, Any]], task: str) -> tuple[str, float] | None:
    """(run name, value) of the best prompting record of ``task`` on its headline metric, or None."""
    metric = TASK_METRICS[task][0]
    candidates = [
        (name, rec["metrics"][metric])
        for name, rec in records.items()
        if rec["task"] == task and _is_prompting(rec) and rec["metrics"].get(metric) is not None
    ]
    return max(candidates, key=lambda c: c[1]) if candidates else None


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def describe_result(name: str, records: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """(result, meaning) sentences for the log, generated from the records."""
    record = records[name]
    task = record["task"]
    metrics = TASK_METRICS[task]
    result = ", ".join(f"{m} {_fmt(record['metrics'].get(m))}%" for m in metrics)
    for key, value in record.get("derived", {}).items():
        result += f", {DERIVED_LABELS[key]} {_fmt(value)}%"
    result += f" on {_eval_set(record)}; {record['duration_s']:.0f} s on {record['device']}"
    headline = metrics[0]
    value = record["metrics"].get(headline)
    if _is_prompting(record):
        others = [
            (n, r["metrics"].get(headline))
            for n, r in records.items()
            if n != name and r["task"] == task and _is_prompting(r)
        ]
        meaning = f"{_method_of(record)} prompting baseline for {task}."
        for other, other_value in others:
            if other_value is not None and value is not None:
                meaning += f" vs {other}: {100 * (value - other_value):+.1f} points {headline}."
        return result, meaning
    best = best_baseline(records, task)
    if best is None:
        return result, f"{_method_of(record)} on {task}; no prompting baseline recorded yet to compare with."
    delta = 100 * (value - best[1])
    baseline = f"the best prompting baseline ({best[0]}, {headline} {_fmt(best[1])}%)"
    if delta > 0:
        verdict = f"beats {baseline} by {delta:+.1f} points"
    elif delta == 0:
        verdict = f"does NOT beat {baseline}: a tie ({headline} {_fmt(value)}% for both)"
    else:
        verdict = f"does NOT beat {baseline}: {delta:+.1f} points"
    return result, f"{_method_of(record)} {verdict} on the same evaluation examples."


# ---------------------------------------------------------------------------------------------- summary


SUMMARY_COMMAND = "python scripts/run_hf_experiments.py --summary-only"


def summary_markdown(records: dict[str, dict[str, Any]]) -> str:
    """SUMMARY.md text: one table per task, comparisons and protocol notes, all from the records."""
    lines = [
        "# Hugging Face finetuning results",
        "",
        f"Generated from the JSON records in this folder (`{SUMMARY_COMMAND}`); do not edit by hand.",
        "Metrics in percent. Each table's rows are graded by the same task scorer on the same examples.",
        "",
    ]
    for task, title in TASK_TITLES.items():
        rows = [(n, r) for n, r in records.items() if r["task"] == task]
        missing = [n for n in RUNS if n.startswith(f"{task}-") and n not in records]
        lines += [f"## {title}", ""]
        metrics = TASK_METRICS[task]
        derived = sorted({k for _, rec in rows for k in rec.get("derived", {})})
        header = ["run", "method", "trained on", "evaluated on"] + [METRIC_LABELS.get(m, m) for m in metrics]
        header += [DERIVED_LABELS[k] for k in derived]
        if rows:
            lines += ["| " + " | ".join(header + ["wall time"]) + " |", "|" + "---|" * (len(header) + 1)]
        for name, rec in rows:
            cells = [f"`{name}`", _method_of(rec), _train_set(rec), _eval_set(rec)]
            cells += [_fmt(rec["metrics"].get(m)) for m in metrics]
            cells += [_fmt(rec["derived"].get(k)) for k in derived]
            cells.append(f"{rec['duration_s'] / 60:.1f} min")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for name, rec in rows:
            if not _is_prompting(rec):
                lines.append(f"- `{name}`: {describe_result(name, records)[1]}")
        if missing:
            lines.append(f"- Not run yet: {', '.join(f'`{n}`' for n in missing)}.")
        notes = sorted({rec["protocol"]["note"] for _, rec in rows if rec["protocol"].get("note")})
        lines += [f"- Protocol: {n}." for n in notes]
        lines.append("")
    weights = sorted(
        {r["protocol"].get("weights", "") for r in records.values() if r["protocol"].get("weights")}
    )
    if weights:
        lines += ["## Weights", ""] + [f"- {w}" for w in weights] + [""]
    devices = sorted({f"{r['device']} / {r['dtype']}" for r in records.values()})
    commits = sorted({r["git_commit"][:10] for r in records.values()})
    if records:
        lines += [
            "## Provenance",
            "",
            f"- device / dtype: {', '.join(devices)}; git commits: {', '.join(commits)}",
            "- Exact commands are in each record's `command` field; per-example predictions in `predictions/`.",
            "",
        ]
    return "\n".join(lines)


def write_summary(cfg: HFExperimentsConfig) -> Path:
    path = Path(cfg.record_dir) / "SUMMARY.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(summary_markdown(load_records(cfg.record_dir)))
    return path


# ---------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modern-llm hf-experiments",
        description="Prompting baselines vs LoRA/QLoRA on SST-2, GSM8K and SAMSum with one HF model: records "
        "under --record-dir, a dated entry per run in the experiment log, and a generated SUMMARY.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="runs: "
        + ", ".join(RUNS)
        + "\n\nconfig fields (override any with --field value):\n"
        + config_help(HFExperimentsConfig()),
    )
    p.add_argument("--config", help="YAML file filling the config (e.g. configs/hf/smollm2_cpu.yaml)")
    p.add_argument("--only", nargs="+", choices=RUNS, help="run only these (default: config 'runs')")
    p.add_argument("--force", action="store_true", help="re-run runs whose record already exists")
    p.add_argument("--list", action="store_true", help="print the plan (run, status) and exit")
    p.add_argument("--summary-only", action="store_true", help="only rebuild SUMMARY.md from the records")
    return p


def config_from_argv(argv: list[str]) -> tuple[HFExperimentsConfig, argparse.Namespace]:
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(HFExperimentsConfig, args.config, overrides or None)
        if args.only:
            cfg = dataclasses.replace(cfg, runs=list(args.only))
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
        raise  # unreachable
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    from modern_llm.utils.records import append_log, current_command

    cfg, args = config_from_argv(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = current_command()
    if args.summary_only:
        print(f"wrote {write_summary(cfg)}")
        return 0
    existing = load_records(cfg.record_dir)
    if args.list:
        for name in cfg.runs:
            print(f"{name:<16} {'done' if name in existing else 'to run'}")
        return 0
    torch.set_num_threads(cfg.threads)
    log.info("config: %s", json.dumps(config_to_dict(cfg)))
    plan = run_plan(cfg, _ModelCache(cfg.model))
    for name in cfg.runs:
        if name in existing and not args.force:
            log.info("%s: record exists, skipped (--force re-runs it)", name)
            continue
        t0 = time.time()
        log.info("%s: running", name)
        plan[name]()
        records = load_records(cfg.record_dir)
        result, meaning = describe_result(name, records)
        append_log(
            f"hf-experiments: {name} ({cfg.model})",
            what=f"{name}: {_method_of(records[name])} on {records[name]['task']} ({_eval_set(records[name])}), "
            f"record {cfg.record_dir}/{name}.json",
            command=command,
            result=result,
            meaning=meaning,
            path=cfg.log,
        )
        write_summary(cfg)
        log.info("%s: done in %.0f s: %s", name, time.time() - t0, result)
    write_summary(cfg)
    return 0


__all__ = ["HFExperimentsConfig", "RUNS", "main", "run_plan", "summary_markdown", "describe_result"]


if __name__ == "__main__":
    raise SystemExit(main())
