"""The one training loop, exercised with a tiny tied-embedding LM on a learnable synthetic token stream."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modern_llm.config.base import apply_overrides, config_from_dict
from modern_llm.config.train_config import TrainConfig
from modern_llm.training.trainer_base import (
    NonFiniteLossError,
    ResumableBatchSampler,
    Trainer,
    batch_token_count,
    epoch_permutation,
    lr_factor,
)
from modern_llm.utils import checkpointing as ckpt_io
from modern_llm.utils.hardware import detect_peak_flops, peak_flops_for_name
from modern_llm.utils.logging import read_metrics

VOCAB, SEQ = 32, 12


@dataclass
class ToyConfig:
    vocab_size: int = VOCAB
    d_model: int = 16
    dropout: float = 0.0


class ToyLM(nn.Module):
    """Embedding -> LayerNorm -> dropout -> tied output head: a bigram model with 1-D and 2-D params."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.config = ToyConfig(dropout=dropout)
        self.emb = nn.Embedding(VOCAB, 16)
        self.norm = nn.LayerNorm(16)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(16, VOCAB, bias=False)
        self.head.weight = self.emb.weight  # tied, like ModernDecoderLM

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.norm(self.emb(ids))))  # (B, T, V)

    def flops_per_token(self, seq_len: int) -> float:
        return 6.0 * sum(p.numel() for p in self.parameters())


class BigramStream(torch.utils.data.Dataset):
    """Blocks following next = (3 * tok + 1) mod V from a per-index random start: learnable, deterministic."""

    def __init__(self, n: int, offset: int = 0, bytes_per_token: float | None = None):
        self.n, self.offset = n, offset
        if bytes_per_token is not None:
            self.bytes_per_token = bytes_per_token

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + self.offset + i)
        tok = int(torch.randint(VOCAB, (), generator=g))
        seq = []
        for _ in range(SEQ + 1):
            seq.append(tok)
            tok = (3 * tok + 1) % VOCAB
        x = torch.tensor(seq)
        return {"input_ids": x[:-1], "targets": x[1:]}


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]):
    logits = model(batch["input_ids"])
    targets = batch["targets"]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    acc = (logits.argmax(-1) == targets).float().mean()
    return loss, {"n_tokens": targets.numel(), "acc": acc}


def make_cfg(tmp_path, name: str = "run", **kw) -> TrainConfig:
    base = dict(
        out_dir=str(tmp_path / name),
        device="cpu",
        dtype="fp32",
        batch_size=4,
        max_steps=8,
        lr=1e-2,
        warmup_steps=2,
        log_every=1,
        progress=False,
        tensorboard=False,
        keep_last_k=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def fresh_model(dropout: float = 0.0) -> ToyLM:
    torch.manual_seed(123)
    return ToyLM(dropout)


# ----------------------------------------------------------------------------------------------- training


def test_loss_decreases_and_eval_metrics_match_reference(tmp_path):
    train, evalset = BigramStream(64), BigramStream(10, offset=500, bytes_per_token=2.5)
    cfg = make_cfg(
        tmp_path, max_steps=40, log_every=5, eval_every=20, lr=3e-2, peak_flops=1e12, tensorboard=True
    )
    trainer = Trainer(fresh_model(), train, lm_loss, cfg, eval_dataset=evalset)
    summary = trainer.fit()

    rows = [r for r in read_metrics(cfg.out_dir) if "train/loss" in r]
    assert rows[0]["train/loss"] > 2.0 and rows[-1]["train/loss"] < 0.5 * rows[0]["train/loss"]
    assert {"train/lr", "train/tokens_per_s", "train/grad_norm", "train/acc", "train/mfu"} <= set(rows[-1])
    assert rows[-1]["train/tokens_seen"] == 40 * 4 * SEQ
    n_params = sum(p.numel() for p in trainer.model.parameters())
    assert rows[-1]["train/mfu"] == pytest.approx(6 * n_params * rows[-1]["train/tokens_per_s"] / 1e12)

    # Reference: token-weighted CE over the *whole* eval set (10 examples -> batches of 4, 4, 2).
    model = trainer.model.eval()
    with torch.no_grad():
        items = [evalset[i] for i in range(len(evalset))]
        logits = model(torch.stack([b["input_ids"] for b in items]))
        ref = F.cross_entropy(
            logits.flatten(0, 1), torch.stack([b["targets"] for b in items]).flatten()
        ).item()
    assert summary["eval/loss"] == pytest.approx(ref, rel=1e-5)
    assert summary["eval/ppl"] == pytest.approx(math.exp(ref), rel=1e-5)
    assert summary["eval/bpb"] == pytest.approx(ref / (math.log(2) * 2.5), rel=1e-5)
    assert summary["step"] == 40 and summary["checkpoint"].endswith("step_0000040")
    eval_rows = [r for r in read_metrics(cfg.out_dir) if "eval/loss" in r]
    assert [r["step"] for r in eval_rows] == [20, 40]
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def test_bpb_from_loss_fn_bytes_and_nll_sum(tmp_path):
    """n_bytes/nll_sum returned by the loss_fn take precedence over the dataset's bytes_per_token."""

    def loss_with_extra_term(model, batch):
        loss, m = lm_loss(model, batch)
        m["nll_sum"] = loss.detach() * m["n_tokens"]
        m["n_bytes"] = 3 * m["n_tokens"]
        return loss + 1.0, m  # the +1 (think: MoE aux loss) must not leak into ppl/bpb

    evalset = BigramStream(8, offset=500, bytes_per_token=100.0)
    trainer = Trainer(
        fresh_model(), BigramStream(8), loss_with_extra_term, make_cfg(tmp_path), eval_dataset=evalset
    )
    out = trainer.evaluate()
    plain = Trainer(fresh_model(), BigramStream(8), lm_loss, make_cfg(tmp_path, "b"), eval_dataset=evalset)
    ref = plain.evaluate()["eval/loss"]
    assert out["eval/loss"] == pytest.approx(ref, rel=1e-6)
    assert out["eval/bpb"] == pytest.approx(ref / (math.log(2) * 3), rel=1e-6)


def test_eval_without_token_counts_reports_mean_loss_only(tmp_path):
    def bce_like(model, batch):
        loss, m = lm_loss(model, batch)
        return loss, {"acc": m["acc"]}

    trainer = Trainer(
        fresh_model(),
        BigramStream(8),
        bce_like,
        make_cfg(tmp_path),
        eval_dataset=BigramStream(8, offset=9),
        eval_fn=lambda model: {"answer_acc": 0.25},
    )
    out = trainer.evaluate()
    assert set(out) == {"eval/loss", "eval/acc", "eval/answer_acc"}
    assert out["eval/answer_acc"] == 0.25


def test_resume_gives_identical_losses_with_dropout_and_accumulation(tmp_path):
    """2N straight steps == N steps, crash, resume, N steps: exact equality of every micro-batch loss."""
    data = BigramStream(22)  # 5 micro-batches per epoch: the run crosses epochs
    common = dict(max_steps=8, grad_accum_steps=2, save_every=4, log_every=2, lr=2e-2)

    straight: list[float] = []

    def recording_loss(log):
        def fn(model, batch):
            loss, m = lm_loss(model, batch)
            if model.training:
                log.append(loss.item())
            return loss, m

        return fn

    a = Trainer(fresh_model(0.2), data, recording_loss(straight), make_cfg(tmp_path, "a", **common))
    a.fit()

    interrupted: list[float] = []
    calls = {"n": 0}

    def crashing_loss(model, batch):
        if model.training:
            calls["n"] += 1
            if calls["n"] > 4 * 2 + 1:  # crash mid-way through step 5 (after the step-4 checkpoint)
                raise KeyboardInterrupt
        return recording_loss(interrupted)(model, batch)

    cfg_b = make_cfg(tmp_path, "b", **common)
    with pytest.raises(KeyboardInterrupt):
        Trainer(fresh_model(0.2), data, crashing_loss, cfg_b).fit()
    assert [s for s, _ in ckpt_io.list_checkpoints(tmp_path / "b" / "checkpoints")] == [4]

    resumed: list[float] = []
    torch.manual_seed(999)  # a different global RNG state before resuming must not matter
    b = Trainer(fresh_model(0.2), data, recording_loss(resumed), cfg_b)
    summary = b.fit()
    assert summary["resumed_from"].endswith("step_0000004")
    assert interrupted[:8] + resumed == straight
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name
    # The resumed log equals the straight one (rows past step 4 from the crashed attempt were dropped).
    strip = ("train/tokens_per_s", "train/mfu")
    rows_a = [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(tmp_path / "a")]
    rows_b = [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(tmp_path / "b")]
    assert rows_a == rows_b


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def exploding_loss(model, batch):
        loss, m = lm_loss(model, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), m

    # Logs are rare, so the NaN at step 3 is caught by the check before the step-4 save.
    cfg = make_cfg(tmp_path, save_every=2, log_every=100)
    with pytest.raises(NonFiniteLossError, match="step 3") as err:
        Trainer(fresh_model(), BigramStream(16), exploding_loss, cfg).fit()
    assert err.value.step == 3
    root = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in ckpt_io.list_checkpoints(root)] == [2]
    assert str(root / "step_0000002") in str(err.value)
    good = fresh_model()
    state = ckpt_io.load_checkpoint(root / "step_0000002", good)
    assert state["step"] == 2
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_corrupted_latest_checkpoint_is_reported_and_nothing_is_overwritten(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=4, save_every=2)
    Trainer(fresh_model(), BigramStream(16), lm_loss, cfg).fit()
    root = tmp_path / "run" / "checkpoints"
    bad = root / "step_0000004" / "trainer_state.pt"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    before = {
        p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "run").rglob("*") if p.is_file()
    }

    more = make_cfg(tmp_path, max_steps=6, save_every=2)
    with pytest.raises(ckpt_io.CheckpointError) as err:
        Trainer(fresh_model(), BigramStream(16), lm_loss, more).fit()
    msg = str(err.value)
    assert "step_0000004/trainer_state.pt" in msg and "step_0000002" in msg and "--train.resume" in msg
    after = {
        p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "run").rglob("*") if p.is_file()
    }
    assert after == before

    # Following the advice works: resume from the previous checkpoint explicitly.
    ok = make_cfg(tmp_path, max_steps=6, save_every=2, resume=str(root / "step_0000002"))
    assert Trainer(fresh_model(), BigramStream(16), lm_loss, ok).fit()["step"] == 6
    assert ckpt_io.load_trainer_state(root / "step_0000004")["step"] == 4  # rewritten cleanly


def test_keep_last_k_and_resume_none_refuses_existing_run(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=5, save_every=1, keep_last_k=2)
    Trainer(fresh_model(), BigramStream(16), lm_loss, cfg).fit()
    assert [s for s, _ in ckpt_io.list_checkpoints(tmp_path / "run" / "checkpoints")] == [4, 5]
    with pytest.raises(ValueError, match="resume='none'"):
        Trainer(
            fresh_model(), BigramStream(16), lm_loss, make_cfg(tmp_path, max_steps=5, resume="none")
        ).fit()
    # auto-resume of a finished run is a no-op that reports the final step
    again = Trainer(fresh_model(), BigramStream(16), lm_loss, make_cfg(tmp_path, max_steps=5)).fit()
    assert again["step"] == 5


def test_time_limit_stops_with_a_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=50, time_limit_s=1e-9)
    summary = Trainer(fresh_model(), BigramStream(16), lm_loss, cfg).fit()
    assert summary["stopped_early"] and summary["step"] == 1
    assert summary["checkpoint"].endswith("step_0000001")


def test_extra_state_round_trips(tmp_path):
    extra = {"seen_examples": 0}

    def counting_loss(model, batch):
        extra["seen_examples"] += batch["input_ids"].shape[0]
        return lm_loss(model, batch)

    Trainer(
        fresh_model(), BigramStream(16), counting_loss, make_cfg(tmp_path, max_steps=3), extra_state=extra
    ).fit()
    restored: dict = {}
    t = Trainer(
        fresh_model(), BigramStream(16), lm_loss, make_cfg(tmp_path, max_steps=3), extra_state=restored
    )
    t.load_checkpoint(tmp_path / "run")
    assert restored == {"seen_examples": 12}


# ----------------------------------------------------------------------------------------------- schedule / optim


def test_lr_schedule_values_and_what_the_optimizer_used(tmp_path):
    f = dict(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_factor(0, **f) == pytest.approx(0.1)
    assert lr_factor(9, **f) == pytest.approx(1.0)
    assert lr_factor(10, **f) == pytest.approx(1.0)
    assert lr_factor(60, **f) == pytest.approx(0.55)
    assert lr_factor(110, **f) == pytest.approx(0.1)
    assert lr_factor(500, **f) == pytest.approx(0.1)
    assert lr_factor(50, **f, schedule="constant") == 1.0

    cfg = make_cfg(tmp_path, max_steps=6, warmup_steps=2, min_lr_ratio=0.0, lr=1.0)
    Trainer(fresh_model(), BigramStream(16), lm_loss, cfg).fit()
    logged = [r["train/lr"] for r in read_metrics(cfg.out_dir)]
    expected = [lr_factor(s, 2, 6, 0.0) for s in range(6)]
    assert logged == pytest.approx(expected)
    assert expected[:3] == pytest.approx([0.5, 1.0, 1.0]) and expected[4] == pytest.approx(0.5)


def test_weight_decay_only_on_matrices(tmp_path):
    t = Trainer(fresh_model(), BigramStream(8), lm_loss, make_cfg(tmp_path, weight_decay=0.3))
    by_wd = {g["weight_decay"]: g["params"] for g in t.optimizer.param_groups}
    assert {p.ndim for p in by_wd[0.3]} == {2} and {p.ndim for p in by_wd[0.0]} == {1}
    assert sum(len(v) for v in by_wd.values()) == 3  # tied emb/head counted once, LayerNorm weight + bias


def test_data_order_is_a_seeded_permutation_per_epoch():
    s = ResumableBatchSampler(10, 3, seed=7)
    it = iter(s)
    epoch0 = [next(it) for _ in range(3)]
    epoch1 = [next(it) for _ in range(3)]
    assert sum(epoch0, []) == epoch_permutation(10, 7, 0)[:9].tolist()
    assert sum(epoch1, []) == epoch_permutation(10, 7, 1)[:9].tolist()
    resumed = iter(ResumableBatchSampler(10, 3, seed=7, start=4))
    assert next(resumed) == epoch1[1]
    with pytest.raises(ValueError, match="batch_size"):
        ResumableBatchSampler(2, 3, seed=0)


def test_batch_token_count_shapes():
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert batch_token_count({"input_ids": ids, "labels": ids}) == (10, 5)
    assert batch_token_count({"chosen_input_ids": ids, "rejected_input_ids": ids}) == (20, 5)
    assert batch_token_count((torch.ones(2, 3), ids)) == (10, 5)
    assert batch_token_count({"x": torch.ones(3)}) == (0, 0)


# ----------------------------------------------------------------------------------------------- config / hardware


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"grad_accum_steps": 0}, "grad_accum_steps"),
        ({"warmup_steps": 11, "max_steps": 10}, "warmup_steps"),
        ({"lr": 0.0}, "lr"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"device": "tpu"}, "device"),
        ({"dtype": "fp8"}, "dtype"),
        ({"peak_flops": -1.0}, "peak_flops"),
        ({"resume": " "}, "resume"),
        ({"log_every": 0}, "log_every"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)


def test_config_from_yaml_style_values_and_overrides():
    cfg = config_from_dict(TrainConfig, {"betas": "0.9,0.99", "dtype": "bf16", "compile": "true"})
    assert cfg.betas == (0.9, 0.99) and cfg.dtype == "bf16" and cfg.compile is True
    cfg = apply_overrides(cfg, ["--lr", "1e-3", "--peak_flops", "none"])
    assert cfg.lr == 1e-3 and cfg.peak_flops is None
    with pytest.raises(ValueError, match="dtype"):
        config_from_dict(TrainConfig, {"dtype": "fp8"})
    assert TrainConfig(resume="auto").resume_path is None and TrainConfig(resume="x/y").resume_path == "x/y"


def test_fp16_on_cpu_is_rejected_with_a_fix(tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        Trainer(fresh_model(), BigramStream(8), lm_loss, make_cfg(tmp_path, dtype="fp16"))


def test_bf16_autocast_on_cpu_trains(tmp_path):
    summary = Trainer(
        fresh_model(), BigramStream(16), lm_loss, make_cfg(tmp_path, dtype="bf16", max_steps=3)
    ).fit()
    assert summary["dtype"] == "bf16" and math.isfinite(summary["train/loss"])


def test_peak_flops_table_and_detection():
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756.5e12
    assert peak_flops_for_name("NVIDIA H200") == 989.4e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_name("NVIDIA A10") == 125e12
    assert peak_flops_for_name("NVIDIA L40S") == 362.05e12
    assert peak_flops_for_name("NVIDIA L4") == 121e12
    assert peak_flops_for_name("Some Future GPU") is None
    cpu = torch.device("cpu")
    assert detect_peak_flops(cpu, torch.bfloat16) is None
    assert detect_peak_flops(cpu, torch.float32, override=1e12) == 1e12


# ----------------------------------------------------------------------------------------------- HF models


def test_hf_pretrained_model_trains_and_resumes(tmp_path):
    """Only the nn.Module API is used, so an HF causal LM (tied embeddings) checkpoints and resumes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make():
        torch.manual_seed(0)
        conf = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=SEQ,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(conf)

    def hf_loss(model, batch):
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
        return out.loss, {"n_tokens": batch["input_ids"][:, 1:].numel()}

    cfg = make_cfg(tmp_path, max_steps=2)
    trained = Trainer(make(), BigramStream(8), hf_loss, cfg)
    trained.fit()
    reloaded = make()
    Trainer(reloaded, BigramStream(8), hf_loss, make_cfg(tmp_path, max_steps=2)).load_checkpoint(cfg.out_dir)
    for (name, a), b in zip(trained.model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    saved = ckpt_io.read_checkpoint_config(tmp_path / "run" / "checkpoints" / "step_0000002")
    assert saved["train"]["max_steps"] == 2 and saved["model"]["vocab_size"] == VOCAB
