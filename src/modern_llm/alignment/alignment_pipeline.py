"""The alignment pipeline: base -> SFT -> DPO -> DPO + verifier reranking, evaluated the same way at each stage.

    modern-llm align --config configs/alignment/arithmetic_scratch.yaml [--seeds 0,1,2 ...]

Per seed:
1. ``base``: the starting policy -- a fresh ModernDecoderLM (``model: scratch``; it has seen nothing) or a
   pretrained/instruct HF model.
2. ``sft``: SFT on the task's train split (``training.train_sft``; LoRA for HF models when enabled, merged
   afterwards so the next stage starts from a plain model).
3. On-policy data: the SFT policy samples ``pairs.num_samples`` solutions per train question
   (``data.preference_datasets``); the task's checker labels them. Questions with both outcomes give DPO pairs;
   all labelled samples train the verifier. With ``pairs.strict`` a correct answer counts as good only when
   every arithmetic step in it is right too (``task.steps_valid``), for both the pairs and the labels.
4. ``verifier``: trunk copied from the SFT policy + scalar head, BCE (``training.train_verifier``).
5. ``dpo``: DPO from the SFT policy, reference = the SFT policy, log-probs precomputed (``training.train_dpo``).
6. ``dpo+verifier``: the DPO policy's N samples reranked by the verifier (best-of-N).

Evaluation protocol, identical for every stage (``evaluate_policy``): the first ``eval.n_questions``
questions of ``eval.split`` of the train task, or of each task in ``eval_tasks`` (train on GSM8K, evaluate
on SVAMP and GSM8K: one table per task, the models and verifier shared); accuracy with greedy decoding;
N = ``eval.num_samples`` samples at
``eval.temperature`` per question (one prefill per question, the engine's ``num_samples``); from the same N
samples: maj@N (majority vote over extracted answers, ``metrics.majority_vote``), verifier@N (the sample
with the highest verifier score), weighted@N (verifier-weighted vote), pass@N (oracle: any sample correct,
``metrics.pass_at_k(N, c, N)``) and sampled pass@1. The verifier is trained after SFT, so verifier@N of the
base/SFT rows is computed once it exists (the samples are kept). Every number is reported as mean ± std
over seeds (``metrics.mean_std``) in a Markdown table and a JSON record under ``experiments/alignment/``,
together with a stage-gain table (what each stage adds to the headline number: greedy accuracy for
base/SFT/DPO, verifier@N for the reranking stage).

With ``save_models`` each seed folder keeps ``sft_final/``, ``dpo_final/`` (``load_policy`` folders) and
``verifier_final/`` (``load_verifier``), so test-time compute (``modern-llm test-time --model ... --verifier
...``), chat and serve run on exactly the models in the table.

``stop_after`` ("base" / "sft") ends a seed early, e.g. to measure a large model's base pass@1 / pass@N on
CPU before committing hours to the later stages; the tables then hold only the stages that ran.

Design choices
- Nothing here trains or samples by itself: it only chains the stage functions (one trainer, one engine,
  one task object), so the pipeline cannot drift from the stage CLIs.
- The SFT and DPO policies are the SAME module trained in place (no copies of a HF model are held); the
  verifier's trunk is a copy taken right after SFT.
- Train and eval questions never overlap: when both come from the same split (SVAMP has only "test"), the
  train questions start after the eval ones (``data.offset``), which is checked.

Footguns
- ``seeds`` change model init (scratch), data order, and sampling; a seed's eval questions are the same.
- Every finished seed is saved (``seed<k>/seed_result.json``, written atomically, keyed by the settings) and
  re-used by a later run with the same settings: a killed run loses only the seed in progress, and seeds
  can run as separate processes (``--seeds [1]``) before one run with every seed writes the table.
  Delete the file (or change out_dir) to recompute a seed after changing code.
- A copy of each finished seed also goes to ``<results_dir>/seeds/<name>-seed<k>.json`` (metrics only, a few
  KB, with the git commit) and is re-used from there too: committed, it lets the seeds of a slow table be
  run in different sessions or on different machines. Settings that only change float rounding (threads,
  ``dpo.share_prompt``) are not part of the key, like the run's name and output folders. A seed re-used
  from the store has no model folders (``save_models``): rerun it in a fresh out_dir to get them.
- For a scratch model ``base`` is a random network (accuracy ~0 by construction); its row is there so the
  table reads the same for every model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modern_llm.config.base import config_to_dict, parse_config_cli
from modern_llm.config.train_config import TrainConfig
from modern_llm.data.preference_datasets import (
    Sample,
    build_math_pairs,
    sample_solutions,
    save_preference_jsonl,
)
from modern_llm.evaluation import metrics
from modern_llm.training.train_dpo import DPOConfig, train_dpo
from modern_llm.training.train_sft import (
    GENERATION_DTYPES,
    SCRATCH,
    LoRAConfig,
    ScratchConfig,
    TaskDataConfig,
    build_scratch_policy,
    check_chat,
    inference_model,
    load_policy,
    load_task,
    maybe_apply_lora,
    scratch_tokenizer_texts,
    sft_records,
    stop_token_ids,
    train_sft,
    trainer_run_config,
)
from modern_llm.training.train_verifier import (
    VerifierConfig,
    score_solutions,
    train_verifier,
    verifier_records,
)
from modern_llm.utils.records import now_iso, write_record

log = logging.getLogger(__name__)

STAGES = ("base", "sft", "dpo", "dpo+verifier")
METRIC_KEYS = ("accuracy", "maj_at_n", "verifier_at_n", "weighted_at_n", "pass_at_n", "pass_at_1_sampled")


# ----------------------------------------------------------------------------------------------- config


@dataclass
class EvalConfig:
    split: str = "test"
    n_questions: int = 100
    num_samples: int = 8  # N of maj@N / verifier@N / pass@N
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 160
    batch_prompts: int = 32  # prompts per engine call (each expanded to num_samples rows)
    # weights of the model that generates (eval and pair sampling): "bf16" samples from a bf16 copy, faster
    # on CPUs with AMX/AVX512-bf16 (bench/matmul_dtype.py) and on GPUs; the trained weights stay fp32
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.dtype not in GENERATION_DTYPES:
            raise ValueError(f"eval.dtype must be one of {sorted(GENERATION_DTYPES)}, got {self.dtype!r}")


@dataclass
class PairConfig:
    n_questions: int = 300  # train questions the SFT policy samples solutions for
    num_samples: int = 8
    temperature: float = 1.0
    top_k: int = 0
    max_pairs_per_question: int = 2
    # chosen solutions and positive verifier labels also need every arithmetic step right
    # (task.steps_valid); without it a tiny policy's lucky guesses ("8 - 9 = 1 ... #### 1") become chosen
    strict: bool = False
    # questions with no good sample pair the dataset's reference solution (chosen) with a wrong sample
    # (SPIN-style); for policies that solve almost none of the train questions
    gold_fallback: bool = False


def _train(out_dir: str, **kw: Any) -> TrainConfig:
    base = {"device": "cpu", "dtype": "fp32", "progress": False, "tensorboard": False, "keep_last_k": 1}
    return TrainConfig(out_dir=out_dir, **(base | kw))


@dataclass
class PipelineConfig:
    name: str = "alignment-arithmetic-scratch"
    model: str = SCRATCH  # "scratch" | our policy folder | HF folder | registry name
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out_dir: str = "runs/alignment"  # checkpoints, pairs and samples per seed
    results_dir: str = "experiments/alignment"  # Markdown summary + JSON record
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    offset: int = 0  # skip this many questions of data.split (no overlap with eval on a shared split)
    # evaluate every stage on these tasks' eval.split instead of data.task's (e.g. SFT/pairs on gsm8k train,
    # eval on [svamp, gsm8k]); one table + record per task, named <name>-<task>. Empty = data.task only.
    eval_tasks: list[str] = field(default_factory=list)
    instruction: str | None = None  # override the task's instruction line (None = the task's own)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    sft_train: TrainConfig = field(
        default_factory=lambda: _train("runs/alignment/sft", lr=2e-3, warmup_steps=20, max_steps=300)
    )
    pairs: PairConfig = field(default_factory=PairConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    dpo_train: TrainConfig = field(
        default_factory=lambda: _train("runs/alignment/dpo", lr=1e-4, warmup_steps=5, max_steps=60)
    )
    dpo_lora: bool = False  # DPO with fresh LoRA adapters on the (merged) SFT model (HF models only)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    verifier_train: TrainConfig = field(
        default_factory=lambda: _train("runs/alignment/verifier", lr=5e-4, warmup_steps=5, max_steps=100)
    )
    eval: EvalConfig = field(default_factory=EvalConfig)
    skip_sft: bool = False  # start DPO from the base (e.g. an instruct model already good at the format)
    stop_after: str = "dpo"  # "base" | "sft" | "dpo" (= every stage, verifier included)
    save_models: bool = True  # seed<k>/{sft,dpo,verifier}_final folders, for test-time compute and chat
    reuse_seeds: bool = True  # re-use a seed finished under the same settings (seed<k>/seed_result.json)
    # an earlier record of this pipeline: its seeds go to the seed store first when its settings match
    import_record: str | None = None
    threads: int = 0  # torch intra-op threads; 0 = torch's default. 1 is much faster on a shared, loaded CPU

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds must list at least one seed, e.g. --seeds 0,1,2")
        if self.offset < 0:
            raise ValueError(f"offset must be >= 0, got {self.offset}")
        if self.stop_after not in ("base", "sft", "dpo"):
            raise ValueError(f"stop_after must be 'base', 'sft' or 'dpo', got {self.stop_after!r}")
        if self.eval.num_samples < 2:
            raise ValueError("eval.num_samples must be >= 2 (N for maj@N / verifier@N / pass@N)")


# ----------------------------------------------------------------------------------------------- evaluation


@dataclass
class StageSamples:
    """What one stage produced on the eval questions (kept so verifier@N can be computed later)."""

    greedy: list[Sample]
    sampled: list[list[Sample]]


def _sampling(temperature: float, max_new_tokens: int, seed: int, top_k: int = 0, top_p: float = 1.0):
    from modern_llm.inference.sampling import SamplingParams

    return SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed
    )


def generate_for_eval(model, tokenizer, task, examples, prompts, cfg: EvalConfig, seed: int) -> StageSamples:
    """Greedy + N sampled solutions per eval question through the engine."""
    gen_model, stops = inference_model(model, cfg.dtype), stop_token_ids(tokenizer)
    greedy = sample_solutions(
        gen_model,
        tokenizer,
        task,
        examples,
        prompts,
        1,
        _sampling(0.0, cfg.max_new_tokens, seed),
        stops,
        cfg.batch_prompts,
    )
    sampled = sample_solutions(
        gen_model,
        tokenizer,
        task,
        examples,
        prompts,
        cfg.num_samples,
        _sampling(cfg.temperature, cfg.max_new_tokens, seed, cfg.top_k, cfg.top_p),
        stops,
        cfg.batch_prompts,
    )
    return StageSamples([row[0] for row in greedy], sampled)


def score_metrics(
    task, examples, samples: StageSamples, verifier_scores: list[list[float]] | None
) -> dict[str, float]:
    """Accuracy (greedy), maj@N, verifier@N, weighted@N, pass@N, sampled pass@1 for one stage."""
    n = len(samples.sampled[0])
    acc, maj, pass_n, pass_1, ver, wvote = [], [], [], [], [], []
    for q, example in enumerate(examples):
        row = samples.sampled[q]
        c = sum(s.correct for s in row)
        acc.append(samples.greedy[q].correct)
        vote = metrics.majority_vote([s.answer for s in row])
        maj.append(vote is not None and task.is_correct(str(vote), example))
        pass_n.append(metrics.pass_at_k(n, c, n))
        pass_1.append(metrics.pass_at_k(n, c, 1))
        if verifier_scores is not None:
            scores = verifier_scores[q]
            best = max(range(n), key=lambda i: scores[i])  # first index wins ties
            ver.append(row[best].correct)
            weighted = metrics.weighted_vote([s.answer for s in row], scores)
            wvote.append(weighted is not None and task.is_correct(str(weighted), example))
    out = {
        "accuracy": _mean(acc),
        "maj_at_n": _mean(maj),
        "pass_at_n": _mean(pass_n),
        "pass_at_1_sampled": _mean(pass_1),
        "no_answer_rate": _mean([s.answer is None for s in samples.greedy]),
    }
    if verifier_scores is not None:
        out["verifier_at_n"] = _mean(ver)
        out["weighted_at_n"] = _mean(wvote)
    return out


def _mean(values: Sequence[float | bool]) -> float:
    return float(sum(values)) / max(len(values), 1)


def verifier_scores_for(
    verifier, tokenizer, prompts, samples: StageSamples, cfg: VerifierConfig
) -> list[list[float]]:
    n = len(samples.sampled[0])
    flat_prompts = [p for p in prompts for _ in range(n)]
    flat_texts = [s.text for row in samples.sampled for s in row]
    flat = score_solutions(verifier, tokenizer, flat_prompts, flat_texts, cfg.max_length)
    return [flat[q * n : (q + 1) * n] for q in range(len(prompts))]


def verifier_quality(samples: StageSamples, scores: list[list[float]], threshold: float) -> dict[str, float]:
    """AUC / FAR / FRR of the verifier on one stage's eval samples (held-out questions)."""
    from modern_llm.training.train_verifier import evaluate_scores

    labels = [int(s.correct) for row in samples.sampled for s in row]
    flat = [x for row in scores for x in row]
    return evaluate_scores(labels, flat, threshold)


# ----------------------------------------------------------------------------------------------- one seed


def _seeded(cfg: TrainConfig, seed: int, out_dir: Path, n_examples: int | None = None) -> TrainConfig:
    """The stage's train config for one seed; the batch shrinks to fit a small on-policy dataset."""
    batch = cfg.batch_size
    if n_examples is not None and n_examples < batch:
        log.warning(
            "only %d examples for %s: batch_size %d -> %d", n_examples, out_dir.name, batch, n_examples
        )
        batch = n_examples
    return dataclasses.replace(cfg, seed=seed, out_dir=str(out_dir), resume="none", batch_size=batch)


@dataclass
class EvalSet:
    """One evaluation set: its questions, the task that renders and grades them, and the prompts."""

    name: str
    task: Any
    examples: list[Any]
    prompts: list[str] = field(default_factory=list)


def eval_task_names(cfg: PipelineConfig) -> list[str]:
    return list(cfg.eval_tasks) or [cfg.data.task]


def _task_and_data(cfg: PipelineConfig) -> tuple[Any, list[Any], list[EvalSet]]:
    """(train task, train examples, eval sets); the first eval set is the primary one."""
    task = load_task(cfg.data, cfg.instruction)
    want = None if cfg.data.limit is None else cfg.offset + cfg.data.limit
    train_all = task.load(cfg.data.split, data_dir=cfg.data.data_dir, limit=want)
    train_examples = train_all[cfg.offset :]
    evals = []
    for name in eval_task_names(cfg):
        same_task = name == cfg.data.task
        eval_task = (
            task
            if same_task
            else load_task(dataclasses.replace(cfg.data, task_args={}, task=name), cfg.instruction)
        )
        examples = eval_task.load(cfg.eval.split, data_dir=cfg.data.data_dir, limit=cfg.eval.n_questions)
        if same_task and cfg.data.split == cfg.eval.split and cfg.offset < len(examples):
            raise ValueError(
                f"train and eval both use split {cfg.eval.split!r} of {name}: set offset >= eval.n_questions "
                f"({cfg.eval.n_questions}) so the train questions do not include eval questions"
            )
        evals.append(EvalSet(name, eval_task, examples))
    if not train_examples:
        raise ValueError(f"no train examples left in split {cfg.data.split!r} after offset={cfg.offset}")
    return task, train_examples, evals


def _policy(cfg: PipelineConfig, task, train_examples, seed: int):
    if cfg.model == SCRATCH:
        return build_scratch_policy(cfg.scratch, scratch_tokenizer_texts(task, train_examples), seed)
    torch.manual_seed(seed)
    return load_policy(cfg.model)


def _n_verifier_items(cfg: PipelineConfig, records: Sequence[dict[str, Any]]) -> int:
    """Training items of the verifier stage: records, or questions when batches hold whole questions."""
    return len({r["prompt"] for r in records}) if cfg.verifier.rank_weight > 0 else len(records)


def _save_stage_model(cfg: PipelineConfig, model, tokenizer, folder: Path) -> None:
    if cfg.save_models:
        from modern_llm.training.train_sft import save_policy

        save_policy(model, tokenizer, folder)


def _merge_if_lora(model):
    if hasattr(model, "merge_and_unload"):
        from modern_llm.hf.lora_utils import merge_adapter

        return merge_adapter(model)
    return model


def run_seed(cfg: PipelineConfig, seed: int) -> dict[str, Any]:
    """All stages for one seed -> {"stages": {stage: metrics}, "verifier": {...}, "pairs": {...}, ...}."""
    t_seed = time.time()
    seed_dir = Path(cfg.out_dir) / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    task, train_examples, evals = _task_and_data(cfg)
    model, tokenizer = _policy(cfg, task, train_examples, seed)
    check_chat(tokenizer, cfg.data.chat)
    for e in evals:
        e.prompts = [e.task.render_prompt(ex, chat=cfg.data.chat, tokenizer=tokenizer) for ex in e.examples]
    samples: dict[str, dict[str, StageSamples]] = {e.name: {} for e in evals}  # eval set -> stage -> samples
    timings: dict[str, float] = {}

    def timed(key: str, fn, *args, **kw):
        t0 = time.time()
        out = fn(*args, **kw)
        timings[key] = round(time.time() - t0, 1)
        log.info("seed %d: %s took %.1f s", seed, key, timings[key])
        return out

    def evaluate(stage: str) -> None:
        gen_model = inference_model(model, cfg.eval.dtype)  # one (bf16) copy per stage, shared by the sets
        for e in evals:
            key = f"eval_{stage}" if len(evals) == 1 else f"eval_{stage}_{e.name}"
            samples[e.name][stage] = timed(
                key, generate_for_eval, gen_model, tokenizer, e.task, e.examples, e.prompts, cfg.eval, seed
            )

    evaluate("base")
    result = {"seed": seed, "pairs": {}, "dpo_train": {}, "verifier_train": {}, "timings_s": timings}
    if cfg.stop_after == "base":
        return _finish(cfg, result, evals, samples, None, tokenizer, seed_dir, t_seed)

    if not cfg.skip_sft:
        model = maybe_apply_lora(model, cfg.lora)
        records = sft_records(task, train_examples, tokenizer, cfg.data.chat)
        timed(
            "train_sft",
            train_sft,
            model,
            tokenizer,
            records,
            _seeded(cfg.sft_train, seed, seed_dir / "sft"),
            cfg.data.max_length,
            run_config=trainer_run_config(model, cfg),
        )
        model = _merge_if_lora(model)
    _save_stage_model(cfg, model, tokenizer, seed_dir / "sft_final")
    evaluate("sft")
    if cfg.stop_after == "sft":
        return _finish(cfg, result, evals, samples, None, tokenizer, seed_dir, t_seed)

    # On-policy samples from the SFT policy on train questions -> DPO pairs + verifier records.
    pair_examples = train_examples[: cfg.pairs.n_questions]
    pair_prompts = [task.render_prompt(ex, chat=cfg.data.chat, tokenizer=tokenizer) for ex in pair_examples]
    pair_sampling = _sampling(cfg.pairs.temperature, cfg.eval.max_new_tokens, seed + 10_000, cfg.pairs.top_k)
    train_samples = timed(
        "sample_pairs",
        sample_solutions,
        inference_model(model, cfg.eval.dtype),
        tokenizer,
        task,
        pair_examples,
        pair_prompts,
        cfg.pairs.num_samples,
        pair_sampling,
        stop_token_ids(tokenizer),
        cfg.eval.batch_prompts,
    )
    gold = None
    if cfg.pairs.gold_fallback:  # the SFT completion text exactly (plain prompts: with its leading space)
        gold = [
            task.sft_pair(ex, chat=cfg.data.chat, tokenizer=tokenizer)["completion"] for ex in pair_examples
        ]
    pairs, pair_stats = build_math_pairs(
        pair_prompts, train_samples, cfg.pairs.max_pairs_per_question, seed, cfg.pairs.strict, gold
    )
    save_preference_jsonl(pairs, seed_dir / "pairs.jsonl")
    v_records = verifier_records(pair_prompts, train_samples, cfg.pairs.strict)
    _write_jsonl(v_records, seed_dir / "verifier_records.jsonl")

    verifier_summary: dict[str, Any] = {}
    verifier = None
    if 0 < sum(r["label"] for r in v_records) < len(v_records):
        from modern_llm.models.verifier import verifier_from_lm

        verifier = verifier_from_lm(model)
        verifier_summary = timed(
            "train_verifier",
            train_verifier,
            verifier,
            tokenizer,
            v_records,
            cfg.verifier,
            _seeded(cfg.verifier_train, seed, seed_dir / "verifier", _n_verifier_items(cfg, v_records)),
            None,
            {"pipeline": config_to_dict(cfg)},
        )
        if cfg.save_models:
            from modern_llm.models.verifier import save_verifier

            save_verifier(verifier, seed_dir / "verifier_final", tokenizer)
    else:
        log.warning("seed %d: verifier skipped: the SFT samples are all correct or all wrong", seed)

    dpo_summary: dict[str, Any] = {}
    if pairs:
        if cfg.dpo_lora:
            model = maybe_apply_lora(model, dataclasses.replace(cfg.lora, enabled=True))
        dpo_summary = timed(
            "train_dpo",
            train_dpo,
            model,
            tokenizer,
            pairs,
            cfg.dpo,
            _seeded(cfg.dpo_train, seed, seed_dir / "dpo", len(pairs)),
            None,
            trainer_run_config(model, cfg),
        )
        model = _merge_if_lora(model)
    else:
        log.warning(
            "seed %d: no DPO pairs (no question had both a correct and a wrong sample); DPO = SFT", seed
        )
    _save_stage_model(cfg, model, tokenizer, seed_dir / "dpo_final")
    evaluate("dpo")

    result |= {
        "pairs": pair_stats.as_dict(),
        "dpo_train": {k: v for k, v in dpo_summary.items() if isinstance(v, float)},
        "verifier_train": {k: v for k, v in verifier_summary.items() if isinstance(v, float)},
    }
    return _finish(cfg, result, evals, samples, verifier, tokenizer, seed_dir, t_seed)


def _finish(cfg, result, evals, samples, verifier, tokenizer, seed_dir, t_seed):
    """Score every evaluated stage of every eval set (verifier@N once a verifier exists), write the samples.

    ``result["evals"][name]`` holds each set's ``stages``/``verifier_eval``; ``run_pipeline`` lifts one set's
    to the top level of the per-seed rows its table is built from.
    """
    if verifier is not None:
        from modern_llm.models.verifier import inference_verifier

        verifier = inference_verifier(verifier, GENERATION_DTYPES[cfg.eval.dtype])
    per_eval = {}
    for i, e in enumerate(evals):
        per_eval[e.name] = _score_stages(cfg, e, samples[e.name], verifier, tokenizer)
        suffix = "" if i == 0 else f"-{e.name}"
        _write_samples(seed_dir / f"eval_samples{suffix}.jsonl", e.prompts, samples[e.name])
    return result | {
        "evals": per_eval,
        "duration_s": round(time.time() - t_seed, 1),
        "device": cfg.sft_train.device,
    }


def _score_stages(cfg, e: EvalSet, samples: dict[str, StageSamples], verifier, tokenizer) -> dict[str, Any]:
    stage_metrics: dict[str, dict[str, float]] = {}
    verifier_eval: dict[str, dict[str, float]] = {}
    for stage, stage_samples in samples.items():
        scores = None
        if verifier is not None:
            scores = verifier_scores_for(verifier, tokenizer, e.prompts, stage_samples, cfg.verifier)
            if stage != "base":
                verifier_eval[stage] = verifier_quality(stage_samples, scores, cfg.verifier.threshold)
        stage_metrics[stage] = score_metrics(e.task, e.examples, stage_samples, scores)
    if "dpo" in stage_metrics:
        dpo = stage_metrics["dpo"]
        reranked = {"accuracy": dpo["verifier_at_n"]} if verifier is not None else {}
        stage_metrics["dpo+verifier"] = dict(dpo) | reranked
    return {"stages": stage_metrics, "verifier_eval": verifier_eval}


def _write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_samples(path: Path, prompts: Sequence[str], samples: dict[str, StageSamples]) -> None:
    rows = []
    for stage, s in samples.items():
        for q, prompt in enumerate(prompts):
            rows.append(
                {
                    "stage": stage,
                    "question": q,
                    "prompt": prompt,
                    "greedy": s.greedy[q].text,
                    "greedy_correct": s.greedy[q].correct,
                    "samples_correct": [x.correct for x in s.sampled[q]],
                    "samples_answer": [x.answer for x in s.sampled[q]],
                }
            )
    _write_jsonl(rows, path)


# ----------------------------------------------------------------------------------------------- summary


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """stage -> metric -> [mean, std] over seeds (metrics present for every seed only)."""
    out: dict[str, dict[str, list[float]]] = {}
    for stage in STAGES:
        rows = [r["stages"][stage] for r in per_seed if stage in r["stages"]]
        if not rows:
            continue
        keys = [k for k in rows[0] if all(k in r for r in rows)]
        out[stage] = {k: list(metrics.mean_std([r[k] for r in rows])) for k in keys}
    return out


def stage_gains(
    summary: dict[str, dict[str, list[float]]], per_seed: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """What each stage adds to the headline number (paired per seed, then mean ± std)."""
    headline = {"base": "accuracy", "sft": "accuracy", "dpo": "accuracy", "dpo+verifier": "verifier_at_n"}
    rows, previous = [], None
    for stage in STAGES:
        key = headline[stage]
        if stage not in summary or key not in summary[stage]:
            continue
        values = [r["stages"][stage][key] for r in per_seed]
        row = {"stage": stage, "metric": key, "value": metrics.mean_std(values)}
        if previous is not None:
            deltas = [v - p for v, p in zip(values, previous)]
            row["gain"] = metrics.mean_std(deltas)
        rows.append(row)
        previous = values
    return rows


def _pm(pair: Sequence[float]) -> str:
    return f"{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}"


def markdown_summary(
    cfg: PipelineConfig, summary, gains, per_seed, protocol: dict[str, Any], title: str | None = None
) -> str:
    n = cfg.eval.num_samples
    cols = [
        ("accuracy", "greedy acc"),
        ("maj_at_n", f"maj@{n}"),
        ("verifier_at_n", f"verifier@{n}"),
        ("weighted_at_n", f"verifier-weighted@{n}"),
        ("pass_at_n", f"pass@{n} (oracle)"),
        ("pass_at_1_sampled", "sampled pass@1"),
    ]
    lines = [
        f"# {title or cfg.name}",
        "",
        f"Model: `{cfg.model}`; train task: `{cfg.data.task}` {cfg.data.task_args or ''}; eval: first "
        f"{protocol['n_eval_questions']} questions of `{protocol['eval_task']}` split `{cfg.eval.split}`, "
        f"N = {n} samples at T = "
        f"{cfg.eval.temperature}; seeds {cfg.seeds}. Numbers are % (mean ± std over seeds).",
        "",
        "| stage | " + " | ".join(title for _, title in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for stage, vals in summary.items():
        cells = [_pm(vals[k]) if k in vals else "–" for k, _ in cols]
        if stage == "dpo+verifier":  # best-of-N over the DPO row's samples: only the reranked number is new
            cells = ["–", "–", cells[2], "–", "–", "–"]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Stage gains (headline metric, paired per seed)",
        "",
        "| stage | metric | value | gain |",
        "|---|---|---|---|",
    ]
    for row in gains:
        gain = _pm(row["gain"]) if "gain" in row else "–"
        lines.append(f"| {row['stage']} | {row['metric']} | {_pm(row['value'])} | {gain} |")
    lines += [
        "",
        "## Per seed",
        "",
        "| seed | pairs | questions with a pair | SFT sample acc | verifier AUC (SFT / DPO "
        "samples) | FAR / FRR (SFT samples) | time (s) | commit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in per_seed:
        ve = r["verifier_eval"]
        auc = " / ".join(f"{ve[s]['auc']:.3f}" if s in ve else "–" for s in ("sft", "dpo"))
        farfrr = f"{ve['sft']['far']:.3f} / {ve['sft']['frr']:.3f}" if "sft" in ve else "–"
        p = r["pairs"]
        pair_cells = (
            f"{int(p['n_pairs'])} | {int(p['n_with_pair'])}/{int(p['n_questions'])} | "
            f"{100 * p['sample_accuracy']:.1f}%"
            if p
            else "– | – | –"
        )
        # seeds may come from the committed store, run at different commits (and machines): say which
        commit = (r.get("git_commit") or "–")[:7]
        lines.append(f"| {r['seed']} | {pair_cells} | {auc} | {farfrr} | {r['duration_s']} | {commit} |")
    return "\n".join(lines) + "\n"


# Settings that do not change a seed's numbers beyond float rounding: a run that differs only in these
# re-uses finished seeds. Output folders are excluded too, so a seed found in the committed store counts.
_NOT_IN_SEED_KEY = (
    "name",
    "seeds",
    "results_dir",
    "out_dir",
    "threads",
    "save_models",
    "reuse_seeds",
    "import_record",
)
_NOT_IN_SEED_KEY_NESTED = (("dpo", "share_prompt"),)


def seed_key(cfg: PipelineConfig, seed: int) -> dict[str, Any]:
    """The settings that determine one seed's numbers (the cache key of its saved result)."""
    return _key_from_dict(config_to_dict(cfg), seed)


def _key_from_dict(config: dict[str, Any], seed: int) -> dict[str, Any]:
    key = {k: v for k, v in config.items() if k not in _NOT_IN_SEED_KEY}
    for section, name in _NOT_IN_SEED_KEY_NESTED:
        if isinstance(key.get(section), dict):
            key[section] = {k: v for k, v in key[section].items() if k != name}
    return json.loads(json.dumps(key)) | {"seed": seed}


def _seed_paths(cfg: PipelineConfig, seed: int) -> tuple[Path, Path]:
    """(the run folder's cache, the committed store under results_dir) for one seed."""
    return (
        Path(cfg.out_dir) / f"seed{seed}" / "seed_result.json",
        Path(cfg.results_dir) / "seeds" / f"{cfg.name}-seed{seed}.json",
    )


def cached_seed_result(cfg: PipelineConfig, seed: int) -> dict[str, Any] | None:
    """A finished seed's result (run folder first, then the store) made under the same settings, else None."""
    from modern_llm.utils.records import load_cached_result

    for path in _seed_paths(cfg, seed):
        value = load_cached_result(path, seed_key(cfg, seed))
        if value is not None:
            log.info("seed %d: re-using %s (same settings)", seed, path)
            return value
    return None


def import_seeds_from_record(cfg: PipelineConfig, record_path: str | Path) -> list[int]:
    """Put the seeds of an earlier record of this pipeline into the seed store; return the seeds stored.

    The record's settings must equal ``cfg``'s, except settings added to the code since, which must be at
    their default values (they reproduce the old behaviour); otherwise this is an error naming the first
    difference. Each stored seed keeps the record's git commit and names the record it came from.
    """
    from modern_llm.utils.records import read_record, save_cached_result

    record = read_record(record_path)
    old = record.get("protocol", {}).get("config")
    per_seed = record.get("metrics", {}).get("per_seed")
    if not isinstance(old, dict) or not isinstance(per_seed, list):
        raise ValueError(f"{record_path}: not an alignment-pipeline record (no protocol.config / per_seed)")
    new, defaults = seed_key(cfg, 0), seed_key(PipelineConfig(), 0)
    difference = _first_difference(new, _key_from_dict(old, 0), defaults)
    if difference:
        raise ValueError(f"{record_path}: settings differ from this config at {difference}; not imported")
    stored = []
    for entry in per_seed:
        seed = int(entry["seed"])
        if seed not in cfg.seeds:
            continue
        task_view = set(entry.get("evals", {}).get(eval_task_names(cfg)[0], {}))
        value = {k: v for k, v in entry.items() if k not in task_view}  # undo the per-task merge
        value |= {"git_commit": record.get("git_commit"), "imported_from": str(record_path)}
        save_cached_result(_seed_paths(cfg, seed)[1], seed_key(cfg, seed), value)
        stored.append(seed)
    return stored


def _first_difference(new: Any, old: Any, default: Any, path: str = "") -> str | None:
    """Where two seed keys differ (a dotted path), ignoring keys missing from ``old`` that are at default."""
    if not (isinstance(new, dict) and isinstance(old, dict)):
        return None if new == old else f"{path} ({old!r} in the record, {new!r} here)"
    default = default if isinstance(default, dict) else {}
    for k in new:
        where = f"{path}.{k}" if path else k
        if k not in old:  # added to the code since the record: fine at its default value
            if new[k] != default.get(k):
                return f"{where} (a newer setting, not at its default)"
            continue
        found = _first_difference(new[k], old[k], default.get(k), where)
        if found:
            return found
    extra = [k for k in old if k not in new]
    return f"{f'{path}.' if path else ''}{extra[0]} (no longer a setting)" if extra else None


def _seed_result(cfg: PipelineConfig, seed: int) -> dict[str, Any]:
    from modern_llm.utils.records import load_cached_result, run_commit, save_cached_result

    key, (_, store) = seed_key(cfg, seed), _seed_paths(cfg, seed)
    saved = cached_seed_result(cfg, seed) if cfg.reuse_seeds else None
    if saved is not None:
        if load_cached_result(store, key) is None:  # e.g. finished by a process with another --name
            save_cached_result(store, key, saved)
        return saved
    result = run_seed(cfg, seed) | {"git_commit": run_commit()}
    for path in _seed_paths(cfg, seed):
        save_cached_result(path, key, result)
    return result


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every seed, write ``<results_dir>/<name>.{json,md}`` (``<name>-<task>`` per entry of ``eval_tasks``);
    return the primary eval set's summary (plus ``evals``: every set's)."""
    started, t0 = now_iso(), time.time()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.import_record:
        imported = import_seeds_from_record(cfg, cfg.import_record)
        log.info("imported seeds %s from %s into the seed store", imported, cfg.import_record)
    reused = [s for s in cfg.seeds if cfg.reuse_seeds and cached_seed_result(cfg, s) is not None]
    per_seed = [_seed_result(cfg, seed) for seed in cfg.seeds]
    outs = {}
    for name in eval_task_names(cfg):
        view = [r | r.get("evals", {}).get(name, {}) for r in per_seed]
        record_name = f"{cfg.name}-{name}" if cfg.eval_tasks else cfg.name
        outs[name] = _write_results(cfg, record_name, name, view, reused, started, t0)
    return outs[eval_task_names(cfg)[0]] | {"evals": outs}


def _write_results(cfg, record_name: str, eval_task: str, per_seed, reused, started, t0) -> dict[str, Any]:
    summary = aggregate(per_seed)
    gains = stage_gains(summary, per_seed)
    protocol = {
        "eval_task": eval_task,
        "train_task": cfg.data.task,
        "n_eval_questions": cfg.eval.n_questions,
        "eval_split": cfg.eval.split,
        "N": cfg.eval.num_samples,
        "temperature": cfg.eval.temperature,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "greedy": "accuracy column = greedy decoding",
        "generation_dtype": cfg.eval.dtype,
        "seeds": list(cfg.seeds),
        "train_split": cfg.data.split,
        "train_offset": cfg.offset,
        "chat": cfg.data.chat,
        "torch_threads": torch.get_num_threads(),
        "seeds_reused_from_cache": reused,
        "config": config_to_dict(cfg),
    }
    results = Path(cfg.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    table = markdown_summary(cfg, summary, gains, per_seed, protocol, record_name)
    (results / f"{record_name}.md").write_text(table)
    write_record(
        results / f"{record_name}.json",
        name=record_name,
        task=f"alignment/{eval_task}",
        model=cfg.model,
        metrics={"summary": summary, "stage_gains": gains, "per_seed": per_seed},
        protocol=protocol,
        seed=None,
        device=per_seed[0]["device"],
        dtype=cfg.sft_train.dtype,
        started=started,
        duration_s=time.time() - t0,
    )
    return {"summary": summary, "stage_gains": gains, "per_seed": per_seed, "protocol": protocol}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config_cli(
        PipelineConfig,
        sys.argv[1:] if argv is None else argv,
        prog="modern-llm align",
        description="base -> SFT -> DPO -> DPO+verifier reranking on a math task, each stage evaluated the same "
        "way (greedy accuracy, maj@N, verifier@N, pass@N) over several seeds; writes a Markdown + JSON summary "
        "into experiments/alignment/.",
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = run_pipeline(cfg)
    for name, evaluated in out["evals"].items():
        record = f"{cfg.name}-{name}" if cfg.eval_tasks else cfg.name
        print(f"eval on {name}:")
        for row in evaluated["stage_gains"]:
            gain = f" (gain {100 * row['gain'][0]:+.1f})" if "gain" in row else ""
            print(f"{row['stage']:>13}: {row['metric']} {100 * row['value'][0]:.1f}%{gain}")
        print(f"summary: {Path(cfg.results_dir) / (record + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
