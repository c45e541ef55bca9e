"""Long-context experiment: perplexity far beyond the training context, dense vs sliding window vs sinks.

    modern-llm long-context --config configs/long_context/embedded-cpu.yaml

Trains two small ModernDecoderLMs with the LM stage (``training.train_lm.run``) — one plain, one with
``model.n_sinks`` learnable attention sinks — or reuses run folders given by path, then scores long streams of
held-out text with every cache method and writes a result record, per-position NLL curves and two PNGs.
Reference: StreamingLLM (Xiao et al., 2023), Table 3 / Fig. 3: window attention blows up as soon as the first
tokens leave the cache; keeping 4 initial tokens ("attention sinks") keeps perplexity flat.

Methods (all on the same streams)
- ``dense``: one forward pass over the whole stream, nothing evicted; beyond the training context this is
  pure RoPE extrapolation (relative distances the model never saw).
- ``window``: ``StreamingKVCache`` with no sinks, decoding token by token (no recomputation).
- ``sink``: StreamingLLM — the first ``n_sink`` tokens (default 4) + the recent window.
- ``window_recompute``: the oracle sliding window: every token is scored from a fresh forward over its
  ``cache_budget`` previous tokens, so the first token of each window is again a "first token". Costly in
  real decoding; here it tells how much of a gap is due to eviction rather than to lost context.

Protocol (stated in every record)
- Streams: the split's token file is ``<eos> doc <eos> doc ...`` (``data.lm_datasets``). We cut
  ``n_streams`` non-overlapping streams of ``max(lengths)`` tokens, each starting at an ``<eos>`` (a document
  start), in corpus order. Length L is scored on the first L tokens of every stream. Because each method is
  causal (a cache's state at token t depends only on tokens <= t), the per-token NLLs at length L are
  exactly the first L - 1 NLLs of the longest run, so every method runs once per stream.
- PPL(L) = exp(total NLL / total predicted tokens) pooled over streams (L - 1 predictions per stream).
  ``tail`` PPL uses only the last ``tail_tokens`` predictions before L, i.e. what happens AT context L.
- Bits per byte = total NLL / (ln 2 * bytes), bytes = UTF-8 length of the decoded target tokens of the
  span (special tokens decode to nothing, matching the LM stage's byte count). Decoding a span rather than
  each token keeps multi-byte characters whole except possibly at the span's two ends.
- Cache budget: by default every method except ``dense`` lets a query see exactly the training context
  (``cache_budget`` = ``max_seq_len`` tokens, itself included): window = budget - 1 past tokens; sink =
  ``n_sink`` + (budget - 1 - n_sink); positions therefore never leave the trained range, so the methods differ
  only in WHICH tokens are visible. A model's learnable sinks are extra K/V with no position and cost no slot.

Footguns
- The two trained models share one tokenizer (the sink run is pointed at the plain run's tokenizer folder) so
  their streams are token-identical; reused runs with different tokenizers get their own streams (the record
  says which tokenizer hash each model used), and PPL is then only comparable through bits per byte.
- A checkpoint's ``max_seq_len`` is taken as its training context; ``cache_budget`` larger than it lets
  window/sink positions extrapolate as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from modern_llm.evaluation.metrics import bits_per_byte, mean_std, perplexity
from modern_llm.inference.streaming import streaming_perplexity
from modern_llm.training.train_lm import LMRunConfig

log = logging.getLogger(__name__)

METHODS = ("dense", "window", "sink", "window_recompute")
MODEL_VARIANTS = ("no_sink", "learned_sink")
EVAL_SPLITS = ("val", "test")


def _default_lm() -> LMRunConfig:
    """Small enough for ~2 CPU minutes per model; max_seq_len 64 so 512 tokens are 8x the training context."""
    from modern_llm.config.base import apply_overrides

    return apply_overrides(
        LMRunConfig(name="long-context"),
        {
            "model.d_model": 128,
            "model.n_layers": 2,
            "model.n_heads": 4,
            "model.n_kv_heads": 2,
            "model.max_seq_len": 64,
            "train.out_dir": "runs/long_context/embedded",
            "train.max_steps": 300,
            "train.batch_size": 16,
            "train.lr": 0.003,
            "train.warmup_steps": 30,
            "train.eval_batches": 16,
            "train.tensorboard": False,
            "data.corpus": "embedded",
            "data.vocab_size": 2048,
            "sample.max_new_tokens": 40,
        },
    )


@dataclass
class LongContextEvalConfig:
    lengths: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # tokens per scored stream
    n_streams: int = (
        8  # streams of max(lengths) tokens; fewer are used (with a warning) if the split is short
    )
    split: str = "val"  # "val" | "test" (a corpus's test split, when it has one)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    n_sink: int = 4  # initial tokens the "sink" method keeps (StreamingLLM uses 4)
    cache_budget: int | None = None  # tokens a query sees, itself included; None = the training context
    tail_tokens: int | None = None  # predictions in the "tail" PPL; None = training context // 2
    smooth: int = 16  # moving-average width (tokens) of the NLL-vs-position plot
    recompute_batch: int = 64  # windows per forward pass in "window_recompute"
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.lengths or any(int(n) < 2 for n in self.lengths):
            raise ValueError(f"eval.lengths must be a non-empty list of ints >= 2, got {self.lengths}")
        self.lengths = sorted(set(int(n) for n in self.lengths))
        if self.n_streams < 1:
            raise ValueError(f"eval.n_streams must be >= 1, got {self.n_streams}")
        if self.split not in EVAL_SPLITS:
            raise ValueError(f"eval.split must be one of {EVAL_SPLITS}, got {self.split!r}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"eval.methods: unknown {bad or 'empty list'}; choose from {list(METHODS)}")
        if self.n_sink < 1:
            raise ValueError(
                f"eval.n_sink must be >= 1 (the sink method keeps that many tokens), got {self.n_sink}"
            )
        if self.cache_budget is not None and self.cache_budget < self.n_sink + 2:
            raise ValueError(
                f"eval.cache_budget ({self.cache_budget}) must be >= eval.n_sink + 2 = {self.n_sink + 2} "
                "(the sinks, at least one recent token and the query itself)"
            )
        for name in ("tail_tokens", "smooth", "recompute_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {value}")


@dataclass
class LongContextConfig:
    name: str = "long-context-embedded"
    out_dir: str = "experiments/long_context"  # record, curves JSON and PNGs: <out_dir>/<name>*.{json,png}
    lm: LMRunConfig = field(default_factory=_default_lm)  # both models; out dirs <lm.train.out_dir>/<variant>
    learned_sinks: int = 1  # model.n_sinks of the second model
    no_sink_run: str | None = None  # reuse this run/checkpoint folder instead of training the plain model
    learned_sink_run: str | None = None  # ... and this one instead of training the learnable-sink model
    eval: LongContextEvalConfig = field(default_factory=LongContextEvalConfig)
    threads: int = 2  # torch CPU threads (the machine is shared)
    log: bool = True  # append a dated entry to experiments/LOG.md

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must be non-empty (it names the record and plots)")
        if self.learned_sinks < 1:
            raise ValueError(
                f"learned_sinks must be >= 1 (n_sinks of the second model), got {self.learned_sinks}"
            )
        if self.lm.model.pos_encoding == "learned":
            raise ValueError(
                "lm.model.pos_encoding='learned' cannot run past max_seq_len or be re-indexed by the streaming "
                "cache; use 'rope' (or 'none')"
            )
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


# ----------------------------------------------------------------------------------------------------------
# Streams
# ----------------------------------------------------------------------------------------------------------


def form_streams(tokens: np.ndarray | torch.Tensor, eos_id: int, length: int, n_streams: int) -> torch.Tensor:
    """Up to ``n_streams`` non-overlapping (length,) streams, each starting at an ``eos_id`` -> (S, length).

    Streams are taken greedily in order: the next one starts at the first <eos> at or after the previous end.
    """
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    starts_at = torch.nonzero(ids == eos_id).flatten().tolist()
    streams, next_free = [], 0
    for start in starts_at:
        if len(streams) == n_streams:
            break
        if start < next_free or start + length > ids.numel():
            continue
        streams.append(ids[start : start + length])
        next_free = start + length
    if not streams:
        raise ValueError(
            f"the eval split has {ids.numel()} tokens: not one stream of max(eval.lengths)={length} tokens fits "
            "(starting at a document boundary); lower eval.lengths or use a larger split (data.val_fraction)"
        )
    return torch.stack(streams)  # (S, length)


# ----------------------------------------------------------------------------------------------------------
# Per-token NLL under each method
# ----------------------------------------------------------------------------------------------------------


def method_cache(method: str, cache_budget: int, n_sink: int) -> tuple[str, int, int | None]:
    """-> (cache_kind, n_sink, window) for ``streaming_perplexity``: a query sees ``cache_budget`` tokens."""
    if method == "dense":
        return "dense", 0, None
    if method == "window":
        return "window", 0, cache_budget - 1
    if method == "sink":
        if cache_budget - 1 - n_sink < 1:
            raise ValueError(f"cache_budget {cache_budget} leaves no recent window next to {n_sink} sinks")
        return "sink", n_sink, cache_budget - 1 - n_sink
    raise ValueError(f"method {method!r} has no streaming cache; cache methods are dense/window/sink")


@torch.no_grad()
def recompute_window_nll(
    model: torch.nn.Module, ids: torch.Tensor, window: int, batch: int = 64
) -> torch.Tensor:
    """NLL of token t+1 from a FRESH forward over the last ``window`` tokens <= t (positions 0..window-1).

    The first ``window - 1`` predictions have a shorter history, equal to the dense prefix, so one dense pass
    covers them; the rest are the ``(N - window + 1)`` full windows, run ``batch`` at a time.
    """
    ids = ids.flatten()
    n_tokens = ids.numel()
    device = next(model.parameters()).device
    ids = ids.to(device)
    head = min(window, n_tokens)
    logits = model(ids[None, :head]).logits[0]  # (head, V)
    nll = [F.cross_entropy(logits[: head - 1].float(), ids[1:head], reduction="none")]
    if n_tokens > window:
        windows = ids[:-1].unfold(0, window, 1)  # (N - window, window): window i ends at token i + window - 1
        for lo in range(0, windows.shape[0], batch):
            chunk = windows[lo : lo + batch]  # (b, window)
            last = model(chunk).logits[:, -1]  # (b, V)
            targets = ids[lo + window : lo + window + chunk.shape[0]]
            nll.append(F.cross_entropy(last.float(), targets, reduction="none"))
    return torch.cat(nll).cpu()  # (N - 1,)


def per_token_nll(
    model: torch.nn.Module,
    ids: torch.Tensor,
    method: str,
    cache_budget: int,
    n_sink: int = 4,
    recompute_batch: int = 64,
) -> torch.Tensor:
    """(N - 1,) nats: nll[i] = -log p(ids[i + 1] | what ``method`` lets the model see of ids[:i + 1])."""
    was_training = model.training
    model.eval()
    try:
        if method == "window_recompute":
            return recompute_window_nll(model, ids, cache_budget, recompute_batch)
        kind, sinks, window = method_cache(method, cache_budget, n_sink)
        if kind == "dense":  # the whole stream as one chunk = one plain forward at positions 0..N-1
            return streaming_perplexity(model, ids, "dense", chunk_size=ids.numel()).nll
        # caches: one token per step, exactly as in decoding (chunks would let early queries see more)
        return streaming_perplexity(model, ids, kind, n_sink=sinks, window=window, chunk_size=1).nll
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------
# Metrics per length
# ----------------------------------------------------------------------------------------------------------


def span_bytes(tokenizer: Any, ids: torch.Tensor) -> int:
    """UTF-8 bytes of the text these token ids encode (special tokens such as <eos> add none)."""
    text = tokenizer.decode(ids.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return len(text.encode("utf-8"))


def length_metrics(
    nll: torch.Tensor,
    streams: torch.Tensor,
    tokenizer: Any,
    lengths: list[int],
    tail_tokens: int,
) -> dict[str, dict[str, float]]:
    """``nll`` (S, N - 1) per-token NLLs of ``streams`` (S, N) -> {str(L): ppl, bpb, tail_ppl, tail_bpb, ...}."""
    out = {}
    for L in lengths:
        tail = min(tail_tokens, L - 1)
        full_nll = nll[:, : L - 1]  # (S, L - 1): predictions of tokens 1..L-1
        tail_nll = nll[:, L - 1 - tail : L - 1]
        full_bytes = sum(span_bytes(tokenizer, s[1:L]) for s in streams)
        tail_bytes = sum(span_bytes(tokenizer, s[L - tail : L]) for s in streams)
        _, stream_std = mean_std(full_nll.mean(dim=1).tolist())
        out[str(L)] = {
            "ppl": perplexity(float(full_nll.mean())),
            "bpb": bits_per_byte(float(full_nll.sum()), full_bytes) if full_bytes else math.nan,
            "tail_ppl": perplexity(float(tail_nll.mean())),
            "tail_bpb": bits_per_byte(float(tail_nll.sum()), tail_bytes) if tail_bytes else math.nan,
            "mean_nll": float(full_nll.mean()),
            "stream_nll_std": stream_std,
            "n_tokens": int(full_nll.numel()),
            "n_bytes": int(full_bytes),
            "tail_tokens": tail,
        }
    return out


def moving_average(x: np.ndarray, width: int) -> np.ndarray:
    """Trailing mean over the last ``width`` values (fewer at the start), same length as ``x``."""
    c = np.cumsum(np.concatenate([[0.0], np.asarray(x, dtype=np.float64)]))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - width, 0)
    return (c[idx] - c[lo]) / (idx - lo)


# ----------------------------------------------------------------------------------------------------------
# Models: train both with the LM stage, or reuse run folders
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ModelUnderTest:
    variant: str  # "no_sink" | "learned_sink"
    model: torch.nn.Module
    tokenizer: Any
    checkpoint: Path
    train_context: int
    train_summary: dict[str, Any]


def variant_lm_config(cfg: LongContextConfig, variant: str, tokenizer_dir: Path | None) -> LMRunConfig:
    """The LM-stage config of one variant: n_sinks 0 or ``learned_sinks``, its own out dir, shared tokenizer."""
    from modern_llm.config.base import apply_overrides

    overrides: dict[str, Any] = {
        "name": f"{cfg.name}-{variant}",
        "record": None,
        "model.n_sinks": 0 if variant == "no_sink" else cfg.learned_sinks,
        "train.out_dir": str(Path(cfg.lm.train.out_dir) / variant),
    }
    if tokenizer_dir is not None:
        overrides["data.tokenizer"] = str(tokenizer_dir)
    return apply_overrides(cfg.lm, overrides)


def obtain_models(cfg: LongContextConfig, device: torch.device) -> list[ModelUnderTest]:
    """Train (or resume/reuse) the plain model, then the learnable-sink one on the same tokenizer."""
    from modern_llm.models.pretrained import load_pretrained
    from modern_llm.training import train_lm

    given = {"no_sink": cfg.no_sink_run, "learned_sink": cfg.learned_sink_run}
    models, tokenizer_dir = [], None
    for variant in MODEL_VARIANTS:
        summary: dict[str, Any] = {}
        if given[variant]:
            source = Path(given[variant])
            log.info("%s: reusing %s", variant, source)
        else:
            run_cfg = variant_lm_config(cfg, variant, tokenizer_dir)
            log.info("%s: training %s (n_sinks=%d)", variant, run_cfg.train.out_dir, run_cfg.model.n_sinks)
            summary = train_lm.run(run_cfg)
            source = Path(run_cfg.train.out_dir)
        model, tokenizer, ckpt = load_pretrained(source, device=str(device))
        if tokenizer is None:
            raise FileNotFoundError(
                f"{ckpt}: no tokenizer/ folder; the streams need the model's own tokenizer"
            )
        if variant == "no_sink":
            tokenizer_dir = ckpt / "tokenizer"
        want_sinks = variant == "learned_sink"
        if bool(model.config.n_sinks) != want_sinks:
            field_name = f"{variant}_run"
            raise ValueError(
                f"{field_name}={source}: its model has n_sinks={model.config.n_sinks}, but the {variant} "
                f"slot needs {'n_sinks >= 1' if want_sinks else 'n_sinks = 0'}"
            )
        models.append(ModelUnderTest(variant, model, tokenizer, ckpt, model.config.max_seq_len, summary))
    return models


def eval_streams(cfg: LongContextConfig, tokenizer: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token streams of the eval split for one tokenizer (cached token files of the LM stage)."""
    from modern_llm.data.lm_datasets import prepare_lm_data

    data = prepare_lm_data(
        cfg.lm.data.corpus,
        tokenizer,
        block_size=min(cfg.eval.lengths),
        data_dir=cfg.lm.data.data_dir,
        cache_dir=cfg.lm.data.cache_dir,
        val_fraction=cfg.lm.data.val_fraction,
        max_docs=cfg.lm.data.max_docs,
    )
    split = data.splits.get(cfg.eval.split)
    if split is None:
        raise ValueError(
            f"eval.split={cfg.eval.split!r}: corpus {cfg.lm.data.corpus!r} has splits {sorted(data.splits)}"
        )
    L = max(cfg.eval.lengths)
    streams = form_streams(split.tokens, tokenizer.eos_token_id, L, cfg.eval.n_streams)
    if streams.shape[0] < cfg.eval.n_streams:
        log.warning(
            "only %d of eval.n_streams=%d streams of %d tokens fit in %s/%s (%d tokens)",
            streams.shape[0],
            cfg.eval.n_streams,
            L,
            cfg.lm.data.corpus,
            cfg.eval.split,
            split.n_tokens,
        )
    info = {
        "split_tokens": split.n_tokens,
        "split_bytes": split.n_bytes,
        "split_docs": split.n_docs,
        "split_bytes_per_token": split.n_bytes / max(split.n_tokens, 1),
        "source": data.source,
        "tokenizer_hash": data.tokenizer_hash,
        "split_rule": data.split_rule,
    }
    return streams, info


# ----------------------------------------------------------------------------------------------------------
# Experiment
# ----------------------------------------------------------------------------------------------------------


def evaluate_model(
    mut: ModelUnderTest, streams: torch.Tensor, cfg: LongContextEvalConfig
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, list[float]]]:
    """-> ({method: {str(L): metrics}}, {method: per-position mean NLL over streams})."""
    budget = cfg.cache_budget or mut.train_context
    tail = cfg.tail_tokens or max(1, mut.train_context // 2)
    metrics, curves = {}, {}
    for method in cfg.methods:
        t0 = time.time()
        nll = torch.stack(
            [per_token_nll(mut.model, s, method, budget, cfg.n_sink, cfg.recompute_batch) for s in streams]
        )  # (S, N - 1)
        if not torch.isfinite(nll).all():
            raise RuntimeError(f"{mut.variant}/{method}: non-finite NLL; the model or cache is broken")
        metrics[method] = length_metrics(nll, streams, mut.tokenizer, cfg.lengths, tail)
        curves[method] = nll.mean(dim=0).tolist()
        last = metrics[method][str(max(cfg.lengths))]
        log.info(
            "%s/%s: ppl@%d %.3f (tail %.3f), bpb %.4f  [%.1fs]",
            mut.variant,
            method,
            max(cfg.lengths),
            last["ppl"],
            last["tail_ppl"],
            last["bpb"],
            time.time() - t0,
        )
    return metrics, curves


def plot_ppl_vs_length(
    metrics: dict[str, dict[str, dict[str, dict[str, float]]]],
    train_context: int,
    out_png: Path,
    title: str,
) -> Path:
    """Two panels (all-token PPL, tail PPL) vs stream length, one line per model x method, log-log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"no_sink": "-", "learned_sink": "--"}
    for ax, key, label in ((axes[0], "ppl", "PPL over all tokens"), (axes[1], "tail_ppl", "tail PPL (at L)")):
        for variant, per_method in metrics.items():
            for i, (method, per_len) in enumerate(per_method.items()):
                xs = [int(n) for n in per_len]
                ys = [per_len[n][key] for n in per_len]
                ax.plot(
                    xs, ys, styles.get(variant, ":"), color=f"C{i}", marker="o", label=f"{variant}/{method}"
                )
        ax.axvline(train_context, color="grey", linestyle=":", label="training context")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("stream length L (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def plot_nll_vs_position(
    curves: dict[str, dict[str, list[float]]],
    train_context: int,
    smooth: int,
    out_png: Path,
    title: str,
) -> Path:
    """One panel per model: moving-average NLL vs context length (token position), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4.2), sharey=True, squeeze=False)
    for ax, (variant, per_method) in zip(axes[0], curves.items()):
        for i, (method, curve) in enumerate(per_method.items()):
            xs = np.arange(1, len(curve) + 1)  # tokens of context before the predicted token
            ax.plot(xs, moving_average(np.asarray(curve), smooth), color=f"C{i}", label=method)
        ax.axvline(train_context, color="grey", linestyle=":", label="training context")
        ax.set_title(variant)
        ax.set_xlabel("token position (context length)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"NLL (nats), {smooth}-token moving average")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def describe_results(metrics: dict, lengths: list[int], train_context: int) -> tuple[str, str]:
    """(result, meaning) sentences for the log, computed from the numbers (tail PPL at max L vs at train ctx)."""
    L_max = str(max(lengths))
    L_ref = str(min(lengths, key=lambda n: abs(n - train_context)))
    parts, verdicts = [], []
    for variant, per_method in metrics.items():
        for method, per_len in per_method.items():
            ref, far = per_len[L_ref]["tail_ppl"], per_len[L_max]["tail_ppl"]
            ratio = far / ref
            parts.append(
                f"{variant}/{method}: PPL@{L_max} {per_len[L_max]['ppl']:.2f} (bpb {per_len[L_max]['bpb']:.3f}), "
                f"tail PPL {ref:.2f}@{L_ref} -> {far:.2f}@{L_max}"
            )
            trend = "blows up" if ratio > 1.5 else "stays flat" if ratio < 1.1 else "degrades mildly"
            verdicts.append(f"{variant}/{method} {trend} (x{ratio:.2f})")
    meaning = (
        f"Tail PPL at {L_max} tokens relative to {L_ref} (the training context): "
        + "; ".join(verdicts)
        + ". StreamingLLM's claim is that window-only blows up and sink+window stays flat; compare the "
        "no_sink/window and no_sink/sink verdicts above (small model, short training: a weak test)."
    )
    return "; ".join(parts), meaning


def run_experiment(cfg: LongContextConfig, command: str | None = None) -> dict[str, Any]:
    """Train/reuse both models, score every method, write record + curves + PNGs (+ log); return the record."""
    from modern_llm.config.base import config_to_dict
    from modern_llm.data.tokenizer import tokenizer_fingerprint
    from modern_llm.utils.hardware import describe_device, resolve_device
    from modern_llm.utils.records import append_log, current_command, now_iso, write_record

    started, t0 = now_iso(), time.time()
    command = command or current_command()
    device = resolve_device(cfg.eval.device)
    models = obtain_models(cfg, device)
    t_eval = time.time()
    metrics, curves, per_model, streams_by_tok = {}, {}, {}, {}
    for mut in models:
        tok_hash = tokenizer_fingerprint(mut.tokenizer)
        if tok_hash not in streams_by_tok:
            streams_by_tok[tok_hash] = eval_streams(cfg, mut.tokenizer)
        streams, data_info = streams_by_tok[tok_hash]
        metrics[mut.variant], curves[mut.variant] = evaluate_model(mut, streams, cfg.eval)
        per_model[mut.variant] = {
            "checkpoint": str(mut.checkpoint),
            "n_sinks": mut.model.config.n_sinks,
            "params": mut.model.num_params(),
            "train_context": mut.train_context,
            "cache_budget": cfg.eval.cache_budget or mut.train_context,
            "tail_tokens": cfg.eval.tail_tokens or max(1, mut.train_context // 2),
            "n_streams": int(streams.shape[0]),
            "train_val_ppl": mut.train_summary.get("eval/ppl"),
            "train_val_bpb": mut.train_summary.get("eval/bpb"),
            "train_steps": mut.train_summary.get("step"),
            "model_config": config_to_dict(mut.model.config),
        } | data_info
    eval_s = time.time() - t_eval

    out_dir = Path(cfg.out_dir)
    slug = cfg.name.replace("/", "_")
    train_context = models[0].train_context
    ppl_png = plot_ppl_vs_length(
        metrics, train_context, out_dir / f"{slug}_ppl_vs_length.png", f"{cfg.name}: PPL vs stream length"
    )
    nll_png = plot_nll_vs_position(
        curves,
        train_context,
        cfg.eval.smooth,
        out_dir / f"{slug}_nll_vs_position.png",
        f"{cfg.name}: per-token NLL",
    )
    curves_file = out_dir / f"{slug}_curves.json"
    curves_file.write_text(json.dumps({"mean_nll_by_position": curves, "x": "token position - 1"}) + "\n")
    protocol = {
        "corpus": cfg.lm.data.corpus,
        "split": cfg.eval.split,
        "tokenizer": cfg.lm.data.tokenizer
        if cfg.lm.data.tokenizer != "train"
        else "bpe trained on the train split",
        "context": train_context,
        "lengths": cfg.eval.lengths,
        "stride": "each stream scored once; length L = the first L tokens of every stream",
        "streams": f"non-overlapping streams of {max(cfg.eval.lengths)} tokens starting at <eos> document "
        "boundaries of the split's '<eos> doc <eos> doc ...' token file, in corpus order",
        "ppl": "exp(total NLL / total predictions) pooled over streams, L - 1 predictions per stream; "
        "tail_ppl = only the last tail_tokens predictions before L",
        "bpb": "total NLL / (ln 2 * UTF-8 bytes of the decoded target tokens of the same span); <eos> = 0 bytes",
        "methods": {
            "dense": "one forward over the stream (RoPE positions 0..L-1; extrapolates past the training context)",
            "window": "StreamingKVCache n_sink=0, window=budget-1, one token per step, no recomputation",
            "sink": f"StreamingKVCache n_sink={cfg.eval.n_sink}, window=budget-1-n_sink, one token per step",
            "window_recompute": "fresh forward over the last budget tokens for every prediction",
        },
        "n_sink": cfg.eval.n_sink,
        "learned_sinks": cfg.learned_sinks,
        "models": per_model,
        "eval_time_s": round(eval_s, 1),
        "curves_json": str(curves_file),
        "plots": [str(ppl_png), str(nll_png)],
        "config": config_to_dict(cfg),
    }
    record_path = out_dir / f"{slug}.json"
    write_record(
        record_path,
        name=cfg.name,
        task=f"long_context/{cfg.lm.data.corpus}",
        model=f"ModernDecoderLM-{models[0].model.num_params() / 1e6:.2f}M (no sinks / {cfg.learned_sinks} learned)",
        metrics=metrics,
        protocol=protocol,
        seed=cfg.lm.train.seed,
        device=describe_device(device),
        dtype="fp32",
        started=started,
        duration_s=time.time() - t0,
        command=command,
    )
    if cfg.log:
        result, meaning = describe_results(metrics, cfg.eval.lengths, train_context)
        append_log(
            f"long-context ({cfg.name})",
            what=f"PPL/bpb vs stream length {cfg.eval.lengths} (training context {train_context}) for dense, "
            f"sliding window, {cfg.eval.n_sink} sinks + window and window recompute, on a plain model and one "
            f"trained with {cfg.learned_sinks} learnable sink(s); record {record_path}",
            command=command,
            result=result,
            meaning=meaning,
            path=Path(cfg.out_dir).parent / "LOG.md",
        )
    return json.loads(record_path.read_text())


def _dotted(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"lm": {"train": {"lr": 1}}} -> {"lm.train.lr": 1}; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out |= _dotted(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_long_context_config(
    path: str | Path | None = None, overrides: dict | list | None = None
) -> LongContextConfig:
    """Defaults <- YAML <- CLI overrides, where a YAML's ``lm`` section only changes the fields it names.

    (``config.base.load_config`` would rebuild ``lm`` from ``LMRunConfig()``'s own defaults — 256-token
    context, 1000 steps — instead of this experiment's small model.)
    """
    from modern_llm.config.base import apply_overrides, parse_overrides, read_mapping

    cfg = LongContextConfig()
    if path:
        cfg = apply_overrides(cfg, _dotted(read_mapping(path)))
    if overrides:
        cfg = apply_overrides(cfg, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return cfg


def format_table(metrics: dict, lengths: list[int]) -> str:
    """Markdown table: one row per model/method, PPL (bpb) per length, then tail PPL per length."""
    head = (
        "| model/method | "
        + " | ".join(f"L={n}" for n in lengths)
        + " | "
        + " | ".join(f"tail@{n}" for n in lengths)
    )
    lines = [head + " |", "|" + "---|" * (1 + 2 * len(lengths))]
    for variant, per_method in metrics.items():
        for method, per_len in per_method.items():
            cells = [f"{per_len[str(n)]['ppl']:.2f} ({per_len[str(n)]['bpb']:.3f})" for n in lengths]
            tails = [f"{per_len[str(n)]['tail_ppl']:.2f}" for n in lengths]
            lines.append(f"| {variant}/{method} | " + " | ".join(cells + tails) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from modern_llm.config.base import config_help

    parser = argparse.ArgumentParser(
        prog="modern-llm long-context",
        description="Perplexity and bits-per-byte vs context length (0.5x..8x the training context) for dense "
        "attention, a sliding window, StreamingLLM sinks + window and a learnable-sink model; writes a record, "
        "NLL curves and PNGs under experiments/long_context/.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (override any with --field value):\n" + config_help(LongContextConfig()),
    )
    parser.add_argument("--config", help="YAML file, e.g. configs/long_context/embedded-cpu.yaml")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_long_context_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(cfg.threads)
    record = run_experiment(cfg)
    print(format_table(record["metrics"], cfg.eval.lengths))
    print(f"record: {Path(cfg.out_dir) / (cfg.name.replace('/', '_') + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
