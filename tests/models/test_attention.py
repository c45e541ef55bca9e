"""Attention: causality, RoPE's relative-position property, GQA == repeated-KV MHA, sinks on the SDPA path."""

import math

import pytest
import torch

from modern_llm.config import ModernLLMConfig
from modern_llm.models import ModernDecoderLM
from modern_llm.models.attention import Attention, apply_rope, rope_cos_sin


def cfg(**kw):
    return ModernLLMConfig(**(dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64) | kw))


@pytest.mark.parametrize(
    "kw", [{}, {"n_sinks": 3}, {"n_kv_heads": 2, "n_sinks": 1}, {"pos_encoding": "none"}]
)
def test_future_tokens_never_change_past_logits(kw):
    model = ModernDecoderLM(cfg(**kw)).eval()
    ids = torch.randint(0, 50, (1, 20))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 7) % 50
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([pq]), 16, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([pk]), 16, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert score(5, 2) == pytest.approx(score(105, 102), abs=1e-4)
    assert score(5, 2) == pytest.approx(score(3, 0), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


def test_rope_preserves_norm():
    x = torch.randn(2, 3, 7, 8)
    cos, sin = rope_cos_sin(torch.arange(7), 8, 10000.0)
    assert torch.allclose(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa_cfg, mha_cfg = cfg(n_kv_heads=2), cfg(n_kv_heads=4)
    gqa, mha = Attention(gqa_cfg, 0).eval(), Attention(mha_cfg, 0).eval()
    D, H, KV = gqa_cfg.head_dim, 4, 2
    with torch.no_grad():
        q, k, v = gqa.qkv.weight.split([H * D, KV * D, KV * D])
        rep = lambda w: w.view(KV, D, -1).repeat_interleave(H // KV, dim=0).reshape(H * D, -1)  # noqa: E731
        mha.qkv.weight.copy_(torch.cat([q, rep(k), rep(v)]))
        mha.out.weight.copy_(gqa.out.weight)
    x = torch.randn(2, 9, 32)
    rope = rope_cos_sin(torch.arange(9), D, 10000.0)
    with torch.no_grad():
        assert torch.allclose(gqa(x, rope), mha(x, rope), atol=1e-6)


def test_gqa_with_all_kv_heads_is_plain_mha():
    """n_kv_heads == n_heads must equal a hand-written multi-head softmax attention."""
    c = cfg(n_kv_heads=4)
    attn = Attention(c, 0).eval()
    x = torch.randn(1, 6, 32)
    rope = rope_cos_sin(torch.arange(6), c.head_dim, 10000.0)
    q, k, v = attn.qkv(x).view(1, 6, 3, 4, 8).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 6, 32)
    with torch.no_grad():
        assert torch.allclose(attn(x, rope), attn.out(ref), atol=1e-5)


def test_sinks_fast_path_matches_explicit_softmax():
    """The dummy-query causal trick equals softmax over [sinks, keys <= i] computed by hand."""
    c = cfg(n_sinks=2, n_kv_heads=2)
    attn = Attention(c, 0).eval()
    B, T, H, KV, D = 2, 7, 4, 2, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, KV, T, D), torch.randn(B, KV, T, D)
    with torch.no_grad():
        fast = attn._attend(q, k, v)
        ks = torch.cat([attn.sink_k.expand(B, -1, -1, -1), k], 2).repeat_interleave(H // KV, 1)
        vs = torch.cat([attn.sink_v.expand(B, -1, -1, -1), v], 2).repeat_interleave(H // KV, 1)
        scores = q @ ks.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, 2 + T)
        blocked = torch.cat(
            [torch.zeros(T, 2, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).triu(1)], 1
        )
        ref = scores.masked_fill(blocked, float("-inf")).softmax(-1) @ vs
    assert torch.allclose(fast, ref, atol=1e-5)


def test_sinks_receive_gradient():
    model = ModernDecoderLM(cfg(n_sinks=2))
    ids = torch.randint(0, 50, (2, 10))
    model(ids, targets=ids).loss.backward()
    assert model.blocks[0].attn.sink_k.grad.abs().sum() > 0
    assert model.blocks[0].attn.sink_v.grad.abs().sum() > 0


class ListCache:
    """Minimal append-only cache, enough to exercise the model's KV-cache hook."""

    def __init__(self):
        self.k, self.v, self.next_position = {}, {}, 0

    def update(self, layer, k, v):
        if layer in self.k:
            k, v = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        self.k[layer], self.v[layer] = k, v
        return k, v


@pytest.mark.parametrize("kw", [{}, {"n_sinks": 2, "n_kv_heads": 2}, {"moe_layers": [1]}])
def test_incremental_decoding_through_cache_hook_matches_full_forward(kw):
    model = ModernDecoderLM(cfg(**kw)).eval()
    ids = torch.randint(0, 50, (2, 15))
    cache = ListCache()
    with torch.no_grad():
        full = model(ids).logits
        chunks = [ids[:, :6], ids[:, 6:10], ids[:, 10:11], ids[:, 11:]]
        outs = []
        for chunk in chunks:
            outs.append(model(chunk, kv_cache=cache).logits)
            cache.next_position += chunk.shape[1]
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)


def test_learned_positions_refuse_to_run_past_max_seq_len():
    model = ModernDecoderLM(cfg(pos_encoding="learned", max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
