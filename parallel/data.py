"""Data parallelism: bucketed gradient reduction over DP (dense) and EDP (experts), the ZeRO-1
distributed optimizer, and gradient clipping with a global norm that counts every parameter once.

Legend: n the size of a bucket's reduction group, i this rank's index in it, s = padded / n the
shard of a bucket one rank owns.

**Which group reduces which gradient** (:class:`ParamInfo.group`, decided by
:mod:`mmtrain.parallel.apply`):

* ``dp``: TP-sharded weights (each TP rank holds a different slice; DP ranks hold the same one);
* ``tp_dp``: weights replicated across TP that see only the rank's sequence shard under SP
  (norms, router, embeddings' neighbours, replicated KV projections); equal to ``dp`` when tp = 1;
* ``edp``: expert weights (replicas of the same experts: EDP = world / (pp·ep·etp), which includes
  the TP ranks when etp = 1).

**Buckets.** Parameters are walked in reverse registration order (about the order the backward
pass finishes them) and packed, per group, into flat fp32 buckets of at most ``bucket_mb``. Each
bucket is padded to a multiple of n. Buckets are launched in a fixed order (sorted by when their
last parameter is expected to be ready), the same on every rank, so collectives never cross.
On CUDA (``overlap=True``) a post-accumulate-grad hook copies each gradient of the last
micro-batch into its bucket and launches the bucket's collective asynchronously as soon as it
and every earlier bucket are complete, overlapping the rest of the backward pass; elsewhere the
buckets are reduced after the backward pass.

**Main gradients** (``main_grads=True``, bf16 parameters, ``train.param_dtype``; Megatron's
``main_grad``): the buckets are the fp32 gradient accumulators. The hook runs for *every*
micro-batch: it adds the parameter's bf16 ``p.grad`` into its bucket range (a copy for the first
micro-batch of the step) and frees ``p.grad``, so the micro-batches are summed in fp32 and no
bf16 gradient outlives its backward. The last micro-batch launches the buckets as above. The
reduced fp32 buckets are what clipping and the optimizer read; ``p.grad`` stays ``None``. Also in
a single process (groups of one: nothing to reduce), so one process and every layout accumulate
alike.

**ZeRO-1** (``zero1=True``): a bucket is reduce-scattered instead of all-reduced; rank i keeps
the summed gradient of its shard ``[i·s, (i+1)·s)`` only, holds the fp32 master copy and the AdamW
moments of that shard, steps it, and all-gathers the updated shard into the parameters.
Expert buckets are sharded over EDP, the rest over DP (or TP×DP for replicated weights).
With main gradients and no ZeRO-1 the same optimizer (:class:`ZeroAdamW`) steps whole buckets:
every rank holds the fp32 master of every parameter it has, and writes it into the bf16
parameters (rounded) after each step without a collective.

**Clipping.** Every bucket is partitioned into the n owned shards of its group, and the groups
of one kind partition the world, so the sum over the world of each rank's owned sum of squares
counts every parameter element exactly once (whether or not ZeRO is on): one all-reduce of a
scalar over the world gives the global norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from mmtrain.parallel.tensor import all_gather_dim0

__all__ = ["ParamInfo", "Bucket", "GradSync", "ZeroAdamW", "clip_grad_norm"]


@dataclass
class ParamInfo:
    """One (local) parameter and how it relates to the full logical tensor."""

    name: str  # FQN, identical to the plain model's
    param: nn.Parameter
    group: str  # reduction group: "dp" | "tp_dp" | "edp"
    full_shape: tuple
    tp_dim: Optional[int] = None  # dim split over TP (contiguous, rank order); None: not split
    decay: bool = True


@dataclass
class Bucket:
    infos: list
    group_name: str
    group: object  # ProcessGroup or None (single process)
    n: int
    index: int  # this rank's index in the group
    offsets: list  # start of each param in the flat buffer
    numel: int
    padded: int
    order_key: int = 0
    grad: Optional[torch.Tensor] = None  # [padded] fp32
    shard_grad: Optional[torch.Tensor] = None  # [s] (ZeRO) reduced gradient of the owned shard
    handle: object = None
    ready_count: int = 0
    launched: bool = False
    members: dict = field(default_factory=dict)

    @property
    def shard(self) -> int:
        return self.padded // self.n

    @property
    def owned(self) -> slice:
        return slice(self.index * self.shard, (self.index + 1) * self.shard)

    def views(self, flat: torch.Tensor):
        for info, off in zip(self.infos, self.offsets):
            yield info, flat[off:off + info.param.numel()].view_as(info.param)


def build_buckets(infos: list, groups: dict, bucket_mb: float, device) -> list:
    """Pack ``infos`` into buckets (see the module docstring); ``groups`` maps a group name to
    its ProcessGroup (None: single process)."""
    cap = max(int(bucket_mb * 2 ** 20 / 4), 1)
    open_: dict[str, list] = {}
    closed: list[tuple[int, str, list]] = []
    walk = list(reversed(infos))
    for pos, info in enumerate(walk):
        cur = open_.setdefault(info.group, [])
        cur.append((pos, info))
        if sum(i.param.numel() for _, i in cur) >= cap:
            closed.append((pos, info.group, cur))
            open_[info.group] = []
    for name, cur in open_.items():
        if cur:
            closed.append((cur[-1][0], name, cur))
    closed.sort(key=lambda c: c[0])
    buckets = []
    for last_pos, name, members in closed:
        group = groups.get(name)
        n = dist.get_world_size(group) if group is not None else 1
        idx = dist.get_rank(group) if group is not None else 0
        offsets, total = [], 0
        for _, info in members:
            offsets.append(total)
            total += info.param.numel()
        padded = int(math.ceil(total / n) * n)
        b = Bucket([i for _, i in members], name, group, n, idx, offsets, total, padded, last_pos)
        b.grad = torch.zeros(padded, dtype=torch.float32, device=device)
        buckets.append(b)
    return buckets


class GradSync:
    """Reduces the gradients of the last micro-batch of a step, bucket by bucket (with
    ``main_grads``: accumulates every micro-batch's gradient in the fp32 buckets, then reduces
    them; see the module docstring)."""

    def __init__(self, infos: list, groups: dict, bucket_mb: float, zero1: bool,
                 overlap: bool, device, main_grads: bool = False):
        self.infos = infos
        self.zero1 = zero1
        self.overlap = overlap
        self.main_grads = main_grads
        self._seen: set = set()  # main_grads: ids of the params already in their bucket this step
        self.buckets = build_buckets(infos, groups, bucket_mb, device)
        self._bucket_of = {}
        for b in self.buckets:
            for info, off in zip(b.infos, b.offsets):
                self._bucket_of[info.param] = (b, off)
        self._last = False
        self._next = 0
        self.launched_in_backward = 0  # buckets of the last step launched by hooks (overlap)
        self._hooks = []
        if overlap or main_grads:
            for info in infos:
                self._hooks.append(info.param.register_post_accumulate_grad_hook(self._on_grad))

    # ----------------------------------------------------------------------- step protocol
    def prepare_backward(self, last_micro_batch: bool) -> None:
        """Call before each backward; ``True`` for the last micro-batch of the step."""
        self._last = last_micro_batch
        if last_micro_batch:
            self._next = 0
            self.launched_in_backward = 0
            for b in self.buckets:
                b.ready_count, b.launched, b.handle = 0, False, None

    def _on_grad(self, p: torch.Tensor) -> None:
        if self.main_grads:
            self._accumulate(p)
        if not self._last:
            return
        b, off = self._bucket_of[p]
        if not self.main_grads:
            b.grad[off:off + p.numel()].copy_(p.grad.reshape(-1))
        b.ready_count += 1
        if self.overlap:
            self._launch_ready()

    def _accumulate(self, p: torch.Tensor) -> None:
        """Main gradients: this micro-batch's ``p.grad`` into the fp32 bucket, then freed."""
        b, off = self._bucket_of[p]
        view = b.grad[off:off + p.numel()]
        if id(p) in self._seen:
            view.add_(p.grad.reshape(-1))  # fp32 += bf16, summed in fp32
        else:  # first micro-batch of the step: overwrite last step's reduced values
            view.copy_(p.grad.reshape(-1))
            self._seen.add(id(p))
        p.grad = None

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
            if b.ready_count < len(b.infos):
                return
            self._launch(b, async_op=True)
            self._next += 1
            self.launched_in_backward += 1

    def _launch(self, b: Bucket, async_op: bool) -> None:
        b.launched = True
        if b.n == 1:
            if self.zero1:
                b.shard_grad = b.grad
            return
        if self.zero1:
            b.shard_grad = torch.empty(b.shard, dtype=b.grad.dtype, device=b.grad.device)
            fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            b.handle = fn(b.shard_grad, b.grad, group=b.group, async_op=async_op)
        else:
            b.handle = dist.all_reduce(b.grad, group=b.group, async_op=async_op)

    def finish(self) -> None:
        """Complete every bucket's reduction; afterwards ``p.grad`` holds the reduced gradient
        (plain) or each bucket's ``shard_grad`` holds the owned shard's (ZeRO)."""
        for b in self.buckets:
            if b.launched:
                continue
            # Not launched by hooks (no overlap, or a parameter got no gradient): fill and launch.
            for info, view in b.views(b.grad):
                if self.main_grads:  # accumulated by the hooks; a parameter without any: zero
                    if id(info.param) not in self._seen:
                        view.zero_()
                    continue
                g = info.param.grad
                if g is None:
                    view.zero_()
                elif not self.overlap or b.ready_count < len(b.infos):
                    view.copy_(g)
            self._launch(b, async_op=False)
        for b in self.buckets:
            if b.handle is not None:
                b.handle.wait()
                b.handle = None
        self._seen.clear()  # the next step's first micro-batch overwrites the buckets
        if not self.zero1 and not self.main_grads:
            for b in self.buckets:
                for info, view in b.views(b.grad):
                    if info.param.grad is None:
                        info.param.grad = view.clone().to(info.param.dtype)
                    else:
                        info.param.grad.copy_(view)
        self._last = False

    # ----------------------------------------------------------------------------- clipping
    def owned_sq_sum(self) -> torch.Tensor:
        """Σ of squared reduced gradients over the shards this rank owns (fp64 scalar)."""
        total = torch.zeros((), dtype=torch.float64, device=self.buckets[0].grad.device
                            if self.buckets else "cpu")
        for b in self.buckets:
            g = b.shard_grad if self.zero1 else b.grad[b.owned]
            if g.is_cuda:  # no fp64 copy of the gradients: an fp32 norm a bucket, summed in fp64
                total += torch.linalg.vector_norm(g).double().square()
            else:
                total += g.double().pow(2).sum()
        return total

    def scale_(self, coef: torch.Tensor) -> None:
        for b in self.buckets:
            if self.zero1:
                b.shard_grad.mul_(coef.to(b.shard_grad.dtype))
            elif self.main_grads:
                b.grad.mul_(coef.to(b.grad.dtype))
            else:
                for info in b.infos:
                    if info.param.grad is not None:
                        info.param.grad.mul_(coef.to(info.param.grad.dtype))

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def clip_grad_norm(sync: GradSync, max_norm: float, world_group=None) -> torch.Tensor:
    """Global gradient norm (every parameter counted once over the world), clipped as
    ``torch.nn.utils.clip_grad_norm_`` does: ``coef = min(max_norm / (norm + 1e-6), 1)``."""
    sq = sync.owned_sq_sum()
    if dist.is_initialized():
        dist.all_reduce(sq, group=world_group)
    norm = sq.sqrt().to(torch.float32)
    if max_norm > 0 and math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        sync.scale_(coef)
    return norm


class ZeroAdamW:
    """AdamW on fp32 master copies of bucket ranges, the same arithmetic as
    ``torch.optim.AdamW`` (foreach): decoupled weight decay ``p *= 1 - lr·wd`` on matrices only,
    bias-corrected moments.

    Which ranges: with ZeRO-1 (``sync.zero1``) each bucket's owned shard, stepped with the
    reduce-scattered ``shard_grad`` and all-gathered into the parameters afterwards; without it
    (bf16 parameters, ``sync.main_grads``) whole buckets, stepped with the all-reduced fp32
    bucket and written into the parameters locally. Either way the masters are the exact values
    and the parameters their copies in ``param_dtype`` (rounded for bf16): the masters are taken
    from the parameters while these still hold the fp32 initial (or imported) values, and only
    then are the parameters converted, so the rounding happens once, at the copy, and never
    accumulates in the weights (an update below bf16's resolution still moves the master).

    Weight decay: an fp32 mask over the owned shard (ZeRO-1); over whole buckets the runs of
    decayed parameters instead (no mask: 4 bytes a parameter less on every rank).

    On CUDA (or with ``fused=True``) the step is torch's fused AdamW kernel
    (``torch._fused_adamw_``, one multi-tensor launch for the decayed runs of every bucket and one
    for the rest) instead of seven elementwise passes over the masters, and the parameters are
    written back with one multi-tensor copy; under ZeRO-1 with bf16 parameters the shards are
    rounded to bf16 before the all-gather (half the bytes; the same values as rounding after it).

    ``param_groups`` is a one-group list so ``set_lr`` works unchanged."""

    def __init__(self, sync: GradSync, lr: float, betas: tuple, eps: float, weight_decay: float,
                 param_dtype: torch.dtype = torch.float32, fused: Optional[bool] = None):
        if not (sync.zero1 or sync.main_grads):
            raise ValueError("ZeroAdamW needs a GradSync built with zero1=True or "
                             "main_grads=True (bf16 parameters)")
        self.sync = sync
        self.sharded = sync.zero1
        self.param_groups = [{"lr": lr, "betas": betas, "eps": eps,
                              "weight_decay": weight_decay}]
        self.step_count = 0
        self.shards = []  # per bucket: master, exp_avg, exp_avg_sq, runs (+ wd_mask: ZeRO-1)
        for b in sync.buckets:
            flat = torch.zeros(b.padded, dtype=torch.float32, device=b.grad.device)
            for info, view in b.views(flat):
                view.copy_(info.param.detach())
            own = self.region(b)
            n = own.stop - own.start
            st = {"master": flat[own].clone() if self.sharded else flat,
                  "exp_avg": torch.zeros(n, device=flat.device),
                  "exp_avg_sq": torch.zeros(n, device=flat.device)}
            if self.sharded:
                mask = torch.zeros(b.padded, dtype=torch.float32, device=b.grad.device)
                for info, view in b.views(mask):
                    view.fill_(1.0 if info.decay else 0.0)
                st["wd_mask"] = mask[own].clone()
            st["runs"] = self._runs(b, own)  # whole buckets: weight decay by its decayed runs
            self.shards.append(st)
        dev = sync.buckets[0].grad.device if sync.buckets else torch.device("cpu")
        self.fused = dev.type == "cuda" if fused is None else fused
        self.param_dtype = param_dtype
        self._step_t = None  # the fused kernel's step count (a device scalar)
        if param_dtype != torch.float32:
            with torch.no_grad():  # the masters hold the fp32 values now: round the params once
                for info in sync.infos:
                    info.param.data = info.param.data.to(param_dtype)

    @staticmethod
    def _runs(b: Bucket, own: slice) -> dict:
        """{decay: [(lo, hi)]}: the parameters' pieces inside ``own``, relative to its start,
        adjacent pieces of the same kind merged (the fused step's tensor lists)."""
        runs: dict = {True: [], False: []}
        last = None
        for info, off in zip(b.infos, b.offsets):
            lo, hi = max(own.start, off), min(own.stop, off + info.param.numel())
            if lo >= hi:
                continue
            lo, hi = lo - own.start, hi - own.start
            cur = runs[info.decay]
            if last is info.decay and cur and cur[-1][1] == lo:
                cur[-1] = (cur[-1][0], hi)
            else:
                cur.append((lo, hi))
            last = info.decay
        return runs

    def region(self, b: Bucket) -> slice:
        """The range of bucket ``b`` whose master and moments this rank holds."""
        return b.owned if self.sharded else slice(0, b.padded)

    def state_of(self, b: Bucket) -> dict:
        """Master and moments (over :meth:`region`) of bucket ``b``."""
        return self.shards[next(i for i, x in enumerate(self.sync.buckets) if x is b)]

    @torch.no_grad()
    def step(self) -> None:
        g = self.param_groups[0]
        lr, (beta1, beta2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
        self.step_count += 1
        t = self.step_count
        bc1 = 1 - beta1 ** t
        bc2_sqrt = (1 - beta2 ** t) ** 0.5
        step_size = lr / bc1
        if self.fused:
            self._step_fused(lr, beta1, beta2, eps, wd)
            self.gather_params()
            return
        for b, st in zip(self.sync.buckets, self.shards):
            p, m, v = st["master"], st["exp_avg"], st["exp_avg_sq"]
            grad = b.shard_grad if self.sharded else b.grad
            if self.sharded:
                p.mul_(1 - lr * wd * st["wd_mask"])
            elif lr * wd:
                for a, z in st["runs"][True]:
                    p[a:z].mul_(1 - lr * wd)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / bc2_sqrt).add_(eps)
            p.addcdiv_(m, denom, value=-step_size)
        self.gather_params()

    def _step_fused(self, lr, beta1, beta2, eps, wd) -> None:
        if self._step_t is None:
            self._step_t = torch.zeros((), dtype=torch.float32,
                                       device=self.shards[0]["master"].device)
        self._step_t.fill_(float(self.step_count))
        for decay in (True, False):
            ps, gs, ms, vs = [], [], [], []
            for b, st in zip(self.sync.buckets, self.shards):
                grad = b.shard_grad if self.sharded else b.grad
                for lo, hi in st["runs"][decay]:
                    ps.append(st["master"][lo:hi])
                    gs.append(grad[lo:hi])
                    ms.append(st["exp_avg"][lo:hi])
                    vs.append(st["exp_avg_sq"][lo:hi])
            if ps:
                torch._fused_adamw_(ps, gs, ms, vs, [], [self._step_t] * len(ps), lr=lr,
                                    beta1=beta1, beta2=beta2, weight_decay=wd if decay else 0.0,
                                    eps=eps, amsgrad=False, maximize=False)

    @torch.no_grad()
    def gather_params(self) -> None:
        """Write the masters into the model parameters (all-gathering the shards under ZeRO-1;
        rounded to the parameters' dtype)."""
        dst, src = [], []
        for b, st in zip(self.sync.buckets, self.shards):
            gather = self.sharded and b.n > 1
            master = st["master"]
            if gather and self.param_dtype != torch.float32:
                master = master.to(self.param_dtype)  # round, then gather half the bytes
            flat = all_gather_dim0(master, b.group) if gather else master
            for info, view in b.views(flat):
                dst.append(info.param.data)
                src.append(view)
        if self.fused:
            torch._foreach_copy_(dst, src)
        else:
            for d, v in zip(dst, src):
                d.copy_(v)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for info in self.sync.infos:
            info.param.grad = None
        for b in self.sync.buckets:
            b.shard_grad = None
