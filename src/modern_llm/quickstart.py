"""``modern-llm quickstart``: the whole lifecycle on embedded data, no downloads, ~10 minutes on 2 CPU cores.

    tokenizer -> pretrain a tiny ModernDecoderLM (synthetic arithmetic + embedded stories)
              -> SFT -> on-policy pairs -> verifier -> DPO -> self-consistency / best-of-N
              -> report card (Markdown + PNG) with the stage-gain table

Every stage is the project's own stage function (one trainer, one engine, one task object); this module
only chooses small sizes and writes the card. The card states honestly when a stage did not help.

Design choices
- Pretraining mixes the embedded story corpus with synthetic problems drawn from a seed range disjoint from
  the task's train/test seeds, so the "base" model already knows the solution format (non-zero accuracy) but
  has never seen an evaluation question.
- One seed by default (time budget); ``--seeds 0,1,2`` gives mean ± std like the full experiments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from modern_llm.config.base import apply_overrides

PRETRAIN_SEED = (
    1000  # synthetic problems for pretraining: disjoint from the task's seeds 0 (train) / 2 (test)
)


def write_pretraining_corpus(path: Path, n_problems: int, n_stories: int) -> Path:
    """JSONL of synthetic solved problems + embedded stories (the base model's whole world)."""
    from modern_llm.data.lm_datasets import generate_embedded_corpus
    from modern_llm.data.synthetic import generate_dataset

    rows = [f"{p['question']}\n{p['solution']}" for p in generate_dataset(n_problems, seed=PRETRAIN_SEED)]
    rows += generate_embedded_corpus(n_stories)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for text in rows:
            fh.write(json.dumps({"text": text}) + "\n")
    return path


def pretrain(out: Path, fast: bool) -> tuple[Path, dict[str, Any]]:
    from modern_llm.training.train_lm import LMRunConfig, run

    corpus = write_pretraining_corpus(out / "pretrain.jsonl", 300 if fast else 3000, 100 if fast else 600)
    cfg = apply_overrides(
        LMRunConfig(),
        {
            "name": "quickstart-pretrain",
            "model.d_model": 64 if fast else 128,
            "model.n_layers": 2 if fast else 4,
            "model.n_heads": 4,
            "model.n_kv_heads": 2,
            "model.max_seq_len": 256,
            "train.out_dir": str(out / "pretrain"),
            "train.max_steps": 20 if fast else 300,
            "train.batch_size": 8 if fast else 12,
            "train.lr": 3e-3,
            "train.warmup_steps": 5 if fast else 40,
            "train.eval_every": 0,
            "train.eval_batches": 4 if fast else 20,
            "train.log_every": 10,
            "train.tensorboard": False,
            "data.corpus": f"jsonl:{corpus}",
            "data.vocab_size": 512 if fast else 1024,
            "data.cache_dir": str(out / "token_cache"),
            "sample.prompt": "Tom has 3 apples.",
            "sample.max_new_tokens": 30,
        },
    )
    summary = run(cfg)
    return Path(cfg.train.out_dir), summary


def align(pretrained: Path, out: Path, seeds: list[int], fast: bool) -> dict[str, Any]:
    from modern_llm.alignment.alignment_pipeline import PipelineConfig, run_pipeline

    cfg = apply_overrides(
        PipelineConfig(),
        {
            "name": "quickstart",
            "model": str(pretrained),
            "seeds": seeds,
            "out_dir": str(out / "alignment"),
            "results_dir": str(out),
            "reuse_seeds": False,  # the demo trains every stage each time it runs
            "data.task_args": {"n_train": 400 if fast else 2000, "n_eval": 200},
            "sft_train.max_steps": 10 if fast else 500,
            "sft_train.warmup_steps": 2 if fast else 20,
            "sft_train.batch_size": 8 if fast else 16,
            "pairs.n_questions": 16 if fast else 300,
            "pairs.num_samples": 4 if fast else 8,
            # a right answer reached through a wrong step is a lucky guess, not a chosen/positive example
            "pairs.strict": True,
            # every-token BCE + within-question ranking: BCE on the last token alone learned which QUESTIONS
            # are easy, not which of a question's samples is right (LOG.md); batches then count questions
            "verifier.pooling": "mean",
            "verifier.rank_weight": 1.0,
            "verifier_train.batch_size": 4,
            "verifier_train.max_steps": 10 if fast else 150,
            "verifier_train.warmup_steps": 2 if fast else 5,
            "dpo_train.max_steps": 5 if fast else 60,
            # plain DPO lowered the chosen log-probs with the rejected ones here (negative result in LOG.md);
            # DPO-Positive penalises exactly that (the strict alignment config's choice, see dpo-sweep)
            "dpo.dpop_lambda": 50.0,
            "dpo_train.lr": 1e-4,
            "verifier.pos_weight": 4.0,
            "dpo_train.warmup_steps": 1 if fast else 5,
            "eval.n_questions": 8 if fast else 100,
            "eval.num_samples": 4 if fast else 8,
            "eval.max_new_tokens": 64 if fast else 128,
        },
    )
    return run_pipeline(cfg)


def plot_stage_card(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(summary)
    keys = [
        ("accuracy", "greedy"),
        ("maj_at_n", "maj@N"),
        ("verifier_at_n", "verifier@N"),
        ("pass_at_n", "pass@N"),
    ]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(keys)
    for k, (key, label) in enumerate(keys):
        means = [summary[s].get(key, [float("nan")])[0] for s in stages]
        stds = [summary[s].get(key, [0.0, 0.0])[1] for s in stages]
        ax.bar([i + k * width for i in range(len(stages))], means, width, yerr=stds, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(stages))], stages)
    ax.set_ylabel("accuracy on held-out problems")
    ax.set_ylim(0, 1)
    ax.legend(ncol=4, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sampling_noise(accuracy: float, n_questions: int) -> float:
    """Standard error of a difference of two accuracies near ``accuracy`` on ``n_questions`` questions each:
    with one seed the seed spread is 0, and one or two questions flipping is not an effect."""
    if n_questions <= 0:
        return 0.0
    p = min(max(accuracy, 0.0), 1.0)
    return (2 * p * (1 - p) / n_questions) ** 0.5


def report_card(out: Path, pre: dict[str, Any], aligned: dict[str, Any], seconds: float) -> str:
    summary, gains = aligned["summary"], aligned["stage_gains"]
    lines = [
        "# modern_llm quickstart report card",
        "",
        f"Wall time: {seconds / 60:.1f} min on this machine. Everything below was trained in this run.",
        "",
        "## Pretraining",
        f"- val loss {pre.get('eval/loss', float('nan')):.3f} | ppl {pre.get('eval/ppl', float('nan')):.2f}"
        f" | bits/byte {pre.get('eval/bpb', float('nan')):.3f} ({pre['step']} steps, {pre['params']:,} params)",
        f"- sample: `{pre['sample'][:160]!s}`",
        "",
        "## Stages (held-out synthetic problems; mean ± std over seeds)",
        "",
        "| stage | greedy acc | maj@N | verifier@N | pass@N (oracle) |",
        "|---|---|---|---|---|",
    ]

    def pm(stage: str, key: str) -> str:
        value = summary[stage].get(key)
        return "—" if value is None else f"{value[0]:.3f} ± {value[1]:.3f}"

    for stage in summary:
        cells = [pm(stage, k) for k in ("accuracy", "maj_at_n", "verifier_at_n", "pass_at_n")]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += ["", "## What each stage added", ""]
    n_questions = int(aligned.get("protocol", {}).get("n_eval_questions", 0))
    for gain in gains:
        if "gain" not in gain:  # the first stage is the reference point
            lines.append(f"- {gain['stage']}: {gain['metric']} = {gain['value'][0]:.3f} (starting point)")
            continue
        mean, std = gain["gain"]
        noise = max(std, sampling_noise(gain["value"][0], n_questions))
        verdict = "helped" if mean - noise > 0 else "hurt" if mean + noise < 0 else "no clear change"
        lines.append(f"- {gain['stage']}: {gain['metric']} {mean:+.3f} ± {std:.3f} ({verdict})")
    lines.append(
        f"\n(A change counts as helped/hurt only beyond the seed spread AND the binomial noise of "
        f"{n_questions} questions, sqrt(2p(1-p)/n).)"
    )
    lines += ["", "Figures: `stages.png` (this card), `pretrain/loss_curve.png` (pretraining)."]
    card = "\n".join(lines) + "\n"
    (out / "report_card.md").write_text(card)
    plot_stage_card(summary, out / "stages.png")
    return card


def write_run_records(
    out: Path, pre: dict[str, Any], aligned: dict[str, Any], started: str, seconds: float, fast: bool
) -> list[Path]:
    """The run as two table-shaped records: ``quickstart_run.json`` (total wall time and the pretraining
    numbers, one row) and ``quickstart_stages.json`` (one row per stage, the card's table)."""
    import os

    import torch

    from modern_llm.utils.records import write_record

    name = "quickstart-fast" if fast else "quickstart"
    common = {
        "task": "quickstart/arithmetic",
        "model": "scratch ModernDecoderLM (pretrained in the run)",
        "protocol": aligned.get("protocol", {})
        | {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "seed": int(aligned["per_seed"][0]["seed"]) if aligned.get("per_seed") else None,
        "device": "cpu",
        "dtype": "fp32",
        "started": started,
        "duration_s": seconds,
    }
    pretrain = {f"pretrain_{k.removeprefix('eval/')}": v for k, v in pre.items() if k.startswith("eval/")}
    run_metrics = {"total_wall_s": round(seconds, 1), "pretrain_steps": pre["step"]} | pretrain
    return [
        write_record(out / "quickstart_run.json", name=name, metrics=run_metrics, **common),
        write_record(
            out / "quickstart_stages.json", name=f"{name}-stages", metrics=aligned["summary"], **common
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="modern-llm quickstart",
        description="Run the whole lifecycle on embedded data (no downloads): tokenizer, pretraining, SFT, "
        "DPO, verifier, self-consistency/best-of-N, and a report card (Markdown + PNG).",
    )
    p.add_argument("--out", default="runs/quickstart", help="folder for checkpoints, records and the card")
    p.add_argument("--seeds", default="0", help="comma-separated seeds for the alignment stages")
    p.add_argument("--fast", action="store_true", help="seconds-long smoke version (tests/CI)")
    p.add_argument(
        "--save-to",
        default=None,
        help="also copy the card, its PNG and the run's two records here (e.g. experiments/quickstart)",
    )
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    from modern_llm.utils.records import now_iso

    started, t0 = now_iso(), time.time()
    print("[1/3] tokenizer + pretraining", flush=True)
    pretrained, pre = pretrain(out, args.fast)
    print("[2/3] SFT -> pairs -> verifier -> DPO -> evaluation of every stage", flush=True)
    aligned = align(pretrained, out, [int(s) for s in args.seeds.split(",")], args.fast)
    print("[3/3] report card", flush=True)
    card = report_card(out, pre, aligned, time.time() - t0)
    records = write_run_records(out, pre, aligned, started, time.time() - t0, args.fast)
    print(card)
    print(f"saved: {out / 'report_card.md'}, {out / 'stages.png'}, " + ", ".join(map(str, records)))
    if args.save_to:
        import shutil

        dest = Path(args.save_to)
        dest.mkdir(parents=True, exist_ok=True)
        for path in (out / "report_card.md", out / "stages.png", *records):
            shutil.copy2(path, dest / path.name)
        print(f"copied to {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
