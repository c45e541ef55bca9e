"""LM pretraining stage: tokenizer -> cached packed data -> ModernDecoderLM -> the one Trainer -> record.

    modern-llm train-lm --config configs/lm/tinystories-cpu.yaml [--train.max_steps 200 ...]

What this stage adds to the trainer is only: building the tokenizer/data/model, the LM loss, a text sample
at the end, and the result record (JSON under experiments/) + loss-curve PNG.

Design choices
- ``data.tokenizer = "train"`` trains a byte-level BPE on the corpus *train* split (val text never seen)
  and ships it inside every checkpoint (``tokenizer/``); any HF tokenizer folder or "gpt2-bpe" works too.
- The model's vocab is ``len(tokenizer)`` rounded up to a multiple of 64 (faster matmuls on GPU); the
  extra rows are never targets. The config's ``model.vocab_size`` is overwritten and the saved config says so.
- Blocks are non-overlapping ``model.max_seq_len`` windows of the concatenated token stream with EOS between
  documents (stride = context). Bits per byte divides the summed NLL by the UTF-8 bytes those tokens encode
  (the split's bytes/token ratio), so models with different tokenizers compare fairly.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modern_llm.config.base import config_to_dict, parse_config_cli
from modern_llm.config.model_config import ModernLLMConfig
from modern_llm.config.train_config import TrainConfig
from modern_llm.models.transformer import ModernDecoderLM

log = logging.getLogger(__name__)


@dataclass
class LMDataConfig:
    corpus: str = (
        "embedded"  # embedded | tinystories | tinystories-sample | wikitext2 | text:<path> | jsonl:<path>
    )
    data_dir: str | None = None  # local datasets folder; default $MODERN_LLM_DATA_DIR, then the Hub
    tokenizer: str = "train"  # "train" (BPE on the train split) | "gpt2-bpe" | a tokenizer folder
    vocab_size: int = 4096  # BPE size when tokenizer == "train"
    val_fraction: float = 0.05
    max_docs: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.vocab_size < 300:
            raise ValueError(f"data.vocab_size must be >= 300 (256 bytes + specials), got {self.vocab_size}")


@dataclass
class SampleConfig:
    prompt: str = "Once upon a time"
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_k: int = 40
    seed: int = 0


@dataclass
class LMRunConfig:
    name: str = "lm"
    record: str | None = None  # result-record JSON path, e.g. experiments/lm/tinystories_cpu.json
    model: ModernLLMConfig = field(default_factory=ModernLLMConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/lm"))
    data: LMDataConfig = field(default_factory=LMDataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Next-token CE (+ MoE aux) for training; the pure CE sum/count feed eval PPL and bits-per-byte."""
    out = model(batch["input_ids"], targets=batch["targets"])
    n_tokens = (batch["targets"] != -100).sum()
    return out.loss, {"n_tokens": n_tokens, "nll_sum": out.ce_loss.detach() * n_tokens, "aux": out.aux_loss}


def build_tokenizer(cfg: LMRunConfig):
    from modern_llm.data.lm_datasets import train_tokenizer_on_corpus
    from modern_llm.data.tokenizer import load_tokenizer

    if cfg.data.tokenizer != "train":
        return load_tokenizer(cfg.data.tokenizer)
    tok_dir = Path(cfg.train.out_dir) / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():  # resuming: reuse exactly the tokenizer the run started with
        return load_tokenizer(tok_dir)
    log.info("training a %d-token byte-level BPE on %s (train split)", cfg.data.vocab_size, cfg.data.corpus)
    return train_tokenizer_on_corpus(
        cfg.data.corpus,
        cfg.data.vocab_size,
        out_dir=tok_dir,
        data_dir=cfg.data.data_dir,
        val_fraction=cfg.data.val_fraction,
        max_docs=cfg.data.max_docs,
    )


def rank0_first(train: TrainConfig, build):
    """Under torchrun, rank 0 trains the tokenizer / fills the token cache before the other ranks read it."""
    from modern_llm.utils import distributed as dist_utils

    if train.parallel == "none" or not dist_utils.launched_by_torchrun():
        return build()
    ctx = dist_utils.init_distributed(train.parallel, train.device)
    result = build() if ctx.is_main else None
    dist_utils.barrier(ctx)
    return result if ctx.is_main else build()


def padded_vocab(n: int, multiple: int = 64) -> int:
    return multiple * math.ceil(n / multiple)


def sample_text(model, tokenizer, sample: SampleConfig) -> str:
    from modern_llm.inference.engine import generate
    from modern_llm.inference.sampling import SamplingParams

    params = SamplingParams(
        temperature=sample.temperature,
        top_k=sample.top_k,
        max_new_tokens=sample.max_new_tokens,
        seed=sample.seed,
    )
    was_training = model.training
    model.eval()
    try:
        result = generate(model, tokenizer, [sample.prompt], sampling=params)[0][0]
    finally:
        model.train(was_training)
    return sample.prompt + result.text


def run(cfg: LMRunConfig) -> dict[str, Any]:
    """Train (or resume) one LM run; return the summary (also written as a record when cfg.record is set)."""
    from modern_llm.data.lm_datasets import prepare_lm_data
    from modern_llm.training.trainer_base import Trainer
    from modern_llm.utils.records import now_iso, write_record

    started, t0 = now_iso(), time.time()

    def tokenizer_and_data():
        tok = build_tokenizer(cfg)
        return tok, prepare_lm_data(
            cfg.data.corpus,
            tok,
            block_size=cfg.model.max_seq_len,
            data_dir=cfg.data.data_dir,
            cache_dir=cfg.data.cache_dir,
            val_fraction=cfg.data.val_fraction,
            max_docs=cfg.data.max_docs,
        )

    tokenizer, data = rank0_first(cfg.train, tokenizer_and_data)
    data.val.bytes_per_token = data.val_split.bytes_per_token
    cfg.model.vocab_size = padded_vocab(len(tokenizer))
    torch.manual_seed(cfg.train.seed)  # model init is part of the run's seed
    model = ModernDecoderLM(cfg.model)
    trainer = Trainer(
        model,
        data.train,
        lm_loss,
        cfg.train,
        eval_dataset=data.val,
        run_config=config_to_dict(cfg),
        save_extra_files=lambda folder: tokenizer.save_pretrained(folder / "tokenizer"),
    )
    summary = trainer.fit()
    final_eval = trainer.evaluate()
    summary |= final_eval
    summary["params"] = model.num_params()
    if not trainer.dist.is_main:  # under torchrun only rank 0 samples, plots and writes the record
        return summary
    summary["sample"] = sample_text(trainer.model, tokenizer, cfg.sample)
    curve = plot_run_curves(Path(cfg.train.out_dir), cfg.name)
    if cfg.record and curve is not None:  # the figure travels with the record (runs/ is not committed)
        curve = Path(shutil.copy(curve, Path(cfg.record).with_suffix(".png")))
    if cfg.record:
        metrics = {
            "val_loss": final_eval.get("eval/loss"),
            "val_ppl": final_eval.get("eval/ppl"),
            "val_bpb": final_eval.get("eval/bpb"),
            "train_loss": summary.get("train/loss"),
            "tokens_seen": summary.get("tokens_seen"),
            "train_time_s": summary.get("train_time_s"),
            "params": summary["params"],
        }
        protocol = data.protocol() | {
            "tokenizer": cfg.data.tokenizer if cfg.data.tokenizer != "train" else f"bpe-{len(tokenizer)}",
            "context": cfg.model.max_seq_len,
            "stride": cfg.model.max_seq_len,
            "eval": "non-overlapping blocks of the val split; bpb = sum NLL / (ln2 * bytes)",
            "steps": summary["step"],
            "batch_tokens": cfg.train.batch_size * cfg.train.grad_accum_steps * cfg.model.max_seq_len,
            "config": config_to_dict(cfg),
            "sample": summary["sample"],
            "loss_curve_png": str(curve) if curve else None,
        }
        write_record(
            cfg.record,
            name=cfg.name,
            task=f"lm/{cfg.data.corpus}",
            model=f"ModernDecoderLM-{summary['params'] / 1e6:.2f}M",
            metrics=metrics,
            protocol=protocol,
            seed=cfg.train.seed,
            device=summary["device"],
            dtype=summary["dtype"],
            started=started,
            duration_s=round(time.time() - t0, 1),
        )
    return summary


def plot_run_curves(out_dir: Path, title: str) -> Path | None:
    """train/loss and eval/loss vs step from the run's metrics.csv -> ``<out_dir>/loss_curve.png``."""
    from modern_llm.evaluation.plots import plot_loss_curves

    csv_file = out_dir / "metrics.csv"
    if not csv_file.is_file():
        return None
    return plot_loss_curves({title: csv_file}, out_dir / "loss_curve.png", title=title)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config_cli(
        LMRunConfig,
        sys.argv[1:] if argv is None else argv,
        prog="modern-llm train-lm",
        description="Pretrain ModernDecoderLM on a text corpus with the project's one trainer "
        "(checkpoints, exact resume, PPL and bits-per-byte eval, CSV/TensorBoard logs).",
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = run(cfg)
    from modern_llm.utils.distributed import cleanup, is_main_process

    cleanup()
    if not is_main_process():
        return 0
    print(
        f"val loss {summary.get('eval/loss', float('nan')):.4f} | ppl {summary.get('eval/ppl', float('nan')):.2f}"
        f" | bpb {summary.get('eval/bpb', float('nan')):.4f} | steps {summary['step']}"
    )
    print(f"sample: {summary['sample']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
