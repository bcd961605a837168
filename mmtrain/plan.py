"""``mmtrain plan``: a per-GPU memory and step-time model of a recipe on a cluster, and a search
over the valid layouts for the fastest one that fits. ``docs/plan.md`` has every formula and
assumption with its reason; this docstring is the summary.

Inputs: a model config, a stage (``data.seq_len``, the global batch in rows or
``plan.global_batch_tokens``, ``train.micro_batch``), a cluster (:class:`ClusterConfig`, the
``recipes/cluster/`` group) and a layout (tp, cp, pp, dp; ep, etp, edp derived as in
:class:`mmtrain.parallel.topology.Topology`).

**What is sharded how** (mirrors ``mmtrain.parallel.apply``): attention projections, the lightning
output norm, the embedding and the LM head split over TP (k/v projections split when TP divides the
KV heads, replicated when the KV heads divide TP); norms and routers replicated; experts split over
EP (whole experts) × ETP (each expert's width); layers over PP (contiguous, embedding on the first
stage, final norm and LM head on the last). ZeRO-1 shards the optimizer state of TP-split weights
over DP·CP, of replicated weights over TP·DP·CP and of experts over EDP.

**Dtypes.** ``plan.param_dtype=fp32`` is mmtrain today: fp32 parameters and gradients under bf16
autocast (residual stream, norms, the lightning output and the MoE combine in fp32; autocast's
weight-cast cache holds a bf16 copy of every GEMM weight through the forward); a persistent flat
fp32 gradient bucket per parameter when distributed (``parallel.data.build_buckets`` allocates
buckets for *all* parameters; ``bucket_mb`` sets their granularity, not their total); ZeRO-1
keeps fp32 master, two moments and an fp32 weight-decay mask per owned element.
``plan.param_dtype=bf16`` is the Megatron-style path of issue 9 scope 2: bf16 parameters and
activations, gradients accumulated in an fp32 main-grad buffer (which is also the bucket), fp32
master + moments (+ mask) sharded by ZeRO-1.

**Time.** Model FLOPs (:func:`mmtrain.model.account`) per GPU at ``bf16_tflops × plan.efficiency``,
plus recomputation, plus exposed communication: TP/SP all-gathers and reduce-scatters (not
overlapped in mmtrain), EP all-to-all and ETP gathers (overlapped with the expert GEMMs by
``parallel.moe_overlap_groups``), CP state all-gathers (LASP+) and the ring of K/V (overlapped
with the attention core), DP reduce-scatter (overlapped with the last micro-batch's backward) and
parameter all-gather (exposed), PP point-to-point, a 1F1B bubble ``(pp−1)/(m+pp−1)``, and an
HBM-bound optimizer step.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional

from mmtrain.config import ConfigError, ModelConfig

GIB = float(2 ** 30)
RECOMPUTE = ("none", "selective", "full")
#: mmtrain's order of the rank grids (parallel/topology.py); strides below follow it.
ORDER = "tp-cp-ep-dp-pp"


def _fail(path: str, msg: str) -> None:
    raise ConfigError(f"{path}: {msg}")


# ----------------------------------------------------------------------------------- configs
@dataclass
class ClusterConfig:
    """A cluster (``recipes/cluster/<gpu>.yaml``; ``cluster.gpu=NAME`` picks the file)."""

    gpu: str = "h800"
    gpus: int = 8
    gpus_per_node: int = 8
    memory_gib: float = 79.6
    bf16_tflops: float = 989.0
    hbm_tbs: float = 3.35
    nvlink_gbs: float = 400.0  # per GPU, both directions together (datasheet)
    ib_gbs: float = 50.0  # per GPU, one direction
    bus_efficiency: float = 0.8
    a2a_efficiency: float = 0.6

    def validate(self, path: str = "cluster") -> None:
        for name in ("gpus", "gpus_per_node"):
            if getattr(self, name) < 1:
                _fail(f"{path}.{name}", f"must be a positive integer, got {getattr(self, name)}")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            _fail(f"{path}.gpus", f"{self.gpus} GPUs are not whole nodes of "
                  f"{self.gpus_per_node}; use a multiple of cluster.gpus_per_node")
        for name in ("memory_gib", "bf16_tflops", "hbm_tbs", "nvlink_gbs", "ib_gbs"):
            if not getattr(self, name) > 0:
                _fail(f"{path}.{name}", f"must be > 0, got {getattr(self, name)}")
        for name in ("bus_efficiency", "a2a_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                _fail(f"{path}.{name}", f"must be in (0, 1], got {getattr(self, name)}")

    # effective one-way bandwidths, bytes/s
    def nvlink_bw(self) -> float:
        return self.nvlink_gbs / 2 * 1e9

    def ib_bw(self) -> float:
        return self.ib_gbs * 1e9


@dataclass
class PlanConfig:
    """Planner options (``plan.*`` overrides)."""

    recompute: str = "auto"  # none | selective | full | auto (search all three)
    param_dtype: str = "fp32"  # fp32 (mmtrain today) | bf16 (issue 9 scope 2)
    efficiency: float = 0.4  # achieved fraction of the bf16 peak by the model's FLOPs
    headroom: float = 0.1  # fraction of GPU memory kept free (allocator, CUDA context, NCCL)
    global_batch_tokens: Optional[int] = None  # null: train.global_batch rows × data.seq_len
    search: bool = True  # false: evaluate the recipe's layout only
    top: int = 5
    max_tp: Optional[int] = None  # null: cluster.gpus_per_node
    max_etp: Optional[int] = None  # null: cluster.gpus_per_node
    # null: as the recipe trains (parallel.cp_balance != contiguous; train.fused_ce)
    cp_balanced: Optional[bool] = None  # false: contiguous CP chunks, causal work imbalanced
    fused_ce: Optional[bool] = None  # true: the chunked linear cross-entropy (train.fused_ce)

    def validate(self, path: str = "plan") -> None:
        if self.recompute not in RECOMPUTE + ("auto",):
            _fail(f"{path}.recompute", f"unknown '{self.recompute}'; use none, selective, full "
                  f"or auto")
        if self.param_dtype not in ("fp32", "bf16"):
            _fail(f"{path}.param_dtype", f"unknown '{self.param_dtype}'; use fp32 or bf16")
        if not 0 < self.efficiency <= 1:
            _fail(f"{path}.efficiency", f"must be in (0, 1], got {self.efficiency}")
        if not 0 <= self.headroom < 1:
            _fail(f"{path}.headroom", f"must be in [0, 1), got {self.headroom}")
        if self.global_batch_tokens is not None and self.global_batch_tokens < 1:
            _fail(f"{path}.global_batch_tokens", f"must be >= 1 or null, got "
                  f"{self.global_batch_tokens}")
        if self.top < 1:
            _fail(f"{path}.top", f"must be >= 1, got {self.top}")
        for name in ("max_tp", "max_etp"):
            v = getattr(self, name)
            if v is not None and v < 1:
                _fail(f"{path}.{name}", f"must be >= 1 or null, got {v}")


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    pp: int
    dp: int
    ep: int
    etp: int
    edp: int
    micro_batch: int  # rows per forward/backward on one DP rank
    recompute: str
    zero1: bool

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def name(self) -> str:
        return (f"tp{self.tp} cp{self.cp} pp{self.pp} dp{self.dp} | ep{self.ep} etp{self.etp} "
                f"edp{self.edp} | mb{self.micro_batch} {self.recompute}"
                + ("" if self.zero1 else " no-zero1"))


@dataclass
class Stage:
    seq_len: int
    global_rows: int

    @property
    def global_tokens(self) -> int:
        return self.seq_len * self.global_rows


# ------------------------------------------------------------------------------ the inventory
@dataclass
class Inventory:
    """Parameter counts by sharding class, read off the model built on the meta device."""

    cfg: ModelConfig
    kinds: list  # layer kinds
    embed: int = 0
    lm_head: int = 0
    final_norm: int = 0
    # per layer kind: numel by class (identical for every layer of a kind)
    tp_gemm: dict = field(default_factory=dict)  # split over TP, cast to bf16 for a GEMM
    tp_other: dict = field(default_factory=dict)  # split over TP, not a GEMM (lightning norm)
    kv_gemm: dict = field(default_factory=dict)  # k/v projections (split or replicated)
    replicated: dict = field(default_factory=dict)  # layer norms (not GEMMs)
    router: dict = field(default_factory=dict)  # replicated, fp32 GEMM (no bf16 copy)
    experts: dict = field(default_factory=dict)  # all experts of one layer
    flops_per_token: float = 0.0  # training FLOPs at the stage's seq_len (account)
    flops_per_token_no_seq: float = 0.0  # the same at seq_len 0 (no softmax attention core)

    @property
    def total(self) -> int:
        per = sum(sum(d.get(k, 0) for d in (self.tp_gemm, self.tp_other, self.kv_gemm,
                                            self.replicated, self.router, self.experts))
                  for k in self.kinds)
        return self.embed + self.lm_head + self.final_norm + per


_CLASSES = {"qkv_proj": "tp_gemm", "gate_proj": "tp_gemm", "out_proj": "tp_gemm",
            "q_proj": "tp_gemm", "o_proj": "tp_gemm", "k_proj": "kv_gemm", "v_proj": "kv_gemm",
            "norm": "tp_other"}


def build_inventory(cfg: ModelConfig, seq_len: int) -> Inventory:
    from mmtrain.model.accounting import account, build_meta_model

    model = build_meta_model(cfg)
    inv = Inventory(cfg=cfg, kinds=cfg.layer_types())
    seen: dict = {}
    for name, p in model.named_parameters():
        n = p.numel()
        if name == "embed.weight":
            inv.embed = n
        elif name == "lm_head.weight":
            inv.lm_head = n
        elif name == "final_norm.weight":
            inv.final_norm = n
        else:
            parts = name.split(".")  # layers.<i>.<module>...
            i, kind = int(parts[1]), inv.kinds[int(parts[1])]
            if parts[2] in ("input_norm", "post_norm"):
                cls = "replicated"
            elif parts[2] == "moe":
                cls = "router" if parts[3] == "router" else "experts"
            elif parts[2] == "attn" and parts[3] in _CLASSES:
                cls = _CLASSES[parts[3]]
            else:
                raise ValueError(f"plan: no sharding rule for parameter {name}; "
                                 f"teach mmtrain/plan.py about it")
            seen.setdefault((i, cls), 0)
            seen[(i, cls)] += n
    for (i, cls), n in seen.items():
        d = getattr(inv, cls)
        kind = inv.kinds[i]
        if d.get(kind, n) != n:
            raise ValueError(f"plan: layers of kind {kind} differ in {cls} parameters")
        d[kind] = n
    inv.flops_per_token = account(cfg, seq_len).flops_per_token
    inv.flops_per_token_no_seq = account(cfg, 0).flops_per_token
    return inv


# ------------------------------------------------------------------------------- the model
def _stage_layers(kinds: list, pp: int) -> list:
    """Per PP stage: (lightning layers, softmax layers) of its contiguous share."""
    n = len(kinds) // pp
    return [(kinds[s * n:(s + 1) * n].count("lightning"), kinds[s * n:(s + 1) * n].count("softmax"))
            for s in range(pp)]


def _ring(nbytes: float, n: int, bw: float) -> float:
    """Seconds of a ring all-gather or reduce-scatter of ``nbytes`` (the full buffer) over n."""
    return 0.0 if n <= 1 else nbytes * (n - 1) / n / bw


class Planner:
    """Evaluates layouts of one (model, stage, cluster, options)."""

    def __init__(self, inv: Inventory, stage: Stage, cluster: ClusterConfig, opts: PlanConfig,
                 moe_overlap_groups: int = 1, bucket_mb: float = 40.0):
        self.inv, self.stage, self.cl, self.opts = inv, stage, cluster, opts
        self.G = max(1, moe_overlap_groups)
        self.bucket_mb = bucket_mb
        m = inv.cfg
        self.D, self.H, self.K, self.KV = m.hidden_size, m.num_heads, m.head_dim, m.num_kv_heads
        self.E, self.top_k, self.F, self.V = m.num_experts, m.top_k, m.ffn_hidden_size, m.vocab_size
        self.fp32 = opts.param_dtype == "fp32"

    # ------------------------------------------------------------------------------ validity
    def problems(self, lay: Layout) -> list:
        """Why a layout cannot run this model and stage (empty: valid). Mirrors
        ``parallel.apply.check_layout`` and ``Topology`` (cp and pp included, as planned)."""
        m, W, out = self.inv.cfg, self.cl.gpus, []
        if lay.world != W:
            out.append(f"tp·cp·pp·dp = {lay.world} != cluster.gpus={W}")
        if W % (lay.pp * lay.ep * lay.etp) or lay.edp != W // (lay.pp * lay.ep * lay.etp):
            out.append(f"pp·ep·etp = {lay.pp * lay.ep * lay.etp} does not divide {W}")
        if m.num_heads % lay.tp:
            out.append(f"model.num_heads={m.num_heads} not divisible by tp={lay.tp}")
        if m.num_kv_heads % lay.tp and lay.tp % m.num_kv_heads:
            out.append(f"model.num_kv_heads={m.num_kv_heads} and tp={lay.tp} must divide one "
                       f"another")
        if m.vocab_size % lay.tp:
            out.append(f"model.vocab_size={m.vocab_size} not divisible by tp={lay.tp}")
        if m.num_experts % lay.ep:
            out.append(f"model.num_experts={m.num_experts} not divisible by ep={lay.ep}")
        if m.ffn_hidden_size % lay.etp:
            out.append(f"model.ffn_hidden_size={m.ffn_hidden_size} not divisible by etp={lay.etp}")
        if m.num_layers % lay.pp:
            out.append(f"model.num_layers={m.num_layers} not divisible by pp={lay.pp}")
        if self.stage.seq_len % lay.cp:
            out.append(f"data.seq_len={self.stage.seq_len} not divisible by cp={lay.cp}")
        elif (lay.micro_batch * self.stage.seq_len // lay.cp) % lay.tp:
            out.append(f"micro-batch tokens per CP rank not divisible by tp={lay.tp} (SP)")
        if self.stage.global_rows % (lay.dp * lay.micro_batch):
            out.append(f"global batch {self.stage.global_rows} rows not a multiple of "
                       f"micro_batch·dp = {lay.micro_batch}·{lay.dp}")
        return out

    def topology_check(self, lay: Layout) -> None:
        """Raise ConfigError unless :class:`Topology` accepts the layout (both grids)."""
        from mmtrain.parallel.topology import Topology

        topo = Topology(self.cl.gpus, tp=lay.tp, cp=lay.cp, pp=lay.pp, ep=lay.ep, etp=lay.etp,
                        dp=lay.dp, order=ORDER)
        topo.check_model(num_experts=self.E, num_heads=self.H, num_layers=self.inv.cfg.num_layers,
                         ffn_hidden_size=self.F)
        assert topo.edp == lay.edp

    # ------------------------------------------------------------------------------- params
    def local_params(self, lay: Layout, s: int) -> dict:
        """Parameter numel on a GPU of PP stage ``s`` by class: {split, replicated, experts,
        gemm (weights cast to bf16 by autocast)}."""
        inv, tp = self.inv, lay.tp
        kv_split = self.KV % tp == 0
        nl, ns = _stage_layers(inv.kinds, lay.pp)[s]
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

    # -------------------------------------------------------------------------- activations
    def _tokens(self, lay: Layout) -> tuple:
        T = lay.micro_batch * self.stage.seq_len / lay.cp  # the attention region's tokens
        return T, T / lay.tp  # and the sequence-parallel shard (norms, residual, MoE)

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

    # ------------------------------------------------------------------------------- memory
    def memory(self, lay: Layout) -> dict:
        """Per-GPU bytes at the peak of the worst PP stage, by component (see docs/plan.md)."""
        best = None
        for s in range(lay.pp):
            mem = self._memory_stage(lay, s)
            if best is None or mem["peak"] > best["peak"]:
                best = mem
        return best

    def _memory_stage(self, lay: Layout, s: int) -> dict:
        p = self.local_params(lay, s)
        n_total = p["total"]
        world = lay.world
        pb = 4 if self.fp32 else 2
        dense_n = lay.dp * lay.cp
        repl_n = dense_n * lay.tp
        weights = pb * n_total
        casts = 2 * p["gemm"] if self.fp32 else 0.0
        grads = 4 * n_total
        buckets = 4 * n_total if (self.fp32 and world > 1) else 0.0
        if lay.zero1 and world > 1:
            shard = (p["split"] / dense_n + p["replicated"] / repl_n + p["experts"] / lay.edp)
            master, moments, mask = 4 * shard, 8 * shard, 4 * shard
            shard_grad = 4 * shard
        else:
            shard = n_total
            master = 0.0 if self.fp32 else 4 * n_total
            moments, mask, shard_grad = 8 * n_total, 0.0, 0.0
        # activations
        m = self.micro_batches(lay)
        inflight = min(lay.pp - s, m)
        nl, ns = _stage_layers(self.inv.kinds, lay.pp)[s]
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

    # --------------------------------------------------------------------------------- time
    def micro_batches(self, lay: Layout) -> int:
        return self.stage.global_rows // (lay.dp * lay.micro_batch)

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
        for s, (nl, ns) in enumerate(_stage_layers(self.inv.kinds, lay.pp)):
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
        shard = (p["split"] / dense_n + p["replicated"] / repl_n + p["experts"] / lay.edp) \
            if lay.zero1 else p["total"]
        opt = (shard * 48 + p["total"] * pbytes) / (cl.hbm_tbs * 1e12 * 0.7)
        total = pipeline + dp_exposed + opt
        useful = self.inv.flops_per_token * self.stage.global_tokens
        mfu = useful / (total * lay.world * cl.bf16_tflops * 1e12)
        return {"step_s": total, "pipeline_s": pipeline, "micro_batches": m, "bubble": bubble,
                "per_micro_batch": worst, "dp_exposed_s": dp_exposed, "dp_reduce_scatter_s": rs,
                "dp_all_gather_s": ag, "optimizer_s": opt, "mfu": mfu,
                "tokens_per_s": self.stage.global_tokens / total}

    # ------------------------------------------------------------------------------- search
    def evaluate(self, lay: Layout) -> dict:
        return {"layout": lay, "memory": self.memory(lay), "time": self.step_time(lay)}

    def candidates(self, pins: dict, micro_batch: Optional[int]):
        """Every layout of the cluster's GPUs satisfying :meth:`problems` and the pins."""
        W, cl, o = self.cl.gpus, self.cl, self.opts
        divs = [d for d in range(1, W + 1) if W % d == 0]
        max_tp = o.max_tp or cl.gpus_per_node
        max_etp = o.max_etp or cl.gpus_per_node

        def choices(name, pool):
            return [pins[name]] if name in pins else pool

        modes = [o.recompute] if o.recompute != "auto" else list(RECOMPUTE)
        zero = [pins["zero1"]] if "zero1" in pins else [True]
        for tp, cp, pp in itertools.product(choices("tp", [d for d in divs if d <= max_tp]),
                                            choices("cp", divs), choices("pp", divs)):
            if W % (tp * cp * pp):
                continue
            dp = W // (tp * cp * pp)
            if "dp" in pins and pins["dp"] not in (-1, dp):
                continue
            if self.stage.global_rows % dp:
                continue
            rows = self.stage.global_rows // dp
            mbs = [micro_batch] if micro_batch else [b for b in (1, 2, 4, 8) if rows % b == 0]
            for ep, etp in itertools.product(choices("ep", divs),
                                             choices("etp", [d for d in divs if d <= max_etp])):
                if W % (pp * ep * etp):
                    continue
                edp = W // (pp * ep * etp)
                for mb, mode, z in itertools.product(mbs, modes, zero):
                    lay = Layout(tp, cp, pp, dp, ep, etp, edp, mb, mode, z)
                    if not self.problems(lay):
                        yield lay

    def search(self, pins: dict, micro_batch: Optional[int]) -> dict:
        fitting, closest, n = [], [], 0
        for lay in self.candidates(pins, micro_batch):
            n += 1
            mem = self.memory(lay)
            if mem["fits"]:
                fitting.append((self.step_time(lay)["step_s"], lay))
            else:
                closest.append((mem["peak"], lay))
        fitting.sort(key=lambda x: x[0])
        closest.sort(key=lambda x: x[0])
        top = []
        for _, lay in fitting if fitting else closest:
            try:
                self.topology_check(lay)
            except ConfigError:
                continue
            top.append(self.evaluate(lay))
            if len(top) >= self.opts.top:
                break
        return {"searched": n, "fitting": len(fitting), "results": top}
