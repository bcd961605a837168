"""Activation recomputation (train.recompute) and the fused loss in one process: the same losses,
aux terms, MoE statistics and gradients as without recomputation (fp32, CPU, 1e-6), over two
micro-batches of one step (the MoE's running counts and recorded statistics must not be counted
twice), with capacity drops; fewer bytes kept alive after the forward; the training loop logs the
same numbers with every mode and with the fused loss on or off."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mmtrain.config import ConfigError, ModelConfig
from mmtrain.model import MiniMaxModel
from mmtrain.model.fused_ce import linear_cross_entropy
from mmtrain.recipe import load_config
from mmtrain.train.loop import train

T = 48  # tokens per row


def _cfg(**kw):
    base = dict(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, head_dim=8,
                num_kv_heads=2, softmax_every=2, num_experts=4, top_k=2, ffn_hidden_size=16,
                lightning_block_size=4, capacity_factor=0.75)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def _batches():
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(2):  # two micro-batches of one step, 2 rows each, documents packed
        tokens = torch.randint(0, 64, (2, T), generator=g)
        labels = torch.randint(0, 64, (2, T), generator=g)
        cu = torch.tensor([0, 13, 48, 50, 96], dtype=torch.int32)
        out.append((tokens, labels, cu))
    return out


def _step(mode, fused, norm_scheme="deepnorm"):
    model = MiniMaxModel(_cfg(norm_scheme=norm_scheme))
    model.reset_parameters(7)
    model.set_recompute(mode)
    model.begin_step(4 * T)
    losses, auxes = [], []
    for tokens, labels, cu in _batches():
        out = model(tokens, cu, return_hidden=fused)
        if fused:
            ce = linear_cross_entropy(out.hidden, model.lm_head.weight, labels.reshape(-1), 20)
        else:
            ce = F.cross_entropy(out.logits.reshape(-1, 64).float(), labels.reshape(-1),
                                 reduction="none")
        loss = ce.sum() / (4 * T) + 0.05 * out.aux_loss
        loss.backward()
        losses.append(float(loss.detach()))
        auxes.append(float(out.aux_loss.detach()))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return losses, auxes, model.moe_stats().clone(), grads


@pytest.fixture(scope="module")
def plain():
    return _step("none", fused=False)


@pytest.mark.parametrize("mode,fused", [("none", True), ("full", False), ("selective", False),
                                        ("full", True), ("selective", True)])
def test_same_losses_statistics_and_gradients(plain, mode, fused):
    losses, auxes, stats, grads = _step(mode, fused)
    for a, b in zip(losses + auxes, plain[0] + plain[1]):
        assert abs(a - b) <= 1e-6 * abs(b), (losses, auxes, plain[:2])
    assert torch.equal(stats, plain[2])  # counts, drops, probability sums: recorded once
    assert stats[:, -2].sum() > 0  # capacity drops are exercised
    for name, g in plain[3].items():
        err = float((grads[name] - g).abs().max() / g.abs().max().clamp_min(1e-30))
        assert err <= 1e-6, (name, err)


def test_prenorm_full_recompute_matches():
    a, b = _step("none", False, "prenorm"), _step("full", False, "prenorm")
    assert torch.equal(a[2], b[2])
    for name, g in a[3].items():
        assert float((b[3][name] - g).abs().max()) <= 1e-6 * float(g.abs().max()), name


class _Alive(TorchDispatchMode):
    """Storages created by the ops of a forward (not the parameters' own, which views of them
    share); ``alive_bytes`` those still referenced."""

    def __init__(self, params):
        super().__init__()
        self.refs = {}
        self.skip = {p.untyped_storage().data_ptr() for p in params}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s.data_ptr() in self.skip:
                    continue
                self.refs.setdefault(s.data_ptr(), (StorageWeakRef(s), s.nbytes()))
        return out

    def alive_bytes(self):
        return sum(n for ref, n in self.refs.values() if not ref.expired())


def _kept_after_forward(mode):
    model = MiniMaxModel(_cfg(hidden_size=64, ffn_hidden_size=64, num_layers=4))
    model.reset_parameters(1)
    model.set_recompute(mode)
    tokens, labels, cu = _batches()[0]
    with _Alive(model.parameters()) as alive:
        out = model(tokens, cu, return_hidden=True)
        loss = linear_cross_entropy(out.hidden, model.lm_head.weight, labels.reshape(-1)).sum()
    kept = alive.alive_bytes()
    loss.backward()  # the graph was usable
    return kept


def test_recompute_keeps_fewer_bytes_after_the_forward():
    none, sel, full = (_kept_after_forward(m) for m in ("none", "selective", "full"))
    print("bytes kept after the forward (none, selective, full):", none, sel, full)
    assert full < sel < none, (none, sel, full)
    assert full < none / 4, (none, full)  # a layer input instead of a layer's activations


def test_unknown_recompute_mode_fails_naming_the_field():
    with pytest.raises(ConfigError, match="^train.recompute: unknown 'some'"):
        load_config(["train.recompute=some"])
    with pytest.raises(ConfigError, match="^train.fused_ce_chunk:"):
        load_config(["train.fused_ce_chunk=0"])


TRAIN = ["model.hidden_size=32", "model.ffn_hidden_size=32", "model.num_layers=2",
         "model.softmax_every=2", "model.num_heads=2", "model.num_kv_heads=1",
         "model.capacity_factor=1.0", "data.seq_len=32", "data.corpus_max_bytes=60000",
         "train.global_batch=4", "train.micro_batch=2", "train.aux_loss_coef=0.05",
         "train.max_steps=3", "train.warmup_steps=1", "run.progress=false"]


def _records(tmp_path, name, extra):
    run = tmp_path / name
    train(load_config(TRAIN + extra + [f"run.dir={run}"]))
    return [json.loads(l) for l in open(run / "metrics.jsonl")]


def test_training_loop_logs_the_same_numbers(tmp_path):
    ref = _records(tmp_path, "ref", ["train.recompute=none", "train.fused_ce=false"])
    assert max(r["drop_rate"] for r in ref) > 0
    for name, extra in [("full", ["train.recompute=full"]),
                        ("selective", ["train.recompute=selective", "train.fused_ce_chunk=5"])]:
        got = _records(tmp_path, name, extra)
        for key in ("loss", "aux_loss", "drop_rate", "grad_norm", "expert_imbalance"):
            for a, b in zip(got, ref):
                assert abs(a[key] - b[key]) <= 1e-6 * abs(b[key]), (name, key, a[key], b[key])
