"""Megatron .bin/.idx: mmtrain's writer/reader against megatron-core's builder/reader (the oracle),
preprocess, the corpus cache, and corrupted files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmtrain.config import ConfigError, DataConfig
from mmtrain.data import ByteTokenizer, build_tokenizer, load_corpus
from mmtrain.data.indexed import DataFileError, IndexedReader, write_documents
from mmtrain.data.preprocess import cached_corpus, preprocess
from tests.conftest import REPO, subprocess_env
from tests.unit.test_data import DOCS, _tiny_tokenizer_json

megatron_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def _jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return path


@pytest.mark.parametrize("tok_kind", ["byte", "bpe"])
def test_preprocess_read_by_megatron_equals_tokenizer(tmp_path, tok_kind):
    spec = "byte" if tok_kind == "byte" else str(_tiny_tokenizer_json(tmp_path / "tok.json") and
                                                 tmp_path / "tok.json")
    tok = build_tokenizer(DataConfig(tokenizer=spec))
    docs = DOCS * 7
    src = _jsonl(tmp_path / "in.jsonl", docs)
    out = preprocess(str(src), str(tmp_path / "out" / "a_text_document"), spec, workers=1,
                     progress=False)
    assert out["documents"] == len(docs)
    ds = megatron_indexed.IndexedDataset(str(tmp_path / "out" / "a_text_document"))
    assert len(ds) == len(docs)
    ours = IndexedReader(tmp_path / "out" / "a_text_document")
    for i, text in enumerate(docs):
        want = tok.encode(text) + [tok.eos_id]
        assert ds[i].tolist() == want
        assert ours[i].tolist() == want
    assert ds.index.dtype == np.uint16 == ours.dtype
    assert ds.document_indices.tolist() == list(range(len(docs) + 1))


def test_preprocess_workers_give_identical_files(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(600):  # > 2 chunks of 256 documents
        (folder / f"{i:04d}.txt").write_text(DOCS[i % len(DOCS)] + f" #{i}")
    a = preprocess(str(folder), str(tmp_path / "w1"), "byte", workers=1, progress=False)
    b = preprocess(str(folder), str(tmp_path / "w2"), "byte", workers=2, progress=False)
    assert a["documents"] == b["documents"] == 600
    for suf in (".bin", ".idx"):
        assert (tmp_path / f"w1{suf}").read_bytes() == (tmp_path / f"w2{suf}").read_bytes()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_builder_files_read_by_mmtrain(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 250, size=int(rng.integers(1, 60))) for _ in range(50)]
    prefix = str(tmp_path / "m_text_document")
    builder = megatron_indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        builder.add_item(torch.from_numpy(d.astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    r = IndexedReader(prefix)
    assert len(r) == len(docs) and r.dtype == np.dtype(dtype)
    for i, d in enumerate(docs):
        assert r[i].tolist() == d.tolist()
    # ... and mmtrain's writer produces the same bytes as megatron-core's builder
    write_documents(str(tmp_path / "ours"), docs, dtype)
    for suf in (".bin", ".idx"):
        assert (tmp_path / f"ours{suf}").read_bytes() == open(prefix + suf, "rb").read()


def test_megatron_builder_files_train_in_mmtrain(tmp_path):
    """A blend of a file written by megatron-core's builder trains (loss falls)."""
    from mmtrain.recipe import load_config
    from mmtrain.train.loop import train

    tok = ByteTokenizer()
    docs = load_corpus(DataConfig(corpus_max_bytes=200_000))
    prefix = str(tmp_path / "stdlib_text_document")
    builder = megatron_indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs:
        builder.add_item(torch.tensor(tok.encode(d) + [tok.eos_id]))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    cfg = load_config([f"data.blend=[1.0,{prefix}]", "data.seq_len=64", "train.global_batch=4",
                       "train.max_steps=10", "train.warmup_steps=2", "train.schedule=constant",
                       f"run.dir={tmp_path / 'run'}", "run.progress=false"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI machine is shared: oversubscribed threads only slow it
    try:
        res = train(cfg)
    finally:
        torch.set_num_threads(threads)
    losses = [l for _, l in res.losses]
    assert len(losses) == 10 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses


def test_reader_imports_without_megatron(tmp_path):
    write_documents(str(tmp_path / "x"), [np.arange(5), np.arange(3)], np.uint16)
    code = ("import sys; sys.modules['megatron'] = None\n"
            "from mmtrain.data.indexed import IndexedReader\nimport mmtrain.data.blend\n"
            f"r = IndexedReader({str(tmp_path / 'x')!r}); print(r[0].tolist(), r[1].tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=subprocess_env(PYTHONPATH=str(REPO)), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0, 1, 2, 3, 4] [0, 1, 2]"


def test_corpus_cache_written_once_and_equals_in_memory_packing(tmp_path):
    from mmtrain.data import pack_documents
    from mmtrain.data.packing import build_dataset

    cfg = DataConfig(corpus_max_bytes=50_000, seq_len=64, cache_dir=str(tmp_path / "cache"))
    tok = ByteTokenizer()
    prefix = cached_corpus(cfg, tok)
    mtime = os.stat(prefix + ".bin").st_mtime_ns
    assert cached_corpus(cfg, tok) == prefix and os.stat(prefix + ".bin").st_mtime_ns == mtime
    ds = build_dataset(cfg, tok)
    ref = pack_documents(load_corpus(cfg), tok, 64)
    assert isinstance(ds.stream, np.memmap) or isinstance(ds.stream.base, np.memmap)
    assert len(ds) == len(ref)
    np.testing.assert_array_equal(np.asarray(ds.stream), ref.stream)
    np.testing.assert_array_equal(ds.doc_starts, ref.doc_starts)
    # another cap is another cache entry
    assert cached_corpus(DataConfig(corpus_max_bytes=40_000, cache_dir=cfg.cache_dir), tok) != prefix


# ------------------------------------------------------------------------------ corrupted files
def _pair(tmp_path, name="c_text_document"):
    prefix = str(tmp_path / name)
    write_documents(prefix, [np.arange(i % 7 + 2) + 65 for i in range(40)], np.uint16)
    return prefix


@pytest.mark.parametrize("damage,file,words", [
    ("truncate", ".bin", "truncated"),
    ("truncate", ".idx", "truncated"),
    ("flip_header", ".idx", "magic"),
    ("flip_length", ".idx", "pointers"),
    ("flip_count", ".idx", "header promises"),
])
def test_damaged_files_raise_one_line_naming_the_file(tmp_path, damage, file, words):
    prefix = _pair(tmp_path)
    path = prefix + file
    raw = bytearray(open(path, "rb").read())
    if damage == "truncate":
        raw = raw[:-7]
    elif damage == "flip_header":
        raw[2] ^= 0x10
    elif damage == "flip_length":
        raw[34 + 4 * 5] ^= 0x04  # a bit of sequence length 5
    elif damage == "flip_count":
        raw[18] ^= 0x01  # a bit of the sequence count
    open(path, "wb").write(bytes(raw))
    with pytest.raises(DataFileError) as e:
        IndexedReader(prefix)
    msg = str(e.value)
    assert "\n" not in msg and path in msg and words in msg and "mmtrain preprocess" in msg
    assert isinstance(e.value, ConfigError)


def test_bit_flip_in_bin_caught_when_read(tmp_path):
    """A flipped high bit puts a token id outside the vocabulary: caught as the row is read."""
    from mmtrain.data.blend import BlendLoader
    from mmtrain.train.schedules import BatchSchedule

    prefix = _pair(tmp_path)
    raw = bytearray(open(prefix + ".bin", "rb").read())
    raw[11] ^= 0x80  # high byte of token 5 (little-endian uint16)
    open(prefix + ".bin", "wb").write(bytes(raw))
    cfg = DataConfig(blend=[1.0, prefix], seq_len=300)  # one row covers every token
    ld = BlendLoader(cfg, BatchSchedule(300, 1), 1, 1, vocab_size=258)
    with pytest.raises(DataFileError, match=f"{prefix}.bin holds token id"):
        ld.next_step()


def test_cli_damaged_data_exits_2_with_one_line(tmp_path):
    prefix = _pair(tmp_path)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(10)
    out = subprocess.run([sys.executable, "-m", "mmtrain", "train", f"data.blend=[1.0,{prefix}]",
                          f"run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                         env=subprocess_env(PYTHONPATH=str(REPO)), timeout=300)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: data.blend: {prefix}.bin has 10 bytes")


def test_preprocess_cli_progress_and_summary(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", DOCS)
    out = subprocess.run([sys.executable, "-m", "mmtrain", "preprocess", str(src),
                          str(tmp_path / "p_text_document")], capture_output=True, text=True,
                         env=subprocess_env(PYTHONPATH=str(REPO), COLUMNS="120"), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "preprocess" in out.stderr  # the progress bar
    n_tok = sum(len(d.encode()) + 1 for d in DOCS)
    assert f"{len(DOCS)} documents, {n_tok} tokens" in out.stdout
    assert len(IndexedReader(tmp_path / "p_text_document")) == len(DOCS)
