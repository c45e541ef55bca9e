"""Verifier: a transformer trunk + a scalar head that scores (question, solution) -> logit of P(correct).

The outcome-supervised verifier of Cobbe et al. (2021): initialise the trunk from the generator (so it
already reads the task's text), put a linear head on the hidden state of the LAST real token (which has
attended to the whole question + solution), train with binary cross-entropy on sampled solutions labelled
by the task's answer checker, and use it to rerank N samples (best-of-N by verifier score).

Design choices
- Two trunk kinds behind one ``hidden_states(input_ids, attention_mask) -> (B, T, d)`` call:
  * our ModernDecoderLM, with its ``lm_head`` replaced by ``nn.Identity`` so its forward returns the final
    normed hidden states instead of logits (no vocab projection is computed). With tied embeddings the
    embedding matrix stays in ``tok_emb``; only the head module is swapped.
  * a Hugging Face causal LM's ``base_model`` (e.g. ``LlamaModel``): ``last_hidden_state`` after the final
    norm, with the attention mask.
- The trunk is a deep copy of the LM it comes from, so training the verifier never changes the policy.
- Two poolings (``pooling``): "last" scores the hidden state of the last real token (Cobbe et al.'s
  test-time choice); "mean" scores EVERY solution token and averages the per-token logits over the
  solution. Trained with a per-token BCE (every solution token predicts the outcome: Cobbe et al.'s
  token-level objective), a wrong step lowers every later token's score instead of having to survive in
  the last hidden state, which a small trunk does not manage.
- The head starts at zero (every score starts at logit 0 = P 0.5), which keeps the first steps' BCE at ln 2
  instead of depending on the random head.
- ``save_verifier`` / ``load_verifier``: a folder with ``verifier.yaml`` (trunk kind + our model config),
  ``head.safetensors``, the trunk (``trunk.safetensors`` for ours, a ``trunk/`` HF folder otherwise) and the
  tokenizer. Nothing is unpickled on load.

Footguns
- Inputs must be RIGHT-padded with ``attention_mask`` (the last real token is found as ``mask.sum(1) - 1``);
  ModernDecoderLM ignores the mask, which is correct for right padding under causal attention.
- The verifier must see exactly the encoding the generator's samples had (prompt rendering, EOS at the end);
  ``training.train_verifier`` uses the SFT collator for that.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from modern_llm.config.base import config_from_dict, config_to_dict
from modern_llm.config.model_config import ModernLLMConfig
from modern_llm.models.transformer import ModernDecoderLM

VERIFIER_CONFIG = "verifier.yaml"
HEAD_FILE = "head.safetensors"
NATIVE_TRUNK_FILE = "trunk.safetensors"
HF_TRUNK_DIR = "trunk"
POOLINGS = ("last", "mean")


class Verifier(nn.Module):
    """``forward(input_ids, attention_mask) -> (B,)`` logits of P(solution is correct)."""

    def __init__(self, trunk: nn.Module, hidden_size: int, kind: str, pooling: str = "last"):
        super().__init__()
        if kind not in ("native", "hf"):
            raise ValueError(f"verifier trunk kind must be 'native' or 'hf', got {kind!r}")
        self.trunk = trunk
        self.kind = kind
        self.pooling = check_pooling(pooling)
        self.calc_annotations = False  # solutions are read with the calculator's verdict per line
        self.hidden_size = hidden_size
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self) -> Any:
        """The trunk's config (lets the trainer save a ``model`` section for native trunks)."""
        return getattr(self.trunk, "config", None)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "native":
            hidden = self.trunk(input_ids).logits  # (B, T, d): lm_head is Identity
        else:
            hidden = self.trunk(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"trunk returned width {hidden.shape[-1]}, expected hidden size {self.hidden_size}"
            )
        return hidden

    def token_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, attention_mask)  # (B, T, d)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()  # (B, T)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        completion_mask: torch.Tensor | None = None,
        per_token: bool = False,
    ) -> torch.Tensor:
        """(B,) solution scores (logits), or (B, T) per-token logits with ``per_token`` (training)."""
        if per_token:
            return self.token_logits(input_ids, attention_mask)
        if self.pooling == "mean":
            if completion_mask is None:
                raise ValueError("a mean-pooling verifier needs completion_mask (1 on the solution's tokens)")
            return masked_mean(self.token_logits(input_ids, attention_mask), completion_mask)
        hidden = self.hidden_states(input_ids, attention_mask)  # (B, T, d)
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:
            last = attention_mask.sum(dim=1) - 1  # (B,) index of the last real token (right padding)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        pooled = hidden[rows, last]  # (B, d)
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1).float()  # (B,)


def inference_verifier(verifier: Verifier, dtype: torch.dtype = torch.float32) -> Verifier:
    """``verifier`` for scoring only: with a reduced ``dtype`` a copy whose trunk runs in it (faster on
    CPUs with AMX/AVX512-bf16 and on GPUs) while the head stays fp32, so scores keep full resolution and
    best-of-N ties are not created by rounding. The trained verifier is never modified."""
    if dtype is torch.float32:
        return verifier
    fast = copy.deepcopy(verifier)
    fast.trunk.to(dtype)
    return fast


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"verifier pooling must be one of {POOLINGS}, got {pooling!r}")
    return pooling


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) values averaged over the positions where ``mask`` is 1 -> (B,)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def verifier_from_lm(lm: nn.Module, pooling: str = "last") -> Verifier:
    """A verifier whose trunk is a copy of ``lm`` (ModernDecoderLM or HF causal LM; PEFT models are merged)."""
    lm = getattr(lm, "_orig_mod", lm)
    if hasattr(lm, "merge_and_unload"):  # a LoRA policy: fold the adapter in, on a copy
        lm = copy.deepcopy(lm).merge_and_unload()
    if isinstance(lm, ModernDecoderLM):
        trunk = copy.deepcopy(lm)
        trunk.lm_head = nn.Identity()
        return Verifier(trunk, lm.config.d_model, "native", pooling)
    base = getattr(lm, "base_model", None)
    if base is None or base is lm:
        raise ValueError(
            f"cannot find the transformer trunk of a {type(lm).__name__}: pass a ModernDecoderLM or a HF "
            "*ForCausalLM model (its .base_model is the trunk)"
        )
    trunk = copy.deepcopy(base)
    return Verifier(trunk, int(lm.config.hidden_size), "hf", pooling)


def save_verifier(verifier: Verifier, folder: str | Path, tokenizer: Any = None) -> Path:
    from safetensors.torch import save_file

    from modern_llm.utils.checkpointing import model_tensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "kind": verifier.kind,
        "hidden_size": verifier.hidden_size,
        "pooling": verifier.pooling,
        "calc_annotations": verifier.calc_annotations,
    }
    save_file(model_tensors(verifier.head), str(folder / HEAD_FILE))
    if verifier.kind == "native":
        meta["model"] = config_to_dict(verifier.trunk.config)
        save_file(model_tensors(verifier.trunk), str(folder / NATIVE_TRUNK_FILE))
    else:
        verifier.trunk.save_pretrained(str(folder / HF_TRUNK_DIR))
    (folder / VERIFIER_CONFIG).write_text(yaml.safe_dump(meta, sort_keys=False))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder / "tokenizer"))
    return folder


def load_verifier(folder: str | Path, device: str = "cpu") -> Verifier:
    """Inverse of ``save_verifier`` (weights from safetensors / ``from_pretrained`` only)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_file = folder / VERIFIER_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: pass a folder written by save_verifier")
    meta = yaml.safe_load(cfg_file.read_text())
    if meta.get("kind") == "native":
        lm = ModernDecoderLM(config_from_dict(ModernLLMConfig, meta["model"]))
        lm.lm_head = nn.Identity()
        state = load_file(str(folder / NATIVE_TRUNK_FILE))
        missing, unexpected = lm.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if not m.startswith("lm_head")]:
            raise ValueError(
                f"{folder / NATIVE_TRUNK_FILE}: weights do not match (missing {missing}, unexpected {unexpected})"
            )
        trunk = lm
    elif meta.get("kind") == "hf":
        from transformers import AutoModel

        trunk = AutoModel.from_pretrained(str(folder / HF_TRUNK_DIR), trust_remote_code=False)
    else:
        raise ValueError(f"{cfg_file}: kind must be 'native' or 'hf', got {meta.get('kind')!r}")
    verifier = Verifier(trunk, int(meta["hidden_size"]), meta["kind"], meta.get("pooling", "last"))
    verifier.calc_annotations = bool(meta.get("calc_annotations", False))
    verifier.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    return verifier.to(device).eval()
