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
- ``window``: ``StreamingKVCache`` with no sinks, decoding token by token (no recomputation); all streams
  go through one cache as a batch (they share its eviction schedule).
- ``sink``: StreamingLLM — the first ``n_sink`` tokens (default 4) + the recent window.
- ``window_recompute``: the oracle sliding window: every token is scored from a fresh forward over its
  ``cache_budget`` previous tokens, so the first token of each window is again a "first token". Costly in
  real decoding; here it tells how much of a gap is due to eviction rather than to lost context.

Positive control (``hf_model``, configs/long_context/smollm2-control.yaml)
- Whether window-only attention collapses depends on whether the model learned to dump attention on token 0.
  Tiny models trained for minutes may not; so the same harness also scores a pretrained Llama-architecture
  model (SmolLM2-135M, offline) imported into ModernDecoderLM, with an explicit ``eval.cache_budget``. If the
  harness is right, that model must show the StreamingLLM pattern. ``attention_sink_stats`` records, for
  every model, the attention mass on token 0 / later <eos> tokens / learnable sinks against uniform attention.

Protocol (stated in every record)
- Streams: the split's token file is ``<eos> doc <eos> doc ...`` (``data.lm_datasets``). A stream is
  ``<eos> doc_i SEP doc_i+1 SEP ...`` cut at ``max(lengths)`` tokens; up to ``n_streams`` of them, in corpus
  order, no document shared. Two separators: ``eos`` (exactly the training format) and ``newline`` (a blank
  line's tokens, so the only <eos> is the first token). The second exists because a frequent delimiter token
  can itself act as an attention sink: with short documents every window holds an <eos>, and window-only
  attention then never loses its sink. Length L is scored on the first L tokens of every stream. Each
  method is causal (a cache's state at token t depends only on tokens <= t), so the NLLs at length L are
  exactly the first L - 1 NLLs of the longest run, and every method runs once per stream batch.
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
from modern_llm.inference.streaming import StreamingKVCache
from modern_llm.training.train_lm import LMRunConfig

log = logging.getLogger(__name__)

METHODS = ("dense", "window", "sink", "window_recompute")
MODEL_VARIANTS = ("no_sink", "learned_sink")
EVAL_SPLITS = ("val", "test")
DOC_SEPARATORS = ("eos", "newline")  # <eos> as in training | a blank line (no delimiter token in the stream)


def _default_lm() -> LMRunConfig:
    """= configs/long_context/embedded-cpu.yaml: ~4 CPU minutes per model; max_seq_len 64, so 512 = 8x."""
    from modern_llm.config.base import apply_overrides

    return apply_overrides(
        LMRunConfig(name="long-context"),
        {
            "model.d_model": 128,
            "model.n_layers": 4,
            "model.n_heads": 4,
            "model.n_kv_heads": 2,
            "model.max_seq_len": 64,
            "train.out_dir": "runs/long_context/embedded-4l",
            "train.max_steps": 600,
            "train.batch_size": 16,
            "train.lr": 0.003,
            "train.warmup_steps": 50,
            "train.eval_batches": 16,
            "train.save_every": 200,
            "train.log_every": 50,
            "train.tensorboard": False,
            "train.progress": False,
            "data.corpus": "embedded",
            "data.vocab_size": 2048,
            "sample.max_new_tokens": 40,
        },
    )


@dataclass
class LongContextEvalConfig:
    lengths: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # tokens per scored stream
    n_streams: int = 8  # streams of max(lengths) tokens; fewer (with a warning) if the split is short
    split: str = "val"  # "val" | "test" (a corpus's test split, when it has one)
    separators: list[str] = field(default_factory=lambda: list(DOC_SEPARATORS))  # between documents
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
        bad_sep = [x for x in self.separators if x not in DOC_SEPARATORS]
        if bad_sep or not self.separators:
            raise ValueError(
                f"eval.separators: unknown {bad_sep or 'empty list'}; choose from {list(DOC_SEPARATORS)}"
            )
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
    variants: list[str] = field(default_factory=lambda: list(MODEL_VARIANTS))  # small models to train/reuse
    no_sink_run: str | None = None  # reuse this run/checkpoint folder instead of training the plain model
    learned_sink_run: str | None = None  # ... and this one instead of training the learnable-sink model
    # Positive control: a pretrained Llama-architecture model (hf.registry name or folder) imported into
    # ModernDecoderLM and scored as variant "pretrained". Its context is long, so eval.cache_budget must be set.
    hf_model: str | None = None
    eval: LongContextEvalConfig = field(default_factory=LongContextEvalConfig)
    threads: int = 1  # torch CPU threads: on a shared 2-core box, 2 threads made decoding steps ~25x slower
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
        bad = [v for v in self.variants if v not in MODEL_VARIANTS]
        if bad or not (self.variants or self.hf_model):
            raise ValueError(
                f"variants: unknown {bad or 'empty list and no hf_model'}; choose from {list(MODEL_VARIANTS)}"
            )
        if self.hf_model and self.eval.cache_budget is None:
            raise ValueError(
                "hf_model needs eval.cache_budget (e.g. 64): a pretrained model's own context (thousands of "
                "tokens) is longer than the streams, so window/sink caches would never evict"
            )


# ----------------------------------------------------------------------------------------------------------
# Streams
# ----------------------------------------------------------------------------------------------------------


def split_documents(tokens: np.ndarray | torch.Tensor, eos_id: int) -> list[torch.Tensor]:
    """The non-empty token runs between ``eos_id`` tokens of a split's ``<eos> doc <eos> doc ...`` file."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    cuts = torch.nonzero(ids == eos_id).flatten().tolist()
    bounds = [-1, *cuts, ids.numel()]
    return [ids[a + 1 : b] for a, b in zip(bounds[:-1], bounds[1:]) if b - a > 1]


def form_streams(
    tokens: np.ndarray | torch.Tensor,
    eos_id: int,
    length: int,
    n_streams: int,
    separator: list[int] | None = None,
) -> torch.Tensor:
    """Up to ``n_streams`` streams ``<eos> doc_i SEP doc_i+1 SEP ...`` cut at ``length`` tokens -> (S, length).

    ``separator`` (token ids) defaults to ``[eos_id]``, which reproduces the split's own token file. Streams are
    taken in corpus order and share no document token: the next stream starts at the first document the
    previous one did not reach.
    """
    sep = torch.tensor([eos_id] if separator is None else separator, dtype=torch.long)
    docs = split_documents(tokens, eos_id)
    streams, i = [], 0
    while i < len(docs) and len(streams) < n_streams:
        parts, n, j = [torch.tensor([eos_id])], 1, i
        while n < length and j < len(docs):
            parts += [docs[j], sep]
            n += docs[j].numel() + sep.numel()
            j += 1
        if n < length:  # the split ran out of documents
            break
        streams.append(torch.cat(parts)[:length])
        i = j
    if not streams:
        n_tokens = sum(d.numel() for d in docs)
        raise ValueError(
            f"the eval split has {n_tokens} document tokens: not one stream of max(eval.lengths)={length} tokens "
            "fits; lower eval.lengths or use a larger split (data.val_fraction)"
        )
    return torch.stack(streams)  # (S, length)


def separator_ids(tokenizer: Any, separator: str) -> list[int]:
    """Token ids put between documents: ``eos`` -> [eos_id]; ``newline`` -> the encoding of a blank line."""
    if separator == "eos":
        return [tokenizer.eos_token_id]
    ids = tokenizer.encode("\n\n", add_special_tokens=False)
    if not ids or tokenizer.eos_token_id in ids:
        raise ValueError(
            f"tokenizer encodes a blank line as {ids}; cannot build eval.separators=newline streams"
        )
    return ids


# ----------------------------------------------------------------------------------------------------------
# Per-token NLL under each method
# ----------------------------------------------------------------------------------------------------------


def method_cache(method: str, cache_budget: int, n_sink: int) -> tuple[str, int, int | None]:
    """-> (cache_kind, n_sink, window) of ``streaming_perplexity``'s caches: a query sees ``cache_budget``
    tokens, itself included."""
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
    covers them; the rest are the ``N - window`` full windows, run ``batch`` at a time.
    """
    ids = ids.flatten()
    n_tokens = ids.numel()
    ids = ids.to(next(model.parameters()).device)
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


@torch.no_grad()
def _cached_nll(model: torch.nn.Module, ids: torch.Tensor, n_sink: int, window: int) -> torch.Tensor:
    """(S, N) streams fed one token per step through ONE StreamingKVCache -> (S, N - 1) NLLs.

    All rows advance in lockstep, so they share the cache's eviction schedule; one step per token is exactly
    decoding (a chunk would let its early queries see more than the window).
    """
    cache = StreamingKVCache.for_model(model, n_sink, window)
    out = []
    for t in range(ids.shape[1] - 1):
        logits = model(ids[:, t : t + 1], kv_cache=cache).logits[:, -1]  # (S, V)
        out.append(F.cross_entropy(logits.float(), ids[:, t + 1], reduction="none"))
    return torch.stack(out, dim=1)


def stream_nll(
    model: torch.nn.Module,
    streams: torch.Tensor,
    method: str,
    cache_budget: int,
    n_sink: int = 4,
    recompute_batch: int = 64,
) -> torch.Tensor:
    """(S, N) or (N,) token streams -> NLLs (S, N - 1) or (N - 1,) in nats, fp32 on CPU:
    nll[..., i] = -log p(token i + 1 | what ``method`` lets the model see of tokens <= i)."""
    single = streams.dim() == 1
    ids = streams.reshape(1, -1) if single else streams
    ids = ids.to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if method == "window_recompute":
                nll = torch.stack(
                    [recompute_window_nll(model, s, cache_budget, recompute_batch) for s in ids]
                )
            else:
                kind, sinks, window = method_cache(method, cache_budget, n_sink)
                if kind == "dense":  # one plain forward at positions 0..N-1: RoPE extrapolation past training
                    # one stream at a time: (S, N, V) logits of a 50k-vocab model would take gigabytes
                    rows = [model(row[None]).logits[0, :-1].float() for row in ids]  # each (N - 1, V)
                    nll = torch.stack(
                        [F.cross_entropy(x, row[1:], reduction="none") for x, row in zip(rows, ids)]
                    )
                else:
                    nll = _cached_nll(model, ids, sinks, window)
    finally:
        model.train(was_training)
    nll = nll.float().cpu()
    return nll[0] if single else nll


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
    checkpoint: str  # checkpoint folder, or the hf_model name
    train_context: int
    train_summary: dict[str, Any]

    def cache_budget(self, cfg: LongContextEvalConfig) -> int:
        return cfg.cache_budget or self.train_context

    def tail_tokens(self, cfg: LongContextEvalConfig) -> int:
        return cfg.tail_tokens or max(1, self.cache_budget(cfg) // 2)


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
    for variant in cfg.variants:
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
        models.append(ModelUnderTest(variant, model, tokenizer, str(ckpt), model.config.max_seq_len, summary))
    if cfg.hf_model:
        models.append(load_pretrained_control(cfg.hf_model, device))
    return models


def load_pretrained_control(name: str, device: torch.device) -> ModelUnderTest:
    """A Hugging Face Llama-architecture model (``hf.registry`` name or folder) as a ModernDecoderLM."""
    from modern_llm.hf.registry import load_model
    from modern_llm.models.hf_convert import from_hf_model

    hf_model, tokenizer = load_model(name, task="causal")
    model = from_hf_model(hf_model).to(device).eval()  # same weights; our attention, so our caches apply
    del hf_model
    if tokenizer.eos_token_id is None:
        raise ValueError(f"hf_model={name!r}: its tokenizer has no eos token to separate documents")
    return ModelUnderTest("pretrained", model, tokenizer, name, model.config.max_seq_len, {})


def eval_streams(cfg: LongContextConfig, tokenizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """{separator: (S, max(lengths)) streams} of the eval split for one tokenizer, plus split statistics."""
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
    L, eos = max(cfg.eval.lengths), tokenizer.eos_token_id
    streams = {}
    for sep in cfg.eval.separators:
        streams[sep] = form_streams(split.tokens, eos, L, cfg.eval.n_streams, separator_ids(tokenizer, sep))
        if streams[sep].shape[0] < cfg.eval.n_streams:
            log.warning(
                "only %d of eval.n_streams=%d streams of %d tokens fit in %s/%s (%d tokens)",
                streams[sep].shape[0],
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
        "split_tokens_per_doc": split.n_tokens / max(split.n_docs, 1),
        "split_bytes_per_token": split.n_bytes / max(split.n_tokens, 1),
        "n_streams": {sep: int(x.shape[0]) for sep, x in streams.items()},
        "eos_per_stream": {sep: float((x == eos).sum(dim=1).float().mean()) for sep, x in streams.items()},
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
    budget, tail = mut.cache_budget(cfg), mut.tail_tokens(cfg)
    metrics, curves = {}, {}
    for method in cfg.methods:
        t0 = time.time()
        nll = stream_nll(mut.model, streams, method, budget, cfg.n_sink, cfg.recompute_batch)  # (S, N - 1)
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


def attention_sink_stats(
    mut: ModelUnderTest, streams: torch.Tensor, cfg: LongContextEvalConfig
) -> dict[str, Any]:
    """Where attention goes within the first cache-budget tokens: per layer, the mass on the first token, on <eos>
    tokens after it and on the learnable sinks, each with the uniform-attention baseline, mean over streams.

    A model whose window-only cache does not blow up may simply never have learned a first-token sink; these
    numbers say whether it did (StreamingLLM: most mass on token 0 in all but the first layers).
    """
    from modern_llm.evaluation.attention_viz import modern_attention_maps, sink_summary

    T = min(mut.cache_budget(cfg), streams.shape[1])
    n_sinks = mut.model.config.n_sinks
    eos = mut.tokenizer.eos_token_id
    per_stream, eos_mass, eos_uniform = [], [], []
    for ids in streams[:, :T]:
        probs = modern_attention_maps(mut.model, ids)  # (L, H, T, n_sinks + T)
        per_stream.append(sink_summary(probs, n_sinks, n_first=1))
        later_eos = torch.nonzero(ids[1:] == eos).flatten() + 1  # <eos> positions other than token 0
        if later_eos.numel():
            cols = n_sinks + later_eos
            eos_mass.append(probs[..., cols].sum(-1)[:, :, 1:].mean(dim=(1, 2)))  # (L,), queries i >= 1
            eos_uniform.append(
                sum(float((later_eos <= i).sum()) / (n_sinks + i + 1) for i in range(1, T)) / (T - 1)
            )
    out: dict[str, Any] = {"tokens": T}
    for key, value in per_stream[0].items():
        if isinstance(value, list):
            out[key] = torch.tensor([s[key] for s in per_stream]).mean(dim=0).tolist()
        else:
            out[key] = float(np.mean([s[key] for s in per_stream]))
    if eos_mass:
        out["later_eos_mass_per_layer"] = torch.stack(eos_mass).mean(dim=0).tolist()
        out["later_eos_mass_uniform"] = float(np.mean(eos_uniform))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_vs_length(metrics: dict, budget: int, out_png: Path, title: str) -> Path:
    """Rows = document separator; columns = all-token PPL, tail PPL vs stream length; log-log axes.

    ``metrics[separator][variant][method][str(L)]`` as in the record.
    """
    plt = _pyplot()
    rows = list(metrics)
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 4.2 * len(rows)), squeeze=False)
    styles = {"no_sink": "-", "learned_sink": "--"}
    for r, sep in enumerate(rows):
        for ax, key, label in (
            (axes[r][0], "ppl", "PPL, all tokens"),
            (axes[r][1], "tail_ppl", "tail PPL (at L)"),
        ):
            for variant, per_method in metrics[sep].items():
                for i, (method, per_len) in enumerate(per_method.items()):
                    xs = [int(n) for n in per_len]
                    ys = [per_len[n][key] for n in per_len]
                    ax.plot(
                        xs,
                        ys,
                        styles.get(variant, ":"),
                        color=f"C{i}",
                        marker="o",
                        label=f"{variant}/{method}",
                    )
            ax.axvline(budget, color="grey", linestyle=":", label="cache budget")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("stream length L (tokens)")
            ax.set_ylabel(f"{label} [{sep} between docs]")
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def plot_nll_vs_position(curves: dict, budget: int, smooth: int, out_png: Path, title: str) -> Path:
    """Rows = document separator, columns = model: moving-average NLL vs token position, one line per method.

    ``curves[separator][variant][method]`` = mean NLL over streams at each position.
    """
    plt = _pyplot()
    rows = list(curves)
    cols = list(curves[rows[0]])
    fig, axes = plt.subplots(
        len(rows), len(cols), figsize=(5.5 * len(cols), 4.2 * len(rows)), sharey=True, squeeze=False
    )
    for r, sep in enumerate(rows):
        for c, variant in enumerate(cols):
            ax = axes[r][c]
            for i, (method, curve) in enumerate(curves[sep][variant].items()):
                xs = np.arange(1, len(curve) + 1)  # tokens of context before the predicted token
                ax.plot(xs, moving_average(np.asarray(curve), smooth), color=f"C{i}", label=method)
            ax.axvline(budget, color="grey", linestyle=":", label="cache budget")
            ax.set_title(f"{variant}, {sep} between docs")
            ax.set_xlabel("token position (context length)")
            ax.grid(alpha=0.3)
        axes[r][0].set_ylabel(f"NLL (nats), {smooth}-token moving average")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def describe_results(
    metrics: dict, lengths: list[int], budget: int, attention: dict | None = None
) -> tuple[str, str]:
    """(result, meaning) text for the log, computed from the numbers.

    Verdict per method from PPL over all tokens at max(L) vs at L = the cache budget: "blows up" (> x1.5),
    "degrades" (x1.1 - x1.5) or "stays flat" (< x1.1); the worst tail-PPL ratio over L > budget is quoted
    too (a collapse can partly recover further on, so the tail at max(L) alone can hide it).
    """
    L_max = str(max(lengths))
    L_ref = str(min(lengths, key=lambda n: abs(n - budget)))
    beyond = [str(n) for n in lengths if n > int(L_ref)] or [L_max]
    parts, verdicts = [], []
    for sep, per_variant in metrics.items():
        for variant, per_method in per_variant.items():
            for method, per_len in per_method.items():
                ratio = per_len[L_max]["ppl"] / per_len[L_ref]["ppl"]
                worst = max(beyond, key=lambda n: per_len[n]["tail_ppl"])
                tail_ratio = per_len[worst]["tail_ppl"] / per_len[L_ref]["tail_ppl"]
                parts.append(
                    f"[{sep}] {variant}/{method}: PPL {per_len[L_ref]['ppl']:.2f}@{L_ref} -> "
                    f"{per_len[L_max]['ppl']:.2f}@{L_max} (bpb {per_len[L_max]['bpb']:.3f}), worst tail PPL "
                    f"{per_len[worst]['tail_ppl']:.2f}@{worst}"
                )
                trend = "blows up" if ratio > 1.5 else "stays flat" if ratio < 1.1 else "degrades"
                verdicts.append(
                    f"[{sep}] {variant}/{method} {trend} (x{ratio:.2f}; worst tail x{tail_ratio:.2f})"
                )
    meaning = (
        f"PPL at {L_max} tokens relative to {L_ref} (the cache budget): "
        + "; ".join(verdicts)
        + ". StreamingLLM: on a model whose attention piles onto token 0, window blows up once token 0 is "
        "evicted while sink stays flat; dense degrades past the training context (RoPE extrapolation)."
    )
    for variant, per_sep in (attention or {}).items():
        sep = "newline" if "newline" in per_sep else next(iter(per_sep))
        stats = per_sep[sep]
        first = ", ".join(f"{x:.2f}" for x in stats.get("first_token_mass_per_layer", []))
        meaning += (
            f" {variant} attention to token 0 per layer [{first}] "
            f"(uniform {stats.get('first_token_mass_uniform', float('nan')):.2f}, {sep} streams)"
        )
        if "sink_mass_per_layer" in stats:
            sinks = ", ".join(f"{x:.2f}" for x in stats["sink_mass_per_layer"])
            meaning += f", to its learnable sink(s) [{sinks}]"
        meaning += "."
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
    metrics: dict[str, dict] = {sep: {} for sep in cfg.eval.separators}
    curves: dict[str, dict] = {sep: {} for sep in cfg.eval.separators}
    per_model, streams_by_tok = {}, {}
    for mut in models:
        tok_hash = tokenizer_fingerprint(mut.tokenizer)
        if tok_hash not in streams_by_tok:
            streams_by_tok[tok_hash] = eval_streams(cfg, mut.tokenizer)
        streams, data_info = streams_by_tok[tok_hash]
        for sep in cfg.eval.separators:
            metrics[sep][mut.variant], curves[sep][mut.variant] = evaluate_model(mut, streams[sep], cfg.eval)
        per_model[mut.variant] = {
            "checkpoint": str(mut.checkpoint),
            "n_sinks": mut.model.config.n_sinks,
            "params": mut.model.num_params(),
            "train_context": mut.train_context,
            "cache_budget": mut.cache_budget(cfg.eval),
            "tail_tokens": mut.tail_tokens(cfg.eval),
            "train_val_ppl": mut.train_summary.get("eval/ppl"),
            "train_val_bpb": mut.train_summary.get("eval/bpb"),
            "train_steps": mut.train_summary.get("step"),
            "model_config": config_to_dict(mut.model.config),
            "attention": {
                sep: attention_sink_stats(mut, streams[sep], cfg.eval) for sep in cfg.eval.separators
            },
        } | data_info
    eval_s = time.time() - t_eval

    out_dir = Path(cfg.out_dir)
    slug = cfg.name.replace("/", "_")
    budget = models[0].cache_budget(cfg.eval)  # = every model's when eval.cache_budget is set
    contexts = sorted({mut.train_context for mut in models})
    ppl_png = plot_ppl_vs_length(
        metrics, budget, out_dir / f"{slug}_ppl_vs_length.png", f"{cfg.name}: PPL vs stream length"
    )
    nll_png = plot_nll_vs_position(
        curves,
        budget,
        cfg.eval.smooth,
        out_dir / f"{slug}_nll_vs_position.png",
        f"{cfg.name}: per-token NLL (mean over streams)",
    )
    curves_file = out_dir / f"{slug}_curves.json"
    curves_file.write_text(
        json.dumps({"mean_nll_by_position": curves, "index": "i = NLL of token i+1 given tokens <= i"}) + "\n"
    )
    protocol = {
        "corpus": cfg.lm.data.corpus,
        "split": cfg.eval.split,
        "tokenizer": cfg.lm.data.tokenizer
        if cfg.lm.data.tokenizer != "train"
        else "byte-level BPE trained on the train split (shared by both models)",
        "context": contexts[0] if len(contexts) == 1 else contexts,
        "cache_budget": budget,
        "lengths": cfg.eval.lengths,
        "stride": "each stream scored once; length L = the first L tokens of every stream",
        "streams": f"up to {cfg.eval.n_streams} streams of {max(cfg.eval.lengths)} tokens: <eos> doc SEP doc SEP "
        "... in corpus order, no document shared between streams; SEP = <eos> ('eos', the training format) or "
        "the tokens of a blank line ('newline': no delimiter token inside the stream)",
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
        model="; ".join(
            f"{m.variant}: ModernDecoderLM-{m.model.num_params() / 1e6:.2f}M, n_sinks={m.model.config.n_sinks}"
            + (f" ({cfg.hf_model})" if m.variant == "pretrained" else "")
            for m in models
        ),
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
        attention = {variant: info["attention"] for variant, info in per_model.items()}
        result, meaning = describe_results(metrics, cfg.eval.lengths, budget, attention)
        append_log(
            f"long-context ({cfg.name})",
            what=f"PPL/bpb vs stream length {cfg.eval.lengths} (training context {contexts}, cache budget {budget}) for "
            f"{', '.join(cfg.eval.methods)} ({cfg.eval.n_sink} sinks), on a plain model and one trained with "
            f"{cfg.learned_sinks} learnable sink(s); documents separated by {' / '.join(cfg.eval.separators)}; "
            f"record {record_path}",
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
    """Markdown table: a row per separator/model/method; PPL (bpb) per length, then tail PPL per length."""
    head = ["separator/model/method", *[f"L={n}" for n in lengths], *[f"tail@{n}" for n in lengths]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sep, per_variant in metrics.items():
        for variant, per_method in per_variant.items():
            for method, per_len in per_method.items():
                cells = [f"{per_len[str(n)]['ppl']:.2f} ({per_len[str(n)]['bpb']:.3f})" for n in lengths]
                tails = [f"{per_len[str(n)]['tail_ppl']:.2f}" for n in lengths]
                lines.append(f"| {sep}/{variant}/{method} | " + " | ".join(cells + tails) + " |")
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
