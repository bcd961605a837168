"""The command line: bad input fails before training with one line naming the field and the fix."""

import subprocess
import sys

import pytest

from tests.conftest import subprocess_env


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mmtrain", *args], capture_output=True,
                          text=True, env=subprocess_env(), cwd=cwd, timeout=300)


@pytest.mark.parametrize("override,field", [
    ("train.bogus=1", "train.bogus"),
    ("train.lr=-0.1", "train.lr"),
    ("model.num_heads=5", "model.num_heads"),
    ("model.softmax_layers=[1,7]", "model.softmax_layers"),
    ("data.tokenizer=/nonexistent/tokenizer.json", "data.tokenizer"),
])
def test_bad_input_fails_with_one_line(tmp_path, override, field):
    out = run_cli("train", override, f"run.dir={tmp_path}/run")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: {field}:"), lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


def test_empty_corpus_fails_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run_cli("train", f"data.corpus={empty}", f"run.dir={tmp_path}/run")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.corpus:"), out.stderr


def test_info_prints_layout_and_counts():
    out = run_cli("info")
    assert out.returncode == 0, out.stderr
    assert "layout: LLLS" in out.stdout and "params total" in out.stdout


def test_info_shows_the_context_parallel_layout_and_checks_it():
    out = run_cli("info", "parallel.cp=4", "data.seq_len=1024", "parallel.cp_lightning=lasp",
                  "parallel.cp_balance=contiguous")
    assert out.returncode == 0, out.stderr
    assert ("cp4" in out.stdout and "contiguous partition" in out.stdout
            and "256 contiguous tokens of every 1024-token row" in out.stdout
            and "lightning LASP," in out.stdout and "varlen ring attention" in out.stdout)
    out = run_cli("info", "parallel.cp=4", "data.seq_len=1024")  # the default: zigzag, LASP+
    assert out.returncode == 0, out.stderr  # auto rounds: 1024 divides into 4·cp, so two
    assert ("zigzag partition: every 1024-token row in 16 pieces of 64, rank r holds pieces r "
            "and 7-r of each of 2 rounds" in out.stdout and "lightning LASP+," in out.stdout)
    out = run_cli("info", "parallel.cp=4", "data.seq_len=1032")  # 1032 = 8·129: one round
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if "zigzag partition" in x)
    assert "every 1032-token row in 8 pieces of 129, rank r holds pieces r and 7-r" in line
    assert "rounds" not in line
    bad = run_cli("info", "parallel.cp=4", "data.seq_len=1032", "parallel.cp_zigzag_rounds=2")
    assert bad.returncode == 2  # 1032 = 8·129: one round splits, two (16 pieces) do not
    assert bad.stderr.strip().startswith("error: data.seq_len: 1032 tokens per row do not split "
                                         "into 2·cp × parallel.cp_zigzag_rounds=2 = 16 pieces")
    bad = run_cli("info", "parallel.cp=3", "data.seq_len=1024", "parallel.cp_balance=contiguous")
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: data.seq_len: 1024 tokens per row do not split "
                                         "over parallel.cp=3"), bad.stderr
    bad = run_cli("info", "parallel.cp=3", "data.seq_len=1023")  # 1023 = 3·341, odd
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: data.seq_len: 1023 tokens per row do not split "
                                         "into 2·cp = 6 pieces"), bad.stderr
    assert "parallel.cp_balance=contiguous" in bad.stderr
