"""Tokenizer: BPE training and exact round trips, chat template, GPT-2 BPE ids, loading and fingerprints."""

from __future__ import annotations

import jinja2
import pytest
from transformers import AutoTokenizer

from modern_llm.data.tokenizer import (
    CHAT_END_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    add_chat_format,
    gpt2_tokenizer_dir,
    load_tokenizer,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)

CORPUS = [
    "The cat sat on the mat. The dog sat on the log.",
    "Once upon a time, a little fox found a shiny stone in the forest.",
    "12 + 30 = 42. What is 7 times 8? The answer is 56.",
    "Café, naïve, Übermaß — and a rocket 🚀 with stars ✨.",
] * 20

ROUND_TRIP = [
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "unicode: café naïve Übermaß 東京 Ελληνικά",
    "emoji: 🚀✨👩‍👩‍👧 (family ZWJ sequence)",
    "punctuation , . ; : ' \" @-@ !!",
    "",
]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return load_tokenizer("gpt2-bpe", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_trained_bpe_round_trips_exactly(bpe, text):
    ids = bpe.encode(text, add_special_tokens=False)
    assert bpe.decode(ids) == text
    assert bpe.unk_token_id is None or bpe.unk_token_id not in ids


def test_trained_bpe_vocab_and_special_tokens(bpe):
    assert len(bpe) <= 400
    assert len(bpe) > MIN_VOCAB_SIZE  # it learned merges beyond the byte alphabet
    assert bpe.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    assert bpe.eos_token == bpe.bos_token == EOS_TOKEN
    assert bpe.pad_token == "<|pad|>" and bpe.pad_token_id != bpe.eos_token_id
    # Each special token is one id, and encoding adds none by itself.
    assert (
        bpe.encode("a <|user|> b", add_special_tokens=False).count(bpe.convert_tokens_to_ids("<|user|>")) == 1
    )
    assert bpe.encode("cat", add_special_tokens=True) == bpe.encode("cat", add_special_tokens=False)


def test_trained_bpe_compresses_frequent_words(bpe):
    # "The cat sat" occurs 20 times in the corpus: far fewer tokens than bytes after training.
    assert (
        len(bpe.encode("The cat sat on the mat.", add_special_tokens=False))
        < len("The cat sat on the mat.") / 2
    )


def test_saved_tokenizer_reloads_identically(bpe, tmp_path):
    out = tmp_path / "tok"
    bpe.save_pretrained(out)
    for loaded in (load_tokenizer(out), AutoTokenizer.from_pretrained(out)):
        for text in ROUND_TRIP:
            assert loaded.encode(text, add_special_tokens=False) == bpe.encode(text, add_special_tokens=False)
        assert loaded.chat_template == CHAT_TEMPLATE
        assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(bpe)


def test_train_writes_out_dir(tmp_path):
    tok = train_bpe_tokenizer(iter(CORPUS), vocab_size=300, out_dir=tmp_path / "t")
    assert (tmp_path / "t" / "tokenizer.json").is_file()
    assert load_tokenizer(tmp_path / "t").encode("cat", add_special_tokens=False) == tok.encode(
        "cat", add_special_tokens=False
    )


def test_train_rejects_bad_inputs():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe_tokenizer(CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="no non-empty"):
        train_bpe_tokenizer(["", ""], vocab_size=300)
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        train_bpe_tokenizer(["ok", 3], vocab_size=300)


def test_chat_template_renders_and_masks_assistant(bpe):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "5"},
    ]
    text = bpe.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|endoftext|><|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 2+3?<|end|>\n<|assistant|>\n5<|end|>\n"
    )
    prompt = bpe.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nWhat is 2+3?<|end|>\n<|assistant|>\n")
    assert text.startswith(prompt)

    enc = bpe.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    learned = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert bpe.decode(learned) == "5" + CHAT_END_TOKEN
    # Prompt tokens + completion tokens == tokens of the whole conversation (no merge across the boundary).
    prompt_ids = bpe.encode(prompt, add_special_tokens=False)
    assert enc["input_ids"][: len(prompt_ids)] == prompt_ids


def test_chat_template_rejects_unknown_role(bpe):
    with pytest.raises(jinja2.exceptions.TemplateError, match="got bot"):
        bpe.apply_chat_template([{"role": "bot", "content": "hi"}], tokenize=False)


def test_gpt2_bpe_matches_known_ids(gpt2):
    assert gpt2.encode("Hello world", add_special_tokens=False) == [15496, 995]
    assert gpt2.encode(" the", add_special_tokens=False) == [262]
    assert gpt2.eos_token_id == gpt2.convert_tokens_to_ids(EOS_TOKEN) == 50256
    assert gpt2.encode(EOS_TOKEN, add_special_tokens=False) == [50256]
    assert len(gpt2) == 50257
    assert gpt2.pad_token_id == 50256  # load_tokenizer's pad fallback
    for text in ROUND_TRIP:
        assert gpt2.decode(gpt2.encode(text, add_special_tokens=False)) == text


def test_gpt2_dir_is_reused_and_loads_with_auto_tokenizer(tmp_path):
    first = gpt2_tokenizer_dir(tmp_path)
    mtime = (first / "tokenizer.json").stat().st_mtime_ns
    assert gpt2_tokenizer_dir(tmp_path) == first
    assert (first / "tokenizer.json").stat().st_mtime_ns == mtime
    assert AutoTokenizer.from_pretrained(first).encode("Hello world", add_special_tokens=False) == [
        15496,
        995,
    ]


def test_add_chat_format_to_gpt2(tmp_path):
    tok = load_tokenizer("gpt2-bpe", cache_dir=tmp_path)
    assert add_chat_format(tok) == 4
    assert len(tok) == 50257 + 4
    assert add_chat_format(tok) == 0  # idempotent
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|endoftext|><|user|>\nhi<|end|>\n<|assistant|>\n"
    assert tok.encode("Hello world", add_special_tokens=False) == [15496, 995]  # old ids unchanged


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        load_tokenizer(tmp_path / "no-such-tokenizer")
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(ValueError, match="is a file"):
        load_tokenizer(tmp_path / "file.json")


def test_fingerprint_differs_between_tokenizers(bpe, gpt2):
    other = train_bpe_tokenizer(CORPUS, vocab_size=300)
    assert len({tokenizer_fingerprint(bpe), tokenizer_fingerprint(gpt2), tokenizer_fingerprint(other)}) == 3
