"""The alignment pipeline end to end on a tiny scratch model, plus its metric/summary helpers."""

from __future__ import annotations

import dataclasses
import json

import pytest

from modern_llm.alignment.alignment_pipeline import (
    PipelineConfig,
    StageSamples,
    aggregate,
    cached_seed_result,
    import_seeds_from_record,
    main,
    run_pipeline,
    score_metrics,
    seed_key,
    stage_gains,
)
from modern_llm.config.model_config import ModernLLMConfig
from modern_llm.data.preference_datasets import Sample
from modern_llm.data.task_datasets import get_task


def _tiny_config(tmp_path) -> PipelineConfig:
    cfg = PipelineConfig(
        name="tiny",
        seeds=[0],
        out_dir=str(tmp_path / "runs"),
        results_dir=str(tmp_path / "results"),
        instruction="Solve.",
    )
    # 1-step additions 2 + {1, 2}: the answer is 3 or 4, so even a barely trained model is right about half of
    # the time -- every stage (pairs, verifier, DPO) gets data of both kinds.
    cfg.data.task_args = {
        "n_train": 64,
        "n_eval": 6,
        "n_steps": 1,
        "max_operand": 2,
        "keep_calculator_annotations": False,
    }
    cfg.data.max_length = 96
    cfg.scratch.model = ModernLLMConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=128)
    cfg.scratch.vocab_size = 320
    cfg.eval = dataclasses.replace(cfg.eval, n_questions=6, num_samples=3, max_new_tokens=24, temperature=1.0)
    cfg.pairs = dataclasses.replace(cfg.pairs, n_questions=16, num_samples=4)
    short = {"batch_size": 8, "warmup_steps": 2, "log_every": 5}
    cfg.sft_train = dataclasses.replace(cfg.sft_train, max_steps=40, lr=5e-3, **short)
    cfg.dpo_train = dataclasses.replace(cfg.dpo_train, max_steps=3, **short)
    cfg.verifier_train = dataclasses.replace(cfg.verifier_train, max_steps=3, **short)
    return cfg


def test_pipeline_end_to_end_on_a_tiny_model(tmp_path):
    cfg = _tiny_config(tmp_path)
    out = run_pipeline(cfg)
    (seed,) = out["per_seed"]
    assert set(seed["stages"]) == {"base", "sft", "dpo", "dpo+verifier"}
    for stage, values in seed["stages"].items():
        for key in ("accuracy", "maj_at_n", "pass_at_n", "verifier_at_n"):
            assert 0.0 <= values[key] <= 1.0, (stage, key)
        assert values["pass_at_n"] >= values["pass_at_1_sampled"]  # the oracle bounds the average sample
    assert seed["pairs"]["n_pairs"] > 0  # DPO really ran
    assert "train/rewards/accuracy" in seed["dpo_train"] and "train/loss" in seed["verifier_train"]
    assert seed["stages"]["dpo+verifier"]["accuracy"] == seed["stages"]["dpo"]["verifier_at_n"]

    record = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert record["protocol"]["N"] == 3 and record["protocol"]["seeds"] == [0]
    assert set(record["metrics"]["summary"]) == {"base", "sft", "dpo", "dpo+verifier"}
    table = (tmp_path / "results" / "tiny.md").read_text()
    assert "maj@3" in table and "verifier@3" in table and "Stage gains" in table
    pairs = (tmp_path / "runs" / "seed0" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) == seed["pairs"]["n_pairs"]

    # the stage models are saved for test-time compute / chat, and load back
    from modern_llm.models.verifier import load_verifier
    from modern_llm.training.train_sft import load_policy

    seed_dir = tmp_path / "runs" / "seed0"
    policy, _ = load_policy(seed_dir / "dpo_final")
    load_policy(seed_dir / "sft_final")
    verifier = load_verifier(seed_dir / "verifier_final")
    assert sum(p.numel() for p in policy.parameters()) > 0 and verifier.pooling == cfg.verifier.pooling

    # a finished seed is saved; a re-run with the same settings re-uses it instead of training again
    cache = seed_dir / "seed_result.json"
    saved = json.loads(cache.read_text())
    saved["value"]["evals"]["arithmetic"]["stages"]["sft"]["accuracy"] = 0.123  # only a re-use gives it
    cache.write_text(json.dumps(saved))
    again = run_pipeline(dataclasses.replace(cfg, name="again", threads=1))  # name/threads: not in the key
    assert again["per_seed"][0]["stages"]["sft"]["accuracy"] == 0.123
    assert again["protocol"]["seeds_reused_from_cache"] == [0]
    with pytest.raises(ValueError, match="already holds checkpoints"):  # reuse off: it trains again
        run_pipeline(dataclasses.replace(cfg, name="fresh", reuse_seeds=False))

    # the committed store under results_dir: found from a fresh out_dir (another session or machine)
    store = tmp_path / "results" / "seeds" / "tiny-seed0.json"
    stored = json.loads(store.read_text())
    assert stored["value"]["git_commit"] and stored["key"]["seed"] == 0
    stored["value"]["evals"]["arithmetic"]["stages"]["sft"]["accuracy"] = 0.456
    stored["value"]["git_commit"] = "abcdef0123456789"  # a seed run in another session
    store.write_text(json.dumps(stored))
    elsewhere = dataclasses.replace(cfg, out_dir=str(tmp_path / "other_runs"))
    assert run_pipeline(elsewhere)["per_seed"][0]["stages"]["sft"]["accuracy"] == 0.456
    assert "| abcdef0 |" in (tmp_path / "results" / "tiny.md").read_text()  # the table names its code
    changed = dataclasses.replace(elsewhere, eval=dataclasses.replace(cfg.eval, temperature=0.5))
    assert seed_key(changed, 0) != seed_key(cfg, 0)  # a setting that changes numbers changes the key
    rounding_only = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, share_prompt=False))
    assert seed_key(rounding_only, 0) == seed_key(cfg, 0)

    # seeds of an earlier record (here: this run's) move into another store; settings added to the code
    # since the record count as equal only at their default values
    rec = json.loads((tmp_path / "results" / "tiny.json").read_text())
    del rec["protocol"]["config"]["pairs"]["gold_fallback"]  # as if the record predates the option
    old_record = tmp_path / "old.json"
    old_record.write_text(json.dumps(rec))
    moved = dataclasses.replace(elsewhere, results_dir=str(tmp_path / "moved"))
    assert import_seeds_from_record(moved, old_record) == [0]
    assert cached_seed_result(moved, 0)["evals"] == rec["metrics"]["per_seed"][0]["evals"]
    assert cached_seed_result(moved, 0)["imported_from"] == str(old_record)
    with pytest.raises(ValueError, match=r"pairs.gold_fallback \(a newer setting"):
        import_seeds_from_record(
            dataclasses.replace(moved, pairs=dataclasses.replace(cfg.pairs, gold_fallback=True)), old_record
        )
    with pytest.raises(ValueError, match=r"eval.temperature \(1.0 in the record, 0.5 here\)"):
        import_seeds_from_record(changed, old_record)

    cache.write_text("{not json")
    with pytest.raises(ValueError, match="delete it"):
        run_pipeline(cfg)


def _samples(correct_rows, answers_rows, greedy):
    sampled = [
        [Sample(str(a), a, c, "eos") for a, c in zip(answers, corrects)]
        for answers, corrects in zip(answers_rows, correct_rows)
    ]
    return StageSamples([Sample("", None, g, "eos") for g in greedy], sampled)


def test_score_metrics_by_hand():
    task = get_task("arithmetic", n_train=0, n_eval=2)
    examples = task.load("test", limit=2)
    gold = [examples[0].answer, examples[1].answer]
    wrong = "999999"
    # q0: two of three samples right -> maj right; q1: one right, two agree on a wrong answer -> maj wrong
    samples = _samples(
        [[True, True, False], [True, False, False]],
        [[gold[0], gold[0], wrong], [gold[1], wrong, wrong]],
        greedy=[True, False],
    )
    scores = [
        [0.1, 0.2, 0.9],
        [0.8, 0.1, 0.1],
    ]  # the verifier picks the wrong one for q0, the right one for q1
    m = score_metrics(task, examples, samples, scores)
    assert m["accuracy"] == 0.5
    assert m["maj_at_n"] == 0.5
    assert m["pass_at_n"] == 1.0
    assert m["pass_at_1_sampled"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["verifier_at_n"] == 0.5
    # weighted vote: q0 gold 0.3 vs wrong 0.9 -> wrong; q1 gold 0.8 vs wrong 0.2 -> right
    assert m["weighted_at_n"] == 0.5


def test_aggregate_and_gains_are_paired_per_seed():
    def seed(base, sft, dpo, ver):
        metrics = {"accuracy": 0.0, "verifier_at_n": 0.0}
        return {
            "stages": {
                "base": metrics | {"accuracy": base},
                "sft": metrics | {"accuracy": sft},
                "dpo": metrics | {"accuracy": dpo, "verifier_at_n": ver},
                "dpo+verifier": metrics | {"accuracy": ver, "verifier_at_n": ver},
            }
        }

    per_seed = [seed(0.0, 0.2, 0.3, 0.5), seed(0.0, 0.4, 0.4, 0.6)]
    summary = aggregate(per_seed)
    assert summary["sft"]["accuracy"][0] == pytest.approx(0.3)
    gains = {row["stage"]: row for row in stage_gains(summary, per_seed)}
    assert gains["dpo"]["gain"][0] == pytest.approx(0.05)
    assert gains["dpo+verifier"]["gain"][0] == pytest.approx(0.2)  # verifier@N minus DPO greedy
    assert "gain" not in gains["base"]


def test_overlapping_train_and_eval_split_is_rejected(tmp_path):
    cfg = _tiny_config(tmp_path)
    cfg.data.split = "test"
    with pytest.raises(ValueError, match="offset"):
        run_pipeline(cfg)


def test_cli_help():
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


def test_stop_after_sft_evaluates_only_the_first_stages(tmp_path):
    cfg = dataclasses.replace(_tiny_config(tmp_path), stop_after="sft", name="partial")
    out = run_pipeline(cfg)
    (seed,) = out["per_seed"]
    assert set(seed["stages"]) == {"base", "sft"}
    assert "verifier_at_n" not in seed["stages"]["sft"]  # no verifier was trained
    assert [row["stage"] for row in out["stage_gains"]] == ["base", "sft"]
    assert "| sft |" in (tmp_path / "results" / "partial.md").read_text()
    with pytest.raises(ValueError, match="stop_after"):
        dataclasses.replace(cfg, stop_after="verifier")


def test_gold_fallback_pairs_the_sft_target_with_wrong_samples(tmp_path):
    # an untrained policy (1 SFT step) solves nothing: without the fallback there would be no pair at all
    cfg = _tiny_config(tmp_path)
    cfg = dataclasses.replace(
        cfg,
        name="gold",
        sft_train=dataclasses.replace(cfg.sft_train, max_steps=1, warmup_steps=0),
        pairs=dataclasses.replace(cfg.pairs, gold_fallback=True),
    )
    out = run_pipeline(cfg)
    stats = out["per_seed"][0]["pairs"]
    assert stats["n_gold_pairs"] > 0 and stats["n_pairs"] >= stats["n_gold_pairs"]
    task = get_task("arithmetic", **cfg.data.task_args)
    train = task.load("train")
    rows = [
        json.loads(line) for line in (tmp_path / "runs" / "seed0" / "pairs.jsonl").read_text().splitlines()
    ]
    gold_rows = [r for r in rows if r["meta"].get("chosen") == "gold"]
    assert len(gold_rows) == stats["n_gold_pairs"]
    assert cfg.data.chat  # chat SFT completions are the target text itself (no leading space)
    for r in gold_rows:  # chosen is exactly what SFT trained on for that question
        example = train[cfg.offset + r["meta"]["question"]]
        assert r["chosen"] == task.target_text(example) != r["rejected"]


def test_every_alignment_config_file_loads():
    from pathlib import Path

    from modern_llm.config.base import load_config, read_mapping
    from modern_llm.training.train_dpo import DPORunConfig
    from modern_llm.training.train_sft import SFTRunConfig
    from modern_llm.training.train_verifier import VerifierRunConfig

    folder = Path(__file__).resolve().parents[2] / "configs" / "alignment"
    files = sorted(folder.glob("*.yaml"))
    assert files
    for path in files:
        keys = set(read_mapping(path))
        cls = (
            PipelineConfig
            if "seeds" in keys
            else DPORunConfig
            if "pairs" in keys
            else VerifierRunConfig
            if "verifier" in keys
            else SFTRunConfig
        )
        cfg = load_config(cls, path)
        assert cfg.name, path
        assert path.read_text().startswith("#"), f"{path}: the header comment must say how to run it"


def test_dpo_sweep_retrains_from_the_saved_sft_policy(tmp_path):
    from modern_llm.alignment.dpo_sweep import DPOSweepConfig, run
    from modern_llm.config.base import save_config

    cfg = _tiny_config(tmp_path)
    cfg.stop_after = "dpo"
    pipeline_out = run_pipeline(cfg)
    save_config(cfg, tmp_path / "pipeline.yaml")
    sweep = DPOSweepConfig(
        name="sweep",
        pipeline=str(tmp_path / "pipeline.yaml"),
        seeds=[0],
        lrs=[1e-3],
        sft_weights=[0.0, 1.0],
        dpop_lambdas=[0.0],
        max_steps=2,
        results_dir=str(tmp_path / "results"),
    )
    out = run(sweep)
    # the sweep's starting point IS the pipeline's SFT policy: same greedy accuracy on the same questions
    assert out["summary"]["sft"][0] == pipeline_out["per_seed"][0]["stages"]["sft"]["accuracy"]
    assert set(out["gains"]) == {"lr=0.001,sft_weight=0,dpop=0", "lr=0.001,sft_weight=1,dpop=0"}
    record = json.loads((tmp_path / "results" / "sweep.json").read_text())
    assert record["metrics"]["per_seed"]["sft"]["seed0"] == out["summary"]["sft"][0]
    assert record["metrics"]["variants"]["lr=0.001,sft_weight=1,dpop=0"]["gain_vs_sft"] == pytest.approx(
        out["gains"]["lr=0.001,sft_weight=1,dpop=0"]
    )
    assert "gain vs SFT" in (tmp_path / "results" / "sweep.md").read_text()
    # a second run with the same grid re-uses the per-seed results instead of training again
    cache = tmp_path / "runs" / "seed0" / "dpo_sweep" / "results.json"
    saved = json.loads(cache.read_text())
    saved["value"]["sft"] = 0.123  # marker: only a re-use can produce it
    cache.write_text(json.dumps(saved))
    assert run(sweep)["summary"]["sft"][0] == 0.123
    assert run(dataclasses.replace(sweep, max_steps=1))["summary"]["sft"][0] != 0.123  # other grid: fresh
    cache.write_text("{not json")
    with pytest.raises(ValueError, match="delete it"):
        run(sweep)
    with pytest.raises(FileNotFoundError, match="run the pipeline first"):
        run(dataclasses.replace(sweep, seeds=[7]))


def test_eval_tasks_evaluate_the_same_models_on_each_task(tmp_path, monkeypatch):
    # train on the synthetic task, evaluate on it and on a second task: one record per eval task
    import modern_llm.alignment.alignment_pipeline as pipeline

    cfg = dataclasses.replace(_tiny_config(tmp_path), stop_after="sft", name="multi")
    cfg.eval_tasks = ["arithmetic", "svamp"]
    svamp_dir = tmp_path / "data" / "svamp"
    svamp_dir.mkdir(parents=True)
    rows = [
        {
            "ID": f"s{i}",
            "Body": f"Tom has {i} apples.",
            "Question": "How many?",
            "Equation": f"( {i}.0 + 0.0 )",
            "Answer": float(i),
        }
        for i in range(1, 8)
    ]
    (svamp_dir / "SVAMP.json").write_text(json.dumps(rows))
    cfg.data.data_dir = str(tmp_path / "data")
    out = pipeline.run_pipeline(cfg)
    assert set(out["evals"]) == {"arithmetic", "svamp"}
    (seed,) = out["per_seed"]
    assert seed["stages"] == seed["evals"]["arithmetic"]["stages"]  # the primary set is the first one
    svamp = out["evals"]["svamp"]
    assert set(svamp["per_seed"][0]["stages"]) == {"base", "sft"}
    record = json.loads((tmp_path / "results" / "multi-svamp.json").read_text())
    assert record["task"] == "alignment/svamp" and record["protocol"]["train_task"] == "arithmetic"
    assert record["metrics"]["summary"] == svamp["summary"]
    assert (tmp_path / "results" / "multi-arithmetic.md").is_file()
    lines = (tmp_path / "runs" / "seed0" / "eval_samples-svamp.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 6  # base + sft, 6 questions each
    assert "Tom has" in json.loads(lines[0])["prompt"]
