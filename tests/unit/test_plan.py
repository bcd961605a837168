"""``mmtrain plan``: parameter and optimizer bytes per GPU against hand computations, the layout
search's validity, memory that cannot fit, the CLI's JSON and its one-line errors.

The hand computations below are written from SPEC §1 (the layer shapes of MiniMax-Text-01) and
from what ``parallel/apply.py`` and ``parallel/data.py`` shard, not from ``mmtrain/plan/``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mmtrain.config import ConfigError
from mmtrain.parallel.topology import Topology
from mmtrain.plan import ClusterConfig, Layout, PlanConfig, Planner, Stage, build_inventory
from mmtrain.plan_cli import parse_request, plan
from mmtrain.recipe import load_config
from tests.conftest import subprocess_env

GIB = 2 ** 30

# MiniMax-Text-01 (SPEC §1), written out by hand.
D, H, K, G, V, E, F, L = 6144, 64, 128, 8, 200064, 32, 9216, 80
N_SOFT = L // 8  # softmax at 7, 15, ..., 79
N_LIGHT = L - N_SOFT
LIGHTNING_ATTN = D * 3 * H * K + D * H * K + H * K * D + H * K  # qkv, gate, out, norm
SOFTMAX_ATTN = D * H * K + 2 * D * G * K + H * K * D  # q, k and v, o
EXPERT = 3 * D * F
NORMS = 2 * D  # input and post norm of a layer
ROUTER = D * E
EMBED = V * D  # each of embedding and LM head


def test_hand_constants_match_spec():
    assert LIGHTNING_ATTN == 251_666_432  # SPEC: 251.67 M
    assert SOFTMAX_ATTN == 113_246_208  # SPEC: 113.25 M
    assert EXPERT == 169_869_312  # SPEC: 169.87 M
    total = (2 * EMBED + D + N_LIGHT * LIGHTNING_ATTN + N_SOFT * SOFTMAX_ATTN
             + L * (NORMS + ROUTER + E * EXPERT))
    assert round(total / 1e9, 2) == 456.09


@pytest.fixture(scope="module")
def minimax():
    cfg = load_config(["model=minimax_text_01", "data.seq_len=8192"])
    return cfg, build_inventory(cfg.model, 8192)


def _planner(inv, gpus, seq=8192, rows=64, gpu_mem=80.0, **opts):
    cl = ClusterConfig(gpu="h800", gpus=gpus, memory_gib=gpu_mem)
    return Planner(inv, Stage(seq, rows), cl, PlanConfig(**opts))


def test_inventory_total_and_flops_match_account(minimax):
    cfg, inv = minimax
    from mmtrain.model import account

    acct = account(cfg.model, 8192)
    assert inv.total == acct.params_total
    pl = _planner(inv, 64)
    assert pl.flops_check() == pytest.approx(acct.flops_per_token, rel=1e-12)


def test_tp8_ep8_on_64_gpus_params_and_optimizer_bytes_by_hand(minimax):
    """TP=8, EP=8 (ETP=1) on 64 GPUs: dense weights / TP, 32 / 8 = 4 experts per rank, ZeRO-1
    shards: TP-split weights over DP = 64 / 8 = 8, replicated ones over TP·DP = 64, experts over
    EDP = 64 / (EP·ETP) = 8."""
    _, inv = minimax
    pl = _planner(inv, 64)
    lay = Layout(tp=8, cp=1, pp=1, dp=8, ep=8, etp=1, edp=8, micro_batch=1, recompute="none",
                 zero1=True)
    assert not pl.problems(lay)
    split = (N_LIGHT * LIGHTNING_ATTN + N_SOFT * SOFTMAX_ATTN + 2 * EMBED) / 8  # KV heads 8 / 8
    replicated = L * (NORMS + ROUTER) + D  # + final norm
    experts = L * (E // 8) * EXPERT
    local = split + replicated + experts
    mem = pl.memory(lay)
    assert mem["params"] == pytest.approx(local, rel=1e-12)
    assert mem["weights"] == pytest.approx(4 * local, rel=1e-12)  # fp32 parameters
    assert mem["grads"] == pytest.approx(4 * local, rel=1e-12)  # fp32 .grad
    shard = split / 8 + replicated / 64 + experts / 8
    assert mem["optimizer_master"] == pytest.approx(4 * shard, rel=1e-12)
    assert mem["optimizer_moments"] == pytest.approx(8 * shard, rel=1e-12)
    assert mem["optimizer_wd_mask"] == pytest.approx(4 * shard, rel=1e-12)
    assert mem["comm_buffers"]["grad_buckets"] == pytest.approx(4 * local, rel=1e-12)
    # about 57.0 B parameters on each GPU (54.4 B of experts): no 80 GB GPU holds that
    assert 56.5e9 < local < 57.5e9 and not mem["fits"]


def test_bf16_params_tp8_ep32_pp4_by_hand(minimax):
    """bf16 parameters (issue 9 scope 2): 2-byte weights, fp32 main grads, no autocast copies;
    PP=4 puts layers 0-19 and the embedding on stage 0, layers 60-79, final norm and LM head on
    stage 3. KV heads replicate when TP exceeds them (tp=16 > 8 KV heads)."""
    _, inv = minimax
    pl = _planner(inv, 512, param_dtype="bf16")
    lay = Layout(tp=16, cp=1, pp=4, dp=8, ep=32, etp=1, edp=4, micro_batch=1, recompute="full",
                 zero1=True)
    assert not pl.problems(lay)
    n = L // 4  # 20 layers a stage: softmax at 7, 15 on stage 0; at 63, 71, 79 on stage 3
    kv = 2 * D * G * K

    def stage(n_light, n_soft):
        split = n_light * LIGHTNING_ATTN / 16 + n_soft * (SOFTMAX_ATTN - kv) / 16
        replicated = n * (NORMS + ROUTER) + n_soft * kv  # k, v replicated at tp 16 > 8 KV heads
        return split + replicated + n * EXPERT  # 32 experts / ep 32: one per layer

    p0 = pl.local_params(lay, 0)
    p3 = pl.local_params(lay, 3)
    assert p0["total"] == pytest.approx(stage(18, 2) + EMBED / 16, rel=1e-12)
    assert p3["total"] == pytest.approx(stage(17, 3) + EMBED / 16 + D, rel=1e-12)
    mem = pl.memory(lay)
    local = p3["total"] if mem["stage"] == 3 else p0["total"]
    assert mem["weights"] == pytest.approx(2 * local, rel=1e-12)
    assert mem["bf16_weight_copies"] == 0
    assert mem["comm_buffers"]["grad_buckets"] == 0  # the fp32 main grads are the buckets
    assert mem["grads"] == pytest.approx(4 * local, rel=1e-12)


def test_activations_shrink_with_recompute_and_grow_with_sequence(minimax):
    _, inv = minimax
    pl = _planner(inv, 64)
    base = dict(tp=8, cp=1, pp=1, dp=8, ep=8, etp=1, edp=8, micro_batch=1, zero1=True)
    acts = [pl.memory(Layout(recompute=m, **base))["activations_total"]
            for m in ("none", "selective", "full")]
    assert acts[0] > acts[1] > acts[2]
    # full recomputation keeps each layer's fp32 input on the sequence shard: 4·D·T/tp bytes
    full = pl.layer_activations(Layout(recompute="full", **base), "lightning", "full")
    assert full == {"attn": 4 * D * 8192 / 8, "moe": 0.0}
    longer = _planner(inv, 64, seq=16384, rows=32)
    assert longer.memory(Layout(recompute="none", **base))["activations_total"] > acts[0]


def test_pipeline_bubble(minimax):
    _, inv = minimax
    pl = _planner(inv, 512, rows=64)
    lay = Layout(tp=8, cp=1, pp=4, dp=16, ep=32, etp=1, edp=4, micro_batch=1, recompute="full",
                 zero1=True)
    t = pl.step_time(lay)
    m = 64 // 16
    assert t["micro_batches"] == m
    assert t["bubble"] == pytest.approx((4 - 1) / (m + 4 - 1))


def _independently_valid(lay, gpus, seq, rows, m):
    """Validity written out from parallel/apply.py's check_layout and the topology rules."""
    return (lay.tp * lay.cp * lay.pp * lay.dp == gpus
            and lay.pp * lay.ep * lay.etp * lay.edp == gpus
            and m.num_heads % lay.tp == 0
            and (m.num_kv_heads % lay.tp == 0 or lay.tp % m.num_kv_heads == 0)
            and m.vocab_size % lay.tp == 0 and m.num_experts % lay.ep == 0
            and m.ffn_hidden_size % lay.etp == 0 and m.num_layers % lay.pp == 0
            and seq % lay.cp == 0 and (lay.micro_batch * seq // lay.cp) % lay.tp == 0
            and rows % (lay.dp * lay.micro_batch) == 0)


def test_search_returns_only_valid_layouts():
    cfg = load_config(["model=small", "data.seq_len=4096"])
    inv = build_inventory(cfg.model, 4096)
    cl = ClusterConfig(gpu="h100", gpus=16, memory_gib=79.6, nvlink_gbs=900)
    pl = Planner(inv, Stage(4096, 32), cl, PlanConfig(top=50))
    cands = list(pl.candidates({}, None))
    assert cands
    assert all(_independently_valid(c, 16, 4096, 32, cfg.model) for c in cands)
    res = pl.search({}, None)
    assert res["results"] and res["fitting"] > 0
    for r in res["results"]:
        lay = r["layout"]
        assert _independently_valid(lay, 16, 4096, 32, cfg.model)
        topo = Topology(16, tp=lay.tp, cp=lay.cp, pp=lay.pp, ep=lay.ep, etp=lay.etp)
        assert (topo.dp, topo.edp) == (lay.dp, lay.edp)
        assert r["memory"]["fits"]
    times = [r["time"]["step_s"] for r in res["results"]]
    assert times == sorted(times)
    # pins hold: only tp=2 layouts when tp is pinned
    pinned = pl.search({"tp": 2}, None)["results"]
    assert pinned and all(r["layout"].tp == 2 for r in pinned)


def test_456b_does_not_fit_on_one_node(minimax):
    _, inv = minimax
    pl = _planner(inv, 8, rows=8)
    res = pl.search({}, None)
    assert res["fitting"] == 0 and res["results"]
    best = res["results"][0]["memory"]
    assert not best["fits"] and best["peak"] > best["capacity"]


# ------------------------------------------------------------------------------------ the CLI
def run_plan(*args):
    return subprocess.run([sys.executable, "-m", "mmtrain", "plan", *args], capture_output=True,
                          text=True, env=subprocess_env(), timeout=600)


def test_cli_json_minimax_tp8_ep8_64_gpus():
    out = run_plan("model=minimax_text_01", "data.seq_len=8192", "train.global_batch=64",
                   "train.micro_batch=1", "cluster=h800", "cluster.gpus=64", "parallel.tp=8",
                   "parallel.ep=8", "parallel.zero1=true", "plan.search=false", "--json")
    assert out.returncode == 1, out.stderr  # it runs, and says it does not fit
    doc = json.loads(out.stdout)
    assert doc["fits"] is False and len(doc["results"]) == 1
    r = doc["results"][0]
    assert r["layout"]["dp"] == 8 and r["layout"]["edp"] == 8
    split = (N_LIGHT * LIGHTNING_ATTN + N_SOFT * SOFTMAX_ATTN + 2 * EMBED) / 8
    replicated = L * (NORMS + ROUTER) + D
    experts = L * 4 * EXPERT
    shard = split / 8 + replicated / 64 + experts / 8
    m = r["memory_gib"]
    assert m["params"] == pytest.approx(split + replicated + experts, abs=1)
    assert m["weights"] == pytest.approx(4 * (split + replicated + experts) / GIB, abs=1e-4)
    assert (m["optimizer_master"] + m["optimizer_moments"]
            == pytest.approx(12 * shard / GIB, abs=2e-4))


def test_cli_text_reports_a_fit():
    out = run_plan("model=small", "data.seq_len=2048", "train.global_batch=16", "cluster=h200",
                   "cluster.gpus=8", "plan.top=3")
    assert out.returncode == 0, out.stderr
    assert "fits" in out.stdout and "step" in out.stdout and "MFU" in out.stdout


@pytest.mark.parametrize("override,field", [
    ("cluster.gpu=a100", "cluster.gpu"),
    ("cluster.gpus=0", "cluster.gpus"),
    ("plan.recompute=some", "plan.recompute"),
    ("plan.bogus=1", "plan.bogus"),
    ("plan.global_batch_tokens=1000", "plan.global_batch_tokens"),
    ("train.bogus=1", "train.bogus"),
    ("parallel.tp=3", "parallel.tp"),  # no valid layout of 8 GPUs with tp pinned to 3
])
def test_cli_bad_input_one_line_exit_2(override, field):
    out = run_plan("model=tiny", override)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: {field}:"), lines[0]


def test_parse_request_pins_only_what_was_given():
    req = parse_request(["model=tiny", "parallel.tp=2", "cluster.gpus=16", "cluster=h20"])
    assert req.pins == {"tp": 2}
    assert req.cluster.gpu == "h20" and req.cluster.gpus == 16
    assert req.cluster.bf16_tflops == 148  # SPEC §9
    with pytest.raises(ConfigError, match="plan.param_dtype"):
        parse_request(["plan.param_dtype=fp8"])
    req = parse_request(["parallel=tp2", "plan.search=false", "cluster.gpus=4"])
    pl, res = plan(req)
    assert res["results"][0]["layout"].tp == 2


def test_one_layout_plan_follows_the_recipe_memory_switches():
    """With plan.search=false the plan models what the recipe trains: its train.recompute, its
    train.fused_ce (the chunked loss has a smaller transient than full logits) and its CP
    partition; explicit plan.* settings still win."""
    base = ["model=tiny", "plan.search=false", "cluster.gpus=2", "parallel.cp=2",
            "data.seq_len=8192"]
    req = parse_request(base + ["train.recompute=full", "parallel.cp_balance=contiguous"])
    assert req.opts.recompute == "full" and req.opts.cp_balanced is False
    assert req.opts.fused_ce is True  # train.fused_ce's default
    assert plan(req)[1]["results"][0]["layout"].recompute == "full"
    full_logits = parse_request(base + ["train.fused_ce=false"])
    assert full_logits.opts.fused_ce is False and full_logits.opts.cp_balanced is True
    pinned = parse_request(base + ["train.recompute=full", "plan.recompute=none",
                                   "plan.fused_ce=false"])
    assert pinned.opts.recompute == "none" and pinned.opts.fused_ce is False
    def loss_transient(r):  # the head's transient bytes (loss and logits) of the planned layout
        pl, res = plan(r)
        return pl.head_activations(res["results"][0]["layout"])[1]

    assert loss_transient(parse_request(base)) < loss_transient(full_logits)


def test_lightning_and_moe_activations_from_the_saved_tensors():
    """One lightning layer of the 1 B benchmark config at tp 1 (mmtrain today, no recompute),
    summed from the list of tensors autograd keeps (docs/plan.md), bytes per micro-batch."""
    cfg = load_config(["model.vocab_size=32000", "model.hidden_size=2048", "model.num_layers=12",
                       "model.num_heads=16", "model.head_dim=128", "model.num_kv_heads=4",
                       "model.softmax_every=4", "model.num_experts=4", "model.top_k=2",
                       "model.ffn_hidden_size=5632", "data.seq_len=4096"])
    inv = build_inventory(cfg.model, 4096)
    pl = Planner(inv, Stage(4096, 8), ClusterConfig(gpus=1), PlanConfig())
    lay = Layout(1, 1, 1, 1, 1, 1, 1, 1, "none", False)
    d, w, f, k, e, t = 2048, 16 * 128, 5632, 2, 4, 4096
    attn = [4 * d,          # fp32 residual saved by the input norm
            2 * 2 * d,      # bf16 casts of the norm output for qkv_proj and gate_proj
            2 * 3 * w,      # qkv before SiLU
            2 * 3 * w,      # contiguous q, k, v saved by the kernel
            2 * w,          # kernel output in bf16 (output-norm input)
            2 * w,          # normed output in bf16 (gate-multiply input)
            2 * w,          # sigmoid(gate)
            2 * w]          # out_proj input
    moe = [4 * d,           # fp32 residual saved by the post norm
           4 * d,           # fp32 router input
           2 * k * d,       # dispatched rows, bf16
           2 * k * 2 * f,   # SwiGLU input h (2F wide), bf16
           4 * k * d,       # expert outputs in fp32 for the combine
           4 * e + 4 * e + 4 * k + 8 * k + 4 * k + 8 * k]  # fp32 logits and probs; top-k
    # values, int64 indices, renormalised weights, int64 slot order
    got = pl.layer_activations(lay, "lightning", "none")
    assert got["attn"] == sum(attn) * t
    assert got["moe"] == sum(moe) * t


def test_first_pipeline_stage_holds_pp_micro_batches(minimax):
    _, inv = minimax
    pl = _planner(inv, 512, rows=64)
    lay = Layout(tp=8, cp=1, pp=4, dp=16, ep=32, etp=1, edp=4, micro_batch=1, recompute="full",
                 zero1=True)  # 4 micro-batches a step
    assert [pl._memory_stage(lay, s)["inflight_micro_batches"] for s in range(4)] == [4, 3, 2, 1]


@pytest.mark.parametrize("gpu,tflops,hbm,nvlink", [("h800", 989, 3.35, 400), ("h20", 148, 4.0, 900),
                                                   ("h100", 989, 3.35, 900),
                                                   ("h200", 989, 4.8, 900)])
def test_cluster_recipes_carry_spec_9(gpu, tflops, hbm, nvlink):
    from mmtrain.plan_cli import load_cluster

    cl = load_cluster(gpu, {"gpus": 16})
    assert (cl.gpu, cl.gpus, cl.bf16_tflops, cl.hbm_tbs, cl.nvlink_gbs) == (gpu, 16, tflops, hbm,
                                                                           nvlink)
    assert cl.ib_gbs == 50.0  # 400 Gb/s per GPU
