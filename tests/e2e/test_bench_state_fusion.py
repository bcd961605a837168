"""scripts/bench_state_fusion.py on CPU (tiny sizes): the state pass it times is checked against
the op's own final states, its room is the sum it names, and it refuses what it cannot run."""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, subprocess_env

SCRIPT = str(REPO / "scripts" / "bench_state_fusion.py")


def test_bench_state_fusion_cpu_smoke(tmp_path):
    out = tmp_path / "f.json"
    p = subprocess.run([sys.executable, SCRIPT, "--cpu-smoke", "--warmup", "0", "--iters", "1",
                        "--out", str(out)], env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["shape"], row["H"], row["tokens"], row["items"]) == ("smoke", 2, 256, 4)
    assert row["state_max_rel_err"] < 1e-5
    assert row["cublas_ms"] > 0 and row["silu_ms"] > 0 and row["state_ms"] > 0
    # no inductor GEMM on CPU: reported as not measured, not as a number
    assert row["triton_ms"] is None and row["triton_silu_ms"] is None and row["room_ms"] is None
    assert "qkv projection vs the state pass" in p.stdout and "n/a" in p.stdout


def test_check_states_sees_a_wrong_state(monkeypatch):
    """The check compares each item's state with the op's final state: a state decayed with the
    wrong slope, or one item's state swapped for its neighbour's, fails it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import bench_state_fusion as bsf
    from mmtrain.kernels.lightning import triton_scan as ts
    from mmtrain.kernels.lightning.autograd import _slog2

    T, H, K = 128, 2, 16
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(T, H, K, generator=g), torch.randn(T, H, K, generator=g)
    slopes = torch.tensor([0.05, 0.3])
    bounds = [(0, 64), (64, 128)]
    plan = ts.get_plan(bounds, None, torch.device("cpu"), two_pass=True)
    s = ts.local_states(k, v, _slog2(slopes, k.device), plan)
    assert bsf.check_states(s, k, v, slopes, bounds) < 1e-5
    wrong = ts.local_states(k, v, _slog2(slopes * 1.5, k.device), plan)
    assert bsf.check_states(wrong, k, v, slopes, bounds) > 1e-3
    assert bsf.check_states(s.flip(0), k, v, slopes, bounds) > 1e-3


@pytest.mark.parametrize("args,msg", [
    (["--cpu-smoke", "--tokens", "258"], "does not divide into 4 pieces"),
    (["--cpu-smoke", "--shapes", "minimax,huge"], "--shapes: unknown ['huge']"),
])
def test_bench_state_fusion_refusals(args, msg):
    p = subprocess.run([sys.executable, SCRIPT] + args, env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and msg in p.stdout + p.stderr, p.stderr[-2000:]
