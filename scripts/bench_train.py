"""Training throughput of parallel layouts of the GPUs of one host (NCCL, one process a GPU).

    python scripts/bench_train.py [--gpus N] [--steps 30] [--layouts tp=1,ep=2+etp=1]
                                  [--out bench_train.json] [overrides...]

Overrides are recipe settings passed to every run, e.g. ``train.compile=true`` (the compiled
regions of ``mmtrain/model/compiled.py``; each rank compiles in its first step, which the
``--warmup`` steps leave out of the medians) or ``train.recompute=full``.

For each layout (default: every tp in the divisors of N, dp = N / tp; ``--layouts`` takes a comma
list of ``+``-joined ``parallel.*`` settings such as ``ep=2`` or ``tp=2+ep=2``) it launches
``torchrun --nproc-per-node N`` on this script in worker mode, which runs the real trainer (``mmtrain.train.loop.train``: bucketed gradient
reduction overlapped with the backward pass, ZeRO-1, sequence parallelism under TP, bf16 autocast;
``train.param_dtype`` auto, i.e. bf16 parameters with fp32 masters and fp32 gradient accumulation,
``train.param_dtype=fp32`` for fp32 parameters) on a ~1B-activated hybrid lightning/softmax MoE
config, with checkpoint writes disabled. It reports
per layout: tokens/s (median over the steps after warm-up), MFU (model FLOPs of
``mmtrain.model.account`` over the dense bf16 peak of the GPUs), peak memory per GPU (max over
ranks of ``torch.cuda.max_memory_allocated``), and the loss curve, whose largest relative
deviation from the first layout's is printed (the layouts must agree to bf16 noise). Prints a
table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# ~1B activated (1.05 B: attention 0.22 B + 2 of 4 SwiGLU experts of width 5632 per layer),
# ~2.0 B total; 9 lightning + 3 softmax layers (softmax at 3, 7, 11).
MODEL = ["model.name=bench1b", "model.vocab_size=32000", "model.hidden_size=2048",
         "model.num_layers=12", "model.num_heads=16", "model.head_dim=128",
         "model.num_kv_heads=4", "model.softmax_every=4", "model.num_experts=4", "model.top_k=2",
         "model.ffn_hidden_size=5632", "model.max_position_embeddings=65536",
         "model.lightning_block_size=64"]
TRAIN = ["data.seq_len=4096", "data.corpus_max_bytes=4000000", "train.global_batch=8",
         "train.micro_batch=null", "train.lr=3e-4", "train.min_lr=3e-5", "train.warmup_steps=5",
         "train.schedule=constant", "train.device=cuda", "train.dtype=bf16",
         "run.progress=false", "parallel.zero1=true", "parallel.timeout_s=300"]


def worker(args, overrides):
    import torch
    import torch.distributed as dist

    from mmtrain.recipe import load_config
    from mmtrain.train import checkpoint as ckpt
    from mmtrain.train import loop

    ckpt.save = lambda *a, **k: None  # throughput only: no checkpoint writes
    cfg = load_config(MODEL + TRAIN + [f"train.max_steps={args.steps}"]
                      + [f"parallel.{kv}" for kv in args.layout.split("+")] + overrides)
    loop.train(cfg)
    param_dtype = "bf16" if cfg.train.bf16_params("cuda") else "fp32"  # what auto resolved to
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2 ** 30], device="cuda")
    multi = dist.is_initialized()
    if multi:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if not multi or dist.get_rank() == 0:
        recs = [json.loads(l) for l in open(os.path.join(cfg.run.dir, "metrics.jsonl"))]
        steady = recs[args.warmup:] or recs
        tps = statistics.median(r["tokens_per_s"] for r in steady)
        mfu = statistics.median(r["mfu"] for r in steady) if steady[0]["mfu"] else None
        out = {"layout": args.layout, "tp": cfg.parallel.tp,
               "dp": ((dist.get_world_size() if multi else 1)
                      // (cfg.parallel.tp * cfg.parallel.cp * cfg.parallel.pp)),
               "tokens_per_s": tps, "mfu": mfu, "peak_mem_gib": float(peak.item()),
               "step_time_s": statistics.median(r["step_time_s"] for r in steady),
               "losses": [r["loss"] for r in recs], "device": torch.cuda.get_device_name(),
               "param_dtype": param_dtype,
               "torch": torch.__version__}
        with open(args.result, "w") as f:
            json.dump(out, f)
    if multi:
        dist.barrier()
        dist.destroy_process_group()


def driver(args, overrides):
    import torch

    n = args.gpus or torch.cuda.device_count()
    results = []
    base_env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                    NVSHMEM_DISABLE_NVLS="1", OMP_NUM_THREADS="4", PYTHONUNBUFFERED="1")
    layouts = (args.layouts.split(",") if args.layouts
               else [f"tp={t}" for t in (1, 2, 4, 8) if n % t == 0 and t <= n])
    for k, layout in enumerate(layouts):
        tag = layout.replace("=", "").replace("+", "_")
        result = os.path.abspath(f"{args.out}.{tag}.json")
        run_dir = f"/tmp/bench_train_{tag}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
               "--master-port", str(29500 + k), os.path.join(HERE, "bench_train.py"),
               "--worker", "--layout", layout, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--result", result, *overrides, f"run.dir={run_dir}"]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, env=base_env, capture_output=True, text=True,
                                  timeout=args.timeout)
        except subprocess.TimeoutExpired as exc:
            print(f"{layout}: timed out after {args.timeout}s", flush=True)
            proc = subprocess.CompletedProcess(cmd, -1, exc.stdout or "", exc.stderr or "")
            proc.stdout = proc.stdout.decode() if isinstance(proc.stdout, bytes) else proc.stdout
            proc.stderr = proc.stderr.decode() if isinstance(proc.stderr, bytes) else proc.stderr
        with open(f"{args.out}.{tag}.log", "w") as f:
            f.write(proc.stdout + "\n---- stderr ----\n" + proc.stderr)
        if proc.returncode != 0 or not os.path.exists(result):
            print(f"{layout}: FAILED (exit {proc.returncode}; whole log in "
                  f"{args.out}.{tag}.log)\n{error_excerpt(proc.stderr)}", flush=True)
            continue
        r = json.load(open(result))
        r["wall_s"] = time.time() - t0
        results.append(r)
        print(f"{layout} (dp={r['dp']}, {r['param_dtype']} params): "
              f"{r['tokens_per_s']:.0f} tok/s, MFU "
              f"{(r['mfu'] or 0) * 100:.1f}%, peak {r['peak_mem_gib']:.1f} GiB, "
              f"wall {r['wall_s']:.0f}s", flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    if not results:
        return 1
    ref = results[0]["losses"]
    print(f"\n{results[0]['device']} x{n}, torch {results[0]['torch']}, {args.steps} steps, "
          f"recipe {' '.join(TRAIN)}; overrides: {' '.join(overrides) or 'none'}; "
          f"train.param_dtype -> {', '.join(sorted({r['param_dtype'] for r in results}))}")
    print(f"{'layout':<12}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'step s':>9}"
          f"{'max |dloss|/loss vs ' + results[0]['layout']:>28}")
    for r in results:
        dev = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref))
        r["max_rel_loss_dev"] = dev
        print(f"{r['layout'] + ' dp' + str(r['dp']):<12}{r['tokens_per_s']:>12.0f}"
              f"{(r['mfu'] or 0) * 100:>7.1f}%{r['peak_mem_gib']:>10.1f}"
              f"{r['step_time_s']:>9.3f}{dev:>28.2e}")
    print("losses " + " | ".join(f"{r['layout']}: " + " ".join(f"{x:.4f}" for x in r["losses"][::5])
                                 for r in results))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


_ERROR_LINE = re.compile(r"^(\[rank\d+\]: )?[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")


def error_excerpt(stderr: str, context: int = 12) -> str:
    """The end of a worker's traceback in its stderr: the frames before the last error line
    and the line itself. Under torchrun a rank's error (``[rankN]: ...Error``) is preferred:
    torchrun's own ``ChildFailedError`` and summary come after it and name no cause."""
    lines = stderr.splitlines()
    hits = [i for i, ln in enumerate(lines) if _ERROR_LINE.match(ln)]
    hits = [i for i in hits if lines[i].startswith("[rank")] or hits
    if not hits:
        return "\n".join(lines[-25:])
    i = hits[-1]
    return "\n".join(lines[max(0, i - context):i + 1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true")
    p.add_argument("--layout", default="tp=1")
    p.add_argument("--layouts", default="", help="comma list of +-joined parallel settings")
    p.add_argument("--gpus", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    p.add_argument("--timeout", type=int, default=400, help="seconds per layout")
    p.add_argument("--result", default="")
    p.add_argument("--out", default="bench_train.json")
    args, overrides = p.parse_known_args()
    if args.worker:
        worker(args, overrides)
        return 0
    return driver(args, overrides)


if __name__ == "__main__":
    sys.exit(main())
