"""ModernLLMConfig: every architectural toggle of ModernDecoderLM, validated on construction.

Footguns this validation exists for
- ``d_model`` must split evenly into heads, and heads into KV groups (GQA), or reshapes fail deep inside attention.
- RoPE needs an even head dimension (it rotates pairs of channels).
- ``pos_encoding="learned"`` caps the usable context at ``max_seq_len``; ``"rope"`` and ``"none"`` (NoPE) do not.
- MoE: ``moe_top_k <= moe_n_experts``; ``moe_layers`` indexes must exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

POS_ENCODINGS = ("rope", "learned", "none")


@dataclass
class ModernLLMConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None -> n_heads (MHA); 1 -> MQA; in between -> GQA
    d_ff: int | None = None  # None -> SwiGLU default: 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 256  # training context; RoPE models can be run longer
    pos_encoding: Literal["rope", "learned", "none"] = (
        "rope"  # "learned" = absolute embeddings; "none" = NoPE
    )
    rope_theta: float = 10000.0
    n_sinks: int = 0  # learnable sink tokens (key/value pairs) that every query can attend to
    qk_norm: bool = False  # RMSNorm on q and k per head before RoPE
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    # Mixture of experts: which layers use an MoE FFN ([] = dense everywhere)
    moe_layers: list[int] = field(default_factory=list)
    moe_n_experts: int = 4
    moe_top_k: int = 2
    moe_capacity_factor: float = 1.25  # <= 0 disables capacity limits (no token dropping)
    moe_d_ff: int | None = None  # None -> d_ff
    moe_aux_loss_coef: float = 0.01  # Switch-style load-balancing loss weight
    moe_z_loss_coef: float = 0.001  # router z-loss weight (ST-MoE)

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        self._auto_fields = {n for n in ("n_kv_heads", "d_ff", "moe_d_ff") if getattr(self, n) is None}
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        need(self.n_kv_heads > 0, f"n_kv_heads must be > 0, got {self.n_kv_heads}")
        need(
            self.d_model % self.n_heads == 0,
            f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); "
            f"pick n_heads from the divisors of d_model",
        )
        need(
            self.n_heads % self.n_kv_heads == 0,
            f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads}); "
            f"use a divisor of n_heads (n_kv_heads = n_heads is plain MHA)",
        )
        need(
            self.pos_encoding in POS_ENCODINGS,
            f"pos_encoding must be one of {POS_ENCODINGS}, got {self.pos_encoding!r}",
        )
        if self.pos_encoding == "rope":
            need(self.head_dim % 2 == 0, f"RoPE needs an even head_dim; d_model/n_heads = {self.head_dim}")
            need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        need(self.n_sinks >= 0, f"n_sinks must be >= 0, got {self.n_sinks}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        if self.d_ff is None:
            self.d_ff = 64 * -(-int(8 * self.d_model / 3) // 64)
        need(self.d_ff > 0, f"d_ff must be > 0, got {self.d_ff}")
        self.moe_layers = sorted(set(int(i) for i in self.moe_layers))
        bad = [i for i in self.moe_layers if not 0 <= i < self.n_layers]
        need(not bad, f"moe_layers {bad} out of range: layers are 0..{self.n_layers - 1}")
        if self.moe_layers:
            need(self.moe_n_experts >= 1, f"moe_n_experts must be >= 1, got {self.moe_n_experts}")
            need(
                1 <= self.moe_top_k <= self.moe_n_experts,
                f"moe_top_k ({self.moe_top_k}) must be between 1 and moe_n_experts ({self.moe_n_experts})",
            )
        if self.moe_d_ff is None:
            self.moe_d_ff = self.d_ff

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)
