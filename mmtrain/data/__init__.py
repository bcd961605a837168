"""Data: tokenizers, corpora, packing into rows, and the stateful loader.

Route of one batch: ``build_tokenizer(cfg.data)`` -> ``build_dataset(cfg.data, tok)`` (corpus ->
token stream -> rows) -> ``DataLoader(ds, global_batch, micro_batch, dp_rank, dp_size, seed)`` ->
``next_step()`` -> ``list[Batch]``.
"""

from mmtrain.data.batch import Batch, position_ids_from_cu_seqlens
from mmtrain.data.corpus import load_corpus, stdlib_files
from mmtrain.data.loader import DataLoader
from mmtrain.data.packing import (PackedDataset, Row, build_dataset, collate, pack_documents,
                                  tokenize_documents)
from mmtrain.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "Batch", "position_ids_from_cu_seqlens",
    "ByteTokenizer", "HFTokenizer", "Tokenizer", "build_tokenizer",
    "load_corpus", "stdlib_files",
    "PackedDataset", "Row", "build_dataset", "collate", "pack_documents", "tokenize_documents",
    "DataLoader",
]
