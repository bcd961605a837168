"""GPU check and benchmark of ``train.compile`` (mmtrain/model/compiled.py), one GPU, ~1-2 min.

    python scripts/check_compile.py [--layers 4] [--rows 2] [--seq 4096] [--iters 10]
                                    [--param-dtype fp32|bf16] [--json out.json]
    python scripts/check_compile.py --tiny --device cpu     # smoke run of this script on CPU

The model is the 1.05B-activated benchmark config of ``scripts/bench_train.py`` (hidden 2048, 16
heads of 128, 4 KV heads, 4 experts of width 5632, top-2, vocab 32000) cut to ``--layers`` decoder
layers (default 4: three lightning layers and one softmax layer, the 3:1 pattern of the 12), bf16
autocast over fp32 weights as the trainer runs it (``--param-dtype bf16``: bf16 weights), the
chunked LM loss plus the aux loss, ``--rows`` packed rows of ``--seq`` tokens. It prints:

1. per compiled region, forward + backward ms at the model's shapes, eager vs compiled (which
   regions measurably help);
2. the model's forward + backward ms (median of ``--iters``), eager vs compiled, and the compile
   time (first compiled step minus a steady one);
3. ``PASS/FAIL equal``: compiled vs eager loss and gradients agree to bf16 noise;
4. ``PASS/FAIL no recompile``: five more packed layouts (other documents, other token counts,
   one row or several) run under dynamo's ``error_on_recompile``, and each region still holds the
   graphs it held after warm-up; the graphs per region and dynamo's count of compiled graphs.

Exit status 0 when every check passes. Needs no Hydra (builds the model from ``ModelConfig``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from mmtrain.config import ModelConfig
from mmtrain.model import MiniMaxModel
from mmtrain.model import compiled
from mmtrain.model.fused_ce import linear_cross_entropy

BENCH = dict(name="bench1b", vocab_size=32000, hidden_size=2048, num_heads=16, head_dim=128,
             num_kv_heads=4, softmax_every=4, num_experts=4, top_k=2, ffn_hidden_size=5632,
             max_position_embeddings=65536, lightning_block_size=64)
TINY = dict(name="tiny", vocab_size=258, hidden_size=64, num_heads=4, head_dim=16,
            num_kv_heads=2, softmax_every=4, num_experts=4, top_k=2, ffn_hidden_size=64,
            lightning_block_size=16)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, iters):
    """Median ms of ``fn()`` over ``iters`` calls (after the caller's warm-up)."""
    out = []
    for _ in range(iters):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def packed(rows, seq, vocab, dev, seed):
    """tokens [rows, seq], labels, cu_seqlens over the flattened rows (random document lengths,
    every row boundary a document boundary; the host copy travels as ``.host`` like a loader
    batch's)."""
    g = torch.Generator().manual_seed(seed)
    cu = [0]
    for r in range(rows):
        end = (r + 1) * seq
        while cu[-1] < end:
            n = int(torch.randint(1, max(2, seq // 2), (1,), generator=g))
            cu.append(min(end, cu[-1] + n))
    tokens = torch.randint(0, vocab, (rows, seq), generator=g).to(dev)
    labels = torch.randint(0, vocab, (rows, seq), generator=g).to(dev)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)
    cu_t.host = list(cu)
    return tokens, labels, cu_t


def step(model, batch, dev, autocast):
    tokens, labels, cu = batch
    model.begin_step(tokens.numel())
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(tokens, cu, return_hidden=True)
        ce = linear_cross_entropy(out.hidden, model.lm_head.weight, labels.reshape(-1), 4096)
    loss = ce.float().mean() + 0.01 * out.aux_loss
    loss.backward()
    return loss.detach()


def grads(model):
    g = torch.cat([p.grad.float().reshape(-1) for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return g


def region_cases(cfg, P, dev, wdt):
    """(region, eager fn, args) at the model's shapes, in the dtypes the model hands them under
    bf16 autocast (fp32 residual stream and router logits, bf16 projections)."""
    D, H, G, K, E = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_experts
    bf = torch.bfloat16
    res = wdt  # the residual stream's dtype: the weights'

    def t(*shape, dtype):
        return torch.randn(*shape, device=dev, dtype=dtype).requires_grad_()

    w = torch.ones(D, device=dev, dtype=wdt, requires_grad=True)
    idx = torch.randint(0, E, (P, cfg.top_k), device=dev)
    pos = torch.arange(P, device=dev) % 4096
    from mmtrain.model.attention import norm_gate, norm_gate_compiled
    from mmtrain.model.layers import (residual_norm, residual_norm_compiled, rope_qk,
                                      rope_qk_compiled)
    from mmtrain.model.moe import route_probs, route_probs_compiled

    return [
        ("residual_norm", residual_norm, residual_norm_compiled,
         [t(P, D, dtype=res), t(P, D, dtype=bf), cfg.deepnorm_alpha, w, cfg.norm_eps, False]),
        ("route_probs", route_probs, route_probs_compiled, [t(P, E, dtype=torch.float32), idx]),
        ("rope_qk", rope_qk, rope_qk_compiled,
         [t(P, H, K, dtype=bf), t(P, G, K, dtype=bf), pos, cfg.rope_dim, cfg.rope_theta]),
        ("norm_gate", norm_gate, norm_gate_compiled,
         [t(P, H * K, dtype=bf), torch.ones(H * K, device=dev, dtype=wdt, requires_grad=True),
          cfg.lightning_norm_eps, t(P, H * K, dtype=bf), bf]),
    ]


def bench_regions(cfg, P, dev, wdt, autocast, iters):
    rows = []
    for name, eager, region, args in region_cases(cfg, P, dev, wdt):
        def run(fn):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                out = fn(*args)
            outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
            sum(o.float().sum() for o in outs).backward()

        ms = []
        for fn in (eager, region):
            for _ in range(3):
                run(fn)  # warm-up (compiles the region's graph for these inputs once)
            ms.append(timed(lambda: run(fn), dev, iters))
        rows.append((name, ms[0], ms[1]))
        print(f"region {name:<14} fwd+bwd eager {ms[0]:8.3f} ms  compiled {ms[1]:8.3f} ms  "
              f"speedup {ms[0] / ms[1]:5.2f}x", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--param-dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--tiny", action="store_true", help="tiny dims (a CPU smoke run)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    dev = torch.device(args.device)
    if args.tiny:
        args.seq, args.iters = min(args.seq, 256), min(args.iters, 3)
    autocast = dev.type == "cuda" or args.param_dtype == "bf16"
    wdt = torch.bfloat16 if args.param_dtype == "bf16" else torch.float32
    cfg = ModelConfig(**(TINY if args.tiny else BENCH), num_layers=args.layers)
    cfg.validate()
    torch.manual_seed(0)
    model = MiniMaxModel(cfg).to(dev)
    model.reset_parameters(1)
    model.to(wdt)
    P = args.rows * args.seq
    print(f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}; {cfg.name} x {args.layers} layers "
          f"({cfg.layer_types()}), {args.rows} x {args.seq} tokens, {args.param_dtype} weights"
          f"{', bf16 autocast' if autocast else ''}", flush=True)
    report = {"device": str(dev), "torch": torch.__version__, "layers": args.layers,
              "tokens": P, "param_dtype": args.param_dtype}
    ok = True

    # 1. regions alone
    report["regions"] = bench_regions(cfg, P, dev, wdt, autocast, max(args.iters, 20))

    # 2. the model, eager then compiled, the same weights and batch
    batch = packed(args.rows, args.seq, cfg.vocab_size, dev, seed=0)
    res = {}
    for on in (False, True):
        model.set_compile(on)
        sync(dev)
        t0 = time.perf_counter()
        loss = step(model, batch, dev, autocast)
        sync(dev)
        first = time.perf_counter() - t0
        g = grads(model)
        step(model, batch, dev, autocast)
        grads(model)
        ms = timed(lambda: (step(model, batch, dev, autocast), model.zero_grad(set_to_none=True)),
                   dev, args.iters)
        res[on] = (float(loss), g, ms, first)
        print(f"model {'compiled' if on else 'eager   '}: fwd+bwd {ms:9.2f} ms (median of "
              f"{args.iters}); first step {first:7.2f} s (compile: ~{first - ms / 1e3:.1f} s)",
              flush=True)
    (le, ge, me, _), (lc, gc, mc, fc) = res[False], res[True]
    print(f"model speedup {me / mc:.3f}x ({me - mc:+.2f} ms per step of {P} tokens)")
    report.update(eager_ms=me, compiled_ms=mc, speedup=me / mc, compile_s=fc - mc / 1e3)

    # 3. equal to bf16 noise (a near-tied router choice may flip a slot: a global measure)
    dl = abs(lc - le) / abs(le)
    dg = float((gc - ge).norm() / ge.norm())
    tol_l, tol_g = (1e-2, 5e-2) if autocast else (1e-5, 1e-4)
    good = dl <= tol_l and dg <= tol_g and bool(torch.isfinite(gc).all())
    ok &= good
    print(f"{'PASS' if good else 'FAIL'} equal: loss eager {le:.6f} compiled {lc:.6f} (rel "
          f"{dl:.2e} <= {tol_l:g}); gradients rel {dg:.2e} <= {tol_g:g}", flush=True)
    report.update(loss_rel=dl, grad_rel=dg)

    # 4. no recompile over other packed layouts
    from torch._dynamo.utils import counters

    warm = {r.name: r.graphs() for r in compiled.REGIONS}
    n_graphs = counters["stats"]["unique_graphs"]
    layouts = [(args.rows, args.seq, 1), (args.rows, args.seq, 2), (1, args.rows * args.seq, 3),
               (args.rows, args.seq * 3 // 4 + 5, 4), (args.rows * 2, args.seq // 2 - 3, 5)]
    err = ""
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows, seq, seed in layouts:
            b = packed(rows, seq, cfg.vocab_size, dev, seed)
            try:
                step(model, b, dev, autocast)
            except Exception as exc:  # RecompileError, or what a recompile broke
                err = f"{rows}x{seq}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                break
            model.zero_grad(set_to_none=True)
    now = {r.name: r.graphs() for r in compiled.REGIONS}
    good = not err and now == warm
    ok &= good
    print(f"{'PASS' if good else 'FAIL'} no recompile over {len(layouts)} packed layouts "
          f"({', '.join(f'{r}x{s}' for r, s, _ in layouts)} tokens): graphs per region {now}"
          f"{' (after warm-up ' + str(warm) + ')' if now != warm else ''}; dynamo compiled "
          f"{counters['stats']['unique_graphs']} graphs in this process ({n_graphs} before the "
          f"layouts){'; ' + err if err else ''}", flush=True)
    report.update(graphs=now, recompile_error=err, ok=ok)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print("ALL PASS" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
