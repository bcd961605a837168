"""``train.compile`` (mmtrain/model/compiled.py), on CPU with inductor's C++ backend.

* The compiled model equals the eager one (fp32, 1e-5: inductor reorders fp32 arithmetic) in
  losses, aux terms, MoE statistics (the same routing) and every parameter gradient, over two
  micro-batches of one step, with ``train.recompute`` none / selective / full, the plain and the
  fused (chunked) loss, DeepNorm and pre-norm.
* No recompilation for varying document layouts and token counts: after one warm-up step the
  model runs micro-batches of other ``cu_seqlens`` and other lengths under dynamo's
  ``error_on_recompile``, and every region still holds one graph; the same check does fail on a
  real recompile (a grad-mode change).
* Each region in bf16 (bf16 inputs and weights) is as close to an fp64 evaluation of the same
  inputs as the eager bf16 code is (forward and input gradients).
* The training loop: compile on vs off log the same losses, and a run resumed after one step
  does not recompile over the steps that follow (other documents; a batch-size change that adds
  a micro-batch; the loop's micro-batches keep their token count, so other lengths are checked
  on the model above).

One tiny model (the training-loop test's dimensions, so the graphs compiled once serve every test
of the file): compilation on CPU is slow.
"""


import pytest
import torch
import torch.nn.functional as F

from mmtrain.config import ConfigError, ModelConfig, TrainConfig
from mmtrain.model import MiniMaxModel
from mmtrain.model import compiled
from mmtrain.model.attention import norm_gate, norm_gate_compiled
from mmtrain.model.fused_ce import linear_cross_entropy
from mmtrain.model.layers import (residual_norm, residual_norm_compiled, rope_qk,
                                  rope_qk_compiled)
from mmtrain.model.moe import (route_choice, route_choice_compiled, route_probs,
                               route_probs_compiled)
from mmtrain.recipe import load_config
from mmtrain.train.loop import train
from tests.conftest import metrics_records

V, T = 258, 48


def _cfg(**kw):
    # the dimensions of TRAIN below (alpha, eps and every weight shape equal: shared graphs)
    base = dict(hidden_size=32, ffn_hidden_size=32, num_layers=2, softmax_every=2, num_heads=2,
                num_kv_heads=1, capacity_factor=1.0)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def _batches(rows=2, length=T, seed=5, cuts=((0, 13, 48, 50, 96),)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for cu in cuts:  # micro-batches of one step, documents packed
        tokens = torch.randint(0, V, (rows, length), generator=g)
        labels = torch.randint(0, V, (rows, length), generator=g)
        out.append((tokens, labels, torch.tensor(cu, dtype=torch.int32)))
    return out


def _step(compile_on, mode="none", fused=False, norm_scheme="deepnorm", batches=None,
          model=None):
    if model is None:
        model = MiniMaxModel(_cfg(norm_scheme=norm_scheme))
        model.reset_parameters(7)
    model.set_recompute(mode)
    model.set_compile(compile_on)
    batches = batches or _batches(cuts=((0, 13, 48, 50, 96), (0, 40, 48, 61, 96)))
    n = sum(t.numel() for t, _, _ in batches)
    model.begin_step(n)
    losses, auxes = [], []
    for tokens, labels, cu in batches:
        out = model(tokens, cu, return_hidden=fused)
        if fused:
            ce = linear_cross_entropy(out.hidden, model.lm_head.weight, labels.reshape(-1), 20)
        else:
            ce = F.cross_entropy(out.logits.reshape(-1, V), labels.reshape(-1), reduction="none")
        loss = ce.sum() / n + 0.05 * out.aux_loss
        loss.backward()
        losses.append(float(loss.detach()))
        auxes.append(float(out.aux_loss.detach()))
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return losses, auxes, model.moe_stats().clone(), grads


@pytest.fixture(scope="module")
def eager():
    return {s: _step(False, norm_scheme=s) for s in ("deepnorm", "prenorm")}


def _assert_same(got, want, tol=1e-5):
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert abs(a - b) <= tol * abs(b), (got[:2], want[:2])
    E = (want[2].shape[1] - 2) // 2
    assert torch.equal(got[2][:, :E], want[2][:, :E])  # expert counts: the same routing
    assert torch.equal(got[2][:, -2:], want[2][:, -2:])  # drops and tokens
    assert want[2][:, -2].sum() > 0  # capacity drops are exercised
    for name, g in want[3].items():
        err = float((got[3][name] - g).abs().max() / g.abs().max().clamp_min(1e-30))
        assert err <= tol, (name, err)


@pytest.mark.parametrize("mode,fused,scheme", [("none", False, "deepnorm"),
                                               ("none", True, "prenorm"),
                                               ("selective", True, "deepnorm"),
                                               ("full", False, "deepnorm")])
def test_compiled_model_matches_eager(eager, mode, fused, scheme):
    want = eager[scheme] if not fused else _step(False, mode, fused, scheme)
    got = _step(True, mode, fused, scheme)
    _assert_same(got, want)
    used = {r.name: r.graphs() for r in compiled.REGIONS}
    assert all(n >= 1 for n in used.values()), used  # every region ran compiled


def test_eager_path_is_unchanged_when_off(eager):
    """Off (the default) no compiled region is called: the eager code runs, and reproduces the
    eager numbers bit for bit."""
    calls = []
    for r in compiled.REGIONS:  # any call of a compiled region would be recorded
        r._saved_call = r._compiled
        r._compiled = lambda *a, _r=r: calls.append(_r.name)
    try:
        got = _step(False)
    finally:
        for r in compiled.REGIONS:
            r._compiled = r._saved_call
    assert calls == []
    assert got[0] == eager["deepnorm"][0] and torch.equal(got[2], eager["deepnorm"][2])
    for name, g in eager["deepnorm"][3].items():
        assert torch.equal(got[3][name], g), name


def test_no_recompile_for_other_layouts_and_lengths():
    model = MiniMaxModel(_cfg())
    model.reset_parameters(3)
    _step(True, model=model)  # warm-up: compiles whatever this process has not compiled yet
    warm = {r.name: r.graphs() for r in compiled.REGIONS}
    assert warm["residual_norm"] >= 1 and warm["route_probs"] >= 1, warm
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    layouts = [(2, 48, (0, 1, 47, 48, 60, 96)), (2, 40, (0, 40, 41, 80)),
               (1, 33, (0, 5, 6, 33)), (2, 64, (0, 64, 70, 100, 128)),
               (4, 24, (0, 24, 30, 48, 72, 90, 96))]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, (rows, length, cu) in enumerate(layouts):
            _step(True, batches=_batches(rows, length, seed=i, cuts=(cu,)), model=model)
        assert {r.name: r.graphs() for r in compiled.REGIONS} == warm
        assert counters["stats"]["unique_graphs"] == graphs
        # the check is real: a guard that does change (grad mode) is a recompile, and fails
        tokens, _, cu = _batches(1, 33, cuts=((0, 5, 6, 33),))[0]
        with torch.no_grad(), pytest.raises(torch._dynamo.exc.RecompileError):
            model(tokens, cu)


def _rel(a, b):
    return float((a.detach().double() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))


def _region_cases():
    g = torch.Generator().manual_seed(11)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    n, D = 40, 32
    experts = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(n)])
    pos = torch.cat([torch.arange(25), torch.arange(15)])
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(torch.bfloat16)
    return [  # (eager fn, compiled region, inputs, which inputs get a gradient, constants)
        (residual_norm, residual_norm_compiled, [r(n, D), r(n, D), 1.68, w, 1e-5, False],
         (0, 1, 3)),
        (residual_norm, residual_norm_compiled, [r(n, D), r(n, D), None, w, 1e-5, True],
         (0, 1, 3)),
        (route_probs, route_probs_compiled, [r(n, 4, scale=3.0), experts], (0,)),
        (rope_qk, rope_qk_compiled, [r(n, 2, 16), r(n, 1, 16), pos, 8, 10000.0], (0, 1)),
        (norm_gate, norm_gate_compiled, [r(n, D), w, 1e-6, r(n, D), torch.bfloat16],
         (0, 1, 3)),
    ]


def _eval(fn, args, grad_at, dtype=None):
    """Outputs and input gradients of ``fn`` (inputs cast to ``dtype`` first)."""
    args = [a.detach().to(dtype) if dtype is not None and torch.is_tensor(a)
            and a.is_floating_point() else (a.detach() if torch.is_tensor(a) else a)
            for a in args]
    if dtype is not None and args[-1] is torch.bfloat16:  # norm_gate's compute dtype
        args[-1] = dtype
    for i in grad_at:
        args[i].requires_grad_(True)
    out = fn(*args)
    out = out if isinstance(out, tuple) else (out,)
    outs = [o for o in out if o.is_floating_point()]
    g = torch.Generator().manual_seed(3)
    cot = [torch.randn(o.shape, generator=g) for o in outs]
    sum((o * c.to(o.dtype)).sum() for o, c in zip(outs, cot)).backward()
    return outs, [args[i].grad for i in grad_at], out


@pytest.mark.parametrize("case", range(5))
def test_regions_in_bf16_are_as_accurate_as_eager(case):
    fn, region, args, grad_at = _region_cases()[case]
    ref_out, ref_grad, _ = _eval(fn, args, grad_at, torch.float64)
    eag_out, eag_grad, eag = _eval(fn, args, grad_at)
    cmp_out, cmp_grad, cmp = _eval(region, args, grad_at)
    for e, c, r in zip(eag_out + eag_grad, cmp_out + cmp_grad, ref_out + ref_grad):
        assert c.dtype == e.dtype  # the same output dtypes as the eager code
        assert _rel(c, r) <= max(2 * _rel(e, r), 4e-3), (fn.__name__, _rel(c, r), _rel(e, r))


def test_route_choice_in_bf16_picks_the_eager_experts():
    logits = (torch.randn(40, 8, generator=torch.Generator().manual_seed(2)) * 3).bfloat16()
    with torch.no_grad():
        assert torch.equal(route_choice_compiled(logits, 2), route_choice(logits, 2))


def test_compile_switch_is_a_validated_train_field():
    assert load_config([]).train.compile is False  # default: eager
    assert load_config(["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError, match="^train.compile: expected true/false"):
        load_config(["train.compile=yes"])
    with pytest.raises(ConfigError, match="^train.compile: must be true or false"):
        TrainConfig(compile="yes").validate()


TRAIN = ["model.hidden_size=32", "model.ffn_hidden_size=32", "model.num_layers=2",
         "model.softmax_every=2", "model.num_heads=2", "model.num_kv_heads=1",
         "model.capacity_factor=1.0", "data.seq_len=32", "data.corpus_max_bytes=60000",
         "train.global_batch=2", "train.micro_batch=null", "train.aux_loss_coef=0.05",
         "train.warmup_steps=1", "train.max_steps=4", "run.progress=false",
         # 2 rows a step for the first 2 steps, then 4: one micro-batch of 2 rows, then two
         "train.batch_schedule=[[0,64],[128,128]]"]


def test_training_loop_compiled_matches_eager_without_recompiling(tmp_path, capsys):
    train(load_config(TRAIN + [f"run.dir={tmp_path / 'ref'}"]))
    ref = metrics_records(tmp_path / "ref")
    run = [f"run.dir={tmp_path / 'c'}", "train.compile=true"]
    train(load_config(TRAIN + run + ["train.max_steps=1"]))  # warm-up: one step
    warm = {r.name: r.graphs() for r in compiled.REGIONS}
    with torch._dynamo.config.patch(error_on_recompile=True):
        res = train(load_config(TRAIN + run))  # resumed: other documents, then accumulation
    assert res.model.layers[0].moe.use_compiled and res.model.layers[1].attn.use_compiled
    assert all(n >= 1 for n in warm.values()), warm
    assert {r.name: r.graphs() for r in compiled.REGIONS} == warm
    assert "train.compile: graphs per compiled region: residual_norm" in capsys.readouterr().out
    got = metrics_records(tmp_path / "c")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for key in ("loss", "aux_loss", "grad_norm", "drop_rate"):
        for a, b in zip(got, ref):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]) + 1e-12, (key, a[key], b[key])
