"""``mmtrain export-hf`` / ``mmtrain import-hf`` argument parsing (wired into mmtrain.cli)."""

from __future__ import annotations

import argparse
import sys


def _run(fn, **kwargs) -> int:
    from mmtrain.config import ConfigError
    from mmtrain.hf.tensor_io import InteropError

    try:
        fn(**kwargs)
    except (InteropError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def export_main(args: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="mmtrain export-hf",
        description="mmtrain checkpoint (or run directory: its newest checkpoint) -> a "
                    "transformers MiniMax directory (MiniMaxForCausalLM.from_pretrained loads it)")
    ap.add_argument("checkpoint")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", default="auto", help="auto (as stored) | fp32 | bf16 | fp16")
    ap.add_argument("--max-shard-size", default="2GB", help="shard size cap, e.g. 2GB, 500MB")
    ap.add_argument("--rope", default="strict", choices=("strict", "longrope", "full"),
                    help="partial RoPE (rotary_dim < head_dim): strict refuses; longrope exports "
                         "it exactly (longrope factors + permuted q/k dims); full rotates all "
                         "dims (a different function)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(args)
    from mmtrain.hf.export import export_hf

    return _run(export_hf, checkpoint=a.checkpoint, out_dir=a.out_dir, dtype=a.dtype,
                max_shard_size=a.max_shard_size, rope=a.rope, progress=not a.no_progress)


def import_main(args: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="mmtrain import-hf",
        description="transformers MiniMax or remote-code MiniMax-Text-01 directory -> an mmtrain "
                    "checkpoint directory (train from it with train.init_from=OUT_CHECKPOINT)")
    ap.add_argument("hf_dir")
    ap.add_argument("out_checkpoint")
    ap.add_argument("--dtype", default="auto", help="auto (as stored) | fp32 | bf16")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(args)
    from mmtrain.hf.import_ import import_hf

    return _run(import_hf, hf_dir=a.hf_dir, out_checkpoint=a.out_checkpoint, dtype=a.dtype,
                progress=not a.no_progress)
