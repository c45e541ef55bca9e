"""StreamingLLM-style KV cache (attention sinks + recent window) and a long-stream perplexity harness.

StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks") keeps the KV of
the first few tokens ("attention sinks", which soak up attention mass) plus a window of recent tokens, evicts
everything in between, and assigns positions by index INSIDE the cache rather than in the original text, so
the model never sees a relative distance larger than the cache.

Design choices
- Re-indexing: keys are stored WITHOUT RoPE and rotated by their current cache index every step (the
  paper's approach), rather than rotated by a delta at each eviction. Our attention applies RoPE before it
  calls ``update``, so the cache first undoes the rotation with the positions it handed out
  (``next_position + arange(T)``, what the model uses by default) — RoPE is an orthogonal rotation, so
  R(-p) R(p) k = k up to rounding — then returns all keys rotated by 0..S-1. This needs no change to the
  model and costs one rotation of the cache per layer per step, the same order as attention itself. Rotating
  by deltas instead would compound rounding error with every eviction over an unbounded stream.
- ``window`` counts PAST tokens kept between steps. Decoding token by token, a query therefore attends to the
  ``n_sink`` first tokens, the ``window`` previous tokens and itself; positions never exceed
  ``n_sink + window``. A chunk of T tokens is appended whole and eviction happens after the forward, so in
  chunked mode the i-th query of a chunk sees ``window + i`` past tokens (between window and window + T - 1).
- Variants: ``n_sink > 0`` = StreamingLLM; ``n_sink = 0`` = plain sliding window (same re-indexing, so the
  only difference is the sinks); ``streaming_perplexity(cache_kind="dense")`` = the full ``KVCache`` baseline.
  A model with LEARNABLE sinks (``ModernLLMConfig.n_sinks``) has position-free sink K/V inside attention
  already, so it can stream with ``n_sink=0``.
- NoPE models (``pos_encoding="none"``) need no re-indexing; absolute learned positions cannot be re-indexed
  (they are baked into the hidden states) and are rejected.

Footgun: pass no explicit ``positions`` to the model with this cache — the cache un-rotates keys assuming the
default positions it hands out through ``next_position``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modern_llm.inference.kv_cache import KVCache
from modern_llm.models.attention import apply_rope, rope_cos_sin

CACHE_KINDS = ("dense", "sink", "window")


class StreamingKVCache:
    """Keeps the first ``n_sink`` tokens and the ``window`` most recent ones; positions = cache indices."""

    def __init__(
        self,
        n_layers: int,
        n_sink: int,
        window: int,
        head_dim: int,
        rope_theta: float | None,
    ):
        if n_sink < 0:
            raise ValueError(f"StreamingKVCache: n_sink must be >= 0, got {n_sink}")
        if window < 1:
            raise ValueError(f"StreamingKVCache: window must be >= 1, got {window}")
        self.n_layers, self.n_sink, self.window = n_layers, n_sink, window
        self.head_dim, self.rope_theta = head_dim, rope_theta  # rope_theta None = no RoPE (NoPE)
        self.k: list[torch.Tensor | None] = [None] * n_layers  # (B, KV, L, D), keys WITHOUT RoPE
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0  # tokens currently cached (<= n_sink + window between steps)
        self.n_seen = 0  # tokens ever appended
        self.kept = torch.zeros(0, dtype=torch.long)  # absolute stream index of each cached token
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, n_sink: int, window: int) -> StreamingKVCache:
        cfg = model.config
        if cfg.pos_encoding == "learned":
            raise ValueError(
                "StreamingKVCache cannot re-index learned absolute positions (they are baked into the hidden "
                "states); use a RoPE or NoPE model"
            )
        theta = cfg.rope_theta if cfg.pos_encoding == "rope" else None
        return cls(cfg.n_layers, n_sink, window, cfg.head_dim, theta)

    @property
    def capacity(self) -> int:
        return self.n_sink + self.window

    @property
    def next_position(self) -> int:
        return self.length

    def _tables(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < n or self._cos.device != device:
            size = max(n, 2 * self.capacity)
            self._cos, self._sin = rope_cos_sin(
                torch.arange(size, device=device), self.head_dim, self.rope_theta
            )
        return self._cos, self._sin

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, KV, T, D) keys/values; return all kept + new ones (new last) with re-indexed RoPE."""
        T, L = k.shape[2], self.length
        if self.rope_theta is not None:
            cos, sin = self._tables(L + T, k.device)
            k = apply_rope(k, cos[L : L + T], -sin[L : L + T])  # undo the rotation the model applied
        keys = k if self.k[layer_idx] is None else torch.cat([self.k[layer_idx], k], dim=2)  # (B, KV, S, D)
        values = v if self.v[layer_idx] is None else torch.cat([self.v[layer_idx], v], dim=2)
        S = keys.shape[2]
        returned = keys
        if self.rope_theta is not None:
            cos, sin = self._tables(S, k.device)
            returned = apply_rope(keys, cos[:S], sin[:S])  # position = index inside the cache
        self.k[layer_idx], self.v[layer_idx] = self._evict(keys), self._evict(values)
        if layer_idx == self.n_layers - 1:
            new = torch.arange(self.n_seen, self.n_seen + T)
            self.kept = self._evict(torch.cat([self.kept, new]), dim=0)
            self.length = self.kept.numel()
            self.n_seen += T
        return returned, values

    def _evict(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """Keep the sink slots and the last ``window`` slots along ``dim`` (the sequence axis)."""
        length = x.shape[dim]
        if length <= self.capacity:
            return x
        recent = x.narrow(dim, length - self.window, self.window)
        return torch.cat([x.narrow(dim, 0, self.n_sink), recent], dim=dim)


@dataclass
class StreamingPerplexity:
    nll: torch.Tensor  # (N - 1,) nats; nll[i] = -log p(token[i + 1] | what the cache kept of tokens <= i)
    cache_kind: str
    n_sink: int
    window: int | None
    chunk_size: int

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


@torch.no_grad()
def streaming_perplexity(
    model: torch.nn.Module,
    token_ids: Sequence[int] | torch.Tensor,
    cache_kind: str = "sink",
    n_sink: int | None = None,
    window: int = 256,
    chunk_size: int = 1,
) -> StreamingPerplexity:
    """Per-token NLL of a long token stream, fed ``chunk_size`` tokens at a time through one cache.

    ``cache_kind``: "sink" (StreamingLLM; ``n_sink`` defaults to 4), "window" (sliding window, no sinks), or
    "dense" (keep everything: the baseline; ``n_sink``/``window`` ignored). The model runs in eval mode.
    """
    if cache_kind not in CACHE_KINDS:
        raise ValueError(f"cache_kind must be one of {CACHE_KINDS}, got {cache_kind!r}")
    if cache_kind == "window" and n_sink:
        raise ValueError(
            f"cache_kind='window' keeps no sink tokens; got n_sink={n_sink} (use cache_kind='sink')"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise ValueError(f"token_ids needs at least 2 tokens to score, got {ids.numel()}")
    device = next(model.parameters()).device
    ids = ids.to(device)[None]  # (1, N)
    N = ids.shape[1]
    if cache_kind == "dense":
        cache, n_sink, window = KVCache.for_model(model, 1, N), 0, None
    else:
        n_sink = (4 if cache_kind == "sink" else 0) if n_sink is None else n_sink
        cache = StreamingKVCache.for_model(model, n_sink, window)
    was_training = model.training
    model.eval()
    nlls = []
    try:
        for start in range(0, N - 1, chunk_size):
            end = min(start + chunk_size, N - 1)
            logits = model(ids[:, start:end], kv_cache=cache).logits[0]  # (T, V)
            nlls.append(F.cross_entropy(logits.float(), ids[0, start + 1 : end + 1], reduction="none"))
    finally:
        model.train(was_training)
    return StreamingPerplexity(torch.cat(nlls).cpu(), cache_kind, n_sink, window, chunk_size)
