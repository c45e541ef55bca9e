"""LoRA / QLoRA for Hugging Face causal and seq2seq models, via PEFT.

``apply_lora(model)`` wraps a model with low-rank adapters on the right modules for its architecture;
``load_qlora(name)`` loads the base in 4-bit NF4 (bitsandbytes) and wraps it; ``save_adapter``/``load_adapter``
/``merge_adapter`` move adapters around; ``trainable_parameters`` counts what will be trained.

Design choices
- Target modules come from ``config.model_type`` (``DEFAULT_TARGETS``): every attention and MLP projection,
  the usual QLoRA choice (adapting all linear layers matters more than the rank). GPT-2 stores its projections
  as ``Conv1D`` with transposed weights, so LoRA is told ``fan_in_fan_out=True``. T5 v1.0 names its MLP ``wi``
  and T5 v1.1 / FLAN-T5 ``wi_0``/``wi_1``; both are listed (PEFT matches module-name suffixes and ignores the
  absent ones). In transformers 5 Mixtral's experts are fused 3-D parameters, not ``nn.Linear`` modules, so
  their gate/up/down projections are adapted through PEFT's ``target_parameters``.
- QLoRA = 4-bit NF4 base with double quantization, fp32 (or bf16) compute, LoRA adapters in full precision.
  ``peft.prepare_model_for_kbit_training`` upcasts the remaining small fp16/bf16 parameters (norms) to fp32.
- Merging into a 4-bit base would re-quantize the merged weights (lossy), so ``merge_adapter`` refuses and says
  to reload the base in full precision, load the adapter and merge there.

Footgun: CPU QLoRA and eval mode
- On CPUs with AVX512-BF16, a bitsandbytes ``Linear4bit`` whose forward runs in eval mode without grad
  repacks its weight into a CPU inference layout *in place*. From then on its matmul has no autograd kernel,
  so every adapter upstream of such a layer gets a zero gradient (only the few that feed the residual stream
  directly still learn) and training silently does almost nothing -- and a trainer's periodic
  ``model.eval()`` + ``no_grad`` evaluation triggers exactly that. ``disable_cpu_4bit_repacking`` turns the
  repacking off on every 4-bit layer (and undoes it where it already happened); ``apply_lora`` calls it for
  quantized models and puts the model in train mode. ``assert_lora_gradients`` is a cheap post-backward check
  that trainers/tests can use to catch any other path to adapted layers without gradient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],  # + experts via DEFAULT_TARGET_PARAMETERS
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "t5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
    "mt5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
}
DEFAULT_TARGET_PARAMETERS: dict[str, list[str]] = {
    "mixtral": ["experts.gate_up_proj", "experts.down_proj"],
}
_CONV1D_MODEL_TYPES = {"gpt2"}  # weights stored (in, out): LoRA must transpose


def is_quantized_4bit(model: nn.Module) -> bool:
    """True if the model (or the base under a PEFT wrapper) holds bitsandbytes 4-bit weights."""
    return any(type(m).__name__ == "Linear4bit" for m in model.modules())


def default_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) for the model's architecture; ValueError for unknown ones."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"no default LoRA target modules for model_type={model_type!r}; pass target_modules=[...] with the "
            f"names of its linear layers (known types: {', '.join(sorted(DEFAULT_TARGETS))})"
        )
    return list(DEFAULT_TARGETS[model_type]), list(DEFAULT_TARGET_PARAMETERS.get(model_type, []))


def disable_cpu_4bit_repacking(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference (see module docstring).

    Returns the number of 4-bit layers touched. Layers already repacked are converted back to the standard
    layout, so this is safe to call after an accidental eval-mode forward.
    """
    touched = 0
    for module in model.modules():
        if type(module).__name__ != "Linear4bit":
            continue
        module.support_avx512bf16_for_cpu = False  # the flag bitsandbytes checks before repacking
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            module.quant_state = weight.quant_state
        touched += 1
    return touched


def apply_lora(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    target_modules: list[str] | None = None,
    target_parameters: list[str] | None = None,
    init_lora_weights: bool = True,
):
    """Wrap ``model`` with LoRA adapters and return the ``PeftModel`` (in train mode).

    Defaults for ``target_modules``/``target_parameters`` come from ``default_targets``. For 4-bit models the
    base is prepared for k-bit training and CPU repacking is disabled. ``init_lora_weights=False`` gives a
    random (non-zero) B matrix, which tests use to make the adapter change the output immediately.
    """
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if r <= 0:
        raise ValueError(f"LoRA rank r={r} must be positive")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout={dropout} must be in [0, 1)")
    modules, parameters = default_targets(model) if target_modules is None else (list(target_modules), [])
    if target_parameters is not None:
        parameters = list(target_parameters)
    is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=modules,
        target_parameters=parameters or None,
        fan_in_fan_out=model.config.model_type in _CONV1D_MODEL_TYPES,
        task_type=TaskType.SEQ_2_SEQ_LM if is_seq2seq else TaskType.CAUSAL_LM,
        init_lora_weights=init_lora_weights,
    )
    if is_quantized_4bit(model):
        disable_cpu_4bit_repacking(model)
        # Gradient checkpointing is the trainer's decision, not ours; keep it off here.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, config)
    peft_model.train()
    return peft_model


def load_qlora(
    name: str,
    *,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    target_modules: list[str] | None = None,
    compute_dtype: torch.dtype | str = torch.float32,
    device: str = "cpu",
    task: str = "auto",
):
    """QLoRA in one call: load ``name`` in 4-bit NF4 via the registry, wrap with LoRA -> (model, tokenizer)."""
    from modern_llm.hf.registry import load_model

    model, tokenizer = load_model(name, dtype=compute_dtype, device=device, quantization="4bit", task=task)
    model = apply_lora(model, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules)
    return model, tokenizer


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable LoRA parameters by name."""
    return {n: p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}


def _adapted_layer(param_name: str) -> str:
    """'x.q_proj.lora_B.default.weight' -> 'x.q_proj' (the layer an adapter parameter belongs to)."""
    return param_name.split(".lora_")[0]


def layers_without_gradient(model: nn.Module) -> tuple[list[str], int]:
    """(adapted layers whose LoRA A and B grads are all None/zero, number of adapted layers)."""
    got_grad: dict[str, bool] = {}
    for name, param in lora_parameters(model).items():
        layer = _adapted_layer(name)
        nonzero = param.grad is not None and bool(param.grad.abs().sum() > 0)
        got_grad[layer] = got_grad.get(layer, False) or nonzero
    return [layer for layer, ok in got_grad.items() if not ok], len(got_grad)


def assert_lora_gradients(model: nn.Module) -> None:
    """Raise RuntimeError if, after ``backward()``, some adapted layer got no gradient at all.

    Per layer the check is "A or B": with standard init only B gets a gradient on the first step (A's is
    multiplied by B = 0). Every adapted layer feeds the loss, so a layer with neither is a broken graph -- the
    CPU 4-bit repacking footgun zeroes most layers but not all, so checking "any layer" would miss it.
    """
    if not lora_parameters(model):
        raise RuntimeError("model has no trainable LoRA parameters; wrap it with apply_lora first")
    dead, n_layers = layers_without_gradient(model)
    if dead:
        hint = (
            " The base is 4-bit: call disable_cpu_4bit_repacking(model) and model.train() before the first "
            "forward (an eval-mode forward on CPU repacks the weights and cuts the graph)."
            if is_quantized_4bit(model)
            else " Did backward() run, and is every adapted layer on the path to the loss?"
        )
        shown = ", ".join(dead[:4]) + (", ..." if len(dead) > 4 else "")
        raise RuntimeError(
            f"{len(dead)} of {n_layers} LoRA-adapted layers got no gradient after backward ({shown}).{hint}"
        )


def save_adapter(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> Path:
    """Write only the adapter weights + adapter_config.json (a few MB), plus the tokenizer if given."""
    folder = Path(folder)
    if not hasattr(model, "peft_config"):
        raise ValueError("save_adapter needs a PeftModel (from apply_lora/load_adapter), got a plain model")
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_adapter(base_model: nn.Module, folder: str | Path, *, is_trainable: bool = False):
    """Attach a saved adapter to ``base_model`` -> PeftModel (eval mode unless ``is_trainable``)."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no adapter_config.json; pass the folder written by save_adapter/save_pretrained"
        )
    if is_quantized_4bit(base_model):
        disable_cpu_4bit_repacking(base_model)
    model = PeftModel.from_pretrained(base_model, str(folder), is_trainable=is_trainable)
    model.train(is_trainable)
    return model


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold the LoRA weights into the base weights and return the plain base model (no PEFT wrapper)."""
    if not hasattr(model, "merge_and_unload"):
        raise ValueError("merge_adapter needs a PeftModel with LoRA adapters")
    if is_quantized_4bit(model):
        raise ValueError(
            "refusing to merge LoRA into a 4-bit base (the merged weights would be re-quantized, losing the "
            "adapter's precision). Reload the base with quantization=None, load_adapter(base, folder), then merge."
        )
    return model.merge_and_unload()


def _stored_numel(param: torch.Tensor) -> int:
    """Logical number of weights: bitsandbytes 4-bit params pack 2 weights per byte of storage."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights are counted as weights, not bytes."""
    trainable = total = 0
    for param in model.parameters():
        n = _stored_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """One line: 'trainable 1,234 / 5,678 params (21.73%)'."""
    trainable, total = trainable_parameters(model)
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable {trainable:,} / {total:,} params ({share:.2f}%)"


def print_trainable_summary(model: nn.Module) -> str:
    """Print and return ``trainable_summary(model)``."""
    line = trainable_summary(model)
    print(line)
    return line
