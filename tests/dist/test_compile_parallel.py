"""``train.compile`` under tensor (and sequence) parallelism: a TP=2 run (gloo, torchrun, two CPU
processes) with the compiled regions reproduces the single-process eager run's losses, aux and
gradient norms (1e-5 relative). Under TP the regions are per-rank pure functions of the rank's
pieces: the residual add + norm and the router math run on the rank's sequence shard, RoPE on the
local heads of the all-gathered sequence; the lightning output norm is TP's full-width norm (an
all-reduce), which stays eager. The run logs one graph per region used (no recompile over its
steps) and none for the lightning norm + gate."""

import re
import subprocess
import sys

from mmtrain.recipe import load_config
from mmtrain.train.loop import train
from tests.conftest import free_port, metrics_records, subprocess_env

BASE = ["model.hidden_size=32", "model.ffn_hidden_size=32", "model.num_layers=2",
        "model.softmax_every=2", "model.num_heads=2", "model.num_kv_heads=1",
        "data.seq_len=32", "data.corpus_max_bytes=60000", "train.global_batch=4",
        "train.micro_batch=null", "train.aux_loss_coef=0.05", "train.warmup_steps=2",
        "train.schedule=constant", "train.max_steps=3", "run.progress=false",
        "parallel.timeout_s=60"]


def test_tp2_compiled_matches_single_process_eager(tmp_path):
    train(load_config(BASE + [f"run.dir={tmp_path / 'ref'}"]))
    ref = metrics_records(tmp_path / "ref")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "mmtrain.train", *BASE, "parallel.tp=2",
           "train.compile=true", f"run.dir={tmp_path / 'tp2'}"]
    out = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    line = re.search(r"train\.compile: graphs per compiled region: (.*)", out.stdout)
    assert line, out.stdout[-2000:]
    graphs = dict((k, int(v)) for k, v in (p.split() for p in line.group(1).split(", ")))
    assert graphs == {"residual_norm": 1, "rope_qk": 1, "route_choice": 1, "route_probs": 1,
                      "norm_gate": 0}, graphs
    got = metrics_records(tmp_path / "tp2")
    assert len(got) == len(ref) == 3
    for key in ("loss", "aux_loss", "grad_norm"):
        for a, b in zip(got, ref):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (key, a[key], b[key])
