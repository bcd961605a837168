"""Varlen Ring Attention on the ``flash`` implementation of DocAttention (gloo, spawned
processes, short timeouts): the CP ranks reproduce the single-process attention's output and
q/k/v gradients on the batch of tests/dist/test_context_ops.py, with the FlashAttention-2 varlen
calls replaced by the CPU stand-in (tests/flash_standin.py, which asserts the kernel's contract).
This covers what the ring does only on the flash path: steps merged and gradients accumulated on
the covered rows alone (forward_rows / backward_rows), gathered off-diagonal query rows, the
kernel's fp32 LSE — and that no FlexAttention block mask is ever built. (Longer rings, cp=4,
run the same row-wise merging on the reference implementation in test_context_ops.py.)"""

import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist

from tests.conftest import spawn_ranks
from tests.dist.test_context_ops import _data, _rank_piece, _rel


def _check_ring(rank, world, port, balance, rounds, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    from mmtrain.model.doc_attention import DocAttention, DocSoftmaxOp
    from mmtrain.parallel.ring import ContextSoftmaxOp
    from tests.flash_standin import FlashStandIn

    cu, _, local, idx, cpx = _rank_piece(rank, world, balance, rounds)
    q, k, v, w = _data(4, 2, 8, torch.float64, seed=11)  # GQA: 4 query heads over 2 KV heads
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref = DocSoftmaxOp("reference")(*ins, cu, 1 / math.sqrt(8))
    (o_ref * w).sum().backward()
    kern = FlashStandIn()
    li = [x[idx].clone().requires_grad_() for x in (q, k, v)]
    o = ContextSoftmaxOp(cpx, DocAttention("flash", kernels=kern))(*li, local.cu_seqlens,
                                                                   1 / math.sqrt(8))
    (o * w[idx]).sum().backward()
    plan = local.cu_seqlens.cp_plan
    out[rank] = {
        "err": max([_rel(o, o_ref.detach()[idx])] + [_rel(a.grad, b.grad[idx])
                                                     for a, b in zip(li, ins)]),
        "calls": [c[0] for c in kern.calls],
        "gathered": sum(c[1].data_ptr() != li[0].data_ptr() for c in kern.calls
                        if c[0] == "forward"),
        "masks": sum(key[0] == "mask" for s in plan._cache.values()
                     for seg in (s if isinstance(s, list) else [s]) for key in seg._dev),
        "hops": plan.ring_hops,
    }
    dist.destroy_process_group()


@pytest.mark.parametrize("cp,balance,rounds", [(2, "zigzag", 2), (2, "contiguous", 1)],
                         ids=["cp2-zigzag2", "cp2-contiguous"])
def test_ring_on_flash_matches_single_process(cp, balance, rounds):
    out = spawn_ranks(_check_ring, cp, balance, rounds)
    res = [dict(out[r]) for r in range(cp)]
    for r, x in enumerate(res):
        # the kernel's LSE is fp32: fp64 data agree to fp32 rounding of the LSE
        assert x["err"] <= 2e-6, (r, x["err"])
        assert x["masks"] == 0, r
        assert x["calls"].count("forward") == x["calls"].count("backward") >= 1
    assert res[0]["hops"] == cp - 1
    assert sum(x["gathered"] for x in res) > 0  # off-diagonal steps gathered their query rows
