"""Prompting baselines and LoRA/QLoRA finetuning on tiny random models and the task fixtures (a few steps)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from modern_llm.config.train_config import TrainConfig
from modern_llm.data.task_datasets import get_task
from modern_llm.hf import finetune as ft
from modern_llm.hf import prompting_baselines as pb
from modern_llm.hf.lora_utils import load_adapter
from modern_llm.hf.registry import load_model
from modern_llm.utils.records import read_record

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tasks"


def tiny_train(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(
        out_dir=str(tmp_path / "run"),
        max_steps=3,
        batch_size=2,
        lr=1e-2,
        warmup_steps=0,
        log_every=1,
        progress=False,
        tensorboard=False,
        device="cpu",
        dtype="fp32",
    )
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_left_padded_generation_matches_one_by_one(tiny_dirs, arch):
    model, tok = load_model(str(tiny_dirs[arch]))
    prompts = ["Hello there, how", "A", "The quick brown fox jumps over"]
    batched = pb.generate_texts(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [pb.generate_texts(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == "right"  # restored after generation
    # Reference: HF generate on the unpadded prompt, decoded the same way.
    enc = tok(prompts[0], return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert single[0] == tok.decode(ref[0, enc.input_ids.shape[1] :], skip_special_tokens=True)


def test_seq2seq_generation_matches_hf_generate(tiny_dirs):
    model, tok = load_model(str(tiny_dirs["t5"]))
    prompts = ["summarize: a b c", "summarize: hello there"]
    out = pb.generate_texts(model, tok, prompts, max_new_tokens=5)
    for prompt, text in zip(prompts, out):
        enc = tok(prompt, return_tensors="pt")
        ref = model.generate(**enc, max_new_tokens=5, do_sample=False)
        assert text == tok.decode(ref[0], skip_special_tokens=True)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pb.generate_texts(model, tok, ["x"], max_new_tokens=0)


def test_evaluate_task_generate_and_verbalizer(tiny_dirs):
    model, tok = load_model(str(tiny_dirs["gpt2"]))
    task = get_task("sst2")
    examples = task.load("validation", data_dir=FIXTURES)
    pool = task.load("train", data_dir=FIXTURES)
    gen = pb.evaluate_task(model, tok, task, examples, shots=2, shot_pool=pool, max_new_tokens=2)
    assert set(gen["metrics"]) == {"accuracy", "f1", "invalid_rate", "n"}
    assert gen["prompts"][0].count("Sentiment:") == 3  # 2 demonstrations + the query
    verb = pb.evaluate_task(model, tok, task, examples, method="verbalizer")
    assert verb["metrics"]["invalid_rate"] == 0.0  # argmax over label words always yields a label
    assert [p["extracted"] for p in verb["predictions"]] == [
        task.extract_answer(p["output"]) for p in verb["predictions"]
    ]
    with pytest.raises(ValueError, match="classification"):
        pb.evaluate_task(model, tok, get_task("gsm8k"), [], method="verbalizer")


def test_prompting_cli_writes_records(tiny_dirs, tmp_path):
    rc = pb.main(
        [
            "--model",
            str(tiny_dirs["llama"]),
            "--task",
            "gsm8k",
            "--shots",
            "0",
            "1",
            "--data-dir",
            str(FIXTURES),
            "--max-new-tokens",
            "4",
            "--record-dir",
            str(tmp_path / "rec"),
            "--predictions",
            str(tmp_path / "pred.jsonl"),
        ]
    )
    assert rc == 0
    record = read_record(tmp_path / "rec" / "prompt-llama-gsm8k-1shot.json")
    assert record["protocol"]["shots"] == 1 and record["protocol"]["shot_source"] == "train"
    assert record["metrics"]["n"] == 2.0
    lines = (tmp_path / "pred-0shot.jsonl").read_text().splitlines()
    assert len(lines) == 2 and set(json.loads(lines[0])) == {"id", "output", "extracted", "correct"}


# ------------------------------------------------------------------------------------------ finetuning


def test_split_slices():
    assert ft.parse_split("test[:400]") == ("test", slice(None, 400))
    assert ft.parse_split("fold0/dev") == ("fold0/dev", slice(None))
    with pytest.raises(ValueError, match="name\\[start:stop\\]"):
        ft.parse_split("test[4]")


def test_lora_finetune_gpt2_sst2_end_to_end(tiny_dirs, tmp_path):
    cfg = ft.FinetuneConfig(
        model=str(tiny_dirs["gpt2"]),
        task="sst2",
        data_dir=str(FIXTURES),
        r=4,
        max_new_tokens=2,
        record=str(tmp_path / "rec.json"),
        train=tiny_train(tmp_path),
    )
    result = ft.finetune(cfg)
    assert result["step"] == 3
    assert {"accuracy", "before/accuracy", "train/loss"} <= set(result["metrics"])
    assert len(Path(result["predictions"]).read_text().splitlines()) == 3
    record = read_record(tmp_path / "rec.json")
    assert record["protocol"]["train_split"] == "train" and record["protocol"]["n_train"] == 4
    # The saved adapter reloads and changes the base model's output.
    base, tok = load_model(str(tiny_dirs["gpt2"]))
    ids = tok("Review: fine\nSentiment:", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = base(ids).logits
        tuned = load_adapter(base, result["saved"])(ids).logits
    assert not torch.allclose(plain, tuned)


def test_lora_finetune_t5_samsum_on_disjoint_slices(tiny_dirs, tmp_path):
    cfg = ft.FinetuneConfig(
        model=str(tiny_dirs["t5"]),
        task="samsum",
        data_dir=str(FIXTURES),
        train_split="test[:1]",
        eval_split="test[1:]",
        max_new_tokens=4,
        eval_before=False,
        train=tiny_train(tmp_path, batch_size=1, max_steps=2),
    )
    result = ft.finetune(cfg)
    assert {"rouge1", "rouge2", "rougeL"} <= set(result["metrics"])
    assert (Path(result["saved"]) / "adapter_config.json").is_file()
    overlapping = dataclasses.replace(cfg, eval_split="test")
    with pytest.raises(ValueError, match="also training examples"):
        ft.finetune(overlapping)
    with pytest.raises(FileNotFoundError, match=r"--train-split 'test\[:400\]'"):
        ft.finetune(dataclasses.replace(cfg, train_split="train"))


def test_qlora_finetune_llama_gsm8k(tiny_dirs, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = ft.FinetuneConfig(
        model=str(tiny_dirs["llama"]),
        task="gsm8k",
        method="qlora",
        data_dir=str(FIXTURES),
        max_new_tokens=4,
        train=tiny_train(tmp_path, batch_size=1, max_steps=2),
    )
    result = ft.finetune(cfg)  # eval before + probe + 2 steps + eval after: the CPU repack guard holds
    assert result["step"] == 2 and "accuracy" in result["metrics"] and "before/accuracy" in result["metrics"]


def test_finetune_cli_parses_flags_and_train_overrides():
    cfg = ft.config_from_args(
        [
            "--model",
            "m",
            "--task",
            "gsm8k",
            "--qlora",
            "--steps",
            "7",
            "--train.warmup_steps",
            "2",
            "--limit",
            "5",
        ]
    )
    assert (cfg.method, cfg.train.max_steps, cfg.train.warmup_steps, cfg.limit) == ("qlora", 7, 2, 5)
    with pytest.raises(SystemExit):
        ft.config_from_args(["--bogus.field", "1"])
    assert ft.config_from_args(["--qlora", "--lora"]).method == "lora"  # last wins (wrapper-script defaults)


# ------------------------------------------------------------------------------------------ engine path + verbalizer


def _full_forward_verbalizer(model, tok, prompts, words):
    """Reference: one uncached full forward per prompt (task_datasets' collator + verbalizer_logits)."""
    from modern_llm.data.task_datasets import VerbalizerCollator, verbalizer_logits

    collate = VerbalizerCollator(
        tok,
        words,
        max_length=pb.context_limit(model),  # long k-shot prompts are cut from the left, as in the scorer
        add_special_tokens=not pb._adds_bos_itself(tok, prompts),
    )
    with torch.no_grad():
        return torch.cat([verbalizer_logits(model, collate([{"prompt": p, "label": 0}])) for p in prompts])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_verbalizer_scores_with_shared_prefix_match_full_forwards(tiny_dirs, arch):
    model, tok = load_model(str(tiny_dirs[arch]))
    task = get_task("sst2")
    examples = task.load("validation", data_dir=FIXTURES)
    pool = task.load("train", data_dir=FIXTURES)
    # The byte tokenizer splits " negative"/" positive" into the same first byte; bare words differ at once.
    words = ["negative", "positive"] if arch == "llama" else [" negative", " positive"]
    for shots in (0, 2):  # 0: only the instruction is shared; 2: instruction + demonstrations
        prompts = pb.build_prompts(task, examples, tok, shots=shots, shot_pool=pool)
        assert pb.shared_prefix_length([tok(p)["input_ids"] for p in prompts]) > 5
        got = pb.verbalizer_scores(model, tok, prompts, words, batch_size=2)  # 3 prompts: a short last batch
        torch.testing.assert_close(
            got, _full_forward_verbalizer(model, tok, prompts, words), atol=1e-4, rtol=1e-4
        )
    # No shared prefix at all (different first tokens): plain forwards, same answer.
    prompts = ["Great movie\nSentiment:", "Awful\nSentiment:"]
    got = pb.verbalizer_scores(model, tok, prompts, words)
    torch.testing.assert_close(
        got, _full_forward_verbalizer(model, tok, prompts, words), atol=1e-4, rtol=1e-4
    )


def test_shared_prefix_length_leaves_each_row_a_token():
    assert pb.shared_prefix_length([[1, 2, 3], [1, 2, 4]]) == 2
    assert pb.shared_prefix_length([[1, 2], [1, 2, 3]]) == 1  # the shorter row keeps its last token
    assert pb.shared_prefix_length([[5], [6]]) == 0


def test_lora_model_generates_through_the_engine_like_hf_generate(tiny_dirs):
    from modern_llm.hf.lora_utils import apply_lora

    base, tok = load_model(str(tiny_dirs["llama"]))
    model = apply_lora(base, r=4, init_lora_weights=False)  # random B: the adapters change the output
    prompts = ["Question: 1+1?\nAnswer:", "Hi"]
    texts = pb.generate_texts(model, tok, prompts, max_new_tokens=5)
    assert model.training  # restored after generation
    model.eval()
    for prompt, text in zip(prompts, texts):
        enc = tok(prompt, return_tensors="pt")
        ref = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert text == tok.decode(ref[0, enc.input_ids.shape[1] :], skip_special_tokens=True)


def test_generation_cuts_at_stop_strings_and_truncates_long_prompts_from_the_left(tiny_dirs):
    model, tok = load_model(str(tiny_dirs["llama"]))
    full = pb.generate_texts(model, tok, ["abc"], max_new_tokens=8)[0]
    assert len(full) >= 2  # byte tokenizer: one character per generated byte token
    stop = full[1]
    cut = pb.generate_texts(model, tok, ["abc"], max_new_tokens=8, stop=[stop])[0]
    assert cut == full[: full.index(stop)]
    x9 = tok("x" * 9, add_special_tokens=False)["input_ids"]
    assert pb.encode_prompts(tok, ["y" + "x" * 50], max_prompt=9) == [x9]  # the start is cut
    # A prompt that starts with BOS (as chat templates write it) keeps it in front of the kept tail.
    assert pb.encode_prompts(tok, ["<s>" + "x" * 50], max_prompt=10) == [[tok.bos_token_id, *x9]]
    with pytest.raises(ValueError, match="no room for a prompt"):
        pb.generate_texts(model, tok, ["x"], max_new_tokens=256)
