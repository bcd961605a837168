"""Layout validation (no processes) and the TP building blocks against single-process math
(2 gloo processes spawned in-test)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmtrain.config import ConfigError
from mmtrain.parallel.apply import check_layout
from mmtrain.recipe import load_config
from tests.conftest import spawn_ranks

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.num_kv_heads=1",
        "data.seq_len=32", "train.global_batch=4", "train.micro_batch=1"]


@pytest.mark.parametrize("overrides,world,field", [
    (["parallel.tp=2", "parallel.sequence_parallel=false"], 2, "parallel.sequence_parallel"),
    (["parallel.ep=3"], 3, "model.num_experts"),               # 4 experts over 3 EP ranks
    (["parallel.etp=2", "model.ffn_hidden_size=33"], 2, "model.ffn_hidden_size"),
    (["parallel.ep=4"], 2, "parallel.ep"),                     # more EP ranks than the world
    (["parallel.cp=3"], 3, "data.seq_len"),  # 32 tokens per row do not split over 3
    (["parallel.cp=2", "parallel.tp=2", "data.seq_len=34"], 4, "data.seq_len"),  # 17 over tp 2
    (["parallel.pp=2"], 2, "parallel.pp"),
    (["parallel.tp=2", "parallel.dp=2"], 2, "parallel.dp"),
    (["parallel.tp=4", "model.num_heads=4", "model.num_kv_heads=1"], 4, "model.vocab_size"),
    (["parallel.tp=4", "model.num_heads=2", "model.vocab_size=260"], 4, "model.num_heads"),
    (["parallel.tp=2", "data.seq_len=33"], 2, "data.seq_len"),
    (["parallel.dp=4", "train.global_batch=6", "train.micro_batch=1"], 4, "train.global_batch"),
])
def test_unsupported_layouts_fail_naming_the_field(overrides, world, field):
    cfg = load_config(TINY + overrides)
    with pytest.raises(ConfigError, match=f"^{field}:"):
        check_layout(cfg, world)


def test_unknown_cp_lightning_fails_naming_the_field():
    with pytest.raises(ConfigError, match="^parallel.cp_lightning: unknown 'ring'; use laspplus"):
        load_config(TINY + ["parallel.cp=2", "parallel.cp_lightning=ring"])


def test_cp_balance_is_validated_naming_the_field():
    with pytest.raises(ConfigError, match="^parallel.cp_balance: unknown 'ring'; use zigzag or "
                                          "contiguous"):
        load_config(TINY + ["parallel.cp=2", "parallel.cp_balance=ring"])
    # LASP runs over contiguous chunks only: the error says which field to set
    with pytest.raises(ConfigError, match="^parallel.cp_balance: LASP .*set "
                                          "parallel.cp_balance=contiguous"):
        load_config(TINY + ["parallel.cp=2", "parallel.cp_lightning=lasp"])
    load_config(TINY + ["parallel.cp=2", "parallel.cp_lightning=lasp",
                        "parallel.cp_balance=contiguous"])
    assert load_config(TINY).parallel.cp_balance == "zigzag"  # the default
    with pytest.raises(ConfigError, match="^parallel.cp_zigzag_rounds: must be >= 1, or 0"):
        load_config(TINY + ["parallel.cp=2", "parallel.cp_zigzag_rounds=-1"])
    # rounds 0 (the default) is auto: two rounds where the row divides into 4·cp pieces
    from mmtrain.parallel.context import auto_rounds, layout_summary
    assert load_config(TINY).parallel.cp_zigzag_rounds == 0
    assert [auto_rounds(2, "zigzag", n) for n in (256, 260, 12)] == [2, 1, 1]
    assert auto_rounds(2, "contiguous", 256) == 1 and auto_rounds(1, "zigzag", 256) == 1
    pc = load_config(TINY + ["parallel.cp=2"]).parallel
    assert "in 8 pieces of 32" in layout_summary(pc, 256) and "of each of 2 rounds" in \
        layout_summary(pc, 256)
    assert "in 4 pieces of 65" in layout_summary(pc, 260)
    with pytest.raises(ConfigError, match="^parallel.cp_zigzag_rounds: 2 rounds need "
                                          "parallel.cp_balance=zigzag"):
        load_config(TINY + ["parallel.cp=2", "parallel.cp_balance=contiguous",
                            "parallel.cp_zigzag_rounds=2"])


def test_overlap_groups_must_be_positive():
    with pytest.raises(ConfigError, match="^parallel.moe_overlap_groups:"):
        load_config(TINY + ["parallel.moe_overlap_groups=0"])


def test_supported_layout_gives_topology():
    topo = check_layout(load_config(TINY + ["parallel.tp=2", "parallel.dp=2"]), 4)
    assert (topo.tp, topo.dp, topo.edp) == (2, 2, 4)
    topo = check_layout(load_config(TINY + ["parallel.tp=2", "parallel.ep=4"]), 4)
    assert (topo.tp, topo.dp, topo.ep, topo.etp, topo.edp) == (2, 2, 4, 1, 1)
    topo = check_layout(load_config(TINY + ["parallel.ep=2", "parallel.etp=2"]), 4)
    assert (topo.dp, topo.ep, topo.etp, topo.edp) == (4, 2, 2, 1)


def test_cp_layout_groups():
    """cp=2 × tp=2 × dp=2: dense grads reduce over DP×CP (TP-split) or TP×DP×CP (replicated);
    with ep = etp = 1 the experts' EDP group spans every rank (DP×CP×TP)."""
    cfg = load_config(TINY + ["parallel.tp=2", "parallel.cp=2"])
    topo = check_layout(cfg, 8)
    assert (topo.tp, topo.cp, topo.dp, topo.edp) == (2, 2, 2, 8)
    assert topo.groups("edp") == [list(range(8))]
    assert topo.groups("cp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.groups("dp_cp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert topo.groups("tp_dp_cp") == [list(range(8))]


# ------------------------------------------------------------------------- TP building blocks
def _blocks(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from mmtrain.parallel.tensor import (TPRMSNorm, gather_from_sp, reduce_scatter_to_sp,
                                         vocab_parallel_cross_entropy)

    g = torch.Generator().manual_seed(0)
    T, V, W = 8, 10, 6
    logits = torch.randn(T, V, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (T,), generator=g)
    x = torch.randn(T, W, generator=g, dtype=torch.float64)
    w = torch.randn(W, generator=g, dtype=torch.float64)
    res = {}
    # vocab-parallel CE: value and gradient of the local vocab slice
    lp = logits[:, rank * V // 2:(rank + 1) * V // 2].clone().requires_grad_()
    ce = vocab_parallel_cross_entropy(lp, target, rank * V // 2, None if world == 1 else
                                      dist.group.WORLD)
    (ce * torch.arange(1, T + 1)).sum().backward()
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full, target, reduction="none")
    (ref * torch.arange(1, T + 1)).sum().backward()
    res["ce"] = float((ce - ref).abs().max())
    res["ce_grad"] = float((lp.grad - full.grad[:, rank * V // 2:(rank + 1) * V // 2]).abs().max())
    # full-width RMSNorm over a split feature axis
    xs = x[:, rank * W // 2:(rank + 1) * W // 2].clone().requires_grad_()
    norm = TPRMSNorm(w[rank * W // 2:(rank + 1) * W // 2], 1e-6, W, dist.group.WORLD).double()
    y = norm(xs)
    (y * y.detach().sign()).sum().backward()
    xf = x.clone().requires_grad_()
    yf = F.rms_norm(xf, (W,), w, 1e-6)
    (yf * yf.detach().sign()).sum().backward()
    sl = slice(rank * W // 2, (rank + 1) * W // 2)
    res["norm"] = float((y - yf[:, sl]).abs().max())
    res["norm_grad"] = float((xs.grad - xf.grad[:, sl]).abs().max())
    # SP gather / reduce-scatter are adjoint: <gather(a), b> summed = <a, reduce_scatter(b)>
    a = x[rank * T // 2:(rank + 1) * T // 2].clone().requires_grad_()
    gathered = gather_from_sp(a, dist.group.WORLD)
    res["gather"] = float((gathered - x).abs().max())
    back = reduce_scatter_to_sp(gathered * (rank + 1), dist.group.WORLD)
    res["rs"] = float((back - 3 * a).abs().max())
    out[rank] = res
    dist.destroy_process_group()


def test_tp_blocks_match_single_process_math():
    out = spawn_ranks(_blocks, 2)
    for rank in range(2):
        for key, err in out[rank].items():
            assert err < 1e-12, (rank, key, err)


def test_parallel_package_imports_nothing_from_train():
    """``mmtrain.parallel`` is the shard plan and the collectives; the loop, optimizer factory
    and checkpoints live in ``mmtrain.train`` (``train/distributed.py``), never the reverse:
    no import of ``mmtrain.train`` anywhere in ``parallel/``, function-level ones included."""
    import ast
    from pathlib import Path

    import mmtrain.parallel as pkg

    files = sorted(Path(pkg.__path__[0]).glob("*.py"))
    assert any(f.name == "apply.py" for f in files)
    found = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{f.name}: {n}" for n in names
                      if n == "mmtrain.train" or n.startswith("mmtrain.train.")]
    assert found == []
