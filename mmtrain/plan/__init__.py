"""``mmtrain plan``: a per-GPU memory and step-time model of a recipe on a cluster, and a search
over the valid layouts for the fastest one that fits. ``docs/plan.md`` has every formula and
assumption with its reason; this docstring is the summary, and the modules hold:

* :mod:`~mmtrain.plan.config` — the inputs: :class:`ClusterConfig`, :class:`PlanConfig`,
  :class:`Layout`, :class:`Stage`;
* :mod:`~mmtrain.plan.inventory` — :func:`build_inventory`: parameter counts by sharding class,
  read off the meta-device model;
* :mod:`~mmtrain.plan.sharding` — what one GPU of a layout holds (parameters, tokens, ZeRO-1
  shard), shared by the two models;
* :mod:`~mmtrain.plan.memory` — the memory model (``MemoryModel.state_bytes`` turns parameters
  into weight, gradient and optimizer bytes; activations; buffers; the peak);
* :mod:`~mmtrain.plan.timing` — the time model (compute, exposed communication, bubble,
  optimizer);
* :mod:`~mmtrain.plan.search` — validity, the layout search and :class:`Planner`, which is both
  models plus the search.

``mmtrain/plan_cli.py`` turns overrides into these inputs and renders the report. Import the
names below from ``mmtrain.plan``; the module split is not part of the interface.

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

**Dtypes.** ``plan.param_dtype=fp32`` is the trainer's ``train.param_dtype=fp32``: fp32 parameters
and gradients under bf16 autocast (residual stream, norms, the lightning output and the MoE combine
in fp32; autocast's weight-cast cache holds a bf16 copy of every GEMM weight through the forward);
a persistent flat fp32 gradient bucket per parameter when distributed
(``parallel.data.build_buckets`` allocates buckets for *all* parameters; ``bucket_mb`` sets their
granularity, not their total); ZeRO-1 keeps fp32 master, two moments and an fp32 weight-decay mask
per owned element.
``plan.param_dtype=bf16`` is the trainer's default on GPUs (``train.param_dtype=auto``), Megatron-
style: bf16 parameters and activations, gradients accumulated in an fp32 main-grad buffer (which is
also the bucket), fp32 master + moments (+ mask) sharded by ZeRO-1.

**Time.** Model FLOPs (:func:`mmtrain.model.account`) per GPU at ``bf16_tflops × plan.efficiency``,
plus recomputation, plus exposed communication: TP/SP all-gathers and reduce-scatters (not
overlapped in mmtrain), EP all-to-all and ETP gathers (overlapped with the expert GEMMs by
``parallel.moe_overlap_groups``), CP state all-gathers (LASP+) and the ring of K/V (overlapped
with the attention core), DP reduce-scatter (overlapped with the last micro-batch's backward) and
parameter all-gather (exposed), PP point-to-point, a 1F1B bubble ``(pp−1)/(m+pp−1)``, and an
HBM-bound optimizer step.
"""

from mmtrain.plan.config import GIB, ORDER, RECOMPUTE, ClusterConfig, Layout, PlanConfig, Stage
from mmtrain.plan.inventory import Inventory, build_inventory
from mmtrain.plan.search import Planner

__all__ = ["GIB", "ORDER", "RECOMPUTE", "ClusterConfig", "Inventory", "Layout", "PlanConfig",
           "Planner", "Stage", "build_inventory"]
