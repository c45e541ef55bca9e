"""Next-token selection: greedy, temperature, top-k, top-p (nucleus), repetition penalty, per-row RNG.

Design choices
- ``SamplingParams`` is a frozen, validated dataclass; ``temperature == 0`` means greedy (argmax), which is
  also the default so evaluation is deterministic unless a caller asks for sampling.
- Processing order (same as Hugging Face's): repetition penalty -> temperature -> top-k -> top-p -> sample.
  Filters set removed logits to -inf; ties at the top-k boundary are kept, and top-p always keeps the most
  likely token, so no row can end up with nothing to sample.
- Repetition penalty (CTRL, Keskar et al. 2019): every token already in the row's context (prompt +
  generated) has its logit divided by the penalty if positive, multiplied by it if negative.
- Randomness: each row (one sample of one prompt) owns a CPU ``torch.Generator`` seeded from
  ``(seed, prompt_index, sample_index)``. A row draws ONE uniform per sampled token and inverts the CDF of its
  distribution. So a sample's token sequence does not depend on which other rows share the batch, on the
  device, or on how many samples were requested, and the same seed always gives the same outputs.

Footgun: the inverse-CDF draw runs in float64 over the vocabulary order (a two-level search: block masses,
then one block); a token whose probability is 0 after filtering owns an empty interval and can never be
drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1
_CDF_BLOCK = 256  # tokens per block of the two-level inverse-CDF search


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``temperature=0`` is greedy decoding."""

    temperature: float = 0.0  # 0 = greedy; > 0 scales logits before sampling
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set with probability mass >= top_p; 1.0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context; 1.0 = off
    max_new_tokens: int = 128
    seed: int | None = (
        None  # None = draw a seed from torch's global RNG (reproducible under torch.manual_seed)
    )

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1.0 disables it), got {p!r}")
        r = self.repetition_penalty
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0 disables it), got {r!r}")
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {n!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ----------------------------------------------------------------------------------------- logits filters


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool = token occurs in the row's context. Returns new logits."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits per row (ties with the k-th are kept); others -> -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability mass reaches ``p``.

    A token is removed when the mass of the tokens strictly more likely than it already reaches ``p``; the
    most likely token is therefore always kept.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) mass of strictly-earlier tokens
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sampling_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """Apply penalty, temperature and filters to raw (B, V) logits; the result defines the sampling law."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    return top_p_filter(logits, params.top_p)


# ----------------------------------------------------------------------------------------- randomness


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A well-mixed 63-bit seed for one (prompt, sample) row, so neighbouring rows get unrelated streams."""
    x = _splitmix64(seed & _MASK64)
    x = _splitmix64(x ^ prompt_index)
    x = _splitmix64(x ^ (sample_index + 0x5851F42D4C957F2D))
    return x & ((1 << 63) - 1)


def make_generators(seed: int | None, rows: list[tuple[int, int]]) -> list[torch.Generator]:
    """One CPU generator per (prompt_index, sample_index) row."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return [torch.Generator().manual_seed(row_seed(seed, p, s)) for p, s in rows]


def sample_from_logits(logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Draw one token per row of processed (B, V) logits by inverse CDF with each row's own generator.

    Two-level search, so no (B, V) prefix sum is ever built: the vocabulary is cut into blocks of
    ``_CDF_BLOCK`` tokens, the draw first picks a block from the (B, V / block) cumulative block masses and
    then a token inside that one block. Block masses are fp32 sums of 256 probabilities; prefix sums run in
    float64. On a 49k vocabulary this avoids the full float64 softmax + cumsum, which took a third of a
    batched SmolLM2 decode step on CPU.
    """
    B, V = logits.shape
    probs = logits.float().softmax(dim=-1)  # (B, V); -inf -> 0
    pad = -V % _CDF_BLOCK
    if pad:
        probs = torch.nn.functional.pad(probs, (0, pad))
    blocks = probs.view(B, -1, _CDF_BLOCK)  # (B, nb, blk)
    block_cdf = blocks.sum(dim=-1).double().cumsum(dim=-1)  # (B, nb)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])  # (B,)
    u = u.to(block_cdf.device)[:, None] * block_cdf[:, -1:]  # scale by the total mass (1 up to rounding)
    block = torch.searchsorted(block_cdf, u, right=True).clamp_(max=block_cdf.shape[-1] - 1)  # (B, 1)
    mass_before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), 0.0)  # (B, 1)
    inner = blocks.gather(1, block[:, :, None].expand(-1, -1, _CDF_BLOCK))[:, 0]  # (B, blk)
    inner_cdf = inner.double().cumsum(dim=-1) + mass_before
    offset = torch.searchsorted(inner_cdf, u, right=True).clamp_(max=_CDF_BLOCK - 1)
    # a draw that lands past the block's last non-zero token (rounding) falls back to that token
    last_nonzero = (inner > 0).cumsum(dim=-1).argmax(dim=-1, keepdim=True)
    offset = torch.minimum(offset, last_nonzero)
    tokens = (block * _CDF_BLOCK + offset).squeeze(-1)
    return tokens.clamp_(max=V - 1)


def select_next_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    generators: list[torch.Generator],
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw (B, V) logits -> next token ids (B,) under ``params``."""
    processed = sampling_logits(logits, params, seen)
    if params.greedy:
        return processed.argmax(dim=-1)
    return sample_from_logits(processed, generators)
