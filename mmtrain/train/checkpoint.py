"""Checkpoints: torch.distributed.checkpoint (DCP) for tensors, JSON for everything else.

Layout of ``<run dir>/checkpoints/``::

    step_00000100/            complete checkpoints only (renamed into place at the very end)
      .metadata, *.distcp     DCP: "model.<fqn>" and "optim.<fqn>.{exp_avg,exp_avg_sq,step}",
                              full logical shapes; ``__<rank>_*.distcp`` holds that rank's chunks
      rank_00000.json         per-rank state: data loader, RNG states
      meta.json               step, world size, config, and "files": the name and size of every
                              other file (written last, before the rename)
    .tmp_step_00000200/       a write in progress (or killed): ignored and cleaned up
    .old_step_00000050/       being deleted (pruned, or replaced by a re-save): ignored

The write goes to ``.tmp_step_*`` and is renamed into place only once every rank has finished, so
a crash (even ``kill -9``) at any point leaves the previous checkpoint as the newest complete one.
Deletion is the reverse: a checkpoint is first renamed to ``.old_step_*`` and only then removed,
so a kill during a deletion never leaves a ``step_*`` directory with files missing. A ``step_*``
directory that has lost files anyway (deleted by hand, a full disk) is found by
:func:`check_resumable` from ``meta.json``'s file list, and the run refuses to start with one line
naming the directory and the fix instead of resuming from something else.

Loading never unpickles arbitrary objects: tensors load with ``weights_only=True`` (DCP) and
DCP's metadata file is read by an unpickler that admits only DCP's own metadata classes, torch
dtypes/sizes and paths. Optimizer hyper-parameters are not stored (they follow from the config
and the step); only its per-parameter tensors are, keyed by parameter name, so a checkpoint can be
loaded under another layout.

**Sharded tensors.** A multi-process run saves and loads through :class:`ShardedPieces`: each
rank declares the rectangles (global offsets, sizes) of a logical tensor that it writes or wants
to read, and DCP records them as chunks of the full shape. On save the ranks' rectangles partition
every tensor (``mmtrain.train.distributed`` decides who writes what), so each rank writes only its
share and nothing is gathered; on load each rank reads the rectangles it needs, from whatever
chunks were written (by one process or any layout).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                   TensorProperties)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from mmtrain.train import faults

STEP_RE = re.compile(r"^step_(\d{8})$")


# ------------------------------------------------------------------------------------- safety
class _SafeUnpickler(pickle.Unpickler):
    _ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",
                        "torch.distributed.checkpoint.filesystem",
                        "torch.distributed.checkpoint.planner")
    _ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                ("builtins", "slice")}

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in self._ALLOWED or (module in self._ALLOWED_MODULES
                                               and not name.startswith("__")):
            obj = super().find_class(module, name)
            if module in self._ALLOWED_MODULES and not isinstance(obj, type):
                if not (name.startswith("_") and isinstance(obj, (dict, tuple))):
                    raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}")
            return obj
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, "
                                     f"which a checkpoint never needs; refusing to load it")


class SafeReader(FileSystemReader):
    """DCP reader whose metadata load admits only DCP's own classes."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = Path(self.path) / ".metadata"
        with open(path, "rb") as f:
            metadata = _SafeUnpickler(f).load()
        # DCP loads a "bytes" entry with torch.load(weights_only=False), i.e. by unpickling it;
        # mmtrain writes tensors only, so a checkpoint that declares bytes is refused outright.
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        entries = getattr(metadata, "state_dict_metadata", {})
        odd = [k for k, v in entries.items() if isinstance(v, BytesStorageMetadata)]
        if odd:
            raise pickle.UnpicklingError(f"checkpoint {self.path} declares non-tensor entries "
                                         f"{odd[:3]}; mmtrain checkpoints hold tensors only, "
                                         f"refusing to load them")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# --------------------------------------------------------------------------- sharded tensors
class ShardedPieces(torch.Tensor):
    """A logical tensor of ``size`` of which this rank holds ``chunks``: ``[(global offsets,
    local tensor)]``, rectangles that may be views (loads copy into them in place). A storage-less
    wrapper that only DCP's planner looks at (through its ``__create_write_items__``,
    ``__create_chunk_list__`` and ``__get_tensor_shard__`` hooks); any other use raises."""

    @staticmethod
    def __new__(cls, size, dtype, chunks):
        r = torch.Tensor._make_wrapper_subclass(cls, torch.Size(size), dtype=dtype, device="cpu")
        r.chunks = [(torch.Size(o), t) for o, t in chunks]
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"ShardedPieces is a checkpoint descriptor; {func} is not defined")

    def __create_write_items__(self, fqn: str, obj) -> list:
        return [WriteItem(index=MetadataIndex(fqn, o), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=o, sizes=t.shape),
                              properties=TensorProperties.create_from_tensor(t),
                              size=self.shape))
                for o, t in self.chunks]

    def __create_chunk_list__(self) -> list:
        return [ChunkStorageMetadata(offsets=o, sizes=t.shape) for o, t in self.chunks]

    def __get_tensor_shard__(self, index) -> torch.Tensor:
        for o, t in self.chunks:
            if o == index.offset:
                return t
        raise ValueError(f"{index.fqn}: no chunk at {tuple(index.offset)}")

    def nbytes_held(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.chunks)


# ----------------------------------------------------------------------------- state dicts
def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      materialize: bool = False) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter tensors keyed ``<fqn>.<key>``.

    With ``materialize`` a missing state (no step taken yet) is created as zeros so that it can be
    loaded into in place."""
    out = {}
    fused = any(g.get("fused") for g in optimizer.param_groups)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        state = optimizer.state.get(p)
        if not state:
            if not materialize:
                continue
            step_dev = p.device if fused else torch.device("cpu")
            state = optimizer.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=step_dev),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
        for key, value in state.items():
            if torch.is_tensor(value):
                out[f"{name}.{key}"] = value
    return out


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def encode_rng() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def decode_rng(state: dict) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        raw = base64.b64decode(state["cuda"])
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


# ------------------------------------------------------------------------------------- save
def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir, step: int, model, optimizer, rank_state: dict[str, Any],
         meta: dict[str, Any], keep_last: int, tensors: dict | None = None) -> Path:
    """Write a complete checkpoint of ``step`` (collective: every rank calls it).

    ``tensors``: the DCP state to write instead of ``model``'s and ``optimizer``'s (a sharded
    layout passes its :class:`ShardedPieces` under the same keys, see
    ``mmtrain.train.distributed``)."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    faults.point("ckpt_start", step)
    if tensors is not None:
        state = dict(tensors)
    else:
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        state.update({f"optim.{k}": v for k, v in optimizer_tensors(model, optimizer).items()})
    with warnings.catch_warnings():  # single-process runs: DCP warns that it has no group
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state, checkpoint_id=str(tmp))
    faults.point("ckpt_write", step)
    text = json.dumps(rank_state)
    with open(tmp / f"rank_{_rank():05d}.json", "w") as f:
        f.write(text[:len(text) // 2])
        f.flush()
        faults.point("data_state", step)
        f.write(text[len(text) // 2:])
        f.flush()
        os.fsync(f.fileno())
    _barrier()
    if _rank() == 0:
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        with open(tmp / "meta.json", "w") as f:
            json.dump({"step": step, "world_size": _world(), **meta, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        faults.point("commit", step)
        if final.exists():  # a re-save of the same step (e.g. after a resume): replace it
            _discard(final)
        os.rename(tmp, final)
        faults.point("rename", step)
        _fsync_dir(root)
        prune(root, keep_last, step)
    _barrier()
    return final


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _discard(path: Path, step: int | None = None) -> None:
    """Delete a checkpoint directory: rename it out of the ``step_*`` namespace first (atomic),
    then remove it, so a kill in between leaves nothing that looks like a checkpoint."""
    trash = path.with_name(".old_" + path.name)
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    _fsync_dir(path.parent)
    if step is not None:
        faults.point("prune", step)  # test-only hook: killed between the rename and the removal
    shutil.rmtree(trash, ignore_errors=True)


def complete_checkpoints(run_dir) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and STEP_RE.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def latest(run_dir) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def prune(root: Path, keep_last: int, step: int | None = None) -> None:
    found = complete_checkpoints(root.parent)
    for i, old in enumerate(found[:-keep_last]):
        _discard(old, step if i == 0 else None)
    for stale in list(root.glob(".tmp_step_*")) + list(root.glob(".old_step_*")):
        shutil.rmtree(stale, ignore_errors=True)


def step_dirs(run_dir) -> list[Path]:
    """Every ``step_*`` directory, complete or not, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def missing_files(path) -> list[str]:
    """What a ``step_*`` directory lacks (by ``meta.json``'s file list): names, with
    "(size ...)" when present with the wrong size; [] when complete."""
    path = Path(path)
    try:
        meta = read_meta(path)
    except FileNotFoundError:
        return ["meta.json"]
    except (OSError, ValueError):
        return ["meta.json (unreadable)"]
    out = []
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            out.append(name)
        elif f.stat().st_size != size:
            out.append(f"{name} (size {f.stat().st_size}, expected {size})")
    return out


def check_resumable(run_dir) -> Path | None:
    """The checkpoint to resume from (None: start afresh), after checking that the newest
    ``step_*`` directory is complete; a damaged one raises a one-line ConfigError naming it and
    the fix (nothing is written or deleted)."""
    from mmtrain.config import ConfigError

    dirs = step_dirs(run_dir)
    if not dirs:
        return None
    newest = dirs[-1]
    lost = missing_files(newest)
    if lost:
        good = [d for d in dirs[:-1] if not missing_files(d)]
        then = (f"resume from {good[-1].name}" if good else "start afresh")
        raise ConfigError(f"run.dir: checkpoint {newest} is incomplete (missing "
                          f"{', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''}); restore "
                          f"those files, or delete {newest} to {then}")
    return newest


# ------------------------------------------------------------------------------------- load
def read_meta(path) -> dict:
    with open(Path(path) / "meta.json") as f:
        return json.load(f)


def dcp_load(state: dict, path, **kwargs) -> None:
    """``dcp.load`` through :class:`SafeReader`, also from checkpoints written before the
    experts' gate and up weights were fused: a requested ``…moe.experts.w13…`` entry that the
    checkpoint lacks is read from its ``w1`` and ``w3`` halves (model and optimizer moments;
    the step counter from ``w1``)."""
    reader = SafeReader(str(path))
    have = reader.read_metadata().state_dict_metadata
    request, legacy = {}, []
    for key, t in state.items():
        if ".moe.experts.w13" in key and key not in have:
            k1, k3 = key.replace(".w13", ".w1"), key.replace(".w13", ".w3")
            if k1 in have and (key.endswith(".step") or k3 in have):
                if key.endswith(".step"):
                    request[k1] = t
                    continue
                if isinstance(t, ShardedPieces):  # each chunk's W1 rows from w1, W3 rows from w3
                    E, F2, D = t.shape
                    F = F2 // 2
                    c1, c3 = [], []
                    for o, c in t.chunks:
                        n1 = max(0, min(F - o[1], c.shape[1]))
                        if n1:
                            c1.append(((o[0], o[1], o[2]), c[:, :n1]))
                        if c.shape[1] > n1:
                            c3.append(((o[0], o[1] + n1 - F, o[2]), c[:, n1:]))
                    request[k1] = ShardedPieces((E, F, D), t.dtype, c1)
                    request[k3] = ShardedPieces((E, F, D), t.dtype, c3)
                    continue
                half = t.shape[1] // 2
                request[k1] = torch.empty_like(t[:, :half])
                request[k3] = torch.empty_like(t[:, half:])
                legacy.append((t, request[k1], request[k3]))
                continue
        request[key] = t
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed.*")
        dcp.load(request, storage_reader=SafeReader(str(path)), **kwargs)
    with torch.no_grad():
        for t, w1, w3 in legacy:
            half = w1.shape[1]
            t[:, :half].copy_(w1)
            t[:, half:].copy_(w3)


def load(path, model, optimizer=None, tensors: dict | None = None) -> dict:
    """Load model (and optimizer) tensors in place; return this rank's JSON state (rank 0's if
    the checkpoint was written by fewer ranks).

    ``tensors``: load into these instead of ``model``'s and ``optimizer``'s (a sharded layout
    passes :class:`ShardedPieces` whose chunks are views of its local tensors, see
    ``mmtrain.train.distributed``)."""
    path = Path(path)
    if tensors is not None:
        state = tensors
    else:
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
    if optimizer is not None and tensors is None:
        state.update({f"optim.{k}": v for k, v in
                      optimizer_tensors(model, optimizer, materialize=True).items()})
    dcp_load(state, path)
    rank_file = path / f"rank_{_rank():05d}.json"
    if rank_file.is_file():
        with open(rank_file) as f:
            return json.load(f)
    with open(path / "rank_00000.json") as f:
        return json.load(f)
