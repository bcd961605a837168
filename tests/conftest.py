"""Shared test helpers. Tests run on CPU; distributed tests use gloo with short timeouts."""

import json
import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The corpus cache (data.corpus preprocessed to .bin/.idx on first use) is shared by the tests of
# one session, child processes included, and never touches ~/.cache.
if "MMTRAIN_CACHE" not in os.environ:
    import tempfile

    import atexit
    import shutil

    os.environ["MMTRAIN_CACHE"] = tempfile.mkdtemp(prefix="mmtrain-cache-")
    atexit.register(shutil.rmtree, os.environ["MMTRAIN_CACHE"], True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics_records(run_dir) -> list:
    """The per-step records of a run's ``metrics.jsonl``, in order."""
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def spawn_ranks(fn, world: int, *args) -> dict:
    """Run ``fn(rank, world, port, *args, out)`` in ``world`` spawned processes (gloo workers
    that write their results into ``out[rank]``); returns ``{rank: result}``."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(fn, args=(world, free_port(), *args, out), nprocs=world, join=True)
        return dict(out)


def subprocess_env(**extra) -> dict:
    """Environment for child processes: quiet, single-threaded, no GPU, repo importable."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def python() -> str:
    return sys.executable
