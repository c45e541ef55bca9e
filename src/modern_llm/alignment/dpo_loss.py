"""Direct Preference Optimization losses from sequence log-probabilities (Rafailov et al., 2023).

For a prompt x with a preferred completion y_w ("chosen") and a dispreferred one y_l ("rejected"), the
implicit reward of a completion is ``r(y) = beta * (log pi(y|x) - log pi_ref(y|x))`` and

- ``sigmoid`` (DPO):  loss = -log sigmoid(r(y_w) - r(y_l))
- ``sigmoid`` with ``label_smoothing = eps`` (conservative DPO, cDPO: the label is wrong with prob. eps):
      loss = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h),   h = r(y_w) - r(y_l)
- ``sigmoid`` with ``dpop_lambda = lam`` (DPO-Positive, Pal et al., 2024, "Smaug", eq. 3): h gets the extra
  term ``- lam * max(0, log pi_ref(y_w) - log pi(y_w))``, so lowering the chosen completion's likelihood below
  the reference costs reward. Aimed at pairs that differ in a few tokens (math: one wrong digit), where plain
  DPO can lower both completions and still widen the margin.
- ``ipo`` (Azar et al., 2023, eq. 17): loss = (d - 1 / (2 beta))^2 with d = the *un-scaled* log-ratio
  difference ``(pi_w - ref_w) - (pi_l - ref_l)``; beta is IPO's regularisation tau.

Design choices
- The loss works on per-sequence log-probs only, so it does not care which model (ours, HF, LoRA) or which
  batching produced them; ``sequence_logprobs`` turns logits into those sums.
- Per-example losses are returned (not their mean) along with the rewards, so the caller decides the
  reduction and logs reward margins/accuracy from the same tensors the loss used.
- Rewards are detached: they are for logging, and detaching makes accidental use in a loss impossible.
- IPO length normalisation: with ``chosen_lengths``/``rejected_lengths`` the log-ratios are divided by the
  number of completion tokens before the squared loss, as TRL does (it says the IPO authors confirmed their
  paper's numbers use this form). Without lengths the sums are used, as in the paper's equation.

Footguns
- ``sequence_logprobs`` expects ``targets`` ALIGNED with ``logits`` (``targets[:, t]`` is the token that
  ``logits[:, t]`` predicts, i.e. already shifted left by one) with -100 at prompt and padding positions. Use
  ``next_token_targets(labels)`` to shift labels that are aligned with ``input_ids``.
- The sums are over completion tokens only, so a longer completion has a more negative log-prob. DPO is
  invariant to that (pi and ref see the same tokens) but raw ``logps/*`` numbers are not comparable across
  datasets with different lengths.
- ``label_smoothing`` must be < 0.5: at 0.5 the cDPO loss no longer prefers either completion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo")
IGNORE_INDEX = -100


@dataclass
class DPOOutput:
    losses: torch.Tensor  # (B,) per-pair loss
    chosen_rewards: torch.Tensor  # (B,) beta * (pi - ref) of the chosen completion, detached
    rejected_rewards: torch.Tensor  # (B,) same for the rejected completion, detached

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> torch.Tensor:
        """Fraction of pairs whose chosen reward beats the rejected one (0-d tensor)."""
        return (self.chosen_rewards > self.rejected_rewards).float().mean()


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Shift ``labels`` (B, T), aligned with input_ids, to next-token targets aligned with the logits.

    ``out[:, t] = labels[:, t + 1]`` and the last position is IGNORE_INDEX (nothing follows it).
    """
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[b, t]) under ``logits[b, t]`` (B, T), exactly 0 where targets == -100."""
    if logits.shape[:2] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must agree on (batch, time)"
        )
    # cross_entropy fuses log_softmax + gather without materialising a (B, T, V) log-prob tensor twice.
    # It runs on (B*T, V) rows: with the class dim in the middle ((B, V, T), the textbook call) PyTorch's CPU
    # kernel reduces over a strided vocabulary, ~2.5x slower (fwd+bwd) and ~20x less accurate; at V=49k its
    # fp32 sum drops small terms, biasing every log-prob up (+0.01 nats per 100 SmolLM2 tokens vs fp64).
    B, T, V = logits.shape
    nll = F.cross_entropy(
        logits.float().reshape(B * T, V), targets.reshape(B * T), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -nll.view(B, T)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean, with ``average``) of the target tokens' log-probs per sequence: (B, T, V), (B, T) -> (B,).

    Positions whose target is -100 (prompt, padding) contribute nothing. See the module footgun on alignment.
    """
    per_token = token_logprobs(logits, targets)  # (B, T)
    total = per_token.sum(dim=1)
    if not average:
        return total
    return total / (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)


def _check_inputs(tensors: dict[str, torch.Tensor]) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(shape != first for shape in shapes.values()):
        raise ValueError(
            f"DPO inputs must all be 1-D tensors of the same length (one per pair), got {shapes}"
        )


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    dpop_lambda: float = 0.0,
) -> DPOOutput:
    """Per-pair DPO/cDPO/IPO losses and implicit rewards from (B,) sequence log-probs; see module docstring."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (typical 0.05-0.5), got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing must be in [0, 0.5) (cDPO flip probability), got {label_smoothing}"
        )
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if dpop_lambda < 0 or (dpop_lambda > 0 and loss_type != "sigmoid"):
        raise ValueError(f"dpop_lambda must be >= 0 and is defined for the sigmoid loss, got {dpop_lambda}")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError(
            "pass both chosen_lengths and rejected_lengths (IPO length normalisation) or neither"
        )
    _check_inputs(
        {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
            "reference_chosen_logps": reference_chosen_logps,
            "reference_rejected_logps": reference_rejected_logps,
        }
    )
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)

    if loss_type == "sigmoid":
        penalty = dpop_lambda * torch.clamp(-chosen_logratios, min=0.0)  # chosen fell below the reference
        h = beta * (chosen_logratios - rejected_logratios - penalty)
        losses = -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    else:  # ipo
        if chosen_lengths is not None:
            chosen_logratios_n = chosen_logratios / chosen_lengths.clamp(min=1)
            rejected_logratios_n = rejected_logratios / rejected_lengths.clamp(min=1)
        else:
            chosen_logratios_n, rejected_logratios_n = chosen_logratios, rejected_logratios
        losses = (chosen_logratios_n - rejected_logratios_n - 1.0 / (2.0 * beta)) ** 2

    return DPOOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )
