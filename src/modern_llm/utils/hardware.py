"""Device and dtype selection, autocast, and the accelerator peak FLOP/s used for MFU.

Design choices
- ``dtype`` names the *autocast* compute dtype; parameters and optimizer state stay fp32 (mixed precision).
  "auto" means bf16 on a CUDA device that supports it and fp32 everywhere else (CPU autocast is slow and only
  used when asked for explicitly).
- Peak FLOP/s come from a small table of dense (no 2:4 sparsity) bf16/fp16 tensor-core peaks keyed by the CUDA
  device name; unknown devices, CPUs and fp32 runs give ``None`` so no made-up MFU is ever reported. Users can
  always pass their own number (``--train.peak_flops``).

Footguns
- Vendor datasheets usually headline *sparse* TFLOP/s (2x the dense figure); the table holds dense numbers.
- "L4" is a substring of "L40S" and "A10" of "A100": names are matched with word-boundary patterns, most
  specific first. Cards we have no trustworthy dense figure for (e.g. A10G) are deliberately absent.
- fp16 autocast needs loss scaling (the trainer adds a GradScaler); bf16 does not.
- bf16 on a CPU is only fast with native bf16 instructions (Intel AMX-bf16 / AVX512-bf16). Without them torch
  emulates it: on an AMD EPYC without those flags a bf16 matmul ran at 0.16-0.20x of fp32
  (``experiments/bench/matmul_dtype_cpu_amd_epyc.json``), so a CPU bf16 request there logs a warning.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (pattern on torch.cuda.get_device_name(), dense bf16/fp16 tensor-core peak in FLOP/s), most specific first.
# Sources: NVIDIA datasheets (dense = half of the "with sparsity" figure).
_PEAK_TABLE: list[tuple[str, float]] = [
    (r"\bGH200\b", 989.4e12),
    (r"\bH200\b.*\bNVL\b", 835.5e12),
    (r"\bH200\b", 989.4e12),
    (r"\bH100\b.*\bNVL\b", 835.5e12),
    (r"\bH100\b.*\bPCIe\b", 756.5e12),
    (r"\bH100\b", 989.4e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"\bH800\b", 989.4e12),
    (r"\bB200\b", 2250e12),
    (r"\bA100\b", 312e12),
    (r"\bA800\b", 312e12),
    (r"\bL40S\b", 362.05e12),
    (r"\bL40\b", 181.05e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),
    (r"\bV100\b", 125e12),  # fp16 only (no bf16 on Volta)
    (r"\bT4\b", 65e12),  # fp16 only
]


def resolve_device(name: str = "auto") -> torch.device:
    """Map "auto" to cuda if available else cpu; "cuda" without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is visible; use --train.device cpu (or auto)")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map "auto"/"fp32"/"bf16"/"fp16" to the autocast dtype for ``device``; reject unsupported pairs."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {['auto', *DTYPES]}, got {name!r}")
    dtype = DTYPES[name]
    if dtype is torch.float16 and device.type != "cuda":
        raise ValueError("dtype='fp16' needs a CUDA device (loss scaling); use bf16 or fp32 on CPU")
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bf16 support; use --train.dtype fp16 (with loss scaling) or fp32")
    if dtype is torch.bfloat16 and device.type == "cpu":
        warn_if_cpu_bf16_is_emulated()
    return dtype


_NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo_text: str | None = None) -> list[str]:
    """The bf16/AMX-related flags of the first CPU in ``/proc/cpuinfo`` (or the given text), sorted."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags = next(
        (line.split(":", 1)[1].split() for line in cpuinfo_text.splitlines() if line.startswith("flags")),
        [],
    )
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))


def cpu_has_native_bf16(cpuinfo_text: str | None = None) -> bool | None:
    """True/False from the CPU flags; None when they cannot be read (not Linux), so callers stay quiet."""
    if cpuinfo_text is None:
        return _this_cpu_has_native_bf16()
    return any(f in _NATIVE_BF16_FLAGS for f in cpu_flags(cpuinfo_text))


@functools.cache
def _this_cpu_has_native_bf16() -> bool | None:
    if not Path("/proc/cpuinfo").exists():
        return None
    return any(f in _NATIVE_BF16_FLAGS for f in cpu_flags())


_warned_bf16 = False


def warn_if_cpu_bf16_is_emulated(cpuinfo_text: str | None = None) -> bool:
    """True when bf16 is asked for on a CPU without native bf16 instructions; logs a warning once a process."""
    global _warned_bf16
    if cpu_has_native_bf16(cpuinfo_text) is not False:
        return False
    if not _warned_bf16:
        log.warning(
            "bf16 requested on a CPU without AMX-bf16/AVX512-bf16: torch emulates it, ~5x slower than fp32 "
            "here (bench/matmul_dtype.py measures it); use dtype fp32 on this machine"
        )
        _warned_bf16 = True
    return True


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast for reduced precision, a no-op context for fp32 (keeps fp32 runs bit-reproducible)."""
    if dtype is torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def peak_flops_for_name(device_name: str) -> float | None:
    """Dense bf16/fp16 tensor-core peak FLOP/s for a CUDA device name, or None when unknown."""
    for pattern, peak in _PEAK_TABLE:
        if re.search(pattern, device_name):
            return peak
    return None


def detect_peak_flops(
    device: torch.device, dtype: torch.dtype, override: float | None = None
) -> float | None:
    """Peak FLOP/s for MFU: the user's override, else the table for reduced-precision CUDA runs, else None."""
    if override is not None:
        return float(override)
    if device.type != "cuda" or dtype is torch.float32:
        return None  # CPU peaks vary too much; fp32 peak depends on TF32 settings
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def describe_device(device: torch.device) -> str:
    """Human/record-friendly device string, e.g. "cpu" or "cuda (NVIDIA H100 80GB HBM3)"."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type
