"""Data pipeline: tokenizers, corpora, packing, collate and the stateful loader."""

from __future__ import annotations

import json
import os
import sysconfig

import numpy as np
import pytest
import torch

from mmtrain.config import ConfigError, DataConfig
from mmtrain.data import (Batch, ByteTokenizer, DataLoader, HFTokenizer,
                          build_dataset, build_tokenizer, collate, load_corpus, pack_documents,
                          stdlib_files, tokenize_documents)

DOCS = ["hello world", "ünïcödé ☃ 日本語", "a", "the quick brown fox jumps over the lazy dog\n" * 3,
        "x = 1\n\ny = 2\n", "€"]


def _tiny_tokenizer_json(path, with_eos=True):
    """Train a small byte-level BPE with the ``tokenizers`` library and save it to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<pad>"] + (["</s>"] if with_eos else [])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(DOCS * 20, trainer)
    tok.save(str(path))
    return tok


def _byte_dataset(docs, seq_len):
    return pack_documents(docs, ByteTokenizer(), seq_len)


def _many_docs(n=120, seed=0):
    rng = np.random.default_rng(seed)
    return ["".join(chr(97 + c) for c in rng.integers(0, 26, size=int(rng.integers(1, 40))))
            for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# Tokenizers
def test_byte_tokenizer_roundtrip_non_ascii():
    tok = build_tokenizer(DataConfig(tokenizer="byte"))
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.name, tok.files()) == (258, 256, 257, "byte", [])
    for text in DOCS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text  # specials have no bytes
    batch = tok.encode_batch(DOCS)
    assert [b.tolist() for b in batch] == [tok.encode(t) for t in DOCS]
    assert len(tok.encode("☃")) == 3


def test_hf_tokenizer_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    ref = _tiny_tokenizer_json(path)
    tok = build_tokenizer(DataConfig(tokenizer=str(path)))
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == ref.token_to_id("</s>")
    assert tok.pad_id == ref.token_to_id("<pad>")
    assert tok.vocab_size == ref.get_vocab_size()
    assert tok.files() == [str(path)]
    for text in DOCS:
        ids = tok.encode(text)
        assert tok.eos_id not in ids
        assert ids == ref.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert [a.tolist() for a in tok.encode_batch(DOCS)] == [tok.encode(t) for t in DOCS]
    # A folder holding tokenizer.json works too.
    assert build_tokenizer(DataConfig(tokenizer=str(tmp_path))).eos_id == tok.eos_id
    # Packing with it: EOS after every document.
    stream, starts = tokenize_documents(DOCS, tok)
    assert stream[starts[1:] - 1].tolist() == [tok.eos_id] * (len(DOCS) - 1)
    assert int(stream[-1]) == tok.eos_id


def test_hf_tokenizer_without_eos_gets_one_added(tmp_path):
    path = tmp_path / "tokenizer.json"
    ref = _tiny_tokenizer_json(path, with_eos=False)
    tok = build_tokenizer(DataConfig(tokenizer=str(path)))
    assert tok.eos_id == ref.get_vocab_size()  # appended after the trained vocabulary
    assert tok.vocab_size == ref.get_vocab_size() + 1
    assert build_tokenizer(DataConfig(tokenizer=str(path))).eos_id == tok.eos_id  # deterministic


def test_missing_tokenizer_raises_config_error(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: file '.*nope.*' not found; .*'byte'"):
        build_tokenizer(DataConfig(tokenizer=str(missing)))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: "):
        build_tokenizer(DataConfig(tokenizer=str(bad)))


# ------------------------------------------------------------------------------------------------
# Corpora
def test_empty_corpus_raises(tmp_path):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n\n ")
    (tmp_path / "blank" / "ignored.bin").write_bytes(b"xyz")  # not a corpus suffix
    empty_file = tmp_path / "empty.txt"
    empty_file.write_text("")
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text('\n{"text": ""}\n')
    for p in (empty_dir, tmp_path / "blank", empty_file, empty_jsonl):
        with pytest.raises(ConfigError, match=r"^data\.corpus: '.*' contains no text; "):
            load_corpus(DataConfig(corpus=str(p)))
    with pytest.raises(ConfigError, match=r"^data\.corpus: '.*' not found"):
        load_corpus(DataConfig(corpus=str(tmp_path / "missing")))


def test_corpus_kinds(tmp_path):
    # Text file: the whole file is one document (blank lines included).
    f = tmp_path / "one.txt"
    f.write_text("para one\n\npara two\n")
    assert load_corpus(DataConfig(corpus=str(f))) == ["para one\n\npara two\n"]
    # Folder: .txt/.md/.py recursively, sorted by relative path, one document per file.
    d = tmp_path / "folder"
    (d / "sub").mkdir(parents=True)
    (d / "b.md").write_text("B")
    (d / "a.txt").write_text("A")
    (d / "sub" / "c.py").write_text("C")
    (d / "skip.json").write_text("nope")
    assert load_corpus(DataConfig(corpus=str(d))) == ["A", "B", "C"]
    # JSONL: one document per line with a "text" field.
    j = tmp_path / "docs.jsonl"
    j.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(DOCS)) + "\n")
    assert load_corpus(DataConfig(corpus=str(j), corpus_max_bytes=0)) == DOCS
    j.write_text('{"text": "ok"}\n{"txt": "bad"}\n')
    with pytest.raises(ConfigError, match=r"^data\.corpus: .* line 2 "):
        load_corpus(DataConfig(corpus=str(j)))
    # Non-UTF-8 user file: a clear error, not a silent skip.
    (d / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"^data\.corpus: .*latin\.txt' is not UTF-8"):
        load_corpus(DataConfig(corpus=str(d)))


def test_corpus_max_bytes_cuts_on_char_boundary(tmp_path):
    j = tmp_path / "docs.jsonl"
    j.write_text("\n".join(json.dumps({"text": t}) for t in ["abcd", "€€€", "zzz"]))
    # 4 + 3 bytes of "€€€" (9 bytes) -> "€" kept, the split second "€" dropped.
    assert load_corpus(DataConfig(corpus=str(j), corpus_max_bytes=8)) == ["abcd", "€"]
    assert load_corpus(DataConfig(corpus=str(j), corpus_max_bytes=4)) == ["abcd"]
    assert load_corpus(DataConfig(corpus=str(j), corpus_max_bytes=0)) == ["abcd", "€€€", "zzz"]


def test_stdlib_corpus_deterministic_and_filtered():
    cfg = DataConfig(corpus="stdlib", corpus_max_bytes=300_000)
    a, b = load_corpus(cfg), load_corpus(cfg)
    assert a == b and len(a) > 3
    total = sum(len(t.encode("utf-8")) for t in a)
    assert 300_000 - 4 < total <= 300_000
    files = stdlib_files()
    root = sysconfig.get_paths()["stdlib"]
    rel_paths = [os.path.relpath(p, root).replace(os.sep, "/") for p in files]
    assert rel_paths == sorted(rel_paths) and all(p.endswith(".py") for p in rel_paths)
    for p in rel_paths:
        assert not {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
                    "ensurepip", "__pycache__"} & set(p.split("/")[:-1])
    assert "json/__init__.py" in rel_paths


def test_default_build_sizes():
    cfg = DataConfig()  # stdlib, 8 MB cap, byte tokenizer, seq_len 256
    tok = build_tokenizer(cfg)
    ds = build_dataset(cfg, tok)
    assert 8_000_000 - 3 <= ds.num_tokens - ds.num_documents <= 8_000_000  # 1 token/byte + EOS
    assert len(ds) == (ds.num_tokens - 1) // 256
    assert ds.stream.dtype == np.uint16 and ds.stream.nbytes == 2 * ds.num_tokens


# ------------------------------------------------------------------------------------------------
# Packing
@pytest.mark.parametrize("seq_len", [2, 7, 16, 64])
def test_packing_rows_reproduce_stream_and_boundaries(seq_len):
    tok = ByteTokenizer()
    ds = _byte_dataset(DOCS * 3, seq_len)
    expected = []
    for t in DOCS * 3:
        expected += tok.encode(t) + [tok.eos_id]
    stream = np.array(expected)
    assert ds.stream.tolist() == expected
    R = len(ds)
    assert R == (len(expected) - 1) // seq_len
    rows = [ds.row(i) for i in range(R)]
    assert torch.cat([r.tokens for r in rows]).tolist() == expected[:R * seq_len]
    assert torch.cat([r.labels for r in rows]).tolist() == expected[1:R * seq_len + 1]
    for i, r in enumerate(rows):
        toks = r.tokens.numpy()
        assert sum(r.seqlens) == seq_len and all(n > 0 for n in r.seqlens)
        # A piece starts at 0 and wherever the previous input is an EOS (= a document start).
        starts = [0] + [t for t in range(1, seq_len) if toks[t - 1] == tok.eos_id]
        assert np.cumsum([0] + r.seqlens)[:-1].tolist() == starts
        # The loss is masked exactly where the input is a document's EOS (label = next doc's 1st).
        assert (r.loss_mask == 0).nonzero().flatten().tolist() == \
            np.flatnonzero(toks == tok.eos_id).tolist()
        assert r.loss_mask.dtype == torch.float32
    with pytest.raises(IndexError):
        ds.row(R)


def test_loss_mask_keeps_eos_as_label_and_masks_row_edge():
    # Documents "ab" and "cd": stream a b EOS c d EOS; seq_len 2 -> rows [a b|EOS], [EOS c|d].
    ds = _byte_dataset(["ab", "cd"], 2)
    a, b, c, d, E = 97, 98, 99, 100, 256
    r0, r1 = ds.row(0), ds.row(1)
    assert r0.tokens.tolist() == [a, b] and r0.labels.tolist() == [b, E]
    assert r0.loss_mask.tolist() == [1, 1] and r0.seqlens == [2]  # EOS is a label that counts
    assert r1.tokens.tolist() == [E, c] and r1.labels.tolist() == [c, d]
    assert r1.loss_mask.tolist() == [0, 1] and r1.seqlens == [1, 1]  # EOS -> next doc masked
    # Row edge: the last input's label starts a new document -> masked even though it's outside.
    ds3 = _byte_dataset(["ab", "cd"], 3)
    r = ds3.row(0)
    assert r.tokens.tolist() == [a, b, E] and r.labels.tolist() == [b, E, c]
    assert r.loss_mask.tolist() == [1, 1, 0] and r.seqlens == [3]


def test_collate_cu_seqlens_and_positions():
    tok = ByteTokenizer()
    ds = _byte_dataset(DOCS * 2, 16)
    rows = [ds.row(i) for i in (3, 0, 5)]
    batch = collate(rows)
    assert isinstance(batch, Batch)
    B, T = 3, 16
    assert batch.tokens.shape == batch.labels.shape == batch.position_ids.shape == (B, T)
    assert batch.tokens.dtype == batch.labels.dtype == batch.position_ids.dtype == torch.int64
    assert batch.cu_seqlens.dtype == torch.int32
    cu = batch.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == B * T and cu == sorted(set(cu))
    assert {0, T, 2 * T} <= set(cu)  # row edges are boundaries
    flat_tok = batch.tokens.reshape(-1)
    flat_pos = batch.position_ids.reshape(-1).tolist()
    starts = set(cu[:-1])
    for t in range(B * T):
        is_start = t % T == 0 or int(flat_tok[t - 1]) == tok.eos_id
        assert (t in starts) == is_start
        assert flat_pos[t] == (0 if is_start else flat_pos[t - 1] + 1)


def test_too_small_corpus(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("abc")
    with pytest.raises(ConfigError, match=r"^data\.corpus: .*data\.seq_len"):
        build_dataset(DataConfig(corpus=str(f), seq_len=16), ByteTokenizer())
    ds = build_dataset(DataConfig(corpus=str(f), seq_len=2), ByteTokenizer())  # "abc" EOS: 1 row
    assert len(ds) == 1
    with pytest.raises(ConfigError, match=r"^data\.corpus: .*train\.global_batch"):
        DataLoader(ds, global_batch=2, micro_batch=1)


# ------------------------------------------------------------------------------------------------
# Loader
def _ids(batches):
    return [b.tokens.tolist() for b in batches]


def _run(loader, steps):
    return [_ids(loader.next_step()) for _ in range(steps)]


@pytest.fixture(scope="module")
def ds():
    return _byte_dataset(_many_docs(), 8)  # a few hundred rows


def test_loader_seeded_order(ds):
    a = _run(DataLoader(ds, 8, 2, seed=3), 5)
    b = _run(DataLoader(ds, 8, 2, seed=3), 5)
    c = _run(DataLoader(ds, 8, 2, seed=4), 5)
    assert a == b and a != c
    steps = DataLoader(ds, 8, 2, seed=3).next_step()
    assert len(steps) == 4 and all(s.num_rows == 2 for s in steps)
    # Rows are the seeded permutation of epoch 0.
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(3)).tolist()
    flat = [row for micro in a[0] for row in micro]
    assert flat == [ds.row(i).tokens.tolist() for i in perm[:8]]


def test_loader_resume_equals_uninterrupted(ds):
    ref = DataLoader(ds, 12, 3, seed=7)
    full = _run(ref, 9)
    first = DataLoader(ds, 12, 3, seed=7)
    _run(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    assert state["consumed_rows"] == 48
    resumed = DataLoader(ds, 12, 3, seed=7)
    resumed.load_state_dict(state)
    assert _run(resumed, 5) == full[4:]
    # Resuming under another DP layout continues at the same sample as well.
    ranks = [DataLoader(ds, 12, 3, dp_rank=r, dp_size=2, seed=7) for r in range(2)]
    for ld in ranks:
        ld.load_state_dict(state)
    assert [m for ld in ranks for m in _ids(ld.next_step())] == full[4]
    with pytest.raises(ConfigError, match=r"^data\.seed"):
        DataLoader(ds, 12, 3, seed=8).load_state_dict(state)


@pytest.mark.parametrize("dp_size,micro", [(2, 2), (4, 1), (2, 3)])
def test_dp_ranks_union_equals_single_process(ds, dp_size, micro):
    G, steps = 12, 3
    single = _run(DataLoader(ds, G, micro, seed=11), steps)
    ranks = [DataLoader(ds, G, micro, dp_rank=r, dp_size=dp_size, seed=11) for r in range(dp_size)]
    for s in range(steps):
        per_rank = [_ids(ld.next_step()) for ld in ranks]
        assert per_rank[0][0] == single[s][0]
        assert [m for r in per_rank for m in r] == single[s]
    # A single process with one big micro-batch sees the same rows, too.
    whole = DataLoader(ds, G, G, seed=11).next_step()
    assert len(whole) == 1
    assert whole[0].tokens.tolist() == [row for m in single[0] for row in m]


def test_epochs_wrap_deterministically():
    ds = _byte_dataset(_many_docs(30, seed=1), 8)
    R, G = len(ds), 6
    assert R % G  # steps straddle epoch ends
    ld = DataLoader(ds, G, 2, seed=5)
    steps = 3 * R // G + 2
    idx = np.concatenate([np.concatenate(ld.step_rows(s)) for s in range(steps)])
    for e in range(len(idx) // R):
        perm = torch.randperm(R, generator=torch.Generator().manual_seed(5 + e)).numpy()
        assert (idx[e * R:(e + 1) * R] == perm).all()
        assert sorted(idx[e * R:(e + 1) * R].tolist()) == list(range(R))
    # The batches follow those indices, across the wrap, and a fresh loader repeats them.
    got = _run(ld, steps)
    assert ld.epoch == steps * G // R
    flat = [row for step in got for m in step for row in m]
    assert flat == [ds.row(int(i)).tokens.tolist() for i in idx]
    assert _run(DataLoader(ds, G, 2, seed=5), steps) == got


def test_loader_validation(ds):
    with pytest.raises(ConfigError, match=r"^train\.global_batch: 10 is not divisible .* 4"):
        DataLoader(ds, global_batch=10, micro_batch=2, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError):
        DataLoader(ds, global_batch=8, micro_batch=2, dp_rank=2, dp_size=2)
