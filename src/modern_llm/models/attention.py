"""Causal self-attention with RoPE, GQA, optional QK-norm, learnable attention sinks and a KV-cache hook.

Design choices
- RoPE is one function, ``apply_rope``, using the "rotate half" layout of HF Llama (channel i pairs with
  i + D/2), so weights copy 1:1 to and from ``LlamaForCausalLM``. cos/sin are computed once per forward by
  the model from explicit ``positions`` — the caller (trainer, engine, streaming cache) decides positions.
- Q, K and V come from ONE fused projection (``qkv``); export splits it into q_proj/k_proj/v_proj.
- GQA: K/V keep ``n_kv_heads`` heads all the way into ``F.scaled_dot_product_attention(enable_gqa=True)``;
  the repeated K/V are never materialised by us, and a KV cache stores only ``n_kv_heads``.
- Attention sinks are ``n_sinks`` learnable (key, value) pairs per KV head, prepended to K/V. They carry no
  position (RoPE is not applied to them), so they mean the same thing at every absolute position — that is
  what lets a streaming cache evict the middle of a long context. Every query may attend to them.
  To keep SDPA's fused causal kernels (``is_causal=True``) with sinks, we also prepend ``n_sinks`` dummy
  zero queries; the causal triangle then lets real query i see all sinks plus tokens <= i, and the dummy
  rows are dropped. An explicit boolean mask is used only when a KV cache already holds earlier tokens.

Footguns
- ``enable_gqa`` needs torch >= 2.5.
- With a KV cache, the mask assumes the cache returns keys in causal order with the new tokens last
  (true for both the dense and the streaming cache in ``modern_llm.inference``) — unless the cache exposes
  an ``attn_mask`` attribute (bool, (B, 1, T, S), True = may attend), which then replaces the causal logic.
  The dense cache sets it for left-padded batches and for the static-shape (CUDA-graph) decode step.
  A cache with ``shared_prefix = True`` (``SharedPrefixKVCache``) does the attention itself (``attend``):
  n samples of one prompt then read the prompt's keys once.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from modern_llm.config.model_config import ModernLLMConfig
from modern_llm.models.layers import RMSNorm


class KVCacheLike(Protocol):
    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, n_kv_heads, T, D) keys/values; return all cached ones, new tokens last."""
        ...


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer ``positions`` (T,) or (B, T) -> each (..., T, head_dim), fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (..., T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (..., T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by position; cos/sin are (T, D) or (B, T, D)."""
    if cos.dim() == 3:  # per-batch positions -> broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModernLLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.use_rope = cfg.pos_encoding == "rope"
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.n_sinks = cfg.n_sinks
        if cfg.n_sinks:
            self.sink_k = nn.Parameter(torch.randn(cfg.n_kv_heads, cfg.n_sinks, cfg.head_dim) * cfg.init_std)
            self.sink_v = nn.Parameter(torch.randn(cfg.n_kv_heads, cfg.n_sinks, cfg.head_dim) * cfg.init_std)
        self.attn_dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        kv_cache: KVCacheLike | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim],
            dim=-1,
        )
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope and rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask = None
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, KV, S, D), new tokens last
            mask = getattr(kv_cache, "attn_mask", None)  # (B, 1, T, S) bool when the cache holds padding
        # n samples per prompt on a SharedPrefixKVCache: the cache attends the prompt once for all of them
        if getattr(kv_cache, "shared_prefix", False):
            y = kv_cache.attend(self.layer_idx, q, *self._with_sinks(k, v))  # (B, H, 1, D)
        else:
            y = self._attend(q, k, v, mask)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.out(y))

    def _with_sinks(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepend the learned sink keys/values (visible to every query): (B, KV, S, D) -> (B, KV, s+S, D)."""
        if not self.n_sinks:
            return k, v
        B = k.shape[0]
        k = torch.cat([self.sink_k.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([self.sink_v.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
        return k, v

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, _, T, D = q.shape
        S = k.shape[2]
        dropout = self.attn_dropout if self.training else 0.0
        n_sinks = self.n_sinks
        k, v = self._with_sinks(k, v)  # (B, KV, s+S, D)
        if mask is not None:  # the cache decides which slots each query sees (padding, static buffers)
            if n_sinks:  # sinks are visible to every query
                mask = torch.cat([mask.new_ones(*mask.shape[:-1], n_sinks), mask], dim=-1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=True)
        if T == 1:  # one new token sees the whole cache (and the sinks): no mask needed
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, enable_gqa=True)
        if S == T:  # no earlier tokens in the cache: pure causal, fused kernels stay available
            if n_sinks:
                q = torch.cat([q.new_zeros(B, q.shape[1], n_sinks, D), q], dim=2)  # dummy sink queries
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=True)
            return y[:, :, n_sinks:]
        # T new tokens after S - T cached ones: query i sees cache positions <= S - T + i, plus every sink
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        if n_sinks:
            mask = torch.cat([mask.new_ones(T, n_sinks), mask], dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=True)
