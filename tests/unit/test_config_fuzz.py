"""Config fuzz: random bad overrides (wrong types, null, non-finite and out-of-range values,
unknown keys and sections, impossible layouts for the world size) must each end in ONE line
``error: <field>: ...`` naming the field, exit status 2, no traceback, before any process group or
file exists. Most run in-process through the CLI (``mmtrain.cli.main``) for speed; a handful run
as real subprocesses."""

import dataclasses
import random
import subprocess
import sys
import typing

import pytest

from mmtrain import cli
from mmtrain.config import Config
from tests.conftest import subprocess_env

# Values that are out of range for a field (on the default recipe), and the names an error about
# them may carry (the field itself, or the field it conflicts with).
OUT_OF_RANGE = {
    "model.vocab_size": ["0", "-3"], "model.hidden_size": ["0", "-1"],
    "model.num_layers": ["0", "-2"], "model.num_heads": ["0", "5", "3"],
    "model.num_kv_heads": ["0", "3"], "model.num_experts": ["0", "-1"],
    "model.top_k": ["0", "5", "9"], "model.ffn_hidden_size": ["0"],
    "model.softmax_every": ["-1", "-8"], "model.softmax_layers": ["[9]", "[-1]", "[0,4]", "[true]"],
    "model.capacity_factor": ["0", "-1.5"], "model.rotary_dim": ["3", "34", "-2"],
    "model.norm_scheme": ["postnorm", "''"], "model.norm_eps": ["0", "-1e-5"],
    "model.lightning_norm_eps": ["0"], "model.rope_theta": ["0", "-10"],
    "model.embedding_init_std": ["0"], "model.lightning_block_size": ["0", "-64"],
    "model.head_dim": ["0", "-32"], "model.max_position_embeddings": ["0", "-1"],
    "data.seq_len": ["1", "0", "-5"], "data.corpus_max_bytes": ["-1"], "data.seed": ["-1"],
    "data.tokenizer": ["''", "/nonexistent/tokenizer.json"], "data.corpus": ["''"],
    "train.max_steps": ["0", "-1"], "train.global_batch": ["0", "-8"],
    "train.micro_batch": ["0", "3", "16"], "train.lr": ["0", "-1e-3"],
    "train.min_lr": ["-1", "1"], "train.schedule": ["linear", "''"],
    "train.warmup_steps": ["-1"], "train.decay_start": ["-1"], "train.weight_decay": ["-0.1"],
    "train.beta1": ["1", "-0.1", "1.5"], "train.beta2": ["1.0", "2"], "train.eps": ["0", "-1e-8"],
    "train.grad_clip": ["-1"], "train.aux_loss_coef": ["-0.01"], "train.seed": ["-1", "99999999999999999999"],
    "train.ckpt_every": ["-1"], "train.keep_last": ["0", "-2"], "train.log_every": ["0"],
    "train.device": ["tpu", "gpu"], "train.dtype": ["fp16", "float32"],
    "train.param_dtype": ["fp16", "float32", "bf16"],  # bf16: auto compute is fp32 on a CPU
    "train.max_bad_steps": ["0", "-1"], "train.spike_factor": ["0.5", "-2", "1"],
    "train.fused_ce_chunk": ["0", "-4096"], "train.recompute": ["some", "''", "layers"],
    "train.init_from": ["''", "/nonexistent/ckpt"],
    "parallel.dp": ["0", "-2", "3"], "parallel.tp": ["0", "-1", "3"], "parallel.cp": ["0", "3"],
    "parallel.pp": ["0", "2"], "parallel.ep": ["0", "3"], "parallel.etp": ["0", "3"],
    "parallel.bucket_mb": ["0", "-1"], "parallel.order": ["tp-tp-cp-ep-dp-pp", "foo", "tp-cp-ep-dp-pp-xp", "''"],
    "parallel.backend": ["mpi", "''"], "parallel.timeout_s": ["0", "-5"],
    "run.dir": ["''"], "run.wandb.mode": ["sometimes"], "run.wandb.project": ["''"],
}
# Errors about a field may name the field it conflicts with.
ALSO = {"model.num_experts": ["model.top_k"], "model.num_heads": ["model.num_kv_heads", "model.head_dim"],
        "model.head_dim": ["model.rotary_dim"], "train.micro_batch": ["train.global_batch"],
        "model.num_layers": ["model.softmax_layers"], "train.lr": ["train.min_lr"],
        "data.seq_len": ["data.corpus"]}
# Impossible layouts for a world of 2 processes.
LAYOUTS = [(["parallel.tp=3"], "parallel."), (["parallel.dp=3"], "parallel."),
           (["parallel.tp=2", "parallel.dp=2"], "parallel."),
           (["train.global_batch=3"], "train.global_batch"),
           (["parallel.tp=2", "parallel.sequence_parallel=false"], "parallel.sequence_parallel"),
           (["parallel.tp=2", "model.vocab_size=259"], "model.vocab_size"),
           (["parallel.tp=2", "model.num_kv_heads=1", "model.num_heads=1", "model.head_dim=32"],
            "model.num_heads"),
           (["train.micro_batch=3"], "train.")]


def _fields(cls=Config, prefix=""):
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def _base(tp):
    if typing.get_origin(tp) is typing.Union:
        return [a for a in typing.get_args(tp) if a is not type(None)][0], True
    return tp, False


WRONG = {int: ["abc", "1.5", "[1,2]", "{a: 1}", "true", "nan"],
         float: ["abc", "[1]", "true", "nan", "inf", "-inf", "{x: 1}"],
         bool: ["maybe", "2", "[true]", "yes please"],
         str: ["[1,2]", "{a: 1}", "true", "3"],
         list: ["5", "abc", "{a: 1}", "true"]}


def draw_cases(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """``n`` (overrides, names one of which the error must carry) pairs."""
    rng = random.Random(seed)
    fields = list(_fields())
    cases = []
    while len(cases) < n:
        kind = rng.choice(["type", "type", "null", "range", "range", "unknown", "layout"])
        if kind == "layout":
            ovs, name = rng.choice(LAYOUTS)
            cases.append((list(ovs), [name]))
            continue
        if kind == "unknown":
            sec = rng.choice(["model", "data", "train", "parallel", "run", "run.wandb"])
            key = rng.choice([f"{sec}.{rng.choice(['lrr', 'foo', 'num_expert', 'seq'])}",
                              f"{rng.choice(['bogus', 'trian', 'modle'])}",
                              f"{sec}.{rng.choice(['x', 'y'])}.z",
                              f"train.lr.{rng.choice(['a', 'b'])}"])
            plus = rng.choice(["", "+"])
            if key.count(".") == 0 and rng.random() < 0.5:  # an unknown recipe of a group
                grp = rng.choice(["model", "data", "train", "parallel"])
                cases.append(([f"{grp}={rng.choice(['huge', 'nope'])}"], [grp]))
                continue
            name = key[:-2] if key.endswith(".z") else key
            name = "train.lr" if name.startswith("train.lr.") else name
            cases.append(([f"{plus}{key}={rng.choice(['1', 'abc'])}"], [name]))
            continue
        path, tp = rng.choice(fields)
        base, optional = _base(tp)
        if kind == "null":
            if optional:
                continue
            value = "null"
        elif kind == "range":
            if path not in OUT_OF_RANGE:
                continue
            value = rng.choice(OUT_OF_RANGE[path])
        else:
            choices = [v for v in WRONG[base if base in WRONG else str]]
            if base is str:  # numbers are valid strings for a str field; only lists/maps/bools
                choices = ["[1,2]", "{a: 1}", "true"]
            if base is float:
                choices = [v for v in choices]
            value = rng.choice(choices)
        cases.append(([f"{path}={value}"], [path] + ALSO.get(path, [])))
    return cases


@pytest.fixture
def no_process_group(monkeypatch):
    import torch.distributed as dist

    from mmtrain.train import loop

    def refuse(*a, **k):
        raise AssertionError("a process group was created for a bad recipe")

    monkeypatch.setattr(loop, "init_distributed", refuse)
    monkeypatch.setattr(dist, "init_process_group", refuse)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun with 2 processes (rank 0)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")


def test_random_bad_overrides_fail_with_one_line(tmp_path, capsys, no_process_group):
    cases = draw_cases(200, seed=12)
    failures = []
    for i, (ovs, names) in enumerate(cases):
        run = tmp_path / f"run{i}"
        try:
            rc = cli.main(["train", f"run.dir={run}", *ovs])  # the fuzzed value wins
        except BaseException as exc:  # noqa: BLE001 - a traceback is exactly the failure
            rc = f"raised {type(exc).__name__}: {exc}"
        err = capsys.readouterr().err.strip().splitlines()
        ok = (rc == 2 and len(err) == 1 and err[0].startswith("error: ")
              and any(n in err[0] for n in names) and not run.exists())
        if not ok:
            failures.append((ovs, rc, err[-3:]))
    assert not failures, f"{len(failures)} of {len(cases)} cases: " + "\n".join(
        map(str, failures[:15]))


@pytest.mark.parametrize("ovs,name", [
    (["train.lr=abc"], "train.lr"),
    (["model.top_k=null"], "model.top_k"),
    (["train.grad_clip=nan"], "train.grad_clip"),
    (["parallel.bucket_mb=inf"], "parallel.bucket_mb"),
    (["+train.lrr=1"], "train.lrr"),
])
def test_bad_overrides_as_real_processes(tmp_path, ovs, name):
    out = subprocess.run([sys.executable, "-m", "mmtrain", "train", *ovs,
                          f"run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                         env=subprocess_env(), timeout=300)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}"), out.stderr
    assert not (tmp_path / "run").exists()
