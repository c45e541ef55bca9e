"""generate(): batching == unbatched, one prefill for N samples, seeded RNG, stops, streaming, tools, HF parity."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modern_llm.config import ModernLLMConfig
from modern_llm.data.tokenizer import train_bpe_tokenizer
from modern_llm.inference.engine import generate
from modern_llm.inference.sampling import SamplingParams
from modern_llm.inference.tools import calculator_completion
from modern_llm.models import ModernDecoderLM
from modern_llm.models.hf_convert import to_hf_model


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP threads
    # waiting at a barrier for a descheduled peer made small matmuls ~100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CORPUS = [
    "the cat sat on the mat and the dog sat on the log.",
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May, 48+24 = <<48+24=72>>72 in total.",
    "A long time ago, in a quiet town, there lived a small robot who liked numbers.",
] * 20
PROMPTS = ["the cat", "A long time ago, in a quiet town, there lived", "48/2 ="]
GREEDY = SamplingParams(max_new_tokens=12)
SAMPLED = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=11, max_new_tokens=10)


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, vocab_size=320)


def make_model(tok, **kw):
    torch.manual_seed(0)
    base = dict(
        vocab_size=len(tok),
        d_model=32,
        n_layers=2,
        n_heads=4,
        max_seq_len=96,
        init_std=0.3,
        tie_embeddings=False,
    )
    return ModernDecoderLM(ModernLLMConfig(**(base | kw))).eval()


ARCHS = {
    "dense": {},
    "gqa": {"n_kv_heads": 2},
    "sinks": {"n_kv_heads": 1, "n_sinks": 2},
    "moe": {"moe_layers": [1]},
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_batched_prompts_of_different_lengths_equal_unbatched(tok, arch):
    model = make_model(tok, **ARCHS[arch])
    batched = generate(model, tok, PROMPTS, GREEDY, logprobs=True)
    for p, prompt in enumerate(PROMPTS):
        alone = generate(model, tok, prompt, GREEDY, logprobs=True)[0][0]
        got = batched[p][0]
        assert got.token_ids == alone.token_ids and got.text == alone.text
        assert got.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
        assert got.prompt_index == p and got.num_generated_tokens == len(got.token_ids)


def test_num_samples_share_one_prefill(tok):
    model = make_model(tok, n_kv_heads=2)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    try:
        out = generate(model, tok, PROMPTS[:2], SAMPLED, num_samples=3, ignore_eos=True)
    finally:
        handle.remove()
    prompt_len = max(len(tok(p)["input_ids"]) for p in PROMPTS[:2])
    assert calls[0] == (2, prompt_len)  # ONE forward over the prompts, not P * N
    assert all(shape[1] == 1 for shape in calls[1:])  # the rest are single-token decode steps
    assert calls[1] == (6, 1) and len(calls) == SAMPLED.max_new_tokens
    assert [[r.sample_index for r in row] for row in out] == [[0, 1, 2], [0, 1, 2]]


def test_seeded_samples_are_reproducible_independent_and_batch_invariant(tok):
    model = make_model(tok)
    a = generate(model, tok, PROMPTS, SAMPLED, num_samples=4, ignore_eos=True)
    b = generate(model, tok, PROMPTS, SAMPLED, num_samples=4, ignore_eos=True)
    ids = lambda out: [[r.token_ids for r in row] for row in out]  # noqa: E731
    assert ids(a) == ids(b)
    for row in a:  # different sample rows of the same prompt differ
        assert len({tuple(r.token_ids) for r in row}) == 4
    fewer = generate(model, tok, PROMPTS, SAMPLED, num_samples=2, ignore_eos=True)
    assert ids(fewer) == [row[:2] for row in ids(a)]  # sample s does not depend on N
    other_seed = SamplingParams(**{**SAMPLED.__dict__, "seed": 12})
    assert ids(generate(model, tok, PROMPTS, other_seed, num_samples=4, ignore_eos=True)) != ids(a)


def test_stop_strings_truncate_text(tok):
    model = make_model(tok)
    free = generate(model, tok, PROMPTS[1], SamplingParams(max_new_tokens=20), ignore_eos=True)[0][0]
    assert free.finish_reason == "length" and len(free.text) > 6
    stop = free.text[3:6]
    first = free.text.find(stop)
    got = generate(model, tok, PROMPTS[1], SamplingParams(max_new_tokens=20), stop=[stop, "@@never@@"])[0][0]
    assert got.finish_reason == "stop" and got.stop_string == stop
    assert got.text == free.text[:first]
    assert got.token_ids == free.token_ids[: got.num_generated_tokens]
    assert tok.decode(got.token_ids).find(stop) != -1  # the stop-completing token is kept in token_ids


def test_eos_ends_generation(tok):
    model = make_model(tok)
    free = generate(model, tok, PROMPTS[0], GREEDY, ignore_eos=True)[0][0]
    eos = free.token_ids[3]
    first = free.token_ids.index(eos)
    got = generate(model, tok, PROMPTS[0], GREEDY, eos_token_id=eos)[0][0]
    assert got.finish_reason == "eos" and got.token_ids == free.token_ids[: first + 1]
    assert got.text == tok.decode(free.token_ids[:first])


def test_streaming_deltas_reassemble_the_final_text(tok):
    model = make_model(tok)
    free = generate(model, tok, PROMPTS[1], SamplingParams(max_new_tokens=16), ignore_eos=True)[0][0]
    stop = free.text[5:8]
    events = list(generate(model, tok, PROMPTS[1:], SAMPLED, num_samples=2, stop=[stop], stream=True))
    results = generate(model, tok, PROMPTS[1:], SAMPLED, num_samples=2, stop=[stop])
    for p in range(2):
        for s in range(2):
            mine = [e for e in events if (e.prompt_index, e.sample_index) == (p, s)]
            assert mine[-1].finished and sum(e.finished for e in mine) == 1
            assert "".join(e.text for e in mine) == mine[-1].result.text == results[p][s].text
            assert [e.token_id for e in mine] == results[p][s].token_ids
    greedy_events = list(
        generate(model, tok, PROMPTS[1], SamplingParams(max_new_tokens=16), stop=[stop], stream=True)
    )
    assert not any(stop in e.text for e in greedy_events)  # held back, never streamed


def test_stub_tool_insertion_is_teacher_forced_consistently(tok):
    model = make_model(tok, n_kv_heads=2)
    insertion = " sat on the mat"

    def tool(text):
        return insertion if text and insertion not in text else None

    got = generate(model, tok, PROMPTS[0], GREEDY, tools=tool, logprobs=True)[0][0]
    n_ins = len(tok.encode(insertion, add_special_tokens=False))
    assert got.tool_token_mask == [False] + [True] * n_ins + [False] * (len(got.token_ids) - 1 - n_ins)
    assert got.num_tool_tokens == n_ins
    head = tok.decode(got.token_ids[:1])
    assert got.text.startswith(head + insertion)
    # The continuation equals greedy decoding from prompt + first token + inserted tokens: the cache is right.
    forced_prompt = tok(PROMPTS[0])["input_ids"] + got.token_ids[: 1 + n_ins]
    rest = generate(model, tok, [forced_prompt], SamplingParams(max_new_tokens=12 - 1 - n_ins))[0][0]
    assert got.token_ids[1 + n_ins :] == rest.token_ids


def test_real_calculator_inserts_results(tok):
    model = make_model(tok)
    opened = []

    def tools(text):  # open a GSM8K span once, then let the real calculator answer it
        answer = calculator_completion(text)
        if answer is None and not opened:
            opened.append(True)
            return "<<48/2="
        return answer

    got = generate(model, tok, PROMPTS[2], SamplingParams(max_new_tokens=20), tools=tools)[0][0]
    assert "<<48/2=24>>" in got.text
    assert calculator_completion("x <<48/2=") == "24>>"


def test_model_mode_is_restored_and_bad_arguments_raise(tok):
    model = make_model(tok).train()
    generate(model, tok, PROMPTS[0], SamplingParams(max_new_tokens=2))
    assert model.training
    with pytest.raises(ValueError, match="num_samples"):
        generate(model, tok, PROMPTS, num_samples=0)
    with pytest.raises(ValueError, match="stop"):
        generate(model, tok, PROMPTS, stop=[""])
    with pytest.raises(ValueError, match="tools"):
        generate(model, tok, PROMPTS, tools="calculator")
    with pytest.raises(ValueError, match="zero tokens"):
        generate(model, tok, [""])
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, None, ["text"])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, tok, [[1, 2, 10_000]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="transformers causal LM"):
        generate(torch.nn.Linear(2, 2), tok, PROMPTS)


def test_token_id_prompts_without_tokenizer(tok):
    model = make_model(tok)
    ids = tok(PROMPTS[0])["input_ids"]
    a = generate(model, None, [ids], GREEDY)[0][0]
    b = generate(model, tok, PROMPTS[0], GREEDY)[0][0]
    assert a.token_ids == b.token_ids and a.text == ""


# ------------------------------------------------------------------------------------------- HF models


def tiny_llama(vocab_size):
    torch.manual_seed(3)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_engine_on_hf_llama_equals_hf_generate(tok, penalty):
    hf = tiny_llama(len(tok))
    hf.generation_config.pad_token_id = tok.pad_token_id
    hf.generation_config.eos_token_id = tok.eos_token_id
    ours = generate(hf, tok, PROMPTS, SamplingParams(max_new_tokens=12, repetition_penalty=penalty))
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    ref = hf.generate(**enc, do_sample=False, max_new_tokens=12, repetition_penalty=penalty)
    ref = ref[:, enc["input_ids"].shape[1] :].tolist()
    for p, row in enumerate(ours):
        expected = ref[p][: len(row[0].token_ids)]
        assert row[0].token_ids == expected
        if row[0].finish_reason == "length":
            assert len(row[0].token_ids) == 12


def test_hf_backend_appends_in_place_and_matches_hf_dynamic_cache(tok):
    """PreallocatedLayer: decode steps write into one buffer (no per-token copy), and the cache's keys equal
    DynamicCache's after the same prefill, sample expansion, decode steps and row dropping."""
    from transformers import DynamicCache

    from modern_llm.inference.hf_adapter import HFCausalLMBackend

    hf = tiny_llama(len(tok))
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    ours = HFCausalLMBackend(hf)
    ours.prefill(prompts, max_len=40)
    ours.expand(2)
    ref = HFCausalLMBackend(hf)
    ref.prefill(prompts, max_len=40)
    ref.cache = DynamicCache(
        ddp_cache_data=[(layer.keys.clone(), layer.values.clone()) for layer in ref.cache.layers]
    )
    ref.expand(2)
    addresses = []
    for step in range(5):
        if step == 3:  # drop finished rows, as the engine does
            ours.keep_rows(torch.tensor([0, 3, 5]))
            ref.keep_rows(torch.tensor([0, 3, 5]))
        tokens = torch.randint(0, len(tok), (ours.attention_mask.shape[0],))
        torch.testing.assert_close(ours.decode(tokens), ref.decode(tokens), atol=1e-5, rtol=1e-5)
        addresses.append(ours.cache.layers[0].keys.data_ptr())
    for a, b in zip(ours.cache.layers, ref.cache.layers):
        torch.testing.assert_close(a.keys, b.keys)
    # expand and keep_rows replace the tensors (one re-buffering each); plain decode steps never do
    assert addresses[0] == addresses[1] == addresses[2] and addresses[3] == addresses[4]


@pytest.mark.parametrize("arch", ["gqa", "moe_all"])
def test_engine_on_modern_model_equals_engine_on_exported_hf_model(tok, arch):
    kw = {"gqa": {"n_kv_heads": 2}, "moe_all": {"moe_layers": [0, 1], "moe_capacity_factor": 0.0}}[arch]
    model = make_model(tok, **kw)
    hf = to_hf_model(model)
    # to_hf_model keeps Llama's default special ids (eos=2); export_hf sets them from the tokenizer like this
    hf.generation_config.eos_token_id = hf.config.eos_token_id = tok.eos_token_id
    for params, n in ((GREEDY, 1), (SAMPLED, 3)):
        ours = generate(model, tok, PROMPTS, params, num_samples=n, logprobs=True)
        theirs = generate(hf, tok, PROMPTS, params, num_samples=n, logprobs=True)
        for row_a, row_b in zip(ours, theirs):
            for a, b in zip(row_a, row_b):
                assert a.token_ids == b.token_ids and a.text == b.text
                assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


# ------------------------------------------------------------------------------------------- command line


def test_cli_generate_and_chat_on_a_trainer_checkpoint(tok, tmp_path, capsys):
    import io

    import yaml
    from safetensors.torch import save_model

    from modern_llm.config.base import config_to_dict
    from modern_llm.inference.cli import chat_main, generate_main

    model = make_model(tok)
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000010"
    ckpt.mkdir(parents=True)
    save_model(model, str(ckpt / "model.safetensors"))
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"model": config_to_dict(model.config), "train": {}}))
    tok.save_pretrained(str(tmp_path / "run" / "tokenizer"))

    assert (
        generate_main(
            ["--checkpoint", str(tmp_path / "run"), "--prompt", PROMPTS[1], "--max-new-tokens", "9"]
        )
        == 0
    )
    expected = generate(model, tok, PROMPTS[1], SamplingParams(max_new_tokens=9))[0][0].text
    assert capsys.readouterr().out == expected + "\n"

    out = io.StringIO()
    assert (
        chat_main(["--checkpoint", str(ckpt), "--max-new-tokens", "6"], io.StringIO("hi\n/exit\n"), out) == 0
    )
    end_ids = [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)[
        "input_ids"
    ]
    reply = generate(model, tok, [ids], SamplingParams(max_new_tokens=6), eos_token_id=end_ids)[0][0].text
    assert out.getvalue() == reply + "\n"
    with pytest.raises(SystemExit):
        generate_main(["--help"])


@pytest.mark.parametrize("arch", ["gqa", "sinks"])
def test_static_shape_decode_path_equals_eager(tok, arch):
    # rows finish at different steps (EOS = a token the greedy run emits): the static path keeps them in the
    # batch while eager compacts; both must give the same results
    model = make_model(tok, **ARCHS[arch])
    free = generate(model, tok, PROMPTS, SAMPLED, num_samples=2, ignore_eos=True)
    eos = free[0][0].token_ids[3]
    eager = generate(model, tok, PROMPTS, SAMPLED, num_samples=2, eos_token_id=eos, logprobs=True)
    static = generate(
        model, tok, PROMPTS, SAMPLED, num_samples=2, eos_token_id=eos, logprobs=True, decode_mode="static"
    )
    for row_a, row_b in zip(eager, static):
        for a, b in zip(row_a, row_b):
            assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert {r.finish_reason for row in eager for r in row} == {"eos", "length"}
    with pytest.raises(ValueError, match="decode_mode"):
        generate(model, tok, PROMPTS, decode_mode="turbo")
