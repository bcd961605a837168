"""Context parallelism (SPEC §6): CP sharding of packed batches, LASP+ and LASP for the lightning
layers. Varlen Ring Attention for the softmax layers is in :mod:`mmtrain.parallel.ring`.

Legend: C CP size, r this rank's CP index, B rows of the micro-batch, T row length, Tl = T / C
the tokens of one rank per row, H (local) heads, K/V head dims, N local document pieces.

**Sharding** (:meth:`ContextParallel.shard_batch`). Every CP rank of a DP replica reads the same
micro-batch; rank r keeps the contiguous piece ``[r·Tl, (r+1)·Tl)`` of every row, so its local
packed stream is ``B·Tl`` tokens (row b's piece at ``[b·Tl, (b+1)·Tl)``). The local
``cu_seqlens`` are the global document boundaries clipped to the pieces (a piece edge is always a
local boundary); ``position_ids`` are sliced, so a document that began on an earlier rank keeps
its true positions; labels and the loss mask are sliced alike. The :class:`CPPlan` of the
micro-batch (host-side, computed from the global batch every rank holds, so it needs no
communication) rides on the local ``cu_seqlens`` tensor; the CP ops read it from there.

For row b the plan records whether rank r's first local token continues a document that began
on an earlier rank (``cont``), how many local rows precede the first local document start
(``first``), where that document began (``doc_start``, row coordinate) and, for every rank j,
whether rank j's piece contains a document start (``has_start[j][b]``).

**LASP+** (:class:`_LaspPlus`, SPEC §6). Forward: (1) KV_r[b], the local state of the last
piece of row b from a zero start (``Σ_j λ^(L-1-j) k_jᵀ v_j``, a GEMM over that piece's rows);
(2) one all-gather of the fp32 states ``[C, B, H, K, V]`` (size independent of the sequence
length); (3) ``KV_in(r)[b] = Σ_{s ≤ j < r} λ^((r-1-j)·Tl) KV_j[b]`` with s the nearest earlier
rank whose piece of row b contains a document start (included; the chain resets there); (4) the
local output with the correction ``diag(λ^(i+1)) Q KV_in`` on the rows before the first local
document start only. Step 4 is *fused*: the local op runs once with ``KV_in`` as the initial
state of the piece's first segment (zero elsewhere), which is exactly the zero-state output plus
that correction (the op is linear in its initial state) — computed in the kernel's inter-block
product instead of extra passes over q and o. The price is step 1 as a separate GEMM before the
op (a separate pass over the last piece's k and v) and that the tiny all-gather no longer
overlaps the local op. Backward, mirrored: ``dKV_in(r)[b] = Σ_{i<first} λ^(i+1) q_iᵀ dO_i`` (a
GEMM over the corrected rows), one all-gather of those, the decayed suffix
``dKV_r[b] = Σ_{r' > r, no start in ranks r+1..r'-1} λ^((r'-1-r)·Tl) dKV_in(r')[b]`` fed to the
local backward as the gradient of its final state (it gives dk, dv of KV_r), while the initial
state gives dq its ``λ^(i+1) KV_in dO_i`` term inside the kernel. Autograd never runs through a
collective.

**LASP** (:class:`_Lasp`, the baseline): rank r receives the true state at the end of rank r-1's
pieces, runs the local op with it as the initial state of its first piece of every row that
continues a document, and sends its own final states on; the backward sends the gradient of the
initial state back the same way. Serial in C both ways.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from mmtrain.data.batch import Batch

__all__ = ["CPPlan", "make_plan", "shard_batch", "ContextParallel", "ContextLightningOp",
           "LIGHTNING_MODES", "layout_summary"]

LIGHTNING_MODES = ("laspplus", "lasp")


def layout_summary(pcfg, seq_len: int, dp=None) -> str:
    """One line: the dense layout and, under CP, how rows are split and which algorithms run."""
    d = pcfg.dp if dp is None else dp
    line = (f"layout dp{d if d != -1 else '(derived)'} × cp{pcfg.cp} × tp{pcfg.tp}"
            f"{' (sp)' if pcfg.tp > 1 else ''}{', zero1' if pcfg.zero1 else ''}")
    if pcfg.cp > 1:
        name = {"laspplus": "LASP+", "lasp": "LASP"}.get(pcfg.cp_lightning, pcfg.cp_lightning)
        line += (f"; context parallel: each of {pcfg.cp} ranks holds {seq_len // pcfg.cp} "
                 f"contiguous tokens of every {seq_len}-token row; lightning {name}, softmax "
                 f"varlen ring attention")
    return line


# ----------------------------------------------------------------------------------- the plan
@dataclass
class CPPlan:
    """What the CP ops of rank ``rank`` need to know about one micro-batch (host-side)."""

    cp: int
    rank: int
    rows: int  # B
    Tl: int  # tokens per rank per row
    cu: list  # local cu_seqlens (ints, over B·Tl)
    cont: list  # [B] bool: the first local token continues a document from an earlier rank
    first: list  # [B] local rows before the first document start in the piece (Tl if none)
    doc_start: list  # [B] row coordinate where the document of the first local token began
    has_start: list  # [C][B] bool: rank j's piece of row b contains a document start
    first_seg: list  # [B] index (in the local segments) of the piece's first segment
    last_seg: list  # [B] index of the piece's last segment
    ring_hops: int  # hops of K/V around the ring the batch needs (same on every rank)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def tokens(self) -> int:
        return self.rows * self.Tl

    def chain_mask(self) -> np.ndarray:
        """[C (receiver r), C (sender j), B] bool: KV_j is in KV_in(r) for row b."""
        C, B = self.cp, self.rows
        m = np.zeros((C, C, B), dtype=bool)
        for b in range(B):
            for r in range(1, C):
                for j in range(r - 1, -1, -1):
                    m[r, j, b] = True
                    if self.has_start[j][b]:
                        break
        return m


def _piece_info(starts: np.ndarray, b: int, T: int, Tl: int, j: int):
    """Sorted local starts (0..Tl-1) of rank j's piece of row b, and the doc start (row coords)
    of its first token."""
    a = b * T + j * Tl
    lo, hi = np.searchsorted(starts, a), np.searchsorted(starts, a + Tl)
    local = (starts[lo:hi] - a).tolist()
    k = np.searchsorted(starts, a, side="right") - 1  # last start <= a
    return local, int(starts[k]) - b * T


def make_plan(cu_seqlens, rows: int, T: int, cp: int, rank: int) -> CPPlan:
    """The :class:`CPPlan` of rank ``rank`` for a global micro-batch of ``rows`` rows of ``T``
    tokens whose document boundaries (over the flattened batch) are ``cu_seqlens``."""
    if T % cp:
        raise ValueError(f"row length {T} does not split over cp={cp}")
    Tl = T // cp
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    starts = np.unique(cu[:-1])
    if not len(starts) or starts[0] != 0 or cu[-1] != rows * T:
        raise ValueError(f"cu_seqlens must run from 0 to rows·T = {rows * T}")
    if any((b * T) not in set(starts.tolist()) for b in range(rows)):
        raise ValueError("every row must start a document (row edges are sequence boundaries)")
    has_start = [[False] * rows for _ in range(cp)]
    hops = 0
    mine = None
    for j in range(cp):
        for b in range(rows):
            local, ds = _piece_info(starts, b, T, Tl, j)
            has_start[j][b] = bool(local)
            if not local or local[0] != 0:  # continues: needs chunks ds//Tl .. j-1
                hops = max(hops, j - ds // Tl)
        if j == rank:
            mine = [_piece_info(starts, b, T, Tl, rank) for b in range(rows)]
    lcu, first_seg, last_seg, cont, first, doc_start = [], [], [], [], [], []
    for b, (local, ds) in enumerate(mine):
        first_seg.append(len(lcu))
        edges = sorted(set([0] + local))
        lcu.extend(b * Tl + e for e in edges)
        last_seg.append(len(lcu) - 1)
        cont.append(not local or local[0] != 0)
        first.append(local[0] if local else Tl)
        doc_start.append(ds)
    lcu.append(rows * Tl)
    return CPPlan(cp, rank, rows, Tl, lcu, cont, first, doc_start, has_start, first_seg,
                  last_seg, hops)


def shard_batch(batch: Batch, cp: int, rank: int) -> Batch:
    """Rank ``rank``'s contiguous piece of every row of ``batch`` (host tensors), with its
    :class:`CPPlan` attached to the local ``cu_seqlens`` (attribute ``cp_plan``)."""
    B, T = batch.tokens.shape
    plan = make_plan(batch.cu_seqlens.tolist(), B, T, cp, rank)
    sl = slice(rank * plan.Tl, (rank + 1) * plan.Tl)
    cu = torch.tensor(plan.cu, dtype=torch.int32)
    out = Batch(batch.tokens[:, sl].contiguous(), batch.labels[:, sl].contiguous(),
                batch.loss_mask[:, sl].contiguous(), cu, batch.position_ids[:, sl].contiguous())
    cu.cp_plan = plan
    return out


def plan_of(cu_seqlens) -> CPPlan:
    plan = getattr(cu_seqlens, "cp_plan", None)
    if plan is None:
        raise RuntimeError("context parallelism: these cu_seqlens carry no CP plan; shard the "
                           "batch with Parallel.shard_batch (mmtrain.parallel.context) before "
                           "calling the model")
    return plan


# ------------------------------------------------------------------------------------- runtime
class ContextParallel:
    """This rank's CP group: sharding, and the collectives the CP ops use."""

    def __init__(self, group, cp: int, rank: int, lightning: str = "laspplus"):
        if lightning not in LIGHTNING_MODES:
            raise ValueError(f"lightning must be one of {LIGHTNING_MODES}, got {lightning!r}")
        self.group, self.cp, self.rank, self.lightning = group, cp, rank, lightning
        self.ranks = ([dist.get_global_rank(group, i) for i in range(cp)]
                      if group is not None and cp > 1 else [0])

    def shard_batch(self, batch: Batch, device) -> Batch:
        """The local piece on ``device``; the plan stays attached to the device cu_seqlens."""
        local = shard_batch(batch, self.cp, self.rank)
        plan = local.cu_seqlens.cp_plan
        out = local.to(device)
        out.cu_seqlens.cp_plan = plan
        return out

    # collectives (fp32 states; NCCL needs device tensors, which these are)
    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        from mmtrain.parallel.tensor import all_gather_dim0

        return all_gather_dim0(x.contiguous()[None], self.group)

    def send(self, x: torch.Tensor, to: int):
        return dist.isend(x.contiguous(), self.ranks[to], group=self.group)

    def recv(self, like: torch.Tensor, frm: int) -> torch.Tensor:
        buf = torch.empty_like(like)
        dist.recv(buf, self.ranks[frm], group=self.group)
        return buf


# --------------------------------------------------------------------------------- the decays
def _state_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _chain_coef(plan: CPPlan, slopes, dtype, device, transpose: bool):
    """[C, B, H]: forward (``transpose=False``) the weights of every rank's KV_j in this rank's
    KV_in; backward the weights of every rank's dKV_in(r') in this rank's dKV."""
    key = ("coef", transpose, str(device), dtype)
    if key not in plan._cache:
        m = plan.chain_mask()  # [r, j, b]
        C, r = plan.cp, plan.rank
        if not transpose:  # over senders j: exponent (r-1-j)·Tl
            mask = m[r]  # [j, b]
            expo = np.array([(r - 1 - j) * plan.Tl for j in range(C)], dtype=np.float64)
        else:  # over receivers r': exponent (r'-1-r)·Tl
            mask = m[:, r]  # [r', b]
            expo = np.array([(rp - 1 - r) * plan.Tl for rp in range(C)], dtype=np.float64)
        expo = np.where(mask, np.maximum(expo, 0.0)[:, None], 0.0)
        s = slopes.to(device=device, dtype=dtype)
        coef = torch.exp(-s[None, None, :] * torch.tensor(expo, dtype=dtype, device=device)[..., None])
        coef = coef * torch.tensor(mask, device=device, dtype=dtype)[..., None]
        plan._cache[key] = coef
    return plan._cache[key]


def combine_states(plan: CPPlan, states_all: torch.Tensor, slopes, transpose: bool):
    """The states every local piece receives from the all-gathered ``states_all``
    [C, B, H, K, V]: forward (``transpose=False``) ``KV_in`` of each local piece from every rank's
    last-piece state ``KV_j``; backward the gradient ``dKV`` of each local last-piece state from
    every rank's ``dKV_in``. -> [B, H, K, V] in ``states_all``'s dtype."""
    coef = _chain_coef(plan, slopes, states_all.dtype, states_all.device, transpose)  # [C, B, H]
    return (coef[..., None, None] * states_all).sum(0)


_CHUNK = 32768  # rows per state GEMM (bounds the temporaries)


def _pieces(a: int, n: int):
    for c in range(0, n, _CHUNK):
        yield a + c, c, min(_CHUNK, n - c)


def _decayed_gram(x, y, slopes, a: int, n: int, sd, reverse: bool):
    """``Σ_{i<n} w_i x[a+i]ᵀ y[a+i]`` -> [H, K, V] in ``sd``, per head, with ``w_i = λ^(n-1-i)``
    (``reverse=False``: the state of rows [a, a+n) from zero) or ``λ^(i+1)`` (``reverse=True``:
    the gradient of the state entering those rows). Half inputs multiply in their own dtype
    with fp32 accumulation — the kernel's arithmetic — and each chunk's sum is added in fp32."""
    out = None
    lowp = x.dtype in (torch.bfloat16, torch.float16)
    for st, c, m in _pieces(a, n):
        i = torch.arange(c, c + m, device=x.device, dtype=sd)
        e = (i + 1) if reverse else (n - 1 - i)
        w = torch.exp(-slopes.to(device=x.device, dtype=sd)[:, None] * e[None, :])[..., None]
        xs = x[st:st + m].transpose(0, 1)  # [H, m, K]
        xw = xs * w.to(x.dtype) if lowp else xs.to(sd) * w
        ys = y[st:st + m].transpose(0, 1)
        part = torch.matmul(xw.transpose(1, 2), ys if lowp else ys.to(sd)).to(sd)
        out = part if out is None else out + part
    return out


def _corrected_rows(plan: CPPlan):
    return [(b, b * plan.Tl, plan.first[b]) for b in range(plan.rows)
            if plan.cont[b] and plan.first[b] > 0]


# ---------------------------------------------------------------------------------------- LASP+
class _LaspPlus(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, slopes, cu, local, cpx, plan):
        sd = _state_dtype(q)
        B, H, K, V = plan.rows, q.shape[2], q.shape[3], v.shape[3]
        kv = torch.zeros(B, H, K, V, dtype=sd, device=q.device)  # KV_r: last pieces, from zero
        for b in range(B):
            a0 = plan.cu[plan.last_seg[b]]
            kv[b] = _decayed_gram(k[0], v[0], slopes, a0, plan.cu[plan.last_seg[b] + 1] - a0, sd,
                                  reverse=False)
        kv_in = combine_states(plan, cpx.all_gather(kv), slopes, transpose=False)  # [B,H,K,V]
        rows = _corrected_rows(plan)
        init = None
        if rows:  # the correction diag(λ^(i+1)) Q KV_in, fused: KV_in as the initial state
            init = torch.zeros(len(plan.cu) - 1, H, K, V, dtype=sd, device=q.device)
            for b, _, _ in rows:
                init[plan.first_seg[b]] = kv_in[b]
        with torch.enable_grad():
            q_, k_, v_ = (x.detach().requires_grad_() for x in (q, k, v))
            o, finals = local(q_, k_, v_, slopes, cu, init, True)
        ctx.graph = (q_, k_, v_, o, finals)
        ctx.slopes, ctx.cpx, ctx.plan, ctx.sd = slopes, cpx, plan, sd
        return o.detach()

    @staticmethod
    def backward(ctx, do):
        q_, k_, v_, o, finals = ctx.graph
        plan, slopes, cpx, sd = ctx.plan, ctx.slopes, ctx.cpx, ctx.sd
        B, H, K, V = plan.rows, q_.shape[2], q_.shape[3], v_.shape[3]
        dkv_in = torch.zeros(B, H, K, V, dtype=sd, device=do.device)
        for b, a, n in _corrected_rows(plan):
            dkv_in[b] = _decayed_gram(q_.detach()[0], do[0], slopes, a, n, sd, reverse=True)
        dkv = combine_states(plan, cpx.all_gather(dkv_in), slopes, transpose=True)  # dKV_r
        dfinal = torch.zeros_like(finals)
        dfinal[plan.last_seg] = dkv.to(dfinal.dtype)
        # The local backward: dq includes λ^(i+1) KV_in dO (the initial state), dk and dv the
        # gradient of KV_r (the final state's dependence on k, v does not involve KV_in).
        dq, dk, dv = torch.autograd.grad((o, finals), (q_, k_, v_), (do, dfinal))
        ctx.graph = None
        return dq, dk, dv, None, None, None, None, None


# ------------------------------------------------------------------------- LASP+, in the kernel
#: The fused LASP+ path (below) is used wherever the local op is the Triton kernel; ``0`` forces
#: the generic one (for measuring the two side by side).
FUSED = os.environ.get("MMTRAIN_LASP_FUSED", "1") != "0"


def _fusable(local, q) -> bool:
    from mmtrain.kernels.lightning import triton_scan as ts
    from mmtrain.model.ops import LightningOp

    return (FUSED and isinstance(local, LightningOp) and q.dtype != torch.float64
            and ts.HAVE_TRITON and (q.is_cuda or ts.interpreting()))


def _seq_state(s_loc, P, n: int, s, reverse: bool):
    """The state of sequence ``n`` of kernel plan ``P`` from a zero start, from its items' local
    states ``s_loc`` [I, H, K, V]: decayed to the sequence's end (``reverse``: to its start)."""
    a, b = P.host_seq_items[n], P.host_seq_items[n + 1]
    if b == a:
        return s_loc.new_zeros(s_loc.shape[1:])
    if reverse:
        e = [P.host_bos[i] - P.host_bos[a] for i in range(a, b)]
    else:
        e = [P.host_eos[b - 1] - P.host_eos[i] for i in range(a, b)]
    w = torch.exp(-torch.tensor(e, dtype=torch.float32, device=s_loc.device)[:, None] * s[None])
    return (w[:, :, None, None] * s_loc[a:b]).sum(0)


class _LaspPlusFused(torch.autograd.Function):
    """LASP+ with the state GEMMs inside the Triton kernel's own passes.

    Forward: the kernel's state pass (two-pass plan) already computes every item's local state;
    the hook between its state pass and its chain sums the last piece's items into ``KV_r``,
    all-gathers, forms ``KV_in`` (:func:`combine_states`) and hands it to the chain as the initial
    state of the piece's first segment — the same arithmetic as :class:`_LaspPlus` without its
    separate pass over k and v. Backward: dq is the usual forward scan with ``KV_in``ᵀ as its
    initial state; the dv scan's state pass (over q and dO) gives ``dKV_in`` of the corrected
    rows (the reverse state of the first segment, times λ), the hook all-gathers it and feeds the
    decayed suffix ``dKV_r`` (÷ λ) to the chain; the dk scan takes its transpose."""

    @staticmethod
    def forward(ctx, q, k, v, slopes, cu, cpx, plan):
        from mmtrain.kernels.lightning import triton_scan as ts
        from mmtrain.kernels.lightning.autograd import _flat_bounds

        _, T, H, K = q.shape
        V = v.shape[-1]
        q_, k_, v_ = (x.contiguous().view(T, H, x.shape[-1]) for x in (q, k, v))
        s = slopes.detach().to(device=q.device, dtype=torch.float32)
        bounds = _flat_bounds(q, cu)
        rows = _corrected_rows(plan)
        held = {}

        def hook(s_loc, P):
            kv = torch.stack([_seq_state(s_loc, P, plan.last_seg[b], s, False)
                              for b in range(plan.rows)])
            kv_in = combine_states(plan, cpx.all_gather(kv), s, transpose=False)
            init = s_loc.new_zeros(P.n_seq, H, K, V)
            for b, _, _ in rows:
                init[plan.first_seg[b]] = kv_in[b]
            held["init"] = init
            return init

        nv = -(-V // int(ts._cfg(K, V, q.dtype, q.device)["BV"]))
        P = ts.get_plan(bounds, ts.choose_seg_len(bounds, H, nv, q.device), q.device, True)
        o, _, items_in = ts.scan_attention(q_, k_, v_, s, P, state_hook=hook, keep_items_in=True)
        ctx.save_for_backward(q_, k_, v_, held["init"])
        ctx.P, ctx.items_in = P, items_in  # dq's item states, transposed
        ctx.bounds, ctx.s, ctx.cpx, ctx.plan, ctx.shape = bounds, s, cpx, plan, (T, H, K, V)
        return o.view(1, T, H, V)

    @staticmethod
    def backward(ctx, do):
        from mmtrain.kernels.lightning import triton_scan as ts

        q_, k_, v_, init = ctx.saved_tensors
        T, H, K, V = ctx.shape
        plan, cpx, s, bounds, dev = ctx.plan, ctx.cpx, ctx.s, ctx.bounds, q_.device
        do_ = do.contiguous().view(T, H, V)

        def plan_for(d_out, d_state, two_pass=False):
            nv = -(-d_out // int(ts._cfg(d_state, d_out, q_.dtype, dev)["BV"]))
            return ts.get_plan(bounds, ts.choose_seg_len(bounds, H, nv, dev), dev, two_pass)

        P_q = plan_for(K, V, True)
        if P_q is ctx.P:
            dq, _ = ts.scan_attention(do_, v_, k_, s, P_q, out_dtype=q_.dtype,
                                      items_in=ctx.items_in.transpose(-1, -2))
        else:
            dq, _ = ts.scan_attention(do_, v_, k_, s, P_q, init.transpose(-1, -2),
                                      out_dtype=q_.dtype)
        ctx.items_in = None
        rows = _corrected_rows(plan)
        held = {}

        def hook(s_loc, P):  # s_loc: reverse local states of (q, dO)
            lam = torch.exp(-s)[:, None, None]
            din = s_loc.new_zeros(plan.rows, H, K, V)
            for b, _, _ in rows:
                din[b] = lam * _seq_state(s_loc, P, plan.first_seg[b], s, True)
            dkv = combine_states(plan, cpx.all_gather(din), s, transpose=True)
            Y = s_loc.new_zeros(P.n_seq, H, K, V)
            for b in range(plan.rows):
                Y[plan.last_seg[b]] = dkv[b] / lam
            held["Y"] = Y
            return Y

        P_v = plan_for(V, K, True)
        dv, _, items_v = ts.scan_attention(k_, q_, do_, s, P_v, reverse=True, out_dtype=v_.dtype,
                                           state_hook=hook, keep_items_in=True)
        P_k = plan_for(K, V, True)
        if P_k is P_v:  # the dv scan's item states, transposed
            dk, _ = ts.scan_attention(v_, do_, q_, s, P_k, reverse=True, out_dtype=k_.dtype,
                                      items_in=items_v.transpose(-1, -2))
        else:
            dk, _ = ts.scan_attention(v_, do_, q_, s, P_k, held["Y"].transpose(-1, -2),
                                      reverse=True, out_dtype=k_.dtype)
        return (dq.view(1, T, H, K), dk.view(1, T, H, K), dv.view(1, T, H, V), None, None, None,
                None)


# ----------------------------------------------------------------------------------------- LASP
class _Lasp(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, slopes, cu, local, cpx, plan):
        sd = _state_dtype(q)
        H, K, V = q.shape[2], q.shape[3], v.shape[3]
        B, r, C = plan.rows, plan.rank, plan.cp
        N = len(plan.cu) - 1
        init = torch.zeros(N, H, K, V, dtype=sd, device=q.device)
        if r > 0:
            kv_in = cpx.recv(init[:B], r - 1)
            for b in range(B):
                if plan.cont[b]:
                    init[plan.first_seg[b]] = kv_in[b]
        with torch.enable_grad():
            q_, k_, v_, init_ = (x.detach().requires_grad_() for x in (q, k, v, init))
            o, finals = local(q_, k_, v_, slopes, cu, init_, True)
        if r < C - 1:
            cpx.send(finals.detach()[plan.last_seg].to(sd), r + 1).wait()
        ctx.graph = (q_, k_, v_, init_, o, finals)
        ctx.cpx, ctx.plan = cpx, plan
        return o.detach()

    @staticmethod
    def backward(ctx, do):
        q_, k_, v_, init_, o, finals = ctx.graph
        plan, cpx = ctx.plan, ctx.cpx
        B, r, C = plan.rows, plan.rank, plan.cp
        dfinal = torch.zeros_like(finals)
        if r < C - 1:
            d = cpx.recv(finals.detach()[plan.last_seg], r + 1)
            dfinal[plan.last_seg] = d
        dq, dk, dv, dinit = torch.autograd.grad((o, finals), (q_, k_, v_, init_), (do, dfinal))
        if r > 0:
            out = torch.zeros_like(dinit[:B])
            for b in range(B):
                if plan.cont[b]:
                    out[b] = dinit[plan.first_seg[b]]
            cpx.send(out, r - 1).wait()
        ctx.graph = None
        return dq, dk, dv, None, None, None, None, None


class ContextLightningOp:
    """The lightning seam under CP: LASP+ (default) or LASP around the local op."""

    def __init__(self, local, cpx: ContextParallel, mode: str = "laspplus"):
        if mode not in LIGHTNING_MODES:
            raise ValueError(f"cp_lightning must be one of {LIGHTNING_MODES}, got {mode!r}")
        self.local, self.cpx, self.mode = local, cpx, mode

    def __call__(self, q, k, v, slopes, cu_seqlens=None, initial_state=None,
                 output_final_state=False):
        if initial_state is not None or output_final_state:
            raise NotImplementedError("the CP lightning op owns the states (no initial_state / "
                                      "final_state through it)")
        plan = plan_of(cu_seqlens)
        if self.mode == "laspplus" and _fusable(self.local, q):
            return _LaspPlusFused.apply(q, k, v, slopes, cu_seqlens, self.cpx, plan), None
        fn = _LaspPlus if self.mode == "laspplus" else _Lasp
        return fn.apply(q, k, v, slopes, cu_seqlens, self.local, self.cpx, plan), None
