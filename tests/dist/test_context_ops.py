"""Context-parallel ops against the single-process ops (gloo, spawned processes, short timeouts).

One packed batch of 3 rows × 24 tokens whose documents cross CP edges at cp=2 (12 tokens per
rank) and cp=4 (6 per rank): row 0 holds a length-1 document, a document that starts exactly at a
rank edge (12) and documents that span an edge; row 1 is one document (the state / K/V chain
runs through every rank); row 2 is a long document then a short one. Each CP rank runs its piece
and the single-process op runs the whole batch; the rank's output and the gradients of its q, k,
v (for a loss over the whole output, each rank backpropagating its piece's share) must equal the
matching slices: fp64 to 1e-10, fp32 to 1e-6 relative.
"""

import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port

ROWS, T = 3, 24
CU = [0, 1, 5, 12, 13, 24,  # row 0
      24,  # row 1: one document
      48, 68, 72]  # row 2


def _data(H, G, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n = ROWS * T
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(n, H, K) * 0.5, mk(n, G, K) * 0.5, mk(n, G, K), mk(n, H, K)


def _local_index(rank, cp):
    Tl = T // cp
    return torch.cat([torch.arange(b * T + rank * Tl, b * T + (rank + 1) * Tl)
                      for b in range(ROWS)])


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-30))


def _check_ops(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    from mmtrain.data.batch import Batch, position_ids_from_cu_seqlens
    from mmtrain.model.doc_attention import DocSoftmaxOp
    from mmtrain.model.ops import LightningOp
    from mmtrain.parallel.context import ContextLightningOp, ContextParallel, shard_batch
    from mmtrain.parallel.ring import ContextSoftmaxOp

    import mmtrain.parallel.context as context

    context._CHUNK = 5  # the LASP+ correction runs in row chunks: exercise several per piece
    cp = world
    cu = torch.tensor(CU, dtype=torch.int32)
    pos = position_ids_from_cu_seqlens(cu, ROWS * T).view(ROWS, T)
    tok = torch.zeros(ROWS, T, dtype=torch.int64)
    local = shard_batch(Batch(tok, tok, tok.float(), cu, pos), cp, rank)
    idx = _local_index(rank, cp)
    # position ids continue across the edge: they are the global ones, sliced
    assert torch.equal(local.position_ids.reshape(-1), pos.reshape(-1)[idx])
    cpx = ContextParallel(dist.group.WORLD, cp, rank)
    res = {}
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-6)):
        for K in (8, 128) if dtype == torch.float64 else (8,):  # 128: production head dim
            H = 2
            q, k, v, w = _data(H, H, K, dtype, seed=K)
            slopes = torch.tensor([0.05, 0.3])
            ref_op = LightningOp(block_size=4)
            ins = [x.clone().requires_grad_() for x in (q, k, v)]
            o_ref, _ = ref_op(*(x[None] for x in ins), slopes, cu)
            (o_ref[0] * w).sum().backward()
            for mode in ("laspplus", "lasp"):
                op = ContextLightningOp(LightningOp(block_size=4), cpx, mode)
                li = [x[idx].clone().requires_grad_() for x in (q, k, v)]
                o, _ = op(*(x[None] for x in li), slopes, local.cu_seqlens)
                (o[0] * w[idx]).sum().backward()
                name = f"lightning_{mode}_{str(dtype)[6:]}_K{K}"
                res[name] = (max([_rel(o[0], o_ref[0].detach()[idx])]
                                 + [_rel(a.grad, b.grad[idx]) for a, b in zip(li, ins)]), tol)
        # ring attention: 4 query heads over 2 KV heads
        q, k, v, w = _data(4, 2, 8, dtype, seed=3)
        ins = [x.clone().requires_grad_() for x in (q, k, v)]
        o_ref = DocSoftmaxOp()(*ins, cu, 1 / math.sqrt(8))
        (o_ref * w).sum().backward()
        li = [x[idx].clone().requires_grad_() for x in (q, k, v)]
        o = ContextSoftmaxOp(cpx)(*li, local.cu_seqlens, 1 / math.sqrt(8))
        (o * w[idx]).sum().backward()
        res[f"ring_{str(dtype)[6:]}"] = (max([_rel(o, o_ref.detach()[idx])]
                                             + [_rel(a.grad, b.grad[idx])
                                                for a, b in zip(li, ins)]), tol)
    res["hops"] = local.cu_seqlens.cp_plan.ring_hops
    out[rank] = res
    dist.destroy_process_group()


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_ops_match_single_process(cp):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_check_ops, args=(cp, free_port(), out), nprocs=cp, join=True)
        for rank in range(cp):
            res = dict(out[rank])
            # row 1 is one document: its K/V must reach the last rank from rank 0
            assert res.pop("hops") == cp - 1
            for key, (err, tol) in res.items():
                assert err <= tol, (cp, rank, key, err)


def test_plan_of_a_batch():
    """The host-side plan: local boundaries, continuation flags, chain and ring hops."""
    from mmtrain.parallel.context import make_plan

    p = make_plan(CU, ROWS, T, 2, 1)  # rank 1 of 2: pieces [12, 24) of each row
    assert p.cu == [0, 1, 12, 12 + 12, 24 + 8, 36]
    assert p.cont == [False, True, True] and p.first == [0, 12, 8]
    assert p.doc_start == [12, 0, 0] and p.ring_hops == 1
    m = make_plan(CU, ROWS, T, 4, 3).chain_mask()  # receiver 3: row 1 chains to rank 0
    assert m[3, :, 1].tolist() == [True, True, True, False]
    assert m[3, :, 0].tolist() == [False, False, True, False]  # row 0: rank 2 holds a start


def test_causal_work_shows_the_contiguous_chunk_imbalance():
    """One document over 2 ranks of Tl tokens: rank 0 attends Tl(Tl+1)/2 pairs, rank 1 that plus
    Tl² (its rows see all of rank 0's) — about 3× rank 0's work; packed short documents that
    never cross the edge are balanced."""
    from mmtrain.parallel.context import make_plan
    from mmtrain.parallel.ring import causal_work

    Tl = 8
    assert causal_work(lambda r: make_plan([0, 2 * Tl], 1, 2 * Tl, 2, r)) == \
        [Tl * (Tl + 1) // 2, Tl * (Tl + 1) // 2 + Tl * Tl]
    assert causal_work(lambda r: make_plan([0, 4, 8, 12, 16], 1, 16, 2, r)) == [20, 20]
