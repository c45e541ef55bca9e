"""LM data: corpora by name, token-file cache, deterministic splits, packing, and error messages."""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from modern_llm.data import lm_datasets as lm
from modern_llm.data.tokenizer import EOS_TOKEN, load_tokenizer, train_bpe_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(lm.generate_embedded_corpus(300), vocab_size=500)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("First document,\nstill first.\n\n\nSecond 🚀 document.\n  \nThird.\n", encoding="utf-8")
    return path


def _docs_from_stream(tokens: np.ndarray, tokenizer) -> list[str]:
    """Invert the stream layout <eos> d1 <eos> d2 ... <eos> back into document strings."""
    ids = tokens.tolist()
    eos = tokenizer.eos_token_id
    assert ids[0] == eos and ids[-1] == eos
    cuts = [i for i, t in enumerate(ids) if t == eos]
    return [tokenizer.decode(ids[a + 1 : b]) for a, b in zip(cuts, cuts[1:])]


# ---------------------------------------------------------------------------------------------------------
# PackedLMDataset
# ---------------------------------------------------------------------------------------------------------


def test_packing_shapes_and_shift():
    ds = lm.PackedLMDataset(np.arange(23, dtype=np.uint16), block_size=5)
    assert len(ds) == 4  # (23 - 1) // 5; the 2-token tail is dropped
    for i in range(len(ds)):
        item = ds[i]
        assert item["input_ids"].shape == item["targets"].shape == (5,)
        assert item["input_ids"].dtype == item["targets"].dtype == torch.int64
        assert item["input_ids"].tolist() == list(range(5 * i, 5 * i + 5))  # non-overlapping blocks
        assert item["targets"].tolist() == list(range(5 * i + 1, 5 * i + 6))  # shifted by one
    assert ds[-1]["input_ids"].tolist() == ds[3]["input_ids"].tolist()
    with pytest.raises(IndexError):
        ds[4]


def test_packing_exact_fit_and_errors():
    assert len(lm.PackedLMDataset(torch.arange(11), block_size=5)) == 2  # 10 inputs + 1 final target
    assert len(lm.PackedLMDataset(list(range(10)), block_size=5)) == 1
    with pytest.raises(ValueError, match="block_size=8"):
        lm.PackedLMDataset(np.arange(8), block_size=8)
    with pytest.raises(ValueError, match="block_size must be"):
        lm.PackedLMDataset(np.arange(8), block_size=0)


def test_memmap_dataset_pickles_by_path_and_batches(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    ds = lm.PackedLMDataset(np.memmap(path, dtype=np.uint16, mode="r"), block_size=16)
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # the file path travels, not a copy of the tokens
    clone = pickle.loads(blob)
    assert isinstance(clone.tokens, np.memmap)
    assert torch.equal(clone[7]["targets"], ds[7]["targets"])
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["input_ids"].shape == batch["targets"].shape == (4, 16)  # (B, T)


# ---------------------------------------------------------------------------------------------------------
# Splits, dtypes, cache
# ---------------------------------------------------------------------------------------------------------


def test_split_documents_is_deterministic_and_partitions():
    docs = [f"doc {i}" for i in range(50)]
    train, val = lm.split_documents(docs, 0.2, seed=3)
    assert (train, val) == lm.split_documents(docs, 0.2, seed=3)
    assert val != lm.split_documents(docs, 0.2, seed=4)[1]
    assert len(val) == 10 and sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in set(train)]  # corpus order kept
    assert len(lm.split_documents(docs[:3], 0.01, seed=0)[1]) == 1  # at least one val document
    with pytest.raises(ValueError, match="1 document"):
        lm.split_documents(docs[:1], 0.1, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        lm.split_documents(docs, 1.5, seed=0)


def test_token_dtype_selection():
    assert lm.token_dtype(500) == np.uint16
    assert lm.token_dtype(50257) == np.uint16
    assert lm.token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert lm.token_dtype(65537) == np.uint32
    assert lm.token_dtype(151_936) == np.uint32


def test_large_vocab_writes_uint32_files(tmp_path, text_file):
    big = train_bpe_tokenizer(["hello world", "second document"], vocab_size=300)
    big.add_tokens([f"<x{i}>" for i in range(65_600)])
    text_file.write_text("alpha <x65599>\n\nbeta\n", encoding="utf-8")
    data = lm.prepare_lm_data(
        f"text:{text_file}", big, block_size=2, cache_dir=tmp_path / "c", val_fraction=0.5
    )
    for split in data.splits.values():
        assert split.tokens.dtype == np.uint32
        assert split.path.stat().st_size == 4 * split.n_tokens
    top = max(int(s.tokens.max()) for s in data.splits.values())
    assert top == big.convert_tokens_to_ids("<x65599>") > 65535  # survived the round trip through the file


def test_prepare_stream_layout_and_byte_counts(tok, tmp_path, text_file):
    data = lm.prepare_lm_data(f"text:{text_file}", tok, block_size=4, cache_dir=tmp_path, val_fraction=0.3)
    all_docs = lm.read_text_documents(text_file)
    assert all_docs == ["First document,\nstill first.", "Second 🚀 document.", "Third."]
    got = {}
    for name in ("train", "val"):
        split = data.splits[name]
        assert split.tokens.dtype == np.uint16 and split.path.stat().st_size == 2 * split.n_tokens
        docs = _docs_from_stream(np.asarray(split.tokens), tok)
        assert split.n_docs == len(docs)
        assert split.n_bytes == sum(len(d.encode("utf-8")) for d in docs)
        got[name] = docs
    assert sorted(got["train"] + got["val"]) == sorted(all_docs)
    assert len(got["val"]) == 1
    assert data.test_split is None and data.split_rule.startswith("random_docs")
    proto = data.protocol()
    assert proto["train_bytes"] + proto["val_bytes"] == sum(len(d.encode()) for d in all_docs)


def test_cache_is_reused_without_retokenising(tok, tmp_path, monkeypatch):
    first = lm.prepare_lm_data("embedded:200", tok, block_size=32, cache_dir=tmp_path)
    assert not first.train_split.from_cache
    mtimes = {n: s.path.stat().st_mtime_ns for n, s in first.splits.items()}

    def fail(*args, **kwargs):
        raise AssertionError("corpus was tokenised again")

    monkeypatch.setattr(lm, "_write_token_file", fail)
    second = lm.prepare_lm_data("embedded:200", tok, block_size=32, cache_dir=tmp_path)
    for name, split in second.splits.items():
        assert split.from_cache
        assert split.path.stat().st_mtime_ns == mtimes[name]
        assert np.array_equal(split.tokens, first.splits[name].tokens)
        assert (split.n_tokens, split.n_bytes) == (first.splits[name].n_tokens, first.splits[name].n_bytes)


def test_cache_key_tracks_file_tokenizer_and_split(tok, tmp_path, text_file):
    a = lm.prepare_lm_data(f"text:{text_file}", tok, block_size=2, cache_dir=tmp_path, val_fraction=0.3)
    text_file.write_text(
        text_file.read_text(encoding="utf-8") + "\nFourth document here.\n", encoding="utf-8"
    )
    b = lm.prepare_lm_data(f"text:{text_file}", tok, block_size=2, cache_dir=tmp_path, val_fraction=0.3)
    assert not b.train_split.from_cache and b.train_split.path != a.train_split.path
    other = train_bpe_tokenizer(["completely different text"] * 5, vocab_size=300)
    c = lm.prepare_lm_data(f"text:{text_file}", other, block_size=2, cache_dir=tmp_path, val_fraction=0.3)
    assert not c.train_split.from_cache
    d = lm.prepare_lm_data(
        f"text:{text_file}", tok, block_size=2, cache_dir=tmp_path, val_fraction=0.3, split_seed=9
    )
    assert d.train_split.path != b.train_split.path


def test_split_is_deterministic_across_fresh_caches(tok, tmp_path):
    runs = [lm.prepare_lm_data("embedded:300", tok, 16, cache_dir=tmp_path / str(i)) for i in range(2)]
    for name in ("train", "val"):
        assert np.array_equal(runs[0].splits[name].tokens, runs[1].splits[name].tokens)
    assert runs[0].val_split.n_docs == 15  # 5% of 300


def test_corrupt_cache_is_rebuilt(tok, tmp_path):
    first = lm.prepare_lm_data("embedded:100", tok, 16, cache_dir=tmp_path)
    with open(first.train_split.path, "ab") as f:
        f.write(b"\x00\x00")  # size no longer matches the sidecar
    again = lm.prepare_lm_data("embedded:100", tok, 16, cache_dir=tmp_path)
    assert not again.train_split.from_cache and again.val_split.from_cache
    assert again.train_split.path.stat().st_size == 2 * again.train_split.n_tokens


# ---------------------------------------------------------------------------------------------------------
# Corpora and their errors
# ---------------------------------------------------------------------------------------------------------


def test_jsonl_corpus_and_malformed_line(tok, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n{"text": "three"}\n', encoding="utf-8")
    assert lm.load_corpus(f"jsonl:{good}") == {"train": ["one", "two", "three"]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:3: malformed JSON")):
        lm.load_corpus(f"jsonl:{bad}")
    bad.write_text('{"text": "one"}\n{"body": "two"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2") + ".*'text'"):
        lm.prepare_lm_data(f"jsonl:{bad}", tok, 4, cache_dir=tmp_path)


def test_missing_file_corpus_names_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        lm.load_corpus(f"text:{missing}")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        lm.load_corpus(f"jsonl:{tmp_path / 'nope.jsonl'}")


def test_unknown_corpus_lists_choices():
    with pytest.raises(ValueError, match="wikitext2"):
        lm.resolve_corpus("bookcorpus")


def test_missing_wikitext_names_folder_and_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        lm.load_corpus("wikitext2", data_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "wikitext2") in msg and "Salesforce/wikitext" in msg and "wikitext-2-raw-v1" in msg


def test_data_dir_priority(tmp_path, monkeypatch):
    monkeypatch.setenv(lm.DATA_DIR_ENV, str(FIXTURES))
    assert lm.resolve_data_dir() == FIXTURES
    assert lm.resolve_data_dir(tmp_path) == tmp_path  # explicit argument wins over the env var
    assert lm.resolve_corpus("wikitext2").description == f"local {FIXTURES / 'wikitext2'}"
    monkeypatch.delenv(lm.DATA_DIR_ENV)
    assert lm.resolve_data_dir() is None
    assert lm.resolve_corpus("wikitext2").description.startswith("hub Salesforce/wikitext")


def test_wikitext_fixture_local_layout(tok, tmp_path):
    docs = lm.load_corpus("wikitext2", data_dir=FIXTURES)
    assert {k: len(v) for k, v in docs.items()} == {"train": 3, "val": 2, "test": 1}
    assert docs["train"][1].lstrip().startswith("= Mount Ferrow =")
    assert "= = Climbing = =" in docs["train"][1]  # subsections stay inside their article
    data = lm.prepare_lm_data("wikitext2", tok, block_size=8, data_dir=FIXTURES, cache_dir=tmp_path)
    assert data.split_rule == "given" and set(data.splits) == {"train", "val", "test"}
    for name, fname in (("train", "wiki.train.raw"), ("val", "wiki.valid.raw"), ("test", "wiki.test.raw")):
        assert data.splits[name].n_bytes == (FIXTURES / "wikitext2" / fname).stat().st_size


def test_wikitext_txt_and_parquet_layouts(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    src = FIXTURES / "wikitext2"
    expected = lm.load_corpus("wikitext2", data_dir=FIXTURES)
    txt = tmp_path / "a" / "wikitext-2-raw"
    txt.mkdir(parents=True)
    for split, fname in (("train", "wiki.train.raw"), ("valid", "wiki.valid.raw")):
        (txt / f"{split}.txt").write_bytes((src / fname).read_bytes())
    assert lm.load_corpus("wikitext2", data_dir=tmp_path / "a") == {k: expected[k] for k in ("train", "val")}
    hub = tmp_path / "b" / "wikitext" / "wikitext-2-raw-v1"
    hub.mkdir(parents=True)
    for split, fname in (
        ("train", "wiki.train.raw"),
        ("validation", "wiki.valid.raw"),
        ("test", "wiki.test.raw"),
    ):
        rows = (src / fname).read_text(encoding="utf-8").splitlines(keepends=True)
        pq.write_table(pa.table({"text": rows}), hub / f"{split}-00000-of-00001.parquet")
    assert lm.load_corpus("wikitext2", data_dir=tmp_path / "b") == expected


def test_tinystories_sample_from_shared_data(shared_data, tok, tmp_path):
    sample = shared_data / "tinystories-sample" / "stories.txt"
    if not sample.is_file():
        pytest.skip(f"{sample} not present")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asking for the sample explicitly must not warn
        docs = lm.load_corpus("tinystories-sample", data_dir=shared_data)["train"]
    assert docs[0].startswith("One day, a little girl named Lily found a needle in her room.")
    assert len(docs) > 1000 and all(d == d.strip() and "\n\n" not in d for d in docs)
    with pytest.warns(UserWarning, match="sample"):
        data = lm.prepare_lm_data(
            "tinystories", tok, 64, data_dir=shared_data, cache_dir=tmp_path, max_docs=200
        )
    assert data.train_split.n_docs + data.val_split.n_docs == 200
    assert data.val_split.n_docs == 10
    assert len(data.train) > 0 and len(data.val) > 0


def test_tinystories_full_local_layout(tmp_path):
    folder = tmp_path / "tinystories"
    folder.mkdir()
    sep = f"\n{EOS_TOKEN}\n"
    (folder / "TinyStories-train.txt").write_text(sep.join(["Story one.", "Story two.\n\nPart two."]) + sep)
    (folder / "TinyStories-valid.txt").write_text("Valid story." + sep)
    docs = lm.load_corpus("tinystories", data_dir=tmp_path)
    assert docs == {"train": ["Story one.", "Story two.\n\nPart two."], "val": ["Valid story."]}
    with pytest.raises(FileNotFoundError, match="tinystories-sample"):
        lm.load_corpus("tinystories-sample", data_dir=tmp_path)


def test_embedded_corpus_is_deterministic_and_correct():
    docs = lm.generate_embedded_corpus()
    assert docs == lm.generate_embedded_corpus()
    assert len(docs) == lm.EMBEDDED_DEFAULT_DOCS and len(set(docs)) > 0.99 * len(docs)
    assert 300_000 < sum(len(d.encode()) for d in docs) < 2_000_000
    assert not any("{" in d or "}" in d for d in docs)  # every slot filled
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    checked = 0
    for doc in docs:
        for a, op, b, c in re.findall(r"^(\d+) ([-+*]) (\d+) = (\d+)$", doc, flags=re.M):
            assert ops[op](int(a), int(b)) == int(c)
            checked += 1
        for a, b, c in re.findall(r"What is (\d+) plus (\d+)\? The answer is (\d+)\.", doc):
            assert int(a) + int(b) == int(c)
            checked += 1
    assert checked > 100
    assert lm.load_corpus("embedded:50")["train"] == docs[:50]
    assert lm.load_corpus("embedded", max_docs=7)["train"] == docs[:7]


def test_gpt2_tokenizer_end_to_end(tmp_path, text_file):
    gpt2 = load_tokenizer("gpt2-bpe", cache_dir=tmp_path)
    data = lm.prepare_lm_data(f"text:{text_file}", gpt2, block_size=2, cache_dir=tmp_path, val_fraction=0.3)
    assert data.train_split.tokens.dtype == np.uint16
    assert data.train_split.tokens[0] == 50256


def test_cli_trains_tokenizer_and_prints_stats(tmp_path, capsys):
    argv = ["--corpus", "embedded:200", "--train-tokenizer", str(tmp_path / "tok"), "--vocab-size", "400"]
    argv += ["--block-size", "16", "--cache-dir", str(tmp_path / "cache")]
    assert lm.main(argv) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["vocab_size"] <= 400 and stats["train_docs"] == 190 and stats["val_docs"] == 10
    assert (tmp_path / "tok" / "tokenizer.json").is_file()


def test_block_size_too_large_names_split(tok, tmp_path, text_file):
    with pytest.raises(ValueError, match="split 'train'.*block_size=4096"):
        lm.prepare_lm_data(f"text:{text_file}", tok, block_size=4096, cache_dir=tmp_path, val_fraction=0.3)
