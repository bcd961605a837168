"""Context parallelism (SPEC §6): CP sharding of packed batches, LASP+ and LASP for the lightning
layers. Varlen Ring Attention for the softmax layers is in :mod:`mmtrain.parallel.ring`.

Legend: C CP size, r this rank's CP index, B rows of the micro-batch, T row length, V virtual
pieces a row, Tl = T / V the tokens of one piece, m = V / C pieces a rank holds of each row, H
(local) heads, K/V head dims, N local document segments.

**Partition** (``parallel.cp_balance``). Every row is cut into V equal *virtual pieces* v =
0..V-1 in sequence order. ``contiguous``: V = C, rank r holds piece r (``[r·Tl, (r+1)·Tl)``).
``zigzag`` (the default): V = 2C, rank r holds pieces r and 2C-1-r, so causal attention costs
every rank the same for a document spanning the row (see :mod:`mmtrain.parallel.ring`); T must
divide by 2C. With ``parallel.cp_zigzag_rounds`` = R > 1 the row is R consecutive stretches of 2C
pieces (V = 2CR), each split zigzag (rank r: pieces 2C·i + r and 2C·i + 2C-1-r): packed
documents shorter than the row then spread over the ranks too (T must divide by 2CR). Both layer
kinds see this one partition of the hidden states.

**Sharding** (:meth:`ContextParallel.shard_batch`). Every CP rank of a DP replica reads the same
micro-batch; rank r's local packed stream is its pieces in order (row 0's pieces, then row 1's
…), each a local row of Tl tokens (the local batch is ``[B·m, Tl]``; local piece ``i = b·m + s``
is slot s of row b). The local ``cu_seqlens`` are the global document boundaries clipped to the
pieces (a piece edge is always a local boundary); ``position_ids`` are sliced, so a document
that began in an earlier piece keeps its true positions; labels and the loss mask are sliced
alike. The :class:`CPPlan` of the micro-batch (host-side, computed from the global batch every
rank holds, so it needs no communication) rides on the local ``cu_seqlens`` tensor; the CP ops
read it from there.

For each local piece the plan records its virtual piece (``virt``), whether its first token
continues a document that began in an earlier piece (``cont``), how many of its rows precede
its first document start (``first``), where that document began (``doc_start``, row
coordinate) and, for every virtual piece v of every global row b, whether it contains a
document start (``has_start[v][b]``).

**LASP+** (:class:`_LaspPlus`, SPEC §6, with ranks read as virtual pieces). Forward: (1) KV_i,
the local state of the last segment of every local piece i from a zero start
(``Σ_j λ^(L-1-j) k_jᵀ v_j``, a GEMM over that segment's rows); (2) one all-gather of the fp32
states ``[C, B·m, H, K, V]`` (size independent of the sequence length); (3)
:func:`combine_states`: for local piece u of row b, ``KV_in(u) = Σ_{s ≤ w < u} λ^((u-1-w)·Tl)
KV_w`` over the virtual pieces w before u, with s the nearest earlier piece containing a
document start (included; the chain resets there) — under zigzag the sum mixes sender rank,
sender slot and receiver slot; (4) the local output with the correction ``diag(λ^(i+1)) Q
KV_in`` on the rows before the piece's first document start only. Step 4 is *fused*: the local
op runs once with ``KV_in`` as the initial state of the piece's first segment (zero elsewhere),
which is exactly the zero-state output plus that correction (the op is linear in its initial
state) — computed in the kernel's inter-block product instead of extra passes over q and o. The
price is step 1 as a separate GEMM before the op (a separate pass over the last segments' k and
v) and that the tiny all-gather no longer overlaps the local op. Backward, mirrored:
``dKV_in(u) = Σ_{i<first} λ^(i+1) q_iᵀ dO_i`` (a GEMM over the corrected rows), one all-gather
of those, the transposed combination ``dKV_w = Σ_{u > w, w in the chain of u}
λ^((u-1-w)·Tl) dKV_in(u)`` fed to the local backward as the gradient of each piece's final
state (it gives dk, dv of KV_w), while the initial state gives dq its ``λ^(i+1) KV_in dO_i``
term inside the kernel. Autograd never runs through a collective.

On CUDA the same arithmetic runs fused into the Triton kernel's own passes
(:mod:`mmtrain.parallel.lasp_fused`: the states come from the kernel's state pass, no separate
GEMMs); this generic form is the CPU path and the ``MMTRAIN_LASP_FUSED=0`` baseline.

**LASP** (:class:`_Lasp`, the baseline): rank r receives the true state at the end of rank r-1's
pieces, runs the local op with it as the initial state of its first piece of every row that
continues a document, and sends its own final states on; the backward sends the gradient of the
initial state back the same way. Serial in C both ways. Contiguous partition only (under zigzag
the chain would visit every rank twice, 0 → C-1 then C-1 → 0; the config rejects
``cp_lightning=lasp`` with ``cp_balance=zigzag``, naming ``parallel.cp_balance``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from mmtrain.data.batch import Batch

__all__ = ["CPPlan", "make_plan", "shard_batch", "owned_pieces", "combine_states",
           "ContextParallel", "ContextLightningOp", "LIGHTNING_MODES", "CP_BALANCES",
           "layout_summary"]

LIGHTNING_MODES = ("laspplus", "lasp")
CP_BALANCES = ("zigzag", "contiguous")


def layout_summary(pcfg, seq_len: int, dp=None) -> str:
    """One line: the dense layout and, under CP, how rows are split and which algorithms run."""
    d = pcfg.dp if dp is None else dp
    line = (f"layout dp{d if d != -1 else '(derived)'} × cp{pcfg.cp} × tp{pcfg.tp}"
            f"{' (sp)' if pcfg.tp > 1 else ''}{', zero1' if pcfg.zero1 else ''}")
    if pcfg.cp > 1:
        name = {"laspplus": "LASP+", "lasp": "LASP"}.get(pcfg.cp_lightning, pcfg.cp_lightning)
        c = pcfg.cp
        k = getattr(pcfg, "cp_zigzag_rounds", 1) or auto_rounds(c, pcfg.cp_balance, seq_len)
        if getattr(pcfg, "cp_balance", "contiguous") == "zigzag":
            how = (f"zigzag partition: every {seq_len}-token row in {2 * c * k} pieces of "
                   f"{seq_len // (2 * c * k)}, rank r holds pieces r and {2 * c - 1}-r"
                   + (f" of each of {k} rounds" if k > 1 else ""))
        else:
            how = (f"contiguous partition: each of {c} ranks holds {seq_len // c} contiguous "
                   f"tokens of every {seq_len}-token row")
        line += f"; context parallel ({how}); lightning {name}, softmax varlen ring attention"
    return line


# ----------------------------------------------------------------------------------- the plan
def auto_rounds(cp: int, balance: str, row_len: int) -> int:
    """``parallel.cp_zigzag_rounds=0`` (auto): two zigzag rounds where the row divides into
    4·cp pieces, else one; contiguous: one. Two rounds balance packed documents shorter than the
    row (on 2 H200s the ring reached 0.93 of ideal scaling with two rounds, 0.68 with one:
    docs/benchmarks.md)."""
    if balance != "zigzag" or cp <= 1:
        return 1
    return 2 if row_len % (4 * cp) == 0 else 1


def owned_pieces(cp: int, rank: int, balance: str, rounds: int = 1) -> list:
    """The virtual pieces (in sequence order) rank ``rank`` holds of every row: ``[r]``
    (contiguous, C pieces a row) or, zigzag with R rounds (2CR pieces a row), ``2C·i + r`` and
    ``2C·i + 2C-1-r`` for i < R (R = 1: pieces r and 2C-1-r)."""
    if balance == "contiguous":
        if rounds != 1:
            raise ValueError(f"the contiguous partition has one round, got rounds={rounds}")
        return [rank]
    if balance == "zigzag":
        if rounds < 1:
            raise ValueError(f"zigzag rounds must be >= 1, got {rounds}")
        return [v for i in range(rounds) for v in (2 * cp * i + rank, 2 * cp * i + 2 * cp - 1
                                                   - rank)]
    raise ValueError(f"cp_balance must be one of {CP_BALANCES}, got {balance!r}")


@dataclass
class CPPlan:
    """What the CP ops of rank ``rank`` need to know about one micro-batch (host-side).

    Every list indexed by local piece ``i`` (``rows`` of them: ``i = b·m + s`` for global row b
    and slot s, m = 1 contiguous, 2·rounds zigzag) describes one local piece, itself a local row of
    ``Tl`` tokens; ``virt[i]`` is its virtual piece (its place in the row)."""

    cp: int
    rank: int
    rows: int  # local pieces (B·m)
    Tl: int  # tokens per piece
    cu: list  # local cu_seqlens (ints, over rows·Tl; a boundary at every piece edge)
    cont: list  # [rows] bool: the first token continues a document from an earlier piece
    first: list  # [rows] rows before the first document start in the piece (Tl if none)
    doc_start: list  # [rows] row coordinate where the document of the first token began
    has_start: list  # [V][B] bool: virtual piece v of global row b contains a document start
    first_seg: list  # [rows] index (in the local segments) of the piece's first segment
    last_seg: list  # [rows] index of the piece's last segment
    ring_hops: int  # hops of K/V around the ring the batch needs (same on every rank)
    balance: str = "contiguous"  # contiguous | zigzag
    virt: list = field(default_factory=list)  # [rows] virtual piece of each local piece
    rounds: int = 1  # zigzag rounds (2C·rounds pieces a row)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def tokens(self) -> int:
        return self.rows * self.Tl

    @property
    def per_row(self) -> int:
        """m: local pieces of each global row."""
        return 1 if self.balance == "contiguous" else 2 * self.rounds

    @property
    def nvirt(self) -> int:
        """V: virtual pieces of a row (C contiguous, 2C·rounds zigzag)."""
        return self.cp * self.per_row

    def owner(self, v: int):
        """(CP rank, slot) holding virtual piece ``v``."""
        C = self.cp
        if self.balance == "contiguous":
            return v, 0
        i, q = divmod(v, 2 * C)
        return (q, 2 * i) if q < C else (2 * C - 1 - q, 2 * i + 1)

    def chain_mask(self) -> np.ndarray:
        """[V (receiver piece u), V (sender piece w), B] bool: the state of virtual piece w is in
        the incoming state of virtual piece u for global row b (the chain runs back from u-1 to
        the nearest piece with a document start, which it includes)."""
        V, B = self.nvirt, len(self.has_start[0])
        m = np.zeros((V, V, B), dtype=bool)
        for b in range(B):
            for u in range(1, V):
                for w in range(u - 1, -1, -1):
                    m[u, w, b] = True
                    if self.has_start[w][b]:
                        break
        return m


def _piece_info(starts: np.ndarray, b: int, T: int, Tl: int, v: int):
    """Sorted local starts (0..Tl-1) of virtual piece v of row b, and the doc start (row
    coords) of its first token."""
    a = b * T + v * Tl
    lo, hi = np.searchsorted(starts, a), np.searchsorted(starts, a + Tl)
    local = (starts[lo:hi] - a).tolist()
    k = np.searchsorted(starts, a, side="right") - 1  # last start <= a
    return local, int(starts[k]) - b * T


def make_plan(cu_seqlens, rows: int, T: int, cp: int, rank: int,
              balance: str = "zigzag", rounds: int = 1) -> CPPlan:
    """The :class:`CPPlan` of rank ``rank`` for a global micro-batch of ``rows`` rows of ``T``
    tokens whose document boundaries (over the flattened batch) are ``cu_seqlens``, under the
    partition ``balance`` (zigzag: 2C pieces a row, rank r holds r and 2C-1-r, repeated over
    ``rounds`` consecutive stretches of 2C pieces; contiguous: C)."""
    own = owned_pieces(cp, rank, balance, rounds)
    V = cp * len(own)
    if T % V:
        raise ValueError(f"row length {T} does not split into {V} pieces (cp={cp}, "
                         f"cp_balance={balance}, rounds={rounds})")
    Tl = T // V
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    starts = np.unique(cu[:-1])
    if not len(starts) or starts[0] != 0 or cu[-1] != rows * T:
        raise ValueError(f"cu_seqlens must run from 0 to rows·T = {rows * T}")
    if any((b * T) not in set(starts.tolist()) for b in range(rows)):
        raise ValueError("every row must start a document (row edges are sequence boundaries)")
    plan = CPPlan(cp, rank, rows * len(own), Tl, [], [], [], [], [[False] * rows for _ in
                  range(V)], [], [], 0, balance, [], rounds)
    info = [[_piece_info(starts, b, T, Tl, v) for b in range(rows)] for v in range(V)]
    hops = 0
    for u in range(V):
        ru = plan.owner(u)[0]
        for b in range(rows):
            local, ds = info[u][b]
            plan.has_start[u][b] = bool(local)
            if not local or local[0] != 0:  # continues: needs pieces ds//Tl .. u-1
                for w in range(ds // Tl, u):
                    hops = max(hops, (ru - plan.owner(w)[0]) % cp)
    plan.ring_hops = hops
    for b in range(rows):
        for v in own:
            i = len(plan.virt)
            local, ds = info[v][b]
            plan.virt.append(v)
            plan.first_seg.append(len(plan.cu))
            plan.cu.extend(i * Tl + e for e in sorted(set([0] + local)))
            plan.last_seg.append(len(plan.cu) - 1)
            plan.cont.append(not local or local[0] != 0)
            plan.first.append(local[0] if local else Tl)
            plan.doc_start.append(ds)
    plan.cu.append(plan.rows * Tl)
    return plan


def shard_batch(batch: Batch, cp: int, rank: int, balance: str = "zigzag",
                rounds: int = 1) -> Batch:
    """Rank ``rank``'s pieces of every row of ``batch`` (host tensors): one local row per piece
    (``[B·m, Tl]``, pieces in row order), with its :class:`CPPlan` attached to the local
    ``cu_seqlens`` (attribute ``cp_plan``)."""
    B, T = batch.tokens.shape
    plan = make_plan(batch.cu_seqlens.tolist(), B, T, cp, rank, balance, rounds)
    Tl = plan.Tl
    own = owned_pieces(cp, rank, balance, rounds)

    def take(x):
        return torch.stack([x[:, v * Tl:(v + 1) * Tl] for v in own], 1).reshape(-1, Tl)

    cu = torch.tensor(plan.cu, dtype=torch.int32)
    out = Batch(take(batch.tokens), take(batch.labels), take(batch.loss_mask), cu,
                take(batch.position_ids))
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

    def __init__(self, group, cp: int, rank: int, lightning: str = "laspplus",
                 balance: str = "zigzag", rounds: int = 1):
        if lightning not in LIGHTNING_MODES:
            raise ValueError(f"lightning must be one of {LIGHTNING_MODES}, got {lightning!r}")
        if balance not in CP_BALANCES:
            raise ValueError(f"cp_balance must be one of {CP_BALANCES}, got {balance!r}")
        self.group, self.cp, self.rank, self.lightning = group, cp, rank, lightning
        self.balance, self.rounds = balance, rounds  # rounds 0: auto (auto_rounds, per row)
        if rounds != 0:
            owned_pieces(cp, rank, balance, rounds)  # validates rounds
        self.ranks = ([dist.get_global_rank(group, i) for i in range(cp)]
                      if group is not None and cp > 1 else [0])

    def shard_batch(self, batch: Batch, device) -> Batch:
        """The local pieces on ``device``; the plan stays attached to the device cu_seqlens."""
        rounds = self.rounds or auto_rounds(self.cp, self.balance, batch.tokens.shape[-1])
        local = shard_batch(batch, self.cp, self.rank, self.balance, rounds)
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


def states_outside_autocast(fn):
    """For the forward and backward of the CP lightning Functions: run with autocast off on the
    inputs' device. The training loop runs the model under bf16 autocast, which would run these
    ops' state GEMMs (the decayed sums, :func:`combine_states`) in bf16, and the states are fp32
    by design (SPEC §6); the local op's kernels take the bf16 activations as they come."""
    @functools.wraps(fn)
    def run(ctx, *args):
        dev = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        with torch.autocast(dev.type, enabled=False):
            return fn(ctx, *args)
    return run


def _chain_matrix(plan: CPPlan, slopes, dtype, device, transpose: bool, rows=None,
                  extra: int = 0):
    """``M`` [H, R', C·rows]: ``M[h, i, (j, l)]`` weighs rank j's local piece l's state in what
    this rank's local piece ``rows[i]`` receives (all local pieces when ``rows`` is None; local
    piece ``l = b·m + s`` is slot s of global row b, so M is zero across rows). Forward
    (``transpose=False``): the incoming state of the receiver from every sender's last-segment
    state; backward: the gradient of the receiver's last-segment state from every sender's
    ``dKV_in``. The weight is ``λ^((u-1-w)·Tl + extra)`` (u the receiving, w the sending virtual
    piece — in the backward u is the sender's) where the chain of u includes w
    (:meth:`CPPlan.chain_mask`), else 0. The plan caches the exponents and the mask (every
    layer has its own slopes), so a call costs three small ops."""
    rows = tuple(range(plan.rows)) if rows is None else tuple(rows)
    key = ("chain", transpose, rows, extra, str(device), dtype)
    if key not in plan._cache:
        mask = plan.chain_mask()  # [u, w, b]
        C, m = plan.cp, plan.per_row
        virt = [owned_pieces(C, j, plan.balance, plan.rounds) for j in range(C)]
        expo = np.zeros((len(rows), C, plan.rows), dtype=np.float64)
        sel = np.zeros((len(rows), C, plan.rows), dtype=bool)
        for i, lo in enumerate(rows):
            b, t = divmod(lo, m)
            vr = virt[plan.rank][t]
            for j in range(C):
                for s_j, vj in enumerate(virt[j]):
                    u, w = (vj, vr) if transpose else (vr, vj)
                    if w < u and mask[u, w, b]:
                        sel[i, j, b * m + s_j] = True
                        expo[i, j, b * m + s_j] = (u - 1 - w) * plan.Tl + extra
        plan._cache[key] = (torch.tensor(-expo.reshape(1, len(rows), -1), dtype=dtype,
                                         device=device),
                            torch.tensor(sel.reshape(1, len(rows), -1), dtype=dtype,
                                         device=device))
    neg_expo, sel = plan._cache[key]
    return torch.exp(slopes.to(device=device, dtype=dtype)[:, None, None] * neg_expo) * sel


def combine_states(plan: CPPlan, states_all: torch.Tensor, slopes, transpose: bool, rows=None,
                   extra: int = 0):
    """The states local pieces receive from the all-gathered ``states_all`` [C, rows, H, K, V]
    (every rank's per-local-piece states, local pieces in row order): forward
    (``transpose=False``) ``KV_in`` of each local piece from every rank's last-segment states
    ``KV_j``; backward the gradient ``dKV`` of each local last-segment state from every rank's
    ``dKV_in``; ``rows``: only these local pieces; ``extra``: λ^extra more (see
    :func:`_chain_matrix`). -> [R', H, K, V] in ``states_all``'s dtype (a strided view). Under
    zigzag a piece's chain mixes both slots of every rank. One batched GEMM over the heads,
    reading the gathered states in place."""
    C, n, H, K, V = states_all.shape
    M = _chain_matrix(plan, slopes, states_all.dtype, states_all.device, transpose, rows, extra)
    src = states_all.contiguous().permute(2, 0, 1, 3, 4).flatten(3).flatten(1, 2)  # [H, C·n, KV]
    return torch.bmm(M, src).transpose(0, 1).unflatten(2, (K, V))


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
    @states_outside_autocast
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
    @states_outside_autocast
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


# ----------------------------------------------------------------------------------------- LASP
class _Lasp(torch.autograd.Function):

    @staticmethod
    @states_outside_autocast
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
    @states_outside_autocast
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
        if self.mode == "lasp" and plan.balance != "contiguous":
            raise ValueError("parallel.cp_lightning: LASP (the serial baseline) passes the state "
                             "rank to rank over contiguous chunks; set parallel.cp_balance="
                             "contiguous to run it, or use parallel.cp_lightning=laspplus")
        if self.mode == "laspplus":
            from mmtrain.parallel import lasp_fused

            if lasp_fused.fusable(self.local, q):
                return lasp_fused.LaspPlusFused.apply(q, k, v, slopes, cu_seqlens, self.cpx,
                                                      plan), None
        fn = _LaspPlus if self.mode == "laspplus" else _Lasp
        return fn.apply(q, k, v, slopes, cu_seqlens, self.local, self.cpx, plan), None

    def packed(self, qkv, slopes, cu_seqlens=None):
        """The op on a per-head packed qkv [1, T, H, 3K] (:meth:`LightningOp.packed`): the
        fused LASP+ reads it in place and returns one gradient; LASP and the generic LASP+ run
        on its q, k, v views."""
        from mmtrain.kernels.lightning.autograd import split_qkv
        from mmtrain.parallel import lasp_fused

        if self.mode == "laspplus" and lasp_fused.fusable(self.local, qkv):
            return lasp_fused.LaspPlusFused.apply(qkv, None, None, slopes, cu_seqlens, self.cpx,
                                                  plan_of(cu_seqlens)), None
        return self(*split_qkv(qkv, qkv.shape[-1] // 3), slopes, cu_seqlens)
