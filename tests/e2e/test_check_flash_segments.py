"""scripts/check_flash_segments.py (the GPU check of DocAttention's flash implementation) runs
end to end on CPU (--cpu-smoke: tiny sizes, the FlashAttention-2 varlen calls replaced by
tests/flash_standin.py, eager FlexAttention), so the GPU run has no plumbing bugs left: every
check reports PASS and every step is timed."""

import subprocess
import sys

from tests.conftest import REPO, subprocess_env


def test_check_flash_segments_cpu_smoke():
    cmd = [sys.executable, str(REPO / "scripts" / "check_flash_segments.py"), "--cpu-smoke",
           "--warmup", "0", "--iters", "1"]
    p = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert not [x for x in lines if x.startswith("FAIL")], p.stdout
    for step in ("diag", "offdiag", "rows1"):
        # (eager FlexAttention has no CPU backward: flash vs flex gradients are GPU-only)
        for what in ("forward o vs reference", "forward lse vs flex", "backward dk (merged",
                     "backward dv (merged", "uncovered rows", "zero gradients outside"):
            assert any(x.startswith(f"PASS H=4 G=2 {step}: flash {what}") for x in lines), \
                (step, what, p.stdout)
        assert any(x.startswith(f"time H=4 G=2 {step} ") for x in lines), p.stdout
    assert lines[-1].startswith("PASS: 27/27 checks passed"), lines[-1]
