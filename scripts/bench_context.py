"""Benchmark context parallelism (issue 10) on one or two GPUs: the local softmax op, LASP+ and
LASP, Varlen Ring Attention. Checks correctness on the device before timing anything.

    torchrun --nproc-per-node 1 scripts/bench_context.py --out bench_context_1gpu.json
    torchrun --nproc-per-node 2 scripts/bench_context.py --out bench_context_2gpu.json
    torchrun --nproc-per-node 2 scripts/bench_context.py --cpu-smoke --out /tmp/smoke.json  # CPU, gloo
    torchrun --nproc-per-node 2 scripts/bench_context.py --balance contiguous --skip softmax_op
    torchrun --nproc-per-node 2 scripts/bench_context.py --softmax-impl flex --skip lightning
    python scripts/bench_context.py --emulate-cp 2 --balance zigzag2 --skip softmax_op,ring

``--softmax-impl`` (default ``flash,flex`` on GPU): the implementations of the document-masked
softmax op (:class:`mmtrain.model.doc_attention.DocAttention`) that the softmax sections run, each
in turn: ``flash`` (torch's FlashAttention-2 varlen kernel, the CUDA default) and ``flex``
(FlexAttention with document block masks). Under ``--cpu-smoke`` only ``flash`` runs, its two
kernel calls replaced by the CPU stand-in of tests/flash_standin.py (eager FlexAttention has no
CPU backward).

``--balance`` (default ``zigzag,zigzag2,contiguous``): the CP partitions to measure
(``parallel.cp_balance``: zigzag, rank r holds pieces r and 2C-1-r of 2C; zigzagR, that over R
rounds, ``parallel.cp_zigzag_rounds=R``; contiguous, the r-th of C). Every CP section runs once
per partition; LASP runs under contiguous only.

Sections (bf16, d = 128; fwd+bwd = one forward and one backward; median of --iters timed
iterations after --warmup; every rank times the same thing and the slowest rank is reported):

1. ``checks``: on the device, the CP ops on a packed batch whose documents cross the rank edge
   (a length-1 document, a document starting on an edge, a row that is one document) against the
   single-GPU op on the whole batch: output and q/k/v gradients, max relative error (fails above
   5e-2, warns above 1e-2); ring attention once per softmax impl, against the single-GPU op of
   the same impl. With one process: each impl's local op vs the exact torch reference.
2. ``softmax_op`` (rank 0): the local softmax op (mmtrain.model.doc_attention.DocSoftmaxOp, per
   softmax impl; JSON ``doc_<impl>_ms``) against the model's SoftmaxOp (torch's
   FlashAttention-2 varlen kernel on CUDA; the JSON key still says per_doc_sdpa), on
   packed batches of 4K–128K tokens, H = 64 query heads over 8 KV heads (MiniMax-Text-01's
   softmax layer), fwd+bwd ms and speed-up.
3. ``lightning``: LASP+ and LASP fwd+bwd for H = 8 and 64 at 128K and 512K tokens per GPU, one
   document per row (the state chains across ranks). CP=1 is the local Triton op; CP=2 (two
   processes) LASP+ per partition (fused into the kernel's passes, and "unfused": its separate
   state GEMMs, ``MMTRAIN_LASP_FUSED=0``) and LASP (contiguous). ns/token per GPU, per-GPU
   throughput relative to CP=1 (goal ≥ 0.9); with one process and ``--emulate-cp C``, each
   rank's LASP+ share of CP=C in turn, its all-gather replaced by its own states (no
   collectives; the slowest rank reported),
   and the communication share: the collectives timed alone (LASP+: the fp32 state all-gathers
   of forward and backward; LASP: the state send/recv chain) over the op's time.
4. ``ring``: Varlen Ring Attention on 256K tokens of packed documents of 1K–256K (log-uniform),
   H = 8 over 1 KV head (one TP=8 shard of MiniMax's softmax layer): CP=1 runs the whole batch on
   one GPU (DocSoftmaxOp), CP=2 half per GPU, both on the same softmax impl; fraction of ideal
   scaling = t(CP=1) / (2·t(CP=2)) (goal ≥ 0.7), with each rank's time and its attended (query,
   key) pairs (the causal load imbalance), per softmax impl and partition.

The table (scripts/bench_context_table.py) is printed last; --out writes every number as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

from mmtrain.data.batch import Batch, position_ids_from_cu_seqlens
from mmtrain.model.doc_attention import DocAttention, DocSoftmaxOp
from mmtrain.model.layers import lightning_slopes
from mmtrain.model.ops import LightningOp, SoftmaxOp
import mmtrain.parallel.lasp_fused as lasp_fused
from mmtrain.parallel.context import (CP_BALANCES, ContextLightningOp, ContextParallel, make_plan,
                                     owned_pieces, shard_batch)
from mmtrain.parallel.ring import ContextSoftmaxOp, causal_work

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_context_table beside it
from bench_context_table import IMPL_NAMES, table  # noqa: E402

K_DIM = 128


# ------------------------------------------------------------------------------------ helpers
def log(msg):
    if RANK == 0:
        print(msg, flush=True)


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def barrier():
    if WORLD > 1:
        dist.barrier()


def timeit(fn, warmup, iters, together=True):
    """Median seconds of fn() on this rank (``together``: every rank runs it, and the ranks
    start each iteration at once; else this rank alone)."""
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(iters):
        if together:
            barrier()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def slowest(x: float) -> float:
    if WORLD == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=DEV if DEV.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def gather_floats(x: float) -> list:
    if WORLD == 1:
        return [x]
    t = torch.tensor([x], dtype=torch.float64, device=DEV if DEV.type == "cuda" else "cpu")
    out = [torch.zeros_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t)
    return [float(v) for v in out]


def slopes_for(H):
    """Layer 0 of MiniMax-Text-01's 80 (the model's own formula)."""
    return lightning_slopes(0, 80, H).float()


def packed_lengths(total, lo, hi, seed):
    """Document lengths (log-uniform in [lo, hi]) filling ``total`` tokens exactly."""
    g = torch.Generator().manual_seed(seed)
    out, used = [], 0
    while used < total:
        u = float(torch.rand((), generator=g))
        n = int(round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))))
        n = max(1, min(n, total - used))
        out.append(n)
        used += n
    return out


def cu_of(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


def rand(shape, seed, scale=1.0, dtype=torch.bfloat16):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=DEV) * scale).to(dtype)


def partition(name):
    """(cp_balance, rounds) of a --balance item: contiguous, zigzag, zigzagR."""
    if name == "contiguous":
        return "contiguous", 1
    if name.startswith("zigzag") and (name[6:] == "" or name[6:].isdigit()) and name[6:] != "0":
        return "zigzag", int(name[6:] or 1)
    raise ValueError(name)


def dev_cu(cu):
    """Device cu_seqlens carrying their host copy, as a batch moved by ``Batch.to`` does (the ops
    then never read them back: no host sync inside a timed op)."""
    t = torch.tensor(cu, dtype=torch.int32, device=DEV)
    t.host = [int(x) for x in cu]
    return t


def local_piece(cu, rows, T, balance, world=None, rank=None):
    """This rank's CP plan (on the device cu_seqlens) and its token indices, for ``rows`` rows
    of T tokens (boundaries ``cu`` over the flattened rows) split over WORLD ranks (``world``)
    under the partition ``balance``; ``rank``: another rank's (emulation)."""
    world, rank = WORLD if world is None else world, RANK if rank is None else rank
    tok = torch.zeros(rows, T, dtype=torch.int64)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    pos = position_ids_from_cu_seqlens(cu_t, rows * T).view(rows, T)
    local = shard_batch(Batch(tok, tok, tok.float(), cu_t, pos), world, rank, *partition(balance))
    Tl = local.cu_seqlens.cp_plan.Tl
    cu_l = dev_cu(local.cu_seqlens.tolist())
    cu_l.cp_plan = local.cu_seqlens.cp_plan
    idx = torch.cat([torch.arange(b * T + v * Tl, b * T + (v + 1) * Tl) for b in range(rows)
                     for v in owned_pieces(world, rank, *partition(balance))])
    return cu_l, idx.to(DEV)


def cpx_for(balance):
    b, k = partition(balance)
    return ContextParallel(dist.group.WORLD if WORLD > 1 else None, WORLD, RANK, balance=b,
                           rounds=k)


class EmulatedCP(ContextParallel):
    """One process doing rank ``rank``'s share of a CP group of ``cp`` (``--emulate-cp``): the
    all-gather returns this process's states ``cp`` times, so the LASP+ op runs every kernel and
    small op of that rank on tensors of the true sizes, without the collectives (whose share the
    two-process runs measure). Its outputs are not the CP op's: timing only."""

    def all_gather(self, x):
        x = x.contiguous()
        return torch.stack([x] * self.cp)


def emulated_rank(Tg, balance, C, r):
    """(device cu_seqlens with the CP plan, EmulatedCP) of rank ``r``'s share of one row that is
    one document of ``Tg · C`` tokens, over an emulated CP group of ``C`` under ``balance``."""
    cu_l, _ = local_piece([0, Tg * C], 1, Tg * C, balance, C, r)
    b, rounds = partition(balance)
    return cu_l, EmulatedCP(None, C, r, balance=b, rounds=rounds)


def modes_for(balance):
    """The lightning modes a partition runs: LASP+ (fused into the kernel's passes), LASP+
    unfused (its separate state GEMMs, ``MMTRAIN_LASP_FUSED=0``) and LASP (contiguous only)."""
    both = ("laspplus", "laspplus-unfused")
    return both + ("lasp",) if balance == "contiguous" else both


def lightning_op(mode, cpx):
    """(op, fused flag) of a mode of :func:`modes_for`; the flag is set while the op runs."""
    return ContextLightningOp(LightningOp(), cpx, mode.split("-")[0]), mode != "laspplus-unfused"


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def softmax_args(impl):
    """(impl, kernels) of DocAttention / DocSoftmaxOp for a --softmax-impl item: on CPU (smoke)
    flash's two kernel calls are the stand-in of tests/flash_standin.py."""
    if DEV.type == "cpu":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tests.flash_standin import FlashStandIn

        return impl, FlashStandIn()
    return impl, None


# ------------------------------------------------------------------------------------- checks
def run_checks(sizes, balances, impls):
    R = sizes["check_T"]  # row length; 3 rows
    h = R // max(WORLD, 2)  # the contiguous rank edge (a zigzag piece edge too)
    # row 0: a length-1 document, one starting exactly on the edge; row 1: one crossing the
    # edge; row 2: one document (the state / K/V chain runs through every rank)
    cu = [0, 1, h // 2, h, R, R + h - 5, R + h + 3, 2 * R, 3 * R]
    T = 3 * R
    results = []
    dt = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    H = 8
    q = rand((T, H, K_DIM), 1, 0.3, dt)
    k = rand((T, H, K_DIM), 2, 0.3, dt)
    v = rand((T, H, K_DIM), 3, 1.0, dt)
    w = rand((T, H, K_DIM), 4, 1.0, dt)
    slopes = slopes_for(H).to(DEV)
    cu_t = dev_cu(cu)
    for balance in balances if WORLD > 1 else ():
        cpx = cpx_for(balance)
        cu_l, sl = local_piece(cu, 3, R, balance)
        ref = LightningOp()
        ins = [x.clone().requires_grad_() for x in (q, k, v)]
        o_ref, _ = ref(*(x[None] for x in ins), slopes, cu_t)
        (o_ref[0].float() * w.float()).sum().backward()
        for mode in modes_for(balance):
            op, lasp_fused.FUSED = lightning_op(mode, cpx)
            li = [x[sl].clone().requires_grad_() for x in (q, k, v)]
            o, _ = op(*(x[None] for x in li), slopes, cu_l)
            lasp_fused.FUSED = True
            (o[0].float() * w[sl].float()).sum().backward()
            err = max([rel(o[0], o_ref[0][sl])] + [rel(a.grad, b.grad[sl]) for a, b in zip(li, ins)])
            results.append({"check": f"lightning {mode} {balance} CP={WORLD} vs 1 GPU",
                            "max_rel_err": err})
        G = 1
        q2, k2, v2 = q, k[:, :G].contiguous(), v[:, :G].contiguous()
        for impl in impls:
            ins = [x.clone().requires_grad_() for x in (q2, k2, v2)]
            o_ref = DocSoftmaxOp(*softmax_args(impl))(*ins, cu_t, 1 / math.sqrt(K_DIM))
            (o_ref.float() * w.float()).sum().backward()
            li = [x[sl].clone().requires_grad_() for x in (q2, k2, v2)]
            o = ContextSoftmaxOp(cpx, DocAttention(*softmax_args(impl)))(*li, cu_l,
                                                                         1 / math.sqrt(K_DIM))
            (o.float() * w[sl].float()).sum().backward()
            err = max([rel(o, o_ref[sl])] + [rel(a.grad, b.grad[sl]) for a, b in zip(li, ins)])
            results.append({"check": f"ring attention {balance} {impl} CP={WORLD} vs 1 GPU",
                            "max_rel_err": err})
    # the local softmax op of each impl against the exact torch reference
    G = 1
    q2, k2, v2 = q.float(), k[:, :G].float(), v[:, :G].float()
    for impl in impls:
        outs = []
        for op in (DocSoftmaxOp(*softmax_args(impl)), DocSoftmaxOp("reference")):
            ins = [x.clone().requires_grad_() for x in (q2.to(dt), k2.to(dt), v2.to(dt))]
            o = op(*ins, cu_t, 1 / math.sqrt(K_DIM))
            (o.float() * w.float()).sum().backward()
            outs.append([o] + [x.grad for x in ins])
        err = max(rel(a, b) for a, b in zip(*outs))
        results.append({"check": f"DocSoftmaxOp ({impl}) vs torch reference",
                        "max_rel_err": err})
    for r in results:
        r["max_rel_err"] = slowest(r["max_rel_err"])
        log(f"check: {r['check']}: max rel err {r['max_rel_err']:.2e}")
        if not r["max_rel_err"] <= 5e-2:
            raise SystemExit(f"correctness check failed: {r}")
        if r["max_rel_err"] > 1e-2:
            log(f"warning: {r['check']} above 1e-2")
    return results


# ------------------------------------------------------------------------------- softmax op
def bench_softmax_op(sizes, a, impls):
    out = []
    if RANK != 0:
        return out
    H, G = sizes["sm_heads"]
    dt = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    for T in sizes["sm_T"]:
        lens = packed_lengths(T, sizes["sm_doc"][0], sizes["sm_doc"][1], seed=T)
        cu = dev_cu(cu_of(lens))
        q = rand((T, H, K_DIM), 5, 0.3, dt).requires_grad_()
        k = rand((T, G, K_DIM), 6, 0.3, dt).requires_grad_()
        v = rand((T, G, K_DIM), 7, 1.0, dt).requires_grad_()
        do = rand((T, H, K_DIM), 8, 1.0, dt)
        row = {"T": T, "docs": len(lens), "H": H, "G": G}
        ops = [(f"doc_{i}", DocSoftmaxOp(*softmax_args(i))) for i in impls]
        for name, op in ops + [("per_doc_sdpa", SoftmaxOp())]:
            def f():
                for x in (q, k, v):
                    x.grad = None
                op(q, k, v, cu, 1 / math.sqrt(K_DIM)).backward(do)
            row[name + "_ms"] = timeit(f, a.warmup, a.iters, together=False) * 1e3
        for i in impls:
            row[f"speedup_{i}"] = row["per_doc_sdpa_ms"] / row[f"doc_{i}_ms"]
        log(f"softmax op T={T} docs={len(lens)}: " + ", ".join(
            f"DocSoftmaxOp {IMPL_NAMES[i]} {row[f'doc_{i}_ms']:.2f} ms" for i in impls)
            + f", SoftmaxOp (flash varlen) {row['per_doc_sdpa_ms']:.2f} ms")
        out.append(row)
    return out


# -------------------------------------------------------------------------------- lightning
def bench_lightning(sizes, a, balances):
    out = []
    for H in sizes["la_H"]:
        for Tg in sizes["la_T"]:  # tokens per GPU
            slopes = slopes_for(H).to(DEV)
            q = rand((1, Tg, H, K_DIM), 9, 0.3).requires_grad_()
            k = rand((1, Tg, H, K_DIM), 10, 0.3).requires_grad_()
            v = rand((1, Tg, H, K_DIM), 11, 1.0).requires_grad_()
            do = rand((1, Tg, H, K_DIM), 12, 1.0)
            local = LightningOp()
            row = {"H": H, "T_per_gpu": Tg, "cp": WORLD}

            def run(op, cu):
                def f():
                    for x in (q, k, v):
                        x.grad = None
                    o, _ = op(q, k, v, slopes, cu)
                    o.backward(do)
                return f
            cu1 = dev_cu([0, Tg])
            row["cp1_ms"] = slowest(timeit(run(local, cu1), a.warmup, a.iters)) * 1e3
            cpx = None
            for balance in balances if WORLD > 1 else ():
                cpx = cpx_for(balance)
                cu_l, _ = local_piece([0, Tg * WORLD], 1, Tg * WORLD, balance)
                for mode in modes_for(balance):
                    op, lasp_fused.FUSED = lightning_op(mode, cpx)
                    key = f"{mode}_{balance}"
                    row[f"{key}_ms"] = slowest(timeit(run(op, cu_l), a.warmup, a.iters)) * 1e3
                    lasp_fused.FUSED = True
                    row[f"{key}_vs_cp1"] = row["cp1_ms"] / row[f"{key}_ms"]
                    row[f"{key}_ns_per_token"] = row[f"{key}_ms"] * 1e6 / Tg
                # the collectives alone (one state per local piece)
                st = torch.zeros(cu_l.cp_plan.rows, H, K_DIM, K_DIM, dtype=torch.float32,
                                 device=DEV)
                ag = timeit(lambda: cpx.all_gather(st), a.warmup, a.iters)
                row[f"laspplus_{balance}_comm_ms"] = slowest(2 * ag) * 1e3  # fwd + bwd
                for m in ("laspplus", "laspplus-unfused"):  # the same two all-gathers
                    row[f"{m}_{balance}_comm_ms"] = row[f"laspplus_{balance}_comm_ms"]
                    row[f"{m}_{balance}_comm_share"] = (row[f"laspplus_{balance}_comm_ms"]
                                                        / row[f"{m}_{balance}_ms"])
            for balance in balances if WORLD == 1 and a.emulate_cp > 1 else ():
                C = a.emulate_cp
                for mode in ("laspplus", "laspplus-unfused"):
                    key = f"{mode}_{balance}"
                    per_rank = []
                    for r in range(C):  # each rank's share in turn; the slowest sets the pace
                        cu_l, cpx_r = emulated_rank(Tg, balance, C, r)
                        op, lasp_fused.FUSED = lightning_op(mode, cpx_r)
                        per_rank.append(timeit(run(op, cu_l), a.warmup, a.iters) * 1e3)
                        lasp_fused.FUSED = True
                    row[f"{key}_ms_per_rank"] = per_rank
                    row[f"{key}_ms"] = max(per_rank)
                    row[f"{key}_vs_cp1"] = row["cp1_ms"] / row[f"{key}_ms"]
                    row[f"{key}_ns_per_token"] = row[f"{key}_ms"] * 1e6 / Tg
                    row[f"{key}_comm_share"] = 0.0  # no collectives run
            if WORLD > 1 and "contiguous" in balances:
                st = torch.zeros(1, H, K_DIM, K_DIM, dtype=torch.float32, device=DEV)

                def chain():  # forward chain then backward chain of one state per rank
                    for order in (range(WORLD - 1), range(WORLD - 1, 0, -1)):
                        for r in order:
                            nxt = r + 1 if order.step > 0 else r - 1
                            if RANK == r:
                                cpx.send(st, nxt).wait()
                            elif RANK == nxt:
                                cpx.recv(st, r)
                row["lasp_contiguous_comm_ms"] = slowest(timeit(chain, a.warmup, a.iters)) * 1e3
                row["lasp_contiguous_comm_share"] = (row["lasp_contiguous_comm_ms"]
                                                     / row["lasp_contiguous_ms"])
            row["cp1_ns_per_token"] = row["cp1_ms"] * 1e6 / Tg
            log("lightning " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in row.items()))
            out.append(row)
            del q, k, v, do
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------- ring
def bench_ring(sizes, a, balances, impls):
    T = sizes["ring_T"]  # whole batch (all GPUs)
    H, G = sizes["ring_heads"]
    lens = packed_lengths(T, sizes["ring_doc"][0], sizes["ring_doc"][1], seed=7)
    cu = cu_of(lens)
    dt = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    q = rand((T, H, K_DIM), 13, 0.3, dt)
    k = rand((T, G, K_DIM), 14, 0.3, dt)
    v = rand((T, G, K_DIM), 15, 1.0, dt)
    do = rand((T, H, K_DIM), 16, 1.0, dt)
    base = {"T_total": T, "docs": len(lens), "max_doc": max(lens), "H": H, "G": G,
            "cp": WORLD}

    def run(op, cu_t, sl):
        qs, ks, vs = (x[sl].detach().clone().requires_grad_() for x in (q, k, v))
        dos = do[sl]

        def f():
            for x in (qs, ks, vs):
                x.grad = None
            op(qs, ks, vs, cu_t, 1 / math.sqrt(K_DIM)).backward(dos)
        return f
    out = []
    for impl in impls:  # CP=1 and CP=2 on the same softmax impl
        cu_full = dev_cu(cu)
        base["softmax_impl"] = impl
        if RANK == 0 or WORLD == 1:  # CP=1: the whole batch on one GPU
            base["cp1_ms"] = timeit(run(DocSoftmaxOp(*softmax_args(impl)), cu_full, slice(0, T)),
                                    a.warmup, a.iters, together=False) * 1e3
        else:
            base["cp1_ms"] = 0.0
        barrier()
        base["cp1_ms"] = slowest(base["cp1_ms"])
        out += ring_rows(dict(base), run, cu, T, balances, impl, a)
    return out


def ring_rows(base, run, cu, T, balances, impl, a):
    out = []
    for balance in balances if WORLD > 1 else (None,):
        row = dict(base, balance=balance)
        if balance is not None:
            cu_l, sl = local_piece(cu, 1, T, balance)
            op = ContextSoftmaxOp(cpx_for(balance), DocAttention(*softmax_args(impl)))
            mine = timeit(run(op, cu_l, sl), a.warmup, a.iters)
            per_rank = gather_floats(mine * 1e3)
            row["cp_ms_per_rank"] = per_rank
            row["cp_ms"] = max(per_rank)
            row["ideal_fraction"] = row["cp1_ms"] / (WORLD * row["cp_ms"])
            row["pairs_per_rank"] = causal_work(lambda r: make_plan(cu, 1, T, WORLD, r,
                                                                    *partition(balance)))
            row["ring_hops"] = cu_l.cp_plan.ring_hops
        log("ring " + ", ".join(f"{k}={v}" for k, v in row.items()))
        out.append(row)
    return out


# ------------------------------------------------------------------------------------- main
SIZES = {
    "gpu": {"check_T": 8192, "sm_T": [4096, 16384, 65536, 131072], "sm_doc": (256, 32768),
            "sm_heads": (64, 8), "la_H": [8, 64], "la_T": [131072, 524288],
            "ring_T": 262144, "ring_doc": (1024, 262144), "ring_heads": (8, 1)},
    "smoke": {"check_T": 96, "sm_T": [128, 512], "sm_doc": (8, 128), "sm_heads": (4, 2),
              "la_H": [2], "la_T": [256], "ring_T": 512, "ring_doc": (16, 512),
              "ring_heads": (2, 1)},
}


def main():
    global RANK, WORLD, DEV
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU with gloo")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: softmax_op, "
                    "lightning, ring")
    ap.add_argument("--softmax-impl", default=None,
                    help="comma list of softmax impls for the softmax sections: flash, flex "
                    "(default flash,flex; flash under --cpu-smoke)")
    ap.add_argument("--emulate-cp", type=int, default=1,
                    help="with one process: also time each rank's LASP+ share of a CP group of "
                    "this size, the all-gather replaced by this process's own states (the "
                    "kernels and small ops at their true sizes, no collectives)")
    ap.add_argument("--balance", default="zigzag,zigzag2,contiguous",
                    help="comma list of CP partitions to measure (parallel.cp_balance): zigzag, "
                    "zigzagR (R rounds), contiguous")
    a = ap.parse_args()
    balances = [b for b in a.balance.split(",") if b]
    try:
        assert balances and all(partition(b)[0] in CP_BALANCES for b in balances)
    except (AssertionError, ValueError):
        raise SystemExit(f"--balance: {a.balance!r}; give a comma list of zigzag, zigzagR "
                         f"(R rounds, e.g. zigzag2) and contiguous") from None
    RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if a.emulate_cp > 1 and WORLD > 1:
        raise SystemExit("--emulate-cp runs one process's share of a CP group; start one "
                         "process (the two-process run measures CP=2 itself)")
    if a.cpu_smoke:
        DEV = torch.device("cpu")
        backend = "gloo"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU visible; use --cpu-smoke to run tiny sizes on CPU")
        DEV = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(DEV)
        backend = "nccl"
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if WORLD > 1:
        dist.init_process_group(backend, timeout=datetime.timedelta(
            seconds=60 if a.cpu_smoke else 600))
    impls = [i for i in (a.softmax_impl or ("flash" if a.cpu_smoke else "flash,flex")).split(",")
             if i]
    if (not impls or any(i not in IMPL_NAMES for i in impls)
            or (a.cpu_smoke and impls != ["flash"])):
        raise SystemExit(f"--softmax-impl: {a.softmax_impl!r}; give a comma list of flash and "
                         "flex (under --cpu-smoke only flash: eager FlexAttention has no CPU "
                         "backward)")
    sizes = SIZES["smoke" if a.cpu_smoke else "gpu"]
    skip = set(filter(None, a.skip.split(",")))
    t0 = time.time()
    res = {"device": torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else platform.processor() or "cpu",
           "world": WORLD, "torch": torch.__version__, "python": platform.python_version(),
           "backend": backend, "warmup": a.warmup, "iters": a.iters, "balances": balances,
           "softmax_impls": impls}
    names = {"laspplus": "LASP+", "laspplus-unfused": "LASP+ unfused", "lasp": "LASP"}
    emul = WORLD == 1 and a.emulate_cp > 1
    res["emulate_cp"] = a.emulate_cp if emul else None
    res["lightning_columns"] = ([(f"{m}_{b}", names[m]
                                  + (" contig" if b == "contiguous" else f" zig{b[6:]}")
                                  + (" emul" if emul else ""))
                                 for b in balances for m in modes_for(b)
                                 if WORLD > 1 or m != "lasp"]
                                if WORLD > 1 or emul else [])
    try:
        import triton
        res["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        res["triton"] = None
    res["checks"] = run_checks(sizes, balances, impls)
    res["softmax_op"] = [] if "softmax_op" in skip else bench_softmax_op(sizes, a, impls)
    barrier()
    res["lightning"] = [] if "lightning" in skip else bench_lightning(sizes, a, balances)
    res["ring"] = [] if "ring" in skip else bench_ring(sizes, a, balances, impls)
    res["wall_s"] = time.time() - t0
    if RANK == 0:
        print(table(res), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
            print(f"wrote {a.out} ({res['wall_s']:.0f} s)")
    if WORLD > 1:
        barrier()  # rank 0 may still be writing: tear gloo down together (a lone early teardown
        dist.destroy_process_group()  # aborted a rank at exit now and then)


RANK, WORLD, DEV = 0, 1, torch.device("cpu")

if __name__ == "__main__":
    sys.exit(main())
