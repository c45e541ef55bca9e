"""Verifier training: BCE through the one Trainer reaches high AUC on separable toy data; metrics and CLI."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from modern_llm.config.model_config import ModernLLMConfig
from modern_llm.config.train_config import TrainConfig
from modern_llm.data.tokenizer import train_bpe_tokenizer
from modern_llm.models.transformer import ModernDecoderLM
from modern_llm.models.verifier import verifier_from_lm
from modern_llm.training.train_verifier import (
    VerifierCollator,
    VerifierConfig,
    encode_records,
    evaluate_scores,
    group_by_prompt,
    load_verifier_jsonl,
    score_solutions,
    train_verifier,
    within_group_ranking_loss,
)

WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "table", "light"]


def _toy_records(n: int, seed: int) -> list[dict]:
    """Label 1 iff the solution mentions "right" somewhere (not at a fixed position): needs attention."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
        label = i % 2
        words.insert(rng.randrange(len(words) + 1), "right" if label else "wrong")
        rows.append(
            {"prompt": f"Question {rng.randint(0, 9)}:", "completion": " ".join(words), "label": label}
        )
    return rows


@pytest.fixture(scope="module")
def toy_tokenizer():
    texts = [" ".join(WORDS + ["right", "wrong", "Question"]) + " 0 1 2 3 4 5 6 7 8 9 :"] * 50
    return train_bpe_tokenizer(texts, 300)


def _verifier(tok):
    torch.manual_seed(0)
    lm = ModernDecoderLM(
        ModernLLMConfig(
            vocab_size=len(tok) + 64 - len(tok) % 64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64
        )
    )
    return verifier_from_lm(lm)


def _train_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(device="cpu", dtype="fp32", lr=3e-3, warmup_steps=5, progress=False, tensorboard=False)
    return TrainConfig(out_dir=str(tmp_path / "run"), **(base | {"log_every": 10} | kw))


def test_verifier_separates_toy_data(tmp_path, toy_tokenizer):
    train, held_out = _toy_records(256, 0), _toy_records(100, 1)
    verifier = _verifier(toy_tokenizer)
    cfg = _train_cfg(tmp_path, batch_size=16, max_steps=80)
    summary = train_verifier(verifier, toy_tokenizer, train, VerifierConfig(), cfg, eval_records=held_out)
    assert summary["eval/auc"] > 0.95
    assert summary["eval/far"] < 0.2 and summary["eval/frr"] < 0.2
    # scoring through the public helper agrees with the trainer's eval
    scores = score_solutions(
        verifier, toy_tokenizer, [r["prompt"] for r in held_out], [r["completion"] for r in held_out]
    )
    assert evaluate_scores([r["label"] for r in held_out], scores)["auc"] == pytest.approx(
        summary["eval/auc"]
    )


def test_within_group_ranking_loss_by_hand():
    logits = torch.tensor([2.0, 0.5, -1.0, 3.0, 1.0])
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    group = torch.tensor([0, 0, 0, 1, 1])  # group 1 has no wrong sample: no pair there
    expected = -(math.log(1 / (1 + math.exp(-1.5))) + math.log(1 / (1 + math.exp(-3.0)))) / 2
    assert within_group_ranking_loss(logits, labels, group).item() == pytest.approx(expected)
    # pairs never cross groups: a wrong row scored above a right row of ANOTHER question costs nothing
    cross = within_group_ranking_loss(
        torch.tensor([0.0, 5.0]), torch.tensor([1.0, 0.0]), torch.tensor([0, 1])
    )
    assert cross.item() == 0.0 and cross.requires_grad is False  # no pair: a plain zero
    with_grad = torch.tensor([0.0, 5.0], requires_grad=True)
    within_group_ranking_loss(with_grad, torch.tensor([1.0, 0.0]), torch.tensor([0, 1])).backward()
    assert with_grad.grad is not None and torch.all(with_grad.grad == 0)


def test_grouped_batches_keep_questions_together(toy_tokenizer):
    records = _toy_records(12, 0)
    groups = group_by_prompt(encode_records(records, toy_tokenizer, 64), records)
    prompts = list(dict.fromkeys(r["prompt"] for r in records))
    assert [len(g["rows"]) for g in groups] == [sum(r["prompt"] == p for r in records) for p in prompts]
    batch = VerifierCollator(0)(groups[:2])
    assert batch["input_ids"].shape[0] == len(groups[0]["rows"]) + len(groups[1]["rows"])
    assert batch["group"].tolist() == [0] * len(groups[0]["rows"]) + [1] * len(groups[1]["rows"])


def test_ranking_loss_trains_a_verifier(tmp_path, toy_tokenizer):
    cfg = _train_cfg(tmp_path, batch_size=4, max_steps=40)  # batch_size counts questions here
    verifier = _verifier(toy_tokenizer)
    train, held_out = _toy_records(256, 0), _toy_records(100, 1)
    summary = train_verifier(
        verifier, toy_tokenizer, train, VerifierConfig(rank_weight=1.0), cfg, eval_records=held_out
    )
    assert summary["eval/auc"] > 0.9
    with pytest.raises(ValueError, match="rank_weight"):
        VerifierConfig(rank_weight=-1.0)


def test_evaluate_scores_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = random.Random(0)
    labels = [rng.randint(0, 1) for _ in range(200)]
    scores = [min(1.0, max(0.0, 0.3 * y + rng.random() * 0.8)) for y in labels]
    out = evaluate_scores(labels, scores, threshold=0.5)
    assert out["auc"] == pytest.approx(roc_auc_score(labels, scores))
    negatives = [s for y, s in zip(labels, scores) if y == 0]
    positives = [s for y, s in zip(labels, scores) if y == 1]
    assert out["far"] == pytest.approx(sum(s >= 0.5 for s in negatives) / len(negatives))
    assert out["frr"] == pytest.approx(sum(s < 0.5 for s in positives) / len(positives))
    assert math.isnan(evaluate_scores([1, 1], [0.2, 0.9])["auc"])  # one class: no AUC, no crash


def test_encoding_matches_sft_collator(toy_tokenizer):
    from modern_llm.data.task_datasets import CausalLMCollator

    rec = {"prompt": "Question 1:", "completion": "apple right", "label": 1}
    (item,) = encode_records([rec], toy_tokenizer, 64)
    batch = CausalLMCollator(toy_tokenizer, max_length=64)([rec])
    assert item["input_ids"] == batch["input_ids"][0].tolist()
    assert item["input_ids"][-1] == toy_tokenizer.eos_token_id  # the verifier reads the EOS position


def test_jsonl_errors_and_cli(tmp_path, toy_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "p", "completion": "c", "label": 1}) + "\n" + json.dumps({"prompt": "p"}) + "\n"
    )
    with pytest.raises(ValueError, match=f"{bad}:2"):
        load_verifier_jsonl(bad)
    bad.write_text(json.dumps({"prompt": "p", "completion": "c", "label": 3}) + "\n")
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        load_verifier_jsonl(bad)

    from modern_llm.training.train_sft import save_policy
    from modern_llm.training.train_verifier import main

    lm = ModernDecoderLM(ModernLLMConfig(vocab_size=320, d_model=32, n_layers=1, n_heads=4, max_seq_len=64))
    policy = save_policy(lm, toy_tokenizer, tmp_path / "policy")
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _toy_records(40, 2)))
    out = tmp_path / "vrun"
    argv = [
        "--policy",
        str(policy),
        "--data",
        str(data),
        "--train.out_dir",
        str(out),
        "--train.max_steps",
        "3",
        "--train.batch_size",
        "8",
        "--train.warmup_steps",
        "1",
        "--train.device",
        "cpu",
        "--train.progress",
        "false",
        "--train.tensorboard",
        "false",
        "--record",
        str(tmp_path / "rec.json"),
    ]
    assert main(argv) == 0
    assert (out / "final" / "verifier.yaml").is_file()
    record = json.loads((tmp_path / "rec.json").read_text())
    assert "eval/auc" in record["metrics"]
    with pytest.raises(SystemExit):
        main(["--help"])


def test_mean_pooling_verifier_trains_saves_and_loads(tmp_path, toy_tokenizer):
    from modern_llm.models.verifier import load_verifier, save_verifier

    verifier = _verifier(toy_tokenizer)
    train, held_out = _toy_records(256, 0), _toy_records(100, 1)
    cfg = VerifierConfig(pooling="mean")
    summary = train_verifier(
        verifier, toy_tokenizer, train, cfg, _train_cfg(tmp_path, batch_size=16, max_steps=60), held_out
    )
    assert verifier.pooling == "mean" and summary["eval/auc"] > 0.9
    prompts, texts = [r["prompt"] for r in held_out[:8]], [r["completion"] for r in held_out[:8]]
    before = score_solutions(verifier, toy_tokenizer, prompts, texts)
    loaded = load_verifier(save_verifier(verifier, tmp_path / "v", toy_tokenizer))
    assert loaded.pooling == "mean"
    assert score_solutions(loaded, toy_tokenizer, prompts, texts) == pytest.approx(before, abs=1e-6)
    # the score is the mean per-token logit over the solution tokens only (prompt tokens ignored)
    item = encode_records(held_out[:1], toy_tokenizer, 64)[0]
    ids = torch.tensor([item["input_ids"]])
    with torch.no_grad():
        tokens = loaded(ids, per_token=True)[0, item["n_prompt"] :]
    assert torch.sigmoid(tokens.mean()).item() == pytest.approx(before[0], abs=1e-5)
    with pytest.raises(ValueError, match="completion_mask"):
        loaded(ids)
    with pytest.raises(ValueError, match="pooling"):
        VerifierConfig(pooling="max")


def test_calc_annotations_reach_training_and_scoring(tmp_path, toy_tokenizer):
    from modern_llm.models.verifier import load_verifier, save_verifier
    from modern_llm.training.train_verifier import calc_annotated

    text = "She has 3 + 9 = 14 cookies.\nThen 14 * 2 = 28 cookies.\nDone.\n#### 28"
    assert calc_annotated(text) == (
        "She has 3 + 9 = 14 cookies. [calc wrong]\nThen 14 * 2 = 28 cookies. [calc ok]\nDone.\n#### 28"
    )
    verifier = _verifier(toy_tokenizer)
    train = _toy_records(32, 0)
    cfg = VerifierConfig(calc_annotations=True)
    train_verifier(
        verifier, toy_tokenizer, train, cfg, _train_cfg(tmp_path, batch_size=8, max_steps=2, warmup_steps=1)
    )
    loaded = load_verifier(save_verifier(verifier, tmp_path / "v", toy_tokenizer))
    assert loaded.calc_annotations is True
    # scoring reads the annotated text: the same as scoring the annotated solution without the flag
    prompts, solutions = ["Question 1:"], ["apple 2 + 2 = 5 river"]
    with_flag = score_solutions(loaded, toy_tokenizer, prompts, solutions)
    loaded.calc_annotations = False
    by_hand = score_solutions(loaded, toy_tokenizer, prompts, [calc_annotated(solutions[0])])
    assert with_flag == pytest.approx(by_hand)
