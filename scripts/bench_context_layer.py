"""Benchmark the lightning attention *layer* under context parallelism (issue 10): what LASP+ costs
where a training step pays for it, beside the op-level figures of ``bench_context.py``.

    python scripts/bench_context_layer.py --emulate-cp 2 --out layer.json   # one GPU
    torchrun --nproc-per-node 2 scripts/bench_context_layer.py              # CP=2 on two GPUs
    python scripts/bench_context_layer.py --cpu-smoke --emulate-cp 2        # CPU, tiny sizes

For each shape (``--shapes``, ``name:tokens_per_GPU``), the model's ``LightningAttention`` (qkv
and gate projections, SiLU, the lightning op, the output RMSNorm and sigmoid gate, the output
projection; bf16 parameters and activations, eager) runs forward and backward on one row that is
one document, as ``bench_context``'s lightning section does (the state chains across every rank):

* CP=1: the whole layer on this GPU's tokens, its core the local Triton op;
* CP=C: the same tokens as this rank's share of a row C times longer, the core
  ``ContextLightningOp`` (LASP+, fused into the kernel's passes) under ``--balance`` (default
  ``zigzag2``, what ``parallel.cp_zigzag_rounds=0`` picks at these lengths). With two processes
  the collectives run (NCCL); with one process and ``--emulate-cp C`` each rank's share runs in
  turn with the all-gather returning its own states (``bench_context.EmulatedCP``: every kernel
  and small op at its true size, no collectives) and the slowest rank is reported.

Timing only: the outputs are not compared (``bench_context`` checks the CP ops on the device).
The core alone (the op of ``bench_context``) is timed on the layer's own q, k, v beside it, so one
run gives both ratios. Two timings of each (median of ``--iters`` after ``--warmup``):
``synced``, a device sync before and after every iteration (host time exposed, as
``bench_context`` times), and ``queued``, ``--iters`` iterations issued back to back with one sync
at the end (the host runs ahead, as in a training step; mean per iteration).

Shapes: ``minimax`` (MiniMax-Text-01's lightning layer, D = 6144, H = 64, d = 128, layer 0 of 80),
``minimax_tp8`` (one TP=8 shard of it: H = 8, the projections' TP=8 columns and rows; the TP
collectives are not included), ``bench1b`` (the 1.05B-activated config of ``bench_train``: D = 2048,
H = 16, d = 128).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_context as bc  # noqa: E402

from mmtrain.config import ModelConfig  # noqa: E402
from mmtrain.model.attention import LightningAttention  # noqa: E402
from mmtrain.model.ops import LightningOp  # noqa: E402
from mmtrain.parallel.context import ContextLightningOp  # noqa: E402

#: name -> (hidden size, heads of this GPU, head dim, heads of the whole layer)
SHAPES = {"minimax": (6144, 64, 128, 64), "minimax_tp8": (6144, 8, 128, 64),
          "bench1b": (2048, 16, 128, 16), "smoke": (64, 2, 16, 2)}
DEFAULT_SHAPES = "minimax:131072,minimax_tp8:131072,minimax_tp8:524288,bench1b:131072"


def parse_shapes(text):
    out = []
    for item in filter(None, text.split(",")):
        name, _, tok = item.partition(":")
        if name not in SHAPES or not tok.isdigit() or int(tok) <= 0:
            raise SystemExit(f"--shapes: {item!r}; give name:tokens_per_GPU with name one of "
                             f"{sorted(SHAPES)} (e.g. minimax:131072)")
        out.append((name, int(tok)))
    if not out:
        raise SystemExit("--shapes: give at least one name:tokens_per_GPU")
    return out


def make_layer(name, dtype):
    D, H, K, H_all = SHAPES[name]
    # H < H_all: a TP shard, this GPU's heads and their projection columns/rows; the slopes are
    # those of the first H of the layer's H_all heads
    cfg = ModelConfig(name=name, hidden_size=D, num_layers=80, num_heads=H, head_dim=K,
                      num_kv_heads=max(1, H // 8), lightning_block_size=64)
    layer = LightningAttention(cfg, layer_idx=0)
    layer.total_heads = H_all
    layer.reset_buffers()
    g = torch.Generator().manual_seed(0)
    layer.reset_parameters(beta=1.0, generator=g)
    return layer.to(device=bc.DEV, dtype=dtype)


def time_both(fn, warmup, iters):
    """(synced median, queued mean) seconds of fn()."""
    synced = bc.timeit(fn, warmup, iters)
    bc.barrier()
    bc.sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    bc.sync()
    return synced, (time.perf_counter() - t0) / iters


def runners(layer, x, dy, cu, qkv_do):
    """fn() of the layer's fwd+bwd and of its core's alone, on this rank's tokens."""
    def layer_fn():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x, cu).backward(dy)

    q, k, v, do = qkv_do

    def core_fn():
        for t in (q, k, v):
            t.grad = None
        o, _ = layer.core(q, k, v, layer.slopes, cu)
        o.backward(do)
    return layer_fn, core_fn


def inputs(layer, T, dtype, seed):
    D, H, K = layer.qkv_proj.in_features, layer.num_heads, layer.head_dim
    x = bc.rand((T, D), seed, 1.0, dtype).requires_grad_()
    dy = bc.rand((T, D), seed + 1, 1.0, dtype)
    with torch.no_grad():  # the core's inputs as the layer makes them (SiLU of the projection)
        qkv = torch.nn.functional.silu(layer.qkv_proj(x)).view(T, H, 3 * K)
    q, k, v = (t.contiguous()[None].requires_grad_() for t in qkv.split(K, dim=-1))
    do = bc.rand((1, T, H, K), seed + 2, 1.0, dtype)
    return x, dy, (q, k, v, do)


def bench_shape(name, Tg, a, balance, dtype):
    layer = make_layer(name, dtype)
    row = {"shape": name, "D": SHAPES[name][0], "H": layer.num_heads, "T_per_gpu": Tg,
           "balance": balance}
    x, dy, qkv_do = inputs(layer, Tg, dtype, 20)
    layer.core = LightningOp(64)
    lf, cf = runners(layer, x, dy, bc.dev_cu([0, Tg]), qkv_do)
    row["cp1_layer_ms"], row["cp1_layer_queued_ms"] = (v * 1e3 for v in time_both(lf, a.warmup,
                                                                                  a.iters))
    row["cp1_core_ms"], row["cp1_core_queued_ms"] = (v * 1e3 for v in time_both(cf, a.warmup,
                                                                                a.iters))
    C = bc.WORLD if bc.WORLD > 1 else a.emulate_cp
    per_rank = []
    for r in ([bc.RANK] if bc.WORLD > 1 else range(C)):
        if bc.WORLD > 1:
            cu_l, _ = bc.local_piece([0, Tg * C], 1, Tg * C, balance)
            cpx = bc.cpx_for(balance)
        else:
            cu_l, cpx = bc.emulated_rank(Tg, balance, C, r)
        layer.core = ContextLightningOp(LightningOp(64), cpx, "laspplus")
        lf, cf = runners(layer, x, dy, cu_l, qkv_do)
        per_rank.append([v * 1e3 for v in time_both(lf, a.warmup, a.iters)
                         + time_both(cf, a.warmup, a.iters)])
    if bc.WORLD > 1:  # every rank's four figures, to every rank
        per_rank = [bc.gather_floats(v) for v in per_rank[0]]
        per_rank = [list(t) for t in zip(*per_rank)]
    keys = ("layer_ms", "layer_queued_ms", "core_ms", "core_queued_ms")
    for j, key in enumerate(keys):
        ranks = [p[j] for p in per_rank]
        row[f"cp_{key}_per_rank"] = ranks
        row[f"cp_{key}"] = max(ranks)
        row[f"{key[:-3]}_vs_cp1"] = row[f"cp1_{key}"] / row[f"cp_{key}"]
    row["cp"] = C
    bc.log("layer " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in row.items() if not k.endswith("per_rank")))
    del x, dy, qkv_do, layer
    if bc.DEV.type == "cuda":
        torch.cuda.empty_cache()
    return row


def table(res) -> str:
    C = res["cp"]
    head = (f"lightning attention layer vs its core (LASP+, {res['balance']}), fwd+bwd, one "
            f"document per row, CP={C}"
            + (" emulated on one GPU (each rank's share in turn, the slowest; no collectives)"
               if res["emulate_cp"] else "")
            + ": ms per GPU at CP=1 and CP={0}; ratio = per-GPU throughput of CP={0} over "
            "CP=1".format(C))
    lines = ["", head,
             f"{'shape':>12} {'D':>5} {'H':>3} {'T/GPU':>8} | {'timing':>7} | {'core CP=1':>10} "
             f"{'core CP=' + str(C):>10} {'ratio':>6} | {'layer CP=1':>10} "
             f"{'layer CP=' + str(C):>11} {'ratio':>6} | {'core share':>10}"]
    for r in res["rows"]:
        for t, sfx in (("synced", ""), ("queued", "_queued")):
            lines.append(
                f"{r['shape']:>12} {r['D']:>5} {r['H']:>3} {r['T_per_gpu']:>8} | {t:>7} | "
                f"{r['cp1_core' + sfx + '_ms']:>10.3f} {r['cp_core' + sfx + '_ms']:>10.3f} "
                f"{r['core' + sfx + '_vs_cp1']:>6.3f} | {r['cp1_layer' + sfx + '_ms']:>10.3f} "
                f"{r['cp_layer' + sfx + '_ms']:>11.3f} {r['layer' + sfx + '_vs_cp1']:>6.3f} | "
                f"{r['cp1_core' + sfx + '_ms'] / r['cp1_layer' + sfx + '_ms']:>10.1%}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None,
                    help=f"comma list of name:tokens_per_GPU (default {DEFAULT_SHAPES}; "
                    "smoke:64 under --cpu-smoke); names: " + ", ".join(sorted(SHAPES)))
    ap.add_argument("--balance", default="zigzag2",
                    help="the CP partition (parallel.cp_balance): zigzag, zigzagR, contiguous")
    ap.add_argument("--emulate-cp", type=int, default=1,
                    help="with one process: time each rank's LASP+ share of a CP group of this "
                    "size (no collectives); with several processes, CP = their number")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (gloo)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args()
    bc.RANK, bc.WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        bc.partition(a.balance)
    except ValueError:
        raise SystemExit(f"--balance: {a.balance!r}; give one of zigzag, zigzagR (R rounds, "
                         "e.g. zigzag2), contiguous") from None
    if bc.WORLD > 1 and a.emulate_cp > 1:
        raise SystemExit("--emulate-cp runs one process's share of a CP group; start one "
                         "process (two processes measure CP=2 itself)")
    if bc.WORLD == 1 and a.emulate_cp < 2:
        raise SystemExit("one process: give --emulate-cp C (C >= 2), or start C processes "
                         "with torchrun")
    shapes = parse_shapes(a.shapes or ("smoke:64" if a.cpu_smoke else DEFAULT_SHAPES))
    if a.cpu_smoke:
        bc.DEV, backend, dtype = torch.device("cpu"), "gloo", torch.float32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU visible; use --cpu-smoke to run tiny sizes on CPU")
        bc.DEV = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(bc.DEV)
        backend, dtype = "nccl", torch.bfloat16
    if bc.WORLD > 1:
        import datetime

        import torch.distributed as dist
        dist.init_process_group(backend, timeout=datetime.timedelta(
            seconds=60 if a.cpu_smoke else 600))
    t0 = time.time()
    res = {"device": (torch.cuda.get_device_name(bc.DEV) if bc.DEV.type == "cuda" else "cpu"),
           "world": bc.WORLD, "cp": bc.WORLD if bc.WORLD > 1 else a.emulate_cp,
           "emulate_cp": a.emulate_cp if bc.WORLD == 1 else None, "balance": a.balance,
           "torch": torch.__version__, "warmup": a.warmup, "iters": a.iters,
           "rows": [bench_shape(n, T, a, a.balance, dtype) for n, T in shapes]}
    res["wall_s"] = time.time() - t0
    if bc.RANK == 0:
        print(table(res), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
            print(f"wrote {a.out} ({res['wall_s']:.0f} s)")
    if bc.WORLD > 1:
        import torch.distributed as dist
        bc.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
