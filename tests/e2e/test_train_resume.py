"""End to end on CPU: training runs, logs, checkpoints; resume is exact; a killed write is harmless."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmtrain.recipe import load_config
from mmtrain.train import checkpoint as ckpt
from mmtrain.train.loop import build_model, train
from tests.conftest import subprocess_env

SMALL = ["model.hidden_size=32", "model.ffn_hidden_size=32", "model.num_layers=2",
         "model.softmax_every=2", "model.num_heads=2", "model.num_kv_heads=1",
         "data.seq_len=32", "data.corpus_max_bytes=60000", "train.global_batch=4",
         "train.micro_batch=2", "train.warmup_steps=2", "run.progress=false"]


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_is_exact(tmp_path):
    n = 3
    full = train(load_config(SMALL + [f"train.max_steps={2 * n}", f"run.dir={tmp_path / 'a'}"]))
    first = train(load_config(SMALL + [f"train.max_steps={n}", f"run.dir={tmp_path / 'b'}"]))
    assert ckpt.latest(tmp_path / "b").name == f"step_{n:08d}"
    second = train(load_config(SMALL + [f"train.max_steps={2 * n}", f"run.dir={tmp_path / 'b'}"]))
    assert [s for s, _ in second.losses] == list(range(n + 1, 2 * n + 1))
    assert first.losses + second.losses == full.losses  # bitwise-equal floats
    pa, pb = _params(full.model), _params(second.model)
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    # metrics.jsonl of the resumed run holds each step once, in order
    steps = [json.loads(l)["step"] for l in open(tmp_path / "b" / "metrics.jsonl")]
    assert steps == list(range(1, 2 * n + 1))
    rec = json.loads(open(tmp_path / "b" / "metrics.jsonl").readline())
    assert {"step", "loss", "lr", "tokens_per_s", "aux_loss"} <= set(rec)
    assert (tmp_path / "b" / "config.yaml").is_file()


def test_keep_last_prunes_old_checkpoints(tmp_path):
    train(load_config(SMALL + ["train.max_steps=4", "train.ckpt_every=1", "train.keep_last=2",
                               f"run.dir={tmp_path}"]))
    names = [p.name for p in ckpt.complete_checkpoints(tmp_path)]
    assert names == ["step_00000003", "step_00000004"]


def test_kill_during_checkpoint_write_leaves_previous_loadable(tmp_path):
    """Run with a checkpoint every step and a hook that sleeps inside the DCP write of step 3;
    SIGKILL it there; the newest complete checkpoint must be step 2 and must load."""
    script = tmp_path / "run.py"
    marker = tmp_path / "writing"
    script.write_text(f"""
import sys, time, pathlib
import torch.distributed.checkpoint as dcp
from mmtrain.recipe import load_config
from mmtrain.train.loop import train
orig = dcp.save
def slow_save(state, checkpoint_id):
    if checkpoint_id.endswith('.tmp_step_00000003'):
        orig(state, checkpoint_id=checkpoint_id)   # half-written: data there, no meta/rename
        pathlib.Path({str(marker)!r}).write_text('x')
        time.sleep(120)
    return orig(state, checkpoint_id=checkpoint_id)
dcp.save = slow_save
train(load_config({SMALL!r} + ['train.max_steps=5', 'train.ckpt_every=1',
                                'run.dir={tmp_path / "run"}']))
""")
    proc = subprocess.Popen([sys.executable, str(script)], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the run never reached the checkpoint write"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = tmp_path / "run"
    assert (run / "checkpoints" / ".tmp_step_00000003").is_dir()
    latest = ckpt.latest(run)
    assert latest is not None and latest.name == "step_00000002"
    cfg = load_config(SMALL + [f"run.dir={run}"])
    model = build_model(cfg, torch.device("cpu"))
    state = ckpt.load(latest, model)
    assert state["loader"]["consumed_rows"] == 2 * 4
    # and training resumes from it, cleaning the partial write away
    res = train(load_config(SMALL + ["train.max_steps=3", f"run.dir={run}"]))
    assert [s for s, _ in res.losses] == [3]
    assert not (run / "checkpoints" / ".tmp_step_00000003").exists()


def test_checkpoint_metadata_refuses_foreign_pickles(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    d = tmp_path / "step_00000001"
    d.mkdir()
    (d / ".metadata").write_bytes(pickle.dumps(Evil()))
    reader = ckpt.SafeReader(str(d))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        reader.read_metadata()


def test_resume_refuses_another_model(tmp_path):
    from mmtrain.config import ConfigError

    train(load_config(SMALL + ["train.max_steps=1", f"run.dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"^run.dir: .*model.hidden_size: 32 -> 64"):
        train(load_config(SMALL + ["train.max_steps=2", "model.hidden_size=64",
                                   f"run.dir={tmp_path}"]))
    again = train(load_config(SMALL + ["train.max_steps=1", f"run.dir={tmp_path}"]))
    assert again.losses == [] and again.final_step == 1  # already done: nothing re-run


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checkpoint_with_pickled_bytes_entries_is_refused(tmp_path):
    """DCP would torch.load(weights_only=False) a 'bytes' entry: such a checkpoint is refused
    before any data is read, even when every class in its metadata is DCP's own."""
    import pickle

    import torch.distributed.checkpoint as dcp

    state = {"model.x": torch.zeros(2), "extra": {"note": "pickled"}}  # a non-tensor value
    dcp.save(state, checkpoint_id=str(tmp_path / "c"))
    with pytest.raises(pickle.UnpicklingError, match="non-tensor entries"):
        ckpt.SafeReader(str(tmp_path / "c")).read_metadata()
