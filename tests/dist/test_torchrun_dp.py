"""torchrun with 2 gloo processes reproduces one process with the same global batch."""

import json
import subprocess
import sys

from tests.conftest import free_port, subprocess_env

OVR = ["model.hidden_size=32", "model.ffn_hidden_size=32", "model.num_layers=2",
       "model.softmax_every=2", "model.num_heads=2", "model.num_kv_heads=1", "data.seq_len=32",
       "data.corpus_max_bytes=60000", "train.global_batch=4", "train.micro_batch=null",
       "train.max_steps=4", "train.warmup_steps=2", "run.progress=false", "parallel.timeout_s=60"]


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in open(run_dir / "metrics.jsonl")]


def test_two_gloo_processes_match_one(tmp_path):
    env = subprocess_env()
    one = subprocess.run([sys.executable, "-m", "mmtrain.train", *OVR,
                          f"run.dir={tmp_path / 'one'}"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "mmtrain.train", *OVR,
                          f"run.dir={tmp_path / 'two'}"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    assert a[-1] < a[0]
