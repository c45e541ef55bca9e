"""LoRA / QLoRA (or full) finetuning of Hugging Face models on SST-2, SAMSum, GSM8K (any task), one trainer.

    modern-llm hf-finetune --model gpt2 --task sst2 --lora --limit 2000 --steps 300
    modern-llm hf-finetune --model t5-small --task samsum --lora --train-split "test[:400]" --eval-split "test[400:]"
    modern-llm hf-finetune --model smollm2-135m-instruct --task gsm8k --qlora --limit 500 --train.lr 1e-4

What this stage adds to the project's one ``Trainer``: a model from the registry (4-bit for QLoRA), LoRA
adapters (``hf.lora_utils``), the task's training pairs and collator (``data.task_datasets``), the loss, and an
``eval_fn`` that generates on held-out examples and grades them with the task's scorer -- the very code the
prompting baselines use, so "before" and "after" numbers are comparable.

Design choices
- Causal models train on prompt -> completion pairs with prompt tokens masked (the SFT loss of
  ``training.train_sft``, reused). Seq2seq models (T5) train on ``seq2seq_source`` -> target with the model's
  own cross-entropy. Both return ``n_tokens`` so the trainer's eval reports target-token loss/PPL too.
- Classification (SST-2) is finetuned as generation of the label word: the same prompt format as the
  baselines, no new head to initialise. ``eval_method="verbalizer"`` grades it by comparing the label words'
  next-token logits (one forward per example, the baselines' scorer); "generate" parses generated text,
  which for causal LMs runs through the project's engine (``hf.prompting_baselines.generate_texts``).
- Split syntax ``name[a:b]`` takes a slice of a split; with the same split for train and eval the slices must
  not overlap (checked by example id). Needed for SAMSum here, where only the test split exists locally: the
  record's protocol carries both split strings, so the non-standard protocol is visible.
- ``--eval-before`` (default on) grades the untouched model on the same examples first; both numbers land in
  the record (``before/...`` and the final ones).
- Records carry ``protocol.weights``: for SmolLM2 that the base is the Q4_1 GGUF de-quantised to fp32 (and,
  for QLoRA, re-quantised to NF4), and ``protocol.note`` for protocol caveats (e.g. training on a test slice).
- Adapters are saved on their own (``<out_dir>/adapter``, a few MB, + tokenizer); full finetunes save a
  ``save_pretrained`` folder (``<out_dir>/final``). Trainer checkpoints keep only trainable tensors for LoRA.

Footguns
- QLoRA on CPU: see ``hf.lora_utils`` (eval-mode forwards would otherwise repack the 4-bit weights and cut
  the LoRA gradients); ``apply_lora`` already guards it, and the first step is checked with
  ``assert_lora_gradients`` through a one-batch probe before training starts.
- Generation-based eval is slow on CPU: keep ``--eval-limit`` small, and ``--train.eval_every 0`` (default)
  evaluates only at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modern_llm.config.base import apply_overrides, config_to_dict
from modern_llm.config.train_config import TrainConfig
from modern_llm.data.task_datasets import CausalLMCollator, Seq2SeqCollator, Task, TaskExample, get_task

log = logging.getLogger(__name__)

METHODS = ("lora", "qlora", "full")
EVAL_METHODS = ("generate", "verbalizer")


@dataclass
class FinetuneConfig:
    model: str = "gpt2"
    task: str = "sst2"
    method: str = "lora"  # lora | qlora | full
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None  # default: per architecture (hf.lora_utils.DEFAULT_TARGETS)
    data_dir: str | None = None
    train_split: str | None = None  # default: the task's train split; "name[a:b]" slices
    eval_split: str | None = None  # default: the task's eval split
    limit: int | None = None  # first N training examples (after slicing)
    eval_limit: int | None = 200  # first N evaluation examples (generation is the slow part)
    chat: bool | None = None  # None: use the chat template when the tokenizer has one
    max_length: int = 512  # prompt + completion tokens (causal) / source tokens (seq2seq)
    max_target_length: int = 128  # seq2seq targets
    max_new_tokens: int | None = None  # eval generation; default: the task's own
    eval_method: str = "generate"  # "verbalizer": classification by label-word logits (one forward each)
    eval_batch_size: int = 8
    eval_before: bool = True
    dtype: str = "float32"  # weights / 4-bit compute dtype
    name: str | None = None
    record: str | None = None  # result-record JSON path
    note: str | None = None  # free text for the record's protocol (e.g. a non-standard split)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            out_dir="runs/hf_finetune",
            lr=2e-4,
            warmup_steps=10,
            max_steps=200,
            batch_size=8,
            weight_decay=0.0,
            log_every=10,
            tensorboard=False,
        )
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; use one of {METHODS}")
        if self.eval_method not in EVAL_METHODS:
            raise ValueError(f"eval_method={self.eval_method!r}; use one of {EVAL_METHODS}")
        for key in ("limit", "eval_limit"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key}={value} must be >= 1 or None")


# ---------------------------------------------------------------------------------------------- data

_SPLIT_SLICE = re.compile(r"^(?P<name>[\w/.-]+)(?:\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


def parse_split(spec: str) -> tuple[str, slice]:
    """'test[:400]' -> ('test', slice(None, 400)); 'train' -> ('train', slice(None))."""
    match = _SPLIT_SLICE.match(spec.strip())
    if match is None:
        raise ValueError(f"split {spec!r} is not 'name' or 'name[start:stop]' (e.g. 'test[:400]')")
    start, stop = match.group("start"), match.group("stop")
    return match.group("name"), slice(int(start) if start else None, int(stop) if stop else None)


def load_split(task: Task, spec: str, data_dir: str | None, limit: int | None) -> list[TaskExample]:
    name, part = parse_split(spec)
    try:
        examples = task.load(name, data_dir=data_dir)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}\nIf only an evaluation split exists locally, train on a disjoint slice and say so, e.g. "
            f"--train-split '{task.eval_split}[:400]' --eval-split '{task.eval_split}[400:]'."
        ) from err
    examples = examples[part]
    return examples if limit is None else examples[:limit]


def check_disjoint(train: list[TaskExample], evaluation: list[TaskExample]) -> None:
    overlap = {ex.id for ex in train} & {ex.id for ex in evaluation}
    if overlap:
        raise ValueError(
            f"{len(overlap)} evaluation examples are also training examples (e.g. id {sorted(overlap)[0]!r}); "
            "use disjoint slices such as --train-split 'test[:400]' --eval-split 'test[400:]'"
        )


def training_records(task: Task, examples: list[TaskExample], tokenizer: Any, seq2seq: bool, chat: bool):
    if seq2seq:
        return task.seq2seq_records(examples)
    return task.sft_records(examples, chat=chat, tokenizer=tokenizer)


def make_collator(tokenizer: Any, cfg: FinetuneConfig, seq2seq: bool):
    if seq2seq:
        return Seq2SeqCollator(tokenizer, cfg.max_length, cfg.max_target_length)
    return CausalLMCollator(tokenizer, max_length=cfg.max_length)


# ---------------------------------------------------------------------------------------------- losses


def seq2seq_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean target-token cross-entropy of an encoder-decoder model (labels padded with -100)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    n_tokens = (batch["labels"] != -100).sum()
    return out.loss, {"n_tokens": n_tokens, "nll_sum": out.loss.detach() * n_tokens}


def loss_for(seq2seq: bool):
    if seq2seq:
        return seq2seq_loss
    from modern_llm.training.train_sft import sft_loss  # the project's masked-prompt SFT loss

    return sft_loss


# ---------------------------------------------------------------------------------------------- model


def build_model(cfg: FinetuneConfig):
    """(model ready to train, tokenizer): registry load (4-bit for QLoRA) + LoRA, or all weights for full."""
    from modern_llm.hf import lora_utils
    from modern_llm.hf.registry import load_model
    from modern_llm.utils.hardware import resolve_device

    device = str(resolve_device(cfg.train.device))  # the device the trainer will use
    quant = "4bit" if cfg.method == "qlora" else None
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=device, quantization=quant)
    if cfg.method == "full":
        model.train()
    else:
        model = lora_utils.apply_lora(
            model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules
        )
    log.info("%s %s: %s", cfg.method, cfg.model, lora_utils.trainable_summary(model))
    return model, tokenizer


def probe_gradients(model: nn.Module, loss_fn, batch: dict[str, torch.Tensor]) -> None:
    """One forward/backward on a real batch; raise if any LoRA layer got no gradient. Grads are cleared."""
    from modern_llm.hf.lora_utils import assert_lora_gradients

    device = next(p for p in model.parameters() if p.requires_grad).device
    loss, _ = loss_fn(model, {k: v.to(device) for k, v in batch.items()})
    loss.backward()
    try:
        assert_lora_gradients(model)
    finally:
        model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------- run


def _weights_for_record(cfg: FinetuneConfig, note: str | None) -> str:
    """The base weights as the record must describe them (GGUF origin, NF4 re-quantisation for QLoRA)."""
    base = note or f"{cfg.model} as loaded by hf.registry ({cfg.dtype})"
    if cfg.method == "qlora":
        base += "; for QLoRA re-quantised to 4-bit NF4 (bitsandbytes, double quantisation) at load"
    return base


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train and evaluate; return a summary with ``before/<metric>``, final ``<metric>`` and output paths."""
    from modern_llm.hf.prompting_baselines import evaluate_task, is_seq2seq, use_chat, weights_note
    from modern_llm.training.trainer_base import Trainer
    from modern_llm.utils.records import now_iso, write_record

    started, t0 = now_iso(), time.time()
    torch.manual_seed(cfg.train.seed)
    task = get_task(cfg.task)
    train_spec, eval_spec = cfg.train_split or task.train_split, cfg.eval_split or task.eval_split
    train_examples = load_split(task, train_spec, cfg.data_dir, cfg.limit)
    eval_examples = load_split(task, eval_spec, cfg.data_dir, cfg.eval_limit)
    check_disjoint(train_examples, eval_examples)
    if len(train_examples) < cfg.train.batch_size:
        raise ValueError(
            f"{len(train_examples)} training examples < batch_size {cfg.train.batch_size}; raise --limit "
            "or lower --batch-size"
        )

    model, tokenizer = build_model(cfg)
    seq2seq = is_seq2seq(model)
    chat = use_chat(tokenizer, cfg.chat) and not seq2seq
    records = training_records(task, train_examples, tokenizer, seq2seq, chat)
    eval_records = training_records(task, eval_examples, tokenizer, seq2seq, chat)
    collate = make_collator(tokenizer, cfg, seq2seq)
    loss_fn = loss_for(seq2seq)

    def grade(m: nn.Module) -> dict[str, Any]:
        return evaluate_task(
            m,
            tokenizer,
            task,
            eval_examples,
            chat=chat,
            method=cfg.eval_method,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.eval_batch_size,
        )

    before = grade(model)["metrics"] if cfg.eval_before else {}
    if cfg.method != "full":
        probe_gradients(model, loss_fn, collate(records[: cfg.train.batch_size]))

    last: dict[str, Any] = {}

    def eval_fn(m: nn.Module) -> dict[str, float]:
        last.update(grade(m))
        return {k: v for k, v in last["metrics"].items() if k != "n"}

    train_cfg = dataclasses.replace(cfg.train, save_trainable_only=cfg.method != "full")
    trainer = Trainer(
        model,
        records,
        loss_fn,
        train_cfg,
        collate_fn=collate,
        eval_dataset=eval_records,
        eval_fn=eval_fn,
        run_config={"finetune": config_to_dict(cfg)},
        save_extra_files=lambda folder: tokenizer.save_pretrained(str(folder / "tokenizer")),
    )
    summary = trainer.fit()

    out_dir = Path(train_cfg.out_dir)
    if cfg.method == "full":
        saved = out_dir / "final"
        model.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
    else:
        from modern_llm.hf.lora_utils import save_adapter

        saved = save_adapter(model, out_dir / "adapter", tokenizer=tokenizer)
    predictions_path = out_dir / "predictions.jsonl"
    predictions_path.write_text("".join(json.dumps(p) + "\n" for p in last.get("predictions", [])))

    final = dict(last.get("metrics", {}))
    metrics = {**final, **{f"before/{k}": v for k, v in before.items()}}
    metrics["train/loss"] = summary.get("train/loss")
    result = {**summary, "metrics": metrics, "saved": str(saved), "predictions": str(predictions_path)}
    if cfg.record:
        name = cfg.name or f"hf-{cfg.method}-{Path(cfg.model).name}-{task.name}"
        write_record(
            cfg.record,
            name=name,
            task=task.name,
            model=cfg.model,
            metrics={k: v for k, v in metrics.items() if v is not None},
            protocol={
                "method": cfg.method,
                "train_split": train_spec,
                "eval_split": eval_spec,
                "n_train": len(train_examples),
                "n_eval": len(eval_examples),
                "chat": chat,
                "shots": 0,
                "eval_method": cfg.eval_method,
                "decoding": "greedy" if cfg.eval_method == "generate" else "label-word logits",
                "max_new_tokens": cfg.max_new_tokens or task.max_new_tokens,
                "weights": _weights_for_record(cfg, weights_note(cfg.model)),
                **({"note": cfg.note} if cfg.note else {}),
                "lora": None
                if cfg.method == "full"
                else {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout},
                "steps": summary["step"],
                "batch_size": train_cfg.batch_size,
                "grad_accum_steps": train_cfg.grad_accum_steps,
                "lr": train_cfg.lr,
            },
            seed=train_cfg.seed,
            device=summary["device"],
            dtype=summary["dtype"],
            started=started,
            duration_s=time.time() - t0,
        )
        result["record"] = cfg.record
    return result


# ---------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modern-llm hf-finetune",
        description="LoRA/QLoRA/full finetuning of a HF model on a task with the project's trainer; evaluates "
        "before and after with the task's own scorer. Extra '--train.<field> value' arguments override the "
        "TrainConfig (see modern-llm train-lm --help for its fields).",
    )
    p.add_argument("--model", default="gpt2", help="registry name, HF folder or Hub id")
    p.add_argument("--task", default="sst2", help="sst2, samsum, gsm8k, svamp, mawps, asdiv-a, arithmetic")
    # Not mutually exclusive on purpose: the last one wins, so wrapper scripts can set a default.
    p.add_argument("--lora", dest="method", action="store_const", const="lora", help="LoRA (default)")
    p.add_argument(
        "--qlora", dest="method", action="store_const", const="qlora", help="4-bit NF4 base + LoRA"
    )
    p.add_argument("--full", dest="method", action="store_const", const="full", help="train all weights")
    p.set_defaults(method="lora")
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale = alpha / r)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--target-modules", nargs="+", default=None, help="override the per-architecture default")
    p.add_argument("--limit", type=int, default=None, help="first N training examples")
    p.add_argument("--eval-limit", type=int, default=200, help="first N evaluation examples")
    p.add_argument(
        "--data-dir", default=None, help="datasets root (default $MODERN_LLM_DATA_DIR, then the Hub)"
    )
    p.add_argument("--train-split", default=None, help="default: the task's train split; 'test[:400]' slices")
    p.add_argument("--eval-split", default=None, help="default: the task's eval split")
    p.add_argument("--chat", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument(
        "--eval-method",
        choices=EVAL_METHODS,
        default="generate",
        help="grade generated text, or (classification) compare the label words' next-token logits",
    )
    p.add_argument(
        "--no-eval-before", dest="eval_before", action="store_false", help="skip the baseline eval"
    )
    p.add_argument("--steps", type=int, default=None, help="= --train.max_steps")
    p.add_argument("--batch-size", type=int, default=None, help="= --train.batch_size")
    p.add_argument("--lr", type=float, default=None, help="= --train.lr")
    p.add_argument("--seed", type=int, default=None, help="= --train.seed")
    p.add_argument("--out-dir", default=None, help="= --train.out_dir")
    p.add_argument("--dtype", default="float32", help="model weights dtype (QLoRA: compute dtype)")
    p.add_argument("--name", default=None, help="record name")
    p.add_argument("--record", default=None, help="write a result record (JSON) here")
    return p


def config_from_args(argv: list[str]) -> FinetuneConfig:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    shortcuts = {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    shortcuts["out_dir"] = args.out_dir
    overrides = {k: v for k, v in shortcuts.items() if v is not None}
    try:
        train_overrides = {k.removeprefix("train."): v for k, v in _parse_extra(extra).items()}
        train = apply_overrides(FinetuneConfig().train, {**overrides, **train_overrides})
        return FinetuneConfig(
            model=args.model,
            task=args.task,
            method=args.method,
            r=args.r,
            alpha=args.alpha,
            dropout=args.dropout,
            target_modules=args.target_modules,
            data_dir=args.data_dir,
            train_split=args.train_split,
            eval_split=args.eval_split,
            limit=args.limit,
            eval_limit=args.eval_limit,
            chat={"auto": None, "yes": True, "no": False}[args.chat],
            max_length=args.max_length,
            max_new_tokens=args.max_new_tokens,
            eval_batch_size=args.eval_batch_size,
            eval_method=args.eval_method,
            eval_before=args.eval_before,
            dtype=args.dtype,
            name=args.name,
            record=args.record,
            train=train,
        )
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable


def _parse_extra(extra: list[str]) -> dict[str, str]:
    from modern_llm.config.base import parse_overrides

    parsed = parse_overrides(extra)
    bad = [k for k in parsed if not k.startswith("train.")]
    if bad:
        raise ValueError(
            f"unknown argument(s) {['--' + k for k in bad]}; see --help (TrainConfig: --train.<field>)"
        )
    return parsed


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = finetune(cfg)
    print(
        f"{cfg.method} {cfg.model} on {cfg.task}: "
        + ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items() if isinstance(v, float))
        + f"; saved to {result['saved']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
