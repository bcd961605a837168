"""Token schedules (batch-size warm-up, LR by tokens) and the stage recipes against SPEC §7."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mmtrain.config import ConfigError, TrainConfig
from mmtrain.recipe import load_config
from mmtrain.train import optim
from mmtrain.train.schedules import MI, BatchSchedule, lr_at, resolve_max_steps
from tests.conftest import REPO, subprocess_env

PAPER_BATCH = [[0, 16 * MI], [69_000_000_000, 32 * MI], [790_000_000_000, 64 * MI],
               [4_700_000_000_000, 128 * MI]]


def test_paper_batch_warmup_in_tokens():
    s = BatchSchedule.from_config(TrainConfig(batch_schedule=PAPER_BATCH), 8192)
    assert s.rows(0) == 2048  # 16M tokens of 8K
    for at, batch in PAPER_BATCH:
        # the first step that starts at or past `at` tokens has the new batch, the one before not
        k = next(i for i in range(10 ** 7) if s.tokens_before(i) >= at) if at else 0
        assert s.rows(k) * 8192 == batch
        if k:
            assert s.tokens_before(k - 1) < at and s.rows(k - 1) * 8192 < batch
    # steps_for is the inverse of tokens_before
    for tokens in (1, 69_000_000_000, 10 ** 12, 5 * 10 ** 12):
        n = s.steps_for(tokens)
        assert s.tokens_before(n) >= tokens > s.tokens_before(n - 1)


def test_step_schedules_unchanged():
    """Without a token budget the schedules are the step forms of mmtrain.train.optim."""
    for sched in ("constant", "cosine", "exp_decay"):
        cfg = TrainConfig(schedule=sched, max_steps=50, warmup_steps=5, decay_start=20,
                          lr=1e-3, min_lr=1e-4)
        for step in range(50):
            assert lr_at(step, cfg) == pytest.approx(optim.lr_at(step, cfg), rel=1e-12)


@pytest.mark.parametrize("sched", ["exp_decay", "wsd"])
def test_lr_by_tokens_warmup_constant_decay(sched):
    cfg = TrainConfig(schedule=sched, lr=2e-4, min_lr=3e-5, warmup_steps=4, max_tokens=64 * 100,
                      decay_start_tokens=64 * 60, batch_schedule=[[0, 64], [64 * 30, 128]])
    cfg.max_steps = resolve_max_steps(cfg, 16)
    bs = BatchSchedule.from_config(cfg, 16)
    lrs = [lr_at(s, cfg, bs) for s in range(cfg.max_steps)]
    assert lrs[:4] == pytest.approx([2e-4 * (i + 1) / 4 for i in range(4)])
    decay_from = next(s for s in range(cfg.max_steps) if bs.tokens_before(s) > 64 * 60)
    assert all(x == pytest.approx(2e-4) for x in lrs[4:decay_from])
    tail = lrs[decay_from - 1:]
    assert all(b < a for a, b in zip(tail, tail[1:]))
    assert lrs[-1] == pytest.approx(3e-5)
    if sched == "wsd":  # linear in tokens
        t = [bs.tokens_before(s) for s in range(decay_from, cfg.max_steps)]
        slope = [(lrs[s + 1] - lrs[s]) / (t[i + 1] - t[i])
                 for i, s in enumerate(range(decay_from, cfg.max_steps - 1))]
        assert max(slope) == pytest.approx(min(slope), rel=1e-9)


def test_batch_schedule_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^train\.batch_schedule: entry 1"):
        TrainConfig(batch_schedule=[[0, 64], [0, 128]]).validate()
    with pytest.raises(ConfigError, match=r"^train\.batch_schedule: batch of 100 tokens"):
        BatchSchedule.from_config(TrainConfig(batch_schedule=[[0, 100]]), 16)


# ------------------------------------------------------------------------------------- stages
# SPEC §7 (paper §4.2): length, RoPE base, tokens, short/medium/long — and the main run.
SPEC7 = {
    "main": (8 * 1024, 10_000, None, None),
    "ctx128k": (128 * 1024, 5_000_000, 300e9, [0.30, 0.70, 0.0]),
    "ctx512k": (512 * 1024, 10_000_000, 32e9, [0.35, 0.35, 0.30]),
    "ctx1m": (1024 * 1024, 10_000_000, 26e9, [0.30, 0.30, 0.40]),
}
ORDER = ["main", "ctx128k", "ctx512k", "ctx1m"]


@pytest.mark.parametrize("stage", ORDER)
def test_stage_recipes_match_spec7(stage):
    seq, theta, tokens, mix = SPEC7[stage]
    cfg = load_config(["model=minimax_text_01", f"stage={stage}"])
    assert cfg.stage.name == stage
    assert cfg.data.seq_len == seq and cfg.model.rope_theta == theta
    assert cfg.model.num_layers == 80  # the stage leaves the model alone
    if tokens is None:  # main: the optimiser and the batch-size warm-up of §7
        t = cfg.train
        assert (t.lr, t.min_lr, t.warmup_steps, t.schedule) == (2e-4, 3e-5, 500, "constant")
        assert (t.beta1, t.beta2, t.weight_decay) == (0.9, 0.95, 0.1)
        assert t.batch_schedule == PAPER_BATCH and cfg.data.mixture is None
        return
    assert cfg.train.max_tokens == tokens and cfg.data.mixture == mix
    assert cfg.data.length_bounds == [32 * 1024, 128 * 1024]
    assert (cfg.data.qa_fraction, cfg.data.qa_window) == (0.1, 0.2)
    prev = ORDER[ORDER.index(stage) - 1]
    assert cfg.stage.previous == prev
    assert cfg.data.mixture_from == SPEC7[prev][3]  # interpolated across the transition
    assert cfg.data.transition > 0


def test_info_json_prints_the_stage():
    out = subprocess.run([sys.executable, "-m", "mmtrain", "info", "model=minimax_text_01",
                          "stage=ctx1m", "--json"], capture_output=True, text=True,
                         env=subprocess_env(PYTHONPATH=str(REPO)), timeout=300)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)["stage"]
    assert (st["seq_len"], st["rope_theta"], st["token_budget"]) == (1 << 20, 1e7, 26e9)
    assert st["mixture"] == [0.3, 0.3, 0.4] and st["eval_seq_len"] == 4 * (1 << 20)
    batch = st["global_batch_rows"] * (1 << 20)
    assert st["global_batch_tokens"] == batch
    assert st["steps"] == -(-26_000_000_000 // batch)  # ceil: the budget at the stage's batch


def test_launch_chains_the_stages_with_afterok(tmp_path, capsys):
    from mmtrain.curriculum import main

    assert main(["minimax", str(tmp_path), "--dry-run", "--nodes", "4",
                 "main:train.max_tokens=7000000000000", "data.seed=7"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    for i, (stage, line) in enumerate(zip(ORDER, lines)):
        assert line.startswith("sbatch --parsable -N 4 ") and "launch/slurm.sbatch" in line
        assert f"stage={stage} run.dir={tmp_path / stage}" in line and "data.seed=7" in line
        assert ("train.max_tokens=7000000000000" in line) == (stage == "main")
        if i:
            assert f"--dependency=afterok:<job of {ORDER[i - 1]}>" in line
            assert f"train.init_from={tmp_path / ORDER[i - 1]}" in line
        else:
            assert "--dependency" not in line and "init_from" not in line
    with pytest.raises(ConfigError, match="^nope:train.seed=1: 'nope' is not a stage"):
        main(["minimax", str(tmp_path), "--dry-run", "nope:train.seed=1"])
