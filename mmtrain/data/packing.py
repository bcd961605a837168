"""Packing: documents -> one token stream -> fixed-length rows with document boundaries.

Legend: S tokens in the stream, R rows, T row length (``data.seq_len``), B rows in a batch,
N documents (pieces) in a batch, D documents in the corpus.

1. Every document is tokenised (no BOS) and followed by EOS; the pieces are concatenated into one
   stream ``stream_S``. ``doc_starts_D`` holds the stream position where each document begins.
2. Row r covers ``stream[r*T : r*T + T + 1]`` (stride T, so neighbouring rows share one token):
   ``tokens = row[:-1]``, ``labels = row[1:]``. The incomplete tail is dropped, so
   ``R = (S - 1) // T``.
3. Per row, the documents are cut at the row's edges: ``seqlens`` are the lengths of the document
   pieces among the T inputs (a document start inside the row starts a new piece).
4. ``loss_mask[t] = 0`` exactly where the label ``stream[r*T + t + 1]`` is the first token of a
   document, i.e. where the input is the EOS that ends the previous document: predicting the next
   document from the previous one is not learnable. Everything else counts, EOS included as a
   label (the model learns where a document ends).

:func:`collate` stacks rows into a :class:`Batch`: ``cu_seqlens`` over the flattened batch (row
edges are boundaries too) and ``position_ids`` restarting at every piece.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from mmtrain.config import ConfigError, DataConfig
from mmtrain.data.batch import Batch, position_ids_from_cu_seqlens

_ENCODE_CHUNK = 1024  # documents handed to the tokenizer at once (bounds the transient memory)


class Row(NamedTuple):
    tokens: torch.Tensor  # [T] int64 inputs
    labels: torch.Tensor  # [T] int64 next-token targets
    loss_mask: torch.Tensor  # [T] float32
    seqlens: list  # lengths of the document pieces among the T inputs; sums to T


def tokenize_documents(docs: Sequence[str], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """``(stream_S, doc_starts_D)``: the documents' ids, each followed by EOS, concatenated.

    The stream uses the smallest integer dtype that holds the vocabulary (uint16 up to 65536 ids,
    else int32); ``doc_starts_D`` is int64 and starts with 0.
    """
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    parts, lengths = [], []
    for i in range(0, len(docs), _ENCODE_CHUNK):
        for ids in tokenizer.encode_batch(docs[i:i + _ENCODE_CHUNK]):
            parts.append(ids.astype(dtype, copy=False))
            parts.append(eos)
            lengths.append(len(ids) + 1)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    doc_starts = np.zeros(len(lengths), dtype=np.int64)
    if lengths:
        np.cumsum(lengths[:-1], out=doc_starts[1:])
    return stream, doc_starts


class PackedDataset:
    """Rows of ``seq_len`` inputs (+1 label) over one token stream; see the module docstring.

    Holds two compact arrays (``stream`` and ``doc_starts``); rows are sliced out on demand.
    """

    def __init__(self, stream: np.ndarray, doc_starts: np.ndarray, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.stream = np.asarray(stream)
        self.doc_starts = np.asarray(doc_starts, dtype=np.int64)
        if len(self.doc_starts) and self.doc_starts[0] != 0:
            raise ValueError("doc_starts must begin with 0 (the stream starts with a document)")
        self.seq_len = int(seq_len)
        self._rows = max(0, (len(self.stream) - 1) // self.seq_len)

    def __len__(self) -> int:
        return self._rows

    @property
    def num_tokens(self) -> int:
        return len(self.stream)

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts)

    def row(self, i: int) -> Row:
        """Row ``i``: tokens, labels, loss_mask ([T] each) and the piece lengths."""
        if not 0 <= i < self._rows:
            raise IndexError(f"row {i} out of range for {self._rows} rows")
        T = self.seq_len
        a = i * T
        seg = torch.from_numpy(self.stream[a:a + T + 1].astype(np.int64))
        ds = self.doc_starts
        lo = int(np.searchsorted(ds, a, side="right"))  # first start > a
        hi_in = int(np.searchsorted(ds, a + T, side="left"))  # starts in (a, a+T): piece edges
        hi_lab = int(np.searchsorted(ds, a + T, side="right"))  # starts in (a, a+T]: masked labels
        inner = ds[lo:hi_in] - a
        edges = np.concatenate(([0], inner, [T]))
        seqlens = np.diff(edges).tolist()
        loss_mask = torch.ones(T, dtype=torch.float32)
        loss_mask[torch.from_numpy(ds[lo:hi_lab] - a - 1)] = 0.0
        return Row(seg[:-1], seg[1:], loss_mask, seqlens)

    def __getitem__(self, i: int) -> Row:
        return self.row(i)

    def __repr__(self) -> str:
        return (f"PackedDataset(rows={self._rows}, seq_len={self.seq_len}, "
                f"tokens={self.num_tokens}, documents={self.num_documents})")


def pack_documents(docs: Sequence[str], tokenizer, seq_len: int) -> PackedDataset:
    """Tokenise ``docs`` (EOS after each) and cut the stream into rows of ``seq_len`` inputs."""
    stream, doc_starts = tokenize_documents(docs, tokenizer)
    return PackedDataset(stream, doc_starts, seq_len)


def collate(rows: Sequence[Row]) -> Batch:
    """Stack rows into a :class:`Batch` ([B, T] tensors, ``cu_seqlens`` [N+1] int32 over the
    flattened batch, ``position_ids`` restarting at every document piece)."""
    if not rows:
        raise ValueError("collate needs at least one row")
    tokens_BT = torch.stack([r.tokens for r in rows])
    labels_BT = torch.stack([r.labels for r in rows])
    mask_BT = torch.stack([r.loss_mask for r in rows])
    B, T = tokens_BT.shape
    lens_N = torch.tensor([n for r in rows for n in r.seqlens], dtype=torch.int64)
    cu = torch.zeros(len(lens_N) + 1, dtype=torch.int64)
    torch.cumsum(lens_N, 0, out=cu[1:])
    if int(cu[-1]) != B * T:
        raise ValueError(f"row seqlens sum to {int(cu[-1])}, expected B*T={B * T}")
    cu_seqlens = cu.to(torch.int32)
    position_ids_BT = position_ids_from_cu_seqlens(cu_seqlens, B * T).view(B, T)
    return Batch(tokens=tokens_BT, labels=labels_BT, loss_mask=mask_BT, cu_seqlens=cu_seqlens,
                 position_ids=position_ids_BT)


def build_dataset(cfg: DataConfig, tokenizer, announce: bool = False) -> PackedDataset:
    """Corpus -> packed rows of ``cfg.seq_len``, memory-mapped from the corpus cache (the corpus
    is preprocessed to ``.bin/.idx`` on first use; see :mod:`mmtrain.data.preprocess`)."""
    from mmtrain.data.indexed import IndexedReader
    from mmtrain.data.preprocess import cached_corpus

    reader = IndexedReader(cached_corpus(cfg, tokenizer, announce), "data.corpus")
    doc_starts = np.asarray(reader.pointers) // reader.dtype.itemsize
    ds = PackedDataset(reader._bin, doc_starts, cfg.seq_len)
    if len(ds) == 0:
        raise ConfigError(f"data.corpus: '{cfg.corpus}' gives {ds.num_tokens} tokens, fewer than one "
                          f"row of data.seq_len+1={cfg.seq_len + 1}; use a larger corpus "
                          f"(or data.corpus_max_bytes) or a smaller data.seq_len")
    return ds
