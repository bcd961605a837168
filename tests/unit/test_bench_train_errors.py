"""scripts/bench_train.py names a failed layout's cause: the excerpt it prints ends at the error
line of the worker's traceback, not in torchrun's summary after it (which names no cause)."""

import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import bench_train  # noqa: E402

TORCHRUN_STDERR = "\n".join(
    ["[rank0]: Traceback (most recent call last):"]
    + [f"[rank0]:   File \"frame{i}.py\", line {i}, in f{i}" for i in range(40)]
    + ["[rank0]:     init.index_copy_(0, first_idx, combine_states(plan, gathered, s))",
       "[rank0]: RuntimeError: index_copy_(): self and source expected to have the same dtype",
       "[rank0]:[W1201 ProcessGroupNCCL.cpp:1575] Warning: destroy_process_group() was not called",
       "E1201 torch/distributed/elastic/multiprocessing/api.py:882] failed (exitcode: 1)",
       "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
       "============================================================",
       "Root Cause (first observed failure):",
       "  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"])


def test_error_excerpt_ends_at_the_workers_error():
    for stderr in (TORCHRUN_STDERR, TORCHRUN_STDERR.replace(
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ", "")):
        lines = bench_train.error_excerpt(stderr).splitlines()
        assert lines[-1].endswith("RuntimeError: index_copy_(): self and source expected to "
                                  "have the same dtype")
        assert "combine_states(plan, gathered, s)" in lines[-2]
        assert len(lines) == 13 and not any("Root Cause" in ln for ln in lines)


def test_error_excerpt_without_ranks_and_without_an_error():
    one = "Traceback (most recent call last):\n  File \"x.py\"\nValueError: bad"
    assert bench_train.error_excerpt(one).splitlines()[-1] == "ValueError: bad"
    plain = "\n".join(f"line {i}" for i in range(100))
    assert bench_train.error_excerpt(plain).splitlines() == [f"line {i}" for i in range(75, 100)]
