"""``mmtrain import-hf HF_DIR OUT_CHECKPOINT``: a transformers MiniMax directory (native fused
layout, transformers' own per-expert ``save_pretrained`` output, or the released remote-code
``MiniMaxText01ForCausalLM`` layout) -> an mmtrain checkpoint directory.

OUT_CHECKPOINT is one complete checkpoint: DCP tensors "model.<fqn>", ``meta.json`` (step 0, the
full config with the imported model section) and an empty ``rank_00000.json``. It has no optimizer
or loader state: train from it with ``train.init_from=OUT_CHECKPOINT`` (weights only, step 0), or
load it with ``mmtrain.from_pretrained``. Tensors stream one at a time from the source files into
the DCP write.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from mmtrain.config import Config, ModelConfig
from mmtrain.hf.config_map import from_hf_config
from mmtrain.hf.tensor_io import InteropError, Progress, WeightSource, write_dcp_lazy
from mmtrain.hf.weights import LIGHTNING_BUFFERS, import_tensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
DTYPES = {"auto": None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16}


def read_hf_config(hf_dir) -> tuple[ModelConfig, dict]:
    p = Path(hf_dir) / "config.json"
    if not p.is_file():
        raise InteropError(f"{hf_dir}: no config.json; not a HF model directory")
    with open(p) as f:
        d = json.load(f)
    return from_hf_config(d, name=f"hf:{Path(hf_dir).resolve().name}")


def open_source(hf_dir, mc: ModelConfig, info: dict, dtype=None):
    """(tensors to produce, source) with unknown source weights rejected."""
    src = WeightSource(hf_dir)
    tensors, used = import_tensors(mc, src, info.get("qk_permutation"), dtype)
    extra = [k for k in src.keys() if k not in used
             and k.rsplit(".", 1)[-1] not in LIGHTNING_BUFFERS
             and not k.endswith("rotary_emb.inv_freq")]
    if extra:
        shown = ", ".join(sorted(extra)[:6]) + (" ..." if len(extra) > 6 else "")
        raise InteropError(f"{hf_dir}: {len(extra)} weight(s) have no place in mmtrain's model "
                           f"({shown}); the architecture differs (e.g. a shared expert)")
    note = _slope_note(mc, src)
    if note and note not in info["notes"]:
        info["notes"].append(note)
    return tensors, src


def _slope_note(mc: ModelConfig, src) -> str | None:
    """transformers stores its slopes as buffers; say how far they are from mmtrain's formula."""
    from mmtrain.model.layers import lightning_slopes

    worst, where = 0.0, None
    for i, kind in enumerate(mc.layer_types()):
        name = f"model.layers.{i}.self_attn.slope_rate"
        if kind != "lightning" or name not in src:
            continue
        theirs = src.read(name).double().flatten()
        ours = lightning_slopes(i, mc.num_layers, mc.num_heads)
        if theirs.numel() != ours.numel():
            continue
        d = float(((theirs - ours).abs() / ours).max())
        if d > worst:
            worst, where = d, i
    if worst > 1e-6:
        return (f"the checkpoint's lightning slope buffers differ from mmtrain's formula by up to "
                f"{worst:.3g} relative (layer {where}; transformers divides by L-1+1e-5, mmtrain "
                f"by L-1); mmtrain uses its own slopes, so logits differ slightly on long inputs")
    return None


def import_hf(hf_dir, out_checkpoint, *, dtype: str = "auto", progress: bool = True,
              log=None) -> dict:
    """Convert; returns {"checkpoint": path, "config": ModelConfig, "notes": [...]}."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if dtype not in DTYPES:
        raise InteropError(f"--dtype {dtype}: use auto, fp32 or bf16")
    mc, info = read_hf_config(hf_dir)
    for n in info["notes"]:
        log(f"note: {n}")
    tensors, src = open_source(hf_dir, mc, info, DTYPES[dtype])
    out = Path(out_checkpoint)
    if out.exists() and any(out.iterdir()):
        raise InteropError(f"{out}: exists and is not empty; choose a new OUT_CHECKPOINT")
    tmp = out.parent / f".tmp_{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    total = sum(t.nbytes for t in tensors)
    bar = Progress(f"import {Path(hf_dir).name}", total, enabled=progress)
    for t in tensors:
        t.produce = _ticking(t.produce, bar, t.nbytes, t.name)
    try:
        write_dcp_lazy(tmp, tensors)
    finally:
        bar.close()

    cfg = Config(model=mc)
    copied = []
    for name in TOKENIZER_FILES:
        fp = Path(hf_dir) / name
        if fp.is_file():
            shutil.copy2(fp, tmp / name)
            copied.append(name)
    if "tokenizer.json" in copied:
        cfg.data.tokenizer = str((out / "tokenizer.json").resolve())
    meta = {"step": 0, "world_size": 1, "config": cfg.to_dict(),
            "imported_from": {"path": str(Path(hf_dir).resolve()), "flavor": info["flavor"],
                              "notes": info["notes"]}}
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)
    with open(tmp / "rank_00000.json", "w") as f:
        json.dump({}, f)
    if out.exists():
        out.rmdir()
    os.rename(tmp, out)
    log(f"imported {hf_dir} ({info['flavor']} layout) -> {out}: {len(tensors)} tensors, "
        f"{total / 2**20:.1f} MiB" + (f", tokenizer {copied}" if copied else ""))
    return {"checkpoint": str(out), "config": mc, "notes": info["notes"],
            "flavor": info["flavor"]}


def _ticking(fn, bar: Progress, nbytes: int, name: str):
    def produce():
        x = fn()
        bar.tick(nbytes)
        if name.endswith("moe.experts.w2") or name == "lm_head.weight":
            bar.unit_done(name.rsplit(".moe", 1)[0] if "moe" in name else name)
        return x
    return produce
