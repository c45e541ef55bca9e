"""Attention maps: rows are distributions, they reproduce each module's output, and match HF's own maps."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modern_llm.config.base import config_to_dict
from modern_llm.config.model_config import ModernLLMConfig
from modern_llm.data.tokenizer import train_bpe_tokenizer
from modern_llm.evaluation import attention_viz as av
from modern_llm.models.attention import Attention
from modern_llm.models.hf_convert import from_hf_model
from modern_llm.models.transformer import ModernDecoderLM
from modern_llm.utils.checkpointing import save_checkpoint

VARIANTS = {
    "mha": {},
    "gqa": {"n_kv_heads": 2},
    "sinks": {"n_sinks": 2},
    "qk_norm_gqa_sinks": {"qk_norm": True, "n_kv_heads": 1, "n_sinks": 3},
    "nope": {"pos_encoding": "none"},
}


def peaky(model: torch.nn.Module, std: float = 0.4) -> torch.nn.Module:
    """Scale attention weights up so maps are far from uniform (a wrong mask or head order then shows)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("qkv", "sink_k", "q_proj", "k_proj")):
                p.normal_(0.0, std)
    return model


def tiny_model(**kw) -> ModernDecoderLM:
    cfg = ModernLLMConfig(
        **({"vocab_size": 61, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32} | kw)
    )
    return peaky(ModernDecoderLM(cfg)).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rows_sum_to_one_and_respect_causality(variant):
    model = tiny_model(**VARIANTS[variant])
    S = model.config.n_sinks
    ids = torch.randint(0, 61, (11,))
    probs = av.modern_attention_maps(model, ids)
    assert probs.shape == (2, 4, 11, S + 11)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 11), atol=1e-5, rtol=0)
    future = ~av.causal_mask_with_sinks(11, S)
    assert probs[..., future].abs().max() == 0  # no query looks ahead
    assert probs.std() > 0.05  # not a degenerate uniform map


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_probs_times_values_reproduce_module_output(variant):
    """The visualised probabilities are the ones the model used: P @ V -> out-proj == the module's output."""
    model = tiny_model(**VARIANTS[variant])
    ids = torch.randint(0, 61, (2, 9))  # a batch too: hooks must not mix prompts up
    captures = av.capture_modern_attention(model, ids)
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(captures) == len(modules) == 2
    for attn, cap in zip(modules, captures):
        heads = cap.probs @ cap.values  # (B, H, T, D)
        rebuilt = attn.out(heads.transpose(1, 2).reshape(2, 9, -1))
        torch.testing.assert_close(rebuilt, cap.output, atol=1e-5, rtol=1e-4)
    assert av.reconstruction_error(model, ids[:1]) < 1e-5


def test_reconstruction_detects_a_wrong_map():
    """Guard against a vacuous check: a deliberately wrong (non-causal) map must fail to reproduce the output."""
    model = tiny_model(n_sinks=1)
    ids = torch.randint(0, 61, (1, 8))
    cap = av.capture_modern_attention(model, ids)[0]
    wrong = cap.probs.flip(-2)  # rows of other queries
    attn = model.blocks[0].attn
    rebuilt = attn.out((wrong @ cap.values).transpose(1, 2).reshape(1, 8, -1))
    assert (rebuilt - cap.output).abs().max() > 1e-3


def test_maps_are_unchanged_by_hooks_and_model_mode_restored():
    model = tiny_model(n_sinks=2).train()
    ids = torch.randint(0, 61, (1, 7))
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
    model.train()
    av.modern_attention_maps(model, ids)
    assert model.training  # mode restored
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)


def tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=67,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    return peaky(LlamaForCausalLM(cfg)).eval()


def test_hf_eager_maps_are_distributions_and_equal_ours_after_import():
    hf = tiny_llama()
    hf.set_attn_implementation("sdpa")  # the helper must switch to eager itself and switch back
    ids = torch.randint(0, 67, (13,))
    theirs = av.hf_attention_maps(hf, ids)
    assert hf.config._attn_implementation == "sdpa"
    assert theirs.shape == (2, 4, 13, 13)
    torch.testing.assert_close(theirs.sum(-1), torch.ones(2, 4, 13), atol=1e-5, rtol=0)
    ours = av.modern_attention_maps(from_hf_model(hf), ids)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert theirs.std() > 0.05


def test_sink_statistics_on_hand_made_maps():
    T, S = 4, 1
    probs = torch.zeros(1, 1, T, S + T)
    probs[..., 0] = 0.5  # half of every row on the learnable sink
    for i in range(T):
        probs[0, 0, i, S] += 0.5  # the other half on the first token
    assert av.sink_mass(probs, S) == [pytest.approx(0.5)]
    assert av.first_token_mass(probs, S, n_first=1) == [pytest.approx(0.5)]
    # uniform attention over the 1 sink + (i+1) tokens, queries 0..3: mean of 1/2, 1/3, 1/4, 1/5
    assert av.uniform_mass(T, S, 1) == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4)
    summary = av.sink_summary(probs, S)
    assert set(summary) == {
        "sink_mass_per_layer",
        "sink_mass_uniform",
        "first_token_mass_per_layer",
        "first_token_mass_uniform",
    }
    with pytest.raises(ValueError, match="n_first"):
        av.first_token_mass(probs, S, n_first=T)


def test_plots_are_written(tmp_path):
    model = tiny_model(n_sinks=2, n_kv_heads=2)
    ids = torch.randint(0, 61, (6,))
    probs = av.modern_attention_maps(model, ids)
    report = av.visualize(probs, [f"t{i}" for i in range(6)], 2, tmp_path, layers=[1], title="tiny")
    names = sorted(p.name for p in report.files)
    assert names == ["layer_01.png", "sink_mass.png"]
    for p in report.files:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    with pytest.raises(ValueError, match="out of range"):
        av.visualize(probs, [f"t{i}" for i in range(6)], 2, tmp_path, layers=[5])


def test_cli_on_a_trainer_checkpoint(tmp_path):
    tok = train_bpe_tokenizer(["the cat sat on the mat"] * 20, vocab_size=300)
    cfg = ModernLLMConfig(vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4, n_sinks=1, max_seq_len=32)
    model = ModernDecoderLM(cfg)
    ckpt = save_checkpoint(
        tmp_path / "run" / "checkpoints",
        5,
        model,
        {"step": 5},
        {"model": config_to_dict(cfg), "train": {"lr": 1e-3}},
        extra_files=lambda d: tok.save_pretrained(str(d / "tokenizer")),
    )
    out = tmp_path / "attn"
    rc = av.main(["--checkpoint", str(tmp_path / "run"), "--prompt", "the cat sat", "--out-dir", str(out)])
    assert rc == 0
    folder = out / ckpt.name
    record = json.loads((folder / "summary.json").read_text())
    assert record["task"] == "attention-viz" and record["protocol"]["n_sinks"] == 1
    assert len(record["metrics"]["sink_mass_per_layer"]) == 2
    assert record["metrics"]["reconstruction_max_abs_err"] < 1e-5
    assert {"layer_00.png", "layer_01.png", "sink_mass.png"} <= {p.name for p in folder.iterdir()}


def test_cli_on_an_hf_folder(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=train_bpe_tokenizer(["abc"] * 5, 300).backend_tokenizer)
    tok.eos_token = "<|endoftext|>"
    hf = tiny_llama()
    hf.resize_token_embeddings(len(tok))
    hf.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    rc = av.main(["--hf-model", str(tmp_path / "hf"), "--prompt", "abc abc", "--out-dir", str(tmp_path / "o"),
                  "--name", "tiny", "--add-bos"])  # fmt: skip
    assert rc == 0
    record = json.loads((tmp_path / "o" / "tiny" / "summary.json").read_text())
    assert record["protocol"]["source"] == "hf-eager-output_attentions"
    assert "sink_mass_per_layer" not in record["metrics"]
    assert len(record["metrics"]["first_token_mass_per_layer"]) == 2


def test_cli_checkpoint_without_tokenizer_names_the_fix(tmp_path):
    cfg = ModernLLMConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=4, max_seq_len=32)
    save_checkpoint(tmp_path / "run", 1, ModernDecoderLM(cfg), {"step": 1}, {"model": config_to_dict(cfg)})
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        av.main(["--checkpoint", str(tmp_path / "run"), "--prompt", "hi", "--out-dir", str(tmp_path)])


def test_cli_needs_a_model():
    with pytest.raises(SystemExit):
        av.main(["--prompt", "hi"])
