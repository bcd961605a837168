"""Kill trials: SIGKILL the trainer at random points, resume, and demand bitwise-identical losses.

    python scripts/kill_trials.py [--trials 24] [--seed 0] [--world 1,2] [--workdir DIR]
                                  [--json out.json]

Each trial trains a small recipe (6 steps, a checkpoint every step, keep_last=2) in a fresh run
directory and kills it once (SIGKILL, no chance to clean up), in one of two ways:

* at a chosen phase, by the trainer's test-only fault hook (``MMTRAIN_FAULT=kill@S:phase=P``, see
  ``mmtrain/train/faults.py``): ``step`` / ``forward`` (inside a training step), ``ckpt_start`` /
  ``ckpt_write`` (during the checkpoint's tensor write), ``data_state`` (half-way through a rank's
  loader/RNG JSON), ``commit`` (meta.json written, before the rename), ``rename`` (just after the
  rename, before the directory sync and pruning), ``prune`` (an old checkpoint renamed aside, not
  yet deleted); under 2-rank torchrun on a random rank (rank 0 for the phases only rank 0 has);
* from outside, at a random moment of training (once a random number of steps is logged, after
  a further random delay of up to 0.2 s): ``os.killpg`` of the whole job (every rank at once,
  like a lost node).

After the kill it checks that every checkpoint the trainer would consider complete has all the
files its meta.json lists, loads (model and optimizer tensors) and holds the loader position of its
step, and that no damaged ``step_*`` directory is left; then it runs the same command again (which
resumes from the newest checkpoint) and compares the run's losses in metrics.jsonl with an
uninterrupted run of the same world size: they must be equal bit for bit. Prints one line per
trial and a summary; exits 1 if any trial failed. ``tests/e2e/test_kill_trials.py`` runs a few
trials in CI; docs/reliability.md has the figures of a full run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RECIPE = ["model.hidden_size=32", "model.ffn_hidden_size=32", "model.num_layers=2",
          "model.softmax_every=2", "model.num_heads=2", "model.num_kv_heads=1",
          "data.seq_len=32", "data.corpus_max_bytes=60000", "train.global_batch=4",
          "train.micro_batch=2", "train.warmup_steps=2", "run.progress=false",
          "train.max_steps=6", "train.ckpt_every=1", "train.keep_last=2", "parallel.timeout_s=60"]
STEPS = 6
GLOBAL_BATCH = 4
PHASES = ("step", "forward", "ckpt_start", "ckpt_write", "data_state", "commit", "rename",
          "prune")
RANK0_ONLY = ("commit", "rename", "prune")


@dataclass
class Trial:
    world: int
    how: str  # a phase name, or "timer"
    step: int = 0  # the step of the phase fault
    rank: int = 0
    after: int = 1  # "timer": steps logged before the countdown starts
    delay: float = 0.0  # "timer": seconds after that
    killed: bool = False
    resumed_from: int = 0  # step of the checkpoint the resume started from (0: from scratch)
    checkpoints_ok: bool = False
    identical: bool = False
    error: str = ""
    notes: list = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(fault: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop("MMTRAIN_FAULT", None)
    env.update({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore",
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    if fault:
        env["MMTRAIN_FAULT"] = fault
    return env


def command(world: int, run_dir: Path) -> list[str]:
    train = ["-m", "mmtrain.train", *RECIPE, f"run.dir={run_dir}"]
    if world == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
            "--master-port", str(_free_port()), *train]


def losses(run_dir: Path) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


def reference(world: int, workdir: Path) -> list:
    run = workdir / f"reference_w{world}"
    out = subprocess.run(command(world, run), env=_env(), capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"the uninterrupted {world}-rank run failed:\n{out.stderr[-3000:]}")
    got = losses(run)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), got
    return got


def check_checkpoints(run_dir: Path) -> tuple[int, list[str]]:
    """(newest complete step, problems) for the checkpoints of ``run_dir`` after a kill."""
    import torch

    from mmtrain.config import ConfigError
    from mmtrain.recipe import load_config
    from mmtrain.train import checkpoint as ckpt
    from mmtrain.train.loop import build_model
    from mmtrain.train.optim import build_optimizer

    problems = []
    try:
        ckpt.check_resumable(run_dir)
    except ConfigError as exc:
        problems.append(str(exc))
    newest = 0
    for path in ckpt.complete_checkpoints(run_dir):
        step = ckpt.read_meta(path)["step"]
        lost = ckpt.missing_files(path)
        if lost:
            problems.append(f"{path.name} looks complete but lacks {lost}")
            continue
        cfg = load_config(RECIPE + [f"run.dir={run_dir}"])
        model = build_model(cfg, torch.device("cpu"))
        opt = build_optimizer(model, cfg.train)
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = ckpt.load(path, model, opt)
        except Exception as exc:  # noqa: BLE001 - any failure to load is a finding
            problems.append(f"{path.name} does not load: {type(exc).__name__}: {exc}"[:300])
            continue
        if state["loader"]["consumed_rows"] != step * GLOBAL_BATCH:
            problems.append(f"{path.name} holds loader position {state['loader']} for step {step}")
        if not opt.state:
            problems.append(f"{path.name} has no optimizer state")
        newest = max(newest, step)
    return newest, problems


def run_trial(trial: Trial, workdir: Path, ref: list, index: int = 0) -> Trial:
    run = workdir / f"trial_{index:03d}_w{trial.world}_{trial.how}"
    fault = None
    if trial.how != "timer":
        fault = f"kill@{trial.step}:phase={trial.how}" + (
            f":rank={trial.rank}" if trial.world > 1 else "")
    proc = subprocess.Popen(command(trial.world, run), env=_env(fault), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    if trial.how == "timer":
        deadline = time.time() + 300
        while len(losses(run)) < trial.after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(trial.delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        trial.error = "the killed run hung"
        return trial
    if trial.world == 1:
        trial.killed = proc.returncode == -signal.SIGKILL
    else:
        trial.killed = proc.returncode != 0 and (proc.returncode == -signal.SIGKILL
                                                 or "Signal 9" in err or "SIGKILL" in err)
    if not trial.killed:
        trial.notes.append(f"not killed (exit {proc.returncode}): the run finished first")
    done_before = losses(run)
    newest, problems = check_checkpoints(run)
    trial.checkpoints_ok = not problems
    if problems:
        trial.error = "; ".join(problems)
        return trial
    trial.resumed_from = newest
    res = subprocess.run(command(trial.world, run), env=_env(), capture_output=True, text=True,
                         timeout=600)
    if res.returncode != 0:
        trial.error = f"resume failed (exit {res.returncode}): {res.stderr.strip()[-500:]}"
        return trial
    if newest and f"at step {newest}" not in res.stdout:
        trial.notes.append("resume line missing")
    got = losses(run)
    trial.identical = got == ref
    if not trial.identical:
        trial.error = f"losses differ: {got} vs {ref} (before the kill: {done_before})"
    return trial


def draw(rng: random.Random, world: int) -> Trial:
    how = rng.choice(PHASES + ("timer", "timer"))
    if how == "timer":
        return Trial(world, how, after=rng.randint(1, STEPS - 1),
                     delay=round(rng.uniform(0.0, 0.2), 3))
    first = 3 if how == "prune" else 1  # keep_last=2: pruning starts at step 3
    step = rng.randint(first, STEPS)
    rank = 0 if (how in RANK0_ONLY or world == 1) else rng.randrange(world)
    return Trial(world, how, step=step, rank=rank)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world", default="1,2", help="comma-separated world sizes, alternated")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    worlds = [int(w) for w in args.world.split(",")]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mmtrain-kill-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    t0 = time.time()
    refs = {w: reference(w, workdir) for w in worlds}
    trials = []
    for i in range(args.trials):
        t = draw(rng, worlds[i % len(worlds)])
        ts = time.time()
        run_trial(t, workdir, refs[t.world], i)
        trials.append(t)
        where = (f"step {t.after} +{t.delay:.2f}s" if t.how == "timer"
                 else f"step {t.step} rank {t.rank}")
        print(f"trial {i + 1:2d}: {t.world} rank(s), kill {t.how:<10} {where:<16} killed="
              f"{t.killed!s:<5} resumed_from={t.resumed_from} checkpoints_ok="
              f"{t.checkpoints_ok!s:<5} identical={t.identical!s:<5} ({time.time() - ts:.0f} s)"
              + (f"  ERROR {t.error}" if t.error else "")
              + (f"  ({'; '.join(t.notes)})" if t.notes else ""), flush=True)
    summary = {
        "trials": len(trials),
        "killed": sum(t.killed for t in trials),
        "resumed_from_checkpoint": sum(t.resumed_from > 0 for t in trials),
        "checkpoints_ok": sum(t.checkpoints_ok for t in trials),
        "identical": sum(t.identical for t in trials),
        "by_world": {w: sum(t.world == w for t in trials) for w in worlds},
        "by_kill": {h: sum(t.how == h for t in trials) for h in PHASES + ("timer",)},
        "seconds": round(time.time() - t0, 1),
    }
    print("summary: " + json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "command": sys.argv,
                                               "trials": [asdict(t) for t in trials]}, indent=1))
    ok = all(t.identical and t.checkpoints_ok and not t.error for t in trials)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
