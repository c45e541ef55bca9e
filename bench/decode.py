"""Decode throughput on CPU: our engine vs Hugging Face ``generate`` on the same weights.

    python bench/decode.py                      # writes experiments/bench/decode_cpu.json, prints a table

A random ModernDecoderLM (dense Llama recipe, GQA) is exported with ``modern_llm.models.hf_convert.to_hf_model``
so every contender runs identical weights. Contenders, each at batch 1 and batch N, greedy, EOS ignored:
  ours-native    generate() on ModernDecoderLM (preallocated KVCache)
  ours-on-hf     generate() on the exported LlamaForCausalLM (HFCausalLMBackend, DynamicCache)
  hf-dynamic     model.generate(do_sample=False), default DynamicCache
  hf-static      model.generate(do_sample=False, cache_implementation="static")

Protocol: each measurement is the median of ``--repeats`` runs after one warm-up round; the contenders run
interleaved (round-robin) so that load drift on a shared machine affects all of them alike. ``e2e_tok_s`` = generated
tokens / wall time of the whole call (prefill included); ``decode_tok_s`` = batch * (new_tokens - 1) /
(t(new_tokens) - t(1)), i.e. the prefill and first token are subtracted out. CPU timings are noisy when other
processes share the cores; the record stores the thread count and core count. Never run by the test suite.
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
    """Median wall time of each run; runs are interleaved round-robin so load drift hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):  # round 0 is the warm-up (allocator, lazy init) and is discarded
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _contenders(model, hf, prompts: torch.Tensor) -> dict[str, Callable[[int], object]]:
    from modern_llm.inference.engine import generate
    from modern_llm.inference.sampling import SamplingParams

    ids = [row.tolist() for row in prompts]
    mask = torch.ones_like(prompts)

    def hf_generate(n: int, **kw):
        return hf.generate(
            input_ids=prompts, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, **kw
        )

    return {
        "ours-native": lambda n: generate(
            model, None, ids, SamplingParams(max_new_tokens=n), ignore_eos=True
        ),
        "ours-on-hf": lambda n: generate(hf, None, ids, SamplingParams(max_new_tokens=n), ignore_eos=True),
        "hf-dynamic": lambda n: hf_generate(n),
        "hf-static": lambda n: hf_generate(n, cache_implementation="static"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="CPU decode tokens/s: our engine vs HF generate (same weights)"
    )
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--n-kv-heads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="the 'batch N' setting (batch 1 always runs)")
    parser.add_argument("--repeats", type=int, default=5)
    # 1 thread by default: on a shared 2-core box, 2 OpenMP threads that must meet at a barrier while other
    # processes hold a core made a 256x384 matmul ~1000x slower (30 ms vs 30 us) in our measurements.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="experiments/bench/decode_cpu.json")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from modern_llm.config import ModernLLMConfig
    from modern_llm.models import ModernDecoderLM
    from modern_llm.models.hf_convert import to_hf_model
    from modern_llm.utils.records import now_iso, write_record

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started, t0 = now_iso(), time.perf_counter()
    cfg = ModernLLMConfig(
        vocab_size=args.vocab_size,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        max_seq_len=args.prompt_len + args.new_tokens,
    )
    model = ModernDecoderLM(cfg).eval()
    hf = to_hf_model(model)
    hf.generation_config.pad_token_id = 0
    metrics: dict[str, float] = {}
    rows = []
    with torch.inference_mode():
        for batch in sorted({1, args.batch}):
            prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len))
            contenders = _contenders(model, hf, prompts)
            runs = {
                (name, n): (lambda run=run, n=n: run(n))
                for name, run in contenders.items()
                for n in (1, args.new_tokens)
            }
            medians = _interleaved_medians(runs, args.repeats)
            for name in contenders:
                t_full, t_one = medians[(name, args.new_tokens)], medians[(name, 1)]
                e2e = batch * args.new_tokens / t_full
                decode = batch * (args.new_tokens - 1) / max(t_full - t_one, 1e-9)
                metrics[f"{name}/b{batch}/e2e_tok_s"] = round(e2e, 1)
                metrics[f"{name}/b{batch}/decode_tok_s"] = round(decode, 1)
                rows.append((name, batch, e2e, decode, t_full))
                print(f"  {name:12s} batch {batch:3d}: {decode:8.1f} decode tok/s", file=sys.stderr)

    print(f"\n{'contender':14s} {'batch':>5s} {'e2e tok/s':>10s} {'decode tok/s':>13s} {'call s':>8s}")
    for name, batch, e2e, decode, t_full in rows:
        print(f"{name:14s} {batch:5d} {e2e:10.1f} {decode:13.1f} {t_full:8.3f}")
    path = write_record(
        args.out,
        name="decode-cpu",
        task="decode-throughput",
        model=f"ModernDecoderLM random d{cfg.d_model} L{cfg.n_layers} H{cfg.n_heads} KV{cfg.n_kv_heads} "
        f"V{cfg.vocab_size} ({model.num_params() / 1e6:.1f}M params) + its LlamaForCausalLM export",
        metrics=metrics,
        protocol={
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "batches": sorted({1, args.batch}),
            "repeats": args.repeats,
            "statistic": "median after 1 warm-up round, contenders interleaved round-robin",
            "sampling": "greedy, EOS ignored",
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # other processes sharing the cores
            "torch": torch.__version__,
            "decode_tok_s": "batch*(new_tokens-1)/(t(new_tokens)-t(1))",
        },
        seed=args.seed,
        device="cpu",
        dtype="fp32",
        started=started,
        duration_s=time.perf_counter() - t0,
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
