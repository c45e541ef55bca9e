"""HF parity: ModernDecoderLM vs LlamaForCausalLM / MixtralForCausalLM with copied weights (fp32)."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

from modern_llm.config import ModernLLMConfig
from modern_llm.models import ModernDecoderLM
from modern_llm.models.hf_convert import UnsupportedExport, export_hf, from_hf_model, import_hf, to_hf_model

TOL = 1e-4


def tiny(**kw):
    base = dict(
        vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, rope_theta=500.0, max_seq_len=64
    )
    return ModernLLMConfig(**(base | kw))


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 4}, {"n_kv_heads": 1, "tie_embeddings": False}])
def test_dense_matches_hf_llama_built_independently(kw):
    """Build HF Llama from ITS OWN random init, import into ours, compare logits (not our export path)."""
    cfg = tiny(**kw)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            tie_word_embeddings=cfg.tie_embeddings,
            max_position_embeddings=64,
            rms_norm_eps=cfg.norm_eps,
        )
    ).eval()
    with torch.no_grad():  # make norms non-trivial so a mis-mapped gain would show
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    ours = from_hf_model(hf)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        diff = (ours(ids).logits - hf(ids).logits).abs().max().item()
    assert diff < TOL


def test_moe_matches_hf_mixtral_built_independently():
    hf = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=97,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
        )
    ).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "experts" in n or "mlp.gate" in n:
                p.normal_(0, 0.2)  # HF init leaves these tiny; larger weights make routing matter
    ours = from_hf_model(hf)
    assert ours.config.moe_layers == [0, 1]
    ids = torch.randint(0, 97, (3, 21))
    with torch.no_grad():
        diff = (ours(ids).logits - hf(ids).logits).abs().max().item()
    assert diff < TOL


@pytest.mark.parametrize("kw", [{}, {"moe_layers": [0, 1], "moe_capacity_factor": 1.0}])
def test_export_folder_loads_with_automodel_and_matches(tmp_path, kw):
    model = ModernDecoderLM(tiny(**kw)).eval()
    export_hf(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        ref = model(ids).logits
        assert (hf(ids).logits - ref).abs().max().item() < TOL
        back = import_hf(tmp_path / "hf")
        assert torch.equal(back(ids).logits, ref)


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"n_sinks": 2}, "sinks"),
        ({"qk_norm": True}, "qk_norm"),
        ({"pos_encoding": "learned"}, "pos_encoding"),
        ({"moe_layers": [1]}, "every layer"),
    ],
)
def test_unrepresentable_features_refuse_to_export(kw, needle):
    with pytest.raises(UnsupportedExport, match=needle):
        to_hf_model(ModernDecoderLM(tiny(**kw)))


def test_export_takes_special_ids_from_tokenizer_not_llama_defaults():
    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 0, 0, 1

    hf = to_hf_model(ModernDecoderLM(tiny()))
    assert hf.config.eos_token_id is None and hf.generation_config.eos_token_id is None
    hf = to_hf_model(ModernDecoderLM(tiny()), Tok())
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.generation_config.pad_token_id) == (0, 0, 1)


def test_import_refuses_unmerged_lora_adapters():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )
    lora = get_peft_model(hf, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="merge_and_unload"):
        from_hf_model(lora.get_base_model())
    from_hf_model(lora.merge_and_unload())  # merged: imports fine
