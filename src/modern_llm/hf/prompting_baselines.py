"""Zero-shot and k-shot prompting baselines for Hugging Face models on the project's tasks.

    modern-llm prompt-baseline --model smollm2-135m-instruct --task sst2 --shots 0 4 --limit 200

Everything task-specific (prompt format, answer extraction, metrics) comes from the task object
(``modern_llm.data.task_datasets``), so a baseline number and a finetuned number are computed by the same
code. This module only adds: choosing demonstrations, batching generation, and writing result records.

Design choices
- ``generate_texts`` is the single generation entry point (HF ``generate``; causal and seq2seq). Batched
  causal generation pads on the LEFT so every row's next token follows its own last prompt token; the
  tokenizer's padding side is restored afterwards. Prompts are sorted by length before batching (less padding)
  and results returned in the original order. Greedy by default: baselines must be reproducible.
- Long prompts (many shots, long dialogues) are truncated from the LEFT to fit the model's context minus
  ``max_new_tokens``: the instruction and first shots go first, the query survives.
- Demonstrations: ``shots`` examples drawn with a fixed seed from the task's train split, never the evaluated
  example itself. Tasks without a local train split (SVAMP, SAMSum here) draw from the evaluated split,
  excluding the current example; the record says which (``protocol.shot_source``).
- Seq2seq models (T5) zero-shot get the task's T5 prefix input (``seq2seq_source``: "summarize: ...",
  "sst2 sentence: ..."); with shots they get the plain k-shot prompt.
- Classification can also be scored by verbalizer (``method="verbalizer"``): compare the next-token logits of
  the label words instead of parsing generated text; small models often answer off-format when generating.
- Chat format is used when asked (``chat=True``) or, with ``chat=None``, when the tokenizer has a chat template.

Footguns
- A chat-templated prompt already contains BOS when the template wants it; we then encode it without adding
  special tokens again.
- Generation stops at EOS or ``max_new_tokens`` (per task default); text after the task's stop sequences is
  cut before grading, so a model that keeps going ("Question: ...") is not graded on its own follow-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from modern_llm.data.task_datasets import (
    Task,
    TaskExample,
    VerbalizerCollator,
    get_task,
    pick_shots,
    truncate_at_stops,
    verbalizer_logits,
)

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048  # used when the config names no maximum position


# ---------------------------------------------------------------------------------------------- generation


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def context_limit(model: torch.nn.Module) -> int:
    """Maximum sequence length the model was built for (positions), or ``DEFAULT_CONTEXT``."""
    config = model.config
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_CONTEXT


@contextmanager
def _padding(tokenizer: Any, side: str, truncation_side: str = "left"):
    old = (tokenizer.padding_side, tokenizer.truncation_side)
    tokenizer.padding_side, tokenizer.truncation_side = side, truncation_side
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = old


@contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _adds_bos_itself(tokenizer: Any, prompts: Sequence[str]) -> bool:
    """True if every prompt already starts with BOS (chat templates), so the tokenizer must not add it."""
    bos = tokenizer.bos_token
    return bool(bos) and all(p.startswith(bos) for p in prompts)


@torch.no_grad()
def generate_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    *,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    seed: int = 0,
) -> list[str]:
    """Completions (new text only, special tokens removed, cut at ``stop``) for ``prompts``, in order."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if not prompts:
        return []
    is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    max_prompt = context_limit(model) if is_seq2seq else context_limit(model) - max_new_tokens
    if max_prompt < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context"
        )
    device = _device_of(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    outputs: list[str] = [""] * len(prompts)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {}
    if do_sample:
        torch.manual_seed(seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with _eval_mode(model), _padding(tokenizer, "right" if is_seq2seq else "left"):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch_prompts = [prompts[i] for i in idx]
            enc = tokenizer(
                batch_prompts,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_prompt,
                add_special_tokens=not _adds_bos_itself(tokenizer, batch_prompts),
            ).to(device)
            out = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            new_tokens = out if is_seq2seq else out[:, enc["input_ids"].shape[1] :]  # (B, new)
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in zip(idx, texts):
                outputs[i] = truncate_at_stops(text, stop)
    return outputs


@torch.no_grad()
def classify_with_verbalizer(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    words: Sequence[str],
    batch_size: int = 8,
) -> list[int]:
    """Index of the label word whose first token is most likely right after each prompt."""
    collate = VerbalizerCollator(
        tokenizer,
        words,
        max_length=context_limit(model),
        add_special_tokens=not _adds_bos_itself(tokenizer, prompts),
    )
    preds: list[int] = []
    device = _device_of(model)
    with _eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            feats = [{"prompt": p, "label": 0} for p in prompts[start : start + batch_size]]
            batch = {k: v.to(device) for k, v in collate(feats).items()}
            preds += verbalizer_logits(model, batch).argmax(-1).tolist()
    return preds


# ---------------------------------------------------------------------------------------------- evaluation


def is_seq2seq(model: torch.nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def use_chat(tokenizer: Any, chat: bool | None) -> bool:
    """Resolve ``chat=None`` to "does the tokenizer have a chat template"; ``chat=True`` requires one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ValueError("chat=True but the tokenizer has no chat template; use chat=False (plain prompts)")
    return has_template if chat is None else chat


def build_prompts(
    task: Task,
    examples: Sequence[TaskExample],
    tokenizer: Any,
    *,
    shots: int = 0,
    shot_pool: Sequence[TaskExample] = (),
    chat: bool = False,
    seq2seq: bool = False,
    seed: int = 0,
) -> list[str]:
    """One prompt per example; k-shot demonstrations come from ``shot_pool`` (never the example itself)."""
    prompts = []
    for ex in examples:
        demos = pick_shots(shot_pool, shots, seed=seed, exclude=ex) if shots else []
        if seq2seq and not demos:
            prompts.append(task.seq2seq_source(ex))
        else:
            prompts.append(
                task.render_prompt(ex, shots=demos, chat=chat and not seq2seq, tokenizer=tokenizer)
            )
    return prompts


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[TaskExample],
    *,
    shots: int = 0,
    shot_pool: Sequence[TaskExample] = (),
    chat: bool | None = False,
    method: str = "generate",
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Prompt the model on ``examples`` and grade with the task -> {"metrics", "predictions"}.

    ``predictions`` holds one dict per example: id, output text, extracted answer, correct.
    """
    if method not in ("generate", "verbalizer"):
        raise ValueError(f"method={method!r}; use 'generate' or 'verbalizer'")
    seq2seq = is_seq2seq(model)
    chat = use_chat(tokenizer, chat) and not seq2seq
    prompts = build_prompts(
        task, examples, tokenizer, shots=shots, shot_pool=shot_pool, chat=chat, seq2seq=seq2seq, seed=seed
    )
    if method == "verbalizer":
        if task.kind != "classification" or seq2seq:
            raise ValueError("method='verbalizer' needs a classification task and a causal model")
        words = [w if chat else f" {w}" for w in task.label_words]
        outputs: list[Any] = classify_with_verbalizer(model, tokenizer, prompts, words, batch_size)
    else:
        outputs = generate_texts(
            model,
            tokenizer,
            prompts,
            max_new_tokens or task.max_new_tokens,
            batch_size=batch_size,
            stop=task.stop_sequences,
            seed=seed,
        )
    metrics = task.score(outputs, examples)
    predictions = [
        {
            "id": ex.id,
            "output": out,
            "extracted": task.extract_answer(out),
            "correct": task.is_correct(out, ex),
        }
        for ex, out in zip(examples, outputs)
    ]
    return {"metrics": metrics, "predictions": predictions, "chat": chat, "prompts": prompts}


def shot_pool_for(task: Task, data_dir: str | None, eval_split: str, limit: int = 1000) -> tuple[list, str]:
    """(demonstration pool, where it came from): the train split if present, else the evaluated split."""
    for split in dict.fromkeys([task.train_split, eval_split]):
        try:
            return task.load(split, data_dir=data_dir, limit=limit), split
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"{task.name}: no split available for demonstrations")


# ---------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modern-llm prompt-baseline",
        description="Zero-/k-shot prompting baselines of a HF model on a task, graded by the task's own scorer.",
    )
    p.add_argument("--model", required=True, help="registry name, HF folder or Hub id (see hf.registry)")
    p.add_argument("--task", required=True, help="sst2, samsum, gsm8k, svamp, mawps, asdiv-a, arithmetic")
    p.add_argument("--shots", type=int, nargs="+", default=[0], help="one run per value, e.g. --shots 0 4")
    p.add_argument("--split", default=None, help="evaluation split (default: the task's eval split)")
    p.add_argument("--limit", type=int, default=None, help="first N examples of the split")
    p.add_argument(
        "--data-dir", default=None, help="datasets root (default $MODERN_LLM_DATA_DIR, then the Hub)"
    )
    p.add_argument("--chat", choices=["auto", "yes", "no"], default="auto", help="use the chat template")
    p.add_argument("--method", choices=["generate", "verbalizer"], default="generate")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's own")
    p.add_argument("--seed", type=int, default=0, help="seed of the demonstration draw")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--record-dir", default=None, help="write one JSON record per --shots value here")
    p.add_argument("--predictions", default=None, help="write per-example predictions (JSONL) here")
    return p


def main(argv: list[str] | None = None) -> int:
    from modern_llm.hf.registry import load_model
    from modern_llm.utils.records import now_iso, write_record

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    task = get_task(args.task)
    split = args.split or task.eval_split
    examples = task.load(split, data_dir=args.data_dir, limit=args.limit)
    pool, pool_split = shot_pool_for(task, args.data_dir, split) if max(args.shots) > 0 else ([], None)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    chat = {"auto": None, "yes": True, "no": False}[args.chat]
    for shots in args.shots:
        started, t0 = now_iso(), time.time()
        result = evaluate_task(
            model,
            tokenizer,
            task,
            examples,
            shots=shots,
            shot_pool=pool,
            chat=chat,
            method=args.method,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        duration = time.time() - t0
        print(f"{args.model} {task.name} {shots}-shot: " + json.dumps(result["metrics"]))
        if args.predictions:
            path = Path(args.predictions)
            path = path.with_name(f"{path.stem}-{shots}shot{path.suffix or '.jsonl'}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(p) + "\n" for p in result["predictions"]))
        if args.record_dir:
            safe_model = Path(args.model).name or args.model.replace("/", "_")
            write_record(
                Path(args.record_dir) / f"prompt-{safe_model}-{task.name}-{shots}shot.json",
                name=f"prompt-{safe_model}-{task.name}-{shots}shot",
                task=task.name,
                model=args.model,
                metrics=result["metrics"],
                protocol={
                    "split": split,
                    "n_examples": len(examples),
                    "shots": shots,
                    "shot_source": pool_split if shots else None,
                    "chat": result["chat"],
                    "method": args.method,
                    "decoding": "greedy",
                    "max_new_tokens": args.max_new_tokens or task.max_new_tokens,
                },
                seed=args.seed,
                device=str(_device_of(model)),
                dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                started=started,
                duration_s=duration,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
