"""Schedules, optimizer groups and config validation."""

import math

import pytest
import torch

from mmtrain.config import ConfigError, TrainConfig, config_from_dict
from mmtrain.recipe import load_config
from mmtrain.train.optim import build_optimizer, lr_at


def test_warmup_then_constant():
    c = TrainConfig(lr=1.0, warmup_steps=4, schedule="constant", max_steps=10)
    assert [lr_at(s, c) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_reaches_min_lr():
    c = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=2, schedule="cosine", max_steps=12)
    assert lr_at(2, c) == pytest.approx(1.0)
    assert lr_at(7, c) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(12, c) == pytest.approx(0.1)


def test_exp_decay_constant_then_geometric():
    c = TrainConfig(lr=2e-4, min_lr=3e-5, warmup_steps=2, decay_start=5, schedule="exp_decay",
                    max_steps=11)
    assert lr_at(4, c) == 2e-4
    assert lr_at(5, c) == pytest.approx(2e-4)
    assert lr_at(10, c) == pytest.approx(3e-5)
    ratios = [lr_at(s + 1, c) / lr_at(s, c) for s in range(5, 10)]
    assert max(ratios) == pytest.approx(min(ratios))  # constant ratio: exponential


def test_no_weight_decay_on_norm_gains():
    from mmtrain.config import ModelConfig
    from mmtrain.model import MiniMaxModel

    model = MiniMaxModel(ModelConfig(hidden_size=16, ffn_hidden_size=8, num_heads=2,
                                     num_kv_heads=1, head_dim=8))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_recipes_compose_and_validate():
    cfg = load_config(["model=minimax_text_01"])
    assert cfg.model.num_layers == 80 and cfg.model.rope_dim == 64
    tiny = load_config([])
    assert tiny.model.head_dim == 32  # derived from hidden_size / num_heads


@pytest.mark.parametrize("data,field", [
    ({"train": {"nope": 1}}, "train.nope"),
    ({"model": {"num_layers": "x"}}, "model.num_layers"),
    ({"model": {"top_k": 9, "num_experts": 4}}, "model.top_k"),
    ({"train": {"global_batch": 6, "micro_batch": 4}}, "train.global_batch"),
    ({"parallel": {"dp": 0}}, "parallel.dp"),
    ({"model": {"rotary_dim": 7}}, "model.rotary_dim"),
])
def test_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        config_from_dict(data)
