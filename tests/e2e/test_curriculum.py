"""The scaled-down curriculum (recipes/curriculum/tiny.yaml: the tiny model at 512 -> 1K -> 2K
tokens on the embedded corpus) end to end: locally, and as a Slurm dependency chain in which one
stage is signalled ahead of its time limit, checkpoints, requeues and finishes with the losses of
the uninterrupted run; plus a token-scheduled blend run resumed mid-schedule."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from mmtrain.recipe import load_config
from tests.conftest import REPO, free_port, subprocess_env

STAGES = ["tiny_512", "tiny_1k", "tiny_2k"]
# 8 steps of 2048 tokens per stage (the recipe's own budget is 25), decay over the last 2 steps
SHORT = ["train.max_tokens=16384", "train.decay_start_tokens=12288", "run.progress=false",
         "train.ckpt_every=2"]


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in
            (json.loads(l) for l in open(run_dir / "metrics.jsonl") if l.strip())]


@pytest.fixture(scope="module")
def local_chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("curriculum") / "local"
    out = subprocess.run([sys.executable, "-m", "mmtrain", "launch", "tiny", str(root), "--local",
                          *SHORT], capture_output=True, text=True, timeout=900,
                         env=subprocess_env(PYTHONPATH=str(REPO)))
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    return root, out.stdout


def _eval_loss(stage_cfg_overrides, weights_from):
    """Mean LM loss of the stage's first global batch under the stage's recipe, with the weights
    of ``weights_from`` (a run dir) or the seeded initialisation (None)."""
    from mmtrain.data import build_tokenizer
    from mmtrain.data.build import build_loader
    from mmtrain.hf import load_weights
    from mmtrain.model import MiniMaxModel
    from mmtrain.train.schedules import resolve_max_steps

    cfg = load_config(stage_cfg_overrides)
    cfg.train.max_steps = resolve_max_steps(cfg.train, cfg.data.seq_len)
    cfg.train.micro_batch = cfg.train.global_batch
    model = MiniMaxModel(cfg.model)
    model.reset_parameters(seed=cfg.train.seed)
    if weights_from is not None:
        load_weights(str(weights_from), model)
    model.eval()
    batch = build_loader(cfg, build_tokenizer(cfg.data), 0, 1).next_step()[0]
    with torch.no_grad():
        logits = model(batch.tokens, batch.cu_seqlens, batch.position_ids).logits.float()
    ce = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]),
                                           batch.labels.view(-1), reduction="none")
    return float((ce * batch.loss_mask.view(-1)).sum() / batch.loss_mask.sum())


def test_tiny_curriculum_three_stages_each_from_the_last(local_chain):
    root, log = local_chain
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, stage in enumerate(STAGES):
            run = root / stage
            assert [s for s, _ in _losses(run)] == list(range(1, 9)), stage
            cfg = json.loads(json.dumps(load_config([f"stage={stage}"]).to_dict()))
            saved = (run / "config.yaml").read_text()
            assert f"seq_len: {cfg['data']['seq_len']}" in saved
            prev = root / STAGES[i - 1] if i else None
            if prev is not None:  # initialised from the previous stage's final checkpoint
                assert f"train.init_from: loaded model weights from {prev}/checkpoints/step_" in log
            ov = [f"stage={stage}"]
            before = _eval_loss(ov, prev)
            after = _eval_loss(ov, run)
            assert after < before - 0.02, (stage, before, after)
            if prev is not None:  # starting from the last stage beats starting from scratch
                assert before < _eval_loss(ov, None) - 1.0
    finally:
        torch.set_num_threads(threads)


def _batch_shell_pid(env, job: str) -> int:
    """The pid of the job's batch script (``scontrol listpids``: step "batch", local id 0)."""
    out = subprocess.run(["scontrol", "listpids", job], env=env, capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines()[1:]:
        f = line.split()
        if len(f) >= 4 and f[2] == "batch" and f[3] == "0":
            return int(f[0])
    raise AssertionError(f"no batch script among the pids of job {job}: {out}")


def test_slurm_chain_requeues_a_signalled_stage_and_matches_the_local_run(local_chain, tmp_path):
    from tests.slurm_cluster import job_state, slurm_cluster, wait_for

    local_root, _ = local_chain
    template = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:TERM@" in template and "#SBATCH --requeue" in template
    with slurm_cluster() as (env, _):
        job_env = subprocess_env(SLURM_CONF=env["SLURM_CONF"], MMTRAIN_PYTHON=sys.executable,
                                 MMTRAIN_HEAD_ADDR="127.0.0.1", MASTER_PORT=free_port(), NPROC=1,
                                 PYTHONPATH=str(REPO))
        root = tmp_path / "slurm"
        sub = subprocess.run([sys.executable, "-m", "mmtrain", "launch", "tiny", str(root),
                              f"--sbatch=--chdir={REPO}", *SHORT], env=job_env,
                             capture_output=True, text=True, timeout=300)
        assert sub.returncode == 0, sub.stderr
        jobs = [l.split()[3] for l in sub.stdout.splitlines() if l.startswith("stage ")]
        assert len(jobs) == 3, sub.stdout
        # the chain: stage 2 and 3 wait on their predecessor (afterok)
        deps = subprocess.run(["squeue", "-h", "-o", "%i %E", "-j", ",".join(jobs)], env=env,
                              capture_output=True, text=True).stdout
        assert f"afterok:{jobs[0]}" in deps and f"afterok:{jobs[1]}" in deps, deps
        # stage 2 gets Slurm's early SIGTERM (what --signal=B:TERM@300 sends) once it is training
        metrics = root / STAGES[1] / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 400,
                 "stage 2 training")
        os.kill(_batch_shell_pid(env, jobs[1]), signal.SIGTERM)  # B: the batch shell only
        # the requeued job waits out the credential lifetime (10 s in the test cluster) and runs
        wait_for(lambda: all(job_state(env, j) == "" for j in jobs), 600, "the chain")
        log2 = "".join(p.read_text() for p in (root / STAGES[1]).glob("slurm-*.out"))
        assert "requeueing job" in log2 and "(restart 1)" in log2, log2[-3000:]
        assert "preempted at step" in log2, log2[-3000:]
        for stage in STAGES:
            got, want = _losses(root / stage), _losses(local_root / stage)
            assert [s for s, _ in got] == [s for s, _ in want], (stage, got)
            for (_, x), (_, y) in zip(got, want):
                assert abs(x - y) <= 1e-5 * abs(y), (stage, got, want)


def test_token_schedules_and_blend_resume_exactly_mid_schedule(tmp_path):
    """A run with a two-prefix blend, a length mixture, a batch-size warm-up and an exponential
    LR decay by tokens, killed (a fresh process resumes from the checkpoint) in the middle of
    both schedules, logs the losses and learning rates of the uninterrupted run."""
    from mmtrain.data.preprocess import preprocess
    from mmtrain.train import checkpoint as ckpt
    from mmtrain.train.loop import train
    from tests.e2e.test_train_resume import SMALL

    for name, cap in (("a", 30_000), ("b", 60_000)):
        preprocess("stdlib", str(tmp_path / name), max_bytes=cap, progress=False)
    ov = SMALL + [f"data.blend=[0.3,{tmp_path / 'a'},0.7,{tmp_path / 'b'}]",
                  "data.length_bounds=[2000,6000]", "data.mixture=[0.2,0.5,0.3]",
                  "train.max_tokens=1536", "train.batch_schedule=[[0,128],[384,256]]",
                  "train.schedule=exp_decay", "train.decay_start_tokens=512",
                  "train.lr=3e-3", "train.min_lr=3e-4"]

    def metrics(run):
        return [(r["step"], r["loss"], r["lr"]) for r in
                (json.loads(l) for l in open(run / "metrics.jsonl"))]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = train(load_config(ov + [f"run.dir={tmp_path / 'full'}"]))
        n = full.final_step
        assert n == 8  # 3 steps of 4 rows, then 5 of 8: 1536 tokens
        # stop after step 4 (the batch and the LR already changed), then resume in a new process
        part = subprocess.run([sys.executable, "-m", "mmtrain.train", *ov, "train.ckpt_every=4",
                               f"run.dir={tmp_path / 'resumed'}"], capture_output=True, text=True,
                              env=subprocess_env(PYTHONPATH=str(REPO)), timeout=600)
        assert part.returncode == 0, part.stderr[-2000:]
        # emulate a kill after step 4's checkpoint: drop everything after it, then resume
        run = tmp_path / "resumed"
        for d in (run / "checkpoints").iterdir():
            if d.name != "step_00000004":
                shutil.rmtree(d)
        kept = [l for l in open(run / "metrics.jsonl") if json.loads(l)["step"] <= 4]
        (run / "metrics.jsonl").write_text("".join(kept))
        assert ckpt.read_meta(ckpt.latest(run))["step"] == 4
        resumed = train(load_config(ov + [f"run.dir={run}"]))
    finally:
        torch.set_num_threads(threads)
    assert [s for s, _ in resumed.losses] == [5, 6, 7, 8]
    want, got = metrics(tmp_path / "full"), metrics(run)
    assert [s for s, _, _ in got] == list(range(1, n + 1))
    lrs = [lr for _, _, lr in want]
    assert lrs[4] < lrs[3] and lrs[-1] == pytest.approx(3e-4)  # mid-decay at the resume point
    for (s, x, lx), (_, y, ly) in zip(got, want):
        assert lx == ly and abs(x - y) <= 1e-6 * abs(y), (s, got, want)
