"""GPU check of DocAttention's ``flash`` implementation (torch's FlashAttention-2 varlen kernel)
on the segment sets ring attention uses, against the fp32 torch reference and FlexAttention;
then per-call timings of flash vs flex. Prints one PASS/FAIL line per check and exits non-zero
on any FAIL; the last line gives the wall time. Sized to finish within two minutes on an H200,
most of it compiling FlexAttention (``--skip-flex`` leaves FlexAttention out).

    python scripts/check_flash_segments.py                 # H200: every check, then timings
    python scripts/check_flash_segments.py --skip-flex     # flash vs the reference only
    python scripts/check_flash_segments.py --cpu-smoke     # CPU plumbing run (kernel stand-in)

Per head layout (GQA H=8 over G=2 and H=64 over G=8, head dim 128, bf16, T query rows), three
ring-like steps on the same query rows, each with its own K/V (the merged result is what the
ring holds after all its hops):

* ``diag``: causal, packed documents tiling the rows (log-uniform lengths, some of length 1);
* ``offdiag``: non-causal, query ranges with gaps (the first not at row 0; rows in no range)
  against key ranges of other lengths, like an off-diagonal hop;
* ``rows1``: non-causal, single query rows (the kernel's max_seqlen_q == 1 path, whose GQA
  layout trick must still return the LSE as [H, total_q]).

Checks, per step: forward o and lse of flash against the fp32 reference and against flex (max
relative error of o over all rows, max absolute error of lse over covered rows; uncovered rows
exactly o = 0, lse = -inf); backward dq, dk, dv given the *merged* (o, lse) of the three steps
(o in bf16, as the ring saves it) against the reference and flex (max relative error). Tolerance
2e-2 (bf16 inputs, outputs and P; errors around 5e-3 are typical), lse 2e-2 absolute.

Timings (median ms per call after warm-up, CUDA synchronised): forward and forward+backward of
each step on flash vs flex (the block mask / packing cached, as the ring reuses them across
layers), and the one-off cost per new Segments of building flex's block mask vs flash's packing.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo (for --cpu-smoke)

from mmtrain.model.doc_attention import (DocAttention, Segments, doc_block_mask,  # noqa: E402
                                         ref_backward, ref_forward)

TOL, LSE_TOL = 2e-2, 2e-2
RESULTS = []


def report(name, err, tol):
    ok = err <= tol  # NaN fails
    RESULTS.append(ok)
    print(f"{'PASS' if ok else 'FAIL'} {name}: {err:.2e} (tol {tol:.0e})", flush=True)


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# ------------------------------------------------------------------------------- segment sets
def packed_docs(T, max_doc, g):
    """Causal documents tiling [0, T): log-uniform lengths in [2, max_doc], a sixth of them 1."""
    cu = [0]
    while cu[-1] < T:
        u = float(torch.rand((), generator=g))
        n = 1 if u < 1 / 6 else int(math.exp(math.log(2) + float(torch.rand((), generator=g))
                                             * (math.log(max_doc) - math.log(2))))
        cu.append(min(cu[-1] + max(n, 1), T))
    return Segments.from_cu(cu, T)


def cut_points(lo, hi, n, g):
    """n sorted distinct ints in [lo, hi)."""
    return sorted(int(x) + lo for x in torch.randperm(hi - lo, generator=g)[:n])


def offdiag(T, Tk, n, g):
    """n non-causal segments: query ranges with gaps (never from row 0), key ranges of other
    lengths (increasing, disjoint)."""
    qp, kp = cut_points(1, T, 2 * n, g), cut_points(0, Tk + 1, 2 * n, g)
    return Segments(list(zip(qp[::2], qp[1::2])), list(zip(kp[::2], kp[1::2])), False, T, Tk)


def single_rows(T, Tk, n, g):
    qp, kp = cut_points(1, T, n, g), cut_points(0, Tk + 1, 2 * n, g)
    return Segments([(p, p + 1) for p in qp], list(zip(kp[::2], kp[1::2])), False, T, Tk)


def covered(segs):
    m = torch.zeros(segs.Tq, dtype=torch.bool)
    for a, b in segs.q:
        m[a:b] = True
    return m


def key_rows(segs):
    m = torch.zeros(segs.Tk, dtype=torch.bool)
    for a, b in segs.k:
        m[a:b] = True
    return m


# ------------------------------------------------------------------------------------ checks
def check_layout(H, G, T, dev, dt, impls, g, max_doc):
    K = 128
    gd = torch.Generator(device=dev).manual_seed(H)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=gd, device=dev) * sc).to(dt)  # noqa: E731
    q = mk(T, H, K, sc=0.5)
    steps = {"diag": packed_docs(T, max_doc, g), "offdiag": offdiag(T, T, 6, g),
             "rows1": single_rows(T, T, 48, g)}
    kv = {name: (mk(T, G, K, sc=0.5), mk(T, G, K)) for name in steps}
    scale = 1 / math.sqrt(K)
    tag = f"H={H} G={G}"
    # the reference per step, in fp32 from the same bf16 inputs, and the merged (o, lse)
    ref = {n: ref_forward(q, *kv[n], s, scale) for n, s in steps.items()}
    lse_m = torch.logsumexp(torch.stack([r[1] for r in ref.values()]), 0)
    o_m = sum(torch.exp(r[1] - lse_m).nan_to_num(0.0)[..., None] * r[0] for r in ref.values())
    o_m = o_m.to(dt)  # as the ring saves it
    do = mk(T, H, K)
    for name, segs in steps.items():
        try:
            check_step(f"{tag} {name}", q, kv[name], segs, ref[name], o_m, lse_m, do, impls,
                       scale, dev)
        except Exception as exc:  # noqa: BLE001 - reported as a FAIL, the other steps go on
            RESULTS.append(False)
            print(f"FAIL {tag} {name}: raised {type(exc).__name__}: {exc}", flush=True)
    return q, kv, steps, o_m, lse_m, do


def check_step(tag, q, kv, segs, ref, o_m, lse_m, do, impls, scale, dev):
    """One step's checks (see the module docstring); ``ref`` its reference (o, lse)."""
    cov, keys = covered(segs).to(dev), key_rows(segs).to(dev)
    fwd, bwd = {}, {}
    for impl, op in impls.items():
        fwd[impl] = op.forward(q, *kv, segs, scale)
        if impl != "flex" or dev.type == "cuda":  # eager flex has no CPU backward
            bwd[impl] = op.backward(q, *kv, o_m, lse_m, do, segs, scale)
    o_f, lse_f = fwd["flash"]
    report(f"{tag}: flash forward o vs reference", rel(o_f, ref[0]), TOL)
    report(f"{tag}: flash forward lse vs reference (abs)",
           float((lse_f[cov] - ref[1][cov]).abs().max()), LSE_TOL)
    report(f"{tag}: flash uncovered rows o = 0, lse = -inf (count wrong)",
           float((o_f[~cov] != 0).sum() + (~torch.isneginf(lse_f[~cov])).sum()), 0)
    if "flex" in fwd:
        report(f"{tag}: flash forward o vs flex", rel(o_f, fwd["flex"][0]), TOL)
        report(f"{tag}: flash forward lse vs flex (abs)",
               float((lse_f[cov] - fwd["flex"][1][cov]).abs().max()), LSE_TOL)
    want = ref_backward(q, *kv, o_m, lse_m, do, segs, scale)
    for i, gname in enumerate(("dq", "dk", "dv")):
        report(f"{tag}: flash backward {gname} (merged o/lse) vs reference",
               rel(bwd["flash"][i], want[i]), TOL)
        if "flex" in bwd:
            report(f"{tag}: flash backward {gname} vs flex", rel(bwd["flash"][i], bwd["flex"][i]),
                   TOL)
    dq, dk, dv = bwd["flash"]
    report(f"{tag}: flash zero gradients outside the segments (count wrong)",
           float((dq[~cov] != 0).sum() + (dk[~keys] != 0).sum() + (dv[~keys] != 0).sum()), 0)


# ------------------------------------------------------------------------------------ timing
def median_ms(fn, dev, warmup, iters):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def time_layout(tag, q, kv, steps, o_m, lse_m, do, dev, impls, a):
    scale = 1 / math.sqrt(q.shape[-1])
    for name, segs in steps.items():
        try:
            ms = {}
            for impl, op in impls.items():
                f = lambda: op.forward(q, *kv[name], segs, scale)  # noqa: E731
                fb = lambda: (op.forward(q, *kv[name], segs, scale),  # noqa: E731
                              op.backward(q, *kv[name], o_m, lse_m, do, segs, scale))
                ms[impl] = (median_ms(f, dev, a.warmup, a.iters),
                            median_ms(fb, dev, a.warmup, a.iters))
            fresh = lambda: Segments(segs.q, segs.k, segs.causal, segs.Tq, segs.Tk)  # noqa: E731
            pack = median_ms(lambda: fresh().packing(dev), dev, 1, a.iters)
            mask = median_ms(lambda: doc_block_mask(*fresh().doc_tensors(dev), segs.causal,
                                                    segs.Tq, segs.Tk), dev, 1, a.iters)
        except Exception as exc:  # noqa: BLE001 - reported as a FAIL, the other steps go on
            RESULTS.append(False)
            print(f"FAIL time {tag} {name}: raised {type(exc).__name__}: {exc}", flush=True)
            continue
        row = [f"{i} fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms" for i, (f, fb) in ms.items()]
        if len(ms) == 2:
            row.append(f"flex/flash fwd {ms['flex'][0] / ms['flash'][0]:.2f}x, fwd+bwd "
                       f"{ms['flex'][1] / ms['flash'][1]:.2f}x")
        print(f"time {tag} {name} ({len(segs)} segments, {int(covered(segs).sum())} query "
              f"rows): " + "; ".join(row) + f"; per new Segments: flash packing {pack:.3f} ms, "
              f"flex block mask {mask:.3f} ms", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=16384, help="query rows per step (default 16384)")
    ap.add_argument("--skip-flex", action="store_true", help="flash vs the reference only")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny sizes on CPU; the kernel replaced by tests/flash_standin.py")
    a = ap.parse_args()
    t0 = time.time()
    g = torch.Generator().manual_seed(0)
    if a.cpu_smoke:
        from tests.flash_standin import FlashStandIn

        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

        dev, T, layouts, max_doc = torch.device("cpu"), 96, ((4, 2),), 24
        impls = {"flash": DocAttention("flash", kernels=FlashStandIn())}
        if not a.skip_flex:
            impls["flex"] = DocAttention("flex_eager")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU visible; use --cpu-smoke for a CPU plumbing run")
        dev, T, layouts, max_doc = torch.device("cuda"), a.T, ((8, 2), (64, 8)), 4096
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        impls = {"flash": DocAttention("flash")}
        if not a.skip_flex:
            impls["flex"] = DocAttention("flex")
        print(f"device {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
              f"T={T}, bf16, head dim 128", flush=True)
    dt = torch.bfloat16
    timed = []
    for H, G in layouts:
        timed.append((f"H={H} G={G}",) + check_layout(H, G, T, dev, dt, impls, g, max_doc))
    if dev.type == "cuda" or a.cpu_smoke:
        for args in timed:
            time_layout(*args, dev, impls if dev.type == "cuda" else {"flash": impls["flash"]},
                        a)
    bad = RESULTS.count(False)
    print(f"{'PASS' if not bad else 'FAIL'}: {len(RESULTS) - bad}/{len(RESULTS)} checks passed "
          f"({time.time() - t0:.0f} s)", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
