"""Tiny random Hugging Face models (Llama, GPT-2, T5) saved as ordinary model folders, for the hf tests.

Each folder has config.json, model.safetensors and a tokenizer, exactly like a downloaded checkpoint, so the
registry loads it through the same code path as a real model. Llama and T5 use a 256-byte byte-level
tokenizer (every string encodes, vocab stays tiny); GPT-2 gets its real BPE tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: ids 0-3 are specials, then one id per byte (no merges)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_llama(folder: Path) -> Path:
    tok = byte_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,  # >= 64 so bitsandbytes' CPU 4-bit repacking path can run (see test_lora_utils)
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    return _save(LlamaForCausalLM(cfg), tok, folder)


def make_tiny_gpt2(folder: Path) -> Path:
    from modern_llm.data.tokenizer import gpt2_tokenizer_dir

    tok = PreTrainedTokenizerFast.from_pretrained(gpt2_tokenizer_dir())
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256)
    torch.manual_seed(0)
    return _save(GPT2LMHeadModel(cfg), tok, folder)


def make_tiny_t5(folder: Path) -> Path:
    tok = byte_tokenizer()
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    return _save(T5ForConditionalGeneration(cfg), tok, folder)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """{'llama': folder, 'gpt2': folder, 't5': folder}, built once per test session."""
    root = tmp_path_factory.mktemp("tiny_hf")
    return {
        "llama": make_tiny_llama(root / "llama"),
        "gpt2": make_tiny_gpt2(root / "gpt2"),
        "t5": make_tiny_t5(root / "t5"),
    }
