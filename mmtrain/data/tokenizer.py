"""Tokenizers: the built-in byte tokenizer and local HF ``tokenizer.json`` files.

Legend: L characters of one text, n tokens of one text (``[n]`` int32 arrays).

Both kinds share one small interface, which is all the rest of mmtrain relies on:

    .name          str          "byte", or "hf:<path of tokenizer.json>"
    .vocab_size    int          number of ids the model's embedding must cover
    .eos_id        int          appended after every document by packing (never by ``encode``)
    .pad_id        int          filler id (the byte tokenizer has its own; HF falls back to EOS)
    .encode(text)  list[int]    ids of ``text``, no EOS, no BOS
    .encode_batch(texts) list[np.ndarray]   the same for many texts, fast ([n] int32 each)
    .decode(ids)   str
    .files()       list[str]    files to copy next to a checkpoint (empty for "byte")

``build_tokenizer(cfg)`` picks one from ``DataConfig.tokenizer``. The ``tokenizers`` library is an
optional dependency, imported only when a tokenizer.json is asked for.
"""

from __future__ import annotations

import os
from typing import Iterable, Protocol, Sequence

import numpy as np

from mmtrain.config import ConfigError, DataConfig

# Special tokens tried, in order, as the end-of-document id of a tokenizer.json.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>",
                  "[SEP]", "<|end|>")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")
# Added when a tokenizer.json has none of the EOS candidates (grows the vocabulary by one).
ADDED_EOS = "<|endoftext|>"


class Tokenizer(Protocol):
    """The interface every tokenizer offers (see the module docstring)."""

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def files(self) -> list[str]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then EOS = 256 and PAD = 257 (``vocab_size`` 258)."""

    name = "byte"
    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # bytes -> uint8 view -> int32: no Python loop over characters.
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # Special ids (EOS, PAD) have no bytes; invalid UTF-8 (a cut multi-byte char) becomes U+FFFD.
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        arr = arr[(arr >= 0) & (arr < 256)]
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def files(self) -> list[str]:
        return []

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=258, eos_id=256, pad_id=257)"


class HFTokenizer:
    """A local HF ``tokenizer.json`` (``tokenizers`` library), encoded without special tokens.

    EOS is the first of :data:`EOS_CANDIDATES` the file knows; failing that, a special token of the
    file whose text mentions "eos"/"end"; failing that, :data:`ADDED_EOS` is added as a special
    token (deterministically, so reloading the same file gives the same ids). PAD is the first of
    :data:`PAD_CANDIDATES` the file knows, else EOS.
    """

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ConfigError(f"data.tokenizer: '{path}' needs the 'tokenizers' package "
                              f"(pip install tokenizers), or use 'byte'") from e
        self.path = os.path.abspath(path)
        self.name = f"hf:{self.path}"
        try:
            self._tok = Tokenizer.from_file(self.path)
        except Exception as e:
            raise ConfigError(f"data.tokenizer: '{path}' is not a valid tokenizer.json ({e}); "
                              f"give the path of a tokenizer.json or use 'byte'") from e
        self.eos_id = self._find_eos()
        pad = self._first_known(PAD_CANDIDATES)
        self.pad_id = self.eos_id if pad is None else pad
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def _first_known(self, names: Sequence[str]):
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return int(i)
        return None

    def _find_eos(self) -> int:
        found = self._first_known(EOS_CANDIDATES)
        if found is not None:
            return found
        decoder = self._tok.get_added_tokens_decoder()  # {id: AddedToken}
        for i in sorted(decoder):
            tok = decoder[i]
            if getattr(tok, "special", False) and any(k in tok.content.lower() for k in ("eos", "end")):
                return int(i)
        self._tok.add_special_tokens([ADDED_EOS])
        return int(self._tok.token_to_id(ADDED_EOS))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # The library encodes a batch in parallel (Rust threads).
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def files(self) -> list[str]:
        """The tokenizer.json, plus the HF side files next to it when they exist."""
        out = [self.path]
        folder = os.path.dirname(self.path)
        for side in ("tokenizer_config.json", "special_tokens_map.json"):
            p = os.path.join(folder, side)
            if os.path.isfile(p):
                out.append(p)
        return out

    def __repr__(self) -> str:
        return (f"HFTokenizer(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


def build_tokenizer(cfg: DataConfig) -> "Tokenizer":
    """``"byte"`` -> :class:`ByteTokenizer`; a path (a tokenizer.json, or a folder holding one) ->
    :class:`HFTokenizer`. A missing file is a one-line :class:`ConfigError` naming ``data.tokenizer``.
    """
    spec = cfg.tokenizer
    if spec == "byte":
        return ByteTokenizer()
    path = os.path.expanduser(spec)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise ConfigError(f"data.tokenizer: file '{spec}' not found; give the path of a "
                          f"tokenizer.json or use 'byte'")
    return HFTokenizer(path)
