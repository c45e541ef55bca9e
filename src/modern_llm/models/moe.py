"""Mixture-of-experts SwiGLU feed-forward with top-k routing, capacity-based token dropping and aux losses.

Design choices
- Routing follows Mixtral: softmax over all expert logits, keep the top-k, renormalise the kept weights to
  sum to 1. Weights are laid out like HF's fused ``MixtralExperts`` (``w_gate_up`` (E, 2F, d), gate rows
  first; ``w_down`` (E, d, F)), so export is a copy.
- Capacity (GShard/Switch): each expert takes at most ``ceil(capacity_factor * N * k / E)`` of the N*k
  (token, choice) assignments per batch. First choices of all tokens are served before any second choice;
  overflow is dropped (that expert contributes 0 and the residual stream carries the token through).
  Capacity is enforced only in training mode: at eval/decode every assignment is served, so a cached
  decode and a full recompute agree and eval does not depend on batch composition.
- Aux losses are returned, not added here, so the trainer owns the weighting:
  load balance = E * sum_e f_e * P_e with f_e the fraction of assignments routed to e (before dropping)
  and P_e the mean router probability of e — 1.0 when perfectly balanced. (HF's Mixtral loss is k times
  this value because it sums f over the k choices.) Router z-loss = mean_tokens(logsumexp(logits)^2), ST-MoE.

Footgun: the per-expert loop is simple and fine at this scale; grouped GEMMs would be faster on GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MoEFeedForward(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        top_k: int,
        capacity_factor: float = 1.25,
        dropout: float = 0.0,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.randn(n_experts, 2 * d_ff, d_model) * init_std)
        self.w_down = nn.Parameter(torch.randn(n_experts, d_model, d_ff) * init_std)
        self.dropout = nn.Dropout(dropout)

    def capacity(self, n_tokens: int) -> int | None:
        if not self.training or self.capacity_factor <= 0:
            return None
        return max(1, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> router logits (N, E), top-k weights (N, k), top-k expert ids (N, k)."""
        logits = self.router(x)  # (N, E)
        probs = F.softmax(logits.float(), dim=-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)  # (N, k)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return logits, top_w, top_i

    def keep_mask(self, top_i: torch.Tensor) -> torch.Tensor:
        """(N, k) expert ids -> (N, k) bool: which assignments fit in their expert's capacity."""
        N, k = top_i.shape
        cap = self.capacity(N)
        if cap is None:
            return torch.ones_like(top_i, dtype=torch.bool)
        flat = top_i.t().reshape(-1)  # (k*N,) choice-major: all first choices come first
        onehot = F.one_hot(flat, self.n_experts)  # (k*N, E)
        slot = (onehot.cumsum(0) * onehot).sum(-1) - 1  # arrival order inside the chosen expert
        return (slot < cap).view(k, N).t()

    def aux_losses(self, logits: torch.Tensor, top_i: torch.Tensor) -> dict[str, torch.Tensor]:
        probs = F.softmax(logits.float(), dim=-1)  # (N, E)
        assigned = F.one_hot(top_i, self.n_experts).float().sum(1)  # (N, E) counts over the k choices
        frac_assigned = assigned.mean(0) / self.top_k  # f_e, sums to 1
        mean_prob = probs.mean(0)  # P_e
        load_balance = self.n_experts * (frac_assigned * mean_prob).sum()
        z_loss = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        return {"load_balance": load_balance, "z_loss": z_loss}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B, T, d = x.shape
        flat = x.reshape(-1, d)  # (N, d)
        logits, top_w, top_i = self.route(flat)
        keep = self.keep_mask(top_i)
        out = torch.zeros_like(flat)
        for e in range(self.n_experts):
            token_idx, choice = torch.where((top_i == e) & keep)
            if token_idx.numel() == 0:
                continue
            gate, up = F.linear(flat[token_idx], self.w_gate_up[e]).chunk(2, dim=-1)  # (n_e, F) each
            y = F.linear(F.silu(gate) * up, self.w_down[e])  # (n_e, d)
            out.index_add_(0, token_idx, (y * top_w[token_idx, choice, None]).to(out.dtype))
        aux = self.aux_losses(logits, top_i)
        aux["dropped_frac"] = 1.0 - keep.float().mean()
        return self.dropout(out.view(B, T, d)), aux
