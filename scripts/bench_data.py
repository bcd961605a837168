"""Data pipeline cost on CPU: preprocess throughput and the blend loader's cost per step.

    python scripts/bench_data.py [--workdir /tmp/bench_data] [--max-bytes 16000000]
                                 [--workers 1 2] [--rows 8] [--steps 5] [--out bench_data.json]

1. ``mmtrain preprocess`` of the embedded corpus (stdlib, capped at ``--max-bytes``) with the byte
   tokenizer and with a 32K-vocabulary byte-level BPE trained on the same text (``tokenizers``),
   for each ``--workers``: tokens/s in total and per worker.
2. The blend loader at 128K tokens per row (``data.seq_len=131072``): a synthetic two-prefix blend
   (0.3 / 0.7) of ~64M tokens with log-normal document lengths (median ~3K tokens, a tail past
   128K), length mixture 30/70/0 (ctx128k's) with the QA component on (10% in the last 20% of the
   stage, measured there), ``--rows`` rows per step on one rank: the time of ``next_step()``
   (planning the step's rows, reading the memory-mapped tokens, building cu_seqlens and the
   batch), per step and per 128K-token row, cold (first read of the pages) and warm.
The reference for "negligible": a training step of MiniMax-Text-01 spends
``account(...).flops_per_token × 131072`` FLOPs per row; at 40% MFU of a 989 TFLOP/s GPU that is
the time printed as "GPU compute per row". Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_preprocess(work, max_bytes, workers_list):
    from mmtrain.data.corpus import iter_corpus
    from mmtrain.data.preprocess import preprocess

    tok_path = os.path.join(work, "bpe32k.json")
    if not os.path.exists(tok_path):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<unk>", "<pad>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(iter_corpus("stdlib", 4_000_000), trainer)
        tok.save(tok_path)
    out = []
    for name, spec in (("byte", "byte"), ("bpe32k", tok_path)):
        for w in workers_list:
            r = preprocess("stdlib", os.path.join(work, f"pre_{name}_{w}"), spec, workers=w,
                           max_bytes=max_bytes, progress=False)
            r.update(tokenizer=name, mb=max_bytes / 1e6,
                     tokens_per_s_per_worker=r["tokens_per_s"] / w)
            out.append(r)
            print(f"preprocess {name} workers={w}: {r['documents']} docs, {r['tokens']:,} tokens "
                  f"in {r['seconds']:.2f}s = {r['tokens_per_s']:,.0f} tok/s "
                  f"({r['tokens_per_s_per_worker']:,.0f} per worker)", flush=True)
    return out


def synthetic_prefix(path, n_tokens, seed):
    from mmtrain.data.indexed import IndexedReader, IndexedWriter

    if os.path.exists(path + ".idx"):
        return IndexedReader(path)
    rng = np.random.default_rng(seed)
    w = IndexedWriter(path, np.int32)  # a 200K-vocabulary tokenizer needs int32, as MiniMax's
    total = 0
    while total < n_tokens:
        n = int(min(max(rng.lognormal(8.0, 1.5), 16), 600_000))
        doc = rng.integers(0, 200_000, size=n, dtype=np.int32)
        doc[-1] = 199_999
        w.add_document(doc)
        total += n
    w.finalize()
    return IndexedReader(path)


def bench_loader(work, rows, steps, tokens):
    from mmtrain.config import DataConfig
    from mmtrain.data.blend import BlendLoader
    from mmtrain.data.mixture import bucket_of
    from mmtrain.train.schedules import BatchSchedule

    T = 131072
    a = synthetic_prefix(os.path.join(work, "syn_a"), tokens // 2, 1)
    b = synthetic_prefix(os.path.join(work, "syn_b"), tokens // 2, 2)
    q = synthetic_prefix(os.path.join(work, "syn_qa"), tokens // 8, 3)
    lens = np.concatenate([np.asarray(a.lengths), np.asarray(b.lengths)])
    buckets = np.bincount(bucket_of(lens, [32768, 131072]), minlength=3)
    cfg = DataConfig(seq_len=T, blend=[0.3, a.prefix, 0.7, b.prefix], mixture=[0.3, 0.7, 0.0],
                     length_bounds=[32768, 131072], qa_blend=[1.0, q.prefix], qa_fraction=0.1,
                     qa_window=0.2)
    total_steps = 5 * steps
    ld = BlendLoader(cfg, BatchSchedule(T, rows), total_steps, 1, 0, 1, vocab_size=200_064)
    ld.step = int(total_steps * 0.8)  # in the QA window: every component is exercised
    times = []
    docs_per_row = []
    for _ in range(steps):
        t0 = time.perf_counter()
        micro = ld.next_step()
        times.append(time.perf_counter() - t0)
        docs_per_row += [(len(m.cu_seqlens) - 1) for m in micro]
    t_plan = []
    for _ in range(steps):
        t0 = time.perf_counter()
        ld.plan_step(ld.step)
        ld.step += 1
        t_plan.append(time.perf_counter() - t0)
    return {"seq_len": T, "rows_per_step": rows, "corpus_tokens": int(lens.sum()),
            "documents": int(len(lens)), "bucket_docs": buckets.tolist(),
            "step_s_cold": times[0], "step_s_warm_median": statistics.median(times[1:]),
            "row_ms_warm": 1e3 * statistics.median(times[1:]) / rows,
            "plan_ms_per_row": 1e3 * statistics.median(t_plan) / rows,
            "pieces_per_row_mean": float(np.mean(docs_per_row))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/bench_data")
    ap.add_argument("--max-bytes", type=int, default=16_000_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64_000_000)
    ap.add_argument("--out", default="bench_data.json")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    import torch

    from mmtrain.model import account
    from mmtrain.recipe import load_config

    pre = bench_preprocess(args.workdir, args.max_bytes, args.workers)
    load = bench_loader(args.workdir, args.rows, args.steps, args.tokens)
    cfg = load_config(["model=minimax_text_01", "stage=ctx128k"])
    fpt = account(cfg.model, 131072).flops_per_token
    gpu_row_s = fpt * 131072 / (0.4 * 989e12)
    info = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "command": " ".join(sys.argv),
            "preprocess": pre, "loader": load, "minimax_flops_per_token_128k": fpt,
            "gpu_compute_per_row_s_at_40pct_mfu": gpu_row_s}
    with open(args.out, "w") as f:
        json.dump(info, f, indent=1)
    print(f"\nmachine: {info['machine']}; torch {torch.__version__}, numpy {np.__version__}")
    print("| tokenizer | workers | tokens | seconds | tokens/s | tokens/s per worker |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in pre:
        print(f"| {r['tokenizer']} | {r['workers']} | {r['tokens']:,} | {r['seconds']:.2f} | "
              f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_worker']:,.0f} |")
    L = load
    print(f"\nloader at {L['seq_len']:,} tokens/row, {L['rows_per_step']} rows/step, blend of "
          f"{L['documents']:,} docs ({L['corpus_tokens']:,} tokens; short/medium/long docs "
          f"{L['bucket_docs']}), {L['pieces_per_row_mean']:.1f} document pieces per row")
    print(f"| step (cold) | step (warm) | per row | planning per row | GPU compute per row "
          f"(MiniMax-Text-01, 40% MFU) |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {L['step_s_cold'] * 1e3:.1f} ms | {L['step_s_warm_median'] * 1e3:.1f} ms | "
          f"{L['row_ms_warm']:.2f} ms | {L['plan_ms_per_row']:.3f} ms | {gpu_row_s:.1f} s |")


if __name__ == "__main__":
    main()
