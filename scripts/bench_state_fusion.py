"""Would LASP+'s state pass pay for itself fused into the qkv projection? (issue 10)

    python scripts/bench_state_fusion.py --out fusion.json      # one GPU
    python scripts/bench_state_fusion.py --cpu-smoke            # CPU, tiny sizes, no compile

LASP+ needs every piece's local state ``Σ λ^(end-t) k_tᵀ v_t`` before the piece's outputs, so it
reads k and v once more than the CP=1 op does (the *state pass*; the backward does the same over
q and dO). At H = 64 those two passes run at the HBM limit and cap the op's CP=2 / CP=1 ratio near
0.86 (docs/benchmarks.md). The one place in a forward that already reads k and v is the kernel
that makes them: the qkv projection, whose output the layer passes through SiLU. A fused kernel
(Triton GEMM, SiLU and the decayed ``kᵀ v`` in its epilogue) would get the states for the cost of
the epilogue, but only if that Triton GEMM is about as fast as cuBLAS at the layer's shape.

For each shape (the layers of ``bench_context_layer``) and ``--tokens`` tokens, this times:

* ``cublas``: the projection as the layer runs it (``F.linear``, cuBLAS) and ``silu`` after it;
* ``state``: the state pass over the SiLU'd k and v views (``triton_scan.local_states``) on the
  items LASP+ runs: one rank's four pieces under two zigzag rounds, split further where they
  would leave SMs idle; checked against each item's final state from the op (the same sums by
  definition);
* ``triton``: the best Triton GEMM that torch's inductor finds (``max-autotune``, Triton
  templates only; ``--tma`` adds its persistent TMA templates), with the SiLU fused into its
  epilogue, and without; checked against cuBLAS.

``room = cublas + silu + state - triton_silu``: what a fused kernel may spend on its state
epilogue and still beat today's three kernels. A negative room means the Triton GEMM with the
SiLU alone is already slower than cuBLAS, the SiLU and the state pass together, so the fusion
cannot pay at that shape (whatever the epilogue costs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_context as bc  # noqa: E402
from bench_context_layer import SHAPES  # noqa: E402

from mmtrain.kernels.lightning import triton_scan as ts  # noqa: E402
from mmtrain.kernels.lightning.autograd import _slog2, lightning_attn  # noqa: E402
from mmtrain.model.layers import lightning_slopes  # noqa: E402

PIECES = 4  # one rank's pieces under two zigzag rounds (parallel.cp_zigzag_rounds=0 at 128K+)


def check_states(s_loc, k, v, slopes, bounds):
    """Max relative error of the state pass against each item's final state from the op."""
    worst = 0.0
    for i, (a, b) in enumerate(bounds):
        q = torch.zeros_like(k[a:b])
        _, s = lightning_attn(q[None], k[a:b][None], v[a:b][None], slopes,
                              output_final_state=True)
        ref = s[0].float()
        worst = max(worst, float((s_loc[i] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    return worst


def compiled(fn, dev, tma=False, search="DEFAULT"):
    """fn under inductor's max-autotune with Triton GEMM templates only (None on CPU); ``tma``
    adds the persistent TMA templates (Hopper), ``search`` the config search space."""
    if dev.type != "cuda":
        return None
    import torch._inductor.config as icfg
    icfg.max_autotune_gemm_backends = "TRITON"
    icfg.triton.enable_persistent_tma_matmul = bool(tma)
    icfg.max_autotune_gemm_search_space = search
    return torch.compile(fn, mode="max-autotune-no-cudagraphs", dynamic=False)


def bench_shape(name, T, a):
    D, H, K, H_all = SHAPES[name]
    dev, dt = bc.DEV, torch.bfloat16 if bc.DEV.type == "cuda" else torch.float32
    row = {"shape": name, "D": D, "H": H, "tokens": T, "pieces": PIECES}
    x = bc.rand((T, D), 1, 1.0, dt)
    w = bc.rand((3 * H * K, D), 2, D ** -0.5, dt)
    y = F.linear(x, w)
    row["cublas_ms"] = bc.timeit(lambda: F.linear(x, w), a.warmup, a.iters) * 1e3
    row["silu_ms"] = bc.timeit(lambda: F.silu(y), a.warmup, a.iters) * 1e3

    qkv = F.silu(y).view(T, H, 3 * K)
    k, v = qkv[..., K:2 * K], qkv[..., 2 * K:]
    slopes = lightning_slopes(0, 80, H_all)[:H].float().to(dev)
    step = T // PIECES
    bounds = [(i * step, T if i == PIECES - 1 else (i + 1) * step) for i in range(PIECES)]
    # the items LASP+ runs: the pieces, split further where they leave SMs idle (at H = 8 the
    # CP=1 op splits its sequence too, so there the state pass is not LASP+'s alone)
    n_vtiles = -(-K // ts._cfg(K, K, dt, dev)["BV"])  # the out pass's programs a head
    seg = ts.choose_seg_len(bounds, H, n_vtiles, dev)
    plan = ts.get_plan(bounds, seg, dev, two_pass=True)
    row["items"] = plan.n_items
    slog2 = _slog2(slopes, dev)
    s_loc = ts.local_states(k, v, slog2, plan)
    row["state_max_rel_err"] = check_states(s_loc, k, v, slopes,
                                            list(zip(plan.host_bos, plan.host_eos)))
    row["state_ms"] = bc.timeit(lambda: ts.local_states(k, v, slog2, plan), a.warmup,
                                a.iters) * 1e3
    row["state_GBps"] = 2 * k.numel() * k.element_size() / (row["state_ms"] * 1e-3) / 1e9

    for key, fn in (("triton", lambda x_, w_: F.linear(x_, w_)),
                    ("triton_silu", lambda x_, w_: F.silu(F.linear(x_, w_)))):
        cf = compiled(fn, dev, a.tma, a.search)
        if cf is None:
            row[f"{key}_ms"] = None
            continue
        try:
            got = cf(x, w)
        except Exception as e:  # noqa: BLE001 - an inductor template that fails to build
            row[f"{key}_ms"] = None
            row[f"{key}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            bc.log(f"{name}: {key} not measured: {row[key + '_error']}")
            continue
        ref = fn(x, w)
        row[f"{key}_max_rel_err"] = float((got.float() - ref.float()).abs().max()
                                          / ref.float().abs().max())
        row[f"{key}_ms"] = bc.timeit(lambda: cf(x, w), a.warmup, a.iters) * 1e3
    flops = 2.0 * T * D * 3 * H * K
    row["cublas_TFLOPs"] = flops / (row["cublas_ms"] * 1e-3) / 1e12
    if row["triton_ms"] is not None:
        row["triton_TFLOPs"] = flops / (row["triton_ms"] * 1e-3) / 1e12
    if row["triton_silu_ms"] is not None:
        row["triton_silu_TFLOPs"] = flops / (row["triton_silu_ms"] * 1e-3) / 1e12
        row["room_ms"] = row["cublas_ms"] + row["silu_ms"] + row["state_ms"] - row["triton_silu_ms"]
    else:
        row["room_ms"] = None
    bc.log(" ".join(f"{k_}={v_:.4g}" if isinstance(v_, float) else f"{k_}={v_}"
                    for k_, v_ in row.items()))
    del x, w, y, qkv
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def table(rows) -> str:
    def f(v, p=2):
        return "n/a" if v is None else f"{v:.{p}f}"
    out = ["", "qkv projection vs the state pass (ms; room = cublas + silu + state - triton+silu: "
           "what a fused state epilogue may cost)",
           f"{'shape':>12} {'D':>5} {'H':>3} {'tokens':>8} {'items':>5} | {'cublas':>8} {'TFLOP/s':>7} "
           f"{'silu':>6} {'state':>6} {'GB/s':>6} | {'triton':>8} {'TFLOP/s':>7} "
           f"{'triton+silu':>11} | {'room':>7}"]
    for r in rows:
        out.append(f"{r['shape']:>12} {r['D']:>5} {r['H']:>3} {r['tokens']:>8} {r['items']:>5} | "
                   f"{f(r['cublas_ms']):>8} {f(r['cublas_TFLOPs'], 0):>7} {f(r['silu_ms']):>6} "
                   f"{f(r['state_ms']):>6} {f(r['state_GBps'], 0):>6} | {f(r['triton_ms']):>8} "
                   f"{f(r.get('triton_TFLOPs'), 0):>7} {f(r['triton_silu_ms']):>11} | "
                   f"{f(r['room_ms']):>7}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="minimax,minimax_tp8,bench1b",
                    help="comma list of: " + ", ".join(sorted(SHAPES)))
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny sizes on CPU (the state pass under Triton's interpreter; the "
                    "compiled GEMMs are not run)")
    ap.add_argument("--tma", action="store_true",
                    help="let inductor also try its persistent TMA GEMM templates")
    ap.add_argument("--search", default="DEFAULT", choices=("DEFAULT", "EXHAUSTIVE"),
                    help="inductor's GEMM config search space")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=None, help="write every number as JSON here")
    a = ap.parse_args()
    names = [s for s in a.shapes.split(",") if s]
    bad = [s for s in names if s not in SHAPES]
    if bad or not names:
        raise SystemExit(f"--shapes: unknown {bad}; give a comma list of {sorted(SHAPES)}")
    if a.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # the state pass is a Triton kernel (read per call)
        bc.DEV = torch.device("cpu")
        if a.shapes == ap.get_default("shapes"):
            names = ["smoke"]
        if a.tokens == ap.get_default("tokens"):
            a.tokens = 256
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --cpu-smoke (tiny sizes on CPU)")
    else:
        bc.DEV = torch.device("cuda", 0)
    if a.tokens % PIECES:
        raise SystemExit(f"--tokens: {a.tokens} does not divide into {PIECES} pieces")
    rows = [bench_shape(n, a.tokens, a) for n in names]
    res = {"rows": rows, "tma": a.tma, "search": a.search, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(0) if bc.DEV.type == "cuda" else platform.processor(),
           "torch": torch.__version__}
    print(table(rows), flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
