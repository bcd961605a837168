"""The training loop: one optimizer step = the micro-batches of one global batch on every rank.

Loss normalisation (what makes every layout and accumulation give the same numbers): the LM loss
of a step is the sum of token cross-entropies over the whole global batch divided by its number of
loss tokens (counted across ranks before the first backward). The aux loss of a step is the mean
over layers of E·Σ f·m with f and m over the step's whole global batch (every rank, every
micro-batch; ``mmtrain.model.moe``: exact without accumulation, running counts with it), times
``aux_loss_coef``; the logged ``aux_loss`` is always the exact global-batch value. Gradients are
summed across data-parallel (and context-parallel) ranks.

Everything distributed goes through the :class:`mmtrain.parallel.apply.Parallel` handle that
``parallelize`` returns (TP/SP sharding, vocab-parallel loss, bucketed gradient reduction over
DP/EDP, global-norm clipping) and :mod:`mmtrain.train.distributed` (the model built on meta and
initialised shard by shard, ZeRO-1 or torch AdamW, sharded checkpoints); in a single process it
is plain PyTorch. TP ranks of one DP rank see the same data and compute the same loss; CP ranks of one DP
rank read the same rows and each keeps its contiguous piece of every row (``par.shard_batch``), so
token counts and LM-loss sums are reduced over DP×CP.
"""

from __future__ import annotations

import datetime
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from mmtrain.config import Config, ConfigError
from mmtrain.model.moe import step_summary
from mmtrain.parallel.apply import check_layout
from mmtrain.parallel.context import layout_summary
from mmtrain.train import checkpoint as ckpt
from mmtrain.train import faults
from mmtrain.train.distributed import (build_model, build_optimizer, build_parallel,  # noqa: F401
                                       checkpoint_state, load_checkpoint)
from mmtrain.train.elastic import store_for_attempt
from mmtrain.train.health import StepHealth, TrainingAborted, finite_or_none
from mmtrain.train.metrics import MetricsLogger, peak_flops
from mmtrain.train.optim import set_lr
from mmtrain.train.schedules import BatchSchedule, lr_at, resolve_max_steps
from mmtrain.train.stop import GracefulStop
from mmtrain.train.watchdog import Watchdog


@dataclass
class TrainResult:
    losses: list = field(default_factory=list)  # (step, loss) of the steps run in this call
    final_step: int = 0
    run_dir: str = ""
    stopped: bool = False  # ended early by SIGTERM / SIGUSR1 / Ctrl-C (after a checkpoint)
    skipped: list = field(default_factory=list)  # steps skipped for a non-finite loss/grad norm


def _resolve_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: 'cuda' requested but no GPU is visible; "
                              "use train.device=cpu")
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_distributed(cfg: Config, device: torch.device) -> tuple[int, int]:
    """Initialise the default process group under torchrun/Slurm; (rank, world) either way."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=cfg.parallel.timeout_s)
    store = store_for_attempt(timeout)  # torchrun restarts: a fresh namespace per attempt
    if store is None:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=world, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def launch_rank_world() -> tuple[int, int]:
    """(rank, world) of this process: from the process group if one exists, else from the
    launcher's environment (torchrun, Slurm via torchrun), so layouts can be checked before any
    process group is created."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _check_same_model(cfg: Config, path) -> None:
    """A run directory resumes only the model it holds; say so instead of a shape error."""
    saved = ckpt.read_meta(path).get("config", {}).get("model")
    if saved is None:
        return
    now = cfg.to_dict()["model"]
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        shown = ", ".join(f"model.{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff[:3])
        raise ConfigError(f"run.dir: {cfg.run.dir} holds a checkpoint of another model ({path}: "
                          f"{shown}{', ...' if len(diff) > 3 else ''}); use a fresh run.dir, or "
                          f"train.init_from={path} to start a new run from its weights")


#: Watchdog phases (first word) that are collectives: an exception there is a peer failure.
COLLECTIVE_PHASES = ("all_reduce(dp)", "all_reduce(tp_dp)", "gradient", "all_reduce",
                     "checkpoint")


def train(cfg: Config) -> TrainResult:
    """Run (or resume) training as configured; every rank calls this."""
    from mmtrain.data import build_tokenizer
    from mmtrain.data.build import build_loader

    # Everything that can be wrong with the recipe or the data fails here, before any collective
    # (the layout first: it is pure and cheap).
    cfg.train.max_steps = resolve_max_steps(cfg.train, cfg.data.seq_len)  # train.max_tokens
    sched = BatchSchedule.from_config(cfg.train, cfg.data.seq_len)
    rank, world = launch_rank_world()
    topology = check_layout(cfg, world)
    if cfg.train.init_from and not os.path.exists(os.path.expanduser(cfg.train.init_from)):
        raise ConfigError(f"train.init_from: '{cfg.train.init_from}' does not exist; give an "
                          f"mmtrain checkpoint or run dir, or a HF model directory")
    tokenizer = build_tokenizer(cfg.data)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                          f"{tokenizer.vocab_size} ids of data.tokenizer={cfg.data.tokenizer}; "
                          f"set model.vocab_size>={tokenizer.vocab_size} or use a tokenizer "
                          f"that fits the model")
    dp, dp_rank = topology.dp, topology.rank_info(rank).dp
    tcfg = cfg.train
    loader = build_loader(cfg, tokenizer, dp_rank, dp, announce=rank == 0)
    device = _resolve_device(cfg)
    bf16_params = tcfg.bf16_params(device.type)  # a contradictory train.param_dtype fails here
    rank, world = init_distributed(cfg, device)

    # A damaged newest checkpoint or another model's run dir fails here, before anything is
    # written (config.yaml, metrics.jsonl and the checkpoints stay as they are).
    run_dir = Path(cfg.run.dir)
    latest = ckpt.check_resumable(run_dir)
    if latest is not None:
        _check_same_model(cfg, latest)

    torch.manual_seed(tcfg.seed)
    model, par = build_parallel(cfg, topology, device)
    model.set_recompute(tcfg.recompute)
    model.set_compile(tcfg.compile)
    optimizer = build_optimizer(par, tcfg)
    start_step = 0
    if latest is not None:
        try:
            state = load_checkpoint(par, latest, optimizer)
        except pickle.UnpicklingError as exc:  # never unpickled: refused before any data is read
            raise ConfigError(f"run.dir: checkpoint {latest} was refused ({exc}); it is not a "
                              f"checkpoint mmtrain wrote: delete it, or restore the original")
        start_step = ckpt.read_meta(latest)["step"]
        loader.load_state_dict(state["loader"])
        ckpt.decode_rng(state["rng"])
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        from omegaconf import OmegaConf

        OmegaConf.save(OmegaConf.create(cfg.to_dict()), run_dir / "config.yaml")

    from mmtrain.model import account

    acct = account(cfg.model, cfg.data.seq_len)
    peak = peak_flops(device)
    autocast = tcfg.autocast_bf16(device.type)
    logger = MetricsLogger(str(run_dir), cfg.to_dict(), tcfg.max_steps, start_step,
                           enabled=rank == 0, progress=cfg.run.progress, wandb_cfg=cfg.run.wandb)
    if latest is not None:
        logger.message(f"resumed from {latest} at step {start_step}"
                       + (f"; train.max_steps={tcfg.max_steps} is already reached, nothing to "
                          f"do (raise train.max_steps to train on)"
                          if start_step >= tcfg.max_steps else ""))
    logger.message(f"model: {acct.params_total / 1e6:.2f}M params "
                   f"({acct.params_active / 1e6:.2f}M active, "
                   + ("bf16 params, fp32 masters" if bf16_params else "fp32 params") + f"), "
                   f"{world} process(es) on {device}; "
                   + layout_summary(cfg.parallel, cfg.data.seq_len, topology.dp))
    result = TrainResult(run_dir=str(run_dir), final_step=start_step)
    health = StepHealth(tcfg.max_bad_steps, tcfg.spike_factor)
    wd = Watchdog(run_dir, rank, world, cfg.parallel.timeout_s).start()
    exit_reason = "error"

    with GracefulStop(announce=rank == 0) as stopper:
        try:
            for step in range(start_step, tcfg.max_steps):
                t0 = time.time()
                wd.phase("step", step + 1)
                micro = [par.shard_batch(b, device) for b in loader.next_step()]  # CP: a piece
                # counted on the host before the copy (Batch.to): no device read-back
                n_tok = torch.tensor([float(sum(b.loss_tokens if b.loss_tokens is not None
                                                else b.loss_mask.sum().item() for b in micro))])
                wd.phase("all_reduce(dp) token count", step + 1)
                n_tok = max(par.all_reduce(n_tok, "dp_cp").item(), 1.0)  # CP: pieces of rows
                wd.phase("forward/backward", step + 1)
                model.begin_step(sched.rows(step) * cfg.data.seq_len)  # tokens routed, all ranks
                lm_sum = torch.zeros((), dtype=torch.float64, device=device)  # read once a step
                for i, batch in enumerate(micro):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        out = model(batch.tokens, batch.cu_seqlens, batch.position_ids,
                                    return_hidden=tcfg.fused_ce)
                        if tcfg.fused_ce:  # chunked: no full-vocabulary logits
                            ce = par.linear_ce(out.hidden, model.lm_head.weight, batch.labels,
                                               tcfg.fused_ce_chunk)
                    if not tcfg.fused_ce:
                        ce = par.token_ce(out.logits.float(), batch.labels)
                    lm = (ce * batch.loss_mask.view(-1)).sum()
                    loss = lm / n_tok + tcfg.aux_loss_coef * out.aux_loss
                    poison = faults.loss_factor(step + 1)  # test-only hook: 1.0 normally
                    if poison != 1.0:
                        lm, loss = lm * poison, loss * poison
                    par.prepare_backward(last_micro_batch=i == len(micro) - 1)
                    loss.backward()
                    if i == 0:
                        wd.phase("forward", step + 1)  # fault hook: inside a step
                    lm_sum += lm.detach().double()
                if faults.active("nan_grad", step + 1):  # test-only hook
                    g = next((p.grad for p in model.parameters() if p.grad is not None), None)
                    if g is None:  # bf16 parameters: the gradients are in the fp32 buckets
                        g = par.sync.buckets[0].grad
                    g.view(-1)[0] = float("nan")
                wd.phase("all_reduce(dp) loss stats", step + 1)
                stats = par.all_reduce(lm_sum.view(1), "dp_cp")  # CP ranks hold pieces of it
                # MoE statistics of every rank's own tokens, plus the stop and preemption flags:
                # one reduction
                wd.phase("all_reduce(tp_dp) routing stats + stop flag", step + 1)
                moe = model.moe_stats()
                flat = torch.cat([moe.reshape(-1).cpu(),
                                  torch.tensor([float(stopper.requested), float(stopper.preempted)],
                                               dtype=torch.float64)])
                flat = par.all_reduce(flat, "tp_dp_cp")
                stop = flat[-2].item() > 0  # any rank signalled: all stop after this step
                preempted = flat[-1].item() > 0
                moe_summary = step_summary(flat[:-2].view(moe.shape), cfg.model.num_experts,
                                           cfg.model.top_k)
                wd.phase("gradient reduction", step + 1)
                par.reduce_grads()
                wd.phase("all_reduce grad norm", step + 1)
                grad_norm = par.clip_grad_norm(tcfg.grad_clip)
                lr = lr_at(step, tcfg, sched)
                set_lr(optimizer, lr)
                loss_val = stats[0].item() / n_tok
                # Non-finite loss or norm (global values: every rank decides alike): skip the
                # update, keep weights and optimizer state; the step still counts.
                skipped = health.check(step + 1, loss_val, float(grad_norm))
                wd.phase("optimizer", step + 1)
                if not skipped:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)

                dt = time.time() - t0
                tokens = sched.rows(step) * cfg.data.seq_len
                tps = tokens / max(dt, 1e-9)
                record = {"step": step + 1, "loss": finite_or_none(loss_val), "lr": lr,
                          "aux_loss": finite_or_none(moe_summary["aux_loss"]),
                          "grad_norm": finite_or_none(float(grad_norm)), "tokens_per_s": tps,
                          "drop_rate": moe_summary["drop_rate"],
                          "expert_imbalance": moe_summary["expert_imbalance"],
                          "step_time_s": dt,
                          "mfu": (acct.flops_per_token * tps / (peak * world)) if peak else None,
                          "skipped": skipped}
                spike = health.spike(loss_val)
                if spike is not None:
                    record["spike"] = True
                    logger.message(f"loss spike at step {step + 1}: {loss_val:.4f} > "
                                   f"{tcfg.spike_factor:g} x running mean {spike:.4f}")
                logger.log(record)
                if skipped:
                    result.skipped.append(step + 1)
                    logger.message(f"step {step + 1} skipped: non-finite "
                                   f"{health.what(loss_val, float(grad_norm))}; weights and "
                                   f"optimizer state unchanged ({len(health.bad_run)} in a row, "
                                   f"train.max_bad_steps={tcfg.max_bad_steps})")
                    if health.must_stop():
                        raise health.abort(ckpt.latest(run_dir))
                result.losses.append((step + 1, loss_val))
                result.final_step = step + 1
                done = step + 1 == tcfg.max_steps
                periodic = tcfg.ckpt_every and (step + 1) % tcfg.ckpt_every == 0
                if done or stop or (periodic and not health.bad_run):  # none amid bad steps
                    wd.phase("checkpoint save", step + 1)
                    path = ckpt.save(run_dir, step + 1, model, optimizer,
                                     {"loader": loader.state_dict(), "rng": ckpt.encode_rng()},
                                     {"config": cfg.to_dict()}, tcfg.keep_last,
                                     tensors=checkpoint_state(par, optimizer))
                if stop and not done:
                    how = ("preempted" if preempted else "stopped on request")
                    logger.message(f"{how} at step {step + 1}: all ranks saved checkpoint {path}; "
                                   f"run the same command again to resume")
                    result.stopped = True
                    exit_reason = how
                    break
            else:
                exit_reason = "done"
            if tcfg.compile:
                from mmtrain.model.compiled import summary

                logger.message(summary())
        except RuntimeError as exc:  # gloo/NCCL errors (DistBackendError is one)
            if world > 1 and wd.phase_name.split(" ", 1)[0] in COLLECTIVE_PHASES \
                    and not isinstance(exc, TrainingAborted):
                raise wd.failure(exc) from exc
            raise
        finally:
            wd.stop(exit_reason)
            logger.close()
    result.model = model  # type: ignore[attr-defined]
    result.parallel = par  # type: ignore[attr-defined]
    result.optimizer = optimizer  # type: ignore[attr-defined]
    return result
