"""Supervised finetuning (SFT): prompt -> completion pairs, loss on completion tokens only, the one Trainer.

    modern-llm train-sft --config configs/alignment/sft_arithmetic.yaml [--train.max_steps 200 ...]

What this stage adds to the trainer: building a policy (our ModernDecoderLM from scratch or from a checkpoint,
or any Hugging Face causal LM, fully or with LoRA), the SFT records of a task (``data.task_datasets``: the task
renders the prompt, with the tokenizer's chat template when ``chat``), and the masked next-token loss.

Design choices
- Data encoding is the task module's ``CausalLMCollator``: prompt and completion are tokenised separately,
  the completion ends with EOS, prompt and padding positions get label -100. Preference pairs and verifier
  data reuse the same encoder, so "what the model was trained to produce" has one definition.
- ``sft_loss`` works on logits for both model kinds (``causal_lm_logits``), so SFT, DPO and the verifier all
  see the same forward. It returns ``n_tokens``/``nll_sum``, which makes the trainer's eval report the
  completion-token NLL/PPL.
- A policy lives in a folder that ``load_policy`` reads back: ours = ``model.safetensors`` + ``config.yaml``
  (``model`` section) + ``tokenizer/`` (the checkpoint layout ``models.pretrained`` loads); HF = a
  ``save_pretrained`` folder. LoRA adapters are merged before export (a full-precision base only), so every
  later stage starts from a plain model.
- ``model = "scratch"`` builds a fresh ModernDecoderLM (``scratch`` section) with a byte-level BPE trained
  on the task's own train text (prompts and targets) -- the setting of the synthetic-arithmetic runs.

Footguns
- ``collate`` pads on the right. ModernDecoderLM has no attention mask, which is fine: a causal model's real
  tokens never attend to later padding, and padding positions carry label -100.
- Chat finetuning of a tokenizer without a chat template fails loudly (set ``data.chat false`` for the
  plain "Question: ... Answer:" format).
- Generation after SFT must stop where training ended the completion: EOS, and ``<|end|>`` for our chat
  tokenizer (``stop_token_ids``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from modern_llm.alignment.dpo_loss import IGNORE_INDEX, next_token_targets, token_logprobs
from modern_llm.config.base import config_to_dict, parse_config_cli
from modern_llm.config.model_config import ModernLLMConfig
from modern_llm.config.train_config import TrainConfig
from modern_llm.models.transformer import ModernDecoderLM
from modern_llm.utils.hardware import warn_if_cpu_bf16_is_emulated

log = logging.getLogger(__name__)

SCRATCH = "scratch"
POLICY_CONFIG = "config.yaml"
MODEL_WEIGHTS = "model.safetensors"


# ----------------------------------------------------------------------------------------------- config


@dataclass
class TaskDataConfig:
    """Which task examples to use and how to render them (shared by SFT, DPO pairs and evaluation)."""

    task: str = "arithmetic"  # a data.task_datasets task name (arithmetic, gsm8k, svamp, ...)
    task_args: dict[str, Any] = field(default_factory=dict)  # task constructor kwargs (arithmetic knobs)
    split: str = "train"
    limit: int | None = None  # first N examples of the split
    data_dir: str | None = None  # local datasets root; default $MODERN_LLM_DATA_DIR, then the Hub
    chat: bool = True  # render prompts with the tokenizer's chat template
    max_length: int = 512  # prompt + completion tokens; longer pairs lose the start of the prompt

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ValueError(f"data.max_length must be >= 8 tokens, got {self.max_length}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data.limit must be >= 1 or null, got {self.limit}")


@dataclass
class LoRAConfig:
    enabled: bool = False  # HF models only: train low-rank adapters instead of all weights
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05


@dataclass
class ScratchConfig:
    """A fresh ModernDecoderLM + BPE trained on the task text (``model: scratch``)."""

    model: ModernLLMConfig = field(
        default_factory=lambda: ModernLLMConfig(d_model=128, n_layers=4, n_heads=4, max_seq_len=256)
    )
    vocab_size: int = 512  # BPE size (upper bound); the model's vocab is len(tokenizer) rounded up to 64


@dataclass
class SFTRunConfig:
    name: str = "sft"
    model: str = SCRATCH  # "scratch" | our checkpoint/run folder | HF folder | registry name (hf.registry)
    record: str | None = None  # result-record JSON path
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(out_dir="runs/sft", lr=1e-3, warmup_steps=20, max_steps=300)
    )


# ----------------------------------------------------------------------------------------------- models


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a ``torch.compile`` wrapper (type checks must see the real class)."""
    return getattr(model, "_orig_mod", model)


def is_native(model: nn.Module) -> bool:
    return isinstance(unwrap(model), ModernDecoderLM)


def causal_lm_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    keep_from: int = 0,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T - keep_from, V) fp32, auxiliary loss) for ModernDecoderLM or a HF causal LM (PEFT or not).

    ``keep_from`` > 0 computes the LM head only for positions ``keep_from..T-1`` (``logits_to_keep``): the
    vocabulary projection and its log-softmax are the biggest tensors of a step, and positions whose next
    token is prompt carry no loss. ``position_ids`` (B, T) and a 4-D ``attention_mask`` (HF models only) let
    DPO share one prompt between two completions (``train_dpo.prompt_shared_batch``).
    """
    keep = input_ids.shape[1] - keep_from
    if is_native(model):
        if position_ids is not None:
            raise ValueError("per-row position_ids need a Hugging Face model; scratch models take none")
        out = model(input_ids, logits_to_keep=keep if keep_from else 0)
        return out.logits, out.aux_loss
    kwargs = {"logits_to_keep": keep} if keep_from and _takes_logits_to_keep(model) else {}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    logits = out.logits.float()
    return logits[:, -keep:] if keep_from and not kwargs else logits, out.logits.new_zeros(())


def _takes_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(generation_model(model).forward).parameters


def first_target_position(targets: torch.Tensor) -> int:
    """Leftmost position (over the batch) whose next-token target is not ignored; 0 off the CPU.

    Finding it needs the labels on the host: free on CPU, a device sync per step on CUDA, where it is
    skipped (the head then runs over every position, as before).
    """
    if targets.device.type != "cpu":
        return 0
    has_target = (targets != IGNORE_INDEX).any(dim=0).nonzero()
    return int(has_target[0]) if len(has_target) else 0


def generation_model(model: nn.Module) -> nn.Module:
    """What the engine should drive: a PEFT model's underlying (adapter-injected) transformers model."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


GENERATION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inference_model(model: nn.Module, dtype: str = "fp32", native: bool = False) -> nn.Module:
    """``generation_model(model)``, cast to ``dtype`` on a copy so trained fp32 weights are never rounded.

    bf16 sampling is faster than fp32 on CPUs with AMX/AVX512-bf16 (``bench/matmul_dtype.py``) and on GPUs;
    samples then come from the bf16-rounded model, which the records state (``dtype`` in their protocol).
    ``native`` turns a HF Llama/Mixtral into a ModernDecoderLM copy with the same weights, so the engine
    decodes it on our backend, where N samples of a prompt share its KV cache (``SharedPrefixKVCache``).
    """
    if dtype not in GENERATION_DTYPES:
        raise ValueError(f"generation dtype must be one of {sorted(GENERATION_DTYPES)}, got {dtype!r}")
    gen_model = generation_model(model)
    if native and not is_native(gen_model):
        from modern_llm.models.hf_convert import from_hf_model

        gen_model = from_hf_model(gen_model).to(next(gen_model.parameters()).device)
    target = GENERATION_DTYPES[dtype]
    if target is torch.bfloat16 and next(gen_model.parameters()).device.type == "cpu":
        warn_if_cpu_bf16_is_emulated()
    if target is torch.float32 or next(gen_model.parameters()).dtype is target:  # nothing to cast
        return gen_model
    return copy.deepcopy(gen_model).to(target)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a completion: EOS plus our chat end-of-turn marker when the vocabulary has it."""
    from modern_llm.data.tokenizer import CHAT_END_TOKEN

    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    end = tokenizer.get_vocab().get(CHAT_END_TOKEN)
    if end is not None and end not in ids:
        ids.append(int(end))
    if not ids:
        raise ValueError("tokenizer has no EOS token; set tokenizer.eos_token so completions can end")
    return ids


def pad_id_of(tokenizer: Any) -> int:
    """Padding id for collators: the pad token, else EOS (padding is always masked, so its id is irrelevant)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad nor EOS token; set tokenizer.pad_token")
    return int(pad)


def padded_vocab(n: int, multiple: int = 64) -> int:
    return multiple * math.ceil(n / multiple)


def build_scratch_policy(
    cfg: ScratchConfig, texts: list[str], seed: int, tokenizer_dir: str | Path | None = None
):
    """Fresh ModernDecoderLM + a BPE trained on ``texts`` -> (model, tokenizer). Init is seeded by ``seed``."""
    from modern_llm.data.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(texts, cfg.vocab_size, out_dir=tokenizer_dir, min_frequency=2)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=padded_vocab(len(tokenizer)))
    torch.manual_seed(seed)
    return ModernDecoderLM(model_cfg), tokenizer


def _is_native_folder(path: Path) -> bool:
    from modern_llm.models.pretrained import resolve_model_checkpoint

    try:
        ckpt = resolve_model_checkpoint(path)
    except FileNotFoundError:
        return False
    return (ckpt / POLICY_CONFIG).is_file() and not (path / "config.json").is_file()


def load_policy(name_or_path: str, device: str = "cpu"):
    """(model in train mode, tokenizer) from our checkpoint/policy folder, a HF folder or a registry name."""
    path = Path(name_or_path)
    if path.is_dir() and _is_native_folder(path):
        from modern_llm.models.pretrained import load_pretrained

        model, tokenizer, ckpt = load_pretrained(path, device=device)
        if tokenizer is None:
            raise FileNotFoundError(f"{ckpt} has no tokenizer/ folder; every policy must ship its tokenizer")
        return model.train(), tokenizer
    from modern_llm.hf.registry import load_model

    model, tokenizer = load_model(str(name_or_path), device=device, task="causal")
    return model.train(), tokenizer


def save_policy(model: nn.Module, tokenizer: Any, folder: str | Path) -> Path:
    """Write ``model`` so ``load_policy(folder)`` reads it back; LoRA adapters are merged first."""
    from safetensors.torch import save_file

    from modern_llm.utils.checkpointing import model_tensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    if is_native(model):
        save_file(model_tensors(model), str(folder / MODEL_WEIGHTS), metadata={"format": "pt"})
        (folder / POLICY_CONFIG).write_text(
            yaml.safe_dump({"model": config_to_dict(model.config)}, sort_keys=False)
        )
        tokenizer.save_pretrained(str(folder / "tokenizer"))
        return folder
    if hasattr(model, "merge_and_unload"):
        from modern_llm.hf.lora_utils import merge_adapter

        model = merge_adapter(model)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def maybe_apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    if not cfg.enabled:
        return model
    if is_native(model):
        raise ValueError("lora.enabled is for Hugging Face models; ModernDecoderLM trains all weights here")
    from modern_llm.hf.lora_utils import apply_lora, trainable_summary

    model = apply_lora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout)
    log.info("LoRA: %s", trainable_summary(model))
    return model


def trainer_run_config(model: nn.Module, stage_cfg: Any) -> dict[str, Any]:
    """The config saved with checkpoints: the stage config plus a ``model`` section ``load_pretrained`` reads."""
    data = {"stage": config_to_dict(stage_cfg)}
    inner = unwrap(model)
    if is_native(inner):
        data["model"] = config_to_dict(inner.config)
    return data


# ----------------------------------------------------------------------------------------------- data


def load_task(cfg: TaskDataConfig, instruction: str | None = None):
    """The task object; ``instruction`` replaces its instruction line (a policy trained with another prompt
    must be evaluated with that prompt)."""
    from modern_llm.data.task_datasets import get_task

    task = get_task(cfg.task, **cfg.task_args)
    if instruction is not None:
        task.instruction = instruction  # instance override of the class default
    return task


def task_examples(cfg: TaskDataConfig, split: str | None = None, limit: int | None = None):
    task = load_task(cfg)
    return task, task.load(split or cfg.split, data_dir=cfg.data_dir, limit=limit or cfg.limit)


def check_chat(tokenizer: Any, chat: bool) -> None:
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "data.chat is true but the tokenizer has no chat template; set data.chat false for the plain "
            "'Question: ... Answer:' format, or use a chat tokenizer"
        )


def make_collator(tokenizer: Any, max_length: int):
    """The task module's prompt-masked causal collator (labels aligned with input_ids, -100 = ignored)."""
    from modern_llm.data.task_datasets import CausalLMCollator

    return CausalLMCollator(tokenizer, max_length=max_length)


def sft_records(task, examples, tokenizer, chat: bool) -> list[dict[str, str]]:
    check_chat(tokenizer, chat)
    return task.sft_records(examples, chat=chat, tokenizer=tokenizer)


def scratch_tokenizer_texts(task, examples) -> list[str]:
    """What a scratch BPE is trained on: the task's user text and targets (never the eval split)."""
    return [t for ex in examples for t in (task.chat_user_text(ex), task.target_text(ex), task.instruction)]


# ----------------------------------------------------------------------------------------------- loss


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean NLL of completion tokens (labels != -100), + MoE aux loss for ModernDecoderLM."""
    targets = next_token_targets(batch["labels"])  # (B, T), aligned with logits
    start = first_target_position(targets)  # the prompt-only prefix needs no logits
    logits, aux = causal_lm_logits(model, batch["input_ids"], batch.get("attention_mask"), start)
    targets = targets[:, start:]
    nll_sum = -token_logprobs(logits, targets).sum()
    n_tokens = (targets != IGNORE_INDEX).sum()
    loss = nll_sum / n_tokens.clamp(min=1) + aux
    return loss, {"n_tokens": n_tokens, "nll_sum": nll_sum.detach()}


# ----------------------------------------------------------------------------------------------- run


def build_policy(cfg: SFTRunConfig, task, train_examples, device: str = "cpu"):
    if cfg.model == SCRATCH:
        texts = scratch_tokenizer_texts(task, train_examples)
        return build_scratch_policy(cfg.scratch, texts, cfg.train.seed)
    model, tokenizer = load_policy(cfg.model, device=device)
    return maybe_apply_lora(model, cfg.lora), tokenizer


def train_sft(
    model: nn.Module,
    tokenizer: Any,
    records: list[dict[str, str]],
    train_cfg: TrainConfig,
    max_length: int,
    eval_records: list[dict[str, str]] | None = None,
    run_config: Any = None,
) -> dict[str, Any]:
    """Run the one Trainer with ``sft_loss`` on prompt/completion records; return its summary."""
    from modern_llm.training.trainer_base import Trainer

    if not records:
        raise ValueError("no SFT records to train on (empty split or limit=0)")
    trainer = Trainer(
        model,
        records,
        sft_loss,
        train_cfg,
        collate_fn=make_collator(tokenizer, max_length),
        eval_dataset=eval_records or None,
        run_config=run_config if run_config is not None else trainer_run_config(model, train_cfg),
        save_extra_files=lambda folder: tokenizer.save_pretrained(str(folder / "tokenizer")),
    )
    return trainer.fit()


def run(cfg: SFTRunConfig) -> dict[str, Any]:
    """Build policy + data, train, export ``<out_dir>/final`` and (optionally) write a record."""
    from modern_llm.utils.records import now_iso, write_summary_record

    started, t0 = now_iso(), time.time()
    task, train_examples = task_examples(cfg.data)
    model, tokenizer = build_policy(cfg, task, train_examples)
    records = sft_records(task, train_examples, tokenizer, cfg.data.chat)
    summary = train_sft(
        model, tokenizer, records, cfg.train, cfg.data.max_length, run_config=trainer_run_config(model, cfg)
    )
    final = save_policy(model, tokenizer, Path(cfg.train.out_dir) / "final")
    summary["policy"] = str(final)
    if cfg.record:
        protocol = {"n_examples": len(records), "split": cfg.data.split, "chat": cfg.data.chat}
        write_summary_record(
            cfg.record,
            summary,
            name=cfg.name,
            task=f"sft/{cfg.data.task}",
            model=cfg.model,
            protocol=protocol | {"config": config_to_dict(cfg)},
            seed=cfg.train.seed,
            started=started,
            t0=t0,
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config_cli(
        SFTRunConfig,
        sys.argv[1:] if argv is None else argv,
        prog="modern-llm train-sft",
        description="Supervised finetuning on a task's prompt/completion pairs (prompt tokens masked out of the "
        "loss) for a scratch ModernDecoderLM, one of our checkpoints, or a HF causal LM (full or LoRA).",
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = run(cfg)
    print(
        f"SFT done: step {summary['step']}, train/loss {summary.get('train/loss', float('nan')):.4f}, "
        f"policy saved to {summary['policy']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
