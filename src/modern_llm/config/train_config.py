"""TrainConfig: every knob of the one training loop (``modern_llm.training.trainer_base.Trainer``).

Design choices
- Steps, not epochs: ``max_steps`` optimizer steps of ``batch_size * grad_accum_steps`` examples each. The data
  order is a seeded per-epoch permutation owned by the trainer, so runs are reproducible and resumable.
- The LR schedule is a pure function of the optimizer step (linear warmup, then cosine to
  ``lr * min_lr_ratio``, or constant), so resuming with the same config reproduces it exactly.
- ``0`` disables periodic things (``eval_every``, ``save_every``, ``grad_clip``, ``keep_last_k`` = keep all,
  ``eval_batches`` = whole eval set, ``time_limit_s`` = no limit). A final checkpoint is always written.
- ``resume``: "auto" continues from the newest checkpoint in ``out_dir`` if there is one; "none" starts fresh
  and refuses to run over existing checkpoints (nothing gets silently overwritten); any other value is a path
  to a checkpoint folder (or a run folder, meaning its newest checkpoint).

Footguns
- ``dtype="fp16"`` needs CUDA (loss scaling); "auto" = bf16 on a bf16-capable GPU, fp32 otherwise.
- ``warmup_steps`` must be <= ``max_steps``; when equal, the run is warmup only (no cosine phase).
- ``parallel`` ("ddp"/"fsdp") takes effect only under ``torchrun``; ``batch_size`` is then *per process*,
  so one optimizer step sees ``batch_size * grad_accum_steps * world_size`` examples (see
  ``modern_llm.utils.distributed``). fp16 loss scaling is not supported with FSDP (use bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

_RESUME_KEYWORDS = ("auto", "none")


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast compute dtype; weights stay fp32
    batch_size: int = 8  # examples per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    warmup_steps: int = 100
    weight_decay: float = 0.1  # decoupled (AdamW), applied to >=2-D parameters only
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    optimizer: Literal["adamw"] = "adamw"  # fused kernel when every parameter is on CUDA
    scheduler: Literal["cosine", "constant"] = "cosine"  # both after linear warmup
    eval_every: int = 0  # optimizer steps between evals; 0 = only at the end (if an eval set/fn is given)
    eval_batches: int = 0  # micro-batches per eval; 0 = the whole eval set
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only the final one
    keep_last_k: int = 3  # checkpoints kept on disk; 0 = keep all
    log_every: int = 10  # optimizer steps between metric logs (the only host syncs in the hot loop)
    compile: bool = False  # torch.compile the model for training
    num_workers: int = 0  # DataLoader worker processes
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = True  # also write TensorBoard events under out_dir/tb
    peak_flops: float | None = None  # accelerator peak FLOP/s for MFU; None = detect from the GPU name
    resume: str = "auto"  # "auto" | "none" | path to a checkpoint (or run) folder
    time_limit_s: float = 0.0  # stop cleanly (with a checkpoint) after this much training time; 0 = none
    save_trainable_only: bool = False  # checkpoints hold only requires_grad params (LoRA adapters)
    # distributed (torchrun): "ddp" = replica per process, "fsdp" = FSDP2 sharding; batch_size is per process
    parallel: Literal["none", "ddp", "fsdp"] = "none"

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(
            bool(str(self.out_dir).strip()), "out_dir must be a non-empty path, e.g. --train.out_dir runs/lm"
        )
        self.out_dir = str(self.out_dir)
        need(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}",
        )
        need(
            self.dtype in ("auto", "fp32", "bf16", "fp16"),
            f"dtype must be one of auto/fp32/bf16/fp16, got {self.dtype!r}",
        )
        for name in ("batch_size", "grad_accum_steps", "max_steps"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "warmup_steps",
            "eval_every",
            "eval_batches",
            "save_every",
            "keep_last_k",
            "num_workers",
            "seed",
        ):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(
            self.warmup_steps <= self.max_steps,
            f"warmup_steps ({self.warmup_steps}) must be <= max_steps ({self.max_steps}); lower warmup_steps",
        )
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        need(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"betas must be two numbers in [0, 1), e.g. --train.betas 0.9,0.95; got {self.betas}",
        )
        need(self.eps > 0, f"eps must be > 0, got {self.eps}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        need(self.optimizer == "adamw", f"optimizer must be 'adamw', got {self.optimizer!r}")
        need(
            self.scheduler in ("cosine", "constant"),
            f"scheduler must be 'cosine' or 'constant', got {self.scheduler!r}",
        )
        need(
            self.peak_flops is None or self.peak_flops > 0,
            f"peak_flops must be > 0 FLOP/s (e.g. 989e12) or unset, got {self.peak_flops}",
        )
        need(
            bool(str(self.resume).strip()),
            "resume must be 'auto', 'none' or a checkpoint path, got an empty string",
        )
        need(self.time_limit_s >= 0, f"time_limit_s must be >= 0 (0 = no limit), got {self.time_limit_s}")
        need(
            self.parallel in ("none", "ddp", "fsdp"),
            f"parallel must be 'none', 'ddp' or 'fsdp' (launch with torchrun), got {self.parallel!r}",
        )
        need(
            not (self.parallel == "fsdp" and self.dtype == "fp16"),
            "dtype='fp16' with parallel='fsdp' is not supported (no sharded loss scaling); use --train.dtype bf16",
        )

    @property
    def resume_path(self) -> str | None:
        """The explicit checkpoint path in ``resume``, or None for the keywords "auto"/"none"."""
        return None if self.resume in _RESUME_KEYWORDS else self.resume
