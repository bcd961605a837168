"""The expert-parallel MoE pieces against single-process math, in spawned gloo processes:
the all-to-all dispatcher (EP, ETP, EP×ETP; overlap groups 1 and 3; with capacity drops) gives
each rank the outputs and gradients of one device routing all ranks' tokens; global routing's
drops are the single device's and hand-derived; one host sync per layer call."""

import os

import torch
import torch.distributed as dist

from mmtrain.config import ModelConfig
from mmtrain.model.moe import MoE, capacity_keep
from tests.conftest import spawn_ranks

T, D, E, F = 9, 6, 4, 8


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import datetime

    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _groups(world, ep, etp):
    """Expert grid with etp fastest (Megatron's order): (ep group, etp group) of this rank."""
    me = dist.get_rank()
    ep_groups = [dist.new_group([b + i * etp for i in range(ep)]) for b in range(etp)]
    etp_groups = [dist.new_group(list(range(b * etp, (b + 1) * etp))) for b in range(ep)]
    return (ep_groups[me % etp] if ep > 1 else None,
            etp_groups[me // etp] if etp > 1 else None)


def _dispatch(rank, world, port, ep, etp, out):
    _init(rank, world, port)
    from mmtrain.parallel.moe import GroupBalance, shard_moe

    ep_g, etp_g = _groups(world, ep, etp)
    world_g = dist.group.WORLD
    res = {}
    for cf in (None, 0.5):
        for G in (1, 3):
            cfg = ModelConfig(hidden_size=D, num_experts=E, top_k=2, ffn_hidden_size=F,
                              capacity_factor=cf, global_routing=True)
            ref = MoE(cfg).double()
            ref.reset_parameters(1.0, torch.Generator().manual_seed(7))
            moe = MoE(cfg).double()
            moe.load_state_dict(ref.state_dict())
            moe.balance = GroupBalance(True, world_g, None)
            (l13, _), (l2, _) = shard_moe(moe, ep_g, etp_g, G)
            g = torch.Generator().manual_seed(11)
            x_all = torch.randn(world * T, D, generator=g, dtype=torch.float64)
            w_all = torch.randn(world * T, D, generator=g, dtype=torch.float64)
            mine = slice(rank * T, (rank + 1) * T)
            x = x_all[mine].clone().requires_grad_()
            y, aux = moe(x)
            ((y * w_all[mine]).sum() + 0.3 * aux).backward()
            xr = x_all.clone().requires_grad_()
            yr, auxr = ref(xr)
            ((yr * w_all).sum() + 0.3 * auxr).backward()
            router = moe.router.weight.grad.clone()
            dist.all_reduce(router)
            key = f"cf{cf}_G{G}"
            res[key + "_y"] = float((y - yr[mine]).detach().abs().max())
            res[key + "_dx"] = float((x.grad - xr.grad[mine]).abs().max())
            res[key + "_router"] = float((router - ref.router.weight.grad).abs().max())
            res[key + "_w13"] = float((moe.experts.w13.grad - l13(ref.experts.w13.grad)).abs().max())
            res[key + "_w2"] = float((moe.experts.w2.grad - l2(ref.experts.w2.grad)).abs().max())
            dropped = moe.last_stats["dropped"].clone()
            dist.all_reduce(dropped)
            res[key + "_drops"] = float(dropped - ref.last_stats["dropped"])
            if cf is not None:
                res[key + "_some_dropped"] = float(int(ref.last_stats["dropped"]) == 0)
            res[key + "_syncs"] = float(moe.dispatcher.host_syncs - 1)
    out[rank] = res
    dist.destroy_process_group()


def _check(out):
    for rank, res in out.items():
        for key, err in res.items():
            assert abs(err) < 1e-12, (rank, key, err)


def test_all_to_all_dispatcher_ep2():
    _check(spawn_ranks(_dispatch, 2, 2, 1))


def test_all_to_all_dispatcher_etp2():
    _check(spawn_ranks(_dispatch, 2, 1, 2))


def test_all_to_all_dispatcher_ep2_etp2():
    _check(spawn_ranks(_dispatch, 4, 2, 2))


# --------------------------------------------------------------------------- global routing
def _keep(rank, world, port, out):
    _init(rank, world, port)
    from mmtrain.parallel.moe import GroupBalance

    res = {}
    # hand-derived, top-1, 2 experts, capacity factor 1: local C = 2 per rank, global C = 4
    idx = torch.tensor([[0], [0], [0], [1]]) if rank == 0 else torch.tensor([[0], [0], [0], [1]])
    local = GroupBalance(False, dist.group.WORLD, None).keep(idx, 2, 1.0)
    glob = GroupBalance(True, dist.group.WORLD, None).keep(idx, 2, 1.0)
    res["local"] = local[:, 0].tolist()
    res["global"] = glob[:, 0].tolist()
    # skewed: rank r sends all its tokens to expert r; local drops half, global nothing
    skew = torch.full((4, 1), rank)
    res["skew_local_drops"] = int((~GroupBalance(False, dist.group.WORLD, None).keep(skew, 2, 1.0)).sum())
    res["skew_global_drops"] = int((~GroupBalance(True, dist.group.WORLD, None).keep(skew, 2, 1.0)).sum())
    # top-2 on random routing: global keeps = one device's keeps on the concatenated tokens
    g = torch.Generator().manual_seed(3)
    every = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(world * 7)])
    mine = every[rank * 7:(rank + 1) * 7]
    got = GroupBalance(True, dist.group.WORLD, None).keep(mine, 5, 0.6)
    want = capacity_keep(every, 5, 0.6)[rank * 7:(rank + 1) * 7]
    res["concat_equal"] = bool((got == want).all())
    res["concat_drops"] = int((~want).sum())
    out[rank] = res
    dist.destroy_process_group()


def test_global_routing_drops_are_one_devices_and_fewer_than_local():
    out = spawn_ranks(_keep, 2)
    # local: each rank keeps 2 of its three expert-0 slots; global: expert 0 has 6 slots for a
    # capacity of 4: rank 0's three (lower rank first), then rank 1's first one
    assert out[0]["local"] == [True, True, False, True]
    assert out[1]["local"] == [True, True, False, True]
    assert out[0]["global"] == [True, True, True, True]
    assert out[1]["global"] == [True, False, False, True]
    for r in (0, 1):
        assert out[r]["concat_equal"]
        assert (out[r]["skew_local_drops"], out[r]["skew_global_drops"]) == (2, 0)
    assert out[0]["concat_drops"] + out[1]["concat_drops"] > 0
