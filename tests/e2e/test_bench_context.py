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
    for part in ("zigzag", "zigzag2", "contiguous"):  # every partition, checked on the device
        assert any(f"laspplus {part} " in n for n in names), names
        assert any(f"ring attention {part} " in n for n in names), names
    assert any("lasp contiguous" in n for n in names), names
    assert all(c["max_rel_err"] < 1e-5 for c in res["checks"]), res["checks"]
    assert res["softmax_op"] and res["lightning"] and res["ring"]
    labels = dict(map(tuple, res["lightning_columns"]))  # the table's column heads
    assert labels["laspplus_zigzag2"] == "LASP+ zig2" and labels["lasp_contiguous"] == "LASP contig"
    row = res["lightning"][0]
    for key in ("cp1_ms", "laspplus_zigzag_ms", "laspplus_zigzag2_ms", "laspplus_contiguous_ms",
                "lasp_contiguous_ms",
                "laspplus_zigzag_comm_share", "lasp_contiguous_comm_share"):
        assert row[key] > 0, key
    # the softmax sections ran flash (its kernel calls on the CPU stand-in), CP=1 included
    assert res["softmax_impls"] == ["flash"] and "DocSoftmaxOp (flash) vs torch reference" in names
    assert all(r["doc_flash_ms"] > 0 for r in res["softmax_op"])
    assert all(r["softmax_impl"] == "flash" for r in res["ring"])
    assert "CP=1 (whole batch, one GPU, DocSoftmaxOp flash)" in p.stdout
    rings = {r["balance"]: r for r in res["ring"]}
    assert set(rings) == {"zigzag", "zigzag2", "contiguous"}
    for ring in rings.values():
        assert len(ring["cp_ms_per_rank"]) == 2 and ring["ideal_fraction"] > 0
    # the same attended pairs in total, spread more evenly by zigzag
    zig, cont = rings["zigzag"]["pairs_per_rank"], rings["contiguous"]["pairs_per_rank"]
    assert sum(zig) == sum(cont) == sum(rings["zigzag2"]["pairs_per_rank"]) > 0
    assert max(zig) / min(zig) < max(cont) / min(cont), (zig, cont)
    assert "varlen ring attention" in p.stdout and "zigzag partition" in p.stdout  # the table


def test_bench_context_emulated_cp_one_process(tmp_path):
    """``--emulate-cp 2`` with one process: each rank's LASP+ share is timed in turn (both ranks
    reported, the slowest kept), fused and unfused, and the table says it is an emulation; two
    processes are refused."""
    out = tmp_path / "emul.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_context.py"), "--cpu-smoke",
           "--emulate-cp", "2", "--balance", "zigzag2", "--skip", "softmax_op,ring",
           "--warmup", "1", "--iters", "1", "--out", str(out)]
    p = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["world"] == 1 and res["emulate_cp"] == 2
    assert dict(map(tuple, res["lightning_columns"])) == {
        "laspplus_zigzag2": "LASP+ zig2 emul", "laspplus-unfused_zigzag2": "LASP+ unfused zig2 emul"}
    row = res["lightning"][0]
    for key in ("laspplus_zigzag2", "laspplus-unfused_zigzag2"):
        ranks = row[f"{key}_ms_per_rank"]
        assert len(ranks) == 2 and min(ranks) > 0 and row[f"{key}_ms"] == max(ranks)
        assert row[f"{key}_vs_cp1"] == row["cp1_ms"] / row[f"{key}_ms"]
    assert "CP=2 emulated on one GPU" in p.stdout
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), str(REPO / "scripts" / "bench_context.py"),
           "--cpu-smoke", "--emulate-cp", "2", "--skip", "softmax_op,ring"]
    p = subprocess.run(two, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "--emulate-cp runs one process's share" in p.stdout + p.stderr
