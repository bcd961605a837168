"""scripts/bench_context_layer.py runs end to end on CPU (tiny sizes): the lightning layer and its
core at CP=1 and CP=2 (two gloo processes, and one process emulating each rank's share), so the
GPU run has no plumbing bugs left."""

import json
import subprocess
import sys

from tests.conftest import REPO, free_port, subprocess_env

SCRIPT = str(REPO / "scripts" / "bench_context_layer.py")


def _check(res, world, emulate):
    assert res["world"] == world and res["cp"] == 2 and res["emulate_cp"] == emulate
    (row,) = res["rows"]
    assert (row["shape"], row["H"], row["T_per_gpu"], row["cp"]) == ("smoke", 2, 64, 2)
    for key in ("layer_ms", "layer_queued_ms", "core_ms", "core_queued_ms"):
        ranks = row[f"cp_{key}_per_rank"]
        assert len(ranks) == 2 and min(ranks) > 0 and row[f"cp_{key}"] == max(ranks), key
        assert row[f"cp1_{key}"] > 0
        assert row[f"{key[:-3]}_vs_cp1"] == row[f"cp1_{key}"] / row[f"cp_{key}"], key
    # the layer does more than its core (projections, norm, gate)
    assert row["cp1_layer_ms"] > row["cp1_core_ms"]


def test_bench_context_layer_emulated_and_two_processes(tmp_path):
    out = tmp_path / "emul.json"
    cmd = [sys.executable, SCRIPT, "--cpu-smoke", "--emulate-cp", "2", "--warmup", "1",
           "--iters", "2", "--out", str(out)]
    p = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    _check(json.loads(out.read_text()), 1, 2)
    assert "CP=2 emulated on one GPU" in p.stdout and "queued" in p.stdout

    out = tmp_path / "two.json"
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), SCRIPT, "--cpu-smoke", "--warmup", "1",
           "--iters", "2", "--out", str(out)]
    p = subprocess.run(two, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    _check(json.loads(out.read_text()), 2, None)
    assert "emulated" not in p.stdout


def test_bench_context_layer_refuses_what_it_cannot_measure():
    for args, msg in ((["--cpu-smoke"], "give --emulate-cp C"),
                      (["--cpu-smoke", "--emulate-cp", "2", "--shapes", "minimax:0"],
                       "--shapes: 'minimax:0'"),
                      (["--cpu-smoke", "--emulate-cp", "2", "--balance", "spiral"],
                       "--balance: 'spiral'")):
        p = subprocess.run([sys.executable, SCRIPT] + args, env=subprocess_env(),
                           capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and msg in p.stdout + p.stderr, (args, p.stderr[-2000:])
