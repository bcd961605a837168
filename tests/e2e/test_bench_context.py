"""scripts/bench_context.py runs end to end (two gloo processes, --cpu-smoke tiny sizes), so the
GPU run has no plumbing bugs left: its device checks pass and every section reports."""

import json
import subprocess
import sys

from tests.conftest import REPO, free_port, subprocess_env


def test_bench_context_cpu_smoke_two_processes(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), str(REPO / "scripts" / "bench_context.py"),
           "--cpu-smoke", "--warmup", "1", "--iters", "1", "--out", str(out)]
    p = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2
    names = [c["check"] for c in res["checks"]]
    assert any("laspplus" in n for n in names) and any("ring" in n for n in names)
    assert all(c["max_rel_err"] < 1e-5 for c in res["checks"]), res["checks"]
    assert res["softmax_op"] and res["lightning"] and res["ring"]
    row = res["lightning"][0]
    for key in ("cp1_ms", "laspplus_ms", "lasp_ms", "laspplus_comm_share", "lasp_comm_share"):
        assert row[key] > 0, key
    ring = res["ring"][0]
    assert len(ring["cp_ms_per_rank"]) == 2 and ring["ideal_fraction"] > 0
    assert sum(ring["pairs_per_rank"]) > 0
    assert "varlen ring attention" in p.stdout  # the table is printed
