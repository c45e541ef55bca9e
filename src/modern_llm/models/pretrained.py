"""Load a trained ModernDecoderLM (+ its tokenizer) from a trainer checkpoint folder.

A checkpoint folder (``<out_dir>/checkpoints/step_XXXXXXX``, or a run's ``out_dir``, which resolves to its
latest checkpoint) holds ``model.safetensors``, ``config.yaml`` (the run config; its ``model`` section is a
``ModernLLMConfig``) and ``tokenizer/``. Weights load from safetensors only: no pickle is executed.
"""

from __future__ import annotations

from pathlib import Path

from modern_llm.config.base import config_from_dict
from modern_llm.config.model_config import ModernLLMConfig
from modern_llm.models.transformer import ModernDecoderLM
from modern_llm.utils import checkpointing as ckpt_io


def resolve_model_checkpoint(path: str | Path) -> Path:
    """A ``step_*`` folder as is; a run folder -> its latest checkpoint; errors name what was looked for."""
    path = Path(path)
    if (path / ckpt_io.MODEL_FILE).is_file():
        return path
    for root in (path / ckpt_io.CHECKPOINTS_SUBDIR, path):
        if root.is_dir():
            latest = ckpt_io.latest_checkpoint(root)
            if latest is not None:
                return latest
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected {ckpt_io.MODEL_FILE} there or step_* folders under "
        f"{path / ckpt_io.CHECKPOINTS_SUBDIR}; train one with `modern-llm train-lm`"
    )


def load_model_config(ckpt: str | Path) -> ModernLLMConfig:
    data = ckpt_io.read_checkpoint_config(ckpt)
    model_section = data.get("model", data)
    return config_from_dict(ModernLLMConfig, model_section)


def load_pretrained(path: str | Path, device: str = "cpu"):
    """-> (model in eval mode, tokenizer or None, checkpoint folder)."""
    ckpt = resolve_model_checkpoint(path)
    model = ModernDecoderLM(load_model_config(ckpt))
    ckpt_io.load_model_weights(model, ckpt / ckpt_io.MODEL_FILE)
    tokenizer = None
    tok_dir = ckpt / "tokenizer"
    if tok_dir.is_dir():
        from modern_llm.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tok_dir)
    return model.to(device).eval(), tokenizer, ckpt
