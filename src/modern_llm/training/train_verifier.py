"""Verifier stage: (prompt, solution, correct?) records -> the one Trainer with a BCE loss.

    modern-llm train-verifier --config configs/alignment/verifier.yaml [--train.max_steps 200 ...]

What this stage adds to the trainer: encoding (the SFT collator: prompt + solution + EOS, so the verifier
reads exactly what the generator wrote), the BCE loss on the scalar head, and an ``eval_fn`` that scores the
held-out records and reports ROC-AUC, false-accept and false-reject rates at ``threshold``
(``evaluation.metrics.roc_auc`` / ``false_accept_reject``).

Design choices
- Records come from on-policy samples (``data.preference_datasets.sample_solutions``): the same samples
  that give DPO pairs, labelled by the task's answer checker. The CLI reads them from a JSONL file
  ({"prompt", "completion", "label"} per line), which the alignment pipeline writes.
- The trunk starts as a copy of the policy (``models.verifier.verifier_from_lm``); ``freeze_trunk`` trains
  only the head (a linear probe), which is much cheaper for a large HF trunk on CPU.
- AUC is threshold-free and insensitive to the positive rate, which changes a lot between policies; the
  FAR/FRR pair shows what a fixed threshold does (FAR = wrong solutions accepted).

Footguns
- A single-class eval set has no AUC: ``evaluate_scores`` reports ``nan`` for it rather than failing a run.
- ``pos_weight`` (BCE) rebalances rare positives; leave it at 1.0 unless one class is < ~10% of the data.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modern_llm.config.base import config_to_dict, parse_config_cli
from modern_llm.config.train_config import TrainConfig
from modern_llm.evaluation.metrics import false_accept_reject, roc_auc
from modern_llm.models.verifier import (
    Verifier,
    check_pooling,
    masked_mean,
    save_verifier,
    verifier_from_lm,
)
from modern_llm.training.train_sft import load_policy, pad_id_of

log = logging.getLogger(__name__)


@dataclass
class VerifierConfig:
    max_length: int = 512
    freeze_trunk: bool = False  # True: train the scalar head only (linear probe)
    threshold: float = 0.5  # accept a solution when P(correct) >= threshold (FAR/FRR)
    pos_weight: float = 1.0  # BCE weight of positive examples
    # > 0: add a within-question ranking loss (correct above wrong samples of the SAME question); batches then
    # hold whole questions, so batch_size counts questions
    rank_weight: float = 0.0
    # "last": score the last token; "mean": per-token BCE on every solution token, score = their mean logit
    pooling: str = "last"
    # tool-augmented verification: every solution line with arithmetic gets the exact calculator's verdict
    # appended (" [calc ok]" / " [calc wrong]") before the verifier reads it, in training and in scoring
    calc_annotations: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"verifier.threshold must be in (0, 1), got {self.threshold}")
        if self.pos_weight <= 0:
            raise ValueError(f"verifier.pos_weight must be > 0, got {self.pos_weight}")
        if self.rank_weight < 0:
            raise ValueError(f"verifier.rank_weight must be >= 0, got {self.rank_weight}")
        check_pooling(self.pooling)


@dataclass
class VerifierRunConfig:
    name: str = "verifier"
    policy: str = ""  # trunk initialisation: our policy folder, HF folder or registry name
    data: str = ""  # JSONL of {"prompt", "completion", "label"} records
    eval_fraction: float = 0.2
    record: str | None = None
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(out_dir="runs/verifier", lr=3e-4, warmup_steps=10, max_steps=200)
    )


# ----------------------------------------------------------------------------------------------- data


def verifier_records(
    prompts: Sequence[str], samples: Sequence[Sequence[Any]], strict: bool = False
) -> list[dict[str, Any]]:
    """Flatten graded samples (``preference_datasets.Sample``) into {"prompt", "completion", "label"}.

    ``strict``: label 1 needs the right answer AND no wrong arithmetic step (``Sample.is_good``).
    """
    return [
        {"prompt": prompt, "completion": s.text, "label": int(s.is_good(strict))}
        for prompt, row in zip(prompts, samples)
        for s in row
    ]


def load_verifier_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verifier data file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict) or not all(k in row for k in ("prompt", "completion", "label")):
                raise ValueError(
                    f"{path}:{lineno}: need an object with 'prompt', 'completion' and 'label' (0/1)"
                )
            if row["label"] not in (0, 1, True, False):
                raise ValueError(f"{path}:{lineno}: label must be 0 or 1, got {row['label']!r}")
            records.append(
                {"prompt": row["prompt"], "completion": row["completion"], "label": int(row["label"])}
            )
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def calc_annotated(solution: str) -> str:
    """``solution`` with the calculator's verdict after every line that holds a checkable arithmetic step.

    "She has 3 + 9 = 14 cookies." -> "She has 3 + 9 = 14 cookies. [calc wrong]"; lines without arithmetic are
    unchanged. The verifier then only has to learn what arithmetic cannot show (a copied-wrong number, a
    wrong operation), which a small model cannot compute on its own.
    """
    from modern_llm.evaluation.analysis import check_steps

    lines = []
    for line in solution.split("\n"):
        steps = check_steps(line)
        if steps:
            line = f"{line} [calc {'ok' if all(s.ok for s in steps) else 'wrong'}]"
        lines.append(line)
    return "\n".join(lines)


def encode_records(
    records: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, calc_annotations: bool = False
) -> list[dict[str, Any]]:
    from modern_llm.data.task_datasets import CausalLMCollator

    collator = CausalLMCollator(tokenizer, max_length=max_length)
    out = []
    for r in records:
        completion = calc_annotated(r["completion"]) if calc_annotations else r["completion"]
        p, c = collator.encode(r["prompt"], completion)
        out.append({"input_ids": p + c, "n_prompt": len(p), "label": float(r.get("label", 0))})
    return out


def group_by_prompt(
    items: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One item per distinct prompt, {"rows": [its encoded samples]}, in first-appearance order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for item, record in zip(items, records):
        groups.setdefault(record["prompt"], []).append(item)
    return [{"rows": rows} for rows in groups.values()]


@dataclass
class VerifierCollator:
    """Right-padded rows; items that are question groups ({"rows": [...]}) are flattened and get a
    ``group`` index per row (the ranking loss compares rows of the same group only)."""

    pad_id: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if items and "rows" in items[0]:
            rows = [row for it in items for row in it["rows"]]
            group = torch.tensor([g for g, it in enumerate(items) for _ in it["rows"]], dtype=torch.long)
            return self(rows) | {"group": group}
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        completion = torch.zeros((len(items), width), dtype=torch.long)
        for i, it in enumerate(items):
            ids[i, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
            mask[i, : len(it["input_ids"])] = 1
            completion[i, it["n_prompt"] : len(it["input_ids"])] = 1
        labels = torch.tensor([it["label"] for it in items], dtype=torch.float32)
        return {"input_ids": ids, "attention_mask": mask, "completion_mask": completion, "labels": labels}


# ----------------------------------------------------------------------------------------------- loss/eval


def within_group_ranking_loss(
    logits: torch.Tensor, labels: torch.Tensor, group: torch.Tensor
) -> torch.Tensor:
    """Mean of -log sigmoid(s_correct - s_wrong) over every (correct, wrong) pair of rows in the same group.

    BCE alone lets a verifier score mostly the QUESTION (easy questions: high P(correct) for every sample),
    which ranks samples of one question no better than chance; best-of-N needs the within-question order.
    0 (with a gradient path) when no group has both outcomes. Masked, not indexed: no host sync on GPU.
    """
    same = group[:, None] == group[None, :]  # (R, R)
    pairs = (same & (labels[:, None] > 0.5) & (labels[None, :] < 0.5)).to(logits.dtype)  # i right, j wrong
    margins = logits[:, None] - logits[None, :]  # (R, R): s_i - s_j
    return (-F.logsigmoid(margins) * pairs).sum() / pairs.sum().clamp(min=1.0)


def make_bce_loss(pos_weight: float = 1.0, rank_weight: float = 0.0, pooling: str = "last"):
    def bce_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        labels, completion = batch["labels"], batch["completion_mask"]
        weight = torch.as_tensor(pos_weight, device=labels.device)
        if pooling == "mean":  # token-level objective: every solution token predicts the outcome
            per_token = model(batch["input_ids"], batch["attention_mask"], per_token=True)  # (B, T)
            token_bce = F.binary_cross_entropy_with_logits(
                per_token, labels[:, None].expand_as(per_token), pos_weight=weight, reduction="none"
            )
            loss = masked_mean(token_bce, completion).mean()
            logits = masked_mean(per_token, completion)  # (B,) the score used at test time
        else:
            logits = model(batch["input_ids"], batch["attention_mask"])  # (B,)
            loss = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=weight)
        accuracy = ((logits > 0).float() == labels).float().mean()
        logs: dict[str, Any] = {"accuracy": accuracy}
        if rank_weight > 0 and "group" in batch:
            rank = within_group_ranking_loss(logits, labels, batch["group"])
            loss = loss + rank_weight * rank
            logs["rank_loss"] = rank.detach()
        return loss, logs

    return bce_loss


@torch.no_grad()
def score_encoded(
    verifier: nn.Module, encoded: Sequence[dict[str, Any]], pad_id: int, batch_size: int = 32
) -> list[float]:
    """P(correct) for every encoded record, in order (eval mode restored afterwards)."""
    collate = VerifierCollator(pad_id)
    device = next(verifier.parameters()).device
    was_training = verifier.training
    verifier.eval()
    scores: list[float] = []
    try:
        for start in range(0, len(encoded), batch_size):
            batch = collate(list(encoded[start : start + batch_size]))
            logits = verifier(
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                batch["completion_mask"].to(device),
            )
            scores.extend(torch.sigmoid(logits).tolist())
    finally:
        verifier.train(was_training)
    return scores


def score_solutions(
    verifier: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    max_length: int = 512,
    batch_size: int = 32,
) -> list[float]:
    """P(correct) of each (prompt, completion)."""
    records = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    encoded = encode_records(records, tokenizer, max_length, getattr(verifier, "calc_annotations", False))
    return score_encoded(verifier, encoded, pad_id_of(tokenizer), batch_size)


def evaluate_scores(
    labels: Sequence[int], scores: Sequence[float], threshold: float = 0.5
) -> dict[str, float]:
    """AUC, false-accept/false-reject rates at ``threshold``, accuracy and positive rate."""
    labels = [int(x) for x in labels]
    both = 0 < sum(labels) < len(labels)
    far, frr = false_accept_reject(labels, scores, threshold)
    correct = sum((s >= threshold) == bool(y) for y, s in zip(labels, scores))
    return {
        "auc": roc_auc(labels, scores) if both else math.nan,
        "far": far,
        "frr": frr,
        "accuracy": correct / max(len(labels), 1),
        "positive_rate": sum(labels) / max(len(labels), 1),
        "n": float(len(labels)),
    }


# ----------------------------------------------------------------------------------------------- run


def train_verifier(
    verifier: Verifier,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    cfg: VerifierConfig,
    train_cfg: TrainConfig,
    eval_records: Sequence[dict[str, Any]] | None = None,
    run_config: Any = None,
) -> dict[str, Any]:
    """Train ``verifier`` with BCE on labelled records; eval reports AUC/FAR/FRR on ``eval_records``."""
    from modern_llm.training.trainer_base import Trainer

    if not records:
        raise ValueError("no verifier records to train on")
    verifier.pooling = cfg.pooling  # the stage's config decides how solutions are scored and read
    verifier.calc_annotations = cfg.calc_annotations
    if cfg.freeze_trunk:
        for p in verifier.trunk.parameters():
            p.requires_grad_(False)
    pad = pad_id_of(tokenizer)
    train_items = encode_records(records, tokenizer, cfg.max_length, cfg.calc_annotations)
    if cfg.rank_weight > 0:
        train_items = group_by_prompt(train_items, records)
    eval_items = (
        encode_records(eval_records, tokenizer, cfg.max_length, cfg.calc_annotations)
        if eval_records
        else None
    )

    def eval_fn(model: nn.Module) -> dict[str, float]:
        scores = score_encoded(model, eval_items, pad, train_cfg.batch_size)
        return evaluate_scores([int(it["label"]) for it in eval_items], scores, cfg.threshold)

    trainer = Trainer(
        verifier,
        train_items,
        make_bce_loss(cfg.pos_weight, cfg.rank_weight, cfg.pooling),
        train_cfg,
        collate_fn=VerifierCollator(pad),
        eval_fn=eval_fn if eval_items else None,
        run_config=run_config if run_config is not None else {"verifier": config_to_dict(cfg)},
    )
    return trainer.fit()


def run(cfg: VerifierRunConfig) -> dict[str, Any]:
    import random

    from modern_llm.utils.records import now_iso, write_summary_record

    if not cfg.policy or not cfg.data:
        raise ValueError("set --policy (trunk initialisation) and --data (JSONL of prompt/completion/label)")
    started, t0 = now_iso(), time.time()
    lm, tokenizer = load_policy(cfg.policy)
    verifier = verifier_from_lm(lm)
    del lm
    records = load_verifier_jsonl(cfg.data)
    order = list(range(len(records)))
    random.Random(cfg.train.seed).shuffle(order)
    n_eval = round(cfg.eval_fraction * len(records))
    eval_records = [records[i] for i in order[:n_eval]]
    train_records = [records[i] for i in order[n_eval:]]
    summary = train_verifier(
        verifier,
        tokenizer,
        train_records,
        cfg.verifier,
        cfg.train,
        eval_records,
        {"run": config_to_dict(cfg)},
    )
    summary["verifier"] = str(save_verifier(verifier, Path(cfg.train.out_dir) / "final", tokenizer))
    if cfg.record:
        write_summary_record(
            cfg.record,
            summary,
            name=cfg.name,
            task=f"verifier/{Path(cfg.data).name}",
            model=cfg.policy,
            protocol={
                "n_train": len(train_records),
                "n_eval": len(eval_records),
                "config": config_to_dict(cfg),
            },
            seed=cfg.train.seed,
            started=started,
            t0=t0,
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config_cli(
        VerifierRunConfig,
        sys.argv[1:] if argv is None else argv,
        prog="modern-llm train-verifier",
        description="Train a solution verifier (policy trunk + scalar head, BCE) on labelled samples; reports "
        "ROC-AUC, false-accept and false-reject rates on held-out records.",
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = run(cfg)
    print(
        f"verifier done: step {summary['step']}, eval AUC {summary.get('eval/auc', float('nan')):.3f}, "
        f"FAR {summary.get('eval/far', float('nan')):.3f}, FRR {summary.get('eval/frr', float('nan')):.3f}; "
        f"saved to {summary['verifier']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
