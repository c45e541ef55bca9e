"""DPO stage: preference pairs -> the one Trainer with the DPO loss (``alignment.dpo_loss``).

    modern-llm dpo --config configs/alignment/dpo_hh.yaml [--dpo.beta 0.1 ...]

What this stage adds to the trainer: encoding pairs (same collator as SFT: completion + EOS, prompt masked),
the reference log-probs, and a loss function that logs reward margins, reward accuracy and the chosen /
rejected log-probs (as ``train/rewards/*``, ``train/logps/*``; ``eval/...`` on held-out pairs).

Design choices
- Reference log-probs are computed ONCE before training and stored with each encoded pair
  (``ref_chosen_logps``/``ref_rejected_logps``), so no second model is held in memory and each step costs
  one policy forward. ``reference="policy"`` scores with the policy as it starts (the SFT model);
  ``reference="adapter_disabled"`` scores a PEFT/LoRA policy with its adapters switched off (the base),
  TRL's choice for a fresh adapter.
- One forward per step. With ``share_prompt`` (the default; Hugging Face models), each pair is ONE row,
  prompt + chosen + rejected: rejected tokens take positions that continue from the prompt and a 4-D
  attention mask hides the chosen completion from them, so the prompt is encoded once instead of twice
  (the idea of "prefix sharing" for DPO, Wang et al., 2024). The last prompt position predicts the first
  token of both completions. Log-probs equal the stacked layout's up to float rounding (tested against it).
  Otherwise (scratch models, whose attention takes no custom mask, or pairs whose two prompts were encoded
  differently) chosen and rejected are stacked into one (2B, T) batch, chosen first.
- Eval with held-out pairs gives ``eval/rewards/accuracy`` etc. through the trainer's generic eval.
- ``sft_weight`` adds the chosen completion's per-token NLL to the loss (RPO; Pang et al., 2024, "Iterative
  Reasoning Preference Optimization"): on math pairs plain DPO tends to push the chosen log-probs down along
  with the rejected ones, and the NLL term keeps the chosen solutions likely.

Footguns
- Reference and policy log-probs must come from the same encoding; changing ``max_length`` or the chat
  setting after precomputing invalidates the stored references (``encode_pairs`` recomputes from scratch).
- Prompt sharing passes ``position_ids`` and a boolean (B, 1, T, T) mask to the HF model; models whose
  attention ignores custom 4-D masks would silently let rejected tokens see the chosen ones. It is used only
  on SDPA attention (``takes_boolean_4d_mask``: eager attention adds the mask to the scores); the parity
  test covers Llama and GPT-2; set ``dpo.share_prompt false`` for other architectures until tested.
- With dropout in the model, reference log-probs (eval mode) and policy log-probs (train mode) differ even
  at step 0; the loss at step 0 is exactly log 2 only for dropout-free models.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modern_llm.alignment.dpo_loss import (
    IGNORE_INDEX,
    dpo_loss,
    next_token_targets,
    sequence_logprobs,
    token_logprobs,
)
from modern_llm.config.base import config_to_dict, parse_config_cli
from modern_llm.config.train_config import TrainConfig
from modern_llm.data.preference_datasets import (
    PreferencePair,
    completion_text,
    load_preference_jsonl,
    render_prompt,
)
from modern_llm.training.train_sft import (
    LoRAConfig,
    causal_lm_logits,
    first_target_position,
    generation_model,
    is_native,
    load_policy,
    maybe_apply_lora,
    pad_id_of,
    save_policy,
    trainer_run_config,
)

log = logging.getLogger(__name__)

REFERENCES = ("policy", "adapter_disabled")


@dataclass
class DPOConfig:
    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO: probability that a preference label is flipped
    loss_type: str = "sigmoid"  # "sigmoid" (DPO/cDPO) | "ipo"
    ipo_length_normalize: bool = True  # IPO on per-token log-ratios (TRL's convention)
    reference: str = "policy"  # "policy" (the starting model) | "adapter_disabled" (LoRA base)
    sft_weight: float = 0.0  # + weight * chosen per-token NLL (RPO); 0 = plain DPO
    dpop_lambda: float = 0.0  # DPO-Positive penalty on chosen log-probs falling below the reference; 0 = off
    max_length: int = 512
    chat: bool = True  # render message prompts with the chat template (else HH "Human:/Assistant:" text)
    share_prompt: bool = True  # one row per pair, prompt encoded once (HF models; scratch models stack)

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
        if self.reference not in REFERENCES:
            raise ValueError(f"dpo.reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"dpo.loss_type must be 'sigmoid' or 'ipo', got {self.loss_type!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sft_weight < 0:
            raise ValueError(f"dpo.sft_weight must be >= 0 (0 = plain DPO), got {self.sft_weight}")
        if self.dpop_lambda < 0 or (self.dpop_lambda > 0 and self.loss_type != "sigmoid"):
            raise ValueError(
                f"dpo.dpop_lambda must be >= 0 and needs loss_type sigmoid, got {self.dpop_lambda}"
            )


@dataclass
class DPORunConfig:
    name: str = "dpo"
    policy: str = ""  # starting policy: our policy/checkpoint folder, HF folder or registry name
    pairs: str = ""  # preference JSONL (.jsonl / .jsonl.gz): HH-RLHF, UltraFeedback or explicit form
    limit: int | None = None  # first N pairs
    eval_fraction: float = 0.1  # held-out pairs for eval/rewards/*
    record: str | None = None
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(out_dir="runs/dpo", lr=5e-6, warmup_steps=10, max_steps=200)
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


# ----------------------------------------------------------------------------------------------- data


def encode_pairs(
    pairs: list[PreferencePair], tokenizer: Any, max_length: int, chat: bool
) -> list[dict[str, list[int]]]:
    """Token ids per pair: prompt + completion + EOS for chosen and rejected, with their label masks."""
    from modern_llm.data.task_datasets import CausalLMCollator

    collator = CausalLMCollator(tokenizer, max_length=max_length)
    encoded = []
    for pair in pairs:
        prompt = render_prompt(pair.prompt, tokenizer, chat)
        item: dict[str, Any] = {}
        for side in ("chosen", "rejected"):
            p, c = collator.encode(prompt, completion_text(getattr(pair, side), pair.prompt, chat))
            item[f"{side}_ids"] = p + c
            item[f"{side}_labels"] = [IGNORE_INDEX] * len(p) + c
        encoded.append(item)
    return encoded


@dataclass
class DPOCollator:
    """Encoded pairs -> one batch: prompt-shared (B, T) rows when asked and possible, else stacked (2B, T).

    Reference log-probs ride along as (B,) when the items carry them.
    """

    pad_id: int
    share_prompt: bool = False

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.share_prompt and all(_shares_prompt(it) for it in items):
            batch = prompt_shared_batch(items, self.pad_id)
        else:
            batch = stacked_batch(items, self.pad_id)
        if all("ref_chosen_logps" in it for it in items):
            batch["ref_chosen_logps"] = torch.tensor(
                [it["ref_chosen_logps"] for it in items], dtype=torch.float32
            )
            batch["ref_rejected_logps"] = torch.tensor(
                [it["ref_rejected_logps"] for it in items], dtype=torch.float32
            )
        return batch


def stacked_batch(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded: input_ids / attention_mask / labels (2B, T)."""
    rows = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
    labels = [it["chosen_labels"] for it in items] + [it["rejected_labels"] for it in items]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    label_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(r)] = torch.tensor(r)
        label_t[i, : len(r)] = torch.tensor(lab)
        mask[i, : len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}


def _prompt_length(labels: list[int]) -> int:
    return next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))


def _shares_prompt(item: dict[str, Any]) -> bool:
    """Both sides start with the same non-empty prompt ids and have a non-empty completion."""
    p = _prompt_length(item["chosen_labels"])
    return (
        0 < p == _prompt_length(item["rejected_labels"])
        and p < min(len(item["chosen_ids"]), len(item["rejected_ids"]))
        and item["chosen_ids"][:p] == item["rejected_ids"][:p]
    )


def prompt_shared_batch(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per pair, prompt + chosen + rejected, with what ``shared_prompt_logps`` needs.

    input_ids / position_ids / targets / segment (B, T); attention_mask (B, 1, T, T) bool, True = may attend;
    fork (B,) = the last prompt position; rejected_first (B,) = the rejected completion's first token.
    ``targets[b, t]`` is the next token of position t's own chain (chosen or rejected), ``segment`` says
    which chain it scores (1 chosen, 2 rejected, 0 nothing).
    """
    parts = []
    for it in items:
        p = _prompt_length(it["chosen_labels"])
        parts.append((it["chosen_ids"][:p], it["chosen_ids"][p:], it["rejected_ids"][p:]))
    B, width = len(parts), max(len(p) + len(c) + len(r) for p, c, r in parts)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    positions = torch.zeros((B, width), dtype=torch.long)
    targets = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    segment = torch.zeros((B, width), dtype=torch.long)
    mask = torch.ones(width, width, dtype=torch.bool).tril().repeat(B, 1, 1)  # (B, T, T) causal
    fork = torch.empty(B, dtype=torch.long)
    rejected_first = torch.empty(B, dtype=torch.long)
    for i, (p, c, r) in enumerate(parts):
        P, C, R = len(p), len(c), len(r)
        input_ids[i, : P + C + R] = torch.tensor(p + c + r)
        positions[i, : P + C] = torch.arange(P + C)
        positions[i, P + C : P + C + R] = torch.arange(P, P + R)  # rejected continues from the prompt
        targets[i, P - 1 : P + C - 1] = torch.tensor(c)  # last prompt token + chosen predict chosen
        segment[i, P - 1 : P + C - 1] = 1
        targets[i, P + C : P + C + R - 1] = torch.tensor(r[1:], dtype=torch.long)
        segment[i, P + C : P + C + R - 1] = 2
        mask[i, P + C :, P : P + C] = False  # rejected (and padding) queries never see the chosen tokens
        fork[i], rejected_first[i] = P - 1, r[0]
    return {
        "input_ids": input_ids,
        "position_ids": positions,
        "attention_mask": mask.unsqueeze(1),
        "targets": targets,
        "segment": segment,
        "fork": fork,
        "rejected_first": rejected_first,
    }


# ----------------------------------------------------------------------------------------------- loss


def pair_logps(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen log-probs (B,), rejected log-probs (B,), completion lengths (2B,)) under ``model``."""
    if "segment" in batch:
        return shared_prompt_logps(model, batch)
    targets = next_token_targets(batch["labels"])
    start = first_target_position(targets)  # the prompt-only prefix needs no logits
    logits, _ = causal_lm_logits(model, batch["input_ids"], batch["attention_mask"], start)  # (2B, T', V)
    targets = targets[:, start:]
    logps = sequence_logprobs(logits, targets)  # (2B,)
    chosen, rejected = logps.chunk(2)
    return chosen, rejected, (targets != IGNORE_INDEX).sum(dim=1)


def takes_boolean_4d_mask(model: nn.Module) -> bool:
    """Whether a boolean (B, 1, T, T) mask means "may attend" to ``model``: HF models on SDPA attention.

    Transformers passes a custom 4-D mask through unchanged; SDPA reads a boolean one as allowed positions,
    but eager attention *adds* the mask to the scores (True would add 1), and scratch models take none.
    """
    if is_native(model):
        return False
    config = getattr(generation_model(model), "config", None)
    return getattr(config, "_attn_implementation", None) == "sdpa"


def shared_prompt_logps(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pair_logps`` for a ``prompt_shared_batch``: one forward over (B, T) prompt + chosen + rejected rows."""
    fork = batch["fork"]
    start = int(fork.min()) if fork.device.type == "cpu" else 0  # positions before every fork score nothing
    logits, _ = causal_lm_logits(
        model, batch["input_ids"], batch["attention_mask"], start, batch["position_ids"]
    )  # (B, T', V)
    per_token = token_logprobs(logits, batch["targets"][:, start:])  # (B, T'), 0 where nothing is scored
    segment = batch["segment"][:, start:]
    chosen = per_token.masked_fill(segment != 1, 0.0).sum(dim=1)
    rejected = per_token.masked_fill(segment != 2, 0.0).sum(dim=1)
    rows = torch.arange(len(fork), device=fork.device)
    fork_logps = torch.log_softmax(logits[rows, fork - start].float(), dim=-1)  # (B, V)
    rejected = rejected + fork_logps[rows, batch["rejected_first"]]  # the fork also predicts rejected[0]
    lengths = torch.cat([(segment == 1).sum(dim=1), (segment == 2).sum(dim=1) + 1])
    return chosen, rejected, lengths


@torch.no_grad()
def precompute_reference_logps(
    model: nn.Module,
    encoded: list[dict[str, Any]],
    pad_id: int,
    reference: str = "policy",
    batch_size: int = 8,
    share_prompt: bool = False,
) -> None:
    """Store ``ref_chosen_logps``/``ref_rejected_logps`` (floats) in every encoded pair, in place."""
    if reference == "adapter_disabled" and not hasattr(model, "disable_adapter"):
        raise ValueError(
            "dpo.reference='adapter_disabled' needs a PEFT (LoRA) policy; use reference='policy'"
        )
    collate = DPOCollator(pad_id, share_prompt)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    context = model.disable_adapter() if reference == "adapter_disabled" else contextlib.nullcontext()
    try:
        with context:
            for start in range(0, len(encoded), batch_size):
                items = encoded[start : start + batch_size]
                batch = {k: v.to(device) for k, v in collate(items).items()}
                chosen, rejected, _ = pair_logps(model, batch)
                for it, c, r in zip(items, chosen.tolist(), rejected.tolist()):
                    it["ref_chosen_logps"], it["ref_rejected_logps"] = c, r
    finally:
        model.train(was_training)


def make_dpo_loss(cfg: DPOConfig):
    """``loss_fn(model, batch)`` for the Trainer: mean DPO loss + reward/log-prob metrics."""

    def dpo_loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        if "ref_chosen_logps" not in batch:
            raise ValueError("DPO batch has no reference log-probs; call precompute_reference_logps first")
        chosen, rejected, lengths = pair_logps(model, batch)
        chosen_len, rejected_len = lengths.chunk(2)
        normalize = cfg.loss_type == "ipo" and cfg.ipo_length_normalize
        out = dpo_loss(
            chosen,
            rejected,
            batch["ref_chosen_logps"],
            batch["ref_rejected_logps"],
            beta=cfg.beta,
            label_smoothing=cfg.label_smoothing,
            loss_type=cfg.loss_type,
            chosen_lengths=chosen_len if normalize else None,
            rejected_lengths=rejected_len if normalize else None,
            dpop_lambda=cfg.dpop_lambda,
        )
        metrics = {
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/margin": out.margins.mean(),
            "rewards/accuracy": out.accuracy,
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
        }
        loss = out.losses.mean()
        if cfg.sft_weight > 0:
            nll = -(chosen / chosen_len.clamp(min=1)).mean()  # mean per-token NLL of the chosen completions
            loss = loss + cfg.sft_weight * nll
            metrics["nll/chosen"] = nll.detach()
        return loss, metrics

    return dpo_loss_fn


# ----------------------------------------------------------------------------------------------- run


def train_dpo(
    model: nn.Module,
    tokenizer: Any,
    pairs: list[PreferencePair],
    dpo_cfg: DPOConfig,
    train_cfg: TrainConfig,
    eval_pairs: list[PreferencePair] | None = None,
    run_config: Any = None,
) -> dict[str, Any]:
    """Encode pairs, precompute references once, run the one Trainer with the DPO loss; return its summary."""
    from modern_llm.training.trainer_base import Trainer

    if not pairs:
        raise ValueError(
            "no preference pairs to train on (on-policy sampling found no question with both a correct and an "
            "incorrect solution? raise num_samples or temperature)"
        )
    pad = pad_id_of(tokenizer)
    share = dpo_cfg.share_prompt and takes_boolean_4d_mask(model)
    train_items = encode_pairs(pairs, tokenizer, dpo_cfg.max_length, dpo_cfg.chat)
    eval_items = encode_pairs(eval_pairs, tokenizer, dpo_cfg.max_length, dpo_cfg.chat) if eval_pairs else None
    t0 = time.time()
    precompute_reference_logps(
        model, train_items + (eval_items or []), pad, dpo_cfg.reference, train_cfg.batch_size, share
    )
    log.info(
        "reference log-probs for %d pairs in %.1f s",
        len(train_items) + len(eval_items or []),
        time.time() - t0,
    )
    trainer = Trainer(
        model,
        train_items,
        make_dpo_loss(dpo_cfg),
        train_cfg,
        collate_fn=DPOCollator(pad, share),
        eval_dataset=eval_items,
        run_config=run_config if run_config is not None else trainer_run_config(model, dpo_cfg),
        save_extra_files=lambda folder: tokenizer.save_pretrained(str(folder / "tokenizer")),
    )
    summary = trainer.fit()
    if eval_items:
        summary |= trainer.evaluate()
    return summary


def split_pairs(pairs: list[PreferencePair], eval_fraction: float, seed: int):
    """Seeded shuffle, then (train, eval) with ``round(eval_fraction * n)`` eval pairs."""
    import random

    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = round(eval_fraction * len(pairs))
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def run(cfg: DPORunConfig) -> dict[str, Any]:
    from modern_llm.utils.records import now_iso, write_summary_record

    if not cfg.policy or not cfg.pairs:
        raise ValueError("set --policy (starting model) and --pairs (preference JSONL file)")
    started, t0 = now_iso(), time.time()
    model, tokenizer = load_policy(cfg.policy)
    model = maybe_apply_lora(model, cfg.lora)
    pairs = load_preference_jsonl(cfg.pairs, cfg.limit)
    train_pairs, eval_pairs = split_pairs(pairs, cfg.eval_fraction, cfg.train.seed)
    summary = train_dpo(
        model,
        tokenizer,
        train_pairs,
        cfg.dpo,
        cfg.train,
        eval_pairs,
        run_config=trainer_run_config(model, cfg),
    )
    summary["policy"] = str(save_policy(model, tokenizer, Path(cfg.train.out_dir) / "final"))
    if cfg.record:
        protocol = {"n_train_pairs": len(train_pairs), "n_eval_pairs": len(eval_pairs)}
        write_summary_record(
            cfg.record,
            summary,
            name=cfg.name,
            task=f"dpo/{Path(cfg.pairs).name}",
            model=cfg.policy,
            protocol=protocol | {"config": config_to_dict(cfg)},
            seed=cfg.train.seed,
            started=started,
            t0=t0,
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config_cli(
        DPORunConfig,
        sys.argv[1:] if argv is None else argv,
        prog="modern-llm dpo",
        description="Direct Preference Optimization on chosen/rejected pairs (HH-RLHF, UltraFeedback or "
        "explicit JSONL) with reference log-probs precomputed once; logs reward margins and accuracy.",
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = run(cfg)
    print(
        f"DPO done: step {summary['step']}, train/loss {summary.get('train/loss', float('nan')):.4f}, "
        f"eval reward accuracy {summary.get('eval/rewards/accuracy', float('nan')):.3f}, "
        f"policy saved to {summary['policy']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
