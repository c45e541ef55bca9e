"""SFT stage: prompt-masked loss (vs a hand computation and HF's own loss), training, LoRA, policy I/O, CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from modern_llm.config.model_config import ModernLLMConfig
from modern_llm.config.train_config import TrainConfig
from modern_llm.data.task_datasets import CausalLMCollator
from modern_llm.data.tokenizer import train_bpe_tokenizer
from modern_llm.models.transformer import ModernDecoderLM
from modern_llm.training.train_sft import (
    LoRAConfig,
    causal_lm_logits,
    first_target_position,
    inference_model,
    load_policy,
    main,
    maybe_apply_lora,
    save_policy,
    sft_loss,
    stop_token_ids,
    train_sft,
)

RECORDS = [
    {"prompt": "Q: one plus one\nA:", "completion": " two"},
    {"prompt": "Q: two plus two\nA:", "completion": " four"},
    {"prompt": "Q: three plus three\nA:", "completion": " six"},
    {"prompt": "Q: four plus four\nA:", "completion": " eight"},
]


@pytest.fixture(scope="module")
def tok():
    texts = [r["prompt"] + r["completion"] for r in RECORDS] * 20
    return train_bpe_tokenizer(texts, 300)


def _native(tok, seed=0):
    torch.manual_seed(seed)
    cfg = ModernLLMConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    assert len(tok) <= cfg.vocab_size
    return ModernDecoderLM(cfg)


def _tiny_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    return LlamaForCausalLM(cfg)


def _train_cfg(tmp_path, steps, **kw):
    base = dict(
        out_dir=str(tmp_path / "run"),
        device="cpu",
        dtype="fp32",
        batch_size=4,
        max_steps=steps,
        lr=5e-3,
        warmup_steps=2,
        progress=False,
        tensorboard=False,
        log_every=steps,
    )
    return TrainConfig(**(base | kw))


def test_loss_counts_completion_tokens_only(tok):
    model = _native(tok).eval()
    batch = CausalLMCollator(tok, max_length=64)(RECORDS)
    loss, m = sft_loss(model, batch)
    # by hand: position t predicts token t+1; only label positions (completion + EOS) count
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits
    total, count = 0.0, 0
    for b in range(len(RECORDS)):
        for t in range(batch["input_ids"].shape[1] - 1):
            target = int(batch["labels"][b, t + 1])
            if target != -100:
                total += float(F.cross_entropy(logits[b, t][None], torch.tensor([target])))
                count += 1
    completion_tokens = sum(len(tok(r["completion"])["input_ids"]) + 1 for r in RECORDS)  # + EOS
    assert int(m["n_tokens"]) == count == completion_tokens
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    assert float(m["nll_sum"]) == pytest.approx(total, rel=1e-5)


def test_loss_equals_hf_causal_lm_loss(tok):
    model = _tiny_llama(tok).eval()
    batch = CausalLMCollator(tok, max_length=64)(RECORDS)
    ours, _ = sft_loss(model, batch)
    hf = model(**batch).loss  # HF shifts labels internally and ignores -100
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-5)


def test_unmasking_the_prompt_adds_its_tokens_to_the_loss(tok):
    model = _native(tok).eval()
    batch = CausalLMCollator(tok, max_length=64)(RECORDS)
    unmasked = dict(batch, labels=torch.where(batch["attention_mask"] == 1, batch["input_ids"], -100))
    masked_n, full_n = sft_loss(model, batch)[1]["n_tokens"], sft_loss(model, unmasked)[1]["n_tokens"]
    prompt_tokens = int((batch["attention_mask"] == 1).sum() - (batch["labels"] != -100).sum())
    assert int(full_n - masked_n) == prompt_tokens - len(RECORDS)  # minus the first token of each row


def test_training_memorises_completions(tmp_path, tok):
    model = _native(tok)
    batch = CausalLMCollator(tok, max_length=64)(RECORDS)
    before = sft_loss(model.eval(), batch)[0].item()
    summary = train_sft(model, tok, RECORDS, _train_cfg(tmp_path, 60), max_length=64)
    after = sft_loss(model.eval(), batch)[0].item()
    assert after < 0.2 * before
    assert summary["step"] == 60
    # greedy decoding through the engine now writes the trained answer and stops at EOS
    from modern_llm.data.preference_datasets import prompt_token_ids
    from modern_llm.inference.engine import generate

    (row,) = generate(
        model, tok, prompt_token_ids(tok, [RECORDS[1]["prompt"]]), eos_token_id=stop_token_ids(tok)
    )
    assert row[0].text == " four" and row[0].finish_reason == "eos"


def test_lora_trains_adapters_only_and_export_merges(tmp_path, tok):
    model = maybe_apply_lora(_tiny_llama(tok), LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_sft(model, tok, RECORDS, _train_cfg(tmp_path, 5, save_trainable_only=True), max_length=64)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    batch = CausalLMCollator(tok, max_length=64)(RECORDS)
    model.eval()
    expected = model(**batch).logits
    folder = save_policy(model, tok, tmp_path / "policy")
    assert not (folder / "adapter_config.json").exists()  # merged into a plain HF folder
    loaded, loaded_tok = load_policy(str(folder))
    torch.testing.assert_close(loaded.eval()(**batch).logits, expected, rtol=1e-4, atol=1e-4)
    assert len(loaded_tok) == len(tok)
    with pytest.raises(ValueError, match="Hugging Face"):
        maybe_apply_lora(_native(tok), LoRAConfig(enabled=True))


def test_native_policy_roundtrip(tmp_path, tok):
    model = _native(tok).eval()
    folder = save_policy(model, tok, tmp_path / "p")
    loaded, loaded_tok = load_policy(str(folder))
    ids = torch.randint(0, len(tok), (2, 8))
    torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits)
    assert loaded_tok.chat_template == tok.chat_template
    assert stop_token_ids(loaded_tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]


def test_cli_trains_a_scratch_model_on_the_arithmetic_task(tmp_path):
    out, record = tmp_path / "sft", tmp_path / "sft.json"
    argv = [
        "--model", "scratch",
        "--scratch.model.d_model", "32", "--scratch.model.n_layers", "1", "--scratch.model.n_heads", "2",
        "--scratch.vocab_size", "300",
        "--data.task", "arithmetic", "--data.limit", "16", "--data.max_length", "160",
        "--train.out_dir", str(out), "--train.max_steps", "2", "--train.batch_size", "4",
        "--train.warmup_steps", "1", "--train.device", "cpu", "--train.progress", "false",
        "--train.tensorboard", "false", "--record", str(record),
    ]  # fmt: skip
    assert main(argv) == 0
    model, tok = load_policy(str(out / "final"))
    assert isinstance(model, ModernDecoderLM) and tok.chat_template
    data = json.loads(record.read_text())
    assert data["protocol"]["n_examples"] == 16 and "train/loss" in data["metrics"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit):  # bad config value -> argparse error naming the field
        main(["--data.max_length", "2"])


def test_bf16_inference_model_is_a_cast_copy_that_leaves_trained_weights_untouched(tok):
    from modern_llm.inference.engine import generate
    from modern_llm.inference.sampling import SamplingParams

    model = maybe_apply_lora(_tiny_llama(tok), LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp32, bf16 = inference_model(model, "fp32"), inference_model(model, "bf16")
    assert fp32 is model.get_base_model()  # no copy at full precision
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert inference_model(bf16, "bf16") is bf16  # already in the target dtype: no second copy
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # trained weights untouched
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    prompt = tok(RECORDS[0]["prompt"])["input_ids"]
    greedy = SamplingParams(max_new_tokens=4)
    out = generate(bf16, tok, [prompt], greedy, ignore_eos=True)[0][0]  # the engine drives the bf16 copy
    assert out.num_generated_tokens == 4
    with pytest.raises(ValueError, match="generation dtype must be one of"):
        inference_model(model, "fp16")


@pytest.mark.parametrize("kind", ["native", "hf", "hf_lora"])
def test_logits_skip_the_prompt_only_prefix_exactly(tok, kind):
    model = {
        "native": lambda: _native(tok),
        "hf": lambda: _tiny_llama(tok),
        "hf_lora": lambda: maybe_apply_lora(_tiny_llama(tok), LoRAConfig(enabled=True, r=4, alpha=8)),
    }[kind]().eval()
    batch = CausalLMCollator(tok, max_length=64)(RECORDS)
    from modern_llm.alignment.dpo_loss import next_token_targets

    start = first_target_position(next_token_targets(batch["labels"]))
    shortest_prompt = min(len(tok(r["prompt"])["input_ids"]) for r in RECORDS)
    assert start == shortest_prompt - 1 > 0  # the last prompt token predicts the first completion token
    with torch.no_grad():
        full, _ = causal_lm_logits(model, batch["input_ids"], batch["attention_mask"])
        kept, _ = causal_lm_logits(model, batch["input_ids"], batch["attention_mask"], start)
    assert kept.shape[1] == full.shape[1] - start
    torch.testing.assert_close(kept, full[:, start:], rtol=1e-5, atol=1e-5)
    assert first_target_position(torch.full((2, 5), -100)) == 0  # nothing to predict: keep everything
