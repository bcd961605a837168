"""Corpora: where the raw text comes from, as a deterministic list of documents.

Legend: D documents (``list[str]``), bytes counted in UTF-8.

``DataConfig.corpus`` is one of:

* ``"stdlib"`` (the embedded default): the ``.py`` files of the running interpreter's standard
  library (``sysconfig.get_paths()["stdlib"]``), one document per file, in sorted relative-path
  order. Skipped: ``site-packages``/``dist-packages``, every ``test``/``tests`` folder, ``idlelib``,
  ``lib2to3``, ``turtledemo``, ``ensurepip``, ``__pycache__`` and any file that is not UTF-8. It needs
  no download, but its content follows the Python version.
* a **text file** (any name but ``*.jsonl``): the whole file is ONE document. Blank lines are not
  document boundaries (code and prose use them inside a document); to give several documents use a
  folder or a ``.jsonl``.
* a **folder**: every ``.txt``, ``.md`` and ``.py`` file below it (recursively), one document per
  file, in sorted relative-path order. Hidden entries and ``__pycache__`` are skipped.
* a **``.jsonl`` file**: one JSON object per line with a string ``"text"`` field; one document per
  line (blank lines skipped).

Documents whose text is empty or whitespace only are dropped. ``corpus_max_bytes`` (0 = no cap)
caps the total UTF-8 bytes: documents are taken in order and the one that crosses the cap is cut
at the cap (on a character boundary), so the result is a deterministic prefix of the corpus.
User files that are not UTF-8 (or bad JSON lines) raise :class:`ConfigError`; only the stdlib
corpus skips such files silently.
"""

from __future__ import annotations

import json
import os
import sysconfig
from typing import Iterable, Iterator

from mmtrain.config import ConfigError, DataConfig

STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib",
                              "lib2to3", "turtledemo", "ensurepip", "__pycache__"})
FOLDER_SUFFIXES = (".txt", ".md", ".py")
_KINDS = "use 'stdlib', a text file, a folder of .txt/.md/.py files or a .jsonl with a \"text\" field"


def _sorted_files(root: str, suffixes: tuple, skip_dirs: frozenset) -> list[str]:
    """Files below ``root`` ending in one of ``suffixes``, sorted by their relative POSIX path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        for f in filenames:
            if f.endswith(suffixes) and not f.startswith("."):
                full = os.path.join(dirpath, f)
                found.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    found.sort()
    return [full for _, full in found]


def stdlib_files() -> list[str]:
    """The stdlib ``.py`` files of the running interpreter, in corpus order."""
    return _sorted_files(sysconfig.get_paths()["stdlib"], (".py",), STDLIB_SKIP_DIRS)


def _read_utf8(path: str, strict: bool):
    """The text of ``path``; on bad UTF-8 None (``strict=False``) or a ConfigError."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if not strict:
            return None
        raise ConfigError(f"data.corpus: '{path}' is not UTF-8 text ({e.reason} at byte {e.start}); "
                          f"convert it to UTF-8 or remove it from the corpus") from e


def _iter_stdlib() -> Iterator[str]:
    for path in stdlib_files():
        text = _read_utf8(path, strict=False)
        if text is not None:
            yield text


def _iter_folder(root: str) -> Iterator[str]:
    for path in _sorted_files(root, FOLDER_SUFFIXES, frozenset({"__pycache__"})):
        yield _read_utf8(path, strict=True)


def _iter_jsonl(path: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f"data.corpus: '{path}' line {n} is not UTF-8 JSON ({e}); "
                                  f"write one JSON object per line") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ConfigError(f"data.corpus: '{path}' line {n} has no string \"text\" field; "
                                  f"write objects like {{\"text\": \"...\"}}")
            yield obj["text"]


def _capped(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Non-blank documents in order, cut so their total UTF-8 size is at most ``max_bytes`` (0 = all)."""
    total = 0
    for text in docs:
        if not text.strip():
            continue
        if max_bytes:
            raw = text.encode("utf-8")
            room = max_bytes - total
            if len(raw) >= room:
                cut = raw[:room].decode("utf-8", errors="ignore")  # drop a split trailing char
                if cut.strip():
                    yield cut
                return
            total += len(raw)
        yield text


def iter_corpus(spec: str, max_bytes: int = 0) -> Iterator[str]:
    """The documents of ``spec`` one at a time (streaming; see the module docstring).

    Raises :class:`ConfigError` naming ``data.corpus`` when the path is missing."""
    if spec == "stdlib":
        docs = _iter_stdlib()
    else:
        path = os.path.expanduser(spec)
        if os.path.isdir(path):
            docs = _iter_folder(path)
        elif os.path.isfile(path):
            docs = _iter_jsonl(path) if path.endswith(".jsonl") else iter([_read_utf8(path, True)])
        else:
            raise ConfigError(f"data.corpus: '{spec}' not found; {_KINDS}")
    return _capped(docs, max_bytes)


def corpus_files(spec: str) -> list[str]:
    """The files ``spec`` reads, in corpus order (what a cache key must cover)."""
    if spec == "stdlib":
        return stdlib_files()
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return _sorted_files(path, FOLDER_SUFFIXES, frozenset({"__pycache__"}))
    return [path] if os.path.isfile(path) else []


def load_corpus(cfg: DataConfig) -> list[str]:
    """The documents of ``cfg.corpus`` (see the module docstring), capped by ``cfg.corpus_max_bytes``.

    Raises :class:`ConfigError` naming ``data.corpus`` when the path is missing or holds no text.
    """
    spec = cfg.corpus
    out = list(iter_corpus(spec, cfg.corpus_max_bytes))
    if not out:
        raise ConfigError(f"data.corpus: '{spec}' contains no text; add non-empty documents "
                          f"(.txt/.md/.py files in a folder, or \"text\" lines in a .jsonl) or use "
                          f"'stdlib'")
    return out
