"""Training throughput: ModernDecoderLM vs the equivalent Hugging Face LlamaForCausalLM, eager and compiled.

    python bench/train_throughput.py                         # CPU: "small" only -> experiments/bench/train_cpu.json
    python bench/train_throughput.py --sizes small,gpt2-small   # on a GPU -> experiments/bench/train_cuda.json
    python bench/train_throughput.py --profile               # also print torch.profiler tables (eager steps)

What is timed: one full training step as the trainer runs it -- forward, mean next-token cross-entropy,
backward, AdamW step (fused on CUDA), zero_grad -- on a fixed random batch (throughput does not depend on the
token values). Contenders share weights: the HF model is ``hf_convert.to_hf_model(ours)``, called the way a
user calls it (``labels=input_ids``, HF shifts internally and uses SDPA attention); ours gets explicit
``targets``. Each model trains eagerly and through ``torch.compile`` (default mode), sharing one optimizer.

Protocol: warm-up rounds (the first compiled step includes compilation; its time is reported as
``compile_s``), then ``--steps`` timed rounds in which the four contenders run interleaved round-robin, so
load drift on a shared machine hits them alike; tokens/s = batch * seq_len / median step time.
On CUDA: bf16 autocast (fp32 weights, as the trainer), peak memory = this model's persistent state (params +
optimizer moments) + the peak allocated on top of everything resident during its step (grads, activations);
MFU = flops_per_token(T) * tokens/s / dense bf16 peak (``utils.hardware``). On CPU: fp32, no MFU and no
peak memory (no allocator statistics). Never run by the test suite.

Sizes: "small" (d 384, 6 layers, 6 heads, vocab 8192, T 512) and "gpt2-small" (d 768, 12 layers, 12 heads,
vocab 50304, T 1024), both MHA with the SwiGLU width rounded as ModernLLMConfig does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

SIZES: dict[str, dict[str, int]] = {
    "small": dict(d_model=384, n_layers=6, n_heads=6, vocab_size=8192, seq_len=512),
    "gpt2-small": dict(d_model=768, n_layers=12, n_heads=12, vocab_size=50304, seq_len=1024),
}
DEFAULT_BATCH = {"cpu": {"small": 2, "gpt2-small": 1}, "cuda": {"small": 32, "gpt2-small": 16}}


def build_pair(size: str, seed: int):
    """(ours, hf) with identical weights, in train mode."""
    from modern_llm.config.model_config import ModernLLMConfig
    from modern_llm.models.hf_convert import to_hf_model
    from modern_llm.models.transformer import ModernDecoderLM

    spec = SIZES[size]
    torch.manual_seed(seed)
    cfg = ModernLLMConfig(
        vocab_size=spec["vocab_size"],
        d_model=spec["d_model"],
        n_layers=spec["n_layers"],
        n_heads=spec["n_heads"],
        max_seq_len=spec["seq_len"],
    )
    ours = ModernDecoderLM(cfg)
    hf = to_hf_model(ours)
    return ours.train(), hf.train()


def ours_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids[:, :-1], targets=ids[:, 1:]).loss


def hf_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss


def make_step(
    model, loss_fn: Callable, optimizer: torch.optim.Optimizer, ids: torch.Tensor, autocast
) -> Callable[[], None]:
    def step() -> None:
        with autocast():
            loss = loss_fn(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def persistent_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Params + optimizer state bytes (what stays allocated between steps)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    return total


def timed(step: Callable[[], None], device: torch.device) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds, peak bytes allocated above the pre-step level; 0 on CPU).

    CPU seconds matter on a shared machine: time spent descheduled while other processes hold the cores
    inflates wall time but not CPU time (meaningful for CPU runs only; CUDA work is asynchronous).
    """
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    extra = torch.cuda.max_memory_allocated(device) - before if cuda else 0
    return seconds, cpu_seconds, extra


def profile_eager(steps: dict[str, Callable[[], None]], device: torch.device, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, step in steps.items():
        step()  # warm
        with profile(activities=activities) as prof:
            step()
            step()
        print(f"\n=== torch.profiler: {name} (2 steps) ===")
        print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def bench_size(size: str, args, device: torch.device, dtype: torch.dtype) -> tuple[dict, list[tuple]]:
    from modern_llm.utils.hardware import autocast_context, detect_peak_flops

    spec = SIZES[size]
    batch = args.batch_size or DEFAULT_BATCH[device.type][size]
    ours, hf = build_pair(size, args.seed)
    args.hf_attn = hf.config._attn_implementation
    flops_per_token = ours.flops_per_token(spec["seq_len"])
    n_params = ours.num_params()
    ids = torch.randint(0, spec["vocab_size"], (batch, spec["seq_len"] + 1), device=device)
    fused = device.type == "cuda"
    steps: dict[str, Callable[[], None]] = {}
    owners: dict[str, tuple] = {}
    for impl, model, loss_fn in (("ours", ours, ours_loss), ("hf", hf, hf_loss)):
        model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)
        for mode in args.modes:
            runner = torch.compile(model) if mode == "compile" else model
            name = f"{impl}/{mode}"
            steps[name] = make_step(runner, loss_fn, opt, ids, lambda: autocast_context(device, dtype))
            owners[name] = (model, opt)

    if args.profile:
        profile_eager({k: v for k, v in steps.items() if k.endswith("/eager")}, device, args.profile_rows)

    first_step: dict[str, float] = {}
    for round_ in range(args.warmup):
        for name, step in steps.items():
            seconds, _, _ = timed(step, device)
            if round_ == 0:
                first_step[name] = seconds
            print(f"  [{size}] warm-up {round_ + 1}: {name:14s} {seconds:7.2f} s", file=sys.stderr)
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    extra_mem: dict[str, int] = dict.fromkeys(steps, 0)
    for round_ in range(args.steps):
        for name, step in steps.items():
            seconds, cpu_seconds, extra = timed(step, device)
            times[name].append(seconds)
            cpu_times[name].append(cpu_seconds)
            extra_mem[name] = max(extra_mem[name], extra)
        print(f"  [{size}] round {round_ + 1}/{args.steps} done", file=sys.stderr)

    peak = detect_peak_flops(device, dtype, args.peak_flops)
    tokens = batch * spec["seq_len"]
    metrics: dict[str, float | None] = {}
    rows = []
    for name in steps:
        median = statistics.median(times[name])
        tps = tokens / median
        model, opt = owners[name]
        mem_mb = (persistent_bytes(model, opt) + extra_mem[name]) / 2**20 if device.type == "cuda" else None
        mfu = flops_per_token * tps / peak if peak else None
        compile_s = first_step[name] - median if name.endswith("/compile") and name in first_step else None
        prefix = f"{size}/{name}"
        metrics[f"{prefix}/tokens_per_s"] = round(tps, 1)
        metrics[f"{prefix}/step_s_median"] = round(median, 4)
        metrics[f"{prefix}/step_s_min"] = round(min(times[name]), 4)
        cpu_tps = None
        if device.type == "cpu":
            cpu_tps = tokens / statistics.median(cpu_times[name])
            metrics[f"{prefix}/tokens_per_cpu_s"] = round(cpu_tps, 1)
        if mem_mb is not None:
            metrics[f"{prefix}/peak_mem_mb"] = round(mem_mb, 1)
        if mfu is not None:
            metrics[f"{prefix}/mfu"] = round(mfu, 4)
        if compile_s is not None:
            metrics[f"{prefix}/compile_s"] = round(compile_s, 1)
        rows.append((size, name, batch, tps, cpu_tps, median, mem_mb, mfu))
    rates = ["tokens_per_s"] + (["tokens_per_cpu_s"] if device.type == "cpu" else [])
    for rate in rates:
        suffix = "" if rate == "tokens_per_s" else "_cpu_time"
        for mode in args.modes:
            ratio = metrics[f"{size}/ours/{mode}/{rate}"] / metrics[f"{size}/hf/{mode}/{rate}"]
            metrics[f"{size}/speedup_ours_vs_hf{suffix}/{mode}"] = round(ratio, 3)
        if len(args.modes) > 1:
            best_ours = max(metrics[f"{size}/ours/{m}/{rate}"] for m in args.modes)
            best_hf = max(metrics[f"{size}/hf/{m}/{rate}"] for m in args.modes)
            metrics[f"{size}/speedup_ours_vs_hf{suffix}/best"] = round(best_ours / best_hf, 3)
    metrics[f"{size}/batch_size"] = batch
    metrics[f"{size}/params_m"] = round(n_params / 1e6, 2)
    metrics[f"{size}/flops_per_token"] = flops_per_token
    return metrics, rows


def print_table(rows: list[tuple]) -> None:
    head = f"{'size':11s} {'contender':13s} {'batch':>5s} {'tokens/s':>10s} {'tok/cpu-s':>10s} {'step s':>8s}"
    print(f"\n{head} {'peak MB':>9s} {'MFU':>6s}")
    for size, name, batch, tps, cpu_tps, median, mem_mb, mfu in rows:
        cpu = f"{cpu_tps:10.1f}" if cpu_tps is not None else f"{'-':>10s}"
        mem = f"{mem_mb:9.0f}" if mem_mb is not None else f"{'-':>9s}"
        mfu_s = f"{mfu:6.1%}" if mfu is not None else f"{'-':>6s}"
        print(f"{size:11s} {name:13s} {batch:5d} {tps:10.1f} {cpu} {median:8.3f} {mem} {mfu_s}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Training tokens/s, peak memory and MFU: ModernDecoderLM vs HF Llama (same weights)"
    )
    parser.add_argument(
        "--sizes", default=None, help="comma list of small,gpt2-small (default: small on CPU, both on GPU)"
    )
    parser.add_argument("--modes", default="eager,compile", help="comma list of eager,compile")
    parser.add_argument("--batch-size", type=int, default=0, help="0 = per-size default for the device")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up rounds (the first compiles)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16")
    # 1 CPU thread by default: on a shared small box, OpenMP threads that wait at barriers for a core held by
    # another process make timings erratic; with a dedicated machine pass --threads to use more cores.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peak-flops", type=float, default=None, help="override the accelerator peak FLOP/s")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of eager steps")
    parser.add_argument("--profile-rows", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=None, help="record path (default experiments/bench/train_<device>.json)"
    )
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from modern_llm.utils.hardware import describe_device, dtype_name, resolve_device, resolve_dtype
    from modern_llm.utils.records import now_iso, write_record

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    sizes = (args.sizes or ("small" if device.type == "cpu" else "small,gpt2-small")).split(",")
    args.modes = args.modes.split(",")
    for value, allowed, flag in ((sizes, SIZES, "--sizes"), (args.modes, ("eager", "compile"), "--modes")):
        bad = [v for v in value if v not in allowed]
        if bad:
            raise ValueError(f"{flag}: unknown {bad}; choose from {list(allowed)}")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    started, t0 = now_iso(), time.perf_counter()
    load_start = round(os.getloadavg()[0], 2)

    metrics: dict[str, float | None] = {}
    rows: list[tuple] = []
    for size in sizes:
        m, r = bench_size(size, args, device, dtype)
        metrics.update(m)
        rows.extend(r)
    print_table(rows)
    for size in sizes:
        for key in sorted(k for k in metrics if k.startswith(f"{size}/speedup")):
            print(f"{key}: {metrics[key]:.2f}x")

    import transformers

    out = args.out or f"experiments/bench/train_{device.type}.json"
    path = write_record(
        out,
        name=f"train-throughput-{device.type}",
        task="train-throughput",
        model="ModernDecoderLM vs its LlamaForCausalLM export (same weights), sizes: "
        + ", ".join(f"{s} {SIZES[s]}" for s in sizes),
        metrics=metrics,
        protocol={
            "sizes": {s: SIZES[s] for s in sizes},
            "modes": args.modes,
            "step": "forward + mean next-token CE + backward + AdamW step + zero_grad",
            "hf_call": f"model(input_ids, labels=input_ids) (HF shifts), attn_implementation={args.hf_attn}",
            "warmup_rounds": args.warmup,
            "timed_rounds": args.steps,
            "statistic": "median step time, contenders interleaved round-robin",
            "tokens_per_cpu_s": "CPU only: batch*T / median process CPU time per step (robust to other "
            "processes sharing the cores; wall-clock tokens_per_s is not)",
            "compile_s": "first compiled step minus the median step; small when inductor's on-disk cache is "
            "warm from an earlier run",
            "peak_mem": "CUDA only: params + AdamW state + max allocated above resident during the step",
            "mfu": "flops_per_token(T) * tokens/s / dense bf16 peak; CUDA only",
            "threads": args.threads if device.type == "cpu" else None,
            "cpu_count": os.cpu_count(),
            "load_average_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        seed=args.seed,
        device=describe_device(device),
        dtype=dtype_name(dtype),
        started=started,
        duration_s=time.perf_counter() - t0,
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
