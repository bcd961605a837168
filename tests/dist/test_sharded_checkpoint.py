"""Sharded checkpoints: a TP=2 × DP=2 (ZeRO-1) run writes each rank's share only, as chunks of
the full logical tensors, and the checkpoint resumes under DP=4 (ZeRO-1) and under one process
with the uninterrupted run's next-step loss (1e-6 relative).

Who wrote what is read from the checkpoint's own DCP metadata (every chunk's global offset and
size, and the ``__<rank>_*.distcp`` file it went to), so the test sees the bytes per rank and per
logical tensor without trusting the writer.
"""

import math
import re
import shutil

import torch

from mmtrain.train import checkpoint as ckpt
from mmtrain.recipe import load_config
from mmtrain.train.loop import train
from tests.conftest import metrics_records
from tests.dist.test_parallel_parity import BASE, _torchrun

TP2DP2 = ["parallel.tp=2", "parallel.dp=2", "parallel.zero1=true"]
# a wider model than the parity tests' so that the tensors dwarf DCP's per-item framing
OVR = BASE + ["model.hidden_size=64", "model.ffn_hidden_size=64", "train.ckpt_every=2",
              "train.keep_last=3"]
RTOL = 1e-6


def _written(path):
    """{(key, rank): logical bytes of the chunks that rank wrote}, {key: logical bytes}."""
    md = ckpt.SafeReader(str(path)).read_metadata()
    sizes = {}
    for key, t in md.state_dict_metadata.items():
        item = torch.empty((), dtype=t.properties.dtype).element_size()
        sizes[key] = (math.prod(t.size) * item, {tuple(c.offsets): math.prod(c.sizes) * item
                                                for c in t.chunks})
    by = {}
    for idx, info in md.storage_data.items():
        rank = int(re.match(r"__(\d+)_", str(info.relative_path)).group(1))
        by[(idx.fqn, rank)] = by.get((idx.fqn, rank), 0) + sizes[idx.fqn][1][tuple(idx.offset)]
    return by, {k: v[0] for k, v in sizes.items()}


def test_tp2_dp2_zero1_saves_shards_and_resumes_under_dp4_and_one_process(tmp_path):
    run = tmp_path / "tp2dp2"
    _torchrun(4, OVR, TP2DP2 + ["train.max_steps=3"], run)
    want = [r["loss"] for r in metrics_records(run)]
    src = ckpt.checkpoint_root(run) / "step_00000002"

    by, logical = _written(src)
    tensors = {k: n for k, n in logical.items() if not k.endswith(".step")}
    total = sum(tensors.values())
    n_params = sum(n for k, n in tensors.items() if k.startswith("model."))
    assert total == 3 * n_params  # model + exp_avg + exp_avg_sq, fp32, full logical shapes
    written = {r: sum(n for (k, rr), n in by.items() if rr == r and not k.endswith(".step"))
               for r in range(4)}
    assert sum(written.values()) == total  # the ranks' chunks partition every tensor
    for r, n in written.items():
        assert n <= 0.3 * total, (r, n, total)  # about a quarter each; nobody writes it all
    # a TP-split tensor is written by both TP halves' owners, never whole by one rank (ZeRO
    # ownership follows the buckets, so a replicated tensor may fall in one rank's range)
    split = [k for k in tensors if re.search(r"(embed|lm_head|qkv_proj|o_proj|q_proj)\.weight", k)]
    assert len(split) >= 6
    for key in split:
        most = max(by.get((key, r), 0) for r in range(4))
        assert most <= 0.5 * tensors[key], (key, most, tensors[key])
    files = {int(re.match(r"__(\d+)_", f.name).group(1)): f.stat().st_size
             for f in src.glob("__*.distcp")}
    assert sorted(files) == [0, 1, 2, 3]
    for r, size in files.items():  # bytes on disk = the rank's chunks + framing
        assert written[r] <= size <= 1.25 * written[r] + 65536, (r, size, written[r])

    # resume step 3 from the step-2 checkpoint: DP=4 (ZeRO-1 over 4) and one process
    for name, nproc, args in [("dp4", 4, ["parallel.dp=4", "parallel.zero1=true"]),
                              ("one", 1, [])]:
        dst = tmp_path / name
        shutil.copytree(run, dst)
        shutil.rmtree(ckpt.checkpoint_root(dst) / "step_00000003")
        (dst / "metrics.jsonl").write_text("".join(open(run / "metrics.jsonl")
                                                   .readlines()[:2]))
        if nproc == 1:
            train(load_config(OVR + ["train.max_steps=3", f"run.dir={dst}"]))
        else:
            _torchrun(nproc, OVR, args + ["train.max_steps=3"], dst)
        got = [r["loss"] for r in metrics_records(dst)]
        assert len(got) == 3 and got[:2] == want[:2]
        assert abs(got[2] - want[2]) <= RTOL * abs(want[2]), (name, got, want)
