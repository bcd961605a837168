"""Benchmark lightning attention on one GPU, in one process (issue 4).

mmtrain's Triton kernel, FLA's chunk_simple_gla(q, k, v, g_gamma=-slopes, scale=1.0) (when
importable; the same function) and torch SDPA causal attention, for B = 1, d = 128, bf16,
forward and forward+backward. Prints ms, tokens/s, achieved GB/s (minimum bytes / time) against the
measured device copy bandwidth, and mmtrain's speed-up over FLA; the table comes last; --json
writes every number.

Minimum bytes (each input read once, each output written once, bf16, states negligible):
    forward           q, k, v read, o written             8 * T * H * d bytes
    forward+backward  + q, k, v, do read, dq, dk, dv written  22 * T * H * d bytes

    python scripts/bench_lightning.py [--T 4096,16384,...] [--H 64,8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch
import triton
from triton.testing import do_bench

from mmtrain.kernels.lightning import lightning_attn
from mmtrain.model.layers import lightning_slopes


def slopes_for(H, layer=0, L=80):
    """The slopes of layer ``layer`` of ``L`` (the model's own formula)."""
    return lightning_slopes(layer, L, H).float()


def copy_bandwidth():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() / ms / 1e6  # GB/s, read + write


def get_fla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla
        import fla
        return chunk_simple_gla, getattr(fla, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        print(f"FLA not importable: {e!r}")
        return None, None


def bench_one(fn_fwd, inputs, mode, rep_ms):
    """Median ms of the forward or forward+backward of fn_fwd(*inputs) -> o."""
    q, k, v = inputs[:3]
    if mode == "fwd":
        def f():
            with torch.no_grad():
                fn_fwd(*inputs)
    else:
        do = torch.randn_like(v)

        def f():
            for x in (q, k, v):
                x.grad = None
            o = fn_fwd(*inputs)
            o.backward(do)
    f()
    torch.cuda.synchronize()
    return do_bench(f, warmup=max(5, rep_ms // 10), rep=rep_ms, return_mode="median")


def sweep(points, variants, rep_ms=100):
    """Time one forward scan (kernel only) under several knob settings (MMTRAIN_LA_* env)."""
    from mmtrain.kernels.lightning import triton_scan as ts
    dev = torch.device("cuda")
    out = []
    for H, T, reverse in points:
        d = 128
        g = torch.Generator(device=dev).manual_seed(1)
        q, k, v = ((torch.randn(T, H, d, device=dev, generator=g) * 0.3).to(torch.bfloat16)
                   for _ in range(3))
        sl = slopes_for(H).to(dev)
        ref = None
        for var in variants:
            old = {k_: os.environ.get(k_) for k_ in var}
            os.environ.update({k_: str(v_) for k_, v_ in var.items()})
            try:
                cfg = ts._cfg(d, d, q.dtype, dev)
                seg = ts.choose_seg_len([(0, T)], H, -(-d // cfg["BV"]), dev)
                plan = ts.get_plan([(0, T)], seg, dev)
                f = lambda: ts.scan_attention(q, k, v, sl, plan, reverse=reverse)  # noqa: E731
                o = f()[0]
                err = 0.0 if ref is None else ((o.float() - ref).norm() / ref.norm()).item()
                if ref is None:
                    ref = o.float()
                ms = do_bench(f, warmup=20, rep=rep_ms, return_mode="median")
            except Exception as e:  # noqa: BLE001
                ms, err = float("nan"), repr(e)[:80]
            finally:
                for k_, v_ in old.items():
                    if v_ is None:
                        os.environ.pop(k_, None)
                    else:
                        os.environ[k_] = v_
            gbps = 8 * T * H * d / ms / 1e6
            print(f"sweep H={H} T={T} rev={int(reverse)} {var} seg={seg}: {ms:.3f} ms "
                  f"{gbps:.0f} GB/s err={err}", flush=True)
            out.append({"H": H, "T": T, "reverse": reverse, "var": var, "seg": seg, "ms": ms,
                        "GBps": gbps})
        del q, k, v, ref
        torch.cuda.empty_cache()
    return out


def profile(points, fla_fn):
    """Per-kernel GPU time of one forward+backward, mmtrain and FLA (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile as tprof
    dev = torch.device("cuda")
    out = []
    for H, T in points:
        d = 128
        g = torch.Generator(device=dev).manual_seed(2)
        q, k, v = ((torch.randn(1, T, H, d, device=dev, generator=g) * 0.3).to(torch.bfloat16)
                   .requires_grad_() for _ in range(3))
        do = torch.randn_like(v)
        sl = slopes_for(H).to(dev)
        impls = {"mmtrain": lambda: lightning_attn(q, k, v, sl)[0]}
        if fla_fn is not None:
            impls["fla"] = lambda: fla_fn(q, k, v, g_gamma=-sl, scale=1.0)[0]
        for name, fn in impls.items():
            def step():
                for x in (q, k, v):
                    x.grad = None
                fn().backward(do)
            for _ in range(2):
                step()
            torch.cuda.synchronize()
            with tprof(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            rows = []
            for ev in prof.key_averages():
                t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
                if t > 0:
                    rows.append((ev.key, ev.count, t / 1e3))
            rows.sort(key=lambda r: -r[2])
            tot = sum(r[2] for r in rows)
            print(f"profile H={H} T={T} {name}: total kernel time {tot:.3f} ms")
            for key, cnt, ms in rows[:8]:
                print(f"    {ms:8.3f} ms  x{cnt:<3d} {key[:90]}")
            out.append({"H": H, "T": T, "impl": name, "total_ms": tot,
                        "kernels": [{"name": r[0][:120], "count": r[1], "ms": r[2]} for r in rows[:12]]})
        del q, k, v, do
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true", help="per-kernel times at the target points")
    ap.add_argument("--sweep", action="store_true", help="time kernel knob variants first")
    ap.add_argument("--T", default="4096,16384,65536,131072,524288")
    ap.add_argument("--H", default="64,8")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--impls", default="mmtrain,fla,sdpa")
    ap.add_argument("--rep", type=int, default=200, help="ms of timed repeats per point")
    ap.add_argument("--sdpa-max", type=int, default=1 << 20,
                    help="skip SDPA above this T*H (quadratic cost)")
    ap.add_argument("--mem-limit-gb", type=float, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    mem_gb = args.mem_limit_gb or props.total_memory / 1e9
    bw = copy_bandwidth()
    fla_fn, fla_ver = get_fla() if "fla" in args.impls else (None, None)
    env = {"device": torch.cuda.get_device_name(), "sms": props.multi_processor_count,
           "torch": torch.__version__, "triton": triton.__version__, "fla": fla_ver,
           "python": platform.python_version(), "copy_GBps": round(bw, 1),
           "knobs": {k: v for k, v in os.environ.items() if k.startswith("MMTRAIN_LA_")}}
    print(env, flush=True)
    sweep_rows = []
    if args.sweep:
        variants = [{"MMTRAIN_LA_SEG": 0, "MMTRAIN_LA_STAGES": 2}, {},
                    {"MMTRAIN_LA_STAGES": 4}, {"MMTRAIN_LA_BV": 32},
                    {"MMTRAIN_LA_BV": 32, "MMTRAIN_LA_STAGES": 4},
                    {"MMTRAIN_LA_WARPS": 8, "MMTRAIN_LA_BV": 128},
                    {"MMTRAIN_LA_BT": 128, "MMTRAIN_LA_WARPS": 8},
                    {"MMTRAIN_LA_SEG": 16384}]
        sweep_rows += sweep([(64, 131072, False)], variants)
        variants8 = [{}, {"MMTRAIN_LA_SEG": 16384}, {"MMTRAIN_LA_SEG": 65536},
                     {"MMTRAIN_LA_STAGES": 4}, {"MMTRAIN_LA_BV": 32}]
        sweep_rows += sweep([(8, 524288, False)], variants8)
    prof_rows = profile([(64, 131072), (8, 524288)], fla_fn) if args.profile else []
    d = args.d
    results = []
    for H in [int(x) for x in args.H.split(",")]:
        sl = slopes_for(H).to(dev)
        for T in [int(x) for x in args.T.split(",")]:
            elems = T * H * d
            for mode in args.modes.split(","):
                # tensors alive: q,k,v,o (+do,dq,dk,dv) bf16, plus FLA's per-chunk fp32 states
                need = elems * 2 * (4 if mode == "fwd" else 8) + (T // 64) * H * d * d * 4 * 2
                if need > 0.8 * mem_gb * 1e9:
                    print(f"skip H={H} T={T} {mode}: ~{need / 1e9:.0f} GB")
                    continue
                g = torch.Generator(device=dev).manual_seed(T + H)
                mk = lambda: (torch.randn(1, T, H, d, device=dev, generator=g) * 0.3  # noqa: E731
                              ).to(torch.bfloat16).requires_grad_(mode != "fwd")
                q, k, v = mk(), mk(), mk()
                min_bytes = (8 if mode == "fwd" else 22) * elems
                row = {"H": H, "T": T, "d": d, "mode": mode, "min_bytes": min_bytes}
                impls = {}
                if "mmtrain" in args.impls:
                    impls["mmtrain"] = (lambda q_, k_, v_: lightning_attn(q_, k_, v_, sl)[0],
                                        (q, k, v))
                if fla_fn is not None:
                    impls["fla"] = (lambda q_, k_, v_: fla_fn(q_, k_, v_, g_gamma=-sl,
                                                              scale=1.0)[0], (q, k, v))
                if "sdpa" in args.impls and T * H <= args.sdpa_max:
                    qt, kt, vt = (x.detach().transpose(1, 2).contiguous()
                                  .requires_grad_(mode != "fwd") for x in (q, k, v))
                    impls["sdpa"] = (lambda q_, k_, v_: torch.nn.functional
                                     .scaled_dot_product_attention(q_, k_, v_, is_causal=True),
                                     (qt, kt, vt))
                for name, (fn, inp) in impls.items():
                    try:
                        ms = bench_one(fn, inp, mode, args.rep)
                    except torch.cuda.OutOfMemoryError:
                        ms = float("nan")
                        print(f"OOM {name} H={H} T={T} {mode}")
                    torch.cuda.empty_cache()
                    row[name + "_ms"] = ms
                    gbps = min_bytes / ms / 1e6
                    row[name + "_GBps"] = gbps
                    print(f"H={H:3d} T={T:7d} {mode:6s} {name:8s} {ms:9.3f} ms "
                          f"{T / ms * 1e3:12.0f} tok/s {gbps:7.0f} GB/s "
                          f"({gbps / bw * 100:4.1f}% of copy)", flush=True)
                if "fla_ms" in row and "mmtrain_ms" in row:
                    row["speedup_vs_fla"] = row["fla_ms"] / row["mmtrain_ms"]
                results.append(row)
                del q, k, v, impls
                torch.cuda.empty_cache()

    print(f"\n{env['device']}  torch {env['torch']}  triton {env['triton']}  fla {fla_ver}  "
          f"copy {bw:.0f} GB/s (read+write)")
    hdr = (f"{'H':>3} {'T':>7} {'mode':6} | {'mmtrain ms':>10} {'tok/s':>10} {'GB/s':>6} {'%copy':>5} |"
           f" {'FLA ms':>9} {'x FLA':>6} | {'SDPA ms':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        m = r.get("mmtrain_ms", float("nan"))
        gb = r.get("mmtrain_GBps", float("nan"))
        print(f"{r['H']:3d} {r['T']:7d} {r['mode']:6} | {m:10.3f} {r['T'] / m * 1e3:10.3g} "
              f"{gb:6.0f} {gb / bw * 100:5.1f} | {r.get('fla_ms', float('nan')):9.3f} "
              f"{r.get('speedup_vs_fla', float('nan')):6.2f} | {r.get('sdpa_ms', float('nan')):9.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "results": results, "sweep": sweep_rows,
                       "profile": prof_rows}, fh, indent=1)


if __name__ == "__main__":
    main()
