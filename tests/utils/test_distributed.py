"""DDP / FSDP2 through the one trainer, on CPU with the gloo backend (2 processes launched by torchrun).

Claims checked
- 2 ranks x (batch 2, accumulation 2) give the same loss / grad-norm trajectory as 1 process x (batch 2,
  accumulation 4): the same global batch, chunk for chunk. Tolerance: 1e-5 relative (float reduction order
  differs: DDP/FSDP average gradients over ranks in their own order).
- A checkpoint written under DDP and under FSDP (gathered to full tensors on rank 0) loads in one plain process
  with weights bit-identical to the live ones at the end of the distributed run, and resuming from the
  mid-run checkpoint in one process continues the single-process trajectory (optimizer state, data position
  and RNG all carried over).

This file is also the torchrun worker (``python -m torch.distributed.run ... test_distributed.py --worker``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from modern_llm.config.model_config import ModernLLMConfig
from modern_llm.config.train_config import TrainConfig
from modern_llm.models.transformer import ModernDecoderLM
from modern_llm.utils import distributed as dist_utils
from modern_llm.utils.logging import read_metrics

SEQ, VOCAB, N_EXAMPLES = 16, 64, 32
STEPS, SAVE_EVERY = 4, 2  # eval runs before each save: FSDP must reshard its root after an eval forward
EVAL_N = 6
REL_TOL = 1e-5


class StridedTokens(torch.utils.data.Dataset):
    """Deterministic learnable sequences: next = (tok * 5 + 3) mod V from a per-index start."""

    def __init__(self, n: int = N_EXAMPLES):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tok, seq = (i * 7) % VOCAB, []
        for _ in range(SEQ + 1):
            seq.append(tok)
            tok = (tok * 5 + 3) % VOCAB
        x = torch.tensor(seq)
        return {"input_ids": x[:-1], "targets": x[1:]}


def lm_loss(model, batch):
    out = model(batch["input_ids"], targets=batch["targets"])
    return out.loss, {"n_tokens": batch["targets"].numel()}


def tiny_model() -> ModernDecoderLM:
    torch.manual_seed(7)
    cfg = ModernLLMConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=SEQ)
    return ModernDecoderLM(cfg)


def train_cfg(out_dir: Path, **kw) -> TrainConfig:
    base = dict(
        out_dir=str(out_dir),
        device="cpu",
        dtype="fp32",
        batch_size=2,
        grad_accum_steps=4,
        max_steps=STEPS,
        save_every=SAVE_EVERY,
        eval_every=SAVE_EVERY,
        keep_last_k=0,
        lr=1e-2,
        warmup_steps=1,
        log_every=1,
        progress=False,
        tensorboard=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters as plain CPU tensors; FSDP's DTensor shards are gathered (a collective on every rank)."""
    return {n: dist_utils.as_local_tensor(p).detach().cpu().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------------------------- worker


def worker(argv: list[str]) -> int:
    from modern_llm.training.trainer_base import Trainer

    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for parallel in ("ddp", "fsdp"):  # one launch for both keeps the test fast
        out = Path(args.out) / parallel
        cfg = train_cfg(out, parallel=parallel, grad_accum_steps=2)
        trainer = Trainer(tiny_model(), StridedTokens(), lm_loss, cfg, eval_dataset=StridedTokens(EVAL_N))
        trainer.fit()
        live = full_weights(trainer.model)
        if trainer.dist.is_main:
            torch.save(live, out / "live_weights.pt")
    ctx, cpu = trainer.dist, torch.device("cpu")
    checks = {  # rank-dependent inputs: rank 0 / rank 1
        "earliest": int(dist_utils.earliest_flagged_step(torch.tensor(-1 if ctx.rank == 0 else 3), ctx)),
        "earliest_of_two": int(
            dist_utils.earliest_flagged_step(torch.tensor(5 if ctx.rank == 0 else 3), ctx)
        ),
        "none_flagged": int(dist_utils.earliest_flagged_step(torch.tensor(-1), ctx)),
        "sum": dist_utils.sum_across_ranks(ctx.rank + 1, cpu, ctx),
        "mean": float(dist_utils.mean_across_ranks({"x": float(ctx.rank)}, cpu, ctx)["x"]),
        "any": dist_utils.any_rank(ctx.rank == 1, cpu, ctx),
    }
    if ctx.is_main:
        (Path(args.out) / "collectives.json").write_text(json.dumps(checks))
    dist_utils.cleanup()
    return 0


# ----------------------------------------------------------------------------------------------- helpers


def run_torchrun(out: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        "--worker",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def train_rows(out_dir_or_rows) -> list[dict[str, float]]:
    rows = out_dir_or_rows if isinstance(out_dir_or_rows, list) else read_metrics(out_dir_or_rows)
    return [r for r in rows if "train/loss" in r]


def eval_rows(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [r for r in rows if "eval/loss" in r]


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory) -> Path:
    """One torchrun launch (2 CPU ranks, gloo) training the same run under DDP, then FSDP."""
    out = tmp_path_factory.mktemp("torchrun")
    run_torchrun(out)
    return out


@pytest.fixture(scope="module")
def single_process_reference(tmp_path_factory) -> list[dict[str, float]]:
    from modern_llm.training.trainer_base import Trainer

    out = tmp_path_factory.mktemp("single") / "run"
    Trainer(tiny_model(), StridedTokens(), lm_loss, train_cfg(out), eval_dataset=StridedTokens(EVAL_N)).fit()
    return read_metrics(out)


def assert_same_trajectory(rows, ref, keys=("train/loss", "train/grad_norm")) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    for r, q in zip(rows, ref):
        for k in keys:
            assert r[k] == pytest.approx(q[k], rel=REL_TOL), (r["step"], k, r[k], q[k])
        assert r["train/tokens_seen"] == q["train/tokens_seen"]


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_and_checkpoints_resume_in_one_process(
    parallel, tmp_path, distributed_runs, single_process_reference
):
    from modern_llm.training.trainer_base import Trainer

    out = distributed_runs / parallel

    # 1) same global batch -> same loss trajectory (all-reduced loss logged by rank 0 only)
    rows = train_rows(out)
    assert len(rows) == STEPS
    assert rows[-1]["train/loss"] < 0.9 * rows[0]["train/loss"]  # it actually trained
    reference = train_rows(single_process_reference)
    assert_same_trajectory(rows, reference)
    evals, ref_evals = eval_rows(read_metrics(out)), eval_rows(single_process_reference)
    assert [r["step"] for r in evals] == [r["step"] for r in ref_evals] == [SAVE_EVERY, STEPS]
    for r, q in zip(evals, ref_evals):
        assert r["eval/loss"] == pytest.approx(q["eval/loss"], rel=REL_TOL)

    # 2) the final checkpoint (full tensors, single-process format) loads bit-exactly in one process
    live = torch.load(out / "live_weights.pt", weights_only=True)
    single = Trainer(tiny_model(), StridedTokens(), lm_loss, train_cfg(tmp_path / "load"))
    single.load_checkpoint(out / "checkpoints" / f"step_{STEPS:07d}")
    loaded = full_weights(single.model)
    assert loaded.keys() == live.keys()
    for name, t in live.items():
        assert torch.equal(loaded[name], t), name
    assert single.step == STEPS and single.tokens_seen == STEPS * 8 * SEQ

    # 3) resume the mid-run checkpoint in one process (batch 2 x accumulation 4): the last steps continue the
    #    single-process trajectory, so optimizer moments, LR schedule and data position were carried over
    resumed = tmp_path / "resumed"
    cfg = train_cfg(resumed, resume=str(out / "checkpoints" / f"step_{SAVE_EVERY:07d}"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(tiny_model(), StridedTokens(), lm_loss, cfg).fit()
    assert not [str(w.message) for w in caught if "data order" in str(w.message)]
    assert_same_trajectory(train_rows(resumed), reference[SAVE_EVERY:])


def test_collectives_across_two_ranks(distributed_runs):
    checks = json.loads((distributed_runs / "collectives.json").read_text())
    assert checks == {
        "earliest": 3,
        "earliest_of_two": 3,
        "none_flagged": -1,
        "sum": 3,
        "mean": 0.5,
        "any": True,
    }


def test_rank_slices_partition_the_single_process_batches():
    from modern_llm.training.trainer_base import ResumableBatchSampler

    world, per_rank = 2, 3
    global_batches = ResumableBatchSampler(30, per_rank * world, seed=5)
    single = ResumableBatchSampler(30, per_rank, seed=5)
    ranks = [iter(dist_utils.RankSlicedBatches(global_batches, r, world, per_rank)) for r in range(world)]
    single_it = iter(single)
    for _ in range(12):  # > one epoch of 5 global micro-batches
        for r in range(world):
            assert next(ranks[r]) == next(single_it)
    with pytest.raises(ValueError, match="rank 2"):
        dist_utils.RankSlicedBatches(global_batches, 2, world, per_rank)


@pytest.mark.parametrize(
    "consumed, n, saved, now, expected",
    [
        (6, 32, 4, 2, (12, True)),  # 2 ranks x 2 -> 1 process x 2: twice as many micro-batches
        (12, 32, 2, 4, (6, True)),
        (11, 32, 2, 4, (5, False)),  # odd offset: cannot split a micro-batch
        (8, 30, 4, 2, (17, False)),  # epoch 1, 4 examples in; epochs keep 28 vs 30 examples
        (5, 32, 4, 4, (5, True)),
    ],
)
def test_rescale_data_position(consumed, n, saved, now, expected):
    assert dist_utils.rescale_data_position(consumed, n, saved, now) == expected


def test_transformer_blocks_found_for_ours_and_hf():
    from modern_llm.models.hf_convert import to_hf_model

    ours = tiny_model()
    assert dist_utils.transformer_blocks(ours) == list(ours.blocks)
    hf = to_hf_model(ours)
    assert dist_utils.transformer_blocks(hf) == list(hf.model.layers)


def test_init_rules_without_and_with_torchrun_env(monkeypatch, caplog):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert dist_utils.init_distributed("none") == dist_utils.DistContext()
    with caplog.at_level("WARNING"):
        ctx = dist_utils.init_distributed("ddp", "cpu")
    assert not ctx.enabled and "torchrun" in caplog.text
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_utils.env_rank_world() == (1, 2, 1)
    with pytest.raises(ValueError, match="parallel='none'"):
        dist_utils.init_distributed("none")
    with pytest.raises(ValueError, match="parallel must be"):
        dist_utils.init_distributed("zero3")


def test_reductions_are_identity_in_one_process():
    ctx, cpu = dist_utils.DistContext(), torch.device("cpu")
    assert dist_utils.sum_across_ranks(7, cpu, ctx) == 7
    assert dist_utils.mean_across_ranks({"loss": 2.5}, cpu, ctx) == {"loss": 2.5}
    assert int(dist_utils.earliest_flagged_step(torch.tensor(-1), ctx)) == -1
    assert dist_utils.gather_objects({"a": 1}, ctx) == [{"a": 1}]
    assert dist_utils.any_rank(True, cpu, ctx) is True
    assert (dist_utils.get_rank(), dist_utils.get_world_size(), dist_utils.is_main_process()) == (0, 1, True)


def test_train_config_parallel_validation():
    assert TrainConfig(parallel="fsdp").parallel == "fsdp"
    with pytest.raises(ValueError, match="parallel"):
        TrainConfig(parallel="tp")
    with pytest.raises(ValueError, match="fp16"):
        TrainConfig(parallel="fsdp", dtype="fp16")


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
