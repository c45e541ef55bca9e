"""Language-modelling corpora by name, tokenised once into cached token files, served as packed blocks.

Corpora (``corpus`` argument)
- ``"wikitext2"``: WikiText-2 raw. Local folder ``<data_dir>/wikitext2/`` (or ``wikitext-2-raw-v1/``,
  ``wikitext-2-raw/``, ``wikitext/wikitext-2-raw-v1/``) holding ``wiki.{train,valid,test}.raw``,
  ``{train,valid,test}.txt`` or the Hub's parquet shards; else Hub ``Salesforce/wikitext`` config
  ``wikitext-2-raw-v1``. A document is one article (from a `` = Title = `` line to the next); articles keep
  their raw text, so the byte count of a split equals the size of the raw file.
- ``"tinystories"``: full TinyStories from ``<data_dir>/tinystories/TinyStories-{train,valid}.txt`` (stories
  separated by ``<|endoftext|>`` lines), else Hub ``roneneldan/TinyStories``; when neither is there but the
  ~200-story sample ``<data_dir>/tinystories-sample/stories.txt`` is, the sample is used with a warning.
  ``"tinystories-sample"`` asks for the sample explicitly. The sample marks no story boundaries (blank lines
  separate paragraphs as well as stories), so each blank-line-separated paragraph is one document.
- ``"embedded"`` / ``"embedded:<n_docs>"``: a synthetic corpus generated offline and deterministically from
  the templates in ``data/embedded/*.txt`` (simple stories + arithmetic sentences whose results are correct).
  Default 3000 documents, about 0.9 MB of text.
- ``"text:<path>"``: a UTF-8 text file, documents separated by blank lines.
- ``"jsonl:<path>"``: one JSON object with a string ``"text"`` per line (``.jsonl.gz`` works too).

Design choices
- Data location: explicit ``data_dir`` > ``$MODERN_LLM_DATA_DIR`` > Hugging Face Hub. A dataset that is
  nowhere raises FileNotFoundError naming the folders looked in and the Hub id.
- Resolving a corpus (finding its files, cheap) is separate from loading it (reading text, maybe slow), so a
  cache hit never reads or tokenises the corpus again.
- Token files: one flat stream per split, ``<eos> doc1 <eos> doc2 <eos> ... docN <eos>``; every document is
  preceded and followed by ``<|endoftext|>`` (it is BOS and EOS at once), and documents are tokenised
  separately so no BPE merge crosses a boundary. Stored as raw uint16 when the vocabulary fits (< 65,536
  ids), else uint32, and read back with ``np.memmap``. A JSON sidecar records n_tokens, n_bytes, n_docs.
- Cache key = corpus fingerprint (file paths, sizes and mtimes; Hub id; template hash) + tokenizer hash +
  split + split rule + max_docs + format version. Files are written under a temporary name and renamed.
- Splits: a corpus's own validation/test split is used when it has one; otherwise a seeded random
  ``val_fraction`` of documents (at least one) becomes validation, the rest train, both in corpus order.
- ``n_bytes`` counts the UTF-8 bytes of the documents of a split; separator tokens add no bytes. Bits per
  byte = (sum of NLL in nats over all predicted tokens) / (ln 2 * n_bytes).
- ``PackedLMDataset`` cuts the stream into non-overlapping ``block_size`` windows; ``targets`` are the
  inputs shifted by one (the last target is the first token of the next window). The tail shorter than a
  block is dropped. Blocks cross document boundaries by design: ``<eos>`` marks them for the model.

Footguns
- ``max_docs`` keeps the *first* documents of each source split (before the validation split is drawn).
- Token files are only valid for the tokenizer hash in their name: never load them with another tokenizer.
- A ``np.memmap`` pickles as a full in-memory copy; ``PackedLMDataset`` therefore pickles the file path and
  re-opens the map, so DataLoader workers stay cheap.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.resources
import itertools
import json
import logging
import os
import random
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from modern_llm.data.tokenizer import default_cache_dir, tokenizer_fingerprint

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DATA_DIR_ENV = "MODERN_LLM_DATA_DIR"
WIKITEXT_HUB_ID, WIKITEXT_HUB_CONFIG = "Salesforce/wikitext", "wikitext-2-raw-v1"
TINYSTORIES_HUB_ID = "roneneldan/TinyStories"
TINYSTORIES_SEPARATOR = "<|endoftext|>"
EMBEDDED_DEFAULT_DOCS = 3000
EMBEDDED_SEED = 1234
SPLITS = ("train", "val", "test")

Documents = Sequence[str]
SplitDocuments = dict[str, Documents]


# ----------------------------------------------------------------------------------------------------------
# Where data lives
# ----------------------------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The folder to look for local datasets in: ``data_dir`` if given, else ``$MODERN_LLM_DATA_DIR``."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else None


@dataclass(frozen=True)
class CorpusSource:
    """A resolved corpus: where its documents come from, without having read them yet."""

    corpus: str  # the name asked for
    description: str  # human-readable origin, e.g. "local /data/wikitext2" or "hub Salesforce/wikitext"
    fingerprint: str  # identity of the content, part of the token-cache key
    splits: tuple[str, ...]  # splits the corpus provides itself, subset of SPLITS, always with "train"
    loader: Callable[[int | None], SplitDocuments]  # max_docs -> documents per split

    def load(self, max_docs: int | None = None) -> SplitDocuments:
        return self.loader(max_docs)


def _file_identity(paths: Iterable[Path]) -> str:
    """Fingerprint of local files from path, size and mtime (cheap; edits invalidate the cache)."""
    parts = []
    for p in sorted(Path(x).resolve() for x in paths):
        st = p.stat()
        parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    return "files:" + "|".join(parts)


def _cap(docs: Documents, max_docs: int | None) -> Documents:
    return docs if max_docs is None else docs[:max_docs]


def _missing_dataset_error(corpus: str, looked_in: list[Path], hub: str, reason: str) -> FileNotFoundError:
    where = ", ".join(str(p) for p in looked_in) if looked_in else f"(no data dir: set {DATA_DIR_ENV})"
    return FileNotFoundError(
        f"dataset {corpus!r} not found. Looked in: {where}. Hub fallback {hub} failed: {reason}. "
        f"Fix: pass data_dir/--data-dir (or set {DATA_DIR_ENV}) to a folder holding it, or go online."
    )


def _load_hub(
    corpus: str,
    hub_id: str,
    config: str | None,
    looked_in: list[Path],
    max_docs: int | None,
) -> dict[str, Any]:
    """Load a Hub dataset (streamed when only ``max_docs`` rows are needed); errors name local folders too."""
    import datasets  # heavy import, only when the Hub is actually used

    hub_name = f"{hub_id!r}" + (f" (config {config!r})" if config else "")
    try:
        if max_docs is not None:
            streamed = datasets.load_dataset(hub_id, config, streaming=True)
            return {s: list(itertools.islice(streamed[s], max_docs)) for s in streamed}
        return dict(datasets.load_dataset(hub_id, config))
    except Exception as err:  # datasets raises ConnectionError, OSError, ValueError... depending on why
        raise _missing_dataset_error(corpus, looked_in, hub_name, f"{type(err).__name__}: {err}") from err


def _hub_texts(rows: Any) -> Documents:
    """The "text" column of a Hub split: a list of rows when streamed, a column view otherwise."""
    return [r["text"] for r in rows] if isinstance(rows, list) else rows["text"]


def _hub_split_name(split: str) -> str:
    return {"val": "validation"}.get(split, split)


# ----------------------------------------------------------------------------------------------------------
# File formats
# ----------------------------------------------------------------------------------------------------------


def _read_utf8(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 ({err}); re-encode the file as UTF-8") from err


def split_blank_line_documents(text: str) -> list[str]:
    """Documents separated by one or more blank (whitespace-only) lines; each stripped, empties dropped."""
    return [d.strip() for d in re.split(r"\n[ \t]*\n", text) if d.strip()]


def read_text_documents(path: str | Path) -> list[str]:
    """A plain UTF-8 text file whose documents are separated by blank lines."""
    return split_blank_line_documents(_read_utf8(Path(path)))


def read_jsonl_documents(path: str | Path, field_name: str = "text") -> list[str]:
    """One JSON object per line with a string ``field_name``; blank lines are skipped.

    Raises ValueError naming the file and 1-based line number of the first bad line.
    """
    path = Path(path)
    docs = []
    for lineno, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f'{path}:{lineno}: malformed JSON ({err.msg}); expected {{"text": ...}}'
            ) from err
        if not isinstance(record, dict) or not isinstance(record.get(field_name), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string {field_name!r} field")
        if record[field_name]:
            docs.append(record[field_name])
    return docs


def _is_wikitext_title(line: str) -> bool:
    """`` = Title = `` (level 1) but not `` = = Section = = ``."""
    s = line.strip()
    return len(s) > 4 and s.startswith("= ") and s.endswith(" =") and not s.startswith("= =")


def split_wikitext_articles(raw: str) -> list[str]:
    """Cut raw WikiText into articles at level-1 titles, keeping every character (bytes sum to the file)."""
    articles: list[list[str]] = [[]]
    for line in raw.splitlines(keepends=True):
        if _is_wikitext_title(line) and any(x.strip() for x in articles[-1]):
            articles.append([])
        articles[-1].append(line)
    docs = ["".join(a) for a in articles]
    return [d for d in docs if d.strip()]


def _wikitext_rows_to_raw(rows: Iterable[str]) -> str:
    """Hub/parquet WikiText rows are lines; re-join them into the raw file text."""
    return "".join(r if r.endswith("\n") else r + "\n" for r in rows)


def _read_parquet_text(paths: list[Path]) -> list[str]:
    import pyarrow.parquet as pq  # installed with `datasets`

    rows: list[str] = []
    for p in sorted(paths):
        rows.extend(pq.read_table(p, columns=["text"]).column("text").to_pylist())
    return rows


# ----------------------------------------------------------------------------------------------------------
# WikiText-2
# ----------------------------------------------------------------------------------------------------------

_WIKITEXT_FOLDERS = (
    "wikitext2",
    "wikitext-2-raw-v1",
    "wikitext-2-raw",
    "wikitext-2",
    "wikitext/wikitext-2-raw-v1",
    "wikitext2/wikitext-2-raw-v1",
    "wikitext2/wikitext-2-raw",
)
_WIKITEXT_FILES = {
    "train": ("wiki.train.raw", "train.txt", "train.raw", "train-*.parquet", "train.parquet"),
    "val": (
        "wiki.valid.raw",
        "valid.txt",
        "validation.txt",
        "val.txt",
        "valid.raw",
        "validation-*.parquet",
        "validation.parquet",
    ),
    "test": ("wiki.test.raw", "test.txt", "test.raw", "test-*.parquet", "test.parquet"),
}


def _find_split_files(folder: Path, patterns: Sequence[str]) -> list[Path]:
    for pattern in patterns:
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits
    return []


def _find_wikitext_local(data_dir: Path) -> tuple[Path, dict[str, list[Path]]] | None:
    for rel in _WIKITEXT_FOLDERS:
        folder = data_dir / rel
        if not folder.is_dir():
            continue
        files = {s: _find_split_files(folder, pats) for s, pats in _WIKITEXT_FILES.items()}
        if files["train"] and files["val"]:
            return folder, {s: f for s, f in files.items() if f}
    return None


def _read_wikitext_files(files: list[Path]) -> list[str]:
    if files[0].suffix == ".parquet":
        return split_wikitext_articles(_wikitext_rows_to_raw(_read_parquet_text(files)))
    return split_wikitext_articles("".join(_read_utf8(f) for f in files))


def _resolve_wikitext(corpus: str, data_dir: Path | None) -> CorpusSource:
    looked_in = [data_dir / rel for rel in _WIKITEXT_FOLDERS[:3]] if data_dir else []
    found = _find_wikitext_local(data_dir) if data_dir else None
    if found:
        folder, files = found

        def load_local(max_docs: int | None) -> SplitDocuments:
            return {s: _cap(_read_wikitext_files(f), max_docs) for s, f in files.items()}

        all_files = [p for f in files.values() for p in f]
        return CorpusSource(corpus, f"local {folder}", _file_identity(all_files), tuple(files), load_local)

    def load_hub(max_docs: int | None) -> SplitDocuments:
        ds = _load_hub(corpus, WIKITEXT_HUB_ID, WIKITEXT_HUB_CONFIG, looked_in, None)
        return {
            s: _cap(
                split_wikitext_articles(_wikitext_rows_to_raw(r["text"] for r in ds[_hub_split_name(s)])),
                max_docs,
            )
            for s in SPLITS
        }

    hub = f"hub:{WIKITEXT_HUB_ID}:{WIKITEXT_HUB_CONFIG}"
    return CorpusSource(corpus, f"hub {WIKITEXT_HUB_ID} ({WIKITEXT_HUB_CONFIG})", hub, SPLITS, load_hub)


# ----------------------------------------------------------------------------------------------------------
# TinyStories
# ----------------------------------------------------------------------------------------------------------

_TINYSTORIES_FULL_FILES = {"train": "TinyStories-train.txt", "val": "TinyStories-valid.txt"}
_TINYSTORIES_SAMPLE_FILE = "tinystories-sample/stories.txt"


def split_tinystories_file(text: str) -> list[str]:
    """Stories of the official TinyStories text files, separated by ``<|endoftext|>``."""
    return [s.strip() for s in text.split(TINYSTORIES_SEPARATOR) if s.strip()]


def _tinystories_sample_source(corpus: str, sample: Path) -> CorpusSource:
    def load_sample(max_docs: int | None) -> SplitDocuments:
        return {"train": _cap(read_text_documents(sample), max_docs)}

    return CorpusSource(corpus, f"local {sample} (sample)", _file_identity([sample]), ("train",), load_sample)


def _resolve_tinystories(corpus: str, data_dir: Path | None, sample_only: bool) -> CorpusSource:
    sample = data_dir / _TINYSTORIES_SAMPLE_FILE if data_dir else None
    if sample_only:
        if sample is None or not sample.is_file():
            where = str(sample) if sample else f"(no data dir: set {DATA_DIR_ENV})"
            raise FileNotFoundError(
                f"dataset {corpus!r} not found at {where}; it exists only locally (use 'tinystories' for the "
                f"full set from the Hub: {TINYSTORIES_HUB_ID})"
            )
        return _tinystories_sample_source(corpus, sample)
    full = data_dir / "tinystories" if data_dir else None
    if full is not None and all((full / f).is_file() for f in _TINYSTORIES_FULL_FILES.values()):
        files = {s: full / f for s, f in _TINYSTORIES_FULL_FILES.items()}

        def load_full(max_docs: int | None) -> SplitDocuments:
            return {s: _cap(split_tinystories_file(_read_utf8(p)), max_docs) for s, p in files.items()}

        return CorpusSource(
            corpus, f"local {full}", _file_identity(files.values()), ("train", "val"), load_full
        )
    if sample is not None and sample.is_file():
        warnings.warn(
            f"full TinyStories not found in {full}; using the ~200-story sample {sample} "
            "(fine for smoke runs, far too small for pretraining)",
            stacklevel=3,
        )
        return _tinystories_sample_source(corpus, sample)
    looked_in = [p for p in (full, sample) if p is not None]

    def load_hub(max_docs: int | None) -> SplitDocuments:
        ds = _load_hub(corpus, TINYSTORIES_HUB_ID, None, looked_in, max_docs)
        return {s: _cap(_hub_texts(ds[_hub_split_name(s)]), max_docs) for s in ("train", "val")}

    return CorpusSource(
        corpus, f"hub {TINYSTORIES_HUB_ID}", f"hub:{TINYSTORIES_HUB_ID}", ("train", "val"), load_hub
    )


# ----------------------------------------------------------------------------------------------------------
# Embedded synthetic corpus
# ----------------------------------------------------------------------------------------------------------

_STORY_SECTIONS = ("opening", "setup", "problem", "action", "resolution", "ending")
# How many sentences each story section contributes: (min, max).
_STORY_SECTION_COUNTS = {"opening": (1, 1), "setup": (1, 2), "problem": (1, 1), "action": (1, 2)}
_STORY_SECTION_COUNTS |= {"resolution": (1, 1), "ending": (1, 1)}
_ARITHMETIC_FRACTION = 0.3
_OBJECT_PRONOUN = {"she": "her", "he": "him"}
_POSSESSIVE = {"she": "her", "he": "his"}


def _embedded_text(name: str) -> str:
    return importlib.resources.files("modern_llm.data").joinpath("embedded", name).read_text(encoding="utf-8")


def parse_sections(text: str) -> dict[str, list[str]]:
    """``[section]`` headers followed by one entry per line; ``#`` lines and blank lines are ignored."""
    sections: dict[str, list[str]] = {}
    current = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif current is None:
            raise ValueError(f"template line {lineno}: entry {line!r} before any [section] header")
        else:
            current.append(line)
    return sections


def _fill(template: str, values: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise ValueError(f"embedded template {template!r} uses unknown slot {{{m.group(1)}}}")
        return values[m.group(1)]

    return re.sub(r"\{(\w+)\}", sub, template)


def _character_slots(rng: random.Random, characters: list[str]) -> dict[str, str]:
    (name, pronoun, kind), (friend, _, friend_kind) = (
        [x.strip() for x in c.split("|")] for c in rng.sample(characters, 2)
    )
    return {
        "name": name,
        "kind": kind,
        "friend": friend,
        "friend_kind": friend_kind,
        "they": pronoun,
        "They": pronoun.capitalize(),
        "them": _OBJECT_PRONOUN[pronoun],
        "their": _POSSESSIVE[pronoun],
        "Their": _POSSESSIVE[pronoun].capitalize(),
    }


def _story(rng: random.Random, words: dict[str, list[str]], templates: dict[str, list[str]]) -> str:
    slots = _character_slots(rng, words["character"])
    for slot in ("place", "object", "adjective", "feeling", "food", "weather", "helper_thing", "lesson"):
        slots[slot] = rng.choice(words[slot])
    sentences = []
    for section in _STORY_SECTIONS:
        lo, hi = _STORY_SECTION_COUNTS[section]
        sentences += [_fill(t, slots) for t in rng.sample(templates[section], rng.randint(lo, hi))]
    # Three short paragraphs: beginning, middle, end.
    cut1, cut2 = 1 + len(sentences) // 3, 1 + 2 * len(sentences) // 3
    return "\n".join(" ".join(p) for p in (sentences[:cut1], sentences[cut1:cut2], sentences[cut2:]))


def _arithmetic_values(rng: random.Random, op: str) -> dict[str, str]:
    if op == "add":
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        return {"a": str(a), "b": str(b), "sum": str(a + b)}
    if op == "sub":
        a = rng.randint(4, 60)
        b = rng.randint(1, a - 2)  # keeps the result >= 2 so "{diff} {item}" stays plural
        return {"a": str(a), "b": str(b), "diff": str(a - b)}
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return {"a": str(a), "b": str(b), "prod": str(a * b)}


def _arithmetic_doc(rng: random.Random, words: dict[str, list[str]], templates: dict[str, list[str]]) -> str:
    lines = []
    for _ in range(rng.randint(3, 6)):
        op = rng.choice(("add", "sub", "mul"))
        slots = _character_slots(rng, words["character"]) | _arithmetic_values(rng, op)
        slots["item"] = rng.choice(words["item"])
        lines.append(_fill(rng.choice(templates[op]), slots))
    return "\n".join(lines)


def generate_embedded_corpus(n_docs: int = EMBEDDED_DEFAULT_DOCS, seed: int = EMBEDDED_SEED) -> list[str]:
    """Deterministic synthetic documents: ~70% short stories, ~30% arithmetic sentences (all results right)."""
    if n_docs < 1:
        raise ValueError(f"embedded corpus: n_docs must be >= 1, got {n_docs}")
    words = parse_sections(_embedded_text("story_words.txt"))
    stories = parse_sections(_embedded_text("story_templates.txt"))
    arithmetic = parse_sections(_embedded_text("arithmetic_templates.txt"))
    rng = random.Random(seed)
    return [
        _arithmetic_doc(rng, words, arithmetic)
        if rng.random() < _ARITHMETIC_FRACTION
        else _story(rng, words, stories)
        for _ in range(n_docs)
    ]


def _resolve_embedded(corpus: str, spec: str) -> CorpusSource:
    try:
        n_docs = int(spec) if spec else EMBEDDED_DEFAULT_DOCS
    except ValueError as err:
        raise ValueError(f"corpus {corpus!r}: expected 'embedded' or 'embedded:<n_docs>'") from err
    template_hash = hashlib.sha256(
        "".join(
            _embedded_text(f) for f in ("story_words.txt", "story_templates.txt", "arithmetic_templates.txt")
        ).encode()
    ).hexdigest()[:16]

    def load(max_docs: int | None) -> SplitDocuments:
        return {"train": generate_embedded_corpus(min(n_docs, max_docs or n_docs), EMBEDDED_SEED)}

    fingerprint = f"embedded:{template_hash}:{n_docs}:{EMBEDDED_SEED}"
    return CorpusSource(corpus, f"generated embedded corpus ({n_docs} docs)", fingerprint, ("train",), load)


# ----------------------------------------------------------------------------------------------------------
# Corpus registry
# ----------------------------------------------------------------------------------------------------------

CORPUS_NAMES = ("wikitext2", "tinystories", "tinystories-sample", "embedded", "text:<path>", "jsonl:<path>")


def _resolve_file_corpus(corpus: str, kind: str, path_str: str) -> CorpusSource:
    path = Path(path_str).expanduser()
    if not path_str or not path.is_file():
        raise FileNotFoundError(f"corpus {corpus!r}: file not found: {path_str or '(empty path)'}")
    reader = read_text_documents if kind == "text" else read_jsonl_documents

    def load(max_docs: int | None) -> SplitDocuments:
        return {"train": _cap(reader(path), max_docs)}

    return CorpusSource(corpus, f"local {path.resolve()}", _file_identity([path]), ("train",), load)


def resolve_corpus(corpus: str, data_dir: str | Path | None = None) -> CorpusSource:
    """Find where ``corpus`` comes from (local folder, file, generator or Hub) without reading it."""
    base = resolve_data_dir(data_dir)
    name, _, arg = corpus.partition(":")
    key = name.strip().lower()
    if key in ("text", "jsonl"):
        return _resolve_file_corpus(corpus, key, arg)
    if key == "embedded":
        return _resolve_embedded(corpus, arg)
    if key in ("wikitext2", "wikitext-2", "wikitext-2-raw-v1"):
        return _resolve_wikitext(corpus, base)
    if key in ("tinystories", "tinystories-sample"):
        return _resolve_tinystories(corpus, base, sample_only=key == "tinystories-sample")
    raise ValueError(f"unknown corpus {corpus!r}; choose one of: {', '.join(CORPUS_NAMES)}")


def load_corpus(
    corpus: str, data_dir: str | Path | None = None, max_docs: int | None = None
) -> SplitDocuments:
    """Documents per split (``"train"`` always; ``"val"``/``"test"`` when the corpus has them)."""
    return resolve_corpus(corpus, data_dir).load(max_docs)


def split_documents(docs: Documents, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded random split by document: (train, val), each in corpus order; val gets at least one document."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(docs)
    if n < 2:
        raise ValueError(f"cannot split {n} document(s) into train and val; provide more documents")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def _all_splits(source_docs: SplitDocuments, val_fraction: float, seed: int) -> SplitDocuments:
    if "val" in source_docs:
        return dict(source_docs)
    train, val = split_documents(source_docs["train"], val_fraction, seed)
    return {**source_docs, "train": train, "val": val}


# ----------------------------------------------------------------------------------------------------------
# Token files
# ----------------------------------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id: uint16 for vocabularies up to 65,536, else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token files")


@dataclass
class TokenSplit:
    """One split's token stream (memory-mapped) and the counts needed for perplexity and bits per byte."""

    name: str
    tokens: np.ndarray  # (n_tokens,) uint16/uint32 memmap
    n_tokens: int
    n_bytes: int  # UTF-8 bytes of the split's documents
    n_docs: int
    path: Path
    from_cache: bool  # True when the file existed and nothing was tokenised

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / self.n_tokens


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # Rust batch encode, parallel and without Python-side BatchEncoding overhead
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _write_token_file(
    docs: Documents, tokenizer: Any, eos_id: int, dtype: np.dtype, path: Path, batch_size: int = 1024
) -> tuple[int, int, int]:
    """Tokenise ``docs`` into ``path`` as ``<eos> d1 <eos> d2 ... <eos>``; return (n_tokens, n_bytes, n_docs)."""
    n_tokens = n_bytes = n_docs = 0
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(np.array([eos_id], dtype=dtype).tobytes())
        n_tokens += 1
        for batch in _batched(docs, batch_size):
            ids: list[int] = []
            for doc_ids in _encode_batch(tokenizer, batch):
                ids.extend(doc_ids)
                ids.append(eos_id)
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            n_tokens += len(ids)
            n_bytes += sum(len(d.encode("utf-8")) for d in batch)
            n_docs += len(batch)
    os.replace(tmp, path)
    return n_tokens, n_bytes, n_docs


def _open_tokens(path: Path, dtype: np.dtype, n_tokens: int) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))


def _read_cached_split(name: str, bin_path: Path, meta_path: Path) -> TokenSplit | None:
    """The cached split if its sidecar and token file agree, else None (then it is rebuilt)."""
    if not (bin_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        if bin_path.stat().st_size != meta["n_tokens"] * dtype.itemsize:
            return None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        logger.warning("ignoring unreadable token cache %s (%s)", meta_path, err)
        return None
    tokens = _open_tokens(bin_path, dtype, meta["n_tokens"])
    return TokenSplit(
        name, tokens, meta["n_tokens"], meta["n_bytes"], meta["n_docs"], bin_path, from_cache=True
    )


def _cache_slug(corpus: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", corpus).strip("-")[-60:] or "corpus"


# ----------------------------------------------------------------------------------------------------------
# Packed dataset
# ----------------------------------------------------------------------------------------------------------


class PackedLMDataset(Dataset):
    """Non-overlapping ``block_size`` windows of a token stream; item i = {"input_ids", "targets"} (T,) int64.

    ``targets[t] == input_ids[t + 1]`` inside a block, and the last target is the token right after the block.
    """

    def __init__(self, tokens: np.ndarray | torch.Tensor | Sequence[int], block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.cpu().numpy()
        elif not isinstance(tokens, np.ndarray):
            tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        self.tokens = tokens
        self.block_size = block_size
        self.n_blocks = (len(tokens) - 1) // block_size
        if self.n_blocks == 0:
            raise ValueError(
                f"{len(tokens)} tokens are too few for one block of block_size={block_size} (+1 target); "
                "use a smaller block_size or more data"
            )

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += self.n_blocks
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block {index} out of range for {self.n_blocks} blocks")
        start = index * self.block_size
        window = torch.from_numpy(
            np.asarray(self.tokens[start : start + self.block_size + 1], dtype=np.int64)
        )
        return {"input_ids": window[:-1], "targets": window[1:]}  # (T,), (T,)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if isinstance(self.tokens, np.memmap) and self.tokens.filename:
            t = self.tokens
            state["tokens"] = ("memmap", t.filename, t.dtype.str, t.offset, t.shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        tokens = state["tokens"]
        if isinstance(tokens, tuple) and tokens[0] == "memmap":
            _, filename, dtype, offset, shape = tokens
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)


# ----------------------------------------------------------------------------------------------------------
# High-level entry point
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LMData:
    """Everything a pretraining/eval stage needs: packed datasets plus token and byte counts per split."""

    corpus: str
    source: str
    tokenizer_hash: str
    block_size: int
    splits: dict[str, TokenSplit]  # "train", "val", and "test" when the corpus has one
    train: PackedLMDataset
    val: PackedLMDataset
    split_rule: str = ""

    @property
    def train_split(self) -> TokenSplit:
        return self.splits["train"]

    @property
    def val_split(self) -> TokenSplit:
        return self.splits["val"]

    @property
    def test_split(self) -> TokenSplit | None:
        return self.splits.get("test")

    def protocol(self) -> dict[str, Any]:
        """The data part of a result record's ``protocol``."""
        return {
            "corpus": self.corpus,
            "source": self.source,
            "tokenizer_hash": self.tokenizer_hash,
            "block_size": self.block_size,
            "split_rule": self.split_rule,
            **{f"{s}_tokens": sp.n_tokens for s, sp in self.splits.items()},
            **{f"{s}_bytes": sp.n_bytes for s, sp in self.splits.items()},
            **{f"{s}_docs": sp.n_docs for s, sp in self.splits.items()},
        }


def prepare_lm_data(
    corpus: str,
    tokenizer: Any,
    block_size: int,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.05,
    max_docs: int | None = None,
    split_seed: int = 0,
) -> LMData:
    """Resolve ``corpus``, tokenise each split once into cached token files, and pack them into blocks.

    ``cache_dir`` defaults to ``default_cache_dir()/lm_tokens``. The second call with the same corpus files,
    tokenizer and split settings memory-maps the cached files without reading or tokenising the corpus.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token; set tokenizer.eos_token (it separates documents)")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be >= 1 or None, got {max_docs}")
    source = resolve_corpus(corpus, data_dir)
    tok_hash = tokenizer_fingerprint(tokenizer)
    dtype = token_dtype(len(tokenizer))
    split_rule = (
        "given" if "val" in source.splits else f"random_docs(val_fraction={val_fraction},seed={split_seed})"
    )
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "lm_tokens"
    folder = folder / _cache_slug(corpus)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = [s for s in SPLITS if s in source.splits or s == "val"]

    meta_common = {"corpus": corpus, "source": source.description, "split_rule": split_rule}
    meta_common |= {"tokenizer_hash": tok_hash, "max_docs": max_docs, "format_version": FORMAT_VERSION}
    splits: dict[str, TokenSplit] = {}
    docs: SplitDocuments | None = None
    for name in wanted:
        key_fields = [FORMAT_VERSION, source.fingerprint, tok_hash, dtype.str, name, split_rule, max_docs]
        key = hashlib.sha256(json.dumps(key_fields).encode()).hexdigest()[:16]
        bin_path, meta_path = folder / f"{name}-{key}.bin", folder / f"{name}-{key}.json"
        cached = _read_cached_split(name, bin_path, meta_path)
        if cached is not None:
            splits[name] = cached
            continue
        if docs is None:  # read the corpus at most once, and only on a cache miss
            logger.info("loading %s from %s", corpus, source.description)
            docs = _all_splits(source.load(max_docs), val_fraction, split_seed)
        if not docs[name]:
            raise ValueError(f"corpus {corpus!r} ({source.description}): split {name!r} has no documents")
        logger.info("tokenising %s/%s (%d docs) -> %s", corpus, name, len(docs[name]), bin_path)
        splits[name] = _build_split(name, docs[name], tokenizer, dtype, bin_path, meta_path, meta_common)

    return LMData(
        corpus=corpus,
        source=source.description,
        tokenizer_hash=tok_hash,
        block_size=block_size,
        splits=splits,
        train=_packed(splits["train"], block_size, corpus),
        val=_packed(splits["val"], block_size, corpus),
        split_rule=split_rule,
    )


def _build_split(
    name: str,
    docs: Documents,
    tokenizer: Any,
    dtype: np.dtype,
    bin_path: Path,
    meta_path: Path,
    meta_common: dict[str, Any],
) -> TokenSplit:
    """Tokenise one split into ``bin_path``, then write its sidecar (the sidecar marks the file complete)."""
    n_tokens, n_bytes, n_docs = _write_token_file(docs, tokenizer, tokenizer.eos_token_id, dtype, bin_path)
    meta = meta_common | {"split": name, "dtype": dtype.str, "n_tokens": n_tokens, "n_bytes": n_bytes}
    meta["n_docs"] = n_docs
    tmp_meta = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(tmp_meta, meta_path)
    tokens = _open_tokens(bin_path, dtype, n_tokens)
    return TokenSplit(name, tokens, n_tokens, n_bytes, n_docs, bin_path, from_cache=False)


def _packed(split: TokenSplit, block_size: int, corpus: str) -> PackedLMDataset:
    try:
        return PackedLMDataset(split.tokens, block_size)
    except ValueError as err:
        raise ValueError(f"corpus {corpus!r}, split {split.name!r}: {err}") from err


def train_tokenizer_on_corpus(
    corpus: str,
    vocab_size: int,
    out_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    val_fraction: float = 0.05,
    max_docs: int | None = None,
    split_seed: int = 0,
) -> Any:
    """Train our byte-level BPE on the *train* split of ``corpus`` (validation documents stay unseen).

    Uses the same split rule as ``prepare_lm_data`` with the same ``val_fraction``/``split_seed``.
    """
    from modern_llm.data.tokenizer import train_bpe_tokenizer

    docs = _all_splits(load_corpus(corpus, data_dir, max_docs), val_fraction, split_seed)
    return train_bpe_tokenizer(docs["train"], vocab_size, out_dir)


def main(argv: list[str] | None = None) -> int:
    """CLI: tokenise and cache a corpus (optionally training a BPE tokenizer on it first); print its stats."""
    p = argparse.ArgumentParser(
        prog="modern-llm prepare-data",
        description="Tokenise an LM corpus into cached token files and print token/byte counts as JSON.",
    )
    p.add_argument("--corpus", required=True, help=f"one of: {', '.join(CORPUS_NAMES)}")
    p.add_argument("--tokenizer", default="gpt2-bpe", help="'gpt2-bpe', a HF tokenizer folder, or a Hub id")
    p.add_argument(
        "--train-tokenizer", metavar="OUT_DIR", help="train a BPE on the corpus, save it here, use it"
    )
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size with --train-tokenizer")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--data-dir", help=f"local datasets folder (default: ${DATA_DIR_ENV}, then the Hub)")
    p.add_argument("--cache-dir", help="token-file cache (default: $MODERN_LLM_CACHE_DIR/lm_tokens)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--max-docs", type=int)
    p.add_argument("--split-seed", type=int, default=0)
    args = p.parse_args(argv)

    from modern_llm.data.tokenizer import load_tokenizer

    common = {"data_dir": args.data_dir, "val_fraction": args.val_fraction, "max_docs": args.max_docs}
    if args.train_tokenizer:
        tok = train_tokenizer_on_corpus(
            args.corpus, args.vocab_size, args.train_tokenizer, split_seed=args.split_seed, **common
        )
    else:
        tok = load_tokenizer(args.tokenizer)
    data = prepare_lm_data(
        args.corpus, tok, args.block_size, cache_dir=args.cache_dir, split_seed=args.split_seed, **common
    )
    stats = data.protocol() | {
        "vocab_size": len(tok),
        "train_blocks": len(data.train),
        "val_blocks": len(data.val),
    }
    json.dump(stats, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
