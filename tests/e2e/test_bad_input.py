"""Corrupt and mismatched input: each case ends in one line naming the file and the fix, exit
status 2, with nothing in the run directory created or changed. Through the CLI in-process (the
malicious-pickle cases as real processes)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmtrain import cli
from mmtrain.recipe import load_config
from mmtrain.train import checkpoint as ckpt
from mmtrain.train.loop import train
from tests.conftest import subprocess_env
from tests.e2e.test_train_resume import SMALL


class _Out:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


@pytest.fixture
def _cli(capsys):
    """``mmtrain train SMALL + args`` through the CLI in this process (as a subprocess would,
    minus the imports): its exit status and stderr."""

    def run(*args):
        capsys.readouterr()
        rc = cli.main(["train", *SMALL, *args])
        return _Out(rc, capsys.readouterr().err)

    return run


def _snapshot(root: Path) -> dict:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(out, prefix):
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith(f"error: {prefix}"), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory with checkpoints at steps 1 and 2 (copied by each test that damages it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_config(SMALL + ["train.max_steps=2", "train.ckpt_every=1", f"run.dir={run}"]))
    return run


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tokenizer_larger_than_the_model(tmp_path, _cli):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {f"w{i}": i for i in range(299)} | {"[UNK]": 299}
    path = tmp_path / "tokenizer.json"
    Tokenizer(WordLevel(vocab, unk_token="[UNK]")).save(str(path))
    out = _cli(f"data.tokenizer={path}", f"run.dir={tmp_path / 'run'}")
    line = _one_line(out, "model.vocab_size: 258")
    assert str(path) in line and "set model.vocab_size>=" in line
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_model(tmp_path, _cli, trained):
    run = _copy(trained, tmp_path / "run")
    before = _snapshot(run)
    line = _one_line(_cli("model.hidden_size=64", "train.max_steps=3", f"run.dir={run}"),
                     "run.dir:")
    assert str(run / "checkpoints" / "step_00000002") in line
    assert "model.hidden_size: 32 -> 64" in line and "use a fresh run.dir" in line
    assert _snapshot(run) == before


@pytest.mark.parametrize("victim", ["__0_0.distcp", "meta.json", "rank_00000.json"])
def test_half_deleted_checkpoint(tmp_path, _cli, trained, victim):
    run = _copy(trained, tmp_path / "run")
    newest = run / "checkpoints" / "step_00000002"
    (newest / victim).unlink()
    before = _snapshot(run)
    line = _one_line(_cli("train.max_steps=3", f"run.dir={run}"), "run.dir:")
    assert f"checkpoint {newest} is incomplete (missing {victim})" in line, line
    assert f"or delete {newest} to resume from step_00000001" in line
    assert _snapshot(run) == before
    # the fix works: without the damaged directory the run resumes from step 1
    import shutil

    shutil.rmtree(newest)
    res = train(load_config(SMALL + ["train.max_steps=3", f"run.dir={run}"]))
    assert [s for s, _ in res.losses] == [2, 3]


def test_truncated_checkpoint_file(tmp_path, _cli, trained):
    run = _copy(trained, tmp_path / "run")
    f = run / "checkpoints" / "step_00000002" / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[:100])
    line = _one_line(_cli("train.max_steps=3", f"run.dir={run}"), "run.dir:")
    assert "__0_0.distcp (size 100, expected" in line


def test_sequence_length_the_data_cannot_fill(tmp_path, _cli):
    corpus = tmp_path / "small.txt"
    corpus.write_text("a short text. " * 200)  # 2800 bytes
    out = _cli(f"data.corpus={corpus}", "data.seq_len=1024", f"run.dir={tmp_path / 'run'}")
    line = _one_line(out, "data.corpus:")
    assert str(corpus) in line and "data.seq_len=1024" in line and "smaller data.seq_len" in line
    assert not (tmp_path / "run").exists()


def _rewrite_manifest(path: Path) -> None:
    meta = ckpt.read_meta(path)
    meta["files"] = {p.name: p.stat().st_size for p in sorted(path.iterdir())
                     if p.is_file() and p.name != "meta.json"}
    (path / "meta.json").write_text(json.dumps(meta))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("how", ["metadata", "bytes_entry"])
def test_checkpoint_with_a_malicious_pickle_is_refused(tmp_path, trained, how):
    """A checkpoint whose DCP metadata (or a DCP bytes entry) would run code when unpickled:
    resuming refuses it with one line and the code never runs."""
    import pickle

    import torch.distributed.checkpoint as dcp

    run = _copy(trained, tmp_path / "run")
    newest = run / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"
    if how == "metadata":
        (newest / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    else:  # a genuine DCP checkpoint holding the model tensors plus a pickled object entry
        for p in newest.glob("*.distcp"):
            p.unlink()
        (newest / ".metadata").unlink()
        state = {"model.embed.weight": torch.zeros(258, 32), "evil": _Evil(marker)}
        dcp.save(state, checkpoint_id=str(newest))
    _rewrite_manifest(newest)
    before = _snapshot(run)
    out = subprocess.run([sys.executable, "-m", "mmtrain", "train", *SMALL, "train.max_steps=3",
                          f"run.dir={run}"], capture_output=True, text=True,
                         env=subprocess_env(), timeout=300)  # a real process: the CLI as used
    line = _one_line(out, "run.dir:")
    assert f"checkpoint {newest} was refused" in line and "delete it" in line, line
    assert not marker.exists()
    assert _snapshot(run) == before
