"""The memory model: per-GPU bytes of a layout at the peak of its worst PP stage, by component:
weights, gradients and optimizer state (:meth:`MemoryModel.state_bytes`, the one place the
parameter dtypes turn into bytes), saved activations by layer kind and recomputation mode, the
LM head's and the loss's transients, and communication buffers; the peak is the larger of the
backward's and the optimizer step's. docs/plan.md lists every term with its reason.
"""

from __future__ import annotations

import math

from mmtrain.plan.config import GIB, Layout
from mmtrain.plan.inventory import stage_layers
from mmtrain.plan.sharding import ShardModel, zero1_shard


class MemoryModel(ShardModel):
    """Per-GPU memory of a layout (a :class:`mmtrain.plan.search.Planner` is one)."""

    def state_bytes(self, lay: Layout, p: dict) -> dict:
        """Bytes of the parameter state on a GPU holding ``p`` (:meth:`local_params`): weights,
        autocast's bf16 weight copies, gradients, the flat gradient buckets, optimizer master,
        moments and weight-decay mask, and the reduced gradient shard of the optimizer step.

        The memory model computes these bytes here only (a new parameter dtype or optimizer
        layout is added in this one function); ``plan.param_dtype``: fp32 is ``train.param_dtype=fp32``
        (fp32 weights and ``.grad``, a bf16 cast per GEMM weight, fp32 buckets for all
        parameters when distributed); bf16 keeps bf16 weights and an fp32 main-grad buffer that
        is also the bucket, with an fp32 master copy. ZeRO-1 (when distributed) shards master,
        moments and mask over :func:`zero1_shard`'s groups. (The optimizer step's HBM traffic
        is priced separately, in ``TimeModel.step_time``.)"""
        n_total = p["total"]
        world = lay.world
        pb = 4 if self.fp32 else 2
        weights = pb * n_total
        casts = 2 * p["gemm"] if self.fp32 else 0.0
        grads = 4 * n_total
        buckets = 4 * n_total if (self.fp32 and world > 1) else 0.0
        if lay.zero1 and world > 1:
            shard = zero1_shard(p, lay)
            master, moments, mask = 4 * shard, 8 * shard, 4 * shard
            shard_grad = 4 * shard
        else:
            master = 0.0 if self.fp32 else 4 * n_total
            moments, mask, shard_grad = 8 * n_total, 0.0, 0.0
        return {"weights": weights, "bf16_weight_copies": casts, "grads": grads,
                "grad_buckets": buckets, "optimizer_master": master,
                "optimizer_moments": moments, "optimizer_wd_mask": mask,
                "reduced_grad_shard": shard_grad}

    def layer_activations(self, lay: Layout, kind: str, mode: str) -> dict:
        """Bytes one layer saves for its backward, per micro-batch: {attn, moe}. See
        docs/plan.md for the tensor-by-tensor list behind each term."""
        D, K, E, k, F = self.D, self.K, self.E, self.top_k, self.F
        T, Ts = self._tokens(lay)
        W = self.H // lay.tp * K
        Wkv = max(self.KV // lay.tp, 1) * K
        r = 4 if self.fp32 else 2  # residual stream / norm outputs
        state = 0.0
        if kind == "lightning" and lay.cp > 1:  # LASP+ incoming state, fp32 per sequence
            state = lay.micro_batch * (self.H // lay.tp) * K * K * 4
        if mode == "full":
            return {"attn": r * D * Ts + state, "moe": 0.0}
        if kind == "lightning":
            if mode == "none":
                casts = 2 if self.fp32 else 1  # bf16 copies of the gathered input (qkv, gate)
                ro = 2  # kernel output normed and gated in the autocast dtype (bf16)
                attn = r * D * Ts + casts * 2 * D * T + (6 + 6 + 2 * ro + 2 + 2) * W * T
                if lay.tp > 1:  # TPRMSNorm also keeps its fp32 normalised x (and an fp32 copy
                    attn += (4 if self.fp32 else 6) * W * T  # of a bf16 input)
            else:  # selective: input, one bf16 copy, qkv and gate GEMM outputs
                attn = r * D * Ts + 2 * D * T + (6 + 2) * W * T
        else:
            casts = 3 if (self.fp32 and mode == "none") else 1  # q, k, v each cast the input
            lse = 4 * (self.H // lay.tp)
            attn = r * D * Ts + casts * 2 * D * T + (4 * W + 4 * Wkv + lse) * T
        attn += state
        routing = (8 * E + 24 * k) * Ts  # fp32 logits, probs, top-k weights and indices
        if mode == "none":
            moe = (r * D + 4 * D + 2 * k * D * lay.etp + 4 * k * F + 4 * k * D) * Ts + routing
        else:  # selective: input, bf16 router input, gathered rows, SwiGLU input, bf16 y
            moe = (r * D + 2 * D + 2 * k * D * lay.etp + 4 * k * F + 2 * k * D) * Ts + routing
        return {"attn": attn, "moe": moe}

    def head_activations(self, lay: Layout) -> tuple:
        """(saved, transient peak) bytes of the final norm, LM head and loss per micro-batch."""
        T, Ts = self._tokens(lay)
        r = 4 if self.fp32 else 2
        saved = r * self.D * Ts + 2 * self.D * T
        Vl = self.V / lay.tp
        # bytes per token and local vocab entry at the loss's peak: tp = 1, the backward's start
        # (bf16 logits held by the loop's ``out``, log-softmax output, its gradient, the input
        # gradient: 2+4+4+4); tp > 1, the vocab-parallel CE's forward (bf16 logits, the fp32
        # copy the loop passes in, the shifted logits, their exp: 2+4+4+4). The previous
        # micro-batch's logits (also held by ``out``) live only until the next forward returns.
        per = 14
        rows = min(T, 8192) if self.opts.fused_ce else T
        return saved, per * rows * Vl

    def memory(self, lay: Layout) -> dict:
        """Per-GPU bytes at the peak of the worst PP stage, by component (see docs/plan.md)."""
        best = None
        for s in range(lay.pp):
            mem = self._memory_stage(lay, s)
            if best is None or mem["peak"] > best["peak"]:
                best = mem
        return best

    def _memory_stage(self, lay: Layout, s: int) -> dict:
        """Per-GPU bytes of PP stage ``s`` by component, and its peak against the capacity."""
        p = self.local_params(lay, s)
        n_total = p["total"]
        st = self.state_bytes(lay, p)
        weights, casts, grads = st["weights"], st["bf16_weight_copies"], st["grads"]
        buckets, shard_grad = st["grad_buckets"], st["reduced_grad_shard"]
        master, moments = st["optimizer_master"], st["optimizer_moments"]
        mask = st["optimizer_wd_mask"]
        # activations
        m = self.micro_batches(lay)
        inflight = min(lay.pp - s, m)
        nl, ns = stage_layers(self.inv.kinds, lay.pp)[s]
        act = {}
        for kind, n in (("lightning", nl), ("softmax", ns)):
            a = self.layer_activations(lay, kind, lay.recompute)
            act[kind] = inflight * n * a["attn"]
            act["moe"] = act.get("moe", 0.0) + inflight * n * a["moe"]
        head_saved, logits = (self.head_activations(lay) if s == lay.pp - 1 else (0.0, 0.0))
        act["head"] = head_saved
        workspace = 0.0
        if lay.recompute != "none":  # one layer recomputed in full during the backward
            workspace = max(sum(self.layer_activations(lay, kind, "none").values())
                            for kind in set(self.inv.kinds))
        act["transient"] = max(logits, workspace)
        # communication buffers (transient, counted whole)
        T, Ts = self._tokens(lay)
        comm = {"grad_buckets": buckets}
        comm["all_to_all"] = (8 * self.top_k * self.D * Ts) if lay.ep * lay.etp > 1 else 0.0
        comm["tp_gather"] = ((4 if self.fp32 else 2) * self.D * T) if lay.tp > 1 else 0.0
        Wkv = max(self.KV // lay.tp, 1) * self.K
        comm["cp"] = ((lay.cp * (self.H // lay.tp) * self.K ** 2 * 4 * lay.micro_batch
                       + 2 * 2 * T * Wkv * 2) if lay.cp > 1 else 0.0)
        # the lightning kernel's split mode: fp32 local and incoming states of segments of at
        # least 2048 tokens (kernels/lightning/triton_scan.py), an upper bound
        comm["lightning_states"] = (2 * math.ceil(T / 2048) * (self.H // lay.tp) * self.K ** 2 * 4
                                    if "lightning" in self.inv.kinds else 0.0)
        static = weights + casts + grads + master + moments + mask
        act_total = sum(act.values())
        comm_total = sum(comm.values())
        backward_peak = static + act_total + comm_total
        # optimizer phase: no activations; the reduced gradient shard and a bucket of temporaries
        step_peak = weights + grads + buckets + master + moments + mask + shard_grad + \
            3 * self.bucket_mb * 2 ** 20
        peak = max(backward_peak, step_peak)
        cap = self.cl.memory_gib * GIB * (1 - self.opts.headroom)
        return {"stage": s, "params": n_total, "weights": weights, "bf16_weight_copies": casts,
                "grads": grads, "optimizer_master": master, "optimizer_moments": moments,
                "optimizer_wd_mask": mask, "activations": act, "activations_total": act_total,
                "comm_buffers": comm, "comm_total": comm_total, "reduced_grad_shard": shard_grad,
                "backward_peak": backward_peak, "step_peak": step_peak, "peak": peak,
                "capacity": cap, "fits": peak <= cap, "inflight_micro_batches": inflight}

