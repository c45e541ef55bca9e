"""Hugging Face side of the project: model registry, LoRA/QLoRA utilities, finetuning, prompting baselines.

Only the registry is re-exported here; ``lora_utils`` imports ``peft`` and is imported explicitly by callers.
"""

from modern_llm.hf.registry import (
    REGISTRY,
    ModelNotFoundError,
    ModelSpec,
    load_model,
    lookup_spec,
    model_kind,
)

__all__ = ["REGISTRY", "ModelNotFoundError", "ModelSpec", "load_model", "lookup_spec", "model_kind"]
