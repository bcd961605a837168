"""``mmtrain export-hf CHECKPOINT OUT_DIR``: an mmtrain checkpoint -> a transformers MiniMax directory.

Writes ``config.json`` (model_type ``minimax``, transformers' native fields, plus an ``mmtrain``
entry that lets ``import-hf`` restore the exact config), ``model-XXXXX-of-YYYYY.safetensors``
shards of at most ``max_shard_size`` bytes (transformers' native names and fused expert layout),
``model.safetensors.index.json``, and the tokenizer files when the run used a tokenizer.json.
Tensors stream one at a time from the DCP checkpoint to the shard being written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from mmtrain.config import Config, config_from_dict
from mmtrain.hf.config_map import to_hf_config
from mmtrain.hf.tensor_io import (DCPSource, InteropError, Progress, parse_size, plan_shards,
                                  write_safetensors_stream)
from mmtrain.hf.weights import export_tensors

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory (has meta.json), or a run directory (its newest checkpoint)."""
    p = Path(path)
    if (p / "meta.json").is_file() and (p / ".metadata").is_file():
        return p
    from mmtrain.train.checkpoint import latest

    found = latest(p)
    if found is not None:
        return found
    raise InteropError(f"{p}: not an mmtrain checkpoint (no meta.json + .metadata) nor a run "
                       f"directory with complete checkpoints under {p / 'checkpoints'}")


def checkpoint_config(ck: Path) -> Config:
    from mmtrain.train.checkpoint import read_meta

    meta = read_meta(ck)
    if "config" not in meta:
        raise InteropError(f"{ck}/meta.json has no 'config'; it was not written by mmtrain")
    return config_from_dict(meta["config"])


def _tokenizer_info(cfg: Config, log):
    """(files to copy, bos, eos, pad) of the run's tokenizer; nothing to copy for 'byte'."""
    tok = cfg.data.tokenizer
    if tok == "byte":
        from mmtrain.data.tokenizer import ByteTokenizer

        return [], None, ByteTokenizer.eos_id, ByteTokenizer.pad_id
    try:
        from mmtrain.data import build_tokenizer

        t = build_tokenizer(cfg.data)
        return list(t.files()), None, int(t.eos_id), int(t.pad_id)
    except Exception as exc:  # tokenizer file moved, or `tokenizers` missing: weights still go
        log(f"warning: tokenizer '{tok}' not exported ({exc}); copy it next to the model by hand")
        return [], None, None, None


def export_hf(checkpoint, out_dir, *, dtype: str = "auto", max_shard_size="2GB",
              rope: str = "strict", progress: bool = True, log=None) -> dict:
    """Convert; returns {"files": [...], "warnings": [...], "bytes": n}."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    ck = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(ck)
    mc = cfg.model
    src = DCPSource(ck)
    src_dtype = src.info("embed.weight").dtype
    if dtype == "auto":
        out_dtype = src_dtype
    elif dtype in DTYPES:
        out_dtype = DTYPES[dtype]
    else:
        raise InteropError(f"--dtype {dtype}: use auto, fp32, bf16 or fp16")
    files, bos, eos, pad = _tokenizer_info(cfg, log)
    hf_cfg, warns = to_hf_config(mc, dtype=out_dtype, rope=rope, bos_id=bos, eos_id=eos,
                                 pad_id=pad, aux_loss_coef=cfg.train.aux_loss_coef)
    for w in warns:
        log(f"warning: {w}")
    qk_perm = hf_cfg["mmtrain"]["qk_permutation"]
    tensors = export_tensors(mc, src.read_many, out_dtype, qk_perm)
    shards = plan_shards(tensors, parse_size(max_shard_size))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("model-*-of-*.safetensors")) + list(out.glob("model.safetensors")):
        stale.unlink()
    total = sum(t.nbytes for t in tensors)
    bar = Progress(f"export {ck.name}", total, enabled=progress)
    weight_map: dict[str, str] = {}
    names = []
    try:
        for k, shard in enumerate(shards, 1):
            name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            for t in shard:
                weight_map[t.name] = name
                t.produce = _ticking(t.produce, bar, t.nbytes)
            write_safetensors_stream(out / name, shard, {"format": "pt"})
            bar.unit_done(f"{name} ({len(shard)} tensors)")
            names.append(name)
    finally:
        bar.close()
    with open(out / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(out / "config.json", "w") as f:
        json.dump(hf_cfg, f, indent=2)
    copied = []
    for fp in files:
        if os.path.isfile(fp):
            shutil.copy2(fp, out / os.path.basename(fp))
            copied.append(os.path.basename(fp))
    log(f"exported {ck} -> {out}: {len(tensors)} tensors, {total / 2**20:.1f} MiB in "
        f"{len(names)} shard(s)" + (f", tokenizer {copied}" if copied else ""))
    return {"files": names + ["model.safetensors.index.json", "config.json"] + copied,
            "warnings": warns, "bytes": total, "checkpoint": str(ck)}


def _ticking(fn, bar: Progress, nbytes: int):
    def produce():
        x = fn()
        bar.tick(nbytes)
        return x
    return produce
