"""Text -> Megatron ``.bin/.idx``: ``mmtrain preprocess`` and the corpus cache.

    mmtrain preprocess INPUT OUTPUT_PREFIX [--tokenizer T] [--workers N] [--max-bytes B] [--quiet]

INPUT is what ``data.corpus`` accepts (``stdlib``, a text file = one document, a folder of
.txt/.md/.py files = one document per file, a ``.jsonl`` with a ``"text"`` field = one document
per line). Every document is tokenised without BOS, followed by the tokenizer's end-of-document
id, and written as one sequence, exactly like Megatron-LM's ``preprocess_data.py --append-eod``.
The token dtype is Megatron's choice (uint16 below 65,500 ids, else int32). Documents stream
through (memory is bounded by ``--workers`` chunks, not by the corpus); ``--workers N`` tokenises
chunks in N processes, in order, so the output does not depend on N.

:func:`cached_corpus` is how training reads ``data.corpus``: the corpus is preprocessed once into
``data.cache_dir`` (default ``$MMTRAIN_CACHE`` or ``~/.cache/mmtrain``) under a key of the
corpus files (paths, sizes, mtimes), ``corpus_max_bytes`` and the tokenizer, and memory-mapped
from then on; no later start tokenises anything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Iterator

import numpy as np

from mmtrain.config import ConfigError, DataConfig
from mmtrain.data.corpus import corpus_files, iter_corpus
from mmtrain.data.indexed import IndexedWriter, optimal_dtype, strip_suffix
from mmtrain.data.tokenizer import build_tokenizer

CHUNK_DOCS = 256

_worker_tok = None


def _init_worker(spec: str, single_thread: bool = False) -> None:
    global _worker_tok
    if single_thread:  # one worker = one core: no extra Rust threads inside the HF tokenizer
        os.environ["RAYON_NUM_THREADS"] = "1"
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = build_tokenizer(DataConfig(tokenizer=spec))


def _encode_chunk(docs: list) -> list:
    tok = _worker_tok
    return [np.append(ids, tok.eos_id) for ids in tok.encode_batch(docs)]


def _chunks(docs: Iterator[str], n: int) -> Iterator[list]:
    buf = []
    for d in docs:
        buf.append(d)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def preprocess(input_spec: str, output_prefix: str, tokenizer: str = "byte", workers: int = 1,
               max_bytes: int = 0, progress: bool = True) -> dict:
    """Write ``output_prefix.bin/.idx``; a summary dict (documents, tokens, seconds, ...)."""
    if workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {workers}")
    tok = build_tokenizer(DataConfig(tokenizer=tokenizer))
    dtype = optimal_dtype(tok.vocab_size)
    files = corpus_files(input_spec)
    total_bytes = sum(os.path.getsize(f) for f in files) if files else 0
    if max_bytes:
        total_bytes = min(total_bytes, max_bytes) if total_bytes else max_bytes
    docs = iter_corpus(input_spec, max_bytes)
    writer = IndexedWriter(output_prefix, dtype)
    t0 = time.perf_counter()
    n_docs = 0
    bar = _Bar(total_bytes, enabled=progress)
    pool = None
    try:
        if workers == 1:
            _init_worker(tokenizer)
            encoded = (( _encode_chunk(c), c) for c in _chunks(docs, CHUNK_DOCS))
        else:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer, True))
            chunks = _chunks(docs, CHUNK_DOCS)
            src = []

            def feed():
                for c in chunks:
                    src.append(sum(len(d.encode("utf-8")) for d in c))
                    yield c

            encoded = ((ids, src.pop(0)) for ids in pool.imap(_encode_chunk, feed(), chunksize=1))
        for ids_list, raw in encoded:
            for ids in ids_list:
                writer.add_document(ids)
            n_docs += len(ids_list)
            nbytes = raw if isinstance(raw, int) else sum(len(d.encode("utf-8")) for d in raw)
            bar.advance(nbytes, n_docs, writer.num_tokens)
        if n_docs == 0:
            raise ConfigError(f"preprocess: '{input_spec}' contains no text; give non-empty "
                              f"documents (a text file, a folder of .txt/.md/.py, or a .jsonl "
                              f"with \"text\")")
        prefix = writer.finalize()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    dt = time.perf_counter() - t0
    return {"prefix": prefix, "documents": n_docs, "tokens": writer.num_tokens,
            "dtype": np.dtype(dtype).name, "tokenizer": tok.name, "seconds": dt,
            "workers": workers, "tokens_per_s": writer.num_tokens / max(dt, 1e-9)}


class _Bar:
    """A rich progress bar on stderr (bytes of text read; documents and tokens written)."""

    def __init__(self, total: int, enabled: bool):
        self.p = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.p = Progress(TextColumn("preprocess"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                          TextColumn("{task.fields[docs]} docs, {task.fields[toks]} tokens"),
                          TimeElapsedColumn(), TimeRemainingColumn(),
                          console=Console(file=sys.stderr))
        self.p.start()
        self.task = self.p.add_task("preprocess", total=total or None, docs=0, toks=0)

    def advance(self, nbytes: int, docs: int, toks: int) -> None:
        if self.p is not None:
            self.p.update(self.task, advance=nbytes, docs=docs, toks=toks)

    def close(self) -> None:
        if self.p is not None:
            t = self.p.tasks[0]
            if t.total:
                self.p.update(self.task, completed=t.total)
            self.p.stop()


# ---------------------------------------------------------------------------------- the cache
def cache_root(cfg: DataConfig) -> str:
    root = cfg.cache_dir or os.environ.get("MMTRAIN_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mmtrain")
    return os.path.abspath(os.path.expanduser(root))


def corpus_key(cfg: DataConfig, tokenizer) -> str:
    h = hashlib.sha256()
    files = corpus_files(cfg.corpus)
    if not files:
        raise ConfigError(f"data.corpus: '{cfg.corpus}' not found; use 'stdlib', a text file, a "
                          f"folder of .txt/.md/.py files or a .jsonl with a \"text\" field")
    meta = {"corpus": cfg.corpus, "max_bytes": cfg.corpus_max_bytes, "tokenizer": tokenizer.name,
            "vocab": tokenizer.vocab_size, "eos": tokenizer.eos_id, "python": sys.version,
            "format": 1}
    for f in tokenizer.files():
        st = os.stat(f)
        meta[f] = [st.st_size, st.st_mtime_ns]
    h.update(json.dumps(meta, sort_keys=True).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cached_corpus(cfg: DataConfig, tokenizer, announce: bool = False) -> str:
    """The prefix of ``cfg.corpus`` preprocessed into the cache (written on first use).

    Several ranks may race to write it: each writes its own temporary files and renames them
    into place, so the result is complete and identical whoever wins."""
    name = "stdlib" if cfg.corpus == "stdlib" else os.path.basename(strip_suffix(
        os.path.normpath(os.path.expanduser(cfg.corpus)))) or "corpus"
    prefix = os.path.join(cache_root(cfg), "corpus", f"{name}-{corpus_key(cfg, tokenizer)}")
    if os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin"):
        return prefix
    if announce:
        print(f"data: preprocessing data.corpus={cfg.corpus} once into {prefix}.bin/.idx",
              flush=True)
    try:
        preprocess(cfg.corpus, prefix, cfg.tokenizer, workers=1, max_bytes=cfg.corpus_max_bytes,
                   progress=False)
    except ConfigError as e:
        if "contains no text" in str(e):
            raise ConfigError(f"data.corpus: '{cfg.corpus}' contains no text; add non-empty "
                              f"documents (.txt/.md/.py files in a folder, or \"text\" lines in a "
                              f".jsonl) or use 'stdlib'") from None
        raise
    return prefix


# ---------------------------------------------------------------------------------------- CLI
def main(args: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mmtrain preprocess",
                                 description="text / folder / .jsonl -> Megatron .bin/.idx")
    ap.add_argument("input", help="'stdlib', a text file, a folder of .txt/.md/.py, or a .jsonl")
    ap.add_argument("output_prefix", help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    ap.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json (or its folder)")
    ap.add_argument("--workers", type=int, default=1, help="tokenising processes")
    ap.add_argument("--max-bytes", type=int, default=0, help="cap on the text read (0 = all)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ns = ap.parse_args(args)
    out = preprocess(ns.input, ns.output_prefix, ns.tokenizer, ns.workers, ns.max_bytes,
                     progress=not ns.quiet)
    print(f"wrote {out['prefix']}.bin/.idx: {out['documents']} documents, {out['tokens']} tokens "
          f"({out['dtype']}, {out['tokenizer']}) in {out['seconds']:.1f}s "
          f"({out['tokens_per_s'] / out['workers']:,.0f} tokens/s per worker)")
    return 0
