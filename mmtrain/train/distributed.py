"""The training-side half of a parallel layout: build the model at any size, the optimizer, and
sharded checkpoints. (``mmtrain.parallel`` holds the shard plan and the collectives and imports
nothing from ``mmtrain.train``; this module joins them to the loop.)

**Build** (:func:`build_parallel`): the model is constructed on the meta device, sharded there
(:func:`mmtrain.parallel.apply.shard_model`: module swaps only), then only this rank's shards are
allocated on the device and initialised with :func:`mmtrain.model.init.init_weights`, which draws
every element from (seed, parameter name, position in the full tensor): no rank ever holds a full
tensor, and every layout gets bitwise the single process's weights. With ``train.init_from`` (and
no checkpoint to resume) the full model is built on the CPU, imported, then sliced, as before.

**Checkpoints** (:func:`checkpoint_state`, :func:`load_checkpoint`): keys are the single-process
names ``model.<fqn>`` and ``optim.<fqn>.{exp_avg,exp_avg_sq,step}`` with full logical shapes
(DCP chunk metadata, :class:`mmtrain.train.checkpoint.ShardedPieces`). Who writes what: the
replicas of a local tensor are the ranks of its gradient bucket's group, and each of them writes
the flat range of the tensor that it owns in the bucket (the ZeRO-1 shard; the same split without
ZeRO), as up to a few row-aligned rectangles (``flat_boxes``), mapped to the full tensor through
the parameter's pieces (TP slice, the two ETP halves of ``w13``...). So the ranks' rectangles
partition every logical tensor: each rank writes about 1/world of model + optimizer state and
nothing is gathered. On load each rank reads straight into its parameters (all of its pieces) and
its optimizer state (what it owns under ZeRO-1, its whole moments otherwise), from chunks written
by any layout or by one process; a single process loads them all.

**bf16 parameters** (``train.param_dtype``): the optimizer is :class:`ZeroAdamW` in every layout
(whole buckets without ZeRO-1, also in one process), and its fp32 masters are the weights. With
:class:`ZeroAdamW` (ZeRO-1 or bf16) the ``model.<fqn>`` entries are written from the masters and
loaded into them (then written into the parameters, rounded to bf16): a checkpoint always holds
fp32 weights, whatever the parameters' dtype, so a bf16 run resumes bit-identically (the masters
are not rounded through the bf16 parameters), and bf16 and fp32 runs, and any layouts, load each
other's checkpoints. HF export (``mmtrain export-hf``) reads these entries, so it exports the
masters' fp32 values (``--dtype bf16`` rounds them like the bf16 parameters).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from mmtrain.config import Config
from mmtrain.model.init import flat_boxes, init_weights, region, to_global
from mmtrain.parallel.data import ZeroAdamW
from mmtrain.train import checkpoint as ckpt
from mmtrain.train.checkpoint import ShardedPieces

__all__ = ["build_model", "build_parallel", "build_optimizer", "checkpoint_state",
           "load_checkpoint"]


# ------------------------------------------------------------------------------------ build
def _import_weights(cfg: Config) -> bool:
    return bool(cfg.train.init_from) and ckpt.latest(cfg.run.dir) is None  # a resume wins


def build_model(cfg: Config, device: torch.device):
    """The full single-process model, initialised (or imported from ``train.init_from``)."""
    from mmtrain.model import MiniMaxModel

    model = MiniMaxModel(cfg.model)
    model.reset_parameters(seed=cfg.train.seed)
    if _import_weights(cfg):
        from mmtrain.hf import load_weights  # mmtrain checkpoint, run dir or HF directory

        for note in load_weights(cfg.train.init_from, model):
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(note, flush=True)
    return model.to(device)


def build_parallel(cfg: Config, topology, device: torch.device):
    """This rank's shards of the model, initialised with the seed (identical in every layout);
    ``(model, Parallel)``. See the module docstring."""
    from mmtrain.model import MiniMaxModel
    from mmtrain.parallel.apply import GROUPS_USED, parallelize

    groups = None
    if dist.is_initialized():
        from mmtrain.parallel.groups import create_process_groups

        groups = create_process_groups(
            topology, timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s),
            names=GROUPS_USED)
    main_grads = cfg.train.bf16_params(device.type)  # fp32 gradient buckets for bf16 params
    if _import_weights(cfg):
        model = build_model(cfg, torch.device("cpu"))
        return model, parallelize(model, topology, groups, cfg.parallel, device, main_grads)
    with torch.device("meta"):
        model = MiniMaxModel(cfg.model)
    par = parallelize(model, topology, groups, cfg.parallel, device, main_grads)
    init_weights(model, cfg.model, cfg.train.seed, par.shards)
    return model, par


def build_optimizer(par, tcfg):
    """ZeRO-1 AdamW over the owned bucket shards, AdamW on the fp32 masters of whole buckets
    (bf16 parameters without ZeRO-1), or torch AdamW (``mmtrain.train.optim``). With bf16
    parameters this is where they become bf16: after the optimizer has taken their fp32 values
    as its masters (:class:`ZeroAdamW`)."""
    if par.main_grads or (par.distributed and par.pcfg.zero1):
        dtype = torch.bfloat16 if par.main_grads else torch.float32
        return ZeroAdamW(par.sync, tcfg.lr, (tcfg.beta1, tcfg.beta2), tcfg.eps,
                         tcfg.weight_decay, param_dtype=dtype)
    from mmtrain.train.optim import build_optimizer as plain

    return plain(par.model, tcfg)


# ------------------------------------------------------------------------------ checkpoints
def _owned_chunks(par, info, lo: int, hi: int, local: torch.Tensor = None,
                  flat: torch.Tensor = None, copy: bool = True) -> list:
    """``[(global offsets, tensor)]`` of the flat range [lo, hi) of ``info``'s local tensor: the
    rectangles of ``local`` (a tensor shaped like the parameter), or of ``flat`` (the range
    itself, 1-D). ``copy``: contiguous copies (to write) rather than views (to load into)."""
    shape = tuple(info.param.shape)
    pieces = par.pieces(info.name, shape)
    out, pos = [], 0
    for off, sizes in flat_boxes(shape, lo, hi):
        n = 1
        for s in sizes:
            n *= s
        box = (region(local, off, sizes) if local is not None
               else flat[pos:pos + n].view(sizes))
        pos += n
        for loc, glob, sz in to_global(pieces, off, sizes):
            t = region(box, tuple(a - b for a, b in zip(loc, off)), sz)
            out.append((glob, t.detach().clone() if copy else t))
    return out


def _all_chunks(par, info, local: torch.Tensor) -> list:
    """Views of every piece of ``local`` (shaped like ``info``'s parameter)."""
    return [(p.glob, region(local, p.local, p.sizes))
            for p in par.pieces(info.name, tuple(info.param.shape))]


def _step_of(optimizer, info):
    if isinstance(optimizer, ZeroAdamW):
        return torch.tensor(float(optimizer.step_count))
    state = optimizer.state.get(info.param) or {}
    return state.get("step")


def _flat(optimizer, b, key: str, off: int, lo: int, hi: int) -> torch.Tensor:
    """:class:`ZeroAdamW`'s ``key`` (master or a moment) over the flat range [lo, hi) of the
    parameter at ``off`` in bucket ``b`` (a view; the range must lie in the rank's region)."""
    start = optimizer.region(b).start
    return optimizer.state_of(b)[key][off + lo - start:off + hi - start]


def checkpoint_state(par, optimizer):
    """The DCP state this rank writes (its owned rectangles, see the module docstring); ``None``
    without gradient buckets (one process with fp32 parameters: the checkpoint module saves model
    and optimizer as they are)."""
    if par.sync is None:
        return None
    out = {}
    zero = isinstance(optimizer, ZeroAdamW)
    for b, info, off, lo, hi in par.owned():
        full = info.full_shape
        if zero:  # the fp32 masters are the weights (bf16 parameters are their rounding)
            out[f"model.{info.name}"] = ShardedPieces(full, torch.float32, _owned_chunks(
                par, info, lo, hi, flat=_flat(optimizer, b, "master", off, lo, hi)))
        else:
            out[f"model.{info.name}"] = ShardedPieces(
                full, info.param.dtype, _owned_chunks(par, info, lo, hi, local=info.param))
        step = _step_of(optimizer, info)
        if step is None:  # no optimizer step yet (non-ZeRO): nothing to save
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if zero:
                chunks = _owned_chunks(par, info, lo, hi,
                                       flat=_flat(optimizer, b, key, off, lo, hi))
            else:
                chunks = _owned_chunks(par, info, lo, hi, local=optimizer.state[info.param][key])
            out[f"optim.{info.name}.{key}"] = ShardedPieces(full, torch.float32, chunks)
        out[f"optim.{info.name}.step"] = step.detach().clone()
    return out


def load_checkpoint(par, path, optimizer) -> dict:
    """Load a checkpoint written under any layout (or one process) into this rank's shards;
    returns this rank's JSON state. With :class:`ZeroAdamW` the weights go into its fp32
    masters (the range it steps: the owned shard under ZeRO-1, else the whole local tensor) and
    from there into the parameters."""
    if par.sync is None:
        return ckpt.load(path, par.model, optimizer)
    zero = isinstance(optimizer, ZeroAdamW)
    if not zero:  # torch AdamW: create its state so that it can be loaded into in place
        ckpt.optimizer_tensors(par.model, optimizer, materialize=True)
    want, steps = {}, {}
    for b, info, off, lo, hi in par.owned():
        full = info.full_shape
        if zero:
            if not optimizer.sharded:  # whole buckets: every replica steps the whole tensor
                lo, hi = 0, info.param.numel()
            for key, fqn in (("master", f"model.{info.name}"),
                             ("exp_avg", f"optim.{info.name}.exp_avg"),
                             ("exp_avg_sq", f"optim.{info.name}.exp_avg_sq")):
                want[fqn] = ShardedPieces(full, torch.float32, _owned_chunks(
                    par, info, lo, hi, copy=False, flat=_flat(optimizer, b, key, off, lo, hi)))
        else:
            want[f"model.{info.name}"] = ShardedPieces(full, info.param.dtype,
                                                       _all_chunks(par, info, info.param.data))
            for key in ("exp_avg", "exp_avg_sq"):
                want[f"optim.{info.name}.{key}"] = ShardedPieces(
                    full, torch.float32, _all_chunks(par, info, optimizer.state[info.param][key]))
        steps[info.name] = want[f"optim.{info.name}.step"] = torch.zeros((), dtype=torch.float32)
    state = ckpt.load(path, None, None, tensors=want)
    if zero:
        optimizer.gather_params()  # masters -> parameters (a collective under ZeRO-1)
        first = next(iter(steps.values()), torch.zeros(()))
        optimizer.step_count = int(first.item())
    else:
        with torch.no_grad():
            for info in par.infos:
                optimizer.state[info.param]["step"].copy_(steps[info.name])
    return state
