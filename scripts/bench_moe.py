"""The MoE layer on the GPU: grouped-GEMM experts against the per-expert loop, and the EP/ETP
all-to-all dispatcher with and without EP-ETP overlap.

    python scripts/bench_moe.py --mode local [--old PATH] --out moe_local.json
    torchrun --nproc-per-node 2 scripts/bench_moe.py --mode dist --out moe_dist.json
    python scripts/bench_moe.py --mode local --cpu-smoke        # tiny shapes, CPU, no timing claims

**local** (one GPU), MiniMax expert shapes D=6144, F=9216, bf16:
  * expert GEMMs: n rows routed to the 4 local experts (4 of 32, as one EP=8 rank holds), balanced
    and skewed (50/25/15/10 %), forward+backward of :class:`mmtrain.model.moe.GroupedSwiGLU`
    (``torch._grouped_mm``) against the per-expert loop of the previous implementation
    (``--old``: a checkout of it, whose ``mmtrain/model/moe.py`` is loaded by path); TFLOP/s =
    18·n·D·F / time (forward 3 GEMMs, backward 6);
  * the whole layer (router, top-2 of 4, permute, experts, combine, aux) at 8K–32K tokens, new
    against old.
**dist** (one process a GPU, NCCL): 32 experts, top-2, 16K tokens a rank, EP=world and ETP=world
(and EP×ETP with 4+ GPUs); per layout and overlap groups G: layer forward+backward time, and from
a profiler trace the all-to-all / ETP kernel time, the exposed communication (NCCL kernel time
during which no compute kernel runs) and the hidden fraction 1 - exposed / total communication.

Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile

import torch


def _timeit(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        import time

        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def _load_old(path):
    if not path:
        return None
    f = os.path.join(path, "mmtrain", "model", "moe.py")
    spec = importlib.util.spec_from_file_location("old_moe", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def local(args):
    from mmtrain.config import ModelConfig
    from mmtrain.model.moe import GroupedSwiGLU, MoE, group_offsets

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    D, Fw, El = (6144, 9216, 4) if not args.cpu_smoke else (64, 96, 4)
    rows = [8192, 16384, 32768] if not args.cpu_smoke else [64, 128]
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    old = _load_old(args.old)
    g = torch.Generator(device="cpu").manual_seed(0)
    w13 = (torch.randn(El, 2 * Fw, D, generator=g) * 0.02).to(dev).requires_grad_()
    w2 = (torch.randn(El, D, Fw, generator=g) * 0.02).to(dev).requires_grad_()
    out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
           "torch": torch.__version__, "D": D, "F": Fw, "local_experts": El, "gemm": [],
           "layer": []}
    for n in rows:
        for split_name, frac in (("balanced", [0.25] * 4), ("skewed", [0.5, 0.25, 0.15, 0.10])):
            counts = [int(n * f) for f in frac]
            counts[-1] += n - sum(counts)
            x = (torch.randn(n, D, generator=g) * 0.5).to(dev, dt).requires_grad_()
            dy = (torch.randn(n, D, generator=g) * 0.5).to(dev, dt)
            ce = torch.tensor(counts, device=dev)
            flops = 18.0 * n * D * Fw

            def new_step():
                offs, cl = group_offsets(ce, n, x)
                y = GroupedSwiGLU.apply(x, w13, w2, offs, cl)
                y.backward(dy)
            ms_new = _timeit(new_step, args.iters)
            row = {"rows": n, "split": split_name, "grouped_ms": ms_new,
                   "grouped_tflops": flops / ms_new / 1e9}
            # the six expert GEMMs alone (bf16 weights, as autocast hands them over)
            b13, b2 = w13.detach().to(dt), w2.detach().to(dt)
            xb, dyb = x.detach(), dy
            h = torch.empty(n, 2 * Fw, device=dev, dtype=dt)
            a = torch.empty(n, Fw, device=dev, dtype=dt)
            offs_d = torch.tensor(counts, device=dev).cumsum(0).to(torch.int32)
            if dev == "cuda":
                gm = torch._grouped_mm

                def gemms():
                    gm(xb, b13.transpose(-2, -1), offs=offs_d)
                    gm(a, b2.transpose(-2, -1), offs=offs_d)
                    gm(dyb, b2, offs=offs_d)
                    gm(dyb.t(), a, offs=offs_d)
                    gm(h, b13, offs=offs_d)
                    gm(h.t(), xb, offs=offs_d)
                ms_g = _timeit(gemms, args.iters)
                row.update({"gemm_only_ms": ms_g, "gemm_only_tflops": flops / ms_g / 1e9})

                def loop_gemms():
                    s0 = 0
                    for e, c in enumerate(counts):
                        xs, ys, hs, as_ = xb[s0:s0 + c], dyb[s0:s0 + c], h[s0:s0 + c], a[s0:s0 + c]
                        xs @ b13[e].t()
                        as_ @ b2[e].t()
                        ys @ b2[e]
                        ys.t() @ as_
                        hs @ b13[e]
                        hs.t() @ xs
                        s0 += c
                ms_l = _timeit(loop_gemms, args.iters)
                row.update({"loop_gemm_only_ms": ms_l, "loop_gemm_only_tflops": flops / ms_l / 1e9})
            # check against autograd through plain matmuls on a slice of every expert
            with torch.no_grad():
                offs, cl = group_offsets(ce, n, x)
                y = GroupedSwiGLU.apply(x, w13, w2, offs, cl)
                s = 0
                errs = []
                for e, c in enumerate(counts):
                    xs = x[s:s + min(c, 256)].float()
                    h = xs @ w13[e].float().t()
                    ref = (torch.nn.functional.silu(h[:, :Fw]) * h[:, Fw:]) @ w2[e].float().t()
                    errs.append(float((y[s:s + min(c, 256)].float() - ref).norm() / ref.norm()))
                    s += c
                row["rel_err_vs_fp32"] = max(errs)
            if n == rows[0] and split_name == "skewed":  # gradients against fp32 autograd
                x.grad = w13.grad = w2.grad = None
                offs, cl = group_offsets(ce, n, x)
                GroupedSwiGLU.apply(x, w13, w2, offs, cl).backward(dy)
                got = [x.grad.float(), w13.grad.float(), w2.grad.float()]
                xr, w13r, w2r = (t.detach().float().requires_grad_() for t in (x, w13, w2))
                s, ys = 0, []
                for e, c in enumerate(counts):
                    h = xr[s:s + c] @ w13r[e].t()
                    ys.append((torch.nn.functional.silu(h[:, :Fw]) * h[:, Fw:]) @ w2r[e].t())
                    s += c
                torch.cat(ys).backward(dy.float())
                row["grad_rel_err"] = max(float((a - b.grad).norm() / b.grad.norm())
                                          for a, b in zip(got, (xr, w13r, w2r)))
                x.grad = w13.grad = w2.grad = None
            if old is not None:
                oe = old.Experts(El, D, Fw).to(dev)
                with torch.no_grad():
                    oe.w1.copy_(w13[:, :Fw])
                    oe.w3.copy_(w13[:, Fw:])
                    oe.w2.copy_(w2)

                def old_step():
                    with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                        y = oe(x, counts)
                    y.backward(dy.to(y.dtype))
                ms_old = _timeit(old_step, args.iters)
                row.update({"loop_ms": ms_old, "loop_tflops": flops / ms_old / 1e9,
                            "speedup": ms_old / ms_new})
            out["gemm"].append(row)
            print(json.dumps(row), flush=True)
    w13.grad = w2.grad = None
    # the whole layer: 4 experts, top-2, T tokens
    cfg = ModelConfig(hidden_size=D, ffn_hidden_size=Fw, num_experts=El, top_k=2,
                      num_heads=4, head_dim=32)
    torch.manual_seed(0)
    new = MoE(cfg).to(dev)
    new.reset_parameters(0.5)
    olds = None
    if old is not None:
        olds = old.MoE(cfg).to(dev)
        with torch.no_grad():
            olds.router.weight.copy_(new.router.weight)
            olds.experts.w1.copy_(new.experts.w13[:, :Fw])
            olds.experts.w3.copy_(new.experts.w13[:, Fw:])
            olds.experts.w2.copy_(new.experts.w2)
    for T in rows:
        x = (torch.randn(T, D, generator=g)).to(dev).requires_grad_()

        def run(m):
            def f():
                with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                    y, aux = m(x)
                (y.float().square().mean() + aux).backward()
            return f
        row = {"tokens": T, "new_ms": _timeit(run(new), args.iters)}
        if olds is not None:
            row["old_ms"] = _timeit(run(olds), args.iters)
            row["speedup"] = row["old_ms"] / row["new_ms"]
            with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
                a, _ = new(x)
                b, _ = olds(x)
            row["rel_diff_old_new"] = float((a.float() - b.float()).norm() / b.float().norm())
        out["layer"].append(row)
        print(json.dumps(row), flush=True)
        if args.profile and T == rows[1] and dev == "cuda":
            from torch.profiler import ProfilerActivity, profile

            for name, m in (("new", new), ("old", olds)):
                if m is None:
                    continue
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    run(m)()
                    torch.cuda.synchronize()
                print(f"--- profile of the {name} layer, {T} tokens")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                                max_name_column_width=70))
    print(f"\n{out['device']}, torch {out['torch']}, D={D} F={Fw}, {El} local experts, bf16")
    print("expert GEMMs alone (TFLOP/s) and the whole expert fwd+bwd with fp32 master weights (ms)")
    print(f"{'rows':>7} {'split':>9} {'gGEMM':>7} {'loopGEMM':>9} {'grouped ms':>11} {'TFLOP/s':>8} "
          f"{'loop ms':>9} {'TFLOP/s':>8} {'speedup':>8} {'rel err':>8}")
    nan = float("nan")
    for r in out["gemm"]:
        print(f"{r['rows']:>7} {r['split']:>9} {r.get('gemm_only_tflops', nan):>7.0f} "
              f"{r.get('loop_gemm_only_tflops', nan):>9.0f} {r['grouped_ms']:>11.2f} "
              f"{r['grouped_tflops']:>8.0f} {r.get('loop_ms', nan):>9.2f} "
              f"{r.get('loop_tflops', nan):>8.0f} {r.get('speedup', nan):>8.2f} "
              f"{r['rel_err_vs_fp32']:>8.1e}")
    print(f"{'tokens':>7} {'layer new ms':>13} {'old ms':>8} {'speedup':>8}")
    for r in out["layer"]:
        print(f"{r['tokens']:>7} {r['new_ms']:>13.2f} {r.get('old_ms', float('nan')):>8.2f} "
              f"{r.get('speedup', float('nan')):>8.2f}")
    return out


# ------------------------------------------------------------------------------------ dist
def _comm_stats(trace_path):
    """(nccl kernel ms, exposed nccl ms, compute busy ms, span ms) of a chrome trace."""
    with open(trace_path) as f:
        ev = json.load(f)["traceEvents"]
    kern = [e for e in ev if e.get("cat") == "kernel" and "dur" in e]
    if not kern:
        return None

    def union(iv):
        iv = sorted(iv)
        out = []
        for a, b in iv:
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        return out

    comm = union([(e["ts"], e["ts"] + e["dur"]) for e in kern if "nccl" in e["name"].lower()])
    comp = union([(e["ts"], e["ts"] + e["dur"]) for e in kern if "nccl" not in e["name"].lower()])
    total = sum(b - a for a, b in comm)
    overlap = 0.0
    for a, b in comm:
        for c, d in comp:
            if d <= a or c >= b:
                continue
            overlap += min(b, d) - max(a, c)
    span = max(e["ts"] + e["dur"] for e in kern) - min(e["ts"] for e in kern)
    return (total / 1e3, (total - overlap) / 1e3, sum(b - a for a, b in comp) / 1e3, span / 1e3)


def dist_mode(args):
    import datetime

    import torch.distributed as dist

    from mmtrain.config import ModelConfig
    from mmtrain.model.moe import MoE
    from mmtrain.parallel.moe import GroupBalance, shard_moe

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    D, Fw, E, T = (6144, 9216, 32, args.tokens) if not args.cpu_smoke else (64, 96, 8, 256)
    world_group = dist.new_group(list(range(world)))
    singles = [dist.new_group([r]) for r in range(world)]
    me = singles[rank]
    layouts = [("ep", world, 1), ("etp", 1, world)]
    if world >= 4:
        layouts.append(("ep_etp", world // 2, 2))
    if args.layouts:
        layouts = [lay for lay in layouts if lay[0] in args.layouts.split(",")]
    res = []
    g = torch.Generator().manual_seed(1 + rank)
    x_cpu = torch.randn(T, D, generator=g)
    for name, ep, etp in layouts:
        # expert grid with etp fastest: etp groups = consecutive ranks, ep groups strided
        ep_groups = [dist.new_group([b + i * etp for i in range(ep)]) for b in range(etp)]
        etp_groups = [dist.new_group(list(range(b * etp, (b + 1) * etp))) for b in range(ep)]
        ep_g = ep_groups[rank % etp] if ep > 1 else me
        etp_g = etp_groups[rank // etp] if etp > 1 else me
        for G in args.groups:
            cfg = ModelConfig(hidden_size=D, ffn_hidden_size=Fw, num_experts=E, top_k=2,
                              num_heads=4, head_dim=32)
            with torch.device(dev):  # build and initialise on the device (5.4B weights)
                moe = MoE(cfg)
                moe.reset_parameters(0.5, torch.Generator(device=dev).manual_seed(0))
            moe.balance = GroupBalance(False, world_group, me)
            shard_moe(moe, ep_g if ep > 1 else None, etp_g if etp > 1 else None, G)
            x = x_cpu.to(dev).requires_grad_()

            def step():
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                    y, aux = moe(x)
                (y.float().square().mean() + aux).backward()
            # the same numbers whatever G: output and input gradient against the G=1 run
            x.grad = None
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                y0, _ = moe(x)
            y0.float().square().mean().backward()
            got = (y0.detach().float(), x.grad.detach().float().clone())
            if G == args.groups[0]:
                first = got
            err = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(got, first))
            ms = _timeit(step, args.iters)
            row = {"layout": name, "ep": ep, "etp": etp, "groups": G, "ms": ms,
                   "tokens_per_rank": T, "rel_err_vs_first_G": err}
            if cuda:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        step()
                    torch.cuda.synchronize()
                path = os.path.join(tempfile.gettempdir(), f"moe_{name}_{G}_{rank}.json")
                prof.export_chrome_trace(path)
                st = _comm_stats(path)
                if st:
                    row.update({"comm_ms": st[0] / 3, "exposed_comm_ms": st[1] / 3,
                                "compute_ms": st[2] / 3, "hidden_frac": 1 - st[1] / max(st[0], 1e-9)})
            t = torch.tensor([row["ms"], row.get("comm_ms", 0.0), row.get("exposed_comm_ms", 0.0)],
                             device=dev, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            row["ms_max"], row["comm_ms_max"], row["exposed_ms_max"] = t.tolist()
            res.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
            moe = x = None
            if cuda:
                torch.cuda.empty_cache()
    if rank == 0:
        print(f"\n{torch.cuda.get_device_name() if cuda else 'cpu'} x{world}, torch "
              f"{torch.__version__}, D={D} F={Fw} E={E} top-2, {T} tokens/rank, bf16")
        print(f"{'layout':>8} {'G':>3} {'layer ms':>9} {'comm ms':>8} {'exposed':>8} "
              f"{'hidden':>7} {'rel err vs G=' + str(args.groups[0]):>16}")
        for r in res:
            print(f"{r['layout']:>8} {r['groups']:>3} {r['ms']:>9.2f} "
                  f"{r.get('comm_ms', float('nan')):>8.2f} "
                  f"{r.get('exposed_comm_ms', float('nan')):>8.2f} "
                  f"{r.get('hidden_frac', float('nan')) * 100:>6.0f}% "
                  f"{r['rel_err_vs_first_G']:>16.1e}")
    dist.barrier()
    dist.destroy_process_group()
    return res if rank == 0 else None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("local", "dist"), default="local")
    p.add_argument("--old", default="", help="checkout of the previous mmtrain (baseline)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tokens", type=int, default=16384, help="dist: tokens per rank")
    p.add_argument("--groups", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--layouts", default="", help="dist: comma list of ep, etp, ep_etp")
    p.add_argument("--profile", action="store_true", help="local: kernel table of one layer step")
    p.add_argument("--out", default="")
    args = p.parse_args()
    out = local(args) if args.mode == "local" else dist_mode(args)
    if out is not None and args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
