"""KVCache: cached decoding reproduces a full forward (dense, GQA, sinks, MoE, ...), padding, static step."""

import pytest
import torch

from modern_llm.config import ModernLLMConfig
from modern_llm.inference.kv_cache import KVCache, SharedPrefixKVCache, StaticDecodeStep
from modern_llm.models import ModernDecoderLM


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP threads
    # waiting at a barrier for a descheduled peer made small matmuls ~100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


VOCAB = 64
ARCHS = {
    "dense": {},
    "gqa": {"n_kv_heads": 2},
    "mqa_sinks": {"n_kv_heads": 1, "n_sinks": 2},
    "moe": {"moe_layers": [0, 1], "n_kv_heads": 2},
    "qk_norm": {"qk_norm": True},
    "nope": {"pos_encoding": "none"},
    "learned_pos": {"pos_encoding": "learned"},
}


def make_model(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.1)
    return ModernDecoderLM(ModernLLMConfig(**(base | kw))).eval()


@torch.no_grad()
@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefill_then_decode_matches_full_forward(arch):
    model = make_model(**ARCHS[arch])
    ids = torch.randint(0, VOCAB, (2, 14))
    full = model(ids).logits  # (2, 14, V)
    cache = KVCache.for_model(model, batch_size=2, max_len=20)
    got = [model(ids[:, :6], kv_cache=cache).logits]  # prefill 6
    got.append(model(ids[:, 6:9], kv_cache=cache).logits)  # a chunk of 3 after a cache
    for t in range(9, 14):  # then one token at a time
        assert cache.next_position == t
        got.append(model(ids[:, t : t + 1], kv_cache=cache).logits)
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_stores_only_kv_heads_and_preallocates():
    model = make_model(n_kv_heads=1, n_heads=4)
    cache = KVCache.for_model(model, batch_size=3, max_len=11)
    assert len(cache.k) == 2 and cache.k[0].shape == (3, 1, 11, 8)
    before = cache.k[0].data_ptr()
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (3, 4)), kv_cache=cache)
    assert cache.k[0].data_ptr() == before and cache.length == 4


def test_overflow_and_batch_mismatch_raise():
    model = make_model()
    cache = KVCache.for_model(model, batch_size=1, max_len=5)
    with torch.no_grad(), pytest.raises(ValueError, match="max_len=5"):
        model(torch.zeros(1, 6, dtype=torch.long), kv_cache=cache)
    cache = KVCache.for_model(model, batch_size=2, max_len=5)
    with torch.no_grad(), pytest.raises(ValueError, match="batch 2"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        KVCache(2, 1, 0, 4, 8)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["dense", "mqa_sinks", "moe"])
def test_left_padded_rows_match_their_unpadded_forward(arch):
    model = make_model(**ARCHS[arch])
    short, long = torch.randint(0, VOCAB, (1, 4)), torch.randint(0, VOCAB, (1, 9))
    T = 9
    ids = torch.cat([torch.cat([torch.zeros(1, T - 4, dtype=torch.long), short], 1), long])  # (2, 9)
    pad = torch.zeros(2, T, dtype=torch.bool)
    pad[0, : T - 4] = True
    positions = (torch.arange(T)[None] - torch.tensor([[T - 4], [0]])).clamp(min=0)
    cache = KVCache.for_model(model, 2, 16)
    cache.mark_padding(pad)
    logits = model(ids, positions=positions, kv_cache=cache).logits
    torch.testing.assert_close(logits[0, T - 4 :], model(short).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], model(long).logits[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(logits).all()  # padding queries never see an all-masked row
    nxt = torch.randint(0, VOCAB, (2, 1))
    step = model(nxt, positions=torch.tensor([[4], [9]]), kv_cache=cache).logits[:, -1]
    torch.testing.assert_close(
        step[0], model(torch.cat([short, nxt[:1]], 1)).logits[0, -1], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        step[1], model(torch.cat([long, nxt[1:]], 1)).logits[0, -1], atol=1e-5, rtol=1e-5
    )


@torch.no_grad()
def test_expand_and_keep_rows():
    model = make_model(n_kv_heads=2)
    ids = torch.randint(0, VOCAB, (2, 5))
    cache = KVCache.for_model(model, 2, 8)
    model(ids, kv_cache=cache)
    cache.expand(3)  # rows: p0,p0,p0,p1,p1,p1
    assert cache.batch_size == 6
    nxt = torch.randint(0, VOCAB, (6, 1))
    step = model(nxt, kv_cache=cache).logits[:, -1]
    ref = model(torch.cat([ids.repeat_interleave(3, 0), nxt], 1)).logits[:, -1]
    torch.testing.assert_close(step, ref, atol=1e-5, rtol=1e-5)
    cache.keep_rows(torch.tensor([1, 4]))
    nxt2 = torch.randint(0, VOCAB, (2, 1))
    step2 = model(nxt2, kv_cache=cache).logits[:, -1]
    ref2 = model(torch.cat([ids, nxt[[1, 4]], nxt2], 1)).logits[:, -1]
    torch.testing.assert_close(step2, ref2, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["dense", "gqa", "mqa_sinks", "moe", "qk_norm"])
def test_shared_prefix_decode_matches_full_forwards_with_padding_and_dropped_rows(arch):
    """n samples on one stored copy of each (left-padded) prompt == each sample's own full forward."""
    model = make_model(**ARCHS[arch])
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (4, 9, 6)]
    T, n = 9, 3
    ids = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), p]) for p in prompts])
    pad = torch.arange(T)[None] < torch.tensor([[T - len(p)] for p in prompts])
    positions = (torch.arange(T)[None] - torch.tensor([[T - len(p)] for p in prompts])).clamp(min=0)
    prefill = KVCache.for_model(model, 3, T)
    prefill.mark_padding(pad)
    model(ids, positions=positions, kv_cache=prefill)
    cache = SharedPrefixKVCache(prefill, n, max_new=4)
    seqs = [p.clone() for p in prompts for _ in range(n)]  # row p * n + s
    for step in range(4):
        if step == 2:  # drop rows the way the engine drops finished samples; prompt 0 loses all its rows
            keep = [3, 5, 6, 8]
            cache.keep_rows(torch.tensor(keep))
            seqs = [seqs[i] for i in keep]
        nxt = torch.randint(0, VOCAB, (len(seqs), 1))
        pos = torch.tensor([[len(s)] for s in seqs])
        got = model(nxt, positions=pos, kv_cache=cache).logits[:, -1]  # (B, V)
        seqs = [torch.cat([s, t]) for s, t in zip(seqs, nxt)]
        for row, s in enumerate(seqs):
            torch.testing.assert_close(got[row], model(s[None]).logits[0, -1], atol=1e-5, rtol=1e-5)
    assert cache.rows.k[0].shape[2] == 4  # rows hold only their generated tokens, never the prompt


def test_shared_prefix_cache_refuses_multi_token_steps():
    model = make_model()
    prefill = KVCache.for_model(model, 1, 8)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 3)), kv_cache=prefill)
        cache = SharedPrefixKVCache(prefill, 2, max_new=4)
        with pytest.raises(ValueError, match="one token per row"):
            model(torch.randint(0, VOCAB, (2, 2)), kv_cache=cache)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["gqa", "mqa_sinks"])
def test_static_decode_step_matches_dynamic_decode(arch):
    model = make_model(**ARCHS[arch])
    ids = torch.randint(0, VOCAB, (2, 12))
    cache = KVCache.for_model(model, 2, 16)
    model(ids[:, :5], kv_cache=cache)
    step = StaticDecodeStep(model, cache, mode="eager")
    got = [step(ids[:, t], torch.full((2,), t)) for t in range(5, 12)]
    assert cache.length == 12 and cache.attn_mask.shape == (2, 1, 1, 16)
    torch.testing.assert_close(torch.stack(got, 1), model(ids).logits[:, 5:], atol=1e-5, rtol=1e-5)


def test_static_step_rejects_capture_on_cpu_and_moe():
    model = make_model()
    cache = KVCache.for_model(model, 1, 4)
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecodeStep(model, cache, mode="cuda_graph")
    with pytest.raises(ValueError, match="mode"):
        StaticDecodeStep(model, cache, mode="fast")
