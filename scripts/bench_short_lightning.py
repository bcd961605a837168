"""Short-sequence lightning attention on one GPU (issue 9, scope 4): wall, kernel and host time of
one forward+backward, against FLA 0.6 ``chunk_simple_gla`` in the same process.

    python3 scripts/bench_short_lightning.py [--T 4096,8192,16384] [--H 8] [--profile 8192]

Per T (B = 1, d = 128, bf16): ``wall`` = ``do_bench`` of one forward+backward (what a caller
waits for); ``kernels`` = the profiler's GPU time of one forward+backward; ``host`` = the time to
enqueue one (20 calls without synchronising, the GPU idle enough not to be the limit). ``auto``
is the kernel's own choice of single pass or sequence split, ``seg0`` forces the single pass.
``--profile T`` prints a cProfile of the host side of 50 calls at that T.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from mmtrain.kernels.lightning import lightning_attn
from mmtrain.model.layers import lightning_slopes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="4096,8192,16384")
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--profile", type=int, default=0)
    a = ap.parse_args()
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # noqa: BLE001
        chunk_simple_gla = None
        print(f"FLA not importable: {e!r}")
    H = a.H
    for T in (int(t) for t in a.T.split(",")):
        q, k, v = (torch.randn(1, T, H, 128, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        s = lightning_slopes(0, 80, H).float().cuda()  # layer 0 of MiniMax-Text-01's 80
        do = torch.randn_like(v)
        auto_ms = None
        for name, seg in (("auto", None), ("seg0", 0)):
            def f(seg=seg):
                o, _ = lightning_attn(q, k, v, s, seg_len=seg)
                o.backward(do)
            ms = do_bench(f, warmup=20, rep=100)
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(5):
                    f()
                torch.cuda.synchronize()
            kt = sum(e.self_device_time_total for e in p.key_averages()
                     if e.self_device_time_total > 0) / 5 / 1e3
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                f()
            host = (time.perf_counter() - t) / 20 * 1e3
            torch.cuda.synchronize()
            if name == "auto":
                auto_ms = ms
            print(f"H={H} T={T} {name:<5} wall {ms:.3f} ms  kernels {kt:.3f} ms  "
                  f"host {host:.3f} ms", flush=True)
            if T == a.profile and name == "auto":
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(50):
                    f()
                pr.disable()
                torch.cuda.synchronize()
                sio = io.StringIO()
                pstats.Stats(pr, stream=sio).sort_stats("tottime").print_stats(30)
                print(sio.getvalue()[:6000])
        if chunk_simple_gla is not None:
            def ff():
                o, _ = chunk_simple_gla(q, k, v, g_gamma=-s, scale=1.0)
                o.backward(do)
            ms = do_bench(ff, warmup=20, rep=100)
            print(f"H={H} T={T} FLA   wall {ms:.3f} ms  (auto: {ms / auto_ms:.2f}x FLA)",
                  flush=True)


if __name__ == "__main__":
    main()
