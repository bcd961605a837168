"""Data: tokenizers, corpora, packing into rows, and the stateful loader.

Route of one batch: ``build_tokenizer(cfg.data)`` -> ``build_dataset(cfg.data, tok)`` (corpus ->
token stream -> rows) -> ``DataLoader(ds, global_batch, micro_batch, dp_rank, dp_size, seed)`` ->
``next_step()`` -> ``list[Batch]``.
"""

import importlib

# Imported on first use (PEP 562), so that ``mmtrain.data.indexed`` / ``preprocess`` (and the
# preprocess worker processes) do not pay for importing torch.
_WHERE = {
    "Batch": "batch", "position_ids_from_cu_seqlens": "batch",
    "load_corpus": "corpus", "stdlib_files": "corpus",
    "DataLoader": "loader",
    "PackedDataset": "packing", "Row": "packing", "build_dataset": "packing", "collate": "packing",
    "pack_documents": "packing", "tokenize_documents": "packing",
    "ByteTokenizer": "tokenizer", "HFTokenizer": "tokenizer", "Tokenizer": "tokenizer",
    "build_tokenizer": "tokenizer",
}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"mmtrain.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'mmtrain.data' has no attribute {name!r}")


__all__ = [
    "Batch", "position_ids_from_cu_seqlens",
    "ByteTokenizer", "HFTokenizer", "Tokenizer", "build_tokenizer",
    "load_corpus", "stdlib_files",
    "PackedDataset", "Row", "build_dataset", "collate", "pack_documents", "tokenize_documents",
    "DataLoader",
]
