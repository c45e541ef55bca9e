"""ModernDecoderLM: a decoder-only Transformer you can read top to bottom.

    ids -> token embedding (+ learned positions if pos_encoding="learned")
        -> n_layers x [ x + Attn(RMSNorm(x)) ; x + FFN(RMSNorm(x)) ]   (FFN = SwiGLU or MoE SwiGLU)
        -> RMSNorm -> lm_head (tied to the embedding by default) -> logits (fp32)

Design choices
- Pre-norm residual blocks with RMSNorm, SwiGLU, RoPE and GQA: the Llama recipe, so a dense model exports
  to ``LlamaForCausalLM`` and an all-MoE model to ``MixtralForCausalLM`` with identical logits
  (``modern_llm.models.hf_convert``).
- Positions are explicit: ``positions`` defaults to 0..T-1, or continues after the KV cache's length.
  A streaming cache passes its own (re-indexed) positions; see ``modern_llm.inference``.
- ``pos_encoding``: "rope" (default), "learned" (absolute embeddings, context capped at max_seq_len) or
  "none" (NoPE: the causal mask is the only source of order).
- The loss is mean token cross-entropy over targets != -100, plus the weighted MoE auxiliary losses;
  ``ce_loss`` and ``aux_loss`` are returned separately so logs and evals use the pure LM loss.
- Init: N(0, init_std) everywhere, output projections of each residual branch scaled by 1/sqrt(2 n_layers)
  (GPT-2), RMSNorm gains at 1.

Footguns
- Logits are returned in fp32 even under bf16 autocast (the softmax/CE needs the range).
- With tied embeddings, ``lm_head.weight is tok_emb.weight``: save with safetensors' ``save_model`` (which
  de-duplicates shared tensors), not ``save_file(state_dict())``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from modern_llm.config.model_config import ModernLLMConfig
from modern_llm.models.attention import Attention, KVCacheLike, rope_cos_sin
from modern_llm.models.layers import RMSNorm, SwiGLU
from modern_llm.models.moe import MoEFeedForward


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, T, V), fp32
    loss: torch.Tensor | None = None  # ce_loss + weighted aux losses
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_stats: dict[str, torch.Tensor] = field(default_factory=dict)


class Block(nn.Module):
    def __init__(self, cfg: ModernLLMConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = layer_idx in cfg.moe_layers
        if self.is_moe:
            self.ffn = MoEFeedForward(
                cfg.d_model,
                cfg.moe_d_ff,
                cfg.moe_n_experts,
                cfg.moe_top_k,
                cfg.moe_capacity_factor,
                cfg.dropout,
                cfg.init_std,
            )
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.d_ff, cfg.dropout)

    def forward(self, x, rope, kv_cache=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = x + self.attn(self.attn_norm(x), rope, kv_cache)
        if self.is_moe:
            h, aux = self.ffn(self.ffn_norm(x))
            return x + h, aux
        return x + self.ffn(self.ffn_norm(x)), {}


class ModernDecoderLM(nn.Module):
    def __init__(self, cfg: ModernLLMConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_encoding == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "ffn.down.weight", "ffn.w_down")):
                nn.init.normal_(p, 0.0, residual_std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, self.config.init_std)

    # ------------------------------------------------------------------ forward
    def default_positions(self, T: int, kv_cache: KVCacheLike | None, device) -> torch.Tensor:
        start = int(getattr(kv_cache, "next_position", 0)) if kv_cache is not None else 0
        return torch.arange(start, start + T, device=device)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        kv_cache: KVCacheLike | None = None,
        logits_to_keep: int = 0,  # > 0: logits for the last that many positions only (as in HF)
    ) -> LMOutput:
        cfg = self.config
        B, T = input_ids.shape
        if positions is None:
            positions = self.default_positions(T, kv_cache, input_ids.device)  # (T,)
        x = self.tok_emb(input_ids)  # (B, T, d)
        rope = None
        if cfg.pos_encoding == "rope":
            rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)  # (T, D) each
        elif cfg.pos_encoding == "learned":
            if int(positions.max()) >= cfg.max_seq_len:
                raise ValueError(
                    f"position {int(positions.max())} exceeds max_seq_len={cfg.max_seq_len} of a model with "
                    f"learned absolute positions; use pos_encoding='rope' for longer contexts"
                )
            x = x + self.pos_emb(positions)
        x = self.drop(x)
        router_stats: dict[str, torch.Tensor] = {}
        checkpointed = cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if (
                checkpointed
            ):  # keep only block inputs; recompute activations in backward (dropout RNG replayed)
                x, aux = torch.utils.checkpoint.checkpoint(block, x, rope, kv_cache, use_reentrant=False)
            else:
                x, aux = block(x, rope, kv_cache)
            for key, value in aux.items():
                router_stats[key] = router_stats.get(key, 0.0) + value / len(cfg.moe_layers)
        if logits_to_keep:
            if targets is not None:
                raise ValueError(
                    "logits_to_keep cannot be combined with targets (the loss needs every position)"
                )
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.norm(x)).float()  # (B, T, V), T = logits_to_keep when given
        out = LMOutput(logits=logits, router_stats=router_stats)
        out.aux_loss = self._weighted_aux(router_stats, logits)
        if targets is not None:
            out.ce_loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
            )
            out.loss = out.ce_loss + out.aux_loss
        return out

    def _weighted_aux(self, stats: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        if not stats:
            return like.new_zeros(())
        cfg = self.config
        return cfg.moe_aux_loss_coef * stats["load_balance"] + cfg.moe_z_loss_coef * stats["z_loss"]

    # ------------------------------------------------------------------ accounting
    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Parameter count; ``active`` counts only top_k of n_experts per MoE layer (per-token compute)."""
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            if non_embedding and name.startswith(("tok_emb", "pos_emb")):
                continue
            if active and name.endswith(("ffn.w_gate_up", "ffn.w_down")):
                n = n * self.config.moe_top_k // self.config.moe_n_experts
            total += n
        if non_embedding and self.config.tie_embeddings:
            total += self.lm_head.weight.numel()  # the head still costs a matmul per token
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * active matmul params + attention (PaLM appendix B: 12 * L * d * T)."""
        cfg = self.config
        matmul_params = self.num_params(non_embedding=True, active=True)
        return 6.0 * matmul_params + 12.0 * cfg.n_layers * cfg.d_model * seq_len
