"""Streaming tensor I/O with bounded memory: safetensors (read and write), legacy ``.bin`` files,
and mmtrain's DCP checkpoints (read one tensor at a time, write from lazy producers).

Nothing here memory-maps a whole file: a safetensors tensor is read with ``seek`` + ``readinto``
into its own buffer (page cache is not RSS), and a shard is written header first, then tensor by
tensor as each is produced. Peak memory is therefore a few tensors, never a shard or a model.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

# safetensors dtype codes <-> torch dtypes
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
             "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
             "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
if hasattr(torch, "float8_e4m3fn"):
    ST_DTYPES.update({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2})
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


def _libc_trim():
    try:
        import ctypes

        fn = ctypes.CDLL("libc.so.6").malloc_trim
        fn.argtypes = [ctypes.c_size_t]
        return fn
    except Exception:  # not glibc: nothing to do
        return None


_TRIM = _libc_trim()


def release_memory() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``).

    glibc raises its mmap threshold after a large block is freed, so the next tensor-sized
    buffers come from the heap, and freed holes there stay resident: converting tensor by
    tensor would otherwise creep up to the model's size in RSS."""
    if _TRIM is not None:
        _TRIM(0)


class InteropError(ValueError):
    """A conversion cannot be done faithfully; the message names the setting and the way out."""


# ------------------------------------------------------------------------------ safetensors
@dataclass
class TensorInfo:
    shape: tuple
    dtype: torch.dtype


class SafetensorsFile:
    """Random access to one .safetensors file without mapping it: one read per tensor."""

    def __init__(self, path):
        self.path = str(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self._entries = header

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        e = self._entries[name]
        return TensorInfo(tuple(e["shape"]), ST_DTYPES[e["dtype"]])

    def read(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        begin, end = e["data_offsets"]
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self._base + begin)
            got = f.readinto(buf)
        if got != end - begin:
            raise InteropError(f"{self.path}: tensor {name} is truncated ({got} of {end - begin} bytes)")
        dtype = ST_DTYPES[e["dtype"]]
        if not buf:
            return torch.empty(tuple(e["shape"]), dtype=dtype)
        with warnings.catch_warnings():  # bytearray is writable; torch warns only for read-only
            warnings.simplefilter("ignore")
            t = torch.frombuffer(buf, dtype=dtype)
        return t.view(tuple(e["shape"]))


class BinFile:
    """A legacy PyTorch ``.bin`` state dict, loaded safely (``weights_only``) and lazily (mmap)."""

    def __init__(self, path):
        self.path = str(path)
        try:
            self._sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # old non-zip format cannot be mapped
            self._sd = torch.load(self.path, map_location="cpu", weights_only=True)

    def keys(self):
        return list(self._sd)

    def info(self, name):
        t = self._sd[name]
        return TensorInfo(tuple(t.shape), t.dtype)

    def read(self, name):
        return self._sd[name].clone()


class WeightSource:
    """All weight files of a HF directory (sharded with an index, or single), by tensor name."""

    def __init__(self, hf_dir):
        d = Path(hf_dir)
        files: list[Path] = []
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (d / index).is_file():
                with open(d / index) as f:
                    files = sorted({d / v for v in json.load(f)["weight_map"].values()})
                break
        if not files:
            files = sorted(d.glob("*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))
        if not files:
            raise InteropError(f"{d}: no *.safetensors or pytorch_model*.bin weight files found")
        self.files = files
        self._where: dict[str, object] = {}
        self._open: dict[Path, object] = {}
        for p in files:
            fh = SafetensorsFile(p) if p.suffix == ".safetensors" else BinFile(p)
            self._open[p] = fh
            for k in fh.keys():
                self._where[k] = fh

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name):
        return name in self._where

    def info(self, name) -> TensorInfo:
        return self._where[name].info(name)

    def read(self, name) -> torch.Tensor:
        if name not in self._where:
            raise InteropError(f"weight '{name}' is missing from the checkpoint files {self.files}")
        return self._where[name].read(name)

    def nbytes(self) -> int:
        total = 0
        for k in self._where:
            i = self.info(k)
            n = 1
            for s in i.shape:
                n *= s
            total += n * torch.empty((), dtype=i.dtype).element_size()
        return total


@dataclass
class OutTensor:
    """One tensor of an output file: name, shape, dtype, and how to produce it when its turn comes."""

    name: str
    shape: tuple
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def parse_size(text) -> int:
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace("IB", "B")
    for unit, mul in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mul)
    return int(float(s))


def plan_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s]


def write_safetensors_stream(path, tensors: list[OutTensor], metadata: dict | None = None) -> int:
    """Write one safetensors file: header from the plan, then each tensor as it is produced."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    off = 0
    for t in tensors:
        header[t.name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape),
                          "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = str(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            x = t.produce()
            if tuple(x.shape) != tuple(t.shape):
                raise InteropError(f"{t.name}: produced shape {tuple(x.shape)}, planned {t.shape}")
            x = x.detach().to("cpu", t.dtype).contiguous()
            if x.numel():
                f.write(memoryview(x.view(torch.uint8).reshape(-1).numpy()))
            del x
            release_memory()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return off


# ---------------------------------------------------------------------------------- DCP
class DCPSource:
    """mmtrain's DCP checkpoint, read tensor by tensor (only what is asked for is loaded)."""

    def __init__(self, path, prefix: str = "model."):
        from mmtrain.train.checkpoint import SafeReader

        self.path = str(path)
        self.prefix = prefix
        md = SafeReader(self.path).read_metadata()
        self._md = {k[len(prefix):]: v for k, v in md.state_dict_metadata.items()
                    if k.startswith(prefix) and hasattr(v, "size")}

    def keys(self) -> list[str]:
        return list(self._md)

    def info(self, name) -> TensorInfo:
        m = self._md[name]
        return TensorInfo(tuple(m.size), m.properties.dtype)

    def read_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        from mmtrain.train.checkpoint import SafeReader
        import torch.distributed.checkpoint as dcp

        out = {}
        for n in names:
            if n not in self._md:
                raise InteropError(f"{self.path}: the checkpoint has no tensor 'model.{n}'")
            i = self.info(n)
            out[n] = torch.empty(i.shape, dtype=i.dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed.*")
            dcp.load({self.prefix + k: v for k, v in out.items()},
                     storage_reader=SafeReader(self.path), no_dist=True)
        return out

    def read(self, name) -> torch.Tensor:
        return self.read_many([name])[name]


def write_dcp_lazy(path, tensors: list[OutTensor], prefix: str = "model.") -> None:
    """Write a DCP checkpoint whose tensors are produced one at a time during the write.

    DCP's writer keeps a reference to every tensor it has written until the file is closed
    (``tensor_dict`` in ``_write_files_from_queue``), which would hold the whole model. So the
    planner hands out tensors it owns and frees the previous one's storage when asked for the
    next: with the serial loader (forced by ``per_thread_copy_ahead=0``) the previous tensor has
    been written by then."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    producers = {prefix + t.name: t for t in tensors}

    class _LazyPlanner(DefaultSavePlanner):
        prev: torch.Tensor | None = None

        def resolve_data(self, write_item):
            fqn = write_item.index.fqn
            if fqn not in producers:
                return super().resolve_data(write_item)
            if self.prev is not None:
                self.prev.untyped_storage().resize_(0)
                self.prev = None
                release_memory()
            t = producers[fqn]
            x = t.produce().detach()
            if tuple(x.shape) != tuple(t.shape):
                raise InteropError(f"{t.name}: produced shape {tuple(x.shape)}, planned {t.shape}")
            owned = torch.empty(t.shape, dtype=t.dtype)
            owned.copy_(x)
            del x
            self.prev = owned
            return owned

    state = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in producers.items()}
    writer = FileSystemWriter(str(path), thread_count=1, per_thread_copy_ahead=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed.*")
        dcp.save(state, storage_writer=writer, planner=_LazyPlanner(), no_dist=True)


# ------------------------------------------------------------------------------ progress
class Progress:
    """A rich bar on a terminal, else one plain line per unit (shard or tensor group)."""

    def __init__(self, label: str, total: int, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.label = label
        self.total = total
        self.done = 0
        self._bar = None
        if enabled and self.stream.isatty():
            try:
                from rich.progress import (BarColumn, DownloadColumn, Progress as RP,
                                           TimeRemainingColumn, TextColumn)

                self._bar = RP(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                               TimeRemainingColumn(), transient=False)
                self._bar.start()
                self._task = self._bar.add_task(label, total=total)
            except Exception:
                self._bar = None

    def tick(self, nbytes: int) -> None:
        """Progress within a unit (moves the bar; silent in plain mode)."""
        self.done += nbytes
        if self.enabled and self._bar is not None:
            self._bar.update(self._task, advance=nbytes)

    def unit_done(self, what: str) -> None:
        """A unit (shard, tensor group) finished: the bar's label, or one plain line."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self.label}: {what}")
        else:
            pct = 100.0 * self.done / max(self.total, 1)
            print(f"{self.label}: {what} ({self.done / 2**20:.1f} / {self.total / 2**20:.1f} MiB, "
                  f"{pct:.0f}%)", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
