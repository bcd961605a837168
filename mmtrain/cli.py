"""``mmtrain train | info | plan | preprocess | launch | export-hf | import-hf`` — the command line.

    mmtrain train [overrides...]        train (or resume) as the recipe says; works under torchrun
    mmtrain info [--json] [overrides]   layer layout, parameter counts, FLOPs per token, stage
    mmtrain plan [--json] [overrides]   per-GPU memory and step time of layouts on a cluster;
                                        the fastest that fits (cluster=h800 cluster.gpus=1024
                                        plan.recompute=full parallel.tp=8 ...; docs/plan.md)
    mmtrain preprocess INPUT OUTPUT_PREFIX [--tokenizer T] [--workers N]
                                        text / folder / .jsonl -> Megatron .bin/.idx
    mmtrain launch CURRICULUM RUN_ROOT [--local] [overrides]
                                        the stages of recipes/curriculum/CURRICULUM.yaml as a
                                        Slurm dependency chain (or one by one here with --local)
    mmtrain export-hf CHECKPOINT OUT    mmtrain checkpoint -> transformers MiniMax directory
    mmtrain import-hf HF_DIR OUT        transformers / remote-code MiniMax -> mmtrain checkpoint

Overrides are Hydra's: ``model=small train.max_steps=50 run.dir=runs/x``. A bad recipe or input
fails with one line naming the field (or file) and the fix (exit status 2). Training that cannot go
on (``train.max_bad_steps`` non-finite steps in a row, a dead or stalled peer rank) ends with one
line too (exit status 3).
"""

from __future__ import annotations

import json
import os
import sys

from mmtrain.config import ConfigError

USAGE = __doc__


def _info(args: list[str]) -> int:
    from mmtrain.model import account
    from mmtrain.model.layers import lightning_slopes
    from mmtrain.recipe import load_config

    as_json = "--json" in args
    cfg = load_config([a for a in args if a != "--json"])
    from mmtrain.parallel.apply import check_context
    from mmtrain.parallel.context import layout_summary

    check_context(cfg)
    from mmtrain.curriculum import stage_summary

    acct = account(cfg.model, cfg.data.seq_len)
    stage = stage_summary(cfg)
    if as_json:
        print(json.dumps({**acct.as_dict(), "stage": stage}))
        return 0
    types = acct.layer_types
    soft = [i for i, t in enumerate(types) if t == "softmax"]
    m = cfg.model
    print(f"model {m.name}: {m.num_layers} layers, hidden {m.hidden_size}, "
          f"{m.num_heads} heads × {m.head_dim} ({m.num_kv_heads} KV heads on softmax layers), "
          f"{m.num_experts} experts top-{m.top_k} of width {m.ffn_hidden_size}")
    print("layout: " + "".join("S" if t == "softmax" else "L" for t in types)
          + f"   (softmax at {soft if soft else 'none'})")
    print(f"params total   {acct.params_total:,} ({acct.params_total / 1e9:.3f} B)")
    print(f"params active  {acct.params_active:,} ({acct.params_active / 1e9:.3f} B)")
    print(f"FLOPs/token    {acct.flops_per_token:.4g} (training, seq_len {cfg.data.seq_len})")
    if types and "lightning" in types:
        l0 = types.index("lightning")
        s = lightning_slopes(l0, m.num_layers, m.num_heads)
        print(f"slopes layer {l0}: " + ", ".join(f"{x:.4g}" for x in s[:4].tolist())
              + (" ..." if m.num_heads > 4 else ""))
    print(f"DeepNorm alpha {m.deepnorm_alpha:.6f}, beta {m.deepnorm_beta:.6f} ({m.norm_scheme})")
    print(layout_summary(cfg.parallel, cfg.data.seq_len))
    st = stage
    budget = f"{st['token_budget']:,} tokens" if st["token_budget"] else "train.max_steps"
    print(f"stage {st['name']}: seq_len {st['seq_len']:,}, RoPE base {st['rope_theta']:g}, "
          f"budget {budget}, {st['steps']:,} steps at {st['global_batch_rows']:,} rows "
          f"({st['global_batch_tokens']:,} tokens) per step"
          + (" (batch schedule)" if st["batch_schedule"] else ""))
    if st["mixture"] is not None:
        print(f"mixture short/medium/long {st['mixture']}"
              + (f" from {st['mixture_from']} over the first {st['transition']:.0%}"
                 if st["mixture_from"] else "")
              + (f"; QA {st['qa_fraction']:.0%} in the last {st['qa_window']:.0%}"
                 if st["qa_fraction"] else ""))
    if st["eval_seq_len"]:
        print(f"evaluation length {st['eval_seq_len']:,} (extrapolation, not trained)")
    return 0


def _plan(args: list[str]) -> int:
    from mmtrain.plan_cli import main

    return main(args)


def _train(args: list[str]) -> int:
    from mmtrain.recipe import load_config
    from mmtrain.train.loop import train

    cfg = load_config(args)
    result = train(cfg)
    if result.losses and os.environ.get("RANK", "0") == "0":
        first, last = result.losses[0][1], result.losses[-1][1]
        print(f"done: step {result.final_step}, loss {first:.4f} -> {last:.4f}, "
              f"run dir {result.run_dir}", flush=True)
    return 0


def _preprocess(args: list[str]) -> int:
    from mmtrain.data.preprocess import main

    return main(args)


def _launch(args: list[str]) -> int:
    from mmtrain.curriculum import main

    return main(args)


def _export_hf(args: list[str]) -> int:
    from mmtrain.hf.cli import export_main

    return export_main(args)


def _import_hf(args: list[str]) -> int:
    from mmtrain.hf.cli import import_main

    return import_main(args)


COMMANDS = {"train": _train, "info": _info, "plan": _plan, "preprocess": _preprocess,
            "launch": _launch, "export-hf": _export_hf, "import-hf": _import_hf}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command '{cmd}'; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from mmtrain.train.health import TrainingAborted

    try:
        return COMMANDS[cmd](rest)
    except ConfigError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingAborted as exc:  # non-finite steps, a dead or stalled peer: one line
        if exc.every_rank or os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
