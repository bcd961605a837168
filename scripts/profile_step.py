"""Profile one training step of ``scripts/bench_train.py``'s 1.05B-activated config on one GPU.

    python3 scripts/profile_step.py [overrides...]      e.g. train.micro_batch=8

Builds the model, optimizer and loader as the trainer does (single process), runs the step the
loop runs (micro-batches, bf16 autocast, LM + aux loss, clipping, fused AdamW; with bf16
parameters, ``train.param_dtype``, AdamW on the fp32 masters, whose kernels count as
elementwise below) three times to warm up and three times timed, then one step under ``torch.profiler``. Prints the step time, tokens/s
and MFU, the GPU kernel time by kind (GEMM, elementwise/reduce, attention, MoE permute/index,
optimizer, communication, other), the top kernels, and the ops with the most host time.
"""
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def kind(name: str) -> str:
    n = name.lower()
    if any(w in n for w in ("flash", "fmha", "attention", "_scan", "sdpa")):  # before "cutlass"
        return "attention"
    if any(w in n for w in ("nvjet", "gemm", "cutlass", "sm90", "xmma", "grouped")):
        return "gemm"
    if "nccl" in n:
        return "communication"
    if any(w in n for w in ("index", "gather", "scatter", "sort", "radix", "cumsum")):
        return "permute/index"
    if "adam" in n or "multi_tensor" in n:
        return "optimizer"
    if any(w in n for w in ("elementwise", "vectorized", "reduce", "norm", "softmax", "cat",
                            "copy")):
        return "elementwise/reduce"
    return "other"


def main():
    from bench_train import MODEL, TRAIN
    from mmtrain.data import build_tokenizer
    from mmtrain.data.build import build_loader
    from mmtrain.model import account
    from mmtrain.parallel.apply import check_layout
    from mmtrain.recipe import load_config
    from mmtrain.train import loop
    from torch.profiler import ProfilerActivity, profile

    extra = sys.argv[1:]
    cfg = load_config(MODEL + TRAIN + ["train.max_steps=4", "run.dir=/tmp/profile_step"] + extra)
    topo = check_layout(cfg, 1)
    loader = build_loader(cfg, build_tokenizer(cfg.data), 0, 1, announce=False)
    dev = torch.device("cuda")
    torch.manual_seed(cfg.train.seed)
    model, par = loop.build_parallel(cfg, topo, dev)
    opt = loop.build_optimizer(par, cfg.train)
    model.set_recompute(cfg.train.recompute)
    model.set_compile(cfg.train.compile)
    tokens = cfg.train.global_batch * cfg.data.seq_len

    def step():
        micro = [par.shard_batch(b, dev) for b in loader.next_step()]
        n_tok = float(sum(b.loss_tokens for b in micro))
        model.begin_step(tokens)
        for i, b in enumerate(micro):
            par.prepare_backward(last_micro_batch=i == len(micro) - 1)  # as the loop
            fused = cfg.train.fused_ce
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(b.tokens, b.cu_seqlens, b.position_ids, return_hidden=fused)
                if fused:  # as the loop: chunked linear cross-entropy
                    ce = par.linear_ce(out.hidden, model.lm_head.weight, b.labels,
                                       cfg.train.fused_ce_chunk)
            if not fused:
                ce = par.token_ce(out.logits.float(), b.labels)
            loss = ((ce * b.loss_mask.view(-1)).sum() / n_tok
                    + cfg.train.aux_loss_coef * out.aux_loss)
            loss.backward()
        par.reduce_grads()  # bf16 parameters: the fp32 gradient buckets (a no-op otherwise)
        par.clip_grad_norm(cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0, n = time.time(), 3
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    dt = (time.time() - t0) / n
    fpt = account(cfg.model, cfg.data.seq_len).flops_per_token
    print(f"step {extra}: {dt * 1e3:.1f} ms, {tokens / dt:.0f} tokens/s, MFU "
          f"{fpt * tokens / dt / 989e12 * 100:.1f}%, peak "
          f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    kern = [(e.key, e.self_device_time_total, e.count) for e in ev
            if e.self_device_time_total > 0
            and not e.key.startswith(("aten::", "autograd::", "cudaLaunch"))
            and e.key != "Command Buffer Full"]  # the host waiting on a full queue, not a kernel
    by_kind, total = collections.Counter(), 0
    for k, t, _ in kern:
        by_kind[kind(k)] += t
        total += t
    print(f"GPU kernel time {total / 1e3:.1f} ms of a {dt * 1e3:.1f} ms step")
    for k, v in by_kind.most_common():
        print(f"  {k:<20} {v / 1e3:8.1f} ms {v / total * 100:5.1f}%")
    for k, t, c in sorted(kern, key=lambda x: -x[1])[:25]:
        print(f"  {t / 1e3:8.2f} ms x{c:<5} {k[:110]}")
    print("host time, top aten ops:")
    for e in sorted((e for e in ev if e.key.startswith("aten::")),
                    key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"  {e.self_cpu_time_total / 1e3:8.2f} ms x{e.count:<6} {e.key}")


if __name__ == "__main__":
    main()
