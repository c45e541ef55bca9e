"""Small building blocks: RMSNorm and the SwiGLU feed-forward.

Design choices
- RMSNorm normalises in fp32 and casts back before the gain, exactly like HF Llama, so exported models match
  to fp32 round-off even under bf16 autocast.
- SwiGLU keeps gate and up projections in ONE matmul (``gate_up``: d -> 2*d_ff) and splits the result; one
  larger GEMM is faster than two small ones. Export splits the rows back into HF's gate_proj/up_proj
  (gate first, then up).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class SwiGLU(nn.Module):
    """FFN(x) = W_down( silu(W_gate x) * (W_up x) ), Shazeer 2020."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, d_ff) each
        return self.dropout(self.down(F.silu(gate) * up))
