"""Command-line text generation and a multi-turn chat REPL, for our checkpoints and HF models.

``generate_main(argv)``: ``--checkpoint DIR`` (a trainer checkpoint: model.safetensors + config.yaml, with a
``tokenizer/`` folder in it or in a parent run folder) or ``--hf-model NAME`` (``modern_llm.hf.registry``);
``--prompt TEXT``; streams the continuation to stdout, diagnostics to stderr.

``chat_main(argv)``: same model options; reads user turns from stdin, renders the conversation with the
tokenizer's chat template, streams each reply; ``/reset`` clears the history, ``/exit`` (or EOF) quits.

Design choices
- Both commands call the one engine (``modern_llm.inference.engine.generate``); nothing here samples.
- A chat turn ends at the tokenizer's EOS or a known end-of-turn token present in its vocabulary
  (``<|end|>`` for ours, ``<|im_end|>``/``<|eot_id|>`` for common HF chat models).
- Checkpoints load through the shared ``modern_llm.models.pretrained.load_pretrained`` (safetensors only).

Footgun: with ``--num-samples > 1`` the samples are printed one after another once all are done (streaming N
interleaved rows to one terminal is unreadable).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

END_OF_TURN_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>")


# ------------------------------------------------------------------------------------------- loading


def _find_tokenizer_dir(ckpt: Path) -> Path:
    for folder in (ckpt, *list(ckpt.parents)[:2]):
        if (folder / "tokenizer").is_dir():
            return folder / "tokenizer"
    raise FileNotFoundError(
        f"no tokenizer/ folder in {ckpt} or its two parent folders; pass --tokenizer PATH (a folder written "
        "by save_pretrained, or 'gpt2-bpe')"
    )


def load_checkpoint_model(path: str | Path, tokenizer: str | None = None, device: str = "cpu"):
    """(ModernDecoderLM in eval mode, tokenizer) from a trainer checkpoint folder (or run folder).

    Uses the shared loader ``modern_llm.models.pretrained.load_pretrained``; when the checkpoint has no
    ``tokenizer/`` folder, the run folder above it is searched, and ``tokenizer`` overrides both.
    """
    from modern_llm.data.tokenizer import load_tokenizer
    from modern_llm.models.pretrained import load_pretrained

    model, tok, ckpt = load_pretrained(path, device=device)
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    elif tok is None:
        tok = load_tokenizer(_find_tokenizer_dir(Path(ckpt)))
    return model, tok


def load_for_inference(args: argparse.Namespace):
    """(model, tokenizer) from ``--checkpoint`` or ``--hf-model``."""
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.checkpoint:
        return load_checkpoint_model(args.checkpoint, args.tokenizer, device)
    from modern_llm.hf.registry import load_model

    model, tok = load_model(args.hf_model, device=device, task="causal")
    if args.tokenizer:
        from modern_llm.data.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    return model, tok


# ------------------------------------------------------------------------------------------- arguments


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="trainer checkpoint folder (or run folder: newest checkpoint)")
    source.add_argument("--hf-model", help="HF model: local folder, registered short name or Hub id")
    parser.add_argument("--tokenizer", help="override the tokenizer (folder or 'gpt2-bpe')")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: cpu)")


def _add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 = off")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--calculator", action="store_true", help="enable the safe calculator tool (<<expr=)")


def _sampling_from_args(args: argparse.Namespace):
    from modern_llm.inference.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )


def _tools_from_args(args: argparse.Namespace):
    if not args.calculator:
        return None
    from modern_llm.inference.tools import calculator_completion

    return calculator_completion


def _stream_to(out, events) -> object:
    """Write the text deltas of a one-row event stream to ``out``; return the final result."""
    result = None
    for event in events:
        if event.text:
            out.write(event.text)
            out.flush()
        if event.finished:
            result = event.result
    return result


# ------------------------------------------------------------------------------------------- generate


def generate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="modern-llm generate",
        description="Generate a continuation of --prompt with our checkpoint or a HF model (streams to stdout).",
    )
    _add_model_args(parser)
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--num-samples", type=int, default=1, help="independent samples of the prompt")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    _add_sampling_args(parser, max_new_tokens=128)
    args = parser.parse_args(argv)
    try:
        sampling = _sampling_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    from modern_llm.inference.engine import generate

    model, tokenizer = load_for_inference(args)
    tools = _tools_from_args(args)
    started = time.perf_counter()
    if args.num_samples == 1:
        events = generate(model, tokenizer, [args.prompt], sampling, stop=args.stop, tools=tools, stream=True)
        results = [_stream_to(sys.stdout, events)]
        sys.stdout.write("\n")
    else:
        results = generate(model, tokenizer, [args.prompt], sampling, args.num_samples, args.stop, tools)[0]
        for r in results:
            sys.stdout.write(f"=== sample {r.sample_index} ===\n{r.text}\n")
    elapsed = time.perf_counter() - started
    n_tokens = sum(r.num_generated_tokens for r in results)
    reasons = ",".join(sorted({r.finish_reason for r in results}))
    print(
        f"[{n_tokens} tokens in {elapsed:.2f}s, {n_tokens / elapsed:.1f} tok/s, finish: {reasons}]",
        file=sys.stderr,
    )
    return 0


# ------------------------------------------------------------------------------------------- chat


def _end_of_turn_ids(tokenizer) -> list[int]:
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def chat_main(argv: list[str] | None = None, stdin=None, stdout=None) -> int:
    parser = argparse.ArgumentParser(
        prog="modern-llm chat",
        description="Multi-turn chat on stdin/stdout using the tokenizer's chat template. "
        "Commands: /reset clears the conversation, /exit quits.",
    )
    _add_model_args(parser)
    parser.add_argument("--system", default=None, help="optional system message")
    _add_sampling_args(parser, max_new_tokens=256)
    args = parser.parse_args(argv)
    try:
        sampling = _sampling_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    from modern_llm.inference.engine import generate

    model, tokenizer = load_for_inference(args)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this tokenizer has no chat template; use a chat model, or add ours with "
            "modern_llm.data.tokenizer.add_chat_format(tokenizer) before finetuning"
        )
    stop_ids = _end_of_turn_ids(tokenizer)
    tools = _tools_from_args(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print("chat: type a message, /reset to start over, /exit to quit", file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        user = line.rstrip("\n")
        if user.strip() == "/reset":
            messages = list(system)
            continue
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        events = generate(
            model,
            tokenizer,
            [list(encoded["input_ids"])],
            sampling,
            tools=tools,
            eos_token_id=stop_ids,
            stream=True,
        )
        result = _stream_to(stdout, events)
        stdout.write("\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": result.text.strip()})
