"""Multi-GPU / multi-node training with PyTorch's own engine: ``torchrun`` + DDP or FSDP2 (``fully_shard``).

The trainer (``training.trainer_base.Trainer``) calls these helpers; every stage built on it (train-lm, SFT,
DPO, verifier) therefore scales out with ``--train.parallel ddp|fsdp`` and a ``torchrun`` launch, and runs
unchanged in a single process (all helpers are no-ops when ``world_size == 1``).

Design choices
- Process-group setup comes only from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``/``MASTER_PORT``): backend ``nccl`` on CUDA (one GPU per process, ``cuda:LOCAL_RANK``),
  ``gloo`` on CPU. ``parallel != "none"`` without torchrun falls back to one plain process (with a warning);
  torchrun with ``WORLD_SIZE > 1`` but ``parallel == "none"`` is an error (N copies would race on one out_dir).
- Batch semantics: ``batch_size`` is the micro-batch size *per process*. One global micro-batch is
  ``batch_size * world_size`` consecutive indices of the trainer's seeded epoch permutation; rank r takes
  slice r (``RankSlicedBatches``). An optimizer step sees ``batch_size * grad_accum_steps * world_size``
  examples, exactly the chunks a single process with the same ``batch_size`` and
  ``grad_accum_steps * world_size`` would see, so both runs compute the same mean of per-chunk mean losses
  (DDP/FSDP average gradients over ranks like accumulation averages over micro-batches).
- DDP keeps a full replica per rank; FSDP2 shards every transformer block (the largest ``nn.ModuleList`` of
  identical modules, e.g. ``blocks`` or HF ``model.layers``) and then the root (embeddings, final norm, tied
  head). Parameters stay fp32; the trainer's autocast supplies mixed precision on both paths.
- Checkpoints are always *full, unsharded* state dicts in the single-process format: DDP saves rank 0's
  replica; FSDP gathers weights and optimizer state (``torch.distributed.checkpoint.state_dict`` with
  ``full_state_dict=True, cpu_offload=True``) onto rank 0, which writes them. So a checkpoint from any
  world size resumes in one process (or another world size) and loads with plain safetensors.
- Logged numbers are global: per-rank loss/metric sums are averaged over ranks with one ``all_reduce`` at
  log steps (never per micro-batch); tokens are summed.

Footguns
- Every rank must reach every collective: eval, checkpoint saves and non-finite checks are run by all ranks.
  Under FSDP the eval forward passes gather shards, so ``eval_fn`` must run the same number of forwards on
  every rank (no rank-dependent early stopping of generation).
- Multi-node resume assumes a shared filesystem: every rank reads the checkpoint rank 0 wrote.
- DDP requires every trainable parameter to receive a gradient each step (no ``find_unused_parameters``).
- FSDP2 needs the same initial weights on every rank before sharding; ``wrap_model`` broadcasts rank 0's.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

PARALLEL_MODES = ("none", "ddp", "fsdp")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. ``parallel`` is the effective mode ("none" in one process)."""

    parallel: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def enabled(self) -> bool:
        return self.parallel != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ----------------------------------------------------------------------------------------------- setup


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in _TORCHRUN_VARS)


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    if not launched_by_torchrun():
        return 0, 1, 0
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    except ValueError as err:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers (set by torchrun): {err}") from err


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else env_rank_world()[0]


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def _distributed_device(device_pref: str, local_rank: int) -> torch.device:
    """One accelerator per process: ``cuda:LOCAL_RANK`` (for "auto"/"cuda"), or CPU."""
    if device_pref == "cpu" or (device_pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device={device_pref!r} but no CUDA device is visible; use --train.device cpu")
    if device_pref.startswith("cuda:"):
        raise ValueError(
            f"device={device_pref!r} pins one GPU, but under torchrun each process takes cuda:LOCAL_RANK; "
            "use --train.device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
            "lower torchrun's --nproc_per_node"
        )
    return torch.device("cuda", local_rank)


def init_distributed(
    parallel: str = "ddp", device_pref: str = "auto", timeout_s: float = 1800.0
) -> DistContext:
    """Join (or reuse) the torchrun process group and pick this rank's device; see the module docstring.

    Returns ``DistContext(parallel="none")`` for a plain single process (no torchrun).
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    rank, world, local_rank = env_rank_world()
    if parallel == "none":
        if world > 1:
            raise ValueError(
                f"launched by torchrun with WORLD_SIZE={world} but train.parallel='none': every process would "
                "train its own copy into the same out_dir; use --train.parallel ddp (or fsdp)"
            )
        return DistContext()
    if not launched_by_torchrun():
        log.warning(
            "train.parallel=%r but not launched by torchrun (no RANK/WORLD_SIZE/LOCAL_RANK); running as one "
            "plain process. Launch with: torchrun --nproc_per_node N <command>",
            parallel,
        )
        return DistContext()
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed; use --train.parallel none")
    device = _distributed_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before any NCCL call: collectives run on the current device
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": dt.timedelta(seconds=timeout_s)}
        if device.type == "cuda":
            kwargs["device_id"] = device  # binds NCCL to this GPU eagerly (no guessing in barrier())
        dist.init_process_group(**kwargs)
    return DistContext(parallel, dist.get_rank(), dist.get_world_size(), local_rank, device)


def cleanup() -> None:
    """Destroy the process group (call once at the very end of a torchrun script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


# ----------------------------------------------------------------------------------------------- wrapping


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the ModuleList of same-class modules holding most params."""
    best: list[nn.Module] = []
    best_params = 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        n = sum(p.numel() for p in module.parameters())
        if n > best_params:
            best, best_params = list(module), n
    return best


def _broadcast_from_rank0(model: nn.Module) -> None:
    """Make every rank start from rank 0's weights (FSDP2, unlike DDP, does not do it)."""
    with torch.no_grad():
        for t in itertools.chain(model.parameters(), model.buffers()):
            dist.broadcast(t.data, src=0)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Return the module to train: ``model`` itself ("none"), a DDP wrapper, or ``model`` sharded in place.

    ``model`` must already be on ``ctx.device``. Under FSDP the returned object *is* ``model`` (fully_shard
    changes its class and turns its parameters into DTensors), so build the optimizer after this call.
    """
    if not ctx.enabled:
        return model
    if getattr(model, "hf_device_map", None) or getattr(model, "is_quantized", False):
        raise ValueError(
            "DDP/FSDP need a plain model on one device; this one is device-mapped or quantized "
            "(QLoRA). Use --train.parallel none, or load it without device_map/4-bit"
        )
    if ctx.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [ctx.device.index] if ctx.device is not None and ctx.device.type == "cuda" else None
        return DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _broadcast_from_rank0(model)
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    blocks = transformer_blocks(model)
    if not blocks:
        log.warning("FSDP: no repeated blocks found; sharding the whole model as one unit")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce/reduce-scatter on accumulation micro-batches that are not the last.

    Correctness never depends on it (gradients are synced on the last micro-batch either way); it only saves
    communication. ``model`` is the DDP wrapper or the FSDP-sharded module (not the compiled one).
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP) and not enabled:
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# ----------------------------------------------------------------------------------------------- data


def rescale_data_position(consumed: int, n: int, saved_micro: int, now_micro: int) -> tuple[int, bool]:
    """Convert a data position counted in micro-batches of ``saved_micro`` examples into ``now_micro`` ones.

    Returns (position, exact). Exact means the resumed run visits the same examples in the same order as the
    original would have: the example offset inside the epoch is a multiple of the new micro-batch and both
    micro-batch sizes drop the same epoch tail (e.g. 2 ranks x 2 -> 1 process x 4 with a dataset of 4k).
    Otherwise the position is rounded down to a whole new micro-batch of the same epoch.
    """
    if saved_micro == now_micro:
        return consumed, True
    saved_per_epoch, now_per_epoch = n // saved_micro, n // now_micro
    if saved_per_epoch == 0 or now_per_epoch == 0:
        return consumed, False
    epoch, batch = divmod(consumed, saved_per_epoch)
    offset = batch * saved_micro  # examples already taken from this epoch's permutation
    exact = offset % now_micro == 0 and saved_per_epoch * saved_micro == now_per_epoch * now_micro
    return epoch * now_per_epoch + min(offset // now_micro, now_per_epoch), exact


class RankSlicedBatches:
    """This rank's share of each global micro-batch: slice ``rank`` of ``per_rank`` indices.

    ``batches`` yields global micro-batches of ``per_rank * world_size`` indices (the trainer's seeded
    sampler), so all ranks together consume exactly what one process with that batch size would.
    """

    def __init__(self, batches: Iterable[list[int]], rank: int, world_size: int, per_rank: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.batches, self.rank, self.world_size, self.per_rank = batches, rank, world_size, per_rank

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.rank * self.per_rank
        for batch in self.batches:
            if len(batch) != self.per_rank * self.world_size:
                raise ValueError(
                    f"global micro-batch of {len(batch)} indices cannot be split into {self.world_size} "
                    f"slices of {self.per_rank}"
                )
            yield batch[lo : lo + self.per_rank]


# ----------------------------------------------------------------------------------------------- reductions


def as_local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (e.g. FSDP's grad norm) as a plain tensor; other tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def mean_across_ranks(values: dict[str, Any], device: torch.device, ctx: DistContext) -> dict[str, Any]:
    """Average every value over ranks with one all_reduce (keys must match on all ranks)."""
    if not ctx.enabled or ctx.world_size == 1:
        return values
    keys = sorted(values)
    stacked = torch.stack(
        [torch.as_tensor(values[k], dtype=torch.float32, device=device).reshape(()) for k in keys]
    )
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    stacked /= ctx.world_size
    return dict(zip(keys, stacked.unbind()))


def sum_across_ranks(value: int, device: torch.device, ctx: DistContext) -> int:
    """Integer sum over ranks (token counts); int64 so large counts stay exact."""
    if not ctx.enabled or ctx.world_size == 1:
        return value
    t = torch.tensor(value, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t)


def max_across_ranks(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if not ctx.enabled or ctx.world_size == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def earliest_flagged_step(step: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The smallest non-negative value over ranks, or -1 when every rank holds -1 ("no bad step")."""
    if not ctx.enabled or ctx.world_size == 1:
        return step
    never = torch.iinfo(torch.int64).max
    t = torch.where(step < 0, torch.full_like(step, never), step).to(torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return torch.where(t == never, torch.full_like(t, -1), t)


def any_rank(flag: bool, device: torch.device, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is True on at least one (keeps control flow in lockstep)."""
    if not ctx.enabled or ctx.world_size == 1:
        return flag
    return bool(max_across_ranks(torch.tensor(int(flag), device=device), ctx))


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled; small objects only, e.g. RNG states)."""
    if not ctx.enabled or ctx.world_size == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def raise_if_rank0_failed(error: BaseException | None, ctx: DistContext, what: str) -> None:
    """Rank 0 did ``what`` alone; tell every rank whether it worked so none waits forever on a dead peer."""
    if not ctx.enabled or ctx.world_size == 1:
        if error is not None:
            raise error
        return
    failed = torch.tensor(int(error is not None), device=ctx.device)
    dist.broadcast(failed, src=0)
    if error is not None:
        raise error
    if int(failed):
        raise RuntimeError(f"rank 0 failed to {what}; see its traceback")


# ----------------------------------------------------------------------------------------------- full state


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Return every FSDP unit to its sharded state.

    FSDP2 keeps the root unit's parameters unsharded after a forward pass (the backward would gather them
    again at once); after an eval forward with no backward they stay unsharded, and the module then exposes
    plain tensors instead of the DTensors the optimizer holds -- state-dict helpers must reshard first.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _tied_duplicates(model: nn.Module) -> dict[str, str]:
    """{alias name: first name} for parameters registered under several names (tied embeddings)."""
    first: dict[int, str] = {}
    dup: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            dup[name] = first[id(p)]
        else:
            first[id(p)] = name
    return dup


class GatheredWeights(nn.Module):
    """Rank 0's gathered full weights, shaped like the model for ``checkpointing.save_checkpoint``.

    That function reads a model only through ``state_dict()`` and ``named_parameters()``; this stand-in
    answers both from the gathered tensors, so a sharded model is saved in the single-process format.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], trainable: set[str]):
        super().__init__()
        self._tensors = tensors
        self._trainable = trainable

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return dict(self._tensors)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:  # type: ignore[override]
        for name, t in self._tensors.items():
            yield name, nn.Parameter(t, requires_grad=name in self._trainable)


def checkpoint_model(model: nn.Module, ctx: DistContext) -> nn.Module | None:
    """What to hand to ``save_checkpoint`` on rank 0 (None on other ranks). Collective under FSDP."""
    if not _is_fsdp(model):
        return model if ctx.is_main else None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    reshard(model)
    tensors = get_model_state_dict(model, options=_full_options())  # full on rank 0, {} elsewhere
    if not ctx.is_main:
        return None
    for alias in _tied_duplicates(model):  # keep one copy of tied weights, as the single-process save does
        tensors.pop(alias, None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return GatheredWeights(tensors, trainable)


def _param_names_in_optimizer_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in name_of:
                raise ValueError("the optimizer holds a parameter that is not in the model")
            names.append(name_of[id(p)])
    return names


def _rekey_optimizer_state(state: dict[str, Any], mapping: dict[Any, Any]) -> dict[str, Any]:
    return {
        "state": {mapping[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [mapping[p] for p in g["params"]]} for g in state["param_groups"]],
    }


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict | None:
    """The optimizer state in ``torch.optim`` format (integer keys) on rank 0; None on other ranks.

    Collective under FSDP (gathers the sharded moments); DDP's replicas already hold the full state.
    """
    if not _is_fsdp(model):
        return optimizer.state_dict() if ctx.is_main else None
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    reshard(model)
    by_name = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not ctx.is_main:
        return None
    names = _param_names_in_optimizer_order(model, optimizer)
    return _rekey_optimizer_state(by_name, {n: i for i, n in enumerate(names)})


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a ``torch.optim``-format state (from any world size) into a plain, DDP or FSDP optimizer."""
    if not _is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    reshard(model)
    names = _param_names_in_optimizer_order(model, optimizer)
    n_saved = sum(len(g["params"]) for g in state["param_groups"])
    if n_saved != len(names):
        raise ValueError(f"optimizer state has {n_saved} parameters, the model {len(names)}")
    by_name = _rekey_optimizer_state(state, dict(enumerate(names)))
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def load_checkpoint(ckpt: str | Path, model: nn.Module, *, trainable_only: bool = False) -> dict[str, Any]:
    """``checkpointing.load_checkpoint`` that also fills FSDP-sharded models; returns the trainer state."""
    from modern_llm.utils import checkpointing as ckpt_io

    if not _is_fsdp(model):
        return ckpt_io.load_checkpoint(ckpt, model, trainable_only=trainable_only)
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt}")
    state = ckpt_io.load_trainer_state(ckpt)  # validated before the model is touched
    weights = ckpt / ckpt_io.MODEL_FILE
    if not weights.is_file():
        raise ckpt_io.CheckpointError(f"{weights}: missing; the checkpoint is incomplete")
    load_full_model_state(model, weights, trainable_only=trainable_only)
    return state


def load_full_model_state(model: nn.Module, file: str | Path, trainable_only: bool = False) -> None:
    """Load a full ``model.safetensors`` into an FSDP-sharded model (each rank keeps its shard).

    Names are checked like ``checkpointing.load_model_weights``: tied aliases may be absent from the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from modern_llm.utils.checkpointing import CheckpointError

    file = Path(file)
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"{file}: cannot read the weights ({err}); the file is truncated or corrupted"
        ) from err
    for alias, first in _tied_duplicates(model).items():
        if alias not in tensors and first in tensors:
            tensors[alias] = tensors[first]
        elif first not in tensors and alias in tensors:
            tensors[first] = tensors[alias]
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = (
        {n for n, p in params.items() if p.requires_grad} if trainable_only else set(model.state_dict())
    )
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - set(model.state_dict()))
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "was it saved from a different architecture/config?"
        )
    reshard(model)
    options = StateDictOptions(full_state_dict=True, strict=not trainable_only)
    set_model_state_dict(model, tensors, options=options)
