"""Weight initialisation that does not depend on the layout, and the geometry of local pieces.

Legend: a parameter's *full* (logical) tensor is what one process holds; viewed as [R, C] (C the
last dim, R the product of the others; a 1-D tensor is [1, C]). A *piece* is a rectangle of the
full tensor that a rank holds somewhere in its local tensor (``Piece``: local offsets, global
offsets, sizes). One process holds one piece per parameter, the whole tensor.

**Counter-based init.** Element (r, c) of a full tensor is ``std(r) · z`` where z is standard
normal noise that depends only on (seed, parameter name, r, c): the rows are cut into fixed blocks
of ``rows_per_block = max(1, BLOCK // C)`` rows, and block b is ``torch.randn`` of its rows × C
drawn on the CPU from a generator seeded by ``blake2b(seed, name, b)``. A rank initialises a piece
by drawing only the blocks its rows fall in, one at a time (at most BLOCK elements of temporary
memory, never the full tensor); a piece that holds some columns of every row draws every block of
the tensor (compute, not memory). So one process and every layout (TP, EP/ETP, DP, ZeRO-1, CP)
get bitwise the same weights, and a model whose full tensors do not fit anywhere is initialised
shard by shard (:mod:`mmtrain.train.distributed` builds it on the meta device first).

**Distributions** (SPEC §5; β = ``deepnorm_beta`` under DeepNorm, else 1; Xavier normal std
``gain·sqrt(2/(fan_in + fan_out))`` over the last two dims): embedding N(0, embedding_init_std);
LM head, router, q/k projections, the lightning qkv and gate projections Xavier; DeepNet's β on
the value projections (``v_proj``, the v rows of every head of ``qkv_proj``), the output
projections (``o_proj``, ``out_proj``) and the experts (``w13`` as two [F, D] matrices per expert,
``w2`` [D, F]); every norm weight ones. Non-learned buffers (lightning slopes) are computed,
not drawn (``reset_buffers``).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from mmtrain.config import ModelConfig

__all__ = ["BLOCK", "Piece", "whole", "flat_boxes", "to_global", "init_weights", "init_tensor",
           "init_std"]

#: Noise block size in elements (per block: ``max(1, BLOCK // C)`` full rows).
BLOCK = 1 << 18


class Piece(NamedTuple):
    """Rectangle ``sizes`` at ``local`` in the local tensor = at ``glob`` in the full tensor."""

    local: tuple
    glob: tuple
    sizes: tuple


def whole(shape) -> list:
    """The one piece of a tensor held in full."""
    shape = tuple(shape)
    return [Piece((0,) * len(shape), (0,) * len(shape), shape)]


# ------------------------------------------------------------------------------------ geometry
def flat_boxes(shape: tuple, start: int, stop: int) -> list:
    """The flat (row-major) element range [start, stop) of a tensor of ``shape`` as rectangles
    ``(offsets, sizes)``, in order; each is itself a contiguous run of the range (a partial
    slab, whole slabs, a partial slab, recursively)."""
    shape = tuple(shape)
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,))]
    inner = math.prod(shape[1:])
    i0, r0 = divmod(start, inner)
    i1, r1 = divmod(stop, inner)
    if i0 == i1:
        return [((i0,) + o, (1,) + s) for o, s in flat_boxes(shape[1:], r0, r1)]
    out = []
    if r0:
        out += [((i0,) + o, (1,) + s) for o, s in flat_boxes(shape[1:], r0, inner)]
        i0 += 1
    if i1 > i0:
        out.append(((i0,) + (0,) * (len(shape) - 1), (i1 - i0,) + shape[1:]))
    if r1:
        out += [((i1,) + o, (1,) + s) for o, s in flat_boxes(shape[1:], 0, r1)]
    return out


def to_global(pieces: list, offsets: tuple, sizes: tuple) -> list:
    """A rectangle of the local tensor as ``(local offsets, global offsets, sizes)`` rectangles of
    the full tensor (its intersections with the pieces)."""
    out = []
    for p in pieces:
        lo = [max(a, b) for a, b in zip(offsets, p.local)]
        hi = [min(a + s, b + t) for a, s, b, t in zip(offsets, sizes, p.local, p.sizes)]
        if all(h > l for l, h in zip(lo, hi)):
            g = tuple(gg + l - pl for gg, l, pl in zip(p.glob, lo, p.local))
            out.append((tuple(lo), g, tuple(h - l for l, h in zip(lo, hi))))
    return out


def region(t: torch.Tensor, offsets: tuple, sizes: tuple) -> torch.Tensor:
    """The view of ``t`` at ``offsets`` of ``sizes``."""
    for d, (o, s) in enumerate(zip(offsets, sizes)):
        t = t.narrow(d, o, s)
    return t


# ------------------------------------------------------------------------------- distributions
def _xavier(shape, gain: float = 1.0) -> float:
    fan_out, fan_in = shape[-2], shape[-1]
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def init_std(cfg: ModelConfig, name: str, shape: tuple):
    """How parameter ``name`` (full ``shape``) is initialised: ``"ones"``, or a function of the
    full row indices [n] (of the [R, C] view) giving their std [n] (fp32)."""
    beta = cfg.deepnorm_beta if cfg.norm_scheme == "deepnorm" else 1.0
    leaf = name.rsplit(".", 2)
    kind = leaf[-2] if len(leaf) >= 2 else name

    def const(std):
        return lambda rows: torch.full(rows.shape, std, dtype=torch.float32)

    if name.endswith("norm.weight"):
        return "ones"
    if name == "embed.weight":
        return const(cfg.embedding_init_std)
    if name.endswith("moe.experts.w13"):  # per expert two [F, D] matrices, β
        return const(_xavier((shape[1] // 2, shape[2]), beta))
    if name.endswith("moe.experts.w2"):
        return const(_xavier(shape, beta))
    if kind == "qkv_proj":  # per-head [q | k | v] rows; β on the v rows
        K = cfg.head_dim
        std = _xavier(shape)
        return lambda rows: torch.where((rows % (3 * K)) >= 2 * K, std * beta,
                                        std).to(torch.float32)
    if kind in ("v_proj", "o_proj", "out_proj"):
        return const(_xavier(shape, beta))
    if kind in ("lm_head", "router", "q_proj", "k_proj", "gate_proj"):
        return const(_xavier(shape))
    raise ValueError(f"no initialisation rule for parameter {name!r} {tuple(shape)}; add one to "
                     f"mmtrain.model.init.init_std")


def _noise_block(seed: int, name: str, b: int, rows: int, cols: int) -> torch.Tensor:
    h = hashlib.blake2b(f"{seed}:{name}:{b}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))
    return torch.randn(rows, cols, generator=g, dtype=torch.float32)


@torch.no_grad()
def init_tensor(local: torch.Tensor, name: str, full_shape: tuple, pieces: list, seed: int,
                rule) -> None:
    """Fill the pieces of ``local`` with their part of full tensor ``name`` (see the module
    docstring); ``rule`` is :func:`init_std`'s result."""
    full_shape = tuple(full_shape)
    if rule == "ones":
        for p in pieces:
            region(local, p.local, p.sizes).fill_(1.0)
        return
    shape2 = full_shape if len(full_shape) >= 2 else (1,) + full_shape
    R, C = math.prod(shape2[:-1]), shape2[-1]
    rpb = max(1, BLOCK // C)
    lead_strides = [math.prod(shape2[i + 1:-1]) for i in range(len(shape2) - 1)]
    for p in pieces:
        view = region(local, p.local, p.sizes)
        glob, sizes = p.glob, p.sizes
        if len(full_shape) < 2:
            view, glob, sizes = view.view(1, -1), (0,) + tuple(glob), (1,) + tuple(sizes)
        c0, w = glob[-1], sizes[-1]
        # one 2-D slab [sizes[-2], w] per index of the dims before the last two
        for idx in itertools.product(*(range(s) for s in sizes[:-2])):
            slab = view[idx] if idx else view
            r0 = sum((glob[d] + i) * lead_strides[d] for d, i in enumerate(idx)) \
                + glob[-2] * lead_strides[-1]
            r1 = r0 + sizes[-2]
            for b in range(r0 // rpb, (r1 - 1) // rpb + 1):
                b0 = b * rpb
                noise = _noise_block(seed, name, b, min(rpb, R - b0), C)
                a, z = max(r0, b0), min(r1, b0 + rpb)
                rows = torch.arange(a, z)
                vals = noise[a - b0:z - b0, c0:c0 + w] * rule(rows)[:, None]
                slab[a - r0:z - r0].copy_(vals)


def init_weights(model: nn.Module, cfg: ModelConfig, seed: int,
                 shards: Optional[dict] = None) -> None:
    """Initialise every parameter of ``model`` (plain or sharded, on any device) and recompute
    its buffers. ``shards``: ``{fqn: (full shape, pieces)}`` of the parameters held in part
    (missing ones are held whole)."""
    shards = shards or {}
    for name, p in model.named_parameters():
        full_shape, pieces = shards.get(name, (tuple(p.shape), whole(p.shape)))
        if p.device.type == "cpu":
            init_tensor(p.data, name, full_shape, pieces, seed, init_std(cfg, name, full_shape))
        else:  # drawn on the CPU (the same numbers everywhere), piece by piece
            for pc in pieces:
                tmp = torch.empty(pc.sizes, dtype=p.dtype)
                init_tensor(tmp, name, full_shape, [Piece((0,) * len(pc.sizes), pc.glob,
                                                          pc.sizes)],
                            seed, init_std(cfg, name, full_shape))
                region(p.data, pc.local, pc.sizes).copy_(tmp)
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()
