"""Converting a checkpoint of a few hundred MB streams: peak RSS grows by < 1/4 of its size.

Each step runs in a fresh child process that imports everything first, records
``ru_maxrss`` (the baseline), converts, and records it again."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env

pytest.importorskip("transformers")

# 12 layers × 16 experts × 3 × 256 × 512 fp32 ≈ 302 MB of experts (+ ~4 MB attention etc.)
MAKE = r"""
import sys, torch
from mmtrain.config import Config, ModelConfig
from mmtrain.model import MiniMaxModel
from mmtrain.train import checkpoint as ckpt
mc = ModelConfig(name="rss", vocab_size=258, hidden_size=256, num_layers=12, num_heads=4,
                 head_dim=64, num_kv_heads=2, softmax_every=4, num_experts=16, top_k=2,
                 ffn_hidden_size=512, rotary_dim=64)
m = MiniMaxModel(mc)
m.reset_parameters(seed=0)
class NoOpt:  # a model-only checkpoint: no optimizer state to write
    state = {}
    param_groups = []
ckpt.save(sys.argv[1], 1, m, NoOpt(), {}, {"config": Config(model=mc).validate().to_dict()}, 1)
"""

MEASURE = r"""
import json, resource, sys
import torch, torch.distributed.checkpoint
import mmtrain.model, mmtrain.train.checkpoint, mmtrain.hf.export, mmtrain.hf.import_, mmtrain.hf.pretrained
from mmtrain.hf import export_hf, import_hf
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "export":
    info = export_hf(sys.argv[2], sys.argv[3], max_shard_size="100MB", progress=True)
    size = info["bytes"]
else:
    import_hf(sys.argv[2], sys.argv[3], progress=True)
    size = None
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_kb": base, "peak_kb": peak, "bytes": size}))
"""


def _run(code, *args):
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO,
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_conversion_memory_is_bounded(tmp_path):
    _run(MAKE, tmp_path / "run")
    ex = _run(MEASURE, "export", tmp_path / "run", tmp_path / "hf")
    r = json.loads(ex.stdout.strip().splitlines()[-1])
    size = r["bytes"]
    assert size > 250e6
    assert "model-00004-of-00004.safetensors" in ex.stderr  # progress: a line per shard
    grew = (r["peak_kb"] - r["base_kb"]) * 1024
    assert grew < size / 4, f"export grew RSS by {grew / 2**20:.0f} MiB for {size / 2**20:.0f} MiB"
    im = _run(MEASURE, "import", tmp_path / "hf", tmp_path / "ck")
    r2 = json.loads(im.stdout.strip().splitlines()[-1])
    grew = (r2["peak_kb"] - r2["base_kb"]) * 1024
    assert grew < size / 4, f"import grew RSS by {grew / 2**20:.0f} MiB for {size / 2**20:.0f} MiB"
    print(f"export +{(r['peak_kb'] - r['base_kb']) / 1024:.0f} MiB, import "
          f"+{(r2['peak_kb'] - r2['base_kb']) / 1024:.0f} MiB for {size / 2**20:.0f} MiB")


def test_training_starts_from_an_imported_checkpoint(tmp_path):
    """import-hf output + train.init_from: step 0 uses the imported weights, then trains on."""
    import torch

    from mmtrain.config import Config
    from mmtrain.hf import export_hf, import_hf
    from mmtrain.model import MiniMaxModel
    from mmtrain.recipe import load_config
    from mmtrain.train import checkpoint as ckpt
    from mmtrain.train.loop import train

    small = ["model.hidden_size=32", "model.ffn_hidden_size=32", "model.num_layers=2",
             "model.softmax_every=2", "model.num_heads=2", "model.num_kv_heads=1",
             "model.rotary_dim=16", "data.seq_len=32", "data.corpus_max_bytes=20000",
             "train.global_batch=2", "train.micro_batch=2", "run.progress=false",
             "train.lr=1e-9", "train.min_lr=0", "train.warmup_steps=0"]
    cfg = load_config(small + [f"run.dir={tmp_path / 'unused'}"])
    src = MiniMaxModel(cfg.model)
    src.reset_parameters(seed=99)  # not the recipe's seed: the weights must come from the file
    ckpt.save(tmp_path / "src", 1, src, torch.optim.AdamW(src.parameters()), {},
              {"config": Config(model=cfg.model).to_dict()}, 1)
    export_hf(tmp_path / "src", tmp_path / "hf", progress=False, log=lambda m: None)
    import_hf(tmp_path / "hf", tmp_path / "imported", progress=False, log=lambda m: None)
    run = train(load_config(small + ["train.max_steps=1", f"run.dir={tmp_path / 'run'}",
                                     f"train.init_from={tmp_path / 'imported'}"]))
    assert run.final_step == 1
    for k, v in src.state_dict().items():  # lr 1e-9: one step barely moves the weights
        assert torch.allclose(run.model.state_dict()[k].cpu(), v, atol=1e-6), k
