"""GPU checks of bf16 parameters with fp32 masters (``train.param_dtype``) on one CUDA device.

    python scripts/gpu_check_bf16.py [--steps 20] [--hidden 1024] [--layers 8] [--seq 4096]

Prints one PASS / FAIL (or WARN) line per check, then timings; exit status 1 on any FAIL.

1. ``rms_norm``: ``F.rms_norm`` of a bf16 input on CUDA keeps fp32 statistics (within one bf16
   ulp of an fp64 reference; bf16 statistics are several ulps off) and returns bf16 under
   autocast (an fp32 norm output would promote the residual stream).
2. ``dtypes``: one forward/backward of the model with bf16 parameters under autocast on CUDA
   (Triton lightning kernel, varlen flash softmax, grouped-GEMM experts): the residual stream,
   norms, attention and MoE outputs are bf16; router logits, probabilities and weights, the aux
   loss and the LM loss fp32; the parameters' gradients bf16.
3. ``train``: the real trainer (``mmtrain.train.loop.train``, micro-batches accumulated) for
   ``--steps`` steps with ``train.param_dtype=fp32`` and ``bf16`` (both under bf16 autocast):
   bf16 parameters, fp32 masters, losses within 2e-2 relative of the fp32-parameter run. Median
   step time, tokens/s and peak memory of both are printed (informational:
   ``scripts/bench_train.py`` is the benchmark).
4. ``resume``: a bf16 run checkpointed at step k and resumed gives the uninterrupted run's
   losses after k: PASS when bit-identical, WARN when only within 1e-3 relative (a
   nondeterministic CUDA kernel), FAIL beyond.

Needs no Hydra: the config is built with ``mmtrain.config.config_from_dict``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import types
from pathlib import Path

import torch

FAILED = []


def report(name: str, ok, detail: str) -> None:
    tag = ok if isinstance(ok, str) else ("PASS" if ok else "FAIL")
    if tag == "FAIL":
        FAILED.append(name)
    print(f"{tag} {name}: {detail}", flush=True)


def _omegaconf_stub() -> None:
    """The trainer saves its config with omegaconf; without it, write JSON instead."""
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        mod = types.ModuleType("omegaconf")

        class OmegaConf:
            create = staticmethod(lambda d: d)

            @staticmethod
            def save(d, path):
                Path(path).write_text(json.dumps(d, indent=1))

        mod.OmegaConf = OmegaConf
        sys.modules["omegaconf"] = mod


def make_config(args, run_dir: str, **train):
    from mmtrain.config import config_from_dict

    heads = max(args.hidden // 128, 2)
    model = {"name": "gpucheck", "vocab_size": 32000, "hidden_size": args.hidden,
             "num_layers": args.layers, "num_heads": heads, "head_dim": 128,
             "num_kv_heads": 2 if heads % 2 == 0 else 1, "softmax_every": 4, "num_experts": 4,
             "top_k": 2, "ffn_hidden_size": args.hidden * 11 // 4,
             "max_position_embeddings": 65536}
    tr = {"max_steps": args.steps, "global_batch": 4, "micro_batch": 2, "lr": 3e-4,
          "min_lr": 3e-5, "warmup_steps": 5, "schedule": "constant", "device": "cuda",
          "dtype": "bf16", "aux_loss_coef": 0.01}
    tr.update(train)
    return config_from_dict({"model": model, "train": tr,
                             "data": {"seq_len": args.seq, "corpus_max_bytes": 4_000_000},
                             "run": {"dir": run_dir, "progress": False}})


# ------------------------------------------------------------------------------------ checks
def check_rms_norm() -> None:
    import torch.nn.functional as F

    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(64, 8192, device="cuda", generator=g) * 3 + 20).to(torch.bfloat16)
    w = (torch.rand(8192, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    y = F.rms_norm(x, (8192,), w, 1e-5)
    xf = x.double()
    ref = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    ulp = torch.finfo(torch.bfloat16).eps * ref.abs().clamp_min(1e-3)
    err = float(((y.double() - ref).abs() / ulp).max())
    bad = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    bad_err = float(((bad.double() - ref).abs() / ulp).max())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_ac = F.rms_norm(x, (8192,), w, 1e-5)
    report("rms_norm", err <= 1.0 and y.dtype == torch.bfloat16 and y_ac.dtype == torch.bfloat16,
           f"max error {err:.2f} bf16 ulp (bf16 statistics would give {bad_err:.2f}); output "
           f"{y.dtype}, under autocast {y_ac.dtype}; torch {torch.__version__}")


def check_dtypes(args) -> None:
    from mmtrain.model import MiniMaxModel
    from mmtrain.model import moe as moe_mod
    from mmtrain.model.attention import LightningAttention, SoftmaxAttention
    from mmtrain.model.fused_ce import linear_cross_entropy
    from mmtrain.model.layers import RMSNorm
    from mmtrain.model.transformer import DecoderLayer

    cfg = make_config(args, "/tmp/unused").model
    torch.manual_seed(0)
    model = MiniMaxModel(cfg).cuda()
    model.reset_parameters(seed=0)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    seen, routed = [], []
    kinds = (DecoderLayer, moe_mod.MoE, RMSNorm, LightningAttention, SoftmaxAttention)

    def hook(module, a, out):
        first = out[0] if isinstance(out, tuple) else out
        seen.append((type(module).__name__, first.dtype))

    for m in model.modules():
        if isinstance(m, kinds) or m is model.embed:
            m.register_forward_hook(hook)
    real = moe_mod.route

    def route(logits, *a, **k):
        r = real(logits, *a, **k)
        routed.append((logits.dtype, r.probs_TE.dtype, r.weight_TK.dtype))
        return r

    moe_mod.route = route
    try:
        tokens = torch.randint(0, cfg.vocab_size, (1, args.seq), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(tokens, return_hidden=True)
            ce = linear_cross_entropy(out.hidden.reshape(-1, cfg.hidden_size),
                                      model.lm_head.weight, tokens.reshape(-1), 4096)
        (ce.mean() + 0.01 * out.aux_loss).backward()
    finally:
        moe_mod.route = real
    wrong = sorted({f"{k}:{d}" for k, d in seen if d != torch.bfloat16})
    fp32 = {torch.float32}
    r_ok = bool(routed) and all(set(r) == fp32 for r in routed)
    grads = {p.grad.dtype for p in model.parameters() if p.grad is not None}
    grouped = moe_mod.grouped_mm_available(out.hidden)
    ok = (not wrong and r_ok and ce.dtype == torch.float32 and out.aux_loss.dtype ==
          torch.float32 and grads == {torch.bfloat16})
    report("dtypes", ok, f"{len(seen)} module outputs, not bf16: {wrong or 'none'}; routing "
           f"{'fp32' if r_ok else routed[:1]}; loss {ce.dtype}, aux {out.aux_loss.dtype}; "
           f"grads {sorted(map(str, grads))}; grouped GEMM experts: {grouped}")
    del model, out, ce
    torch.cuda.empty_cache()


def _train(cfg, save: bool = True):
    from mmtrain.train import checkpoint as ckpt
    from mmtrain.train import loop

    real = ckpt.save
    if not save:
        ckpt.save = lambda *a, **k: None
    try:
        torch.cuda.reset_peak_memory_stats()
        res = loop.train(cfg)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    finally:
        ckpt.save = real
    recs = [json.loads(l) for l in open(Path(cfg.run.dir) / "metrics.jsonl")]
    return res, recs, peak


def check_train(args, tmp: Path) -> None:
    from mmtrain.parallel.data import ZeroAdamW

    out = {}
    for pd in ("fp32", "bf16"):
        cfg = make_config(args, str(tmp / f"train_{pd}"), param_dtype=pd)
        res, recs, peak = _train(cfg, save=False)
        steady = recs[5:] or recs
        out[pd] = {"losses": [r["loss"] for r in recs], "peak": peak,
                   "step": statistics.median(r["step_time_s"] for r in steady),
                   "tps": statistics.median(r["tokens_per_s"] for r in steady),
                   "params": {p.dtype for p in res.model.parameters()},
                   "masters": ({st["master"].dtype for st in res.optimizer.shards}
                               if isinstance(res.optimizer, ZeroAdamW) else set())}
        del res
        torch.cuda.empty_cache()
    a, b = out["fp32"], out["bf16"]
    dev = max(abs(x - y) / abs(x) for x, y in zip(a["losses"], b["losses"]))
    ok = (b["params"] == {torch.bfloat16} and b["masters"] == {torch.float32}
          and a["params"] == {torch.float32} and dev <= 2e-2 and b["losses"][-1] < b["losses"][0])
    report("train", ok, f"bf16 params {sorted(map(str, b['params']))}, masters "
           f"{sorted(map(str, b['masters']))}; max |dloss|/loss vs fp32 params {dev:.2e} over "
           f"{len(a['losses'])} steps; loss {b['losses'][0]:.4f} -> {b['losses'][-1]:.4f}")
    for pd in ("fp32", "bf16"):
        r = out[pd]
        print(f"  param_dtype={pd}: step {r['step'] * 1e3:.1f} ms, {r['tps']:.0f} tokens/s, "
              f"peak {r['peak']:.1f} GiB", flush=True)
    print(f"  bf16 / fp32 step time: {b['step'] / a['step']:.3f}", flush=True)


def check_resume(args, tmp: Path) -> None:
    from mmtrain.train import checkpoint as ckpt

    k, n = 3, 6
    extra = {"param_dtype": "bf16", "ckpt_every": k, "keep_last": 3, "max_steps": n}
    _, full, _ = _train(make_config(args, str(tmp / "resume_a"), **extra))
    shutil.copytree(tmp / "resume_a", tmp / "resume_b")
    shutil.rmtree(ckpt.checkpoint_root(tmp / "resume_b") / f"step_{n:08d}")
    lines = open(tmp / "resume_a" / "metrics.jsonl").readlines()[:k]
    (tmp / "resume_b" / "metrics.jsonl").write_text("".join(lines))
    _, again, _ = _train(make_config(args, str(tmp / "resume_b"), **extra))
    want = [r["loss"] for r in full][k:]
    got = [r["loss"] for r in again][k:]
    dev = max(abs(x - y) / abs(y) for x, y in zip(got, want)) if got else float("inf")
    tag = "PASS" if got == want else ("WARN" if dev <= 1e-3 else "FAIL")
    report("resume", tag, f"steps {k + 1}..{n} after resuming from step {k}: "
           f"{'bit-identical' if got == want else f'max rel. deviation {dev:.2e}'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("FAIL setup: no CUDA device", flush=True)
        return 1
    _omegaconf_stub()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_bf16_"))
    try:
        for name, fn in (("rms_norm", check_rms_norm), ("dtypes", lambda: check_dtypes(args)),
                         ("train", lambda: check_train(args, tmp)),
                         ("resume", lambda: check_resume(args, tmp))):
            try:
                fn()
            except Exception as exc:  # one check's crash is its FAIL line, the rest still run
                report(name, False, f"raised {type(exc).__name__}: {str(exc).splitlines()[0]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("ALL PASS" if not FAILED else f"FAILED: {', '.join(FAILED)}", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
