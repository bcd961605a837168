"""Rank grids of :mod:`mmtrain.parallel.topology` against megatron-core, plus real gloo groups.

* Parity: for many (world, tp, cp, pp, ep, etp, order), world sizes up to 1024, every group kind
  equals what megatron-core 0.16 builds for the same sizes and order. Megatron runs in a separate
  Python process (its ``parallel_state`` is module-global state; the suite runs in one pytest
  process, so nothing may stay initialised here). That process compares two things:
  (1) every group of every kind, from megatron's pure ``RankGenerator`` exactly as
  ``initialize_model_parallel`` calls it; (2) ``initialize_model_parallel`` itself on torch's
  ``fake`` backend for a sample of ranks (every rank up to world 32, else the first, the last and
  one random rank): the groups the rank is in, read back through the public getters, and its
  rank in each.
  Workarounds for running megatron on CPU: ``create_gloo_process_groups=False`` (the fake backend
  cannot host the extra gloo groups); nothing else needed -- with the default arguments
  ``initialize_model_parallel`` makes no CUDA call in 0.16.
* Validation: invalid sizes raise ``ConfigError`` naming the field, before any process group;
  megatron rejects the same layouts.
* Groups: 4 gloo processes create the process groups (and DeviceMeshes) and all-reduce their rank
  ids over each group; the sums must match the pure rank lists.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from mmtrain.config import ConfigError, ModelConfig, ParallelConfig
from mmtrain.parallel.groups import create_device_meshes, create_process_groups
from mmtrain.parallel.topology import GROUP_NAMES, Topology

PARTITIONS = [n for n in GROUP_NAMES if n not in ("embd", "pos_embd")]
COORD_OF = {"tp": "tp", "cp": "cp", "dp": "dp", "pp": "pp", "ep": "ep", "etp": "etp", "edp": "edp"}

# --------------------------------------------------------------------------------------------------
# Cases: (world, tp, cp, pp, ep, etp, order)
HAND_CASES = [
    (1, 1, 1, 1, 1, 1, "tp-cp-ep-dp-pp"),
    (8, 2, 1, 1, 4, 1, "tp-cp-ep-dp-pp"),
    (8, 2, 2, 2, 2, 2, "tp-cp-ep-dp-pp"),
    (16, 2, 2, 2, 4, 1, "tp-cp-ep-dp-pp"),
    (16, 4, 1, 2, 1, 4, "tp-pp-dp"),          # Megatron's older order; pp not last, dp == edp
    (16, 2, 1, 2, 2, 1, "tp-cp-ep-pp-dp"),    # pp before dp: needs ep·etp == tp·cp
    (24, 2, 3, 2, 2, 3, "tp-cp-ep-dp-pp"),    # non-power-of-two sizes
    (12, 1, 1, 3, 4, 1, "tp-cp-ep-dp-pp"),
    (64, 8, 1, 1, 8, 1, "tp-cp-ep-dp-pp"),
    (64, 4, 4, 2, 8, 2, "ep-tp-cp-dp-pp"),
    (64, 2, 2, 4, 4, 2, "tp-ep-cp-dp-pp"),
    (96, 4, 2, 3, 8, 2, "tp-cp-ep-dp-pp"),
    (256, 8, 4, 2, 16, 2, "tp-cp-ep-dp-pp"),
    (256, 4, 8, 4, 32, 1, "tp-cp-ep-dp-pp"),
    (768, 8, 2, 6, 32, 2, "tp-cp-ep-dp-pp"),
    (1024, 8, 2, 4, 16, 2, "tp-cp-ep-dp-pp"),  # the MiniMax-01 scale
    (1024, 8, 8, 16, 64, 1, "tp-cp-ep-dp-pp"),
    (1024, 4, 4, 8, 4, 4, "tp-cp-ep-pp-dp"),   # pp not last: dp == edp == 8, tp·cp == ep·etp
    (1024, 1, 1, 1, 1024, 1, "tp-cp-ep-dp-pp"),
    (1024, 1024, 1, 1, 1, 1, "tp-cp-ep-dp-pp"),
    (1024, 1, 1, 1024, 1, 1, "tp-cp-ep-dp-pp"),
]
ORDERS = ["tp-cp-ep-dp-pp", "tp-ep-cp-dp-pp", "cp-tp-ep-dp-pp", "tp-cp-ep-pp-dp", "tp-dp-cp-ep-pp"]


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _random_cases(n, seed=0):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        world = rng.choice([4, 8, 16, 32, 48, 64, 128, 256, 512, 1024])
        tp, cp, pp, ep, etp = (rng.choice([d for d in _divisors(world) if d <= 64])
                               for _ in range(5))
        case = (world, tp, cp, pp, ep, etp, rng.choice(ORDERS))
        try:
            Topology(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=case[-1])
        except ConfigError:
            continue
        out.append(case)
    return out


VALID_CASES = HAND_CASES + _random_cases(24)

# Layouts both mmtrain and megatron must reject: (case, field named in the error)
INVALID_CASES = [
    ((8, 3, 1, 1, 1, 1, "tp-cp-ep-dp-pp"), "parallel.tp"),
    ((8, 2, 2, 4, 1, 1, "tp-cp-ep-dp-pp"), "parallel.pp"),       # tp·cp·pp = 16 > 8
    ((8, 1, 1, 2, 4, 2, "tp-cp-ep-dp-pp"), "parallel.pp"),       # etp·ep·pp = 16 > 8
    ((16, 2, 1, 1, 3, 1, "tp-cp-ep-dp-pp"), "parallel.ep"),
    ((12, 2, 1, 1, 4, 2, "tp-cp-ep-dp-pp"), "parallel.ep"),      # etp·ep = 8 does not divide 12
    ((16, 2, 2, 1, 1, 1, "tp-dp-pp"), "parallel.order"),        # cp = 2 left out of the order
    ((16, 2, 1, 1, 2, 1, "tp-dp-pp"), "parallel.order"),        # ep = 2 left out
    ((16, 2, 1, 2, 1, 1, "tp-cp-ep-pp-dp"), "parallel.order"),  # pp not last and dp 4 != edp 8
    ((16, 2, 1, 2, 2, 1, "tp-pp-cp-ep-dp"), "parallel.order"),  # dp == edp, PP groups differ
]

_MEGATRON = textwrap.dedent(r'''
    import json, sys, warnings
    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from megatron.core import parallel_state as ps

    GETTERS = {
        "tp": ps.get_tensor_model_parallel_group,
        "cp": ps.get_context_parallel_group,
        "dp": ps.get_data_parallel_group,
        "dp_cp": lambda: ps.get_data_parallel_group(with_context_parallel=True),
        "pp": ps.get_pipeline_model_parallel_group,
        "mp": ps.get_model_parallel_group,
        "tp_cp": ps.get_tensor_and_context_parallel_group,
        "tp_dp": ps.get_tensor_and_data_parallel_group,
        "tp_dp_cp": lambda: ps.get_tensor_and_data_parallel_group(with_context_parallel=True),
        "ep": ps.get_expert_model_parallel_group,
        "etp": ps.get_expert_tensor_parallel_group,
        "edp": ps.get_expert_data_parallel_group,
        "etp_ep": ps.get_expert_tensor_and_model_parallel_group,
        "etp_ep_pp": ps.get_expert_tensor_model_pipeline_parallel_group,
        "embd": lambda: ps.get_embedding_group(check_initialized=False),
        "pos_embd": lambda: ps.get_position_embedding_group(check_initialized=False),
    }
    RANKS = {
        "tp": ps.get_tensor_model_parallel_rank, "cp": ps.get_context_parallel_rank,
        "dp": ps.get_data_parallel_rank, "pp": ps.get_pipeline_model_parallel_rank,
        "ep": ps.get_expert_model_parallel_rank, "etp": ps.get_expert_tensor_parallel_rank,
        "edp": ps.get_expert_data_parallel_rank,
    }
    # Group kinds -> (generator, token), as initialize_model_parallel builds them.
    TOKENS = {"tp": ("d", "tp"), "cp": ("d", "cp"), "dp": ("d", "dp"), "dp_cp": ("d", "dp-cp"),
              "pp": ("d", "pp"), "mp": ("d", "tp-pp"), "tp_cp": ("d", "tp-cp"),
              "tp_dp": ("d", "tp-dp"), "tp_dp_cp": ("d", "tp-dp-cp"), "ep": ("e", "ep"),
              "etp": ("e", "tp"), "edp": ("e", "dp"), "etp_ep": ("e", "tp-ep"),
              "etp_ep_pp": ("e", "tp-ep-pp")}

    def run(case):
        world, tp, cp, pp, ep, etp, order = case["sizes"]
        out = {"state": {}}
        try:
            if world % (tp * cp * pp) or world % (etp * ep * pp):
                raise RuntimeError("world size not divisible")   # checked before generators
            gens = {"d": ps.RankGenerator(tp=tp, ep=1, dp=world // (tp * cp * pp), pp=pp, cp=cp,
                                          order=order),
                    "e": ps.RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep * pp), pp=pp,
                                          cp=1, order=order)}
            out["generator"] = {k: gens[g].get_ranks(t) for k, (g, t) in TOKENS.items()}
        except Exception as e:
            out["generator_error"] = repr(e)
        for rank in case["ranks"]:
            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
            try:
                ps.initialize_model_parallel(
                    tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                    context_parallel_size=cp, expert_model_parallel_size=ep,
                    expert_tensor_parallel_size=etp, order=order,
                    create_gloo_process_groups=False)
                groups = {}
                for name, get in GETTERS.items():
                    g = get()
                    groups[name] = None if g is None else dist.get_process_group_ranks(g)
                coords = {name: get() for name, get in RANKS.items()}
                out["state"][str(rank)] = {"groups": groups, "coords": coords}
            except Exception as e:
                out["error"] = repr(e)
            finally:
                ps.destroy_model_parallel()
                dist.destroy_process_group()
        return out

    cases = json.load(sys.stdin)
    json.dump([run(c) for c in cases], sys.stdout)
''')


def _sample_ranks(world, seed):
    if world <= 32:
        return list(range(world))
    return sorted({0, random.Random(seed).randrange(world), world - 1})


@pytest.fixture(scope="module")
def megatron():
    """Megatron's answers for VALID_CASES + INVALID_CASES, computed in a child process."""
    if importlib.util.find_spec("megatron") is None or \
            importlib.util.find_spec("megatron.core") is None:
        pytest.skip("megatron-core is not installed")
    cases = [{"sizes": list(c), "ranks": _sample_ranks(c[0], i)}
             for i, c in enumerate(VALID_CASES)]
    cases += [{"sizes": list(c), "ranks": [0]} for c, _ in INVALID_CASES]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _MEGATRON], input=json.dumps(cases),
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout)
    return {tuple(c["sizes"]): r for c, r in zip(cases, results)}


def _case_id(case):
    return "w{}-tp{}-cp{}-pp{}-ep{}-etp{}-{}".format(*case)


def _topo(case):
    world, tp, cp, pp, ep, etp, order = case
    return Topology(world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=order)


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", VALID_CASES, ids=_case_id)
def test_matches_megatron(case, megatron):
    topo, ref = _topo(case), megatron[case]
    assert "error" not in ref and "generator_error" not in ref, ref
    # (1) every group of every kind, from megatron's RankGenerator
    for name, groups in ref["generator"].items():
        assert topo.groups(name) == groups, name
    # (2) parallel_state on the fake backend: the sampled ranks' groups and coordinates
    assert ref["state"], "no rank was checked"
    for rank, got in ref["state"].items():
        rank = int(rank)
        for name, ranks in got["groups"].items():
            assert topo.group(name, rank) == ranks, (name, rank)
        info = topo.rank_info(rank)
        assert {k: getattr(info, k) for k in got["coords"]} == got["coords"], rank


@pytest.mark.parametrize("case,field", INVALID_CASES, ids=[f"{c[0]}-{f}" for c, f in INVALID_CASES])
def test_invalid_sizes_rejected_like_megatron(case, field, megatron):
    assert not dist.is_initialized()
    with pytest.raises(ConfigError, match=f"^{field}:"):
        _topo(case)
    assert not dist.is_initialized()  # rejected before any process group exists
    ref = megatron[case]
    assert "error" in ref or "generator_error" in ref, f"megatron accepted {case}"


@pytest.mark.parametrize("case", VALID_CASES[:25], ids=_case_id)
def test_grid_invariants(case):
    topo = _topo(case)
    world = topo.world_size
    assert topo.pp * topo.dp * topo.cp * topo.tp == world
    assert topo.pp * topo.edp * topo.etp * topo.ep == world
    sizes = {"tp": topo.tp, "cp": topo.cp, "dp": topo.dp, "pp": topo.pp, "ep": topo.ep,
             "etp": topo.etp, "edp": topo.edp, "dp_cp": topo.dp * topo.cp,
             "mp": topo.tp * topo.pp, "tp_cp": topo.tp * topo.cp, "tp_dp": topo.tp * topo.dp,
             "tp_dp_cp": topo.tp * topo.dp * topo.cp, "etp_ep": topo.etp * topo.ep,
             "etp_ep_pp": topo.etp * topo.ep * topo.pp}
    for name in PARTITIONS:  # each kind partitions the world into equal groups
        groups = topo.groups(name)
        assert sorted(r for g in groups for r in g) == list(range(world)), name
        assert {len(g) for g in groups} == {sizes[name]}, name
    infos = [topo.rank_info(r) for r in range(world)]
    for name, attr in COORD_OF.items():  # a coordinate is the index within that group
        for g in topo.groups(name):
            assert [getattr(infos[r], attr) for r in g] == list(range(len(g))), name
    # coordinates identify a rank within each grid
    assert len({(i.tp, i.cp, i.dp, i.pp) for i in infos}) == world
    assert len({(i.etp, i.ep, i.edp, i.pp) for i in infos}) == world


@pytest.mark.parametrize("case", [c for c in HAND_CASES if c[0] <= 256])
def test_mesh_slices_match_groups(case):
    import numpy as np
    topo = _topo(case)
    for grid in ("dense", "expert"):
        names, ranks = topo.mesh(grid)
        arr = np.array(ranks)
        assert arr.shape == tuple(topo.sizes[n] for n in names)
        assert sorted(arr.ravel().tolist()) == list(range(topo.world_size))
        for axis, name in enumerate(names):
            slices = np.moveaxis(arr, axis, -1).reshape(-1, arr.shape[axis]).tolist()
            assert sorted(slices) == sorted(topo.groups(name)), (grid, name)


def test_defaults_and_config():
    t = Topology(8, tp=2)
    assert (t.etp, t.dp, t.edp, t.order) == (2, 4, 4, ("tp", "cp", "ep", "dp", "pp"))
    assert Topology(8, tp=2, dp=4) == t and Topology(8, tp=2, dp=-1) == t
    cfg = ParallelConfig(tp=2, cp=2, pp=1, ep=4, etp=1)
    t = Topology.from_config(cfg, world_size=16, model=ModelConfig(num_experts=8, num_heads=4,
                                                                   num_kv_heads=2))
    assert t.sizes == {"world": 16, "tp": 2, "cp": 2, "dp": 4, "pp": 1, "ep": 4, "etp": 1,
                       "edp": 4}
    assert t.groups("ep") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert t.group("dp_cp", 5) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert t.group("embd", 5) == [5] and Topology(4, pp=4).group("embd", 1) is None
    with pytest.raises(KeyError, match="unknown group"):
        t.groups("xyz")
    with pytest.raises(ConfigError, match=r"^parallel\.dp: 3"):
        Topology.from_config(ParallelConfig(dp=3, tp=2), world_size=8)


@pytest.mark.parametrize("kwargs,field", [
    (dict(world_size=0), "world_size"),
    (dict(world_size=8, tp=0), "parallel.tp"),
    (dict(world_size=8, etp=3), "parallel.etp"),
    (dict(world_size=8, cp=16), "parallel.cp"),
    (dict(world_size=8, tp=2, dp=2), "parallel.dp"),
    (dict(world_size=8, order="tp-cp-ep-dp-xx"), "parallel.order"),
    (dict(world_size=8, order="tp-tp-dp"), "parallel.order"),
])
def test_invalid_arguments_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        Topology(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_experts=6), "model.num_experts"),
    (dict(num_heads=6), "model.num_heads"),
    (dict(num_kv_heads=2), "model.num_kv_heads"),
    (dict(ffn_hidden_size=30), "model.ffn_hidden_size"),
    (dict(num_layers=3), "model.num_layers"),
])
def test_check_model(kwargs, field):
    topo = Topology(64, tp=4, pp=2, ep=4, etp=4)
    topo.check_model(num_experts=8, num_heads=8, num_kv_heads=4, ffn_hidden_size=32, num_layers=4)
    with pytest.raises(ConfigError, match=f"^{field}:"):
        topo.check_model(**kwargs)


# --------------------------------------------------------------------------------------------------
GLOO_CASES = [(4, 2, 1, 1, 2, 1, "tp-cp-ep-dp-pp"), (4, 1, 2, 2, 2, 1, "tp-cp-ep-dp-pp"),
              (4, 2, 1, 2, 1, None, "tp-pp-dp"), (4, 1, 1, 1, 4, 1, "ep-tp-cp-dp-pp")]


def _gloo_worker(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        for case in GLOO_CASES:
            topo = _topo(case)
            pgs = create_process_groups(topo, timeout=timedelta(seconds=60))
            for name in GROUP_NAMES:
                expected = topo.group(name, rank)
                pg = pgs[name]
                if expected is None:
                    assert pg is None, (case, name)
                    continue
                assert dist.get_process_group_ranks(pg) == expected, (case, name)
                t = torch.tensor([rank], dtype=torch.int64)
                dist.all_reduce(t, group=pg)
                assert t.item() == sum(expected), (case, name, t.item(), expected)
            dense, expert = create_device_meshes(topo, "cpu")
            for mesh in (dense, expert):
                for name in mesh.mesh_dim_names:
                    pg = mesh.get_group(name)
                    assert dist.get_process_group_ranks(pg) == topo.group(name, rank), (case, name)
                    t = torch.tensor([rank], dtype=torch.int64)
                    dist.all_reduce(t, group=pg)
                    assert t.item() == sum(topo.group(name, rank)), (case, name)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_process_groups_gloo(tmp_path):
    import torch.multiprocessing as mp
    world = 4
    ctx = mp.start_processes(_gloo_worker, args=(world, str(tmp_path / "store")), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail("gloo workers did not finish within 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def test_create_process_groups_needs_init_and_matching_world():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        create_process_groups(Topology(4, tp=2))
