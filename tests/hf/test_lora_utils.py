"""LoRA/QLoRA on tiny random Llama, GPT-2 and T5: training signal, save/reload, merge, 4-bit CPU gradients."""

from __future__ import annotations

import pytest
import torch

from modern_llm.hf import lora_utils
from modern_llm.hf.lora_utils import (
    apply_lora,
    assert_lora_gradients,
    load_adapter,
    lora_parameters,
    merge_adapter,
    save_adapter,
    trainable_parameters,
    trainable_summary,
)
from modern_llm.hf.registry import load_model

ARCHS = ["llama", "gpt2", "t5"]


def fixed_batch(model, tok) -> dict[str, torch.Tensor]:
    texts = ["the cat sat on the mat", "a dog ran in the park!"]
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    batch = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}
    if model.config.is_encoder_decoder:
        batch["labels"] = tok(["summary one", "summary two"], return_tensors="pt", padding=True).input_ids
    return batch


def train_step(model, batch, lr=1e-2) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = model(**batch).loss
    loss.backward()
    assert_lora_gradients(model)
    opt.step()
    opt.zero_grad()
    return loss.item()


def eval_logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_step_lowers_loss_and_only_adapters_train(tiny_dirs, arch):
    base, tok = load_model(str(tiny_dirs[arch]))
    frozen_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = apply_lora(base, r=4, alpha=8, dropout=0.0)
    batch = fixed_batch(model, tok)
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < total
    assert trainable == sum(p.numel() for p in lora_parameters(model).values())
    first = train_step(model, batch)
    second = train_step(model, batch)
    assert second < first
    for name, param in model.get_base_model().named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            torch.testing.assert_close(param, frozen_before[key], rtol=0, atol=0)


def test_default_targets_per_architecture(tiny_dirs):
    wrapped = {}
    for arch in ARCHS:
        model = apply_lora(load_model(str(tiny_dirs[arch]))[0], r=2)
        wrapped[arch] = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped["llama"] == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert wrapped["gpt2"] == {"c_attn", "c_proj", "c_fc"}
    assert wrapped["t5"] == {"q", "k", "v", "o", "wi", "wo"}


def test_target_override_and_unknown_architecture(tiny_dirs):
    model = apply_lora(load_model(str(tiny_dirs["llama"]))[0], r=2, target_modules=["q_proj"])
    assert {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")} == {"q_proj"}
    base = load_model(str(tiny_dirs["llama"]))[0]
    base.config.model_type = "mystery"
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(base)
    with pytest.raises(ValueError, match="rank"):
        apply_lora(load_model(str(tiny_dirs["llama"]))[0], r=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_reload_adapter_gives_identical_logits(tiny_dirs, tmp_path, arch):
    base, tok = load_model(str(tiny_dirs[arch]))
    model = apply_lora(base, r=4, dropout=0.0, init_lora_weights=False)
    batch = fixed_batch(model, tok)
    train_step(model, batch)
    expected = eval_logits(model, batch)
    save_adapter(model, tmp_path / "adapter", tokenizer=tok)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    fresh_base, _ = load_model(str(tiny_dirs[arch]))
    reloaded = load_adapter(fresh_base, tmp_path / "adapter")
    torch.testing.assert_close(eval_logits(reloaded, batch), expected, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(load_model(str(tiny_dirs[arch]))[0], tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_matches_adapter_model(tiny_dirs, arch):
    base, tok = load_model(str(tiny_dirs[arch]))
    model = apply_lora(base, r=4, dropout=0.0)
    batch = fixed_batch(model, tok)
    train_step(model, batch)  # a trained-sized adapter (random init B would be far larger than real ones)
    with model.disable_adapter():
        no_adapter = eval_logits(model, batch)
    adapted = eval_logits(model, batch)
    assert not torch.allclose(adapted, no_adapter, atol=1e-4)  # the adapter really changes the output
    merged = merge_adapter(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(eval_logits(merged, batch), adapted, rtol=0, atol=1e-5)


def test_qlora_cpu_step_gets_gradients_even_after_eval_forward(tiny_dirs):
    pytest.importorskip("bitsandbytes")
    base, tok = load_model(str(tiny_dirs["llama"]), quantization="4bit")
    assert lora_utils.is_quantized_4bit(base)
    model = apply_lora(base, r=4, dropout=0.0)
    batch = fixed_batch(model, tok)
    eval_logits(model, batch)  # a trainer's eval pass: would repack the 4-bit weights on AVX512-BF16 CPUs
    model.train()
    before = {n: p.detach().clone() for n, p in lora_parameters(model).items()}
    train_step(model, batch)  # asserts non-zero LoRA grads
    changed = [n for n, p in lora_parameters(model).items() if not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed)
    with pytest.raises(ValueError, match="refusing to merge"):
        merge_adapter(model)
    # Logical weight count: the 4-bit layers count their weights, not their packed bytes.
    _, total = trainable_parameters(model)
    full, _ = load_model(str(tiny_dirs["llama"]))
    assert total == sum(p.numel() for p in full.parameters()) + sum(p.numel() for p in before.values())


def test_gradient_check_flags_a_disconnected_adapter(tiny_dirs):
    model = apply_lora(load_model(str(tiny_dirs["llama"]))[0], r=2)
    with pytest.raises(RuntimeError, match="LoRA-adapted layers got no gradient"):
        assert_lora_gradients(model)  # no backward yet: every grad is None
    assert "trainable" in trainable_summary(model) and "%" in trainable_summary(model)


def test_qlora_guard_undoes_an_earlier_cpu_repack(tiny_dirs):
    pytest.importorskip("bitsandbytes")
    base, tok = load_model(str(tiny_dirs["llama"]), quantization="4bit")
    batch = fixed_batch(base, tok)
    eval_logits(base, batch)  # eval-mode forward before LoRA exists: may repack in place on this CPU
    model = apply_lora(base, r=4, dropout=0.0)
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False)
    train_step(model, batch)


def test_mixtral_experts_are_adapted_through_target_parameters():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = apply_lora(MixtralForCausalLM(cfg), r=2, dropout=0.0)
    ids = torch.randint(0, 64, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    assert_lora_gradients(model)
    adapted = {n.split(".lora_")[0].split(".")[-1] for n in lora_parameters(model)}
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= adapted
    assert any("experts" in n for n in lora_parameters(model))
