"""The one training loop of the project. Every stage (LM pretraining, SFT, DPO, verifier, HF LoRA) hands it a
model, map-style dataset(s), a collate function and a loss function; nobody else writes a loop.

Contract
- ``loss_fn(model, batch) -> (loss, metrics)``: ``loss`` is a scalar tensor to minimise (mean over whatever
  the stage averages over); ``metrics`` maps names to floats or 0-d tensors. Return tensors, not ``.item()``
  values, to keep the hot loop free of host syncs: the trainer converts them only at log steps.
- Reserved metric keys, used by evaluation (and skipped in train-metric averages):
    * ``n_tokens``: number of target tokens ``loss`` averages over. Its presence says "loss is a per-token
      NLL in nats": eval then weights batches by it and reports ``eval/loss`` (token-weighted mean NLL) and
      ``eval/ppl = exp(eval/loss)``.
    * ``nll_sum``: exact summed NLL in nats for the batch (optional; default ``loss * n_tokens``). Return it
      when ``loss`` includes extra terms (e.g. an MoE load-balancing loss) that must not enter PPL/BPB.
    * ``n_bytes``: UTF-8 bytes of the text those target tokens encode (optional).
  Bits per byte ``eval/bpb = total_nll_nats / (ln 2 * total_bytes)`` is reported when ``n_tokens`` is given and
  the bytes are known from, in order: summed ``n_bytes`` metrics; ``eval_dataset.bytes_per_token * total
  tokens``; ``eval_dataset.n_bytes / eval_dataset.n_tokens * total tokens``.
  Other metrics are averaged over eval batches (weighted by ``n_tokens`` when present) as ``eval/<name>``.
- ``eval_fn(model) -> {name: float}`` (optional) adds task metrics (accuracy of generated answers, ...). It runs
  after the loss-based eval with the model in eval mode under ``torch.no_grad()`` and autocast.

Design choices
- Deterministic data order owned by the trainer: epoch ``e`` visits the map-style dataset in the permutation
  ``numpy.default_rng([seed, e])``, cut into full micro-batches (the last partial one is dropped so every
  step has the same shape). The data position (micro-batches consumed) is checkpointed, so resuming replays
  exactly the batches the uninterrupted run would have seen. The DataLoader gets its own torch.Generator:
  with the default one, creating a loader iterator draws from the global RNG and would shift dropout masks
  after a resume.
- Checkpoints (``utils.checkpointing``) hold weights, optimizer, scheduler, grad scaler, every RNG stream and
  the data position; together with the above, "2N steps" and "N steps + resume + N steps" give identical
  losses on CPU. Eval runs before save at a step, so the RNG state saved is the one the next step sees.
- Host syncs only at log/eval/save steps: losses and metrics accumulate as device tensors; a device-side
  "first non-finite step" marker is checked at log steps and before every save, so a NaN never reaches a
  checkpoint. A non-finite loss raises ``NonFiniteLossError`` and leaves the last good checkpoint untouched.
- AdamW with decoupled weight decay on >=2-D parameters only (matrices, embeddings), none on biases and norm
  gains; fused kernel on CUDA and CPU. LR: linear warmup then cosine (or constant) as a ``LambdaLR``.
- Only the ``nn.Module`` API is used, so Hugging Face ``PreTrainedModel``s (with or without LoRA adapters) train
  here too: the loss_fn calls the model however that model wants to be called.
- MFU = model FLOPs per token (``model.flops_per_token(seq_len)``, assumed to count forward + backward, i.e.
  ~6N + attention) x tokens/s / peak FLOP/s (``utils.hardware``); logged only when both are known.
- Distributed (``cfg.parallel`` "ddp"/"fsdp" under ``torchrun``; helpers in ``utils.distributed``):
  ``batch_size`` is per process; rank r takes slice r of each global micro-batch of ``batch_size * world``
  indices, so a step sees ``batch_size * grad_accum_steps * world`` examples, the same chunks as one process
  with ``grad_accum_steps * world`` accumulation steps. The data position counts global micro-batches.
  Logged loss/metrics are averaged over ranks and tokens summed (one all_reduce per log step); only rank 0
  writes logs and checkpoints; checkpoints hold full (gathered) weights and optimizer state in the
  single-process format plus every rank's RNG state, so they resume at any world size.

Footguns
- Datasets must be deterministic functions of the index (no global-RNG augmentation) for exact resume.
- Changing ``batch_size``, ``seed`` or the dataset between save and resume changes the data order (warned).
- With ``compile=True`` the compiled module is used for training only; eval and checkpoints use the original.
- Distributed: every rank runs eval, saves and non-finite checks (they hold collectives); under FSDP an
  ``eval_fn`` must do the same number of forward passes on every rank. The time limit is only checked at
  log steps there (the decision must be the same on every rank).
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from modern_llm.config.base import config_to_dict
from modern_llm.config.train_config import TrainConfig
from modern_llm.utils import checkpointing as ckpt_io
from modern_llm.utils import distributed as dist_utils
from modern_llm.utils.hardware import (
    autocast_context,
    describe_device,
    detect_peak_flops,
    dtype_name,
    resolve_device,
    resolve_dtype,
)
from modern_llm.utils.logging import MetricLogger

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, Any]]"]
EvalFn = Callable[[nn.Module], "dict[str, float]"]
RESERVED_KEYS = ("n_tokens", "nll_sum", "n_bytes")
STATE_FORMAT_VERSION = 1


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; ``last_checkpoint`` is the newest good checkpoint (or None)."""

    def __init__(self, step: int, last_checkpoint: Path | None):
        self.step = step
        self.last_checkpoint = last_checkpoint
        where = (
            f"the last good checkpoint {last_checkpoint} is untouched" if last_checkpoint else "no checkpoint"
        )
        super().__init__(
            f"non-finite training loss (nan/inf) at step {step}; training stopped and {where}. "
            "Lower --train.lr, keep --train.grad_clip > 0, or use --train.dtype bf16/fp32 instead of fp16, "
            "then resume from that checkpoint with --train.resume <path>."
        )


# ----------------------------------------------------------------------------------------------- pieces


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU + all GPUs)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(
    step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float, schedule: str = "cosine"
) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr_ratio``.

    Warmup reaches 1 at ``step = warmup_steps - 1`` (the first step already uses lr/warmup, never 0).
    Cosine goes from 1 at ``step = warmup_steps`` to ``min_lr_ratio`` at ``step = max_steps`` and stays there.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable params split into decayed (ndim >= 2) and non-decayed (biases, norm gains) groups."""
    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) params are yielded once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    params = param_groups(model, cfg.weight_decay)
    flat = [p for g in params for p in g["params"]]
    # The fused kernel (CUDA, and CPU since torch 2.4: faster than the per-tensor loop) needs plain
    # tensors on one device type; sharded FSDP2 DTensors keep the default implementation.
    plain = all(type(p.data) is torch.Tensor for p in flat)
    fused = plain and device.type in ("cuda", "cpu") and all(p.device.type == device.type for p in flat)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The visiting order of epoch ``epoch``: independent of everything but (seed, epoch, n)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class ResumableBatchSampler:
    """Endless stream of index batches over seeded per-epoch permutations, starting at any position.

    ``start`` counts micro-batches already consumed since epoch 0; only full batches are produced.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0):
        if n < batch_size:
            raise ValueError(
                f"train dataset has {n} examples, fewer than batch_size={batch_size}; lower --train.batch_size"
            )
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.batches_per_epoch = n // batch_size

    def position(self, consumed: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) after ``consumed`` micro-batches."""
        return divmod(consumed, self.batches_per_epoch)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, b = self.position(self.start)
        while True:
            perm = epoch_permutation(self.n, self.seed, epoch)
            for i in range(b, self.batches_per_epoch):
                yield perm[i * self.batch_size : (i + 1) * self.batch_size].tolist()
            epoch, b = epoch + 1, 0


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Recursively move tensors in dicts/lists/tuples to ``device`` (non-blocking from pinned memory)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [move_to_device(v, device) for v in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    return batch


def batch_token_count(batch: Any) -> tuple[int, int]:
    """(input tokens, sequence length) of a batch, from shapes only (no sync).

    Uses ``input_ids`` if present, else every ``*input_ids`` entry (e.g. chosen/rejected), else the first
    integer tensor found. (0, 0) when the batch has no integer tensor.
    """
    if isinstance(batch, torch.Tensor):
        return (batch.numel(), batch.shape[-1]) if batch.ndim else (0, 0)
    if isinstance(batch, dict):
        if isinstance(batch.get("input_ids"), torch.Tensor):
            return batch_token_count(batch["input_ids"])
        ids = [v for k, v in batch.items() if k.endswith("input_ids") and isinstance(v, torch.Tensor)]
        if ids:
            return sum(v.numel() for v in ids), ids[0].shape[-1]
        values = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        values = list(batch)
    else:
        return 0, 0
    for v in values:
        if isinstance(v, torch.Tensor) and not v.is_floating_point() and v.ndim:
            return batch_token_count(v)
    return 0, 0


def _as_floats(values: dict[str, Any]) -> dict[str, float]:
    """Tensors -> floats with a single host sync; Python numbers pass through."""
    keys = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in values.items() if not isinstance(v, torch.Tensor)}
    if keys:
        stacked = torch.stack([values[k].detach().float().reshape(()).cpu() for k in keys]).tolist()
        out.update(zip(keys, stacked))
    return out


def _plain_config(obj: Any) -> Any:
    """Model/run config -> YAML-safe dict (dataclass, HF PretrainedConfig or dict)."""
    if obj is None:
        return None
    if is_dataclass(obj):
        return config_to_dict(obj)
    data = obj.to_dict() if hasattr(obj, "to_dict") else obj
    if not isinstance(data, dict):
        return str(data)

    def safe(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): safe(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [safe(x) for x in v]
        return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)

    return safe(data)


class _Window:
    """Sums over the current log window, kept as device tensors until the log step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss: torch.Tensor | float = 0.0
        self.grad_norm: torch.Tensor | float = 0.0
        self.metrics: dict[str, Any] = {}
        self.micro = 0
        self.steps = 0
        self.tokens = 0
        self.seq_len = 0
        self.seconds = 0.0

    def add_micro(self, loss: torch.Tensor, metrics: dict[str, Any], tokens: int, seq_len: int) -> None:
        self.loss = self.loss + loss.detach().float()
        for k, v in metrics.items():
            if k not in RESERVED_KEYS:
                v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                self.metrics[k] = self.metrics.get(k, 0.0) + v
        self.micro += 1
        self.tokens += tokens
        self.seq_len = seq_len or self.seq_len


# ----------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Train ``model`` on ``train_dataset`` with ``loss_fn`` under ``cfg``; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset,
        loss_fn: LossFn,
        cfg: TrainConfig,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        eval_dataset: Dataset | None = None,
        eval_fn: EvalFn | None = None,
        extra_state: dict[str, Any] | None = None,
        *,
        run_config: Any = None,
        save_extra_files: Callable[[Path], None] | None = None,
    ):
        if not hasattr(train_dataset, "__len__") or not hasattr(train_dataset, "__getitem__"):
            raise ValueError("train_dataset must be map-style (define __len__ and __getitem__)")
        self.cfg = cfg
        self.model = model
        self.loss_fn = loss_fn
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.eval_fn = eval_fn
        self.collate_fn = collate_fn
        self.extra_state: dict[str, Any] = extra_state if extra_state is not None else {}
        self.save_extra_files = save_extra_files

        # distributed: join the torchrun group (no-op for parallel="none"); one device per process
        self.dist = dist_utils.init_distributed(cfg.parallel, cfg.device)
        self.device = self.dist.device if self.dist.enabled else resolve_device(cfg.device)
        self.amp_dtype = resolve_dtype(cfg.dtype, self.device)
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / ckpt_io.CHECKPOINTS_SUBDIR
        self.run_config = _plain_config(run_config) or {
            "train": config_to_dict(cfg),
            "model": _plain_config(getattr(model, "config", None)),
        }

        if not (getattr(model, "hf_device_map", None) or getattr(model, "is_quantized", False)):
            model.to(self.device)  # quantized / device-mapped HF models are placed by their loader
        # distributed: DDP wrapper, or the model sharded in place (FSDP) -- before the optimizer sees params
        self._wrapped = dist_utils.wrap_model(model, self.dist)
        self.optimizer = build_optimizer(model, cfg, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        use_scaler = self.amp_dtype is torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler) if use_scaler else None
        self._train_model: nn.Module = torch.compile(self._wrapped) if cfg.compile else self._wrapped
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]

        # distributed: the sampler yields global micro-batches (batch_size per rank x world)
        self.sampler = ResumableBatchSampler(
            len(train_dataset), cfg.batch_size * self.dist.world_size, cfg.seed
        )
        self.step = 0
        self.consumed = 0  # (global) micro-batches consumed since epoch 0 (the data position)
        self.tokens_seen = 0  # summed over ranks at log/save steps
        self._local_tokens = 0  # this rank's tokens since the last sum over ranks
        self.train_time_s = 0.0
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self.last_eval: dict[str, float] = {}
        self.last_train_log: dict[str, float] = {}
        self._peak = detect_peak_flops(self.device, self.amp_dtype, cfg.peak_flops)
        self._flops_per_token = getattr(model, "flops_per_token", None)
        self._bad_step: torch.Tensor | None = None  # device scalar: first step with a non-finite loss, or -1
        self.metric_logger: MetricLogger | None = None
        self._lr_used = 0.0

    # -------------------------------------------------------------- schedule / state

    def _lr_lambda(self, step: int) -> float:
        c = self.cfg
        return lr_factor(step, c.warmup_steps, c.max_steps, c.min_lr_ratio, c.scheduler)

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights needed to continue bit-exactly (torch.load(weights_only=True)-safe).

        Distributed: every rank must call it (it gathers); only rank 0's result holds the optimizer state.
        """
        epoch, batch_in_epoch = self.sampler.position(self.consumed)
        self._sync_token_count()
        rngs = dist_utils.gather_objects(ckpt_io.capture_rng_state(), self.dist)
        state = {
            "format_version": STATE_FORMAT_VERSION,
            "step": self.step,
            "data": {
                "consumed_micro_batches": self.consumed,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "batch_size": self.cfg.batch_size,
                "world_size": self.dist.world_size,
                "dataset_len": len(self.train_dataset),
                "seed": self.cfg.seed,
            },
            "tokens_seen": self.tokens_seen,
            "train_time_s": self.train_time_s,
            "optimizer": dist_utils.full_optimizer_state(self.model, self.optimizer, self.dist),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rngs[0],
            "config": config_to_dict(self.cfg),
            "extra": self.extra_state,
        }
        if len(rngs) > 1:
            state["rng_per_rank"] = rngs  # distributed: each rank's dropout stream resumes exactly
        return state

    def _sync_token_count(self) -> None:
        self.tokens_seen += dist_utils.sum_across_ranks(self._local_tokens, self.device, self.dist)
        self._local_tokens = 0

    def save_checkpoint(self) -> Path:
        self._raise_if_nonfinite()
        # distributed: all ranks gather (FSDP shards, RNG states); rank 0 alone writes the full checkpoint
        state = self.state_dict()
        weights = dist_utils.checkpoint_model(self.model, self.dist)
        path = self.ckpt_root / ckpt_io.checkpoint_name(self.step)
        error: BaseException | None = None
        if self.dist.is_main:
            try:
                path = ckpt_io.save_checkpoint(
                    self.ckpt_root,
                    self.step,
                    weights,
                    state,
                    self.run_config,
                    trainable_only=self.cfg.save_trainable_only,
                    extra_files=self.save_extra_files,
                    keep_last_k=self.cfg.keep_last_k,
                )
            except BaseException as err:  # re-raised below, after telling the other ranks
                error = err
        dist_utils.raise_if_rank0_failed(error, self.dist, "save a checkpoint")
        self.last_checkpoint = path
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimizer, scheduler, scaler, data position and (last) RNG from a checkpoint."""
        ckpt = ckpt_io.resolve_checkpoint(path)
        state = dist_utils.load_checkpoint(ckpt, self.model, trainable_only=self.cfg.save_trainable_only)
        try:
            dist_utils.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError, RuntimeError) as err:
            raise ckpt_io.CheckpointError(
                f"{ckpt / ckpt_io.STATE_FILE}: optimizer/scheduler state does not fit this model ({err}); "
                "was the checkpoint written with different trainable parameters?"
            ) from err
        data = state["data"]
        # distributed: the position is in global micro-batches; rescale it when batch_size x world changed
        saved_micro = int(data.get("batch_size", self.cfg.batch_size)) * int(data.get("world_size", 1))
        now_micro = self.cfg.batch_size * self.dist.world_size
        consumed, exact = dist_utils.rescale_data_position(
            int(data["consumed_micro_batches"]), len(self.train_dataset), saved_micro, now_micro
        )
        now = {"dataset_len": len(self.train_dataset), "seed": self.cfg.seed}
        changed = {k: (data.get(k), v) for k, v in now.items() if data.get(k) != v}
        if not exact:
            changed["batch_size x world_size"] = (saved_micro, now_micro)
        if changed:
            warnings.warn(
                f"resuming {ckpt} with changed {changed} (saved, now): the data order will differ from the "
                "original run",
                stacklevel=2,
            )
        self.step = int(state["step"])
        self.consumed = consumed
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.train_time_s = float(state.get("train_time_s", 0.0))
        self.extra_state.clear()
        self.extra_state.update(state.get("extra") or {})
        self._restore_rng(state)  # last: nothing after this may draw random numbers
        self.last_checkpoint = ckpt
        self.resumed_from = ckpt

    def _restore_rng(self, state: dict[str, Any]) -> None:
        per_rank = state.get("rng_per_rank") or []
        if len(per_rank) == self.dist.world_size > 1:
            ckpt_io.restore_rng_state(per_rank[self.dist.rank])
            return
        ckpt_io.restore_rng_state(state["rng"])
        if self.dist.rank > 0:  # distributed: world size changed; give each rank its own dropout stream
            seed_everything(self.cfg.seed + 1_000_003 * self.dist.rank + self.step)

    def _resume_target(self) -> Path | None:
        cfg = self.cfg
        existing = ckpt_io.latest_checkpoint(self.ckpt_root)
        if cfg.resume == "none":
            if existing is not None:
                raise ValueError(
                    f"resume='none' but {self.ckpt_root} already holds checkpoints (newest {existing.name}); "
                    "use --train.resume auto to continue, or a new --train.out_dir to start over"
                )
            return None
        if cfg.resume == "auto":
            return existing
        return ckpt_io.resolve_checkpoint(cfg.resume)

    # -------------------------------------------------------------- data

    def _train_loader(self) -> DataLoader:
        self.sampler.start = self.consumed
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.consumed)
        batches: Any = self.sampler
        if self.dist.world_size > 1:  # distributed: this rank's slice of every global micro-batch
            batches = dist_utils.RankSlicedBatches(
                self.sampler, self.dist.rank, self.dist.world_size, self.cfg.batch_size
            )
        return DataLoader(
            self.train_dataset,
            batch_sampler=batches,
            collate_fn=self.collate_fn,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=gen,
        )

    def _eval_loader(self) -> DataLoader:
        return DataLoader(
            self.eval_dataset,
            batch_size=self.cfg.batch_size,
            shuffle=False,
            collate_fn=self.collate_fn,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    # -------------------------------------------------------------- loop

    def fit(self) -> dict[str, Any]:
        """Train to ``cfg.max_steps`` (resuming per ``cfg.resume``); return a summary dict."""
        cfg = self.cfg
        target = self._resume_target()
        main = self.dist.is_main  # distributed: only rank 0 touches out_dir and the logs
        if main:
            ckpt_io.remove_stale_temp_dirs(self.ckpt_root)
        if target is not None:
            self.load_checkpoint(target)
            log.info("resumed from %s at step %d", target, self.step)
        else:  # rank 0 keeps the single-process streams; other ranks get their own dropout masks
            seed_everything(cfg.seed + 1_000_003 * self.dist.rank)
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(self.run_config, sort_keys=False))
            self.metric_logger = MetricLogger(
                self.out_dir, cfg.tensorboard, resume_step=self.step if target is not None else None
            )
            log.info(
                "training on %s (compute dtype %s), %d trainable params, step %d -> %d%s",
                describe_device(self.device),
                dtype_name(self.amp_dtype),
                sum(p.numel() for p in self._params),
                self.step,
                cfg.max_steps,
                f", {cfg.parallel} over {self.dist.world_size} processes" if self.dist.enabled else "",
            )
        stopped_early = False
        try:
            stopped_early = self._run()
        finally:
            if self.metric_logger is not None:
                self.metric_logger.close()
        return self.summary(stopped_early)

    def _run(self) -> bool:
        from tqdm.auto import tqdm

        cfg = self.cfg
        has_eval = self.eval_dataset is not None or self.eval_fn is not None
        if self.step >= cfg.max_steps:
            return False
        self._bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        window = _Window()
        batches = iter(self._train_loader())
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not (cfg.progress and self.dist.is_main),
            dynamic_ncols=True,
        )
        self._train_model.train()
        stopped_early = False
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                self._train_step(batches, window)
                dt_s = time.perf_counter() - t0
                window.seconds += dt_s
                self.train_time_s += dt_s
                bar.update(1)
                last = self.step == cfg.max_steps
                out_of_time = cfg.time_limit_s > 0 and self.train_time_s >= cfg.time_limit_s and not last
                if self.dist.world_size > 1:  # distributed: decide together, at log steps only
                    at_log = self.step % cfg.log_every == 0
                    out_of_time = at_log and dist_utils.any_rank(out_of_time, self.device, self.dist)
                if self.step % cfg.log_every == 0 or last or out_of_time:
                    self._log_train(window, bar)
                if has_eval and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                    self.evaluate(log_to_file=True)
                if (cfg.save_every and self.step % cfg.save_every == 0) or last or out_of_time:
                    self.save_checkpoint()
                if out_of_time:
                    log.info(
                        "time limit %.0f s reached at step %d; checkpoint saved", cfg.time_limit_s, self.step
                    )
                    stopped_early = True
                    break
        finally:
            bar.close()
            del batches  # shuts down DataLoader workers
        return stopped_early

    def _train_step(self, batches: Iterator[Any], window: _Window) -> None:
        cfg = self.cfg
        accum = cfg.grad_accum_steps
        step_loss: torch.Tensor | float = 0.0
        for i in range(accum):
            batch = next(batches)
            self.consumed += 1
            tokens, seq_len = batch_token_count(batch)
            batch = move_to_device(batch, self.device)
            # distributed: gradients are synced across ranks on the last micro-batch only
            with dist_utils.gradient_sync(self._wrapped, i == accum - 1):
                with autocast_context(self.device, self.amp_dtype):
                    loss, metrics = self.loss_fn(self._train_model, batch)
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            step_loss = step_loss + loss.detach().float()
            window.add_micro(loss, metrics, tokens, seq_len)
            self._local_tokens += tokens
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip > 0:
            norm = dist_utils.as_local_tensor(torch.nn.utils.clip_grad_norm_(self._params, cfg.grad_clip))
            window.grad_norm = window.grad_norm + norm.detach().float()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self._lr_used = self.optimizer.param_groups[0]["lr"]  # a Python float: no sync
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        window.steps += 1
        # Remember the first step whose loss was NaN/inf without syncing (checked at log/save steps).
        bad = ~torch.isfinite(torch.as_tensor(step_loss, device=self.device))
        self._bad_step = torch.where((self._bad_step < 0) & bad, self.step, self._bad_step)

    def _raise_if_nonfinite(self) -> None:
        if self._bad_step is None:
            return
        bad = int(dist_utils.earliest_flagged_step(self._bad_step, self.dist))  # distributed: all ranks stop
        if bad >= 0:
            raise NonFiniteLossError(bad, self.last_checkpoint)

    def _log_train(self, window: _Window, bar: Any) -> None:
        if window.steps == 0:
            return
        self._raise_if_nonfinite()
        sums = {"loss": window.loss, "grad_norm": window.grad_norm, **window.metrics}
        # distributed: one all_reduce averages the window over ranks; tokens are summed
        values = _as_floats(dist_utils.mean_across_ranks(sums, self.device, self.dist))
        window.tokens = dist_utils.sum_across_ranks(window.tokens, self.device, self.dist)
        self._sync_token_count()
        row = {"train/loss": values.pop("loss") / window.micro}
        if self.cfg.grad_clip > 0:
            row["train/grad_norm"] = values.pop("grad_norm") / window.steps
        else:
            values.pop("grad_norm")
        row.update({f"train/{k}": v / window.micro for k, v in values.items()})
        row["train/lr"] = self._lr_used  # the LR of the step just taken (group 0)
        if window.seconds > 0 and window.tokens:
            tps = window.tokens / window.seconds
            row["train/tokens_per_s"] = tps
            if self._flops_per_token is not None and self._peak:
                peak = self._peak * self.dist.world_size  # distributed: tps is global
                row["train/mfu"] = float(self._flops_per_token(window.seq_len)) * tps / peak
        row["train/tokens_seen"] = float(self.tokens_seen)
        self.last_train_log = row
        window.reset()
        if self.metric_logger is None:  # distributed: ranks > 0 do not log
            return
        self.metric_logger.log(self.step, row)
        bar.set_postfix(loss=f"{row['train/loss']:.4f}", lr=f"{row['train/lr']:.2e}", refresh=False)
        log.info("step %d %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in row.items()))

    # -------------------------------------------------------------- eval

    @torch.no_grad()
    def evaluate(self, log_to_file: bool = False) -> dict[str, float]:
        """Loss-based metrics on ``eval_dataset`` (+ ``eval_fn`` metrics), as ``eval/<name>`` floats."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = self._eval_loss() if self.eval_dataset is not None else {}
            if self.eval_fn is not None:
                with autocast_context(self.device, self.amp_dtype):
                    extra = self.eval_fn(self.model)
                out.update({k if "/" in k else f"eval/{k}": float(v) for k, v in extra.items()})
        finally:
            self.model.train(was_training)
        self.last_eval = out
        if log_to_file and out and self.metric_logger is not None:
            self.metric_logger.log(self.step, out)
            log.info("eval step %d %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in out.items()))
        return out

    def _eval_loss(self) -> dict[str, float]:
        limit = self.cfg.eval_batches or None
        sums: dict[str, Any] = {}
        weight_total: torch.Tensor | float = 0.0
        nll_total: torch.Tensor | float = 0.0
        token_weighted: bool | None = None
        n_batches = 0
        for i, batch in enumerate(self._eval_loader()):
            if limit is not None and i >= limit:
                break
            batch = move_to_device(batch, self.device)
            with autocast_context(self.device, self.amp_dtype):
                loss, metrics = self.loss_fn(self.model, batch)
            has_tokens = "n_tokens" in metrics
            if token_weighted is None:
                token_weighted = has_tokens
            elif token_weighted != has_tokens:
                raise ValueError("loss_fn returned 'n_tokens' for some eval batches but not others")
            loss = loss.detach().float()
            if has_tokens:
                weight = _as_tensor(metrics["n_tokens"], self.device)
                nll = _as_tensor(metrics["nll_sum"], self.device) if "nll_sum" in metrics else loss * weight
            else:
                weight, nll = 1.0, loss
            weight_total = weight_total + weight
            nll_total = nll_total + nll
            for k, v in metrics.items():
                if k == "n_bytes":
                    sums["n_bytes"] = sums.get("n_bytes", 0.0) + _as_tensor(v, self.device)
                elif k not in RESERVED_KEYS:
                    sums[k] = sums.get(k, 0.0) + _as_tensor(v, self.device) * weight
            n_batches += 1
        if n_batches == 0:
            raise ValueError(
                f"eval_dataset produced no batches (len={len(self.eval_dataset)}, batch_size={self.cfg.batch_size})"
            )
        values = _as_floats({"nll": nll_total, "weight": weight_total, **sums})
        mean = values.pop("nll") / values["weight"]
        out = {"eval/loss": mean}
        if token_weighted:
            out["eval/ppl"] = math.exp(mean) if mean < 700 else math.inf
            total_bytes = self._eval_bytes(values.pop("n_bytes", None), values["weight"])
            if total_bytes:
                out["eval/bpb"] = mean * values["weight"] / (math.log(2) * total_bytes)
        values.pop("n_bytes", None)
        weight = values.pop("weight")
        out.update({f"eval/{k}": v / weight for k, v in values.items()})
        return out

    def _eval_bytes(self, summed_bytes: float | None, n_tokens: float) -> float | None:
        if summed_bytes:
            return summed_bytes
        ds = self.eval_dataset
        bpt = getattr(ds, "bytes_per_token", None)
        if bpt:
            return float(bpt) * n_tokens
        n_bytes, ds_tokens = getattr(ds, "n_bytes", None), getattr(ds, "n_tokens", None)
        if n_bytes and ds_tokens:
            return float(n_bytes) / float(ds_tokens) * n_tokens
        return None

    # -------------------------------------------------------------- summary

    def summary(self, stopped_early: bool = False) -> dict[str, Any]:
        epoch, _ = self.sampler.position(self.consumed)
        return {
            "step": self.step,
            "epoch": epoch,
            "tokens_seen": self.tokens_seen,
            "train_time_s": round(self.train_time_s, 3),
            "stopped_early": stopped_early,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "device": describe_device(self.device),
            "world_size": self.dist.world_size,
            "dtype": dtype_name(self.amp_dtype),
            **self.last_train_log,
            **self.last_eval,
        }


def _as_tensor(value: Any, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float()
    return torch.tensor(float(value), device=device)
