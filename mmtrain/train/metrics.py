"""Metrics: ``<run dir>/metrics.jsonl`` (one JSON object per logged step), a rich progress bar on
rank 0, and wandb when enabled (offline by default; it never needs a network or an account)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices (CPUs) report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def _fmt(x, spec: str) -> str:
    return "nan" if x is None else format(x, spec)  # non-finite values are logged as null


class MetricsLogger:
    def __init__(self, run_dir: str, cfg_dict: dict, total_steps: int, start_step: int,
                 enabled: bool, progress: bool, wandb_cfg=None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total = total_steps
        self._file = None
        self._progress = None
        self._task = None
        self._wandb = None
        self._tty = sys.stdout.isatty()
        self._t0 = time.time()
        self._start_step = start_step
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_step == 0 and self.path.exists():
            self.path.unlink()  # a fresh run in an old directory starts a fresh log
        elif start_step > 0 and self.path.exists():
            self._truncate_after(start_step)
        self._file = open(self.path, "a")
        if progress and self._tty:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)

            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self._progress.start()
            self._task = self._progress.add_task("train", total=total_steps,
                                                 completed=start_step, info="")
        if wandb_cfg is not None and wandb_cfg.enabled:
            os.environ.setdefault("WANDB_MODE", wandb_cfg.mode)
            try:
                import wandb  # optional dependency

                self._wandb = wandb.init(project=wandb_cfg.project, dir=str(run_dir),
                                         config=cfg_dict, mode=wandb_cfg.mode)
            except Exception as exc:  # never let logging kill a training run
                print(f"warning: wandb disabled ({exc})", file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records of steps after the checkpoint (they will be redone)."""
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except json.JSONDecodeError:
                    pass  # a line cut by a crash
        with open(self.path, "w") as f:
            f.writelines(keep)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        info = (f"loss {_fmt(record['loss'], '.4f')}  aux {_fmt(record['aux_loss'], '.3f')}  "
                + (f"drop {record['drop_rate'] * 100:.1f}%  " if record.get("drop_rate") else "")
                + (f"imb {record['expert_imbalance']:.2f}  "
                   if record.get("expert_imbalance") is not None else "")
                + f"{record['tokens_per_s']:.0f} tok/s"
                + (f"  MFU {record['mfu'] * 100:.1f}%" if record.get("mfu") is not None else ""))
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], info=info)
        elif record["step"] % 10 == 0 or record["step"] in (self._start_step + 1, self.total):
            elapsed = time.time() - self._t0
            done = record["step"] - self._start_step
            eta = elapsed / max(done, 1) * (self.total - record["step"])
            print(f"step {record['step']}/{self.total}  {info}  lr {record['lr']:.2e}  "
                  f"ETA {eta:.0f}s", flush=True)
        if self._wandb is not None:
            self._wandb.log(record, step=record["step"])

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
