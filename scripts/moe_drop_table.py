"""Drop rate with and without global routing, on the same batches (gloo on CPU, or NCCL).

    torchrun --nproc-per-node 4 scripts/moe_drop_table.py [--steps 8] [--out drops.json] [overrides]

Every rank builds the same model (the recipe's, initialised from ``train.seed``, or
``train.init_from`` weights), runs with expert parallelism over all ranks (``parallel.ep`` =
world, dense part data-parallel), and routes the same global batches of the embedded corpus
forward only, once per setting: capacity factor 1.0 and 1.25, local routing (each rank's capacity
judged on its own tokens) and global routing (counts all-gathered, capacity judged on all ranks'
tokens). It prints the drop rate of the routed slots over all layers, ranks and batches, per
setting, and the max/mean expert load; rank 0 writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import torch.distributed as dist


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", default="")
    args, overrides = p.parse_known_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()

    from mmtrain.data import DataLoader, build_dataset, build_tokenizer
    from mmtrain.model.moe import step_summary
    from mmtrain.parallel.apply import GROUPS_USED, check_layout, parallelize
    from mmtrain.parallel.groups import create_process_groups
    from mmtrain.recipe import load_config
    from mmtrain.train.loop import build_model

    rows = []
    for cf in (1.0, 1.25):
        for glob in (False, True):
            cfg = load_config([f"parallel.ep={world}", f"model.capacity_factor={cf}",
                               f"model.global_routing={str(glob).lower()}",
                               "train.micro_batch=null"] + overrides)
            topo = check_layout(cfg, world)
            groups = create_process_groups(topo, names=GROUPS_USED)
            tok = build_tokenizer(cfg.data)
            loader = DataLoader(build_dataset(cfg.data, tok), cfg.train.global_batch,
                                cfg.train.micro_batch, topo.rank_info(rank).dp, topo.dp,
                                cfg.data.seed)
            model = build_model(cfg, torch.device("cpu"))
            parallelize(model, topo, groups, cfg.parallel, torch.device("cpu"))
            total = None
            with torch.no_grad():
                for _ in range(args.steps):
                    model.begin_step(cfg.train.global_batch * cfg.data.seq_len)
                    for b in loader.next_step():
                        model(b.tokens, b.cu_seqlens, b.position_ids)
                    st = model.moe_stats()
                    dist.all_reduce(st)
                    total = st if total is None else total + st
            s = step_summary(total, cfg.model.num_experts, cfg.model.top_k)
            rows.append({"ep": world, "capacity_factor": cf, "global_routing": glob,
                         "drop_rate": s["drop_rate"], "expert_imbalance": s["expert_imbalance"],
                         "model": cfg.model.name, "tokens_per_rank": cfg.train.global_batch
                         * cfg.data.seq_len // world, "batches": args.steps})
    if rank == 0:
        print(f"\nEP={world} (gloo), model {rows[0]['model']}, {rows[0]['tokens_per_rank']} "
              f"tokens per rank per batch, {args.steps} batches, the same batches per setting")
        print(f"{'capacity':>9} {'routing':>8} {'drop rate':>10} {'max/mean load':>14}")
        for r in rows:
            print(f"{r['capacity_factor']:>9} {'global' if r['global_routing'] else 'local':>8} "
                  f"{r['drop_rate'] * 100:>9.2f}% {r['expert_imbalance']:>14.2f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    dist.barrier()  # as bench_moe and bench_train: rank 0 may still be writing
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
