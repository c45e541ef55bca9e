"""Matmul throughput by dtype on this machine: is bf16 worth it on the CPU?

    python bench/matmul_dtype.py                 # -> experiments/bench/matmul_dtype_cpu.json
    python bench/matmul_dtype.py --threads 1

CPUs with AMX (Sapphire Rapids and later) or AVX512-bf16 run bf16 GEMMs several times faster than fp32,
which is what makes the SmolLM2 stages affordable on a laptop-class CPU (``train.dtype bf16``, generation
from a bf16 copy). The shapes are SmolLM2-135M's (d_model 576, d_ff 1536, vocab 49152) at a decode batch
(80 rows: 10 prompts x 8 samples) and a training batch (512 rows). Reported: achieved GFLOP/s (2*M*N*K per
matmul, median of ``--repeats`` timed loops) per dtype and shape, and the bf16/fp32 ratio. The CPU's flags
(amx_bf16, avx512_bf16) are stored with the record. On CPUs without them torch emulates bf16 and it is
several times *slower* than fp32 (``matmul_dtype_cpu_amd_epyc.json``: 0.16-0.20x). Never run by the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from modern_llm.utils.hardware import cpu_flags

SHAPES = {  # name: (rows M, inner K, out N)
    "decode_mlp": (80, 576, 1536),
    "train_mlp": (512, 576, 1536),
    "train_lm_head": (512, 576, 49152),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gflops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int, min_time: float) -> float:
    a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    for _ in range(3):
        a @ w.T
    rates = []
    for _ in range(repeats):
        calls, t0 = 0, time.perf_counter()
        while True:
            a @ w.T
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time:
                break
        rates.append(2.0 * m * k * n * calls / elapsed / 1e9)
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    from modern_llm.utils.records import now_iso, write_record

    parser = argparse.ArgumentParser(description="fp32 vs bf16 matmul GFLOP/s on this CPU (SmolLM2 shapes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per timed loop")
    parser.add_argument("--out", default="experiments/bench/matmul_dtype_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started, t0 = now_iso(), time.perf_counter()
    metrics: dict[str, float] = {}
    for name, (m, k, n) in SHAPES.items():
        for label, dtype in DTYPES.items():
            metrics[f"{name}/{label}_gflops"] = gflops(m, k, n, dtype, args.repeats, args.min_time)
        metrics[f"{name}/bf16_over_fp32"] = metrics[f"{name}/bf16_gflops"] / metrics[f"{name}/fp32_gflops"]
        print(
            f"{name:>14}: "
            + ", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in metrics.items() if k.startswith(name))
        )
    write_record(
        args.out,
        name="matmul-dtype-cpu",
        task="bench/matmul_dtype",
        model="torch.matmul on random matrices (SmolLM2-135M shapes)",
        metrics=metrics,
        protocol={
            "shapes_MKN": {k: list(v) for k, v in SHAPES.items()},
            "flop_count": "2*M*K*N per matmul",
            "timing": f"median of {args.repeats} loops of >= {args.min_time}s after 3 warm-up calls",
            "torch_threads": args.threads,
            "cpu_flags": cpu_flags(),
            "torch_version": torch.__version__,
        },
        seed=None,
        device="cpu",
        dtype="fp32+bf16",
        started=started,
        duration_s=time.perf_counter() - t0,
    )
    print(f"record: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
