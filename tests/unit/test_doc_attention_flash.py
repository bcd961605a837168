"""The ``flash`` implementation of DocAttention (torch's FlashAttention-2 varlen kernel) on CPU:
the kernel cannot run here, so a CPU stand-in with the same varlen contract
(tests/flash_standin.py, which asserts that contract) replaces the two aten calls, and
everything around them — cu_seqlens from the segments, slice views vs gathers, the scatter back,
the LSE transpose, rows in no segment (o = 0, lse = -inf, zero gradients) — is checked against
the exact torch reference (ref_forward / ref_backward) on causal diagonal segments, non-causal
segments whose query ranges do not start at 0, uncovered rows and GQA (H = 2·G). The kernel
itself is checked on the GPU by scripts/check_flash_segments.py."""

import math

import pytest
import torch

from mmtrain.model.doc_attention import (DocAttention, DocSoftmaxOp, Segments, flash_unsupported,
                                         ref_backward, ref_forward)
from mmtrain.model.ops import SoftmaxOp
from tests.flash_standin import FlashStandIn
from tests.unit.test_doc_attention import op_with_grads


def _qkv(Tq, Tk, H=4, G=2, K=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(Tq, H, K, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(Tk, G, K, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(Tk, G, K, generator=g, dtype=torch.float64).to(dtype))


def _mask(ranges, T):
    m = torch.zeros(T, dtype=torch.bool)
    for a, b in ranges:
        m[a:b] = True
    return m


# name: (segments, H, G, whether the query rows / key rows reach the kernel as slice views)
CASES = {
    # packed documents tiling the stream (length-1 and empty documents): no copy at all
    "causal_tiled": (Segments.from_cu([0, 1, 6, 6, 20, 29], 29), 4, 2, True, True),
    # documents over part of the stream: rows 0-2 and 17-19 in no segment, views with an offset
    "causal_uncovered": (Segments.from_cu([3, 4, 10, 17], 20), 4, 2, True, True),
    # ring-style off-diagonal: query ranges from 2 with gaps, key ranges with a gap, one empty
    "offdiag_gather": (Segments([(2, 5), (9, 15), (15, 16), (17, 17)],
                                [(0, 7), (7, 8), (11, 17), (17, 19)], False, 20, 19),
                       4, 2, False, False),
    # non-causal ranges that tile a span not starting at 0 (queries) / ending early (keys)
    "offdiag_tiled": (Segments([(4, 8), (8, 11)], [(0, 9), (9, 10)], False, 14, 12),
                      6, 3, True, True),
    # one query row per segment (the kernel's max_q == 1 case), MHA
    "single_rows": (Segments([(1, 2), (4, 5), (7, 8)], [(0, 3), (3, 9), (9, 12)], False, 10, 12),
                    2, 2, False, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_flash_packing_matches_reference(name):
    segs, H, G, q_view, k_view = CASES[name]
    q, k, v = _qkv(segs.Tq, segs.Tk, H=H, G=G, seed=len(name))
    kern = FlashStandIn()
    op = DocAttention("flash", kernels=kern)
    o, lse = op.forward(q, k, v, segs, 0.3)
    o_r, lse_r = ref_forward(q, k, v, segs, 0.3)
    assert o.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == (segs.Tq, H)
    covered = _mask(segs.q, segs.Tq)
    torch.testing.assert_close(o, o_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse[covered], lse_r[covered].float(), rtol=1e-6, atol=1e-6)
    assert torch.isneginf(lse[~covered]).all() and (o[~covered] == 0).all()
    # the packing: slice views of the inputs where the ranges tile a span, gathers elsewhere
    _, kq, kk, kv = kern.calls[-1]
    assert (kq.data_ptr() == q[segs.q[0][0]:].data_ptr()) == q_view
    assert (kk.data_ptr() == k[segs.k[0][0]:].data_ptr()) == k_view
    assert kq.shape[0] == int(covered.sum())

    do = torch.randn_like(o)
    dq, dk, dv = op.backward(q, k, v, o_r, lse_r, do, segs, 0.3)
    want = ref_backward(q, k, v, o_r, lse_r, do, segs, 0.3)
    for got, w in zip((dq, dk, dv), want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)
    keys = _mask([b for a, b in zip(segs.q, segs.k) if a[1] > a[0]], segs.Tk)
    assert (dq[~covered] == 0).all() and (dk[~keys] == 0).all() and (dv[~keys] == 0).all()
    assert not any(key[0] == "mask" for key in segs._dev)  # no FlexAttention block mask built


def test_flash_rows_forms_match_the_full_forms():
    """forward_rows / backward_rows (what the ring merges) are the full results on the covered
    rows, for flash and for the reference alike."""
    segs, H, G, _, _ = CASES["offdiag_gather"]
    q, k, v = _qkv(segs.Tq, segs.Tk, H=H, G=G, seed=5)
    do = torch.randn(segs.Tq, H, v.shape[2], dtype=q.dtype)
    o, lse = ref_forward(q, k, v, segs, 0.3)
    for op in (DocAttention("flash", kernels=FlashStandIn()), DocAttention("reference")):
        rows, o_r, lse_r = op.forward_rows(q, k, v, segs, 0.3)
        o_f, lse_f = op.forward(q, k, v, segs, 0.3)
        assert rows.n == 10 and torch.equal(o_r, rows.take(o_f))
        assert torch.equal(lse_r, rows.take(lse_f))
        qr, kr, gq, gk, gv = op.backward_rows(q, k, v, o, lse, do, segs, 0.3)
        full = op.backward(q, k, v, o, lse, do, segs, 0.3)
        for got, w, rr in zip((gq, gk, gv), full, (qr, kr, kr)):
            torch.testing.assert_close(got, rr.take(w))


def test_flash_step_gradients_sum_to_the_merged_gradient():
    """Two key splits merged by log-sum-exp (a ring step's situation): each step's flash
    backward, given the merged (o, lse), adds up to the gradient over the union."""
    q, k, v = _qkv(7, 10, H=4, G=2, seed=3)
    a = Segments([(1, 7)], [(0, 4)], False, 7, 10)
    b = Segments([(1, 7)], [(4, 10)], False, 7, 10)
    full = Segments([(1, 7)], [(0, 10)], False, 7, 10)
    op = DocAttention("flash", kernels=FlashStandIn())
    (oa, la), (ob, lb) = op.forward(q, k, v, a, 0.5), op.forward(q, k, v, b, 0.5)
    lse = torch.logaddexp(la, lb)  # row 0 is in no segment: -inf stays -inf
    wa, wb = (torch.exp(x - lse).nan_to_num(0.0)[..., None] for x in (la, lb))
    o = (oa * wa + ob * wb).to(q.dtype)
    o_f, lse_f = ref_forward(q, k, v, full, 0.5)
    torch.testing.assert_close(o, o_f, rtol=1e-6, atol=1e-6)
    do = torch.randn_like(o)
    ga, gb = op.backward(q, k, v, o, lse, do, a, 0.5), op.backward(q, k, v, o, lse, do, b, 0.5)
    for x, y, z in zip(ga, gb, ref_backward(q, k, v, o_f, lse_f, do, full, 0.5)):
        torch.testing.assert_close(x + y, z, rtol=1e-5, atol=1e-6)


def test_flash_passes_the_kernel_its_dtypes():
    """bf16 inputs with an fp32 merged output and gradient (as the ring holds them): the kernel
    gets o/do in bf16 and the LSE in fp32 (the stand-in asserts it), and returns bf16."""
    segs = CASES["offdiag_gather"][0]
    q, k, v = _qkv(segs.Tq, segs.Tk, dtype=torch.bfloat16, seed=9)
    op = DocAttention("flash", kernels=FlashStandIn())
    o, lse = op.forward(q, k, v, segs, 0.3)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    o_r, lse_r = ref_forward(q, k, v, segs, 0.3)
    torch.testing.assert_close(o.float(), o_r, rtol=2e-2, atol=2e-2)
    do = torch.randn(o.shape)
    grads = op.backward(q, k, v, o_r, lse_r, do, segs, 0.3)  # o_r, do: fp32
    for got, w in zip(grads, ref_backward(q, k, v, o_r, lse_r, do, segs, 0.3)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), w.float(), rtol=3e-2, atol=3e-2)


def test_doc_softmax_op_flash_path_with_gradients():
    """The single-device op on the flash path (autograd through _DocAttnFn) against the
    per-document SDPA op; the segments are built once per cu_seqlens and reused by every layer."""
    cu = torch.tensor([0, 3, 4, 17, 40], dtype=torch.int32)
    q, k, v = _qkv(40, 40, H=4, G=2, K=16, dtype=torch.float32, seed=1)
    kern = FlashStandIn()
    outs = [op_with_grads(op, q, k, v, cu, 0.25)
            for op in (SoftmaxOp(), DocSoftmaxOp("flash", kernels=kern))]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    segs = cu._doc_segments[1]
    DocSoftmaxOp("flash", kernels=kern)(q, k, v, cu, 0.25)
    assert cu._doc_segments[1] is segs and [c[0] for c in kern.calls] == ["forward", "backward",
                                                                            "forward"]


def test_choice_of_implementation_and_its_errors():
    q, k, v = _qkv(4, 4, dtype=torch.float32)
    assert DocAttention().choose(q, v) == "reference"  # CPU
    with pytest.raises(RuntimeError, match=r"impl='flash'\) cannot run here: not on CUDA; use "
                                           r"impl='auto'"):
        DocAttention("flash").forward(q, k, v, Segments.from_cu([0, 4]), 1.0)
    with pytest.raises(ValueError, match="impl must be one of auto, flash, flex, flex_eager, "
                                         "reference, got 'flash2'"):
        DocAttention("flash2")
    ok = dict(dtype=torch.bfloat16, head_dim=128, v_head_dim=128, capability=(9, 0), built=True)
    assert flash_unsupported(**ok) is None
    assert flash_unsupported(**dict(ok, dtype=torch.float16)) is None
    for change, why in ((dict(dtype=torch.float32), "float32 inputs"),
                        (dict(head_dim=264, v_head_dim=264), "head dim 264"),
                        (dict(head_dim=60, v_head_dim=60), "head dim 60"),
                        (dict(v_head_dim=64), "value head dim 64"),
                        (dict(capability=(7, 5)), "compute capability 7.5"),
                        (dict(built=False), "no FlashAttention-2 kernel")):
        assert why in flash_unsupported(**dict(ok, **change))


def test_segments_must_not_overlap_for_flash():
    q, k, v = _qkv(10, 10)
    bad = Segments([(0, 5), (4, 8)], [(0, 2), (2, 4)], False, 10, 10)
    with pytest.raises(ValueError, match=r"Segments.q: ranges must be increasing, disjoint"):
        DocAttention("flash", kernels=FlashStandIn()).forward(q, k, v, bad, 1.0)


def test_no_segments_give_zeros_without_a_kernel_call():
    q, k, v = _qkv(6, 5)
    kern = FlashStandIn()
    op = DocAttention("flash", kernels=kern)
    segs = Segments([(2, 2)], [(0, 5)], False, 6, 5)
    o, lse = op.forward(q, k, v, segs, 1.0)
    assert (o == 0).all() and torch.isneginf(lse).all()
    grads = op.backward(q, k, v, o, lse, torch.ones_like(o), segs, 1.0)
    assert all((g == 0).all() for g in grads) and not kern.calls
    assert math.isinf(float(lse.max()))
