"""The fused LASP+ path (``mmtrain.parallel.lasp_fused``: the states come from the Triton
kernel's own passes) against the single-process op, in the Triton interpreter under gloo (2 and
4 CP ranks).

The batch of tests/dist/test_context_ops.py: 3 rows × 24 tokens, documents that cross CP edges
(contiguous chunks, and the zigzag partition with one and two rounds),
a length-1 document, a document starting exactly at an edge, a row that is one document (the
state chain runs through every rank). Each rank runs its piece with the kernel's two-pass plan
(items of 4 tokens, ``MMTRAIN_LA_SEG=4``, so a piece's first and last segments span several
items; and whole-sequence items); its output and the gradients of its q, k, v must equal the
single-process op's slices to 1e-5 relative (fp32; the kernel's products are IEEE fp32), and
the generic LASP+ path must agree with it. The packed per-head qkv (``ContextLightningOp.packed``,
the model's layout, read in place) must give the same numbers bit for bit.
"""

import datetime
import os

import pytest
import torch
import torch.distributed as dist

from tests.conftest import spawn_ranks
from tests.dist.test_context_ops import _data, _rank_piece, _rel


def _run(rank, world, port, seg, balance, rounds, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    if seg:
        os.environ["MMTRAIN_LA_SEG"] = str(seg)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    from mmtrain.model.ops import LightningOp
    import mmtrain.parallel.lasp_fused as lasp_fused
    from mmtrain.parallel.context import ContextLightningOp

    cu, _, local, idx, cpx = _rank_piece(rank, world, balance, rounds)
    H, K = 2, 32
    q, k, v, w = _data(H, H, K, torch.float32, seed=11)
    slopes = torch.tensor([0.05, 0.3])
    ins = [x.double().clone().requires_grad_() for x in (q, k, v)]  # fp64 reference
    o_ref, _ = LightningOp(block_size=4)(*(x[None] for x in ins), slopes, cu)
    (o_ref[0] * w.double()).sum().backward()
    res = {}
    calls = []
    orig = lasp_fused.LaspPlusFused.apply
    lasp_fused.LaspPlusFused.apply = lambda *a: calls.append(1) or orig(*a)
    for fused in (True, False):
        lasp_fused.FUSED = fused
        op = ContextLightningOp(LightningOp(block_size=4), cpx, "laspplus")
        li = [x[idx].clone().requires_grad_() for x in (q, k, v)]
        o, _ = op(*(x[None] for x in li), slopes, local.cu_seqlens)
        (o[0] * w[idx]).sum().backward()
        res[fused] = [o[0].detach()] + [x.grad for x in li]
        res[f"err_{fused}"] = max([_rel(o[0], o_ref[0].detach()[idx])]
                                  + [_rel(a.grad, b.grad[idx]) for a, b in zip(li, ins)])
    # the packed per-head qkv [T, H, 3K] (the model's layout), read in place: fused (one
    # gradient tensor) and generic (its views); the same numbers as the three separate inputs
    for fused in (True, False):
        lasp_fused.FUSED = fused
        op = ContextLightningOp(LightningOp(block_size=4), cpx, "laspplus")
        qkv = torch.cat([x[idx] for x in (q, k, v)], dim=-1).requires_grad_()
        o, _ = op.packed(qkv[None], slopes, local.cu_seqlens)
        (o[0] * w[idx]).sum().backward()
        got = [o[0].detach()] + list(qkv.grad.split(K, dim=-1))
        res[f"packed_equal_{fused}"] = all(torch.equal(a, b) for a, b in zip(got, res[fused]))
    lasp_fused.FUSED = True
    res["fused_vs_generic"] = max(_rel(a, b) for a, b in zip(res.pop(True), res.pop(False)))
    res["fused_calls"] = len(calls)
    out[rank] = res
    dist.destroy_process_group()


@pytest.mark.parametrize("cp,seg,balance,rounds", [(2, 4, "contiguous", 1), (2, 0, "zigzag", 2),
                                                  (4, 4, "zigzag", 1)])
def test_fused_laspplus_matches_single_process(cp, seg, balance, rounds):
    out = spawn_ranks(_run, cp, seg, balance, rounds)
    for rank in range(cp):
        res = dict(out[rank])
        assert res["fused_calls"] == 2, res  # the fused path ran (fused=True, packed or not)
        assert res["packed_equal_True"] and res["packed_equal_False"], res
        assert res["err_True"] <= 1e-5, (cp, rank, res)
        assert res["err_False"] <= 1e-5, (cp, rank, res)
        assert res["fused_vs_generic"] <= 1e-5, (cp, rank, res)


def _run_autocast(rank, world, port, balance, rounds, out):
    """bf16 activations, as the training loop hands them to the op under bf16 autocast: the
    CP ops keep their states in fp32 whether or not autocast is on around them."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    from mmtrain.model.ops import LightningOp
    import mmtrain.parallel.lasp_fused as lasp_fused
    from mmtrain.parallel.context import ContextLightningOp

    cu, _, local, idx, cpx = _rank_piece(rank, world, balance, rounds)
    H, K = 2, 32
    q, k, v, w = (x.bfloat16() for x in _data(H, H, K, torch.float32, seed=5))
    slopes = torch.tensor([0.05, 0.3])
    modes = ([("laspplus", True), ("laspplus", False)] if balance != "contiguous"
             else [("lasp", False)])
    res = {}
    for mode, fused in modes:
        lasp_fused.FUSED = fused
        got = {}
        for cast in (False, True):
            op = ContextLightningOp(LightningOp(block_size=4), cpx, mode)
            li = [x[idx].clone().requires_grad_() for x in (q, k, v)]
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
                    o, _ = op(*(x[None] for x in li), slopes, local.cu_seqlens)
                (o[0].float() * w[idx].float()).sum().backward()
                got[cast] = [o[0].detach()] + [x.grad for x in li]
            except RuntimeError as e:  # report, so every mode is tried on every rank
                got[cast] = f"{type(e).__name__}: {e}"
        a, b = got[False], got[True]
        res[f"{mode}_{fused}"] = (a == b if isinstance(a, str) or isinstance(b, str)
                                  else all(torch.equal(x, y) for x, y in zip(a, b))), (
            b if isinstance(b, str) else "")
    lasp_fused.FUSED = True
    out[rank] = res
    dist.destroy_process_group()


@pytest.mark.parametrize("balance,rounds", [("zigzag", 2), ("contiguous", 1)])
def test_cp_lightning_states_ignore_autocast(balance, rounds):
    """Under bf16 autocast (the training loop's forward) LASP+ (fused and generic) and LASP give
    the same output and gradients, bit for bit, as without it: their state GEMMs stay in fp32.
    (The fused hook once crashed there, ``index_copy_`` of a bf16 combination into fp32 states,
    and the generic path combined the states in bf16.)"""
    out = spawn_ranks(_run_autocast, 2, balance, rounds)
    for rank in range(2):
        for key, (same, err) in out[rank].items():
            assert same and not err, (balance, rank, key, err)
