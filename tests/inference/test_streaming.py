"""Streaming (sink + window) cache: eviction, re-indexed RoPE, equality with dense and banded references."""

import pytest
import torch

from modern_llm.config import ModernLLMConfig
from modern_llm.inference.streaming import StreamingKVCache, streaming_perplexity
from modern_llm.models import ModernDecoderLM
from modern_llm.models.attention import apply_rope, rope_cos_sin


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP threads
    # waiting at a barrier for a descheduled peer made small matmuls ~100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


VOCAB = 64


def make_model(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.2)
    return ModernDecoderLM(ModernLLMConfig(**(base | kw))).eval()


class BandedReferenceCache:
    """Test reference: keeps every token at its ABSOLUTE position and masks attention to the sinks plus the
    ``window`` previous tokens, through the model's ``attn_mask`` cache hook."""

    def __init__(self, n_layers, n_sink, window):
        self.n_layers, self.n_sink, self.window = n_layers, n_sink, window
        self.k, self.v, self.length, self.attn_mask = [None] * n_layers, [None] * n_layers, 0, None

    @property
    def next_position(self):
        return self.length

    def update(self, layer, k, v):
        self.k[layer] = k if self.k[layer] is None else torch.cat([self.k[layer], k], 2)
        self.v[layer] = v if self.v[layer] is None else torch.cat([self.v[layer], v], 2)
        S, T = self.k[layer].shape[2], k.shape[2]
        if layer == 0:
            q = torch.arange(S - T, S)[:, None]
            j = torch.arange(S)[None, :]
            self.attn_mask = ((j <= q) & ((j < self.n_sink) | (q - j <= self.window)))[None, None]
        if layer == self.n_layers - 1:
            self.length = S
        return self.k[layer], self.v[layer]


@torch.no_grad()
def reference_nll(model, ids, n_sink, window):
    cache = BandedReferenceCache(model.config.n_layers, n_sink, window)
    nll = []
    for t in range(len(ids) - 1):
        logits = model(ids[None, t : t + 1], kv_cache=cache).logits[0, -1]
        nll.append(torch.nn.functional.cross_entropy(logits, ids[t + 1]))
    return torch.stack(nll)


def test_eviction_keeps_sinks_and_the_recent_window():
    model = make_model(n_kv_heads=2)
    cache = StreamingKVCache.for_model(model, n_sink=2, window=5)
    with torch.no_grad():
        for t in range(20):
            model(torch.tensor([[t % VOCAB]]), kv_cache=cache)
            assert cache.length == min(t + 1, 7) and cache.k[0].shape[2] == cache.length
    assert cache.kept.tolist() == [0, 1, 15, 16, 17, 18, 19]
    assert cache.next_position == 7 and cache.n_seen == 20


def test_returned_keys_are_rotated_by_cache_index():
    cache = StreamingKVCache(n_layers=1, n_sink=1, window=2, head_dim=8, rope_theta=10000.0)
    raw = torch.randn(1, 1, 6, 8)  # keys of 6 tokens before RoPE
    for t in range(6):
        pos = torch.tensor([cache.next_position])
        rotated_by_model = apply_rope(raw[:, :, t : t + 1], *rope_cos_sin(pos, 8, 10000.0))
        keys, _ = cache.update(0, rotated_by_model, torch.zeros(1, 1, 1, 8))
    kept_raw = raw[:, :, [0, 3, 4, 5]]  # sink token 0, the window (tokens 3, 4) and the current token 5
    expected = apply_rope(kept_raw, *rope_cos_sin(torch.arange(4), 8, 10000.0))
    torch.testing.assert_close(keys, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 1, "n_sinks": 2}, {"moe_layers": [1]}, {"qk_norm": True}])
def test_window_covering_the_stream_equals_dense(kw):
    model = make_model(**kw)
    ids = torch.randint(0, VOCAB, (24,))
    dense = streaming_perplexity(model, ids, "dense")
    full = torch.nn.functional.cross_entropy(model(ids[None]).logits[0, :-1], ids[1:], reduction="none")
    torch.testing.assert_close(dense.nll, full.detach(), atol=1e-5, rtol=1e-5)
    for kind, n_sink in (("sink", 4), ("window", 0)):
        got = streaming_perplexity(model, ids, kind, n_sink=n_sink, window=24)
        torch.testing.assert_close(got.nll, dense.nll, atol=1e-5, rtol=1e-5)
    chunked = streaming_perplexity(model, ids, "sink", window=32, chunk_size=5)
    torch.testing.assert_close(chunked.nll, dense.nll, atol=1e-5, rtol=1e-5)


def test_window_only_with_rope_equals_banded_attention_at_absolute_positions():
    # RoPE scores depend on relative distance only, and the window is contiguous, so re-indexing inside the
    # cache must give exactly what a sliding-window mask over absolute positions gives.
    model = make_model(n_kv_heads=2)
    ids = torch.randint(0, VOCAB, (30,))
    got = streaming_perplexity(model, ids, "window", window=6)
    torch.testing.assert_close(got.nll, reference_nll(model, ids, 0, 6), atol=1e-5, rtol=1e-5)


def test_sinks_with_nope_equal_sink_plus_band_mask():
    # Without positions the only effect of the cache is WHICH tokens are visible: sinks + window + self.
    model = make_model(pos_encoding="none")
    ids = torch.randint(0, VOCAB, (30,))
    got = streaming_perplexity(model, ids, "sink", n_sink=3, window=5)
    torch.testing.assert_close(got.nll, reference_nll(model, ids, 3, 5), atol=1e-5, rtol=1e-5)
    dense = streaming_perplexity(model, ids, "dense")
    assert not torch.allclose(got.nll, dense.nll, atol=1e-3)  # eviction really happened


def test_sinks_change_results_once_the_window_slides_and_chunks_stay_finite():
    model = make_model()
    ids = torch.randint(0, VOCAB, (50,))
    sink = streaming_perplexity(model, ids, "sink", n_sink=2, window=8)
    window = streaming_perplexity(model, ids, "window", window=8)
    torch.testing.assert_close(sink.nll[:8], window.nll[:8], atol=1e-5, rtol=1e-5)  # nothing evicted yet
    assert not torch.allclose(sink.nll[12:], window.nll[12:], atol=1e-4)
    chunked = streaming_perplexity(model, ids, "sink", n_sink=2, window=8, chunk_size=4)
    assert chunked.nll.shape == (49,) and torch.isfinite(chunked.nll).all()
    assert sink.perplexity == pytest.approx(torch.exp(sink.nll.mean()).item(), rel=1e-6)


def test_bad_arguments_raise():
    model = make_model()
    ids = torch.randint(0, VOCAB, (10,))
    with pytest.raises(ValueError, match="cache_kind"):
        streaming_perplexity(model, ids, "ring")
    with pytest.raises(ValueError, match="n_sink"):
        streaming_perplexity(model, ids, "window", n_sink=4)
    with pytest.raises(ValueError, match="at least 2"):
        streaming_perplexity(model, ids[:1], "dense")
    with pytest.raises(ValueError, match="window"):
        StreamingKVCache.for_model(model, n_sink=2, window=0)
    with pytest.raises(ValueError, match="learned"):
        StreamingKVCache.for_model(make_model(pos_encoding="learned"), n_sink=2, window=4)
