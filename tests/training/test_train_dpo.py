"""DPO stage: pair encoding, precomputed references (policy / adapter-disabled base), training moves rewards."""

from __future__ import annotations

import json

import pytest
import torch

from modern_llm.alignment.dpo_loss import next_token_targets, sequence_logprobs
from modern_llm.config.model_config import ModernLLMConfig
from modern_llm.config.train_config import TrainConfig
from modern_llm.data.preference_datasets import PreferencePair
from modern_llm.data.tokenizer import train_bpe_tokenizer
from modern_llm.models.transformer import ModernDecoderLM
from modern_llm.training.train_dpo import (
    DPOCollator,
    DPOConfig,
    encode_pairs,
    main,
    make_dpo_loss,
    precompute_reference_logps,
    train_dpo,
)

PAIRS = [
    PreferencePair([{"role": "user", "content": f"Is {i} even?"}], "yes" if i % 2 == 0 else "no", "maybe")
    for i in range(8)
]


@pytest.fixture(scope="module")
def tok():
    texts = ["Is 0 1 2 3 4 5 6 7 even? yes no maybe Human Assistant"] * 30
    return train_bpe_tokenizer(texts, 300)


def _native(seed=0):
    torch.manual_seed(seed)
    return ModernDecoderLM(ModernLLMConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, max_seq_len=64))


def _tiny_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )


def _train_cfg(tmp_path, steps, **kw):
    base = dict(
        out_dir=str(tmp_path / "run"),
        device="cpu",
        dtype="fp32",
        batch_size=4,
        max_steps=steps,
        lr=3e-3,
        warmup_steps=1,
        progress=False,
        tensorboard=False,
        log_every=1,
    )
    return TrainConfig(**(base | kw))


def test_encoding_shares_the_prompt_and_masks_it(tok):
    (item,) = encode_pairs(PAIRS[:1], tok, max_length=64, chat=True)
    prompt_len = item["chosen_labels"].count(-100)
    assert item["chosen_ids"][:prompt_len] == item["rejected_ids"][: item["rejected_labels"].count(-100)]
    assert tok.decode(item["chosen_ids"][prompt_len:]) == "yes<|endoftext|>"
    assert item["chosen_labels"][prompt_len:] == item["chosen_ids"][prompt_len:]
    plain = encode_pairs(PAIRS[:1], tok, max_length=64, chat=False)[0]
    assert tok.decode(plain["chosen_ids"]).startswith("\n\nHuman: Is 0 even?\n\nAssistant: yes")


def test_collator_stacks_chosen_then_rejected(tok):
    items = encode_pairs(PAIRS[:3], tok, max_length=64, chat=True)
    batch = DPOCollator(tok.pad_token_id)(items)
    assert batch["input_ids"].shape[0] == 6
    for i, it in enumerate(items):
        n = len(it["chosen_ids"])
        assert batch["input_ids"][i, :n].tolist() == it["chosen_ids"]
        assert batch["labels"][i + 3, : len(it["rejected_ids"])].tolist() == it["rejected_labels"]
        assert batch["attention_mask"][i].sum() == n
    assert "ref_chosen_logps" not in batch  # only once references are computed


def test_reference_equals_policy_so_first_loss_is_log2(tok):
    model = _native()
    items = encode_pairs(PAIRS, tok, max_length=64, chat=True)
    precompute_reference_logps(model, items, tok.pad_token_id, batch_size=3)
    batch = DPOCollator(tok.pad_token_id)(items[:4])
    # the stored references are exactly the sequence log-probs of chosen/rejected under the model
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits
    logps = sequence_logprobs(logits, next_token_targets(batch["labels"]))
    torch.testing.assert_close(batch["ref_chosen_logps"], logps[:4])
    torch.testing.assert_close(batch["ref_rejected_logps"], logps[4:])
    loss, metrics = make_dpo_loss(DPOConfig(beta=0.1))(model, batch)
    assert loss.item() == pytest.approx(0.6931472, abs=1e-5)
    assert float(metrics["rewards/margin"]) == pytest.approx(0.0, abs=1e-5)
    assert float(metrics["logps/chosen"]) == pytest.approx(float(logps[:4].mean()), abs=1e-5)


def test_training_raises_reward_margin_and_accuracy(tmp_path, tok):
    model = _native()
    summary = train_dpo(
        model, tok, PAIRS, DPOConfig(beta=0.5), _train_cfg(tmp_path, 25), eval_pairs=PAIRS[:4]
    )
    assert summary["eval/rewards/accuracy"] == 1.0
    assert summary["eval/rewards/margin"] > 1.0
    assert summary["eval/loss"] < 0.3
    assert summary["train/rewards/chosen"] > summary["train/rewards/rejected"]


def test_adapter_disabled_reference_is_the_base_model(tok):
    from modern_llm.hf.lora_utils import apply_lora

    base = _tiny_llama(tok)
    items = encode_pairs(PAIRS[:4], tok, max_length=64, chat=True)
    base_items = [dict(it) for it in items]
    precompute_reference_logps(base, base_items, tok.pad_token_id)
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, init_lora_weights=False)  # adapter changes outputs
    policy_items = [dict(it) for it in items]
    precompute_reference_logps(model, policy_items, tok.pad_token_id, reference="policy")
    disabled_items = [dict(it) for it in items]
    precompute_reference_logps(model, disabled_items, tok.pad_token_id, reference="adapter_disabled")
    for b, p, d in zip(base_items, policy_items, disabled_items):
        assert d["ref_chosen_logps"] == pytest.approx(b["ref_chosen_logps"], abs=1e-4)
        assert abs(p["ref_chosen_logps"] - b["ref_chosen_logps"]) > 1e-3
    assert model.training  # restored
    with pytest.raises(ValueError, match="PEFT"):
        precompute_reference_logps(_native(), items, tok.pad_token_id, reference="adapter_disabled")


def test_config_validation():
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0)
    with pytest.raises(ValueError, match="reference"):
        DPOConfig(reference="copy")
    with pytest.raises(ValueError, match="loss_type"):
        DPOConfig(loss_type="hinge")


def test_cli_on_an_hh_rlhf_style_file(tmp_path, tok):
    from modern_llm.training.train_sft import save_policy

    policy = save_policy(_tiny_llama(tok), tok, tmp_path / "policy")
    rows = [
        {
            "chosen": f"\n\nHuman: Is {i} even?\n\nAssistant: yes",
            "rejected": f"\n\nHuman: Is {i} even?\n\nAssistant: no",
        }
        for i in range(10)
    ]
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, record = tmp_path / "dpo", tmp_path / "dpo.json"
    argv = [
        "--policy", str(policy), "--pairs", str(data), "--eval_fraction", "0.2", "--dpo.chat", "false",
        "--lora.enabled", "true", "--lora.dropout", "0.0", "--dpo.reference", "adapter_disabled",
        "--train.out_dir", str(out), "--train.max_steps", "2", "--train.batch_size", "2",
        "--train.warmup_steps", "1", "--train.device", "cpu", "--train.progress", "false",
        "--train.tensorboard", "false", "--train.save_trainable_only", "true", "--record", str(record),
    ]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads(record.read_text())["metrics"]
    assert "eval/rewards/accuracy" in metrics and "train/logps/chosen" in metrics
    assert (out / "final" / "config.json").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


def test_sft_weight_adds_the_chosen_per_token_nll(tok):
    model = _native()
    items = encode_pairs(PAIRS[:4], tok, max_length=64, chat=True)
    precompute_reference_logps(model, items, tok.pad_token_id)
    batch = DPOCollator(tok.pad_token_id)(items)
    loss, metrics = make_dpo_loss(DPOConfig(beta=0.1, sft_weight=0.5))(model, batch)
    # the chosen rows are the first half of the batch; their per-token NLL by hand
    with torch.no_grad():
        logits = model(batch["input_ids"][:4]).logits
    targets = next_token_targets(batch["labels"][:4])
    per_token = -sequence_logprobs(logits, targets) / (targets != -100).sum(1)
    assert float(metrics["nll/chosen"]) == pytest.approx(float(per_token.mean()), rel=1e-5)
    assert loss.item() == pytest.approx(0.6931472 + 0.5 * float(per_token.mean()), rel=1e-5)
    with pytest.raises(ValueError, match="sft_weight"):
        DPOConfig(sft_weight=-1.0)


# ----------------------------------------------------------------------------------------------- prompt sharing

VARIED = [
    PreferencePair(
        [{"role": "user", "content": "Is " + " ".join(str(j) for j in range(i + 1)) + " even?"}],
        " ".join(["yes"] * (1 + i % 3)),
        " ".join(["no", "maybe"] * (1 + i % 2)),
    )
    for i in range(6)
]


def _tiny_gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128)
    ).eval()


@pytest.mark.parametrize("build", [_tiny_llama, _tiny_gpt2])
def test_prompt_shared_logps_equal_the_stacked_layout(tok, build):
    from modern_llm.training.train_dpo import pair_logps

    model = build(tok).eval()
    items = encode_pairs(VARIED, tok, max_length=64, chat=True)
    stacked = DPOCollator(tok.pad_token_id, share_prompt=False)(items)
    shared = DPOCollator(tok.pad_token_id, share_prompt=True)(items)
    assert "segment" in shared and shared["input_ids"].shape[0] == len(items)
    with torch.no_grad():
        want = pair_logps(model, stacked)
        got = pair_logps(model, shared)
    for w, g in zip(want, got):  # chosen (B,), rejected (B,), completion lengths (2B,)
        torch.testing.assert_close(g, w.to(g.dtype), atol=1e-5, rtol=1e-5)


def test_prompt_shared_gradients_equal_the_stacked_layout(tok):
    model = _tiny_llama(tok).train()
    items = encode_pairs(VARIED, tok, max_length=64, chat=True)
    precompute_reference_logps(model, items, tok.pad_token_id, share_prompt=False)
    loss_fn = make_dpo_loss(DPOConfig(beta=0.5))
    grads = []
    for share in (False, True):
        model.zero_grad()
        loss_fn(model, DPOCollator(tok.pad_token_id, share)(items))[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)


def test_prompt_sharing_falls_back_to_stacking_when_prompts_differ(tok):
    items = encode_pairs(VARIED[:2], tok, max_length=64, chat=True)
    items[1]["rejected_ids"] = [items[1]["rejected_ids"][0] + 1] + items[1]["rejected_ids"][1:]
    batch = DPOCollator(tok.pad_token_id, share_prompt=True)(items)
    assert "segment" not in batch and batch["input_ids"].shape[0] == 4


def test_scratch_models_refuse_per_row_positions():
    from modern_llm.training.train_sft import causal_lm_logits

    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="Hugging Face model"):
        causal_lm_logits(_native(), ids, None, 0, torch.arange(4)[None])


def test_prompt_sharing_only_where_a_boolean_mask_means_may_attend(tok):
    from modern_llm.training.train_dpo import takes_boolean_4d_mask

    sdpa = _tiny_llama(tok)
    assert sdpa.config._attn_implementation == "sdpa" and takes_boolean_4d_mask(sdpa)
    sdpa.config._attn_implementation = "eager"  # eager attention adds the mask to the scores
    assert not takes_boolean_4d_mask(sdpa)
    assert not takes_boolean_4d_mask(_native())
