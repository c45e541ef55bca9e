"""Typed configs: dataclasses that are also the YAML schema and the CLI (``--section.field value``)."""

from modern_llm.config.base import apply_overrides, config_from_dict, config_to_dict, load_config, save_config
from modern_llm.config.model_config import ModernLLMConfig

__all__ = [
    "ModernLLMConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
]
