"""What one GPU of a layout holds, the base the memory and time models share: the planner's
constants (model shapes, dtypes, options), the parameters a GPU of a PP stage holds by sharding
class, its tokens per micro-batch and the ZeRO-1 shard it owns. Both models need these figures
(memory to size the state, time to size the DP collectives and the optimizer step), so they
live once, here, and :class:`mmtrain.plan.search.Planner` inherits them through both.

The sharding mirrors ``mmtrain.parallel.apply`` (see the package docstring and docs/plan.md).
"""

from __future__ import annotations

from mmtrain.plan.config import ClusterConfig, Layout, PlanConfig, Stage
from mmtrain.plan.inventory import Inventory, stage_layers


def zero1_shard(p: dict, lay: Layout) -> float:
    """Elements whose optimizer state a GPU owns under ZeRO-1, of ``p`` from
    :meth:`ShardModel.local_params`: TP-split weights are sharded over DP·CP, replicated ones over
    TP·DP·CP, experts over EDP."""
    dense_n = lay.dp * lay.cp
    repl_n = dense_n * lay.tp
    return p["split"] / dense_n + p["replicated"] / repl_n + p["experts"] / lay.edp


class ShardModel:
    """One (model, stage, cluster, options): the constants and the per-GPU shares."""

    def __init__(self, inv: Inventory, stage: Stage, cluster: ClusterConfig, opts: PlanConfig,
                 moe_overlap_groups: int = 1, bucket_mb: float = 40.0):
        self.inv, self.stage, self.cl, self.opts = inv, stage, cluster, opts
        self.G = max(1, moe_overlap_groups)
        self.bucket_mb = bucket_mb
        m = inv.cfg
        self.D, self.H, self.K, self.KV = m.hidden_size, m.num_heads, m.head_dim, m.num_kv_heads
        self.E, self.top_k, self.F, self.V = m.num_experts, m.top_k, m.ffn_hidden_size, m.vocab_size
        self.fp32 = opts.param_dtype == "fp32"

    def local_params(self, lay: Layout, s: int) -> dict:
        """Parameter numel on a GPU of PP stage ``s`` by class: {split, replicated, experts,
        gemm (weights cast to bf16 by autocast)}."""
        inv, tp = self.inv, lay.tp
        kv_split = self.KV % tp == 0
        nl, ns = stage_layers(inv.kinds, lay.pp)[s]
        split = repl = exp = gemm = 0
        for kind, n in (("lightning", nl), ("softmax", ns)):
            if not n:
                continue
            tg = inv.tp_gemm.get(kind, 0) / tp
            kv = inv.kv_gemm.get(kind, 0) / (tp if kv_split else 1)
            split += n * (tg + inv.tp_other.get(kind, 0) / tp + (kv if kv_split else 0))
            repl += n * (inv.replicated.get(kind, 0) + inv.router.get(kind, 0)
                         + (0 if kv_split else kv))
            exp += n * inv.experts.get(kind, 0) / (lay.ep * lay.etp)
            gemm += n * (tg + kv + inv.experts.get(kind, 0) / (lay.ep * lay.etp))
        if s == 0:
            split += inv.embed / tp
        if s == lay.pp - 1:
            split += inv.lm_head / tp
            repl += inv.final_norm
            gemm += inv.lm_head / tp
        return {"split": split, "replicated": repl, "experts": exp, "gemm": gemm,
                "total": split + repl + exp}

    def _tokens(self, lay: Layout) -> tuple:
        """(T, Ts) per micro-batch on a GPU: the attention region sees the CP shard of the rows,
        the sequence-parallel regions a further 1/TP of it."""
        T = lay.micro_batch * self.stage.seq_len / lay.cp  # the attention region's tokens
        return T, T / lay.tp  # and the sequence-parallel shard (norms, residual, MoE)

    def micro_batches(self, lay: Layout) -> int:
        """Micro-batches per step on a DP rank (the search keeps only layouts where they are
        whole)."""
        return self.stage.global_rows // (lay.dp * lay.micro_batch)

