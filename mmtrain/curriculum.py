"""Curriculum stages: what a stage resolves to, and ``mmtrain launch`` (a chain of stages).

    mmtrain launch CURRICULUM RUN_ROOT [--local] [--dry-run] [--nodes N] [--sbatch ARG]...
                   [--from STAGE] [overrides...]

CURRICULUM names ``recipes/curriculum/<name>.yaml`` (``model`` and the ordered ``stages``).
Stage i runs in ``RUN_ROOT/<stage>`` with ``stage=<stage> model=<model>`` and, from the second
stage on, ``train.init_from=RUN_ROOT/<previous stage>`` (the previous stage's final checkpoint:
model weights; the optimizer state starts fresh and each stage's LR warm-up rebuilds it).
Without ``--local`` every stage is submitted with ``sbatch launch/slurm.sbatch``, each depending
on the previous one (``--dependency=afterok:<job>``); the template asks for SIGTERM ahead of the
time limit and requeues, so a stage that is preempted or runs out of time checkpoints and
continues in its run dir. ``--local`` runs the stages one after the other in this process's
machine (``python -m mmtrain.train``), e.g. the scaled-down ``tiny`` curriculum on CPU.
An override ``STAGE:key=value`` applies to that stage only (``main:train.max_tokens=...``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from mmtrain.config import Config, ConfigError


def stage_summary(cfg: Config) -> dict:
    """The values a stage resolves to (``mmtrain info --json`` prints them under "stage")."""
    from mmtrain.data.mixture import mixture_at
    from mmtrain.train.schedules import BatchSchedule, resolve_max_steps

    d, t = cfg.data, cfg.train
    sched = BatchSchedule.from_config(t, d.seq_len)
    steps = resolve_max_steps(t, d.seq_len)
    return {
        "name": cfg.stage.name, "previous": cfg.stage.previous, "note": cfg.stage.note,
        "seq_len": d.seq_len, "rope_theta": cfg.model.rope_theta,
        "token_budget": t.max_tokens or None,
        "global_batch_rows": sched.rows(0), "global_batch_tokens": sched.rows(0) * d.seq_len,
        "batch_schedule": t.batch_schedule,
        "steps": steps,
        "tokens_at_steps": sched.tokens_before(steps),
        "mixture": d.mixture, "mixture_from": d.mixture_from, "transition": d.transition,
        "mixture_at_start": mixture_at(d, 0.0), "length_bounds": list(d.length_bounds),
        "qa_fraction": d.qa_fraction, "qa_window": d.qa_window, "qa_blend": d.qa_blend,
        "lr": t.lr, "min_lr": t.min_lr, "schedule": t.schedule, "warmup_steps": t.warmup_steps,
        "eval_seq_len": cfg.stage.eval_seq_len,
    }


def load_curriculum(name: str) -> dict:
    from omegaconf import OmegaConf

    from mmtrain.recipe import recipes_dir

    folder = recipes_dir() / "curriculum"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"curriculum: no recipe '{name}'; available: {', '.join(names)} "
                          f"(files in recipes/curriculum/)")
    cur = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not cur.get("stages"):
        raise ConfigError(f"curriculum: {path} lists no stages; give stages: [a, b, ...]")
    return cur


def stage_overrides(cur: dict, root: str, i: int, extra: list[str]) -> list[str]:
    """The overrides of stage i: model, stage, run dir, init_from, then ``extra`` — all of them
    except the ``STAGE:key=value`` ones, which apply to that stage only."""
    stages = cur["stages"]
    ov = [f"model={cur['model']}"] if cur.get("model") else []
    ov += [f"stage={stages[i]}", f"run.dir={os.path.join(root, stages[i])}"]
    if i > 0:
        ov.append(f"train.init_from={os.path.join(root, stages[i - 1])}")
    for x in extra:
        key = x.split("=", 1)[0]
        if ":" in key:
            name, rest = x.split(":", 1)
            if name not in stages:
                raise ConfigError(f"{x}: '{name}' is not a stage of this curriculum ({stages}); "
                                  f"write STAGE:key=value with one of them")
            if name == stages[i]:
                ov.append(rest)
        else:
            ov.append(x)
    return ov


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def main(args: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mmtrain launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("curriculum")
    ap.add_argument("run_root")
    ap.add_argument("--local", action="store_true", help="run the stages here, one by one")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--nodes", type=int, default=1, help="sbatch -N (Slurm)")
    ap.add_argument("--sbatch", action="append", default=[], help="extra sbatch argument")
    ap.add_argument("--from", dest="start", default=None, help="first stage to run")
    ns, overrides = ap.parse_known_args(args)
    cur = load_curriculum(ns.curriculum)
    stages = cur["stages"]
    first = 0
    if ns.start is not None:
        if ns.start not in stages:
            raise ConfigError(f"--from: '{ns.start}' is not a stage of {ns.curriculum} ({stages})")
        first = stages.index(ns.start)
    from mmtrain.recipe import load_config

    for i in range(first, len(stages)):  # every stage's recipe must resolve before anything runs
        load_config(stage_overrides(cur, ns.run_root, i, overrides))
    root = os.path.abspath(ns.run_root)
    prev_job = None
    for i in range(first, len(stages)):
        ov = stage_overrides(cur, root, i, overrides)
        run_dir = os.path.join(root, stages[i])
        if ns.local:
            cmd = [sys.executable, "-m", "mmtrain.train", *ov]
            print(f"stage {stages[i]}: {' '.join(cmd[1:])}", flush=True)
            if ns.dry_run:
                continue
            rc = subprocess.call(cmd)
            if rc != 0:
                print(f"error: stage {stages[i]} failed (exit status {rc}); fix it and resume "
                      f"with --from {stages[i]}", file=sys.stderr)
                return rc
            continue
        os.makedirs(run_dir, exist_ok=True)
        cmd = ["sbatch", "--parsable", "-N", str(ns.nodes), f"--job-name=mmtrain-{stages[i]}",
               f"--output={run_dir}/slurm-%j.out", *ns.sbatch]
        if prev_job is not None:
            cmd.append(f"--dependency=afterok:{prev_job}")
        cmd += [str(repo_root() / "launch" / "slurm.sbatch"), *ov]
        if ns.dry_run:
            print(" ".join(cmd))
            prev_job = f"<job of {stages[i]}>"
            continue
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"error: sbatch for stage {stages[i]} failed: {out.stderr.strip()}",
                  file=sys.stderr)
            return 1
        prev_job = out.stdout.strip().split(";")[0]
        print(f"stage {stages[i]}: job {prev_job}" + (f" (after {stages[i - 1]})" if i > first
                                                       else ""), flush=True)
    return 0


__all__ = ["stage_summary", "load_curriculum", "stage_overrides", "main"]
