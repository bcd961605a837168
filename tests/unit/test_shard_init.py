"""The geometry and the counter-based init of ``mmtrain.model.init``, and sharded checkpoint
descriptors (``ShardedPieces``) in one process."""

import math

import pytest
import torch

from mmtrain.config import ModelConfig
from mmtrain.model.init import (BLOCK, Piece, flat_boxes, init_std, init_tensor, region,
                                to_global)


@pytest.mark.parametrize("shape,start,stop", [((3, 4, 5), 7, 53), ((3, 4, 5), 0, 60),
                                              ((6, 7), 13, 14), ((5,), 1, 4), ((2, 3, 4), 4, 8),
                                              ((4, 1, 3), 2, 11)])
def test_flat_boxes_are_the_range_in_order(shape, start, stop):
    idx = torch.arange(math.prod(shape)).view(shape)
    got = torch.cat([region(idx, o, s).reshape(-1) for o, s in flat_boxes(shape, start, stop)])
    assert torch.equal(got, torch.arange(start, stop))
    assert len(flat_boxes(shape, start, stop)) <= 2 * len(shape) - 1


def test_to_global_splits_a_box_over_the_two_w13_pieces():
    # local [El=2, 2·Fl=6, D=4] of a full [4, 10, 4] (F = 5): W1 rows 2:5 and W3 rows 7:10
    pieces = [Piece((0, 0, 0), (2, 2, 0), (2, 3, 4)), Piece((0, 3, 0), (2, 7, 0), (2, 3, 4))]
    got = to_global(pieces, (1, 1, 0), (1, 4, 4))
    assert got == [((1, 1, 0), (3, 3, 0), (1, 2, 4)), ((1, 3, 0), (3, 7, 0), (1, 2, 4))]


def test_init_of_a_piece_equals_that_region_of_the_full_tensor():
    cfg = ModelConfig(hidden_size=16, num_heads=2, head_dim=8, num_kv_heads=1)
    name, full_shape = "layers.0.attn.qkv_proj.weight", (3 * 2 * 8, 16)
    rule = init_std(cfg, name, full_shape)
    full = torch.empty(full_shape)
    init_tensor(full, name, full_shape, [Piece((0, 0), (0, 0), full_shape)], 7, rule)
    # two rectangles in one local tensor, one of them with columns 5:13 only
    local = torch.zeros(20, 8)
    pieces = [Piece((0, 0), (3, 5), (12, 8)), Piece((12, 0), (40, 8), (8, 8))]
    init_tensor(local, name, full_shape, pieces, 7, rule)
    assert torch.equal(local[:12], full[3:15, 5:13]) and torch.equal(local[12:], full[40:48, 8:])
    # β on the v rows of each head: their spread is β times the q/k rows'
    v = torch.cat([full[16:24], full[40:48]])
    qk = torch.cat([full[:16], full[24:40]])
    assert abs(v.std() / qk.std() - cfg.deepnorm_beta) < 0.35 * cfg.deepnorm_beta
    other = torch.empty(full_shape)  # another seed, other weights
    init_tensor(other, name, full_shape, [Piece((0, 0), (0, 0), full_shape)], 8, rule)
    assert not torch.equal(other, full)


def test_rows_of_a_huge_tensor_are_drawn_from_their_blocks_only():
    """Rows of the 456B model's LM head [200064, 6144] (4.9 GB) without the tensor: the noise
    of a block depends on (seed, name, block, block shape) only, so they equal the same rows of
    a small tensor with the same name, width and whole blocks."""
    cfg = ModelConfig(hidden_size=6144, vocab_size=200064)
    name, big = "lm_head.weight", (200064, 6144)
    rpb = BLOCK // 6144
    small = (3 * rpb, 6144)
    got = torch.empty(5, 6144)
    init_tensor(got, name, big, [Piece((0, 0), (rpb + 3, 0), (5, 6144))], 0,
                init_std(cfg, name, big))
    ref = torch.empty(small)
    init_tensor(ref, name, small, [Piece((0, 0), (0, 0), small)], 0, lambda r: torch.ones(len(r)))
    std = math.sqrt(2 / (200064 + 6144))
    torch.testing.assert_close(got, ref[rpb + 3:rpb + 8] * std, rtol=0, atol=0)


def test_unknown_parameter_names_have_no_silent_default():
    with pytest.raises(ValueError, match="no initialisation rule for parameter 'layers.0.x.w'"):
        init_std(ModelConfig(), "layers.0.x.w", (4, 4))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_pieces_load_legacy_w1_w3_across_the_gate_up_boundary(tmp_path):
    import torch.distributed.checkpoint as dcp

    from mmtrain.train import checkpoint as ckpt

    E, F, D = 3, 10, 4
    w13 = torch.randn(E, 2 * F, D)
    path = tmp_path / "step_00000001"
    dcp.save({"model.layers.0.moe.experts.w1": w13[:, :F].clone(),
              "model.layers.0.moe.experts.w3": w13[:, F:].clone()},
             checkpoint_id=str(path), no_dist=True)
    (path / "rank_00000.json").write_text("{}")
    dst = torch.zeros(2, 12, D)  # experts 1:3, rows 4:16 (W1 rows 4:10, W3 rows 0:6)
    want = {"model.layers.0.moe.experts.w13":
            ckpt.ShardedPieces((E, 2 * F, D), torch.float32, [((1, 4, 0), dst)])}
    ckpt.load(path, None, None, tensors=want)
    assert torch.equal(dst, w13[1:3, 4:16])
