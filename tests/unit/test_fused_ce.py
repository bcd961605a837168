"""Chunked linear cross-entropy (mmtrain/model/fused_ce.py) against ``F.cross_entropy`` of the
full logits: value and gradients of x and W, chunk sizes that do and do not divide N, ignored
tokens (``ignore_index``) and masked tokens (a zero weight on their CE), fp64 and fp32; the
vocab-parallel version under 2 gloo processes against one process."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmtrain.model.fused_ce import linear_cross_entropy
from tests.conftest import spawn_ranks

N, D, V = 37, 12, 50


def _data(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    w = torch.randn(V, D, generator=g, dtype=dtype) * 0.7
    target = torch.randint(0, V, (N,), generator=g)
    target[[3, 17, 30]] = -100  # ignored
    mask = (torch.rand(N, generator=g) > 0.25).to(dtype)  # masked (loss_mask), as the loop does
    weight = mask * torch.linspace(0.5, 2.0, N, dtype=dtype)
    return x, w, target, weight


def _run(fn, x, w, target, weight):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    ce = fn(x, w, target)
    (ce * weight).sum().backward()
    return ce.detach(), x.grad, w.grad


def _reference(x, w, target):
    return F.cross_entropy((x @ w.t()).float() if x.dtype != torch.float64 else x @ w.t(),
                           target, reduction="none")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("chunk", [1, 8, 37, 64])  # 8 does not divide 37; 64 > N: one chunk
def test_matches_full_logits(dtype, tol, chunk):
    x, w, target, weight = _data(dtype)
    ref = _run(_reference, x, w, target, weight)
    got = _run(lambda a, b, t: linear_cross_entropy(a, b, t, chunk), x, w, target, weight)
    assert got[0].dtype == ref[0].dtype
    assert got[0][target == -100].abs().max() == 0
    assert got[1][[3, 17, 30]].abs().max() == 0  # ignored tokens get no gradient
    for what, a, b in zip(("loss", "dx", "dw"), got, ref):
        assert _rel(a, b) <= tol, (what, _rel(a, b))


def test_bf16_autocast_is_close_and_keeps_weight_grad_fp32():
    x, w, target, weight = _data(torch.float32)
    ref = _run(_reference, x, w, target, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(lambda a, b, t: linear_cross_entropy(a, b, t, 8), x, w, target, weight)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    for a, b in zip(got, ref):
        assert _rel(a, b) < 3e-2
    assert _rel(got[0], ref[0]) > 0  # the GEMMs did run in bf16


def test_bad_arguments_fail():
    x, w, target, _ = _data(torch.float32)
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(x, w, target, 0)
    with pytest.raises(ValueError, match="target"):
        linear_cross_entropy(x, w, target[:-1], 4)


# ----------------------------------------------------------------- vocab-parallel, 2 processes
def _tp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from mmtrain.parallel.tensor import vocab_parallel_linear_cross_entropy

    res = {}
    for dtype in (torch.float64, torch.float32):
        x, w, target, weight = _data(dtype, seed=2)
        x = torch.cat([x, x[:1]])  # 38 tokens: 19 per rank under sequence parallelism
        target = torch.cat([target, target[:1]])
        weight = torch.cat([weight, weight[:1]])
        Vl, Tl = V // 2, x.shape[0] // 2
        xs = x[rank * Tl:(rank + 1) * Tl].clone().requires_grad_()
        wl = w[rank * Vl:(rank + 1) * Vl].clone().requires_grad_()
        ce = vocab_parallel_linear_cross_entropy(xs, wl, target, rank * Vl, dist.group.WORLD,
                                                 chunk=7)
        (ce * weight).sum().backward()
        one_x, one_w = x.clone().requires_grad_(), w.clone().requires_grad_()
        one = linear_cross_entropy(one_x, one_w, target, 7)  # the single-process version
        (one * weight).sum().backward()
        res[str(dtype)] = {
            "ce": _rel(ce.detach(), one.detach()),
            "dx": _rel(xs.grad, one_x.grad[rank * Tl:(rank + 1) * Tl]),
            "dw": _rel(wl.grad, one_w.grad[rank * Vl:(rank + 1) * Vl])}
    out[rank] = res
    dist.destroy_process_group()


def test_vocab_parallel_matches_single_process():
    out = spawn_ranks(_tp_worker, 2)
    for rank in range(2):
        for dtype, errs in out[rank].items():
            tol = 1e-12 if "64" in dtype else 1e-6
            for key, err in errs.items():
                assert err <= tol, (rank, dtype, key, err)
