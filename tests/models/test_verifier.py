"""Verifier model: last-token pooling, padding invariance, trunk kinds, save/load round trip."""

from __future__ import annotations

import pytest
import torch

from modern_llm.config.model_config import ModernLLMConfig
from modern_llm.models.transformer import ModernDecoderLM
from modern_llm.models.verifier import (
    Verifier,
    inference_verifier,
    load_verifier,
    save_verifier,
    verifier_from_lm,
)


def _lm(seed=0):
    torch.manual_seed(seed)
    return ModernDecoderLM(ModernLLMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64))


def _randomize_head(v: Verifier) -> None:
    torch.nn.init.normal_(v.head.weight)


def test_native_trunk_is_a_copy_and_head_starts_at_half():
    lm = _lm()
    v = verifier_from_lm(lm)
    assert v.kind == "native" and v.hidden_size == 32
    ids = torch.randint(0, 64, (3, 10))
    assert torch.equal(v(ids), torch.zeros(3))  # zero-initialised head: P(correct) = 0.5 everywhere
    # training the verifier never touches the policy
    next(v.trunk.parameters()).data.add_(1.0)
    assert not torch.equal(next(v.trunk.parameters()), next(lm.parameters()))
    assert isinstance(lm.lm_head, torch.nn.Linear)


def test_score_uses_the_last_real_token_and_ignores_right_padding():
    v = verifier_from_lm(_lm())
    _randomize_head(v)
    v.eval()
    a = torch.randint(0, 64, (1, 7))
    b = torch.randint(0, 64, (1, 4))
    padded = torch.zeros(2, 7, dtype=torch.long)
    padded[0], padded[1, :4] = a[0], b[0]
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    batch_scores = v(padded, mask)
    torch.testing.assert_close(batch_scores, torch.cat([v(a), v(b)]))
    # the pooled state is the trunk's final hidden state at that position
    hidden = v.hidden_states(a, None)
    torch.testing.assert_close(v(a), v.head(hidden[:, -1]).squeeze(-1))


def test_hf_trunk_matches_last_hidden_state(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    v = verifier_from_lm(lm)
    _randomize_head(v)
    assert v.kind == "hf"
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    hidden = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    expected = v.head(torch.stack([hidden[0, 5], hidden[1, 2]])).squeeze(-1)
    torch.testing.assert_close(v(ids, mask), expected, rtol=1e-5, atol=1e-5)

    folder = save_verifier(v, tmp_path / "hf_verifier")
    again = load_verifier(folder)
    torch.testing.assert_close(again(ids, mask), v(ids, mask), rtol=1e-5, atol=1e-5)


def test_native_save_load_roundtrip(tmp_path):
    v = verifier_from_lm(_lm())
    _randomize_head(v)
    v.eval()
    ids = torch.randint(0, 64, (2, 9))
    folder = save_verifier(v, tmp_path / "v")
    again = load_verifier(folder)
    torch.testing.assert_close(again(ids), v(ids))
    with pytest.raises(FileNotFoundError, match="save_verifier"):
        load_verifier(tmp_path / "missing")


def test_bad_trunk_is_rejected():
    with pytest.raises(ValueError, match="trunk"):
        verifier_from_lm(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="kind"):
        Verifier(torch.nn.Identity(), 4, "other")


def test_bf16_inference_verifier_is_a_copy_with_an_fp32_head_and_close_scores():
    v = verifier_from_lm(_lm())
    _randomize_head(v)
    v.eval()
    assert inference_verifier(v) is v  # fp32: nothing copied
    fast = inference_verifier(v, torch.bfloat16)
    assert {p.dtype for p in fast.trunk.parameters()} == {torch.bfloat16}
    assert fast.head.weight.dtype == torch.float32 and {p.dtype for p in v.parameters()} == {torch.float32}
    ids = torch.randint(0, 64, (4, 12))
    scores = fast(ids)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, v(ids), atol=0.1, rtol=0.05)  # bf16 trunk: close, not equal
