"""The document-masked softmax op with LSE (mmtrain.model.doc_attention): the torch reference
against a dense masked softmax in fp64 (outputs, LSE, and the flash-style backward that uses the
final o/lse), the FlexAttention block mask against the dense document mask, and eager
FlexAttention on CPU against the reference (the CUDA path runs compiled, checked by
scripts/bench_context.py on the GPU)."""

import math

import pytest
import torch

from mmtrain.model.doc_attention import (DocAttention, DocSoftmaxOp, Segments, doc_block_mask,
                                         flex_available, grad_by_recompute)
from mmtrain.model.ops import SoftmaxOp


def _dense(q, k, v, segs, scale):
    """Differentiable dense attention with the segment mask; (o, lse)."""
    Tq, H, K = q.shape
    G = k.shape[1]
    allowed = torch.zeros(Tq, k.shape[0], dtype=torch.bool)
    for (q0, q1), (k0, k1) in zip(segs.q, segs.k):
        m = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
        allowed[q0:q1, k0:k1] = m.tril() if segs.causal else m
    kk = k.repeat_interleave(H // G, dim=1)
    vv = v.repeat_interleave(H // G, dim=1)
    s = torch.einsum("qhk,thk->hqt", q, kk) * scale
    s = s.masked_fill(~allowed[None], -math.inf)
    lse = torch.logsumexp(s, -1)  # [H, Tq]
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    o = torch.einsum("hqt,thv->qhv", p, vv)
    return o, lse.t()


def _qkv(Tq, Tk, H=4, G=2, K=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(Tq, H, K, generator=g, dtype=dtype),
            torch.randn(Tk, G, K, generator=g, dtype=dtype),
            torch.randn(Tk, G, K, generator=g, dtype=dtype))


SEGS = {
    "causal_docs": Segments.from_cu([0, 1, 6, 6, 20, 29], 29),  # incl. length-1 and empty docs
    "offdiag": Segments([(0, 5), (12, 15)], [(3, 11), (11, 17)], False, 20, 17),
}


@pytest.mark.parametrize("name", list(SEGS))
def test_reference_forward_and_backward_match_dense(name):
    segs = SEGS[name]
    q, k, v = _qkv(segs.Tq, segs.Tk)
    op = DocAttention("reference")
    o, lse = op.forward(q, k, v, segs, 0.3)
    o_d, lse_d = _dense(q, k, v, segs, 0.3)
    covered = torch.zeros(segs.Tq, dtype=torch.bool)
    for q0, q1 in segs.q:
        covered[q0:q1] = True
    torch.testing.assert_close(o, o_d, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse[covered], lse_d[covered], rtol=1e-10, atol=1e-12)
    assert torch.isneginf(lse[~covered]).all() and (o[~covered] == 0).all()
    do = torch.randn_like(o)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    _dense(qr, kr, vr, segs, 0.3)[0].mul(do).sum().backward()
    dq, dk, dv = op.backward(q, k, v, o, lse, do, segs, 0.3)
    for got, want in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_backward_with_merged_lse_sums_to_the_merged_gradient():
    """Two disjoint key sets merged by log-sum-exp: the per-step backward with the merged (o, lse)
    adds up to the gradient of the attention over the union (what ring attention relies on)."""
    q, k, v = _qkv(6, 10)
    a = Segments([(0, 6)], [(0, 4)], False, 6, 10)
    b = Segments([(0, 6)], [(4, 10)], False, 6, 10)
    full = Segments([(0, 6)], [(0, 10)], False, 6, 10)
    op = DocAttention("reference")
    oa, la = op.forward(q, k, v, a, 0.5)
    ob, lb = op.forward(q, k, v, b, 0.5)
    lse = torch.logaddexp(la, lb)
    o = oa * torch.exp(la - lse)[..., None] + ob * torch.exp(lb - lse)[..., None]
    o_f, lse_f = op.forward(q, k, v, full, 0.5)
    torch.testing.assert_close(o, o_f, rtol=1e-12, atol=1e-12)
    do = torch.randn_like(o)
    ga = op.backward(q, k, v, o, lse, do, a, 0.5)
    gb = op.backward(q, k, v, o, lse, do, b, 0.5)
    gf = op.backward(q, k, v, o_f, lse_f, do, full, 0.5)
    for x, y, z in zip(ga, gb, gf):
        torch.testing.assert_close(x + y, z, rtol=1e-10, atol=1e-12)
    # The CUDA path's backward (autograd of the step's own (o, lse), recomputed) gives the same
    # per-step gradients; checked here with the dense attention as the differentiable step.
    for segs, want in ((a, ga), (b, gb)):
        got = grad_by_recompute(lambda x, y, z: _dense(x, y, z, segs, 0.5), q, k, v, o, lse, do)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def op_with_grads(op, q, k, v, cu, scale):
    """(o, dq, dk, dv) of a softmax op ``(q, k, v, cu_seqlens, scale) -> o`` under the loss
    ``Σ o²``."""
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    o = op(qr, kr, vr, cu, scale)
    o.pow(2).sum().backward()
    return o.detach(), qr.grad, kr.grad, vr.grad


def test_doc_softmax_op_matches_per_document_sdpa_with_gradients():
    cu = torch.tensor([0, 3, 4, 17, 40], dtype=torch.int32)
    q, k, v = _qkv(40, 40, H=4, G=1, K=16, dtype=torch.float32, seed=1)
    outs = [op_with_grads(op, q, k, v, cu, 0.25) for op in (SoftmaxOp(), DocSoftmaxOp())]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _expand(bm, Tq, Tk):
    """Dense [Tq, Tk] mask a BlockMask describes (full blocks: all; partial: mask_mod)."""
    B = bm.BLOCK_SIZE[0]
    out = torch.zeros(Tq, Tk, dtype=torch.bool)
    qi = torch.arange(Tq)[:, None]
    ki = torch.arange(Tk)[None, :]
    mm = bm.mask_mod(0, 0, qi.expand(Tq, Tk), ki.expand(Tq, Tk))
    for qb in range(bm.kv_num_blocks.shape[-1]):
        rows = slice(qb * B, min((qb + 1) * B, Tq))
        for j in range(int(bm.kv_num_blocks[0, 0, qb])):
            kb = int(bm.kv_indices[0, 0, qb, j])
            cols = slice(kb * B, min((kb + 1) * B, Tk))
            out[rows, cols] |= mm[rows, cols]
        for j in range(int(bm.full_kv_num_blocks[0, 0, qb])):
            kb = int(bm.full_kv_indices[0, 0, qb, j])
            cols = slice(kb * B, min((kb + 1) * B, Tk))
            assert mm[rows, cols].all(), "a full block must be entirely allowed"
            out[rows, cols] = True
    return out


@pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention")
@pytest.mark.parametrize("segs", [
    Segments.from_cu([0, 1, 300, 301, 555, 1000], 1000),
    Segments([(0, 130), (300, 301), (400, 700)], [(5, 260), (260, 600), (600, 900)], False,
             700, 900),
], ids=["causal", "offdiag"])
def test_block_mask_is_exactly_the_document_mask(segs):
    bm = doc_block_mask(*segs.doc_tensors("cpu"), segs.causal, segs.Tq, segs.Tk, block=128)
    want = torch.zeros(segs.Tq, segs.Tk, dtype=torch.bool)
    for (q0, q1), (k0, k1) in zip(segs.q, segs.k):
        m = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
        want[q0:q1, k0:k1] = m.tril() if segs.causal else m
    assert torch.equal(_expand(bm, segs.Tq, segs.Tk), want)
    assert int(bm.full_kv_num_blocks.sum()) > 0  # the full-block path is exercised


@pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("segs", [
    Segments.from_cu([0, 1, 150, 260], 260),
    Segments([(0, 20), (140, 141)], [(30, 200), (200, 230)], False, 260, 230),
], ids=["causal", "offdiag"])
def test_eager_flex_forward_matches_reference(segs):
    """(FlexAttention has no CPU backward; its gradient path is grad_by_recompute, tested above.)"""
    q, k, v = _qkv(segs.Tq, segs.Tk, H=4, G=2, K=16, dtype=torch.float32, seed=2)
    ref, flex = DocAttention("reference"), DocAttention("flex_eager")
    o_r, l_r = ref.forward(q, k, v, segs, 0.25)
    o_f, l_f = flex.forward(q, k, v, segs, 0.25)
    torch.testing.assert_close(o_f.float(), o_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l_f, l_r, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_doc_softmax_op_flex_path_forward_matches_reference():
    """DocSoftmaxOp's FlexAttention path (block mask built on the device from cu_seqlens),
    forward only on CPU (eager FlexAttention has no CPU backward)."""
    cu = torch.tensor([0, 1, 130, 131, 300], dtype=torch.int32)
    q, k, v = _qkv(300, 300, H=4, G=2, K=16, dtype=torch.float32, seed=4)
    with torch.no_grad():
        got = DocSoftmaxOp("flex_eager")(q, k, v, cu, 0.25)
        want = DocSoftmaxOp("reference")(q, k, v, cu, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
