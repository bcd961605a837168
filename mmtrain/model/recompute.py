"""Activation recomputation (``train.recompute``): what the backward recomputes instead of keeping.

``none``       every tensor autograd saves stays until the backward.
``full``       each decoder layer runs under ``torch.utils.checkpoint`` (non-reentrant): only its
               input (the residual stream, [T, D]) and its arguments are kept; the backward runs
               the layer's forward again, then its backward.
``selective``  the parts that are cheap to run again but whose saved tensors are large; every
               GEMM output (projections, router, experts) is kept:

               * the lightning attention core: ``SiLU → decayed linear attention → output
                 RMSNorm → sigmoid gate`` (from the qkv/gate projections to the input of
                 ``out_proj``); the SiLU outputs, the kernel's saved q/k/v, the norm and gate
                 intermediates are dropped (extra work: the core's forward, linear in T);
               * the MoE combine: the unpermute of the experts' outputs and their fp32 weighting
                 (``combine_slots``), whose saved fp32 copy [T·K, D] is the largest tensor of a
                 MoE layer; the experts' output [n, D] (half precision under autocast) is kept.

               Already recomputed in every mode: the SwiGLU activation of the experts (their
               hand-written backward keeps only the gate/up GEMM output) and the logits of the
               LM head under ``train.fused_ce`` (:mod:`mmtrain.model.fused_ce`). Not covered:
               the softmax attention core (flash / ring attention keep only their output and
               log-sum-exp; recomputing them would cost a quadratic forward), the decoder norms
               (their output is saved by the GEMM that reads it anyway) and the MoE permutation
               of the tokens (its output is the experts' GEMM input).

Correctness of the recomputation:

* RNG: the model draws no random numbers in its forward (no dropout); checkpoint still restores
  the RNG state (its default).
* MoE: the router runs again, but the recomputation replays the original forward's decisions
  (chosen experts, capacity keep mask, aux weights f and divisor) from a per-call
  :class:`~mmtrain.model.moe.Tape` instead of deciding again: ``Balance.record`` (the step's
  statistics: loads, drops, probability sums) and the running counts are updated once, in the
  original forward; the capacity and aux collectives of a distributed balance are not repeated.
* Collectives inside a layer (TP region hooks, the EP all-to-all dispatcher, LASP+/ring attention
  under CP, the TP output norm) run again in the recomputation: every rank recomputes the same
  layers in the same order (the backward visits them alike), so they pair up. The TP region hooks
  are module hooks, which run again when the recomputation calls the module.
* Autocast: checkpoint recomputes under the autocast state of the original forward.

Recomputation happens only when grad mode is on (evaluation under ``torch.no_grad`` runs plainly).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from mmtrain.model.moe import Balance, Tape

MODES = ("none", "selective", "full")


class _TapeOn:
    """Installs ``tape`` on ``balance`` (recording, or replaying) while entered; re-enterable
    (a recomputation may run more than once, e.g. when a CP op's backward calls
    ``torch.autograd.grad`` inside the backward)."""

    def __init__(self, balance: Balance, tape: Tape, replay: bool):
        self.balance, self.tape, self.replay = balance, tape, replay
        self.saved: list = []

    def __enter__(self):
        self.saved.append((self.balance.tape, self.tape.replay))
        self.balance.tape, self.tape.replay = self.tape, self.replay

    def __exit__(self, *exc):
        self.balance.tape, self.tape.replay = self.saved.pop()
        return False


def checkpoint_moe_layer(fn, balance: Balance, *args):
    """``fn(*args)`` under non-reentrant checkpoint, with the MoE decisions of its forward taped
    for the recomputation (see the module docstring)."""
    tape = Tape()

    def contexts():
        return _TapeOn(balance, tape, False), _TapeOn(balance, tape, True)

    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)


def maybe_checkpoint(on: bool, fn, *args):
    """``fn(*args)``, under non-reentrant checkpoint when ``on`` and grad mode is on (a piece
    without MoE routing inside)."""
    if on and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
