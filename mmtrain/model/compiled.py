"""``train.compile``: small pure-tensor regions of the model run through ``torch.compile``.

Why only regions, and which: the expensive parts of a step are already hand-written kernels
(lightning attention and the SwiGLU activation in Triton, flash attention, grouped GEMMs), and the
model's control flow (varlen documents, MoE dispatch, collectives, checkpointing) is exactly what a
whole-model compile handles badly (graph breaks, host syncs, recompiles). What is left between
those kernels is chains of elementwise ops and row reductions that eager PyTorch runs as one
kernel launch (and one trip through memory) each; inductor fuses each chain into few kernels,
forward and backward. The regions (each wraps a function of the model file named):

``residual_norm``  (layers.py) DeepNorm's ``N(α·x + f(x))`` (pre-norm: ``h + f(x)`` and its
                   norm): the residual add of the attention output and the post-attention RMSNorm.
``route_choice``   (moe.py) the router's math after its GEMM, in two graphs: the choice (fp32
``route_probs``    softmax over the experts, top-k; no autograd) and the weights (the softmax
                   again, the gather of the chosen probabilities, their renormalisation). Split
                   so that a forward and its recomputation under ``train.recompute=full``
                   (which replays the choice) run the same weights graph: checkpointing needs
                   both to save the same tensors.
``rope_qk``        (layers.py) the partial-RoPE tables (fp64 angles from the position ids) and
                   their application to q and k of softmax attention.
``norm_gate``      (attention.py) lightning attention's output RMSNorm times the sigmoid gate
                   (not under TP, whose full-width norm all-reduces: that one stays eager).

Not compiled: the SwiGLU activation of the experts. On CUDA the model always runs it (forward
and backward) as the fused Triton kernel of ``kernels/swiglu.py`` (the grouped-GEMM path: bf16 and
fp32, contiguous by construction); on CPU the per-expert loop runs it in place on cache-sized
pieces whose row counts change every step and include 1, a size dynamo specialises (another
graph the first time an expert gets one row) — and the CPU is not where step time matters.

Dynamic shapes: only the token dimension (dim 0: the packed ``B·T`` tokens of a micro-batch, or
this rank's sequence shard / CP pieces) is marked dynamic, before every call
(``torch._dynamo.maybe_mark_dynamic``), so the first compile already serves every token count and
no layout recompiles; every other dimension (hidden size, heads, experts) is a constant of the
model and stays static, so inductor specialises the reductions over it (``dynamic=True`` would
make them symbolic too). No region takes ``cu_seqlens`` or anything derived from its host values:
the document layout never reaches a compiled graph. ``fullgraph=True``: a region that dynamo could
not trace in one graph fails loudly instead of silently running partly eager.

Each region is compiled once per process on its first call (lazily: with the switch off nothing is
imported or compiled) and then serves every layer of the model: the weights are graph inputs (no
guard on which layer's), ``alpha``/``eps`` the same in every layer. Guards that legitimately add a
graph once: grad mode (evaluation under ``no_grad``), the autocast state, a dtype change. With
the switch off the model runs the eager code unchanged, bit for bit.

Precision: a compiled region computes in registers what the eager code rounds after every op, so
in bf16 the results differ by bf16 rounding (in fp32 by a few ulps), and a near-tied router choice
may then flip.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

#: every region, in definition order (tests and scripts/check_compile.py report on them)
REGIONS: list["Region"] = []


class Region:
    """``fn`` compiled once per process on first call, with the token dimension (dim 0) of the
    arguments at ``token_args`` marked dynamic on every call (a ``None`` argument is skipped)."""

    def __init__(self, fn: Callable, token_args: Sequence[int]):
        self.fn, self.token_args = fn, tuple(token_args)
        self.name = fn.__name__
        self._compiled = None
        REGIONS.append(self)

    def __call__(self, *args):
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, fullgraph=True)
        mark = torch._dynamo.maybe_mark_dynamic
        for i in self.token_args:
            if args[i] is not None:
                mark(args[i], 0)
        return self._compiled(*args)

    def graphs(self) -> int:
        """Graphs dynamo holds for this region (compiles plus recompiles; 0 before its first
        call). Reads dynamo's per-code cache, a debugging API that has been stable since torch
        2.1; -1 where it is missing."""
        import torch._dynamo.eval_frame as frames

        get = getattr(frames, "_debug_get_cache_entry_list", None)
        return -1 if get is None else len(get(self.fn.__code__))


def summary() -> str:
    """One line for the log: the graphs each region holds (1 each once warm; 0: this model or
    layout does not use the region; more: a guard changed, e.g. grad mode or a dtype)."""
    return "train.compile: graphs per compiled region: " + ", ".join(
        f"{r.name} {r.graphs()}" for r in REGIONS)
