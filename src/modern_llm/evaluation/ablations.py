"""Architecture and pipeline ablations: each variant x several seeds, mean ± std, CSV + JSON record + plots.

    python scripts/run_ablations.py --config configs/ablations/lm-cpu.yaml          # the CPU study
    python scripts/run_ablations.py --config configs/ablations/lm-cpu.yaml --set train.max_steps=20 --seeds 0
    python scripts/run_ablations.py --base-config configs/lm/tiny-embedded.yaml --no-rope --gqa --moe \
        --variant wide-ffn:d_ff=768 --variant learned:pos_encoding=learned
    python scripts/run_ablations.py --alignment-config configs/alignment/arithmetic_scratch.yaml \
        --no-dpo --no-verifier            # or --alignment-record <existing pipeline record JSON>

A *variant* is a name plus dotted config overrides applied to one base ``LMRunConfig`` (the train-lm stage):
``baseline`` has none. Built-in toggles build the overrides from the resolved base config:

- ``no-rope``: ``model.pos_encoding = "none"``, i.e. NoPE (no positional signal at all; the causal mask is
  the only source of order). ``--variant learned-pos:pos_encoding=learned`` gives absolute learned
  embeddings instead.
- ``sinks`` / ``no-sinks``: ``model.n_sinks = N`` learnable sink key/value slots, or 0.
- ``gqa``: ``model.n_kv_heads = K`` (default 1, i.e. MQA) against an MHA baseline (the configs set
  ``n_kv_heads = n_heads``); rows also carry the KV-cache bytes per token, from the config
  (``2 * n_layers * n_kv_heads * head_dim * bytes_per_element``) and measured on the ``KVCache`` tensors the
  engine actually allocated, plus decode tokens/s at batch 1 and 8.
- ``moe``: every layer becomes a top-k MoE whose experts have ``d_ff / k`` hidden units, so the ACTIVE
  feed-forward parameters per token equal the dense model's (``top_k * moe_d_ff = d_ff``); the only extra
  active weights are the router's ``d_model * n_experts`` per layer. Rows report total and active params.
- any field: ``--variant NAME:field=value,field=value`` (a key without a dot means ``model.<key>``; list
  values in brackets, ``moe_layers=[0,1]``), or the same as a mapping in the YAML ``variants`` list.

``--no-dpo`` / ``--no-verifier`` ablate the alignment pipeline (``modern_llm.alignment.alignment_pipeline``).
They are read off ONE pipeline run per seed rather than re-running it: the pipeline evaluates the SFT policy
and trains the verifier (on SFT samples) before DPO runs, so "SFT policy + verifier@N" is exactly what a
pipeline without DPO would report, and "DPO policy + maj@N / greedy" exactly what one without the verifier
would report, for the same seed. Variants: ``full`` (DPO + verifier@N), ``no-dpo`` (SFT + verifier@N),
``no-verifier`` (DPO, majority vote over the same N samples), ``no-dpo-no-verifier`` (SFT, majority vote).

Protocol and design choices
- Seeds change model init and data order (``train.seed``); the data, tokenizer and eval split are shared.
  One BPE tokenizer is trained once per study and reused, so bpb/loss compare like for like.
- Runs are interleaved (seed-major: all variants of seed 0, then seed 1, ...), so drifting load on a
  shared machine spreads over variants instead of penalising whichever ran last.
- Training tokens/s = tokens seen / pure training time (eval and checkpointing excluded).
- Decode tokens/s: ``engine.generate`` on the trained model, greedy, ``ignore_eos``, a fixed random
  ``prompt_len``-token prompt per row and exactly ``new_tokens`` new tokens, token ids in and out (no text
  decoding inside the timed region), one warm-up call, median wall time of ``repeats`` calls;
  tokens/s = batch * new_tokens / time, the short prefill included.
- Every number is mean ± sample std over seeds (``metrics.mean_std``); differences to ``baseline`` are
  also reported paired per seed (same seed = same data order), which removes the shared seed noise.

Footguns
- Timing on a shared CPU is noisy; compare tokens/s only within one study (same machine, same moment).
- At toy sizes decode speed is dominated by per-token Python/kernel overhead, not by KV reads, so GQA's
  memory saving shows in the bytes columns long before it shows in tokens/s.
- A variant may not set ``train.seed`` / ``train.out_dir`` (the runner owns them); unknown fields fail
  before anything trains, naming the variant and the valid keys.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modern_llm.config.base import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    read_mapping,
)
from modern_llm.evaluation.metrics import mean_std

log = logging.getLogger(__name__)

LM_TOGGLES = ("no-rope", "sinks", "no-sinks", "gqa", "moe")
ALIGNMENT_TOGGLES = ("no-dpo", "no-verifier")
RUNNER_OWNED = ("train.seed", "train.out_dir", "train.resume", "record")

# CSV columns of the LM study, in order (one row per variant x seed); decode columns follow the batch sizes.
LM_BASE_COLUMNS = (
    "variant",
    "seed",
    "val_loss",
    "val_ppl",
    "val_bpb",
    "train_loss",
    "steps",
    "train_time_s",
    "train_tokens_per_s",
    "params_total",
    "params_active",
    "train_flops_per_token",
    "kv_bytes_per_token_formula",
    "kv_bytes_per_token_measured",
)
PAIRED_METRICS = ("val_loss", "val_bpb")

ALIGNMENT_COLUMNS = (
    "variant",
    "seed",
    "policy",
    "selection",
    "selected_at_n",
    "greedy_acc",
    "maj_at_n",
    "verifier_at_n",
    "pass_at_n",
)


def lm_columns(batch_sizes: list[int]) -> tuple[str, ...]:
    return LM_BASE_COLUMNS + tuple(f"decode_tok_s_b{b}" for b in batch_sizes)


def bar_metrics(batch_sizes: list[int]) -> tuple[str, ...]:
    """What the bar chart shows: quality, speed, memory."""
    decode = tuple(f"decode_tok_s_b{b}" for b in batch_sizes)
    return ("val_loss", "val_bpb", "train_tokens_per_s", *decode, "kv_bytes_per_token_measured")


# ----------------------------------------------------------------------------------------------- config


@dataclass
class DecodeBenchConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    prompt_len: int = 16
    new_tokens: int = 32
    repeats: int = 3

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"decode.batch_sizes must be ints >= 1, got {self.batch_sizes}")
        for name in ("prompt_len", "new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"decode.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class AblationConfig:
    name: str = "lm-ablations"
    base_config: str | None = None  # an LM-stage YAML (configs/lm/...); None = LMRunConfig defaults
    base: dict[str, Any] = field(default_factory=dict)  # dotted overrides on top of base_config
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # toggle names (LM_TOGGLES / ALIGNMENT_TOGGLES) or {name: ..., overrides: {field: value}} mappings
    variants: list[Any] = field(default_factory=list)
    results_dir: str = "experiments/ablations"
    runs_dir: str = "runs/ablations"  # checkpoints/metrics per (variant, seed); <runs_dir>/<name>/...
    threads: int = 2  # torch intra-op threads (0 = leave torch's default)
    decode: DecodeBenchConfig = field(default_factory=DecodeBenchConfig)
    # toggle parameters
    sinks: int = 4
    gqa_kv_heads: int = 1
    moe_experts: int = 4
    moe_top_k: int = 2
    # alignment (--no-dpo / --no-verifier): a PipelineConfig YAML + dotted overrides
    alignment_config: str | None = None
    alignment: dict[str, Any] = field(default_factory=dict)
    alignment_record: str | None = None  # read per-seed results from an existing pipeline record instead

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds must list at least one seed, e.g. --seeds 0,1,2")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty file stem without '/', got {self.name!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = torch default), got {self.threads}")


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""


# ----------------------------------------------------------------------------------------------- variants


def _dotted(key: str) -> str:
    """A key without a section means a model field: ``n_kv_heads`` -> ``model.n_kv_heads``."""
    key = key.strip().replace("-", "_")
    return key if "." in key else f"model.{key}"


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets, so ``moe_layers=[0,1],d_ff=256`` gives two items."""
    parts, depth, current = [], 0, []
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in (s.strip() for s in parts) if p]


def parse_variant_spec(spec: str) -> Variant:
    """``"name:field=value,field=value"`` -> Variant (values stay strings; the config coerces them)."""
    name, sep, body = spec.partition(":")
    name = name.strip()
    if not sep or not name:
        raise ValueError(
            f"--variant {spec!r}: expected NAME:field=value[,field=value...], e.g. mqa:n_kv_heads=1"
        )
    overrides = {}
    for item in _split_top_level(body):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--variant {spec!r}: {item!r} is not field=value")
        overrides[_dotted(key)] = value.strip()
    if not overrides:
        raise ValueError(f"--variant {spec!r}: no field=value overrides given")
    return Variant(name, overrides, note="user-defined")


def toggle_variant(toggle: str, base, cfg: AblationConfig) -> Variant:
    """The overrides of a built-in LM toggle, computed from the resolved base ``LMRunConfig``."""
    m = base.model
    if toggle == "no-rope":
        if m.pos_encoding == "none":
            raise ValueError("--no-rope: the base config already has model.pos_encoding=none")
        return Variant("no-rope", {"model.pos_encoding": "none"}, "NoPE: no positional encoding")
    if toggle == "sinks":
        if cfg.sinks < 1 or cfg.sinks == m.n_sinks:
            raise ValueError(f"--sinks {cfg.sinks}: need >= 1 and different from the base's {m.n_sinks}")
        return Variant("sinks", {"model.n_sinks": cfg.sinks}, f"{cfg.sinks} learnable sink slots")
    if toggle == "no-sinks":
        if m.n_sinks == 0:
            raise ValueError(
                "--no-sinks: the base config has model.n_sinks=0, so the variant equals the baseline; "
                "use --sinks N, or give the base sinks with --set model.n_sinks=4"
            )
        return Variant("no-sinks", {"model.n_sinks": 0}, "sink slots removed")
    if toggle == "gqa":
        kv = cfg.gqa_kv_heads
        if kv == m.n_kv_heads or m.n_heads % kv:
            raise ValueError(
                f"--gqa {kv}: n_kv_heads must divide n_heads={m.n_heads} and differ from the base's "
                f"{m.n_kv_heads}"
            )
        kind = "MQA" if kv == 1 else "GQA"
        return Variant("gqa", {"model.n_kv_heads": kv}, f"{kind}: {kv} KV heads vs {m.n_kv_heads}")
    if toggle == "moe":
        k, n_exp = cfg.moe_top_k, cfg.moe_experts
        if m.is_moe:
            raise ValueError("--moe: the base config is already MoE (model.moe_layers is set)")
        if not 1 <= k <= n_exp or m.d_ff % k:
            raise ValueError(
                f"--moe: need 1 <= moe_top_k ({k}) <= moe_experts ({n_exp}) and moe_top_k dividing "
                f"model.d_ff ({m.d_ff}) so that top_k * moe_d_ff = d_ff"
            )
        overrides = {
            "model.moe_layers": list(range(m.n_layers)),
            "model.moe_n_experts": n_exp,
            "model.moe_top_k": k,
            "model.moe_d_ff": m.d_ff // k,
        }
        note = f"{n_exp} experts top-{k}, moe_d_ff={m.d_ff // k}: active FFN params = dense d_ff={m.d_ff}"
        return Variant("moe", overrides, note)
    raise ValueError(f"unknown toggle {toggle!r}; LM toggles: {list(LM_TOGGLES)}")


def variant_from_entry(entry: Any, base, cfg: AblationConfig) -> Variant:
    """A YAML ``variants`` entry: a toggle name, ``baseline``, or ``{name, overrides}``."""
    if isinstance(entry, str):
        return Variant("baseline") if entry == "baseline" else toggle_variant(entry, base, cfg)
    if isinstance(entry, dict) and set(entry) <= {"name", "overrides", "note"} and "name" in entry:
        overrides = {_dotted(k): v for k, v in (entry.get("overrides") or {}).items()}
        return Variant(str(entry["name"]), overrides, str(entry.get("note", "user-defined")))
    raise ValueError(
        f"variants entry {entry!r}: use a toggle name ({', '.join(LM_TOGGLES)}), 'baseline', or a mapping "
        "{name: ..., overrides: {field: value}}"
    )


def resolve_variant(base, variant: Variant):
    """Apply a variant's overrides to the base config; errors name the variant and the bad field."""
    owned = [k for k in variant.overrides if k in RUNNER_OWNED]
    if owned:
        raise ValueError(f"variant {variant.name!r}: {owned} are set by the runner (use --seeds / runs_dir)")
    try:
        return apply_overrides(base, variant.overrides)
    except ValueError as err:
        raise ValueError(f"variant {variant.name!r}: {err}") from None


def build_lm_variants(base, cfg: AblationConfig, extra: list[Variant] | None = None) -> list[Variant]:
    """baseline first, then the config's entries, then ``extra``; names unique; every variant validated."""
    variants = [Variant("baseline", note="base config")]
    for entry in cfg.variants:
        if isinstance(entry, str) and entry in ALIGNMENT_TOGGLES:
            continue
        v = variant_from_entry(entry, base, cfg)
        if v.name != "baseline":
            variants.append(v)
    variants += extra or []
    names = [v.name for v in variants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"variant names must be unique, repeated: {dupes}")
    for v in variants:
        resolve_variant(base, v)  # fail before anything trains
    return variants


# ----------------------------------------------------------------------------------------------- measuring


def kv_bytes_per_token(model_cfg, dtype: torch.dtype = torch.float32) -> int:
    """K and V, every layer, ``n_kv_heads`` heads of ``head_dim``: bytes one cached token costs."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model_cfg.n_layers * model_cfg.n_kv_heads * model_cfg.head_dim * elem


def measured_kv_bytes_per_token(cache) -> float:
    """Bytes of the K/V buffers a ``KVCache`` allocated, per (row, slot); the padding mask is not K/V."""
    total = sum(t.nbytes for t in cache.k) + sum(t.nbytes for t in cache.v)
    return total / (cache.batch_size * cache.max_len)


@torch.no_grad()
def decode_benchmark(model, batch_size: int, bench: DecodeBenchConfig, seed: int = 0) -> tuple[float, float]:
    """(generated tokens/s, measured KV bytes per token) of greedy ``generate`` with ``ignore_eos``."""
    from modern_llm.inference.engine import NativeBackend, generate
    from modern_llm.inference.sampling import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (batch_size, bench.prompt_len), generator=gen).tolist()
    params = SamplingParams(temperature=0.0, max_new_tokens=bench.new_tokens)
    backend = NativeBackend(model)

    def once() -> float:
        t0 = time.perf_counter()
        out = generate(backend, None, prompts, sampling=params, ignore_eos=True)
        elapsed = time.perf_counter() - t0
        assert all(r[0].num_generated_tokens == bench.new_tokens for r in out)  # fixed work per call
        return elapsed

    once()  # warm-up: allocator, lazy kernels
    seconds = statistics.median(once() for _ in range(bench.repeats))
    return batch_size * bench.new_tokens / seconds, measured_kv_bytes_per_token(backend.cache)


def lm_row(variant: Variant, seed: int, summary: dict[str, Any], model, bench: DecodeBenchConfig) -> dict:
    """One CSV row from a finished train-lm run and its reloaded model."""
    mcfg = model.config
    weight_dtype = next(model.parameters()).dtype
    row: dict[str, Any] = {
        "variant": variant.name,
        "seed": seed,
        "val_loss": summary.get("eval/loss", math.nan),
        "val_ppl": summary.get("eval/ppl", math.nan),
        "val_bpb": summary.get("eval/bpb", math.nan),
        "train_loss": summary.get("train/loss", math.nan),
        "steps": summary["step"],
        "train_time_s": summary["train_time_s"],
        "train_tokens_per_s": summary["tokens_seen"] / max(summary["train_time_s"], 1e-9),
        "params_total": model.num_params(),
        "params_active": model.num_params(active=True),
        "train_flops_per_token": model.flops_per_token(mcfg.max_seq_len),
        "kv_bytes_per_token_formula": kv_bytes_per_token(mcfg, weight_dtype),
    }
    measured = []
    for b in bench.batch_sizes:
        tps, kv = decode_benchmark(model, b, bench, seed)
        row[f"decode_tok_s_b{b}"] = tps
        measured.append(kv)
    row["kv_bytes_per_token_measured"] = measured[0]
    return row


# ----------------------------------------------------------------------------------------------- plots


def plot_ablation_bars(summary: dict, metrics: tuple[str, ...], out_png: Path, title: str = "") -> Path:
    """One panel per metric: a bar per variant at the mean, error bar = std over seeds."""
    from modern_llm.evaluation.plots import plt  # Agg backend, set once there

    metrics = tuple(m for m in metrics if any(m in s for s in summary.values()))
    names = list(summary)
    cols = min(3, len(metrics))
    rows_n = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        means = [summary[n][metric][0] if metric in summary[n] else math.nan for n in names]
        stds = [summary[n][metric][1] if metric in summary[n] else 0.0 for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(names))])
        finite = [(m, s) for m, s in zip(means, stds) if math.isfinite(m)]
        if finite and metric.startswith(("val_", "train_loss")):  # zoom in: differences are small
            lo = min(m - s for m, s in finite)
            hi = max(m + s for m, s in finite)
            pad = max(hi - lo, 1e-6) * 0.5
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    n = max((s.get("n_seeds", 0) for s in summary.values()), default=0)
    fig.suptitle(f"{title} (mean ± std, {n} seeds)")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def _mean_curve(run_dirs: list[Path], key: str) -> tuple[list[float], list[float], list[float]]:
    """Steps logged by every seed, with the mean and std of ``key`` there."""
    from modern_llm.utils.logging import read_metrics

    per_seed = []
    for d in run_dirs:
        per_seed.append({r["step"]: r[key] for r in read_metrics(d) if key in r and "step" in r})
    steps = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
    stats = [mean_std([c[s] for c in per_seed]) for s in steps]
    return steps, [m for m, _ in stats], [s for _, s in stats]


def plot_ablation_curves(runs: dict[str, list[Path]], out_png: Path, title: str = "") -> Path:
    """Train loss (line, ± std band) and val loss (dashed, markers) per variant, averaged over seeds."""
    from matplotlib.ticker import FormatStrFormatter

    from modern_llm.evaluation.plots import plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, dirs) in enumerate(runs.items()):
        steps, mean, std = _mean_curve(dirs, "train/loss")
        if steps:
            ax.plot(steps, mean, color=f"C{i}", label=f"{name} train")
            lo = [m - s for m, s in zip(mean, std)]
            hi = [m + s for m, s in zip(mean, std)]
            ax.fill_between(steps, lo, hi, color=f"C{i}", alpha=0.2)
        steps, mean, std = _mean_curve(dirs, "eval/loss")
        if steps:
            ax.errorbar(
                steps,
                mean,
                yerr=std,
                color=f"C{i}",
                linestyle="--",
                marker="o",
                capsize=3,
                label=f"{name} val",
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token, log scale)")
    ax.set_yscale("log")  # the variants separate late, at low loss
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


# ----------------------------------------------------------------------------------------------- running


def load_base(cfg: AblationConfig, extra_overrides: dict[str, Any] | None = None):
    from modern_llm.training.train_lm import LMRunConfig

    overrides = dict(cfg.base) | dict(extra_overrides or {})
    overrides = {(k if "." in k or k in ("name", "record") else _dotted(k)): v for k, v in overrides.items()}
    base = load_config(LMRunConfig, cfg.base_config, overrides or None)
    return apply_overrides(base, {"record": None})


def shared_tokenizer_dir(base, study_dir: Path) -> str | None:
    """Train the study's BPE once (if the base trains one) and return its folder for every run."""
    if base.data.tokenizer != "train":
        return None
    from modern_llm.training.train_lm import build_tokenizer

    tok_cfg = apply_overrides(base, {"train.out_dir": str(study_dir)})
    build_tokenizer(tok_cfg)  # reuses <study_dir>/tokenizer when it is already there
    return str(study_dir / "tokenizer")


def run_variant_seed(base, variant: Variant, seed: int, study_dir: Path, tokenizer_dir, bench) -> dict:
    from modern_llm.models.pretrained import load_pretrained
    from modern_llm.training.train_lm import run

    out_dir = study_dir / variant.name / f"seed{seed}"
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a fresh run: stale checkpoints of another config must not be resumed
    overrides: dict[str, Any] = {"train.seed": seed, "train.out_dir": str(out_dir), "train.resume": "none"}
    if tokenizer_dir:
        overrides["data.tokenizer"] = tokenizer_dir
    run_cfg = apply_overrides(resolve_variant(base, variant), overrides)
    log.info("=== variant %s seed %d -> %s", variant.name, seed, out_dir)
    summary = run(run_cfg)
    on_gpu = torch.cuda.is_available() and run_cfg.train.device != "cpu"
    model, _, _ = load_pretrained(summary["checkpoint"], device="cuda" if on_gpu else "cpu")
    row = lm_row(variant, seed, summary, model, bench)
    row["_out_dir"] = str(out_dir)
    row["_device"], row["_dtype"] = summary["device"], summary["dtype"]
    return row


def summarize(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """variant -> {metric: [mean, std], "n_seeds": n}, in first-seen order; NaN cells are skipped."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        stats: dict[str, Any] = {"n_seeds": len(mine)}
        for key in columns:
            vals = [float(r[key]) for r in mine if key in r and r[key] is not None]
            vals = [v for v in vals if math.isfinite(v)]
            if vals:
                stats[key] = list(mean_std(vals))
        out[name] = stats
    return out


def paired_deltas(rows: list[dict[str, Any]], reference: str = "baseline", metrics=PAIRED_METRICS) -> dict:
    """variant -> {metric: [mean, std] of (variant - reference) over the seeds both have}."""
    ref = {r["seed"]: r for r in rows if r["variant"] == reference}
    out: dict[str, dict[str, list[float]]] = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        if name == reference:
            continue
        mine = [r for r in rows if r["variant"] == name and r["seed"] in ref]
        deltas = {}
        for key in metrics:
            vals = [float(r[key]) - float(ref[r["seed"]][key]) for r in mine]
            vals = [v for v in vals if math.isfinite(v)]
            if vals:
                deltas[key] = list(mean_std(vals))
        out[name] = deltas
    return out


def write_csv(rows: list[dict[str, Any]], path: Path, columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _cell(r.get(k)) for k in columns})
    tmp.replace(path)
    return path


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _pm(pair: list[float] | None, fmt: str = ".4f") -> str:
    """``mean ± std``; a "+" in ``fmt`` signs the mean only (a std is never negative)."""
    return "–" if not pair else f"{pair[0]:{fmt}} ± {pair[1]:{fmt.lstrip('+')}}"


def markdown_table(summary: dict, deltas: dict, variants: list[Variant], batch_sizes: list[int]) -> str:
    notes = {v.name: v.note for v in variants}
    cols = [
        ("val_loss", "val loss", ".4f"),
        ("val_bpb", "val bpb", ".4f"),
        ("train_tokens_per_s", "train tok/s", ".0f"),
        *[(f"decode_tok_s_b{b}", f"decode tok/s b{b}", ".0f") for b in batch_sizes],
        ("kv_bytes_per_token_measured", "KV B/token", ".0f"),
    ]
    lines = [
        "| variant | params (active) | "
        + " | ".join(c[1] for c in cols)
        + " | Δ val loss vs baseline | note |",
        "|---|---|" + "---|" * len(cols) + "---|---|",
    ]
    for name, stats in summary.items():
        params = f"{stats['params_total'][0] / 1e3:.0f}k ({stats['params_active'][0] / 1e3:.0f}k)"
        cells = [_pm(stats.get(k), f) for k, _, f in cols]
        delta = _pm(deltas.get(name, {}).get("val_loss"), "+.4f") if name in deltas else "–"
        lines.append(f"| {name} | {params} | " + " | ".join(cells) + f" | {delta} | {notes.get(name, '')} |")
    return "\n".join(lines) + "\n"


def run_lm_ablations(
    cfg: AblationConfig, variants: list[Variant] | None = None, base_overrides: dict | None = None
) -> dict[str, Any]:
    """Train every (variant, seed), write ``<results_dir>/<name>.{csv,json,md}`` + PNGs; return the summary.

    ``variants`` defaults to the config's (``build_lm_variants``); ``base_overrides`` are dotted LM fields
    applied to every variant (``--set``).
    """
    from modern_llm.utils.records import now_iso, write_record

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started, t0 = now_iso(), time.time()
    base = load_base(cfg, base_overrides)
    variants = variants if variants is not None else build_lm_variants(base, cfg)
    bench = cfg.decode
    for v in variants:
        vcfg = resolve_variant(base, v)
        if (
            vcfg.model.pos_encoding == "learned"
            and bench.prompt_len + bench.new_tokens > vcfg.model.max_seq_len
        ):
            raise ValueError(
                f"variant {v.name!r}: learned positions cap the context at max_seq_len="
                f"{vcfg.model.max_seq_len} < decode.prompt_len + decode.new_tokens="
                f"{bench.prompt_len + bench.new_tokens}; lower decode.new_tokens"
            )
    study_dir = Path(cfg.runs_dir) / cfg.name
    results = Path(cfg.results_dir)
    csv_path = results / f"{cfg.name}.csv"
    columns = lm_columns(bench.batch_sizes)
    tokenizer_dir = shared_tokenizer_dir(base, study_dir)
    rows: list[dict[str, Any]] = []
    for seed in cfg.seeds:  # seed-major: load drift spreads over variants
        for v in variants:
            rows.append(run_variant_seed(base, v, seed, study_dir, tokenizer_dir, bench))
            write_csv(rows, csv_path, columns)  # partial results survive an interruption
    summary = summarize(rows, columns[2:])
    deltas = paired_deltas(rows)
    bars = plot_ablation_bars(
        summary, bar_metrics(bench.batch_sizes), results / f"{cfg.name}_bars.png", title=cfg.name
    )
    curves = plot_ablation_curves(
        {v.name: [Path(r["_out_dir"]) for r in rows if r["variant"] == v.name] for v in variants},
        results / f"{cfg.name}_loss.png",
        title=f"{cfg.name}: loss (mean ± std over {len(cfg.seeds)} seeds)",
    )
    table = markdown_table(summary, deltas, variants, bench.batch_sizes)
    (results / f"{cfg.name}.md").write_text(f"# {cfg.name}\n\nmean ± std over seeds {cfg.seeds}\n\n{table}")
    protocol = {
        "seeds": list(cfg.seeds),
        "variants": {v.name: {"overrides": v.overrides, "note": v.note} for v in variants},
        "base_config_file": cfg.base_config,
        "base_config": config_to_dict(base),
        "tokenizer": tokenizer_dir or base.data.tokenizer,
        "eval": "train-lm final eval on the val split (non-overlapping max_seq_len blocks)",
        "train_tokens_per_s": "tokens seen / training time (eval, checkpointing excluded)",
        "decode": config_to_dict(bench)
        | {
            "how": "engine.generate, greedy, ignore_eos, token ids in/out, median of repeats after a warm-up; "
            "tok/s = batch * new_tokens / wall time (prefill included)"
        },
        "kv_bytes_formula": "2 * n_layers * n_kv_heads * head_dim * bytes_per_element",
        "threads": cfg.threads or torch.get_num_threads(),
        "order": "seed-major (variants interleaved)",
        "csv": str(csv_path),
        "bars_png": str(bars),
        "loss_png": str(curves),
    }
    record = write_record(
        results / f"{cfg.name}.json",
        name=cfg.name,
        task=f"ablation/lm/{base.data.corpus}",
        model=f"ModernDecoderLM d{base.model.d_model} L{base.model.n_layers} H{base.model.n_heads}",
        metrics={
            "summary": summary,
            "paired_deltas_vs_baseline": deltas,
            "rows": [{k: r[k] for k in columns if k in r} for r in rows],
        },
        protocol=protocol,
        seed=None,
        device=rows[0]["_device"],
        dtype=rows[0]["_dtype"],
        started=started,
        duration_s=time.time() - t0,
    )
    return {"summary": summary, "deltas": deltas, "rows": rows, "record": record, "table": table}


# ----------------------------------------------------------------------------------------------- alignment


def alignment_variant_names(toggles: list[str]) -> list[str]:
    """Which of full / no-dpo / no-verifier / no-dpo-no-verifier the requested toggles need."""
    names = ["full"]
    if "no-dpo" in toggles:
        names.append("no-dpo")
    if "no-verifier" in toggles:
        names.append("no-verifier")
    if "no-dpo" in toggles and "no-verifier" in toggles:
        names.append("no-dpo-no-verifier")
    return names


# (policy stage, how one answer is chosen from the N samples)
_ALIGNMENT_VARIANTS = {
    "full": ("dpo", "verifier"),
    "no-dpo": ("sft", "verifier"),
    "no-verifier": ("dpo", "majority"),
    "no-dpo-no-verifier": ("sft", "majority"),
}


def alignment_rows(per_seed: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Rows (variant, seed) from the pipeline's per-seed stage metrics (see the module docstring)."""
    rows = []
    for result in per_seed:
        for name in names:
            stage, selection = _ALIGNMENT_VARIANTS[name]
            if stage not in result.get("stages", {}):
                raise ValueError(
                    f"alignment variant {name!r} needs the pipeline's {stage!r} stage, but seed "
                    f"{result.get('seed')} has only {sorted(result.get('stages', {}))}; run the pipeline "
                    "with stop_after=dpo"
                )
            m = result["stages"][stage]
            verifier = m.get("verifier_at_n", math.nan)  # absent when the verifier could not be trained
            rows.append(
                {
                    "variant": name,
                    "seed": result["seed"],
                    "policy": stage,
                    "selection": selection,
                    "selected_at_n": verifier if selection == "verifier" else m["maj_at_n"],
                    "greedy_acc": m["accuracy"],
                    "maj_at_n": m["maj_at_n"],
                    "verifier_at_n": verifier,
                    "pass_at_n": m.get("pass_at_n", math.nan),
                }
            )
    return rows


def pipeline_results(cfg: AblationConfig, name: str) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """(per-seed results, pipeline config dict, pipeline record path): read from ``cfg.alignment_record``
    when given, else one fresh pipeline run over ``cfg.seeds`` (every stage, i.e. ``stop_after=dpo``)."""
    from modern_llm.alignment.alignment_pipeline import PipelineConfig, run_pipeline
    from modern_llm.utils.records import read_record

    if cfg.alignment_record:
        record = read_record(cfg.alignment_record)
        per_seed = record["metrics"].get("per_seed")
        if not per_seed:
            raise ValueError(
                f"{cfg.alignment_record}: no metrics.per_seed; is it an alignment pipeline record?"
            )
        return per_seed, record["protocol"].get("config", {}), cfg.alignment_record
    overrides = dict(cfg.alignment) | {
        "seeds": list(cfg.seeds),
        "name": f"{name}-pipeline",
        "results_dir": cfg.results_dir,
        "out_dir": str(Path(cfg.runs_dir) / name),
        "stop_after": "dpo",
    }
    if cfg.threads:
        overrides["threads"] = cfg.threads
    pcfg = load_config(PipelineConfig, cfg.alignment_config, overrides)
    out = run_pipeline(pcfg)
    return out["per_seed"], config_to_dict(pcfg), str(Path(cfg.results_dir) / f"{pcfg.name}.json")


def run_alignment_ablations(cfg: AblationConfig, toggles: list[str]) -> dict[str, Any]:
    """Alignment variants per (seed) from one pipeline run (or its record) + CSV + record + bars."""
    from modern_llm.utils.records import now_iso, write_record

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started, t0 = now_iso(), time.time()
    name = f"{cfg.name}-alignment"
    per_seed, pipeline_cfg, pipeline_record = pipeline_results(cfg, name)
    names = alignment_variant_names(toggles)
    rows = alignment_rows(per_seed, names)
    results = Path(cfg.results_dir)
    write_csv(rows, results / f"{name}.csv", ALIGNMENT_COLUMNS)
    metrics_cols = ("selected_at_n", "greedy_acc", "maj_at_n", "verifier_at_n", "pass_at_n")
    summary = summarize(rows, metrics_cols)
    deltas = paired_deltas(rows, reference="full", metrics=("selected_at_n", "greedy_acc"))
    bars = plot_ablation_bars(summary, ("selected_at_n", "greedy_acc"), results / f"{name}_bars.png", name)
    record = write_record(
        results / f"{name}.json",
        name=name,
        task=f"ablation/alignment/{pipeline_cfg.get('data', {}).get('task', 'unknown')}",
        model=str(pipeline_cfg.get("model", "unknown")),
        metrics={"summary": summary, "paired_deltas_vs_full": deltas, "rows": rows},
        protocol={
            "seeds": sorted({r["seed"] for r in rows}),
            "variants": {
                n: {"policy": _ALIGNMENT_VARIANTS[n][0], "selection": _ALIGNMENT_VARIANTS[n][1]}
                for n in names
            },
            "how": "read off one pipeline run per seed: SFT is evaluated and the verifier trained before DPO",
            "N": pipeline_cfg.get("eval", {}).get("num_samples"),
            "pipeline_record": pipeline_record,
            "bars_png": str(bars),
            "pipeline_config": pipeline_cfg,
        },
        seed=None,
        device=per_seed[0].get("device", "cpu"),
        dtype=str(pipeline_cfg.get("sft_train", {}).get("dtype", "fp32")),
        started=started,
        duration_s=time.time() - t0,
    )
    return {"summary": summary, "deltas": deltas, "rows": rows, "record": record}


# ----------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modern-llm ablations",
        description="Ablate ModernDecoderLM toggles (and alignment stages) over several seeds: one CSV row per "
        "(variant, seed), mean ± std JSON record, bar chart with error bars and loss curves under "
        "experiments/ablations/.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  modern-llm ablate --config configs/ablations/lm-cpu.yaml\n"
        "  modern-llm ablate --base-config configs/lm/tiny-embedded.yaml --gqa --moe "
        "--variant learned:pos_encoding=learned\n",
    )
    p.add_argument("--config", help="ablation YAML (AblationConfig: base_config, base, seeds, variants, ...)")
    p.add_argument("--base-config", help="LM-stage YAML to ablate (overrides the file's base_config)")
    p.add_argument("--name", help="study name: file stem of the CSV/JSON/PNGs")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default from the config: 0,1,2)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a base LM config field for every variant, e.g. --set train.max_steps=200",
    )
    p.add_argument("--no-rope", action="store_true", help="variant with pos_encoding=none (NoPE)")
    p.add_argument("--sinks", nargs="?", const=-1, type=int, metavar="N", help="variant with N sinks (4)")
    p.add_argument("--no-sinks", action="store_true", help="variant with n_sinks=0 (base must have sinks)")
    p.add_argument("--gqa", nargs="?", const=-1, type=int, metavar="KV", help="variant with KV heads (1)")
    p.add_argument("--moe", action="store_true", help="MoE variant at equal active parameters")
    p.add_argument("--no-dpo", action="store_true", help="alignment: SFT policy instead of DPO")
    p.add_argument("--no-verifier", action="store_true", help="alignment: majority vote instead of verifier")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:FIELD=VALUE,...",
        help="any config change, e.g. mqa:n_kv_heads=1 or lr2:train.lr=2e-3 (no dot = model field)",
    )
    p.add_argument("--alignment-config", help="PipelineConfig YAML for --no-dpo / --no-verifier")
    p.add_argument(
        "--alignment-record",
        help="existing alignment pipeline record (JSON with metrics.per_seed): read it instead of re-running",
    )
    p.add_argument("--threads", type=int, help="torch threads (default from the config: 2)")
    p.add_argument("--results-dir", help="where the CSV/JSON/PNGs go (default experiments/ablations)")
    p.add_argument("--runs-dir", help="where per-run checkpoints/metrics go (default runs/ablations)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the variants, train nothing")
    return p


def _set_pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. train.max_steps=200")
        out[key.strip()] = value.strip()
    return out


def config_from_args(args: argparse.Namespace) -> tuple[AblationConfig, list[str]]:
    """The AblationConfig from --config + flags, and the toggles requested on the command line."""
    data = read_mapping(args.config) if args.config else {}
    cfg = config_from_dict(AblationConfig, data)
    updates: dict[str, Any] = {}
    if args.base_config:
        updates["base_config"] = args.base_config
    if args.name:
        updates["name"] = args.name
    if args.seeds:
        updates["seeds"] = args.seeds
    if args.threads is not None:
        updates["threads"] = args.threads
    if args.results_dir:
        updates["results_dir"] = args.results_dir
    if args.runs_dir:
        updates["runs_dir"] = args.runs_dir
    if args.alignment_config:
        updates["alignment_config"] = args.alignment_config
    if args.alignment_record:
        updates["alignment_record"] = args.alignment_record
    if args.sinks is not None and args.sinks >= 0:
        updates["sinks"] = args.sinks
    if args.gqa is not None and args.gqa >= 0:
        updates["gqa_kv_heads"] = args.gqa
    if updates:
        cfg = apply_overrides(cfg, updates)
    toggles = [t for t in LM_TOGGLES + ALIGNMENT_TOGGLES if _flag(args, t)]
    return cfg, toggles


def _flag(args: argparse.Namespace, toggle: str) -> bool:
    value = getattr(args, toggle.replace("-", "_"))
    return value is not None and value is not False


def plan(cfg: AblationConfig, toggles: list[str], specs: list[str], base_overrides: dict[str, str]):
    """(base LM config, LM variants, alignment toggles); raises before any training on a bad field."""
    base = load_base(cfg, base_overrides)
    config_toggles = [e for e in cfg.variants if isinstance(e, str)]
    extra = [toggle_variant(t, base, cfg) for t in toggles if t in LM_TOGGLES and t not in config_toggles]
    extra += [parse_variant_spec(s) for s in specs]
    variants = build_lm_variants(base, cfg, extra)
    align = [t for t in ALIGNMENT_TOGGLES if t in toggles or t in config_toggles]
    return base, variants, align


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg, toggles = config_from_args(args)
        base_overrides = _set_pairs(args.set)
        _, variants, align = plan(cfg, toggles, args.variant, base_overrides)
        if align and not (cfg.alignment_config or cfg.alignment or cfg.alignment_record):
            raise ValueError(
                f"{['--' + t for t in align]} ablate the alignment pipeline: give --alignment-config "
                "(a PipelineConfig YAML, e.g. configs/alignment/arithmetic_scratch.yaml), an 'alignment:' "
                "mapping in --config, or --alignment-record (an existing pipeline record)"
            )
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    lm_requested = len(variants) > 1 or not align
    for v in variants if lm_requested else []:
        print(f"variant {v.name:<12} {v.overrides or '(base config)'}  {v.note}")
    if align:
        print(f"alignment variants: {alignment_variant_names(align)}")
    if args.dry_run:
        return 0
    if lm_requested:
        out = run_lm_ablations(cfg, variants, base_overrides)
        print(out["table"])
        print(f"record: {out['record']}")
    if align:
        out = run_alignment_ablations(cfg, align)
        for name, stats in out["summary"].items():
            print(f"{name:>20}: selected@N {_pm(stats.get('selected_at_n'), '.3f')}")
        print(f"record: {out['record']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
