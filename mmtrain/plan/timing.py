"""The time model: a step's seconds on a layout. Model FLOPs per GPU at ``bf16_tflops ×
plan.efficiency`` plus recomputation; the exposed part of each collective (TP/SP gathers and
reduce-scatters, EP all-to-all and ETP gathers against ``parallel.moe_overlap_groups``, CP state
gathers and the K/V ring, PP point-to-point); the 1F1B bubble over the worst PP stage; the DP
gradient reduce-scatter past the last backward and the parameter all-gather; an HBM-bound
optimizer step. Collectives are priced by group size and rank stride on the ``tp-cp-ep-dp-pp``
grid (NVLink inside a node, InfiniBand across). docs/plan.md has each term's reason.
"""

from __future__ import annotations

from mmtrain.plan.config import Layout
from mmtrain.plan.inventory import stage_layers
from mmtrain.plan.sharding import ShardModel, zero1_shard


def _ring(nbytes: float, n: int, bw: float) -> float:
    """Seconds of a ring all-gather or reduce-scatter of ``nbytes`` (the full buffer) over n."""
    return 0.0 if n <= 1 else nbytes * (n - 1) / n / bw


class TimeModel(ShardModel):
    """Step time of a layout (a :class:`mmtrain.plan.search.Planner` is one)."""

    def _bw(self, stride: int, size: int) -> float:
        """Ring bandwidth (bytes/s one way) of a group of ``size`` ranks ``stride`` apart."""
        if stride * size <= self.cl.gpus_per_node:
            return self.cl.nvlink_bw() * self.cl.bus_efficiency
        return self.cl.ib_bw() * self.cl.bus_efficiency

    def _a2a(self, nbytes: float, stride: int, size: int) -> float:
        """Seconds of an all-to-all where each rank holds ``nbytes`` spread evenly over
        ``size`` ranks ``stride`` apart: on-node and off-node parts in parallel."""
        if size <= 1:
            return 0.0
        local = min(size, max(1, self.cl.gpus_per_node // stride)) if stride < \
            self.cl.gpus_per_node else 1
        on = nbytes * (local - 1) / size
        off = nbytes * (size - local) / size
        eff = self.cl.a2a_efficiency
        return max(on / (self.cl.nvlink_bw() * eff), off / (self.cl.ib_bw() * eff))

    def layer_flops(self, kind: str) -> dict:
        """Training FLOPs per token of one layer: {gemm, experts, core}."""
        inv = self.inv
        gemm = 6 * (inv.tp_gemm.get(kind, 0) + inv.kv_gemm.get(kind, 0) + inv.router.get(kind, 0))
        experts = 6 * inv.experts.get(kind, 0) * self.top_k / self.E
        if kind == "lightning":
            core = 3 * 4 * self.H * self.K ** 2
        else:
            core = 3 * 2 * self.H * self.K * self.stage.seq_len
        return {"gemm": gemm, "experts": experts, "core": core}

    def flops_check(self) -> float:
        """Σ of the per-layer FLOPs + LM head; equals ``account``'s figure (a test checks)."""
        return (sum(sum(self.layer_flops(k).values()) for k in self.inv.kinds)
                + 6 * self.inv.lm_head)

    def step_time(self, lay: Layout) -> dict:
        """Seconds of one step and its parts: the pipeline (micro-batches over the worst PP
        stage, bubble included), exposed DP communication and the optimizer; MFU and tokens/s."""
        cl, o = self.cl, self.opts
        flops_rate = cl.bf16_tflops * 1e12 * o.efficiency
        T, Ts = self._tokens(lay)
        tokens_gpu = lay.micro_batch * self.stage.seq_len / (lay.tp * lay.cp)  # per micro-batch
        D, k = self.D, self.top_k
        rin = 4 if self.fp32 else 2
        bw_tp = self._bw(1, lay.tp)
        full = lay.recompute == "full"
        imbalance = (2 * lay.cp / (lay.cp + 1)) if (lay.cp > 1 and not o.cp_balanced) else 1.0
        per_stage = []
        for s, (nl, ns) in enumerate(stage_layers(self.inv.kinds, lay.pp)):
            comp = tp_t = ep_t = cp_t = 0.0
            for kind, n in (("lightning", nl), ("softmax", ns)):
                if not n:
                    continue
                f = self.layer_flops(kind)
                core = f["core"] * (imbalance if kind == "softmax" else 1.0)
                layer = f["gemm"] + f["experts"] + core
                extra = layer / 3 if full else (
                    f["core"] / 3 if (lay.recompute == "selective" and kind == "lightning") else 0)
                comp += n * (layer + extra) * tokens_gpu / flops_rate
                # TP/SP: fwd all-gather (input) + reduce-scatter (output); bwd the reverse
                per = _ring(rin * D * T, lay.tp, bw_tp) + _ring(2 * D * T, lay.tp, bw_tp)
                tp_t += n * per * (3 if full else 2)
                # EP all-to-all (dispatch + combine, fwd and bwd) and ETP gathers
                rows = 2 * k * D * Ts
                a2a = (4 + (2 if full else 0)) * (self._a2a(rows, lay.etp, lay.ep)
                                                  + _ring(rows * lay.etp, lay.etp,
                                                          self._bw(1, lay.etp)))
                t_exp = f["experts"] * tokens_gpu / flops_rate
                if self.G > 1:
                    a2a = a2a / self.G + max(0.0, (a2a - t_exp) * (self.G - 1) / self.G)
                ep_t += n * a2a
                if lay.cp > 1:
                    bw_cp = self._bw(lay.tp, lay.cp)
                    if kind == "lightning":  # LASP+: one state all-gather fwd, one bwd
                        st = (self.H // lay.tp) * self.K ** 2 * 4 * lay.micro_batch
                        cp_t += n * 2 * st * (lay.cp - 1) / bw_cp
                    else:  # ring: K/V around the ring fwd; K/V and dK/dV bwd
                        Wkv = max(self.KV // lay.tp, 1) * self.K
                        ring = 3 * (lay.cp - 1) * 2 * T * Wkv * 2 / bw_cp
                        cp_t += n * max(0.0, ring - core * tokens_gpu / flops_rate)
            if s == lay.pp - 1:
                comp += 6 * self.inv.lm_head * tokens_gpu / flops_rate
                tp_t += 2 * _ring(rin * D * T, lay.tp, bw_tp)
            if s == 0:
                tp_t += 2 * _ring(rin * D * T, lay.tp, bw_tp)
            pp_t = 0.0
            if lay.pp > 1:
                pp_t = 2 * rin * D * Ts / self._bw(lay.tp * lay.cp * lay.dp, lay.pp)
            per_stage.append({"compute": comp, "tp": tp_t, "ep": ep_t, "cp": cp_t, "pp": pp_t,
                              "total": comp + tp_t + ep_t + cp_t + pp_t})
        worst = max(per_stage, key=lambda d: d["total"])
        m = self.micro_batches(lay)
        bubble = (lay.pp - 1) / (m + lay.pp - 1)
        pipeline = (m + lay.pp - 1) * worst["total"]
        # data parallel: reduce-scatter (or all-reduce) of fp32 grads, all-gather of params
        mem = self.local_params(lay, 0)
        last = self.local_params(lay, lay.pp - 1)
        p = mem if mem["total"] >= last["total"] else last
        dense_n, repl_n = lay.dp * lay.cp, lay.dp * lay.cp * lay.tp
        groups = ((p["split"], lay.tp, dense_n), (p["replicated"], 1, repl_n),
                  (p["experts"], lay.etp * lay.ep, lay.edp))
        rs = sum(_ring(4 * n, g, self._bw(stride, g)) for n, stride, g in groups)
        pbytes = 4 if self.fp32 else 2
        ag = sum(_ring(pbytes * n, g, self._bw(stride, g)) for n, stride, g in groups)
        if not lay.zero1:
            rs, ag = 2 * rs, 0.0
        backward_last = worst["compute"] * 2 / 3
        last_bucket = max((_ring(self.bucket_mb * 2 ** 20, g, self._bw(stride, g))
                           for n, stride, g in groups if n), default=0.0)
        dp_exposed = max(rs - backward_last, last_bucket if rs else 0.0) + ag
        # optimizer: HBM-bound over the owned shard (ZeRO) or every local element
        shard = zero1_shard(p, lay) if lay.zero1 else p["total"]
        opt = (shard * 48 + p["total"] * pbytes) / (cl.hbm_tbs * 1e12 * 0.7)
        total = pipeline + dp_exposed + opt
        useful = self.inv.flops_per_token * self.stage.global_tokens
        mfu = useful / (total * lay.world * cl.bf16_tflops * 1e12)
        return {"step_s": total, "pipeline_s": pipeline, "micro_batches": m, "bubble": bubble,
                "per_micro_batch": worst, "dp_exposed_s": dp_exposed, "dp_reduce_scatter_s": rs,
                "dp_all_gather_s": ag, "optimizer_s": opt, "mfu": mfu,
                "tokens_per_s": self.stage.global_tokens / total}
