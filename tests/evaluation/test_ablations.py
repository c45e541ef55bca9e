"""Ablation runner: one finite row per (variant, seed), clear errors on bad fields, KV bytes formula vs the
engine's real allocation, MoE at equal active parameters, and the alignment read-off."""

import csv
import json
import math

import pytest
import torch
import yaml

from modern_llm.config.model_config import ModernLLMConfig
from modern_llm.evaluation import ablations as ab
from modern_llm.evaluation.metrics import mean_std
from modern_llm.models.transformer import ModernDecoderLM
from modern_llm.training.train_lm import LMRunConfig

TINY_BASE = {
    "model.d_model": 32,
    "model.n_layers": 2,
    "model.n_heads": 4,
    "model.n_kv_heads": 4,
    "model.d_ff": 64,
    "model.max_seq_len": 32,
    "train.batch_size": 4,
    "train.max_steps": 2,
    "train.warmup_steps": 1,
    "train.log_every": 1,
    "train.eval_batches": 1,
    "train.progress": False,
    "train.tensorboard": False,
    "train.device": "cpu",
    "data.corpus": "embedded:200",
    "data.vocab_size": 400,
    "sample.max_new_tokens": 1,
}


def write_study(tmp_path, **extra):
    cfg = {
        "name": "tiny",
        "base": TINY_BASE | {"data.cache_dir": str(tmp_path / "cache")},
        "seeds": [0, 1],
        "variants": ["moe"],
        "results_dir": str(tmp_path / "results"),
        "runs_dir": str(tmp_path / "runs"),
        "threads": 1,  # tiny matrices: a second thread only adds sync overhead on a busy box
        "decode": {"batch_sizes": [1, 2], "prompt_len": 2, "new_tokens": 2, "repeats": 1},
    } | extra
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_runner_writes_one_finite_row_per_variant_and_seed(tmp_path):
    study = write_study(tmp_path)
    assert ab.main(["--config", str(study), "--gqa", "2", "--variant", "nope:pos_encoding=none"]) == 0

    with open(tmp_path / "results" / "tiny.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    variants = ["baseline", "moe", "gqa", "nope"]
    assert sorted((r["variant"], int(r["seed"])) for r in rows) == sorted(
        (v, s) for v in variants for s in (0, 1)
    )
    numeric = [c for c in ab.lm_columns([1, 2]) if c not in ("variant", "seed")]
    for r in rows:
        for c in numeric:
            assert math.isfinite(float(r[c])), (r["variant"], c, r[c])
        assert float(r["kv_bytes_per_token_formula"]) == float(r["kv_bytes_per_token_measured"])
        assert int(r["steps"]) == 2

    record = json.loads((tmp_path / "results" / "tiny.json").read_text())
    by = {(r["variant"], r["seed"]): r for r in record["metrics"]["rows"]}  # full precision
    assert len(by) == len(rows)
    # KV bytes: K+V, 2 layers, 4 heads of head_dim 8, fp32; --gqa 2 halves it
    assert by["baseline", 0]["kv_bytes_per_token_measured"] == 2 * 2 * 4 * 8 * 4
    assert by["gqa", 0]["kv_bytes_per_token_measured"] == 2 * 2 * 2 * 8 * 4
    # MoE at equal active params: only the router (d_model * n_experts per layer) is extra
    assert by["moe", 0]["params_active"] - by["baseline", 0]["params_active"] == 2 * 32 * 4
    assert by["moe", 0]["params_total"] > by["baseline", 0]["params_total"]

    summary = record["metrics"]["summary"]
    assert list(summary) == variants
    for v in variants:
        assert summary[v]["val_loss"] == pytest.approx(list(mean_std([by[v, s]["val_loss"] for s in (0, 1)])))
        assert summary[v]["n_seeds"] == 2
    delta = record["metrics"]["paired_deltas_vs_baseline"]["nope"]["val_loss"][0]
    expected = sum(by["nope", s]["val_loss"] - by["baseline", s]["val_loss"] for s in (0, 1)) / 2
    assert delta == pytest.approx(expected, abs=1e-9)
    assert record["protocol"]["variants"]["nope"]["overrides"] == {"model.pos_encoding": "none"}
    for png in ("tiny_bars.png", "tiny_loss.png"):
        assert (tmp_path / "results" / png).stat().st_size > 1000
    # seeds really differ (init + data order); NoPE differs from RoPE (barely, after 2 steps)
    assert by["baseline", 0]["val_loss"] != by["baseline", 1]["val_loss"]
    assert by["baseline", 0]["val_loss"] != by["nope", 0]["val_loss"]


def tiny_base():
    from modern_llm.config.base import apply_overrides

    return apply_overrides(LMRunConfig(), TINY_BASE)


def test_unknown_field_in_variant_names_variant_and_field(tmp_path, capsys):
    base, cfg = tiny_base(), ab.AblationConfig()
    with pytest.raises(ValueError, match=r"variant 'oops'.*model\.n_kv_head\b.*valid keys.*n_kv_heads"):
        ab.build_lm_variants(base, cfg, [ab.parse_variant_spec("oops:n_kv_head=1")])
    with pytest.raises(ValueError, match=r"variant 'bad-train'.*train\.learning_rate"):
        ab.build_lm_variants(base, cfg, [ab.parse_variant_spec("bad-train:train.learning_rate=1")])
    with pytest.raises(
        ValueError, match=r"variant 'heads'.*n_heads \(4\) must be divisible by n_kv_heads \(3\)"
    ):
        ab.build_lm_variants(base, cfg, [ab.parse_variant_spec("heads:n_kv_heads=3")])
    with pytest.raises(ValueError, match="set by the runner"):
        ab.build_lm_variants(base, cfg, [ab.parse_variant_spec("s:train.seed=3")])
    with pytest.raises(ValueError, match="NAME:field=value"):
        ab.parse_variant_spec("n_kv_heads=1")
    # through the CLI: argparse error naming the variant and field, before anything trains
    study = write_study(tmp_path, variants=[{"name": "typo", "overrides": {"rope_thetaa": 5.0}}])
    with pytest.raises(SystemExit):
        ab.main(["--config", str(study)])
    err = capsys.readouterr().err
    assert "variant 'typo'" in err and "model.rope_thetaa" in err
    assert not (tmp_path / "runs").exists()


def test_variant_spec_parsing_and_toggles():
    v = ab.parse_variant_spec("moe01: moe_layers=[0,1], d_ff=128 ,train.lr=2e-3")
    assert v.overrides == {"model.moe_layers": "[0,1]", "model.d_ff": "128", "train.lr": "2e-3"}
    resolved = ab.resolve_variant(tiny_base(), v)
    assert resolved.model.moe_layers == [0, 1] and resolved.model.d_ff == 128 and resolved.train.lr == 2e-3

    base, cfg = tiny_base(), ab.AblationConfig(moe_experts=4, moe_top_k=2)
    moe = ab.resolve_variant(base, ab.toggle_variant("moe", base, cfg)).model
    assert moe.moe_layers == [0, 1] and moe.moe_top_k * moe.moe_d_ff == base.model.d_ff
    assert ab.resolve_variant(base, ab.toggle_variant("no-rope", base, cfg)).model.pos_encoding == "none"
    with pytest.raises(ValueError, match="n_sinks=0"):
        ab.toggle_variant("no-sinks", base, cfg)
    with pytest.raises(ValueError, match="divid"):
        ab.toggle_variant("moe", base, ab.AblationConfig(moe_experts=4, moe_top_k=3))


@pytest.mark.parametrize(
    "n_heads,n_kv_heads,dtype",
    [(4, 4, torch.float32), (4, 2, torch.float32), (4, 1, torch.float32), (4, 2, torch.bfloat16)],
)
def test_kv_bytes_formula_matches_engine_allocation(n_heads, n_kv_heads, dtype):
    mcfg = ModernLLMConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=n_heads, n_kv_heads=n_kv_heads)
    model = ModernDecoderLM(mcfg).to(dtype).eval()
    bench = ab.DecodeBenchConfig(batch_sizes=[3], prompt_len=4, new_tokens=5, repeats=1)
    tok_s, measured = ab.decode_benchmark(model, 3, bench)
    # hand value: K and V, 3 layers, n_kv_heads heads of head_dim 8, 4 or 2 bytes per element
    by_hand = 2 * 3 * n_kv_heads * 8 * (2 if dtype == torch.bfloat16 else 4)
    assert ab.kv_bytes_per_token(mcfg, dtype) == by_hand
    assert measured == by_hand
    assert tok_s > 0


def test_summarize_and_paired_deltas_by_hand():
    rows = [
        {"variant": "baseline", "seed": 0, "val_loss": 2.0},
        {"variant": "baseline", "seed": 1, "val_loss": 3.0},
        {"variant": "x", "seed": 0, "val_loss": 2.5},
        {"variant": "x", "seed": 1, "val_loss": 3.1},
        {"variant": "x", "seed": 2, "val_loss": float("nan")},
    ]
    summary = ab.summarize(rows, ("val_loss",))
    assert summary["baseline"]["val_loss"] == pytest.approx([2.5, math.sqrt(0.5)])
    assert summary["x"]["val_loss"] == pytest.approx([2.8, math.sqrt(0.18)])  # NaN skipped
    deltas = ab.paired_deltas(rows, metrics=("val_loss",))
    assert deltas["x"]["val_loss"] == pytest.approx([0.3, math.sqrt(0.08)])


def test_alignment_rows_pick_stage_and_selection():
    stage = {"accuracy": 0.2, "maj_at_n": 0.3, "verifier_at_n": 0.4, "pass_at_n": 0.6}
    per_seed = [{"seed": 7, "stages": {"sft": stage, "dpo": {k: v + 0.1 for k, v in stage.items()}}}]
    names = ab.alignment_variant_names(["no-dpo", "no-verifier"])
    assert names == ["full", "no-dpo", "no-verifier", "no-dpo-no-verifier"]
    rows = {r["variant"]: r for r in ab.alignment_rows(per_seed, names)}
    assert rows["full"]["selected_at_n"] == pytest.approx(0.5)  # DPO policy, verifier@N
    assert rows["no-dpo"]["selected_at_n"] == pytest.approx(0.4)  # SFT policy, verifier@N
    assert rows["no-verifier"]["selected_at_n"] == pytest.approx(0.4)  # DPO policy, maj@N
    assert rows["no-dpo-no-verifier"]["selected_at_n"] == pytest.approx(0.3)
    assert all(r["seed"] == 7 for r in rows.values())
    # the verifier may be skipped by the pipeline (all samples right or all wrong): NaN, not a crash
    del per_seed[0]["stages"]["dpo"]["verifier_at_n"]
    assert math.isnan(ab.alignment_rows(per_seed, ["full"])[0]["selected_at_n"])


def test_alignment_toggles_need_a_pipeline_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ab.main(["--no-dpo", "--dry-run"])
    assert "--alignment-config" in capsys.readouterr().err


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        ab.main(["--help"])
    assert exc.value.code == 0
    assert "--no-rope" in capsys.readouterr().out


TINY_PIPELINE = {
    "name": "tiny-pipeline",
    "instruction": "Solve.",
    "scratch": {"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 128}, "vocab_size": 320},
    # 1-step additions 2 + {1, 2}: a barely trained model is right about half the time, so pairs and the
    # verifier get data of both kinds (the same tiny setting as the pipeline's own test)
    "data": {
        "task_args": {
            "n_train": 64,
            "n_eval": 6,
            "n_steps": 1,
            "max_operand": 2,
            "keep_calculator_annotations": False,
        },
        "max_length": 96,
    },
    "eval": {"n_questions": 6, "num_samples": 3, "max_new_tokens": 24, "temperature": 1.0},
    "pairs": {"n_questions": 16, "num_samples": 4},
    "sft_train": {"max_steps": 40, "lr": 5e-3, "batch_size": 8, "warmup_steps": 2, "log_every": 5},
    "dpo_train": {"max_steps": 3, "batch_size": 8, "warmup_steps": 2, "log_every": 5},
    "verifier_train": {"max_steps": 3, "batch_size": 8, "warmup_steps": 2, "log_every": 5},
}


def test_no_dpo_no_verifier_through_the_real_pipeline(tmp_path):
    pipeline_yaml = tmp_path / "pipeline.yaml"
    pipeline_yaml.write_text(yaml.safe_dump(TINY_PIPELINE))
    args = ["--name", "al", "--seeds", "0,1", "--threads", "1", "--results-dir", str(tmp_path / "res")]
    args += ["--runs-dir", str(tmp_path / "runs"), "--alignment-config", str(pipeline_yaml)]
    assert ab.main([*args, "--no-dpo", "--no-verifier"]) == 0

    pipeline = json.loads((tmp_path / "res" / "al-alignment-pipeline.json").read_text())
    with open(tmp_path / "res" / "al-alignment.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    names = ["full", "no-dpo", "no-verifier", "no-dpo-no-verifier"]
    assert sorted((r["variant"], int(r["seed"])) for r in rows) == sorted(
        (n, s) for n in names for s in (0, 1)
    )
    for r in rows:  # each row is the pipeline's own number for that stage and selection rule
        stages = pipeline["metrics"]["per_seed"][int(r["seed"])]["stages"]
        stage = stages[r["policy"]]
        key = "verifier_at_n" if r["selection"] == "verifier" else "maj_at_n"
        assert float(r["selected_at_n"]) == pytest.approx(stage[key], abs=1e-5)
        assert float(r["greedy_acc"]) == pytest.approx(stage["accuracy"], abs=1e-5)
    assert {(r["variant"], r["policy"], r["selection"]) for r in rows} == {
        ("full", "dpo", "verifier"),
        ("no-dpo", "sft", "verifier"),
        ("no-verifier", "dpo", "majority"),
        ("no-dpo-no-verifier", "sft", "majority"),
    }
    record = json.loads((tmp_path / "res" / "al-alignment.json").read_text())
    assert list(record["metrics"]["summary"]) == names

    # the same table from the existing pipeline record, without re-running anything
    again = ["--name", "al2", "--seeds", "0,1", "--results-dir", str(tmp_path / "res"), "--no-dpo"]
    again += ["--alignment-record", str(tmp_path / "res" / "al-alignment-pipeline.json")]
    assert ab.main(again) == 0
    rec2 = json.loads((tmp_path / "res" / "al2-alignment.json").read_text())
    assert rec2["metrics"]["rows"] == [
        r for r in record["metrics"]["rows"] if r["variant"] in ("full", "no-dpo")
    ]
