"""Inference: KV caches, sampling, the ``generate`` engine (ours + HF models), streaming caches, tools.

Names are exported lazily (PEP 562), so ``import modern_llm.inference.tools`` (a pure-Python calculator)
does not import torch or transformers through this package.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "generate": "engine",
    "GenerationResult": "engine",
    "StreamEvent": "engine",
    "NativeBackend": "engine",
    "as_backend": "engine",
    "SamplingParams": "sampling",
    "KVCache": "kv_cache",
    "StaticDecodeStep": "kv_cache",
    "StreamingKVCache": "streaming",
    "streaming_perplexity": "streaming",
    "HFCausalLMBackend": "hf_adapter",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
