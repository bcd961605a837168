"""bf16 parameters with fp32 masters and fp32 gradient accumulation (``train.param_dtype``), in
one process on CPU (``train.dtype=bf16`` runs the model under bf16 autocast there).

What is proven here: the config switch and its errors; that the model keeps bf16 activations and
residual stream with fp32 routing, norm statistics and loss; that the optimizer's fp32 masters
carry updates below bf16's resolution (which bf16-only updates lose) and step as torch's AdamW
does; that micro-batches sum in fp32 (exactly, where bf16 accumulation would round, and to two
bf16 roundings of the one-micro-batch gradient on the model); a short training run against the
fp32 run, whose checkpoint and HF export hold the masters; a bit-identical resume; checkpoints
loading across parameter dtypes; a non-finite gradient skipping a bf16 step. Distributed parity
and resharding: ``tests/dist/test_bf16_parity.py``.
"""

import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmtrain.config import ConfigError, TrainConfig
from mmtrain.data import build_tokenizer
from mmtrain.data.build import build_loader
from mmtrain.model import MiniMaxModel
from mmtrain.model import moe as moe_mod
from mmtrain.model.layers import RMSNorm
from mmtrain.model.moe import MoE
from mmtrain.model.transformer import DecoderLayer
from mmtrain.parallel.apply import check_layout
from mmtrain.parallel.data import GradSync, ParamInfo, ZeroAdamW
from mmtrain.recipe import load_config
from mmtrain.train import checkpoint as ckpt
from mmtrain.train.distributed import build_optimizer, build_parallel, load_checkpoint
from mmtrain.train.loop import train

SMALL = ["model.hidden_size=32", "model.ffn_hidden_size=32", "model.num_layers=2",
         "model.softmax_every=2", "model.num_heads=2", "model.num_kv_heads=1",
         "data.seq_len=32", "data.corpus_max_bytes=60000", "train.global_batch=4",
         "train.warmup_steps=2", "train.schedule=constant", "train.aux_loss_coef=0.05",
         "run.progress=false"]
BF16 = ["train.dtype=bf16"]  # param_dtype auto -> bf16
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------- config
def test_param_dtype_resolves_and_contradictions_name_the_field():
    assert TrainConfig(dtype="auto").bf16_params("cuda") is True  # the GPU default
    assert TrainConfig(dtype="auto").bf16_params("cpu") is False
    assert TrainConfig(dtype="bf16").bf16_params("cpu") is True
    assert TrainConfig(dtype="bf16", param_dtype="fp32").bf16_params("cuda") is False
    assert TrainConfig(dtype="fp32").bf16_params("cuda") is False
    assert load_config(SMALL).train.param_dtype == "auto"
    with pytest.raises(ConfigError, match=r"^train\.param_dtype: bf16 parameters need bf16 "
                                          r"compute, but train\.dtype=fp32; set train\.dtype="):
        load_config(SMALL + ["train.dtype=fp32", "train.param_dtype=bf16"])
    with pytest.raises(ConfigError, match=r"^train\.param_dtype: unknown 'fp16'; use auto, "
                                          r"fp32 or bf16"):
        load_config(SMALL + ["train.param_dtype=fp16"])
    # auto compute is fp32 on a CPU: explicit bf16 parameters there are refused, naming the fix
    cfg = load_config(SMALL + ["train.param_dtype=bf16"])
    with pytest.raises(ConfigError, match=r"^train\.param_dtype: .*train\.dtype=auto resolves "
                                          r"to fp32 on cpu; set train\.dtype=bf16"):
        cfg.train.bf16_params("cpu")


# ------------------------------------------------------------------------------ model dtypes
def _bf16_model(**kw):
    cfg = load_config(SMALL + [f"model.{k}={v}" for k, v in kw.items()]).model
    model = MiniMaxModel(cfg)
    model.reset_parameters(seed=0)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_residual_stream_is_bf16_and_routing_norms_loss_are_fp32(monkeypatch, recompute):
    model = _bf16_model(capacity_factor=1.0)  # drops exercised: masked slots in the combine
    model.set_recompute(recompute)
    seen = []

    def record(kind):
        def hook(module, args, out):
            seen.append((kind, out[0].dtype if isinstance(out, tuple) else out.dtype,
                         out[1].dtype if isinstance(out, tuple) else None))
        return hook

    for m in model.modules():
        if isinstance(m, (DecoderLayer, MoE, RMSNorm)):
            m.register_forward_hook(record(type(m).__name__))
    model.embed.register_forward_hook(record("embed"))
    routed = []
    real_route = moe_mod.route

    def route(logits, *a, **k):
        r = real_route(logits, *a, **k)
        routed.append((logits.dtype, r.probs_TE.dtype, r.weight_TK.dtype))
        return r

    monkeypatch.setattr(moe_mod, "route", route)
    tokens = torch.randint(0, 258, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, return_hidden=True)
        from mmtrain.model.fused_ce import linear_cross_entropy

        ce = linear_cross_entropy(out.hidden.reshape(-1, 32), model.lm_head.weight,
                                  tokens.reshape(-1), 16)
    (ce.mean() + out.aux_loss).backward()
    kinds = {k for k, _, _ in seen}
    assert {"embed", "DecoderLayer", "MoE", "RMSNorm"} <= kinds
    for kind, dt, second in seen:
        assert dt == torch.bfloat16, (kind, dt)  # residual stream, norms, MoE combine, attention
        if kind in ("DecoderLayer", "MoE"):
            assert second == torch.float32, kind  # the aux loss term
    assert routed and all(r == (torch.float32,) * 3 for r in routed)
    assert out.hidden.dtype == torch.bfloat16
    assert ce.dtype == torch.float32 and out.aux_loss.dtype == torch.float32
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_rms_norm_of_bf16_keeps_fp32_statistics():
    """RMSNorm of a bf16 input equals the fp32 computation, rounded (bf16 statistics would be
    off by several units in the last place: large offset, wide rows)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 4096, generator=g) * 3 + 20).to(torch.bfloat16)
    w = (torch.rand(4096, generator=g) + 0.5).to(torch.bfloat16)
    norm = RMSNorm(4096, 1e-5)
    norm.weight.data = w
    y = norm(x).detach()
    xf = x.double()
    ref = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    ulp = torch.finfo(torch.bfloat16).eps * ref.abs().clamp_min(1e-3)  # 2^-7 relative
    assert y.dtype == torch.bfloat16
    assert float(((y.double() - ref).abs() / ulp).max()) <= 1.0
    xb = x  # the statistics in bf16 instead: visibly worse, so the bound above can fail
    bad = xb * torch.rsqrt(xb.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    assert float(((bad.double() - ref).abs() / ulp).max()) > 1.0


# ---------------------------------------------------------------------------- masters (toy)
def _toy_step(sync, params, grads_per_micro):
    """One step: a backward per micro-batch giving each param its listed gradient."""
    for i, gs in enumerate(grads_per_micro):
        sync.prepare_backward(last_micro_batch=i == len(grads_per_micro) - 1)
        loss = sum((p.float() * g).sum() for p, g in zip(params, gs) if g is not None)
        loss.backward()
        assert all(p.grad is None for p in params)  # freed into the fp32 bucket at once
    sync.finish()


def test_masters_carry_updates_below_bf16_resolution():
    """lr 1e-3 on weights of 1.0: every AdamW update (about lr) is below half a bf16 ulp at 1.0
    (2^-8 = 3.9e-3), so bf16-only updates round back to 1.0 forever; the fp32 masters move by
    lr per step and the bf16 weights follow once the masters have moved past the midpoint."""
    w = nn.Parameter(torch.ones(64))
    sync = GradSync([ParamInfo("w", w, "dp", (64,), decay=False)], {}, 1.0, zero1=False,
                    overlap=False, device=CPU, main_grads=True)
    opt = ZeroAdamW(sync, 1e-3, (0.9, 0.95), 1e-8, 0.0, param_dtype=torch.bfloat16)
    assert w.dtype == torch.bfloat16 and opt.shards[0]["master"].dtype == torch.float32
    g = torch.ones(64)
    for step in range(1, 11):
        _toy_step(sync, [w], [[g]])
        opt.step()
        opt.zero_grad()
        master = opt.shards[0]["master"][:64]
        assert torch.allclose(master, torch.full((64,), 1 - step * 1e-3), atol=1e-6)
        assert torch.equal(w.detach(), master.to(torch.bfloat16))  # the weights: masters, rounded
        if step == 1:
            assert torch.equal(w.detach().float(), torch.ones(64))  # not past the midpoint yet
    assert float(w.detach().float().max()) < 1.0  # the bf16 weights moved (to 0.9922)

    plain = nn.Parameter(torch.ones(64, dtype=torch.bfloat16))  # the same updates, bf16 only
    bf16_only = torch.optim.AdamW([plain], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(10):
        plain.grad = g.to(torch.bfloat16)
        bf16_only.step()
    assert torch.equal(plain.detach().float(), torch.ones(64))  # never moved


def test_whole_bucket_adamw_is_torch_adamw():
    """Without ZeRO-1 the masters are stepped over whole buckets (weight decay by runs of
    matrices, no mask): the same arithmetic as torch's AdamW with decay on matrices only."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    twin = [p.detach().clone().requires_grad_() for p in net.parameters()]
    infos = [ParamInfo(n, p, "dp", tuple(p.shape), decay=p.dim() >= 2)
             for n, p in net.named_parameters()]
    sync = GradSync(infos, {}, 0.0002, zero1=False, overlap=False, device=CPU, main_grads=True)
    assert len(sync.buckets) >= 2
    opt = ZeroAdamW(sync, 1e-2, (0.9, 0.95), 1e-8, 0.1)  # fp32 parameters: not converted
    ref = torch.optim.AdamW([{"params": [t for t in twin if t.dim() >= 2], "weight_decay": 0.1},
                             {"params": [t for t in twin if t.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    for step in range(4):
        x = torch.randn(5, 8)
        for i, half in enumerate((x[:2], x[2:])):  # two micro-batches
            sync.prepare_backward(last_micro_batch=i == 1)
            net(half).pow(2).sum().backward()
        sync.finish()
        opt.step()
        opt.zero_grad()
        y = x
        for t, mod in zip((twin[:2], twin[2:4], twin[4:]), net):
            y = (F.linear(y, *t) if isinstance(mod, nn.Linear)
                 else F.layer_norm(y, (16,), *t))
        y.pow(2).sum().backward()
        ref.step()
        ref.zero_grad()
    for p, t in zip(net.parameters(), twin):
        assert p.dtype == torch.float32
        assert torch.allclose(p, t, rtol=0, atol=1e-6), (p - t).abs().max()


def test_micro_batches_accumulate_in_fp32_buckets():
    """Micro-batch gradients exact in bf16 whose sum is not: 1 + 3·2^-9 is kept exactly by the
    fp32 bucket (bf16 accumulation rounds each partial sum back to 1.0); the next step's first
    micro-batch overwrites the bucket, and a parameter without a gradient in a step reads 0."""
    a = nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    b = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    sync = GradSync([ParamInfo("a", a, "dp", (8,)), ParamInfo("b", b, "dp", (4,))], {}, 1.0,
                    zero1=False, overlap=False, device=CPU, main_grads=True)
    bucket = sync.buckets[0]
    view = {info.name: v for info, v in bucket.views(bucket.grad)}
    one, tiny = torch.ones(8), torch.full((8,), 2.0 ** -9)
    _toy_step(sync, [a, b], [[one, torch.ones(4)], [tiny, None], [tiny, None], [tiny, None]])
    assert bucket.grad.dtype == torch.float32
    assert torch.equal(view["a"], torch.full((8,), 1 + 3 * 2.0 ** -9))
    assert torch.equal(view["b"], torch.ones(4))
    acc = torch.zeros(8, dtype=torch.bfloat16)  # what bf16 accumulation would hold
    for g in (one, tiny, tiny, tiny):
        acc += g.to(torch.bfloat16)
    assert torch.equal(acc.float(), torch.ones(8))
    # next step: b gets no gradient, a a fresh one (last step's values must not leak in)
    _toy_step(sync, [a, b], [[tiny, None], [tiny, None]])
    assert torch.equal(view["a"], torch.full((8,), 2 * 2.0 ** -9))
    assert torch.equal(view["b"], torch.zeros(4))


# ------------------------------------------------------------------- model-level accumulation
def _bucket_grads(split: int) -> dict:
    """One process, bf16 parameters: the reduced fp32 gradients of the same 4 rows as
    micro-batches of ``split`` rows (LM loss only: the aux term's running counts depend on the
    grouping by design, ``mmtrain.model.moe``)."""
    cfg = load_config(SMALL + BF16 + ["train.micro_batch=4", "train.aux_loss_coef=0"])
    torch.manual_seed(cfg.train.seed)
    model, par = build_parallel(cfg, check_layout(cfg, 1), CPU)
    build_optimizer(par, cfg.train)  # params -> bf16 (masters taken first)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    (batch,) = build_loader(cfg, build_tokenizer(cfg.data), 0, 1, announce=False).next_step()
    n = float(batch.loss_mask.sum())
    rows = [slice(i, i + split) for i in range(0, 4, split)]
    for i, r in enumerate(rows):
        par.prepare_backward(last_micro_batch=i == len(rows) - 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch.tokens[r], return_hidden=True)
            ce = par.linear_ce(out.hidden, model.lm_head.weight, batch.labels[r], 4096)
        ((ce * batch.loss_mask[r].reshape(-1)).sum() / n).backward()
        assert all(p.grad is None for p in model.parameters())
    par.reduce_grads()
    assert all(b.grad.dtype == torch.float32 for b in par.sync.buckets)
    return {info.name: v.clone() for b in par.sync.buckets for info, v in b.views(b.grad)}


def test_four_micro_batches_give_the_one_micro_batch_gradient():
    one, four = _bucket_grads(4), _bucket_grads(1)
    assert set(one) == set(four) and len(one) > 10
    num = sum(float((four[k] - one[k]).norm()) ** 2 for k in one) ** 0.5
    den = sum(float(one[k].norm()) ** 2 for k in one) ** 0.5
    # each micro-batch's gradient is rounded to bf16 once (2^-9 relative) before the fp32 sum,
    # the single micro-batch's once: two roundings at most
    assert num / den <= 2 * 2.0 ** -9, num / den


# ------------------------------------------------------------------------------- training run
def test_bf16_run_tracks_the_fp32_run_with_fp32_masters(tmp_path):
    ovr = SMALL + ["train.micro_batch=2", "train.max_steps=6"]
    ref = train(load_config(ovr + ["train.dtype=fp32", f"run.dir={tmp_path / 'fp32'}"]))
    got = train(load_config(ovr + BF16 + [f"run.dir={tmp_path / 'bf16'}"]))
    assert all(p.dtype == torch.bfloat16 for p in got.model.parameters())
    assert isinstance(got.optimizer, ZeroAdamW)
    assert all(st["master"].dtype == torch.float32 for st in got.optimizer.shards)
    # the checkpoint holds the fp32 masters; the bf16 weights are exactly their rounding
    saved = ckpt.checkpoint_root(tmp_path / "bf16") / "step_00000006"
    masters = {}
    for info in got.parallel.infos:
        masters[info.name] = torch.empty(info.param.shape, dtype=torch.float32)
    ckpt.dcp_load({f"model.{k}": v for k, v in masters.items()}, saved)
    moved = 0
    for info in got.parallel.infos:
        m = masters[info.name]
        assert torch.equal(info.param.detach(), m.to(torch.bfloat16)), info.name
        moved += int((m != m.to(torch.bfloat16).float()).sum())
    assert moved > 0  # the masters hold more than the bf16 weights
    # HF export reads the checkpoint: it exports the fp32 masters (round trip is bitwise)
    from mmtrain.hf import export_hf, from_pretrained

    export_hf(tmp_path / "bf16", tmp_path / "hf", rope="longrope", progress=False,
              log=lambda m: None)
    back = from_pretrained(tmp_path / "hf").model.state_dict()
    for name, m in masters.items():
        assert back[name].dtype == torch.float32 and torch.equal(back[name], m), name
    a, b = [l for _, l in ref.losses], [l for _, l in got.losses]
    assert len(a) == len(b) == 6 and b[-1] < b[0]
    for x, y in zip(a, b):
        assert abs(x - y) <= 5e-3 * abs(x), (a, b)  # bf16 compute: ~1e-3 apart here


def test_bf16_resume_is_bit_identical(tmp_path):
    ovr = SMALL + BF16 + ["train.micro_batch=2", "train.ckpt_every=2", "train.keep_last=3",
                          "train.max_steps=4"]
    full = train(load_config(ovr + [f"run.dir={tmp_path / 'a'}"]))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(ckpt.checkpoint_root(tmp_path / "b") / "step_00000004")
    again = train(load_config(ovr + [f"run.dir={tmp_path / 'b'}"]))
    assert again.losses == full.losses[2:]  # bitwise-equal floats
    for x, y in zip(full.optimizer.shards, again.optimizer.shards):
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(x[key], y[key]), key
    for p, q in zip(full.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)


def test_checkpoints_hold_fp32_weights_and_load_across_param_dtypes(tmp_path):
    """A checkpoint holds fp32 weights whatever the parameters' dtype (a bf16 run's are its
    masters), so fp32 and bf16 runs load each other's: bf16 parameters take the saved fp32
    weights as their masters exactly (and their rounding as the weights), fp32 ones as is."""
    ovr = SMALL + ["train.micro_batch=2", "train.max_steps=2"]
    for name, extra in (("fp32", []), ("bf16", BF16)):
        train(load_config(ovr + extra + [f"run.dir={tmp_path / name}"]))
    md = ckpt.SafeReader(str(ckpt.latest(tmp_path / "bf16"))).read_metadata()
    dtypes = {v.properties.dtype for k, v in md.state_dict_metadata.items()
              if k.startswith("model.")}
    assert dtypes == {torch.float32}
    for src in ("fp32", "bf16"):
        path = ckpt.latest(tmp_path / src)
        for extra in ([], BF16):
            cfg = load_config(SMALL + extra + ["train.micro_batch=2", f"run.dir={tmp_path}/x"])
            torch.manual_seed(1)  # other initial values: everything must come from the file
            model, par = build_parallel(cfg, check_layout(cfg, 1), CPU)
            opt = build_optimizer(par, cfg.train)
            load_checkpoint(par, path, opt)
            saved = {i.name: torch.empty(i.param.shape) for i in par.infos}
            ckpt.dcp_load({f"model.{k}": v for k, v in saved.items()}, path)
            if extra:
                masters = {i.name: v for b in par.sync.buckets
                           for i, v in b.views(opt.state_of(b)["master"])}
                assert opt.step_count == 2
            for info in par.infos:
                want = saved[info.name]
                if extra:
                    assert torch.equal(masters[info.name], want), (src, info.name)
                    assert torch.equal(info.param.detach(), want.to(torch.bfloat16))
                else:
                    assert torch.equal(info.param.detach(), want), (src, info.name)


def _read_all(path) -> dict:
    md = ckpt.SafeReader(str(path)).read_metadata()
    out = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
           for k, v in md.state_dict_metadata.items()}
    ckpt.dcp_load(out, path)
    return out


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_nonfinite_gradient_skips_the_bf16_step(tmp_path, monkeypatch):
    """The test-only NaN lands in the fp32 buckets (no ``p.grad`` exists): the step is skipped,
    masters and moments stay as they were, and the next step (whose first micro-batch overwrites
    the buckets) trains again."""
    ovr = SMALL + BF16 + ["train.micro_batch=2", "train.ckpt_every=1", "train.keep_last=3",
                          f"run.dir={tmp_path}"]
    monkeypatch.setenv("MMTRAIN_FAULT", "nan_grad@2")
    res = train(load_config(ovr + ["train.max_steps=2"]))
    assert res.skipped == [2] and res.final_step == 2
    monkeypatch.delenv("MMTRAIN_FAULT")
    more = train(load_config(ovr + ["train.max_steps=3"]))
    assert more.skipped == [] and [s for s, _ in more.losses] == [3]
    root = ckpt.checkpoint_root(tmp_path)
    s1, s2, s3 = (_read_all(root / f"step_0000000{i}") for i in (1, 2, 3))
    assert any(k.startswith("optim.") for k in s1)
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert not torch.equal(s3["model.embed.weight"], s2["model.embed.weight"])


@pytest.mark.parametrize("zero1", [False, True])
def test_fused_step_matches_elementwise_step(zero1):
    """The CUDA step (torch's fused AdamW over the decayed and the other runs, a multi-tensor
    copy into the parameters), forced here on CPU, gives the elementwise step's masters and bf16
    parameters to fp32 rounding — whole buckets and ZeRO-1 shards, with weight decay on the
    matrices only."""
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)) for _ in "ab"]
    nets[1].load_state_dict(nets[0].state_dict())
    opts, syncs = [], []
    for net, fused in zip(nets, (False, True)):
        infos = [ParamInfo(n, p, "dp", tuple(p.shape), decay=p.dim() >= 2)
                 for n, p in net.named_parameters()]
        sync = GradSync(infos, {}, 0.0002, zero1=zero1, overlap=False, device=CPU,
                        main_grads=True)
        assert len(sync.buckets) >= 2
        opts.append(ZeroAdamW(sync, 1e-2, (0.9, 0.95), 1e-8, 0.1, param_dtype=torch.bfloat16,
                              fused=fused))
        syncs.append(sync)
    assert [o.fused for o in opts] == [False, True]
    for step in range(4):
        x = torch.randn(5, 8)
        for net, sync, opt in zip(nets, syncs, opts):
            sync.prepare_backward(last_micro_batch=True)
            net(x.to(torch.bfloat16)).float().pow(2).sum().backward()
            sync.finish()
            opt.step()
            opt.zero_grad()
    for sa, sb in zip(opts[0].shards, opts[1].shards):
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.allclose(sa[key], sb[key], rtol=1e-5, atol=1e-7), key
    for pa, pb in zip(nets[0].parameters(), nets[1].parameters()):
        assert pa.dtype == pb.dtype == torch.bfloat16
        # the masters agree to fp32 rounding: their bf16 copies differ by one ulp at most
        assert (pa.float() - pb.float()).abs().max() <= 2 ** -7 * pa.float().abs().max()
