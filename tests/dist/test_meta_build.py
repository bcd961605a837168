"""Building at any size: every layout initialises the single process's weights bitwise, and the
456B model is sharded on the meta device without any rank holding more than its share.

Both tests spawn gloo processes in-test (``mp.spawn``, via ``spawn_ranks``) and go through the trainer's own build
(:func:`mmtrain.train.distributed.build_parallel`; for the 456B model its meta half,
:func:`mmtrain.parallel.apply.shard_model`, as materialising 114B parameters a rank does not fit
this machine). The training step of the scaled-down twin under the same layout runs through the
CLI (torchrun) and must log the single-process loss.
"""

import datetime
import math
import os
import resource

import pytest
import torch
import torch.distributed as dist

from mmtrain.recipe import load_config
from tests.conftest import metrics_records, spawn_ranks

# the parity tests' tiny hybrid MoE (2 heads over 1 KV head, 4 experts, a lightning and a
# softmax layer), with a wider KV so that tp=2 splits it in some layouts
TINY = ["model.hidden_size=32", "model.ffn_hidden_size=32", "model.num_layers=2",
        "model.softmax_every=2", "model.num_heads=4", "model.head_dim=8",
        "model.num_kv_heads=2", "data.seq_len=32", "train.global_batch=4",
        "train.micro_batch=null", "parallel.timeout_s=60", "train.seed=3"]

LAYOUTS = {
    2: [["parallel.tp=2"], ["parallel.zero1=true"], ["parallel.ep=2"], ["parallel.cp=2"],
        ["parallel.tp=2", "model.num_kv_heads=1"]],           # tp > KV heads: k/v replicated
    4: [["parallel.ep=2", "parallel.etp=2"], ["parallel.tp=2", "parallel.ep=2"],
        ["parallel.tp=2", "parallel.dp=2", "parallel.zero1=true"],
        ["parallel.tp=2", "parallel.cp=2"]],
}


def _init_layouts(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    from mmtrain.model.init import region
    from mmtrain.parallel.apply import check_layout
    from mmtrain.train.distributed import build_model, build_parallel

    res = {}
    for layout in LAYOUTS[world]:
        cfg = load_config(TINY + layout)
        ref = build_model(cfg, torch.device("cpu"))  # one process's weights
        full = dict(ref.named_parameters())
        model, par = build_parallel(cfg, check_layout(cfg, world), torch.device("cpu"))
        bad, covered = [], {}
        for name, p in model.named_parameters():
            assert not p.is_meta
            cover = torch.zeros(full[name].shape)
            for pc in par.pieces(name, tuple(p.shape)):
                mine = region(p.detach(), pc.local, pc.sizes)
                if not torch.equal(mine, region(full[name].detach(), pc.glob, pc.sizes)):
                    bad.append(name)
                region(cover, pc.glob, pc.sizes).add_(1)
            dist.all_reduce(cover)  # every element of the full tensor is held somewhere
            covered[name] = float(cover.min())
        # the lightning slopes are computed for the rank's heads
        for a, b in zip(model.layers, ref.layers):
            if hasattr(a.attn, "slopes"):
                h0 = a.attn.head_start
                if not torch.equal(a.attn.slopes, b.attn.slopes[h0:h0 + a.attn.num_heads]):
                    bad.append(f"layers.{a.attn.layer_idx}.attn.slopes")
        res[" ".join(layout)] = {"bad": bad, "uncovered": [n for n, c in covered.items() if c < 1],
                                 "sharded": sorted(par.shards)}
    out[rank] = res
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_every_layout_initialises_the_single_process_weights(world):
    res = spawn_ranks(_init_layouts, world)
    for rank, layouts in res.items():
        for layout, r in layouts.items():
            assert r["bad"] == [], (rank, layout, r["bad"])
            assert r["uncovered"] == [], (rank, layout, r["uncovered"])
            if layout not in ("parallel.zero1=true", "parallel.cp=2"):  # these shard no weight
                assert r["sharded"], (rank, layout)  # the layout really split something


# --------------------------------------------------------------------------- 456B on meta
BIG = ["model=minimax_text_01", "parallel.tp=2", "parallel.ep=2", "data.seq_len=8192",
       "train.global_batch=2", "train.micro_batch=null", "parallel.timeout_s=120"]
TP_SPLIT = ("qkv_proj.weight", "gate_proj.weight", "out_proj.weight", "attn.norm.weight",
            "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "embed.weight",
            "lm_head.weight")


def _expected_local_numel(cfg, tp, ep) -> tuple[int, int]:
    """(this rank's parameter count, the full model's) from the config alone: experts over EP,
    the TP plan's matrices over TP (8 KV heads split over tp=2), the rest replicated."""
    from mmtrain.model import build_meta_model

    full = build_meta_model(cfg.model)  # meta: nothing allocated
    local = total = 0
    for name, p in full.named_parameters():
        n = p.numel()
        total += n
        if ".moe.experts." in name:
            local += n // ep
        elif name.endswith(TP_SPLIT):
            local += n // tp
        else:
            local += n
    return local, total


def _big_meta(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    from mmtrain.model import MiniMaxModel
    from mmtrain.parallel.apply import GROUPS_USED, check_layout, shard_model
    from mmtrain.parallel.groups import create_process_groups

    cfg = load_config(BIG)
    topo = check_layout(cfg, world)
    groups = create_process_groups(topo, timeout=datetime.timedelta(seconds=120),
                                   names=GROUPS_USED)
    with torch.device("meta"):  # what build_parallel does before parallelize
        model = MiniMaxModel(cfg.model)
    plan = shard_model(model, topo, groups, cfg.parallel, rank)
    params = list(model.named_parameters())
    local_bytes = sum(p.numel() * p.element_size() for _, p in params)
    pieces_numel = sum(sum(math.prod(pc.sizes) for pc in plan.shards[n][1])
                       if n in plan.shards else p.numel() for n, p in params)
    out[rank] = {"all_meta": all(p.is_meta for _, p in params),
                 "local_bytes": local_bytes, "pieces_numel": pieces_numel,
                 "n_local": sum(p.numel() for _, p in params),
                 "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                 "w13": tuple(model.layers[0].moe.experts.w13.shape),
                 "qkv": tuple(model.layers[0].attn.qkv_proj.weight.shape)}
    dist.destroy_process_group()


def test_456b_model_shards_on_meta_and_its_twin_trains_one_step(tmp_path):
    cfg = load_config(BIG)
    want_local, total = _expected_local_numel(cfg, tp=2, ep=2)
    assert total > 450e9  # MiniMax-Text-01: 456B parameters, 1.8 TB in fp32
    res = spawn_ranks(_big_meta, 4)
    m = cfg.model
    for rank, r in res.items():
        assert r["all_meta"], rank  # nothing materialised by the build and the module swaps
        assert r["n_local"] == want_local, (rank, r["n_local"], want_local)
        assert r["pieces_numel"] == r["n_local"]  # the pieces describe exactly what is held
        assert r["local_bytes"] == 4 * want_local
        assert r["local_bytes"] < 0.55 * 4 * total  # tp=2 × ep=2: about half of the model
        # a full expert tensor of one layer alone is 14.5 GB: no rank ever held one
        assert r["maxrss_kb"] < 4 * 2 ** 20, (rank, r["maxrss_kb"])
        assert r["w13"] == (m.num_experts // 2, 2 * m.ffn_hidden_size, m.hidden_size)
        assert r["qkv"] == (3 * m.num_heads * m.head_dim // 2, m.hidden_size)
    # the scaled-down twin: the same layout, the same code path, one step = one process's loss
    from tests.dist.test_parallel_parity import BASE, _torchrun
    from mmtrain.train.loop import train

    layout = ["parallel.tp=2", "parallel.ep=2", "train.max_steps=1"]
    ref = tmp_path / "one"
    train(load_config(BASE + ["train.max_steps=1", f"run.dir={ref}"]))
    run = tmp_path / "tp2ep2"
    _torchrun(4, BASE, layout, run)
    got, want = metrics_records(run)[0]["loss"], metrics_records(ref)[0]["loss"]
    assert abs(got - want) <= 1e-6 * abs(want), (got, want)
