"""Wall-clock cost of N samples vs 1 sample of the same prompt through the engine (CPU).

    python bench/sampling_cost.py                 # writes experiments/bench/sampling_cost_cpu.json

Self-consistency and best-of-N need N samples per question. The engine prefills the prompt once and decodes
the N samples as one batch (``generate(..., num_samples=N)``), so N samples should cost far less than N times
one sample. Goal: N = 16 costs at most 3x one sample.

Contenders per model, each generating ``--new-tokens`` tokens per sample at temperature 0.8, EOS ignored:
  n1            generate(prompt, num_samples=1)
  nN-shared     generate(prompt, num_samples=N)            one prefill, N rows decoded together
  nN-copies     generate([prompt] * N, num_samples=1)      N prefills (one batched forward), same decode batch
  nN-shared-densekv  (native models) num_samples=N with the prompt's K/V copied into each row, as before
                the shared-prefix cache; ``decode_speedup_shared_kv_vs_dense_kv`` compares the decode parts
Each is also timed with max_new_tokens=1 (prefill + first token), which splits the cost into prefill and decode.

Models: a random ModernDecoderLM (native backend, our KV cache) and, when available offline, SmolLM2-135M
(HF backend; with ``--hf-native`` also as a ModernDecoderLM copy). Long prompts (``--prompt-len 800``, a
2-shot GSM8K prompt) show what the shared-prefix KV cache saves. Protocol as in ``bench/decode.py``: median of ``--repeats`` after one warm-up round, contenders
interleaved round-robin (load drift on the shared machine hits all alike), 1 thread by default. Never run by
the test suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch


def _interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):  # round 0 is the warm-up and is discarded
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(
    model, prompt: list[int], n: int, new_tokens: int, repeats: int, seed: int, copies: bool = True
) -> dict[str, float]:
    """Median seconds of each contender at ``new_tokens`` and at 1 token, plus the derived ratios."""
    from modern_llm.inference.engine import NativeBackend, generate
    from modern_llm.inference.sampling import SamplingParams
    from modern_llm.models.transformer import ModernDecoderLM

    def call(target, prompts, num_samples, tokens):
        params = SamplingParams(temperature=0.8, seed=seed, max_new_tokens=tokens)
        return lambda: generate(target, None, prompts, params, num_samples=num_samples, ignore_eos=True)

    contenders = {
        "n1": (model, [prompt], 1),
        f"n{n}-shared": (model, [prompt], n),
    }
    if copies:
        contenders[f"n{n}-copies"] = (model, [prompt] * n, 1)
    if isinstance(model, ModernDecoderLM):  # the same N rows with the prompt's K/V copied into every row
        contenders[f"n{n}-shared-densekv"] = (NativeBackend(model, share_prefix=False), [prompt], n)
    runs = {
        (name, tokens): call(target, prompts, k, tokens)
        for name, (target, prompts, k) in contenders.items()
        for tokens in (1, new_tokens)
    }
    with torch.inference_mode():
        med = _interleaved_medians(runs, repeats)
    out: dict[str, float] = {}
    for name in contenders:
        out[f"{name}/total_s"] = round(med[(name, new_tokens)], 4)
        out[f"{name}/prefill_plus_1_s"] = round(med[(name, 1)], 4)
        out[f"{name}/decode_s"] = round(med[(name, new_tokens)] - med[(name, 1)], 4)
    t1 = med[("n1", new_tokens)]
    out[f"ratio_n{n}_shared_vs_n1"] = round(med[(f"n{n}-shared", new_tokens)] / t1, 3)
    if copies:
        out[f"ratio_n{n}_copies_vs_n1"] = round(med[(f"n{n}-copies", new_tokens)] / t1, 3)
    out[f"ratio_n{n}_shared_vs_{n}_separate_calls"] = round(med[(f"n{n}-shared", new_tokens)] / (n * t1), 3)
    if f"n{n}-shared-densekv" in contenders:
        dense = med[(f"n{n}-shared-densekv", new_tokens)] - med[(f"n{n}-shared-densekv", 1)]
        out[f"decode_speedup_shared_kv_vs_dense_kv_n{n}"] = round(dense / out[f"n{n}-shared/decode_s"], 3)
    return out


def _native_model(args):
    from modern_llm.config import ModernLLMConfig
    from modern_llm.models import ModernDecoderLM

    cfg = ModernLLMConfig(
        vocab_size=args.vocab_size,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        max_seq_len=args.prompt_len + args.new_tokens,
    )
    model = ModernDecoderLM(cfg).eval()
    desc = (
        f"ModernDecoderLM random d{cfg.d_model} L{cfg.n_layers} H{cfg.n_heads} KV{cfg.n_kv_heads} "
        f"V{cfg.vocab_size} ({model.num_params() / 1e6:.1f}M params)"
    )
    return model, cfg.vocab_size, desc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CPU cost of N samples vs 1 sample of one prompt (engine)")
    parser.add_argument("--n", type=int, default=16, help="samples per prompt")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--n-kv-heads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--hf-model", default="smollm2-135m-instruct", help="registry name; '' to skip")
    parser.add_argument(
        "--hf-native",
        action="store_true",
        help="also run the HF model as a ModernDecoderLM copy (native backend, shared-prefix KV cache)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-copies", action="store_true", help="skip the N-prefills contender (slow with long prompts)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="experiments/bench/sampling_cost_cpu.json")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from modern_llm.utils.records import now_iso, write_record

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started, t0 = now_iso(), time.perf_counter()
    models = {"native": _native_model(args)}
    if args.hf_model:
        from modern_llm.hf.registry import load_model

        try:
            hf, _ = load_model(args.hf_model, device="cpu", task="causal")
            models["hf"] = (hf.eval(), hf.config.vocab_size, f"{args.hf_model} (HF backend)")
            if args.hf_native:
                from modern_llm.models.hf_convert import from_hf_model

                desc = f"{args.hf_model} as ModernDecoderLM (native backend)"
                models["hf_native"] = (from_hf_model(hf), hf.config.vocab_size, desc)
        except Exception as err:  # an optional contender: report and go on with the native model
            print(f"skipping {args.hf_model}: {type(err).__name__}: {err}", file=sys.stderr)
    metrics: dict[str, float] = {}
    described = {}
    for key, (model, vocab, desc) in models.items():
        prompt = torch.randint(0, vocab, (args.prompt_len,)).tolist()
        res = measure(model, prompt, args.n, args.new_tokens, args.repeats, args.seed, not args.no_copies)
        metrics |= {f"{key}/{k}": v for k, v in res.items()}
        described[key] = desc
        ratio = res[f"ratio_n{args.n}_shared_vs_n1"]
        print(f"{desc}: N={args.n} shared-prefill samples cost {ratio:.2f}x one sample", file=sys.stderr)
        for k, v in res.items():
            print(f"  {k:40s} {v}")
    goal = 3.0
    metrics["goal_ratio_max"] = goal
    metrics["goal_met_all_models"] = all(metrics[f"{k}/ratio_n{args.n}_shared_vs_n1"] <= goal for k in models)
    path = write_record(
        args.out,
        name="sampling-cost-cpu",
        task="sampling-cost",
        model="; ".join(f"{k}: {d}" for k, d in described.items()),
        metrics=metrics,
        protocol={
            "N": args.n,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "sampling": "temperature 0.8, EOS ignored (every sample generates new_tokens tokens)",
            "contenders": "n1 = 1 sample; nN-shared = num_samples=N (one prefill; native models share the "
            "prompt's KV cache); nN-copies = N copies of the prompt (N prefills in one batch); nN-shared-densekv "
            "= num_samples=N with the prompt's KV copied per row (native models)",
            "repeats": args.repeats,
            "statistic": "median after 1 warm-up round, contenders interleaved round-robin",
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
        },
        seed=args.seed,
        device="cpu",
        dtype="fp32",
        started=started,
        duration_s=time.perf_counter() - t0,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
