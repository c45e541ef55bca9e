"""How sensitive is the DPO stage? Re-run it from a finished pipeline run's SFT policy and on-policy pairs.

    modern-llm dpo-sweep --pipeline configs/alignment/arithmetic_scratch_strict.yaml --seeds 0,1,2

For every seed folder the alignment pipeline left (``sft_final/`` + ``pairs.jsonl``, written with
``save_models``) and every grid point (lr x sft_weight x dpop_lambda, at ``beta``), the DPO stage is trained
again from the same SFT policy on the same pairs (``training.train_dpo``, the one trainer) and scored with
greedy accuracy on the pipeline's own eval questions through the one engine. The table says whether a DPO
result is a robust effect or a lucky hyper-parameter. ``sft_weight`` = 0 and ``dpop_lambda`` = 0 is plain
DPO; a large ``sft_weight`` is essentially rejection-sampling finetuning on the chosen solutions (RPO's NLL
term dominates); ``dpop_lambda`` > 0 is DPO-Positive.

Design choices
- Nothing is re-sampled: the pairs are exactly the ones the pipeline trained on, so the only thing that varies
  is the DPO optimisation.
- Each seed's results are kept in ``seed<k>/dpo_sweep/results.json`` with the grid that produced them and
  re-used by a later run with the same grid, so seeds can be swept as the pipeline finishes them
  (``--seeds 0`` now, ``--seeds 0,1,2`` later for the aggregated record).
- Greedy accuracy only (no N samples): it is the pipeline's headline number for the DPO stage and keeps a
  grid point at about a minute on one CPU core for the scratch model.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modern_llm.config.base import load_config, parse_config_cli
from modern_llm.utils.records import load_cached_result, save_cached_result

log = logging.getLogger(__name__)


@dataclass
class DPOSweepConfig:
    name: str = "dpo-sweep-arithmetic-scratch-strict"
    pipeline: str = "configs/alignment/arithmetic_scratch_strict.yaml"  # the run to re-use (its out_dir)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lrs: list[float] = field(default_factory=lambda: [1e-4])
    sft_weights: list[float] = field(default_factory=lambda: [0.0, 1.0, 100.0])
    # DPO-Positive penalty (Pal et al. 2024 used 50): chosen log-probs may not fall below the reference
    dpop_lambdas: list[float] = field(default_factory=lambda: [0.0, 50.0])
    beta: float = 0.1
    max_steps: int = 60
    results_dir: str = "experiments/alignment"
    threads: int = 1

    def __post_init__(self) -> None:
        if not self.seeds or not self.lrs or not self.sft_weights or not self.dpop_lambdas:
            raise ValueError("seeds, lrs, sft_weights and dpop_lambdas must each list at least one value")
        if any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"lrs must be > 0, got {self.lrs}")


def greedy_accuracy(model, tokenizer, task, examples, prompts, max_new_tokens: int, batch: int) -> float:
    from modern_llm.alignment.alignment_pipeline import _sampling
    from modern_llm.data.preference_datasets import sample_solutions
    from modern_llm.training.train_sft import generation_model, stop_token_ids

    rows = sample_solutions(
        generation_model(model),
        tokenizer,
        task,
        examples,
        prompts,
        1,
        _sampling(0.0, max_new_tokens, 0),
        stop_token_ids(tokenizer),
        batch,
    )
    return sum(row[0].correct for row in rows) / len(rows)


def sweep_seed(cfg: DPOSweepConfig, pipe: Any, seed: int) -> dict[str, float]:
    """{"sft": acc, "lr=..,sft_weight=..": acc, ...} for one seed folder of the pipeline run."""
    from modern_llm.alignment.alignment_pipeline import _seeded, _task_and_data
    from modern_llm.data.preference_datasets import load_preference_jsonl
    from modern_llm.training.train_dpo import train_dpo
    from modern_llm.training.train_sft import load_policy

    seed_dir = Path(pipe.out_dir) / f"seed{seed}"
    cache, grid = _cache_file(pipe, seed), _grid(cfg)
    saved = cached_results(cfg, pipe, seed)
    if saved is not None:
        log.info("seed %d: re-using %s", seed, cache)
        return saved
    policy_dir, pairs_file = seed_dir / "sft_final", seed_dir / "pairs.jsonl"
    if not policy_dir.is_dir() or not pairs_file.is_file():
        raise FileNotFoundError(
            f"{seed_dir} has no sft_final/ + pairs.jsonl: run the pipeline first "
            f"(modern-llm align --config {cfg.pipeline} --seeds {seed})"
        )
    _, _, evals = _task_and_data(pipe)
    task, eval_examples = evals[0].task, evals[0].examples  # the pipeline's primary eval set
    pairs = load_preference_jsonl(pairs_file)
    model, tokenizer = load_policy(policy_dir)
    prompts = [task.render_prompt(ex, chat=pipe.data.chat, tokenizer=tokenizer) for ex in eval_examples]

    def accuracy(policy) -> float:
        return greedy_accuracy(
            policy, tokenizer, task, eval_examples, prompts, pipe.eval.max_new_tokens, pipe.eval.batch_prompts
        )

    out = {"sft": accuracy(model)}
    for lr, weight, dpop in itertools.product(cfg.lrs, cfg.sft_weights, cfg.dpop_lambdas):
        model, _ = load_policy(policy_dir)
        dpo_cfg = dataclasses.replace(pipe.dpo, beta=cfg.beta, sft_weight=weight, dpop_lambda=dpop)
        name = variant_name(lr, weight, dpop)
        run_dir = seed_dir / "dpo_sweep" / name
        shutil.rmtree(run_dir, ignore_errors=True)  # the sweep's own scratch folder: a re-run starts over
        train_cfg = dataclasses.replace(
            _seeded(pipe.dpo_train, seed, run_dir, len(pairs)),
            lr=lr,
            max_steps=cfg.max_steps,
            warmup_steps=min(pipe.dpo_train.warmup_steps, cfg.max_steps),
        )
        train_dpo(model, tokenizer, pairs, dpo_cfg, train_cfg)
        out[name] = accuracy(model)
        log.info("seed %d: %s -> %.3f (SFT %.3f)", seed, name, out[name], out["sft"])
    save_cached_result(cache, grid, out)
    return out


def _grid(cfg: DPOSweepConfig) -> dict[str, Any]:
    return {
        "lrs": cfg.lrs,
        "sft_weights": cfg.sft_weights,
        "dpop_lambdas": cfg.dpop_lambdas,
        "beta": cfg.beta,
        "max_steps": cfg.max_steps,
    }


def _cache_file(pipe: Any, seed: int) -> Path:
    return Path(pipe.out_dir) / f"seed{seed}" / "dpo_sweep" / "results.json"


def cached_results(cfg: DPOSweepConfig, pipe: Any, seed: int) -> dict[str, float] | None:
    """A seed's saved accuracies when they were produced by this exact grid, else None."""
    return load_cached_result(_cache_file(pipe, seed), _grid(cfg))


def variant_name(lr: float, sft_weight: float, dpop_lambda: float) -> str:
    return f"lr={lr:g},sft_weight={sft_weight:g},dpop={dpop_lambda:g}"


def run(cfg: DPOSweepConfig) -> dict[str, Any]:
    import torch

    from modern_llm.alignment.alignment_pipeline import PipelineConfig
    from modern_llm.evaluation import metrics
    from modern_llm.utils.records import now_iso, write_record

    torch.set_num_threads(cfg.threads)
    started, t0 = now_iso(), time.time()
    pipe = load_config(PipelineConfig, cfg.pipeline)
    reused = [seed for seed in cfg.seeds if cached_results(cfg, pipe, seed) is not None]
    per_seed = {seed: sweep_seed(cfg, pipe, seed) for seed in cfg.seeds}
    names = list(per_seed[cfg.seeds[0]])
    summary = {k: list(metrics.mean_std([per_seed[s][k] for s in cfg.seeds])) for k in names}
    gains = {
        k: list(metrics.mean_std([per_seed[s][k] - per_seed[s]["sft"] for s in cfg.seeds]))
        for k in names
        if k != "sft"
    }
    results = Path(cfg.results_dir)
    record = write_record(
        results / f"{cfg.name}.json",
        name=cfg.name,
        task=f"alignment/{pipe.data.task}",
        model=pipe.model,
        # one row per variant (the report's tables read rows from the first nested level)
        metrics={
            "variants": {
                name: {"greedy_accuracy": summary[name]}
                | ({"gain_vs_sft": gains[name]} if name in gains else {})
                for name in names
            },
            "per_seed": {name: {f"seed{s}": per_seed[s][name] for s in cfg.seeds} for name in names},
        },
        protocol={
            "pipeline": cfg.pipeline,
            "eval": f"greedy accuracy, first {pipe.eval.n_questions} questions of {pipe.eval.split}",
            "beta": cfg.beta,
            "max_steps": cfg.max_steps,
            "pairs": "the pipeline run's own on-policy pairs (seed<k>/pairs.jsonl), not re-sampled",
            "seeds": cfg.seeds,
            # duration_s covers this invocation only; these seeds' results were computed by an earlier one
            "seeds_reused_from_cache": reused,
            "config": dataclasses.asdict(cfg),
        },
        seed=cfg.seeds[0],
        device=pipe.dpo_train.device,
        dtype=pipe.dpo_train.dtype,
        started=started,
        duration_s=time.time() - t0,
    )
    (results / f"{cfg.name}.md").write_text(markdown_table(cfg, summary, gains))
    return {"record": str(record), "summary": summary, "gains": gains}


def markdown_table(
    cfg: DPOSweepConfig, summary: dict[str, list[float]], gains: dict[str, list[float]]
) -> str:
    lines = [
        f"# {cfg.name}",
        "",
        f"DPO re-trained from each seed's SFT policy on the same pairs (beta {cfg.beta}, {cfg.max_steps} steps); "
        f"greedy accuracy in %, mean ± std over seeds {cfg.seeds}. `sft_weight=0,dpop=0` is plain DPO, "
        "`dpop` > 0 DPO-Positive, `sft_weight` > 0 adds the chosen NLL (RPO).",
        "",
        "| variant | greedy acc | gain vs SFT (paired) |",
        "|---|---|---|",
        f"| SFT (start) | {100 * summary['sft'][0]:.1f} ± {100 * summary['sft'][1]:.1f} | – |",
    ]
    for name, gain in gains.items():
        acc = summary[name]
        lines.append(
            f"| {name} | {100 * acc[0]:.1f} ± {100 * acc[1]:.1f} | {100 * gain[0]:+.1f} ± {100 * gain[1]:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config_cli(
        DPOSweepConfig,
        sys.argv[1:] if argv is None else argv,
        prog="modern-llm dpo-sweep",
        description="Re-train the DPO stage of a finished alignment-pipeline run over a small grid "
        "(lr x chosen-NLL weight x DPOP lambda) from the same SFT policy and pairs; greedy accuracy per grid point.",
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = run(cfg)
    print(json.dumps(out["gains"], indent=1))
    print(f"record: {out['record']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
