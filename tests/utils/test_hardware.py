"""CPU bf16 detection: native AMX/AVX512-bf16 vs emulated (read from /proc/cpuinfo text)."""

from __future__ import annotations

import logging

import torch

from modern_llm.utils import hardware
from modern_llm.utils.hardware import cpu_flags, cpu_has_native_bf16, warn_if_cpu_bf16_is_emulated

INTEL_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8 avx512_vnni
processor\t: 1
flags\t\t: fpu vme sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8 avx512_vnni
"""
AMD_NO_BF16 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse2 avx2 fma avx512f avx512bw avx512_vnni
"""
AVX512_BF16_ONLY = "flags\t\t: fpu avx2 avx512f avx512_bf16\n"


def test_cpu_flags_keeps_only_bf16_and_amx_flags_of_the_first_cpu():
    assert cpu_flags(INTEL_AMX) == ["amx_bf16", "amx_int8", "amx_tile", "avx512_bf16"]
    assert cpu_flags(AMD_NO_BF16) == []
    assert cpu_flags("no flags line here") == []


def test_native_bf16_needs_amx_or_avx512_bf16():
    assert cpu_has_native_bf16(INTEL_AMX) is True
    assert cpu_has_native_bf16(AVX512_BF16_ONLY) is True
    assert cpu_has_native_bf16(AMD_NO_BF16) is False


def test_warning_only_on_cpus_that_emulate_bf16_and_once(caplog, monkeypatch):
    monkeypatch.setattr(hardware, "_warned_bf16", False)
    with caplog.at_level(logging.WARNING, logger=hardware.__name__):
        assert warn_if_cpu_bf16_is_emulated(INTEL_AMX) is False
        assert warn_if_cpu_bf16_is_emulated(AMD_NO_BF16) is True
        assert warn_if_cpu_bf16_is_emulated(AMD_NO_BF16) is True  # every eval stage asks again
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "fp32" in messages[0]


def test_resolve_dtype_cpu_bf16_still_returns_bf16(monkeypatch):
    # The warning is advice, never a refusal: bf16 on any CPU still resolves (results stay reproducible).
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda text=None: False)
    assert hardware.resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
