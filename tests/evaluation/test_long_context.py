"""Long-context harness: per-token NLL per method, cache parameters, stream forming, metrics, config errors,
and one tiny end-to-end run (train both models, evaluate, record + PNGs + log, then reuse the run folders)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from modern_llm.config import ModernLLMConfig
from modern_llm.data.tokenizer import train_bpe_tokenizer
from modern_llm.evaluation.long_context import (
    METHODS,
    LongContextConfig,
    LongContextEvalConfig,
    form_streams,
    length_metrics,
    load_long_context_config,
    main,
    method_cache,
    moving_average,
    run_experiment,
    separator_ids,
    split_documents,
    stream_nll,
)
from modern_llm.inference.streaming import StreamingKVCache, streaming_perplexity
from modern_llm.models import ModernDecoderLM
from modern_llm.utils.records import RECORD_KEYS

VOCAB = 64


def make_model(**kw):
    torch.manual_seed(0)
    base = dict(
        vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, init_std=0.2
    )
    return ModernDecoderLM(ModernLLMConfig(**(base | kw))).eval()


@torch.no_grad()
def fresh_window_reference(model, ids, window):
    """Independent reference for window_recompute: one forward per prediction, no batching or reuse."""
    out = []
    for t in range(len(ids) - 1):
        ctx = ids[max(0, t - window + 1) : t + 1]
        out.append(F.cross_entropy(model(ctx[None]).logits[0, -1], ids[t + 1]))
    return torch.stack(out)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kw", [{}, {"n_sinks": 2}])
def test_every_method_gives_finite_nll_per_predicted_token(method, kw):
    model = make_model(**kw)
    ids = torch.randint(0, VOCAB, (50,))
    nll = stream_nll(model, ids, method, cache_budget=8, n_sink=2, recompute_batch=7)
    assert nll.shape == (49,) and nll.dtype == torch.float32
    assert torch.isfinite(nll).all() and (nll > 0).all()


@pytest.mark.parametrize("kw", [{}, {"n_sinks": 1}])
def test_batched_streams_equal_the_single_stream_reference_harness(kw):
    # streaming_perplexity (inference.streaming) scores one stream at a time; we run all streams as one batch
    model = make_model(**kw)
    streams = torch.randint(0, VOCAB, (3, 40))
    for method, kind, n_sink, window in (
        ("window", "window", 0, 7),
        ("sink", "sink", 2, 5),
        ("dense", "dense", 0, 1),
    ):
        got = stream_nll(model, streams, method, cache_budget=8, n_sink=2)
        assert got.shape == (3, 39)
        for row, ids in zip(got, streams):
            chunk = 40 if kind == "dense" else 1
            ref = streaming_perplexity(model, ids, kind, n_sink=n_sink, window=window, chunk_size=chunk).nll
            torch.testing.assert_close(row, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"n_sinks": 1}])
def test_budget_covering_the_stream_makes_every_method_equal_dense(kw):
    model = make_model(**kw)
    ids = torch.randint(0, VOCAB, (30,))
    dense = stream_nll(model, ids, "dense", cache_budget=30)
    full = F.cross_entropy(model(ids[None]).logits[0, :-1], ids[1:], reduction="none")
    torch.testing.assert_close(dense, full.detach(), atol=1e-5, rtol=1e-5)
    for method in ("window", "sink", "window_recompute"):
        got = stream_nll(model, ids, method, cache_budget=30, n_sink=4)
        torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)


def test_window_recompute_matches_one_fresh_forward_per_token():
    model = make_model()
    ids = torch.randint(0, VOCAB, (40,))
    got = stream_nll(model, ids, "window_recompute", cache_budget=9, recompute_batch=5)
    torch.testing.assert_close(got, fresh_window_reference(model, ids, 9), atol=1e-5, rtol=1e-5)


def test_window_cache_equals_recompute_only_for_a_one_layer_model():
    # With one layer, K/V depend on the token alone (RoPE is relative), so a stale cache loses nothing; with two,
    # layer-2 K/V were computed from contexts that later get evicted, which is what separates the methods.
    ids = torch.randint(0, VOCAB, (40,))
    one = make_model(n_layers=1)
    torch.testing.assert_close(
        stream_nll(one, ids, "window", cache_budget=8),
        stream_nll(one, ids, "window_recompute", cache_budget=8),
        atol=1e-5,
        rtol=1e-5,
    )
    two = make_model()
    stale = stream_nll(two, ids, "window", cache_budget=8)
    fresh = stream_nll(two, ids, "window_recompute", cache_budget=8)
    torch.testing.assert_close(stale[:8], fresh[:8], atol=1e-5, rtol=1e-5)  # nothing evicted yet
    assert not torch.allclose(stale[10:], fresh[10:], atol=1e-3)


def test_sink_method_keeps_exactly_the_first_n_sink_tokens_and_the_budget():
    model = make_model()
    budget, n_sink = 10, 3
    kind, sinks, window = method_cache("sink", budget, n_sink)
    assert (kind, sinks, window) == ("sink", 3, 6)
    ids = torch.randint(0, VOCAB, (40,))
    cache = StreamingKVCache.for_model(model, sinks, window)
    nll = []
    with torch.no_grad():
        for t in range(39):
            logits = model(ids[None, t : t + 1], kv_cache=cache).logits[0, -1]
            nll.append(F.cross_entropy(logits, ids[t + 1]))
            # after the forward, a query has seen the sinks, `window` past tokens and itself = budget tokens
            assert cache.length == min(t + 1, budget - 1)
    assert cache.kept[:n_sink].tolist() == [0, 1, 2]
    assert cache.kept[n_sink:].tolist() == list(range(39 - window, 39))
    torch.testing.assert_close(stream_nll(model, ids, "sink", budget, n_sink), torch.stack(nll))
    assert method_cache("window", budget, n_sink) == ("window", 0, 9)
    with pytest.raises(ValueError, match="no recent window"):
        method_cache("sink", 4, 3)


def test_form_streams_join_whole_documents_and_never_share_one():
    eos = 0
    tokens = [0, 5, 6, 7, 0, 8, 9, 0, 1, 2, 3, 4, 0, 5, 0, 6, 6, 6, 0]
    assert [d.tolist() for d in split_documents(tokens, eos)] == [
        [5, 6, 7],
        [8, 9],
        [1, 2, 3, 4],
        [5],
        [6, 6, 6],
    ]
    streams = form_streams(tokens, eos, length=5, n_streams=10)
    # stream 1 ends in the <eos> before doc [8, 9]; stream 2 reaches into [1, 2, 3, 4], so stream 3 starts at [5]
    assert streams.tolist() == [[0, 5, 6, 7, 0], [0, 8, 9, 0, 1], [0, 5, 0, 6, 6]]
    assert form_streams(tokens, eos, length=5, n_streams=2).shape == (2, 5)
    joined = form_streams(tokens, eos, length=7, n_streams=10, separator=[3, 3])
    assert joined.tolist() == [[0, 5, 6, 7, 3, 3, 8], [0, 1, 2, 3, 4, 3, 3], [0, 5, 3, 3, 6, 6, 6]]
    with pytest.raises(ValueError, match="eval.lengths"):
        form_streams(tokens, eos, length=40, n_streams=1)


def test_newline_separator_is_a_blank_line_without_eos():
    tok = train_bpe_tokenizer(["one two.\n\nthree four. " * 20], vocab_size=300)
    assert separator_ids(tok, "eos") == [tok.eos_token_id]
    sep = separator_ids(tok, "newline")
    assert tok.decode(sep) == "\n\n" and tok.eos_token_id not in sep


def test_length_metrics_pool_prefixes_and_count_decoded_bytes():
    tok = train_bpe_tokenizer(["the cat sat on the mat. " * 20, "a dog ran. " * 20], vocab_size=300)
    eos = tok.eos_token_id
    text_ids = tok.encode("the cat sat on the mat. a dog ran.")
    streams = torch.tensor([[eos, *text_ids[:9]], [eos, *text_ids[-9:]]])  # (2, 10)
    nll = torch.rand(2, 9) + 0.5
    out = length_metrics(nll, streams, tok, lengths=[4, 10], tail_tokens=2)
    assert out["4"]["ppl"] == pytest.approx(math.exp(nll[:, :3].mean().item()), rel=1e-6)
    assert out["4"]["tail_ppl"] == pytest.approx(math.exp(nll[:, 1:3].mean().item()), rel=1e-6)
    full_bytes = sum(len(tok.decode(s[1:].tolist()).encode()) for s in streams)
    assert out["10"]["n_bytes"] == full_bytes and out["10"]["n_tokens"] == 18
    assert out["10"]["bpb"] == pytest.approx(nll.sum().item() / (math.log(2) * full_bytes), rel=1e-6)
    tail_bytes = sum(len(tok.decode(s[8:].tolist()).encode()) for s in streams)
    assert out["10"]["tail_bpb"] == pytest.approx(
        nll[:, 7:].sum().item() / (math.log(2) * tail_bytes), rel=1e-6
    )


def test_attention_stats_index_eos_columns_after_the_learnable_sinks():
    from modern_llm.evaluation.attention_viz import modern_attention_maps
    from modern_llm.evaluation.long_context import ModelUnderTest, attention_sink_stats

    class Tok:  # only the eos id is read
        eos_token_id = 0

    model = make_model(n_sinks=2)
    streams = torch.randint(1, VOCAB, (2, 12))
    streams[:, 0] = 0
    streams[0, [3, 7]] = 0
    streams[1, 9] = 0
    mut = ModelUnderTest("learned_sink", model, Tok(), "tiny", 10, {})
    stats = attention_sink_stats(mut, streams, LongContextEvalConfig())  # cache budget = training context 10
    assert stats["tokens"] == 10
    expected, uniform = [], []
    for ids, eos_at in ((streams[0], [3, 7]), (streams[1], [9])):
        probs = modern_attention_maps(model, ids[:10])  # (L, H, 10, 2 + 10)
        expected.append(probs[..., [2 + p for p in eos_at]].sum(-1)[:, :, 1:].mean(dim=(1, 2)))
        uniform.append(sum(sum(p <= i for p in eos_at) / (2 + i + 1) for i in range(1, 10)) / 9)
    torch.testing.assert_close(torch.tensor(stats["later_eos_mass_per_layer"]), torch.stack(expected).mean(0))
    assert stats["later_eos_mass_uniform"] == pytest.approx(sum(uniform) / 2)
    assert len(stats["sink_mass_per_layer"]) == 2 and stats["sink_mass_uniform"] > 0


def test_log_verdicts_use_pooled_ppl_and_quote_the_worst_tail():
    from modern_llm.evaluation.long_context import describe_results

    def row(ppl, tail):
        return {"ppl": ppl, "tail_ppl": tail, "bpb": 1.0}

    per_len = {
        "window": {"64": row(20, 20), "256": row(100, 500), "512": row(60, 25)},  # collapse, partial recovery
        "sink": {"64": row(20, 20), "256": row(18, 18), "512": row(17, 14)},
    }
    result, meaning = describe_results({"newline": {"pretrained": per_len}}, [64, 256, 512], budget=64)
    assert "pretrained/window blows up (x3.00; worst tail x25.00)" in meaning
    assert "pretrained/sink stays flat (x0.85; worst tail x0.90)" in meaning
    assert "worst tail PPL 500.00@256" in result


def test_moving_average_is_trailing():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2).tolist() == [1.0, 2.0, 4.0, 6.0]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"eval.lengths": [1, 64]}, "eval.lengths"),
        ({"eval.methods": ["dense", "ring"]}, "eval.methods"),
        ({"eval.split": "train"}, "eval.split"),
        ({"eval.separators": ["eos", "tab"]}, "eval.separators"),
        ({"eval.n_sink": 0}, "eval.n_sink"),
        ({"eval.cache_budget": 4}, "eval.cache_budget"),
        ({"eval.n_streams": 0}, "eval.n_streams"),
        ({"learned_sinks": 0}, "learned_sinks"),
        ({"variants": ["no_sink", "big"]}, "variants"),
        ({"variants": []}, "variants"),
        ({"hf_model": "some-model"}, "eval.cache_budget"),
        ({"lm.model.pos_encoding": "learned"}, "lm.model.pos_encoding"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_long_context_config(None, overrides)


def test_yaml_lm_section_only_changes_named_fields_and_cli_errors_exit(tmp_path, capsys):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lm: {train: {max_steps: 70}}\neval: {lengths: [16, 8]}\n")
    cfg = load_long_context_config(yaml_file, ["--eval.n_streams", "3"])
    assert (
        cfg.lm.train.max_steps == 70 and cfg.lm.model.max_seq_len == LongContextConfig().lm.model.max_seq_len
    )
    assert cfg.eval.lengths == [8, 16] and cfg.eval.n_streams == 3
    with pytest.raises(SystemExit):
        main(["--eval.methods", "ring"])
    assert "eval.methods" in capsys.readouterr().err
    assert LongContextEvalConfig().methods == list(METHODS)


def tiny_config(tmp_path, **overrides):
    base = {
        "name": "tiny-lc",
        "out_dir": str(tmp_path / "experiments" / "long_context"),
        "lm.model.d_model": 32,
        "lm.model.n_layers": 2,
        "lm.model.n_heads": 2,
        "lm.model.n_kv_heads": 1,
        "lm.model.max_seq_len": 16,
        "lm.train.out_dir": str(tmp_path / "runs"),
        "lm.train.max_steps": 6,
        "lm.train.batch_size": 4,
        "lm.train.warmup_steps": 1,
        "lm.train.eval_batches": 2,
        "lm.train.progress": False,
        "lm.data.corpus": "embedded:150",
        "lm.data.vocab_size": 400,
        "lm.data.cache_dir": str(tmp_path / "cache"),
        "lm.sample.max_new_tokens": 3,
        "eval.lengths": [8, 16, 32, 64],
        "eval.n_streams": 2,
        "eval.smooth": 4,
    }
    return load_long_context_config(None, base | overrides)


def test_end_to_end_trains_both_models_writes_record_and_reuses_runs(tmp_path):
    cfg = tiny_config(tmp_path)
    record = run_experiment(cfg, command="pytest tiny long-context")
    assert set(record) == set(RECORD_KEYS) and record["command"] == "pytest tiny long-context"
    metrics = record["metrics"]
    assert set(metrics) == {"eos", "newline"}
    for per_variant in metrics.values():
        assert set(per_variant) == {"no_sink", "learned_sink"}
        for per_method in per_variant.values():
            assert set(per_method) == set(METHODS)
            for per_len in per_method.values():
                assert set(per_len) == {"8", "16", "32", "64"}
                assert all(math.isfinite(m["ppl"]) and m["bpb"] > 0 for m in per_len.values())
            # up to the cache budget (= training context 16) nothing is evicted: every method equals dense
            for method in ("window", "sink", "window_recompute"):
                assert per_method[method]["16"]["ppl"] == pytest.approx(
                    per_method["dense"]["16"]["ppl"], rel=1e-4
                )
    models = record["protocol"]["models"]
    assert models["no_sink"]["n_sinks"] == 0 and models["learned_sink"]["n_sinks"] == 1
    assert models["no_sink"]["tokenizer_hash"] == models["learned_sink"]["tokenizer_hash"]
    assert models["no_sink"]["eos_per_stream"]["newline"] == 1.0  # only the stream's first token
    for variant, n_sinks in (("no_sink", 0), ("learned_sink", 1)):
        attention = models[variant]["attention"]["newline"]
        assert len(attention["first_token_mass_per_layer"]) == 2
        assert all(0.0 <= x <= 1.0 for x in attention["first_token_mass_per_layer"])
        assert ("sink_mass_per_layer" in attention) == bool(n_sinks)
    out = tmp_path / "experiments" / "long_context"
    assert (out / "tiny-lc_ppl_vs_length.png").stat().st_size > 0
    assert (out / "tiny-lc_nll_vs_position.png").stat().st_size > 0
    curves = json.loads((out / "tiny-lc_curves.json").read_text())["mean_nll_by_position"]
    assert len(curves["newline"]["learned_sink"]["sink"]) == 63
    assert "long-context (tiny-lc)" in (tmp_path / "experiments" / "LOG.md").read_text()

    reused = tiny_config(
        tmp_path,
        no_sink_run=str(tmp_path / "runs" / "no_sink"),
        learned_sink_run=str(tmp_path / "runs" / "learned_sink"),
        log=False,
        **{"eval.methods": ["dense", "sink"]},
    )
    again = run_experiment(reused, command="reuse")["metrics"]
    for sep in ("eos", "newline"):
        assert again[sep]["learned_sink"]["sink"]["64"] == pytest.approx(
            metrics[sep]["learned_sink"]["sink"]["64"]
        )
    swapped = tiny_config(
        tmp_path,
        no_sink_run=str(tmp_path / "runs" / "no_sink"),
        learned_sink_run=str(tmp_path / "runs" / "no_sink"),
        log=False,
    )
    with pytest.raises(ValueError, match="learned_sink_run"):
        run_experiment(swapped, command="swap")


def test_pretrained_control_matches_hf_logits_and_runs_without_small_models(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from modern_llm.evaluation.long_context import load_pretrained_control

    tok = train_bpe_tokenizer(["Once upon a time there was a cat. " * 30, "The dog ran home. " * 30], 300)
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    folder = tmp_path / "tiny-llama"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)

    control = load_pretrained_control(str(folder), torch.device("cpu"))
    assert control.variant == "pretrained" and control.train_context == 256
    ids = torch.tensor(tok.encode("Once upon a time there was a cat. The dog ran home."))
    with torch.no_grad():
        ref = F.cross_entropy(hf(ids[None]).logits[0, :-1].float(), ids[1:], reduction="none")
    torch.testing.assert_close(
        stream_nll(control.model, ids, "dense", cache_budget=8), ref, atol=1e-4, rtol=1e-4
    )

    cfg = tiny_config(
        tmp_path,
        variants=[],
        hf_model=str(folder),
        log=False,
        **{"eval.cache_budget": 8, "eval.methods": ["sink"]},
    )
    record = run_experiment(cfg, command="control")
    assert set(record["metrics"]["eos"]) == {"pretrained"}
    assert record["protocol"]["models"]["pretrained"]["cache_budget"] == 8
    assert record["protocol"]["models"]["pretrained"]["tail_tokens"] == 4
