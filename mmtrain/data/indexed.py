"""Megatron's ``.bin/.idx`` token files: a writer and a memory-mapped reader, byte-compatible
with megatron-core's ``IndexedDatasetBuilder`` / ``IndexedDataset`` (no megatron-core needed).

Legend: S sequences (documents), K ``document_indices`` entries (S + 1 when every document is one
sequence), itemsize the bytes of one token.

``PREFIX.bin`` is the tokens of every sequence back to back (dtype from the index). ``PREFIX.idx``::

    b"MMIDIDX\\x00\\x00"   9-byte magic
    <Q  version = 1
    <B  dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    <Q  S, the sequence count
    <Q  K, the document_indices count
    int32[S]  sequence lengths (tokens)
    int64[S]  sequence pointers (byte offsets into .bin)
    int64[K]  document_indices (sequence index where each document starts, then S)

As in Megatron's GPT datasets, one *sequence* is one training document (``mmtrain preprocess``
and Megatron-LM's ``preprocess_data.py`` without ``--split-sentences`` write one sequence per
document, ending with the end-of-document token).

The reader maps both files (nothing is read into memory up front) and checks the structure at
open: magic, version, dtype, the index file's exact size, ``.bin`` size against the lengths,
pointers against the cumulative lengths and ``document_indices``. A truncated or corrupted pair
raises :class:`DataFileError`, one line naming the file and the fix (exit status 2 from the CLI).
The format has no checksum: a bit flip inside ``.bin`` that keeps a token id within the
vocabulary cannot be detected; one that pushes it outside is caught when the row is read
(:meth:`IndexedReader.check_tokens`).
"""

from __future__ import annotations

import os
import struct
from typing import Iterable, Optional

import numpy as np

from mmtrain.config import ConfigError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
          7: np.float32, 8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34


class DataFileError(ConfigError):
    """A ``.bin/.idx`` file is missing, truncated or corrupted (exit status 2 from the CLI)."""


def optimal_dtype(vocab_size: int):
    """Megatron's choice: uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def strip_suffix(prefix: str) -> str:
    """``a/b_text_document.bin`` or ``.idx`` -> ``a/b_text_document`` (a prefix stays as it is)."""
    for suf in (".bin", ".idx"):
        if prefix.endswith(suf):
            return prefix[: -len(suf)]
    return prefix


# ------------------------------------------------------------------------------------- writer
class IndexedWriter:
    """Streams documents into ``PREFIX.bin`` and writes ``PREFIX.idx`` at :meth:`finalize`.

    Both files are written under temporary names and renamed into place at the end, so a reader
    never sees a half-written pair. Memory: 12 bytes per document (lengths), none per token.
    """

    def __init__(self, prefix: str, dtype=np.uint16):
        self.prefix = strip_suffix(os.fspath(prefix))
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"dtype {self.dtype} is not one of Megatron's token dtypes")
        folder = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(folder, exist_ok=True)
        self._tmp = f"{self.prefix}.tmp{os.getpid()}"
        self._bin = open(self._tmp + ".bin", "wb")
        self._lengths: list[int] = []
        self.num_tokens = 0

    def add_document(self, ids) -> None:
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError("a document is a 1-D sequence of token ids")
        arr = arr.astype(self.dtype, copy=False)
        self._bin.write(arr.tobytes(order="C"))
        self._lengths.append(len(arr))
        self.num_tokens += len(arr)

    def finalize(self) -> str:
        """Write the index, rename both files into place; the prefix."""
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self._tmp + ".idx", "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))
        os.replace(self._tmp + ".bin", self.prefix + ".bin")
        os.replace(self._tmp + ".idx", self.prefix + ".idx")
        return self.prefix

    def abort(self) -> None:
        self._bin.close()
        for suf in (".bin", ".idx"):
            try:
                os.remove(self._tmp + suf)
            except FileNotFoundError:
                pass


def write_documents(prefix: str, docs: Iterable, dtype=np.uint16) -> str:
    w = IndexedWriter(prefix, dtype)
    for d in docs:
        w.add_document(d)
    return w.finalize()


# ------------------------------------------------------------------------------------- reader
class IndexedReader:
    """Memory-mapped view of ``PREFIX.bin/.idx``; ``reader[i]`` is document i's tokens."""

    def __init__(self, prefix: str, what: str = "data.blend"):
        self.prefix = strip_suffix(os.fspath(prefix))
        self.what = what
        idx_path, bin_path = self.prefix + ".idx", self.prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise DataFileError(f"{what}: {p} not found; give the prefix of a .bin/.idx pair "
                                    f"(e.g. /data/a_text_document) written by `mmtrain preprocess` "
                                    f"or Megatron-LM's preprocess_data.py")
        self.idx_path, self.bin_path = idx_path, bin_path
        size = os.path.getsize(idx_path)
        fix = f"re-create it with `mmtrain preprocess` (or copy it again)"
        if size < HEADER_BYTES:
            self._bad(idx_path, f"is truncated ({size} bytes, shorter than the header)", fix)
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if head[:9] != MAGIC:
            self._bad(idx_path, "is not a Megatron index (bad magic bytes)", fix)
        version, = struct.unpack("<Q", head[9:17])
        code, = struct.unpack("<B", head[17:18])
        n_seq, n_doc = struct.unpack("<QQ", head[18:34])
        if version != VERSION:
            self._bad(idx_path, f"has index version {version}, expected {VERSION}", fix)
        if code not in DTYPES:
            self._bad(idx_path, f"has an unknown dtype code {code}", fix)
        expect = HEADER_BYTES + n_seq * 4 + n_seq * 8 + n_doc * 8
        if size != expect:
            self._bad(idx_path, f"has {size} bytes but its header promises {expect} "
                      f"({n_seq} sequences, {n_doc} document indices): truncated or corrupted", fix)
        self.dtype = np.dtype(DTYPES[code])
        mm = np.memmap(idx_path, dtype=np.uint8, mode="r")
        off = HEADER_BYTES
        self.lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=off)
        off += n_seq * 4
        self.pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=off)
        off += n_seq * 8
        self.document_indices = np.frombuffer(mm, dtype=np.int64, count=n_doc, offset=off)
        self._check_index(fix)
        total = int(self.lengths.sum(dtype=np.int64)) if n_seq else 0
        bin_size = os.path.getsize(bin_path)
        if bin_size != total * self.dtype.itemsize:
            self._bad(bin_path, f"has {bin_size} bytes but {idx_path} describes "
                      f"{total * self.dtype.itemsize} ({total} tokens of {self.dtype.name}): "
                      f"truncated or not the pair of this index", fix)
        self.num_tokens = total
        self._bin = np.memmap(bin_path, dtype=self.dtype, mode="r") if total else \
            np.zeros(0, dtype=self.dtype)

    def _bad(self, path, why, fix):
        raise DataFileError(f"{self.what}: {path} {why}; {fix}")

    def _check_index(self, fix) -> None:
        L, P, D = self.lengths, self.pointers, self.document_indices
        n = len(L)
        chunk = 1 << 22  # checked in chunks: bounded transient memory
        prev_end = 0
        for a in range(0, n, chunk):
            l = L[a:a + chunk].astype(np.int64)
            p = P[a:a + chunk]
            if (l < 0).any():
                self._bad(self.idx_path, "has a negative sequence length (corrupted)", fix)
            expect = prev_end + np.concatenate(([0], np.cumsum(l[:-1]))) * self.dtype.itemsize
            if not np.array_equal(p, expect):
                self._bad(self.idx_path, "has sequence pointers that do not follow the lengths "
                          "(corrupted)", fix)
            prev_end = int(p[-1] + l[-1] * self.dtype.itemsize)
        if len(D) == 0 or D[0] != 0 or D[-1] != n or (np.diff(D) < 0).any():
            self._bad(self.idx_path, "has document indices that are not 0..sequence count in "
                      "order (corrupted)", fix)

    # -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset+length)`` of document ``i`` (a view of the mapped file)."""
        n = int(self.lengths[i])
        length = n - offset if length is None else length
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._bin[start:start + length]

    def check_tokens(self, arr: np.ndarray, vocab_size: int) -> None:
        """Raise :class:`DataFileError` when ``arr`` holds an id outside ``[0, vocab_size)``."""
        if len(arr) and (int(arr.max()) >= vocab_size or int(arr.min()) < 0):
            raise DataFileError(f"{self.what}: {self.bin_path} holds token id {int(arr.max())} "
                                f"outside the vocabulary of {vocab_size} (corrupted, or written "
                                f"with another tokenizer); re-create it with `mmtrain preprocess` "
                                f"using data.tokenizer")

    def __repr__(self) -> str:
        return (f"IndexedReader({self.prefix!r}, documents={len(self)}, tokens={self.num_tokens}, "
                f"dtype={self.dtype.name})")
