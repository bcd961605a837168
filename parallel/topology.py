"""The two rank grids over one world (SPEC §6), as pure functions of the parallel sizes.

mmtrain factorises the same ``world_size`` ranks twice, sharing the pipeline dimension:

* the **dense grid** (attention, norms, embeddings): ``world = pp × dp × cp × tp``;
* the **expert grid** (MoE layers):                 ``world = pp × edp × etp × ep``,
  where ``edp = world / (pp · etp · ep)`` is derived.

Rank layout follows megatron-core's ``RankGenerator`` exactly, so a job laid out by mmtrain
puts every rank where Megatron would. ``order`` names the dimensions from the fastest-varying
(adjacent ranks, usually intra-node) to the slowest, default ``"tp-cp-ep-dp-pp"``. Both grids use
the same order string: in the dense grid the ``ep`` slot has size 1; in the expert grid the ``tp``
slot holds ``etp``, the ``dp`` slot holds ``edp`` and the ``cp`` slot has size 1. A rank's
coordinates are the mixed-radix digits of its id in that order::

    rank = tp_rank + tp·(cp_rank + cp·(dp_rank + dp·pp_rank))         (dense, default order)
    rank = etp_rank + etp·(ep_rank + ep·(edp_rank + edp·pp_rank))     (expert, default order)

A *group* over a set of dimensions is the set of ranks that share every other coordinate; its
members are listed by increasing rank (the first listed dimension varies fastest), and the groups
are listed by the remaining coordinates in the same fastest-first order. Group names, with the
``RankGenerator`` token (over that grid) and the megatron-core getter of the same group:

=========  ======  ===========  ==============================================================
name       grid    token        megatron-core ``parallel_state`` getter
=========  ======  ===========  ==============================================================
tp         dense   tp           get_tensor_model_parallel_group()
cp         dense   cp           get_context_parallel_group()
dp         dense   dp           get_data_parallel_group()
dp_cp      dense   dp-cp        get_data_parallel_group(with_context_parallel=True)
pp         both    pp           get_pipeline_model_parallel_group()
mp         dense   tp-pp        get_model_parallel_group()
tp_cp      dense   tp-cp        get_tensor_and_context_parallel_group()
tp_dp      dense   tp-dp        get_tensor_and_data_parallel_group()
tp_dp_cp   dense   tp-dp-cp     get_tensor_and_data_parallel_group(with_context_parallel=True)
ep         expert  ep           get_expert_model_parallel_group()
etp        expert  tp           get_expert_tensor_parallel_group()
edp        expert  dp           get_expert_data_parallel_group()
etp_ep     expert  tp-ep        get_expert_tensor_and_model_parallel_group()
etp_ep_pp  expert  tp-ep-pp     get_expert_tensor_model_pipeline_parallel_group()
embd       dense   pp ends      get_embedding_group(): first and last rank of each pp group
pos_embd   dense   pp first     get_position_embedding_group(): first rank of each pp group
=========  ======  ===========  ==============================================================

``embd`` and ``pos_embd`` do not cover every rank (a middle pipeline stage is in neither).

Everything here is pure: :class:`Topology` validates the sizes (raising :class:`ConfigError`
that names the field and the fix) and computes rank lists without touching
``torch.distributed``. Creating process groups is a separate, explicit step
(:func:`mmtrain.parallel.groups.create_process_groups`), so invalid sizes fail before any
collective runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from mmtrain.config import ConfigError, ModelConfig, ParallelConfig

__all__ = ["DIMS", "DEFAULT_ORDER", "GROUP_NAMES", "RankInfo", "Topology"]

#: Megatron's order tokens. In the expert grid ``tp`` means ETP and ``dp`` means EDP.
DIMS = ("tp", "cp", "ep", "dp", "pp")
DEFAULT_ORDER = "tp-cp-ep-dp-pp"

# name -> (grid, order tokens spanned by the group)
_GROUP_DIMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tp": ("dense", ("tp",)),
    "cp": ("dense", ("cp",)),
    "dp": ("dense", ("dp",)),
    "dp_cp": ("dense", ("dp", "cp")),
    "pp": ("dense", ("pp",)),
    "mp": ("dense", ("tp", "pp")),
    "tp_cp": ("dense", ("tp", "cp")),
    "tp_dp": ("dense", ("tp", "dp")),
    "tp_dp_cp": ("dense", ("tp", "dp", "cp")),
    "ep": ("expert", ("ep",)),
    "etp": ("expert", ("tp",)),
    "edp": ("expert", ("dp",)),
    "etp_ep": ("expert", ("tp", "ep")),
    "etp_ep_pp": ("expert", ("tp", "ep", "pp")),
}
_PARTIAL_GROUPS = ("embd", "pos_embd")  # subsets of each PP group; not every rank is a member

#: Every name :meth:`Topology.groups` accepts, in the order process groups are created.
GROUP_NAMES: tuple[str, ...] = tuple(_GROUP_DIMS) + _PARTIAL_GROUPS

# Mesh dimension names of each grid's order tokens (size-1 slots are dropped from meshes).
_MESH_NAMES = {"dense": {"tp": "tp", "cp": "cp", "dp": "dp", "pp": "pp", "ep": None},
               "expert": {"tp": "etp", "ep": "ep", "dp": "edp", "pp": "pp", "cp": None}}


def _fail(field: str, msg: str) -> None:
    raise ConfigError(f"{field}: {msg}")


def _product(xs: Iterable[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


@dataclass(frozen=True)
class RankInfo:
    """Coordinates of one rank in both grids (each is also its index in that group)."""

    rank: int
    tp: int
    cp: int
    dp: int
    pp: int
    ep: int
    etp: int
    edp: int


class _Grid:
    """One mixed-radix factorisation of the world; ``order`` lists tokens fastest first."""

    def __init__(self, order: tuple[str, ...], sizes: dict[str, int]):
        self.order = order
        self.shape = tuple(sizes[t] for t in order)
        self.stride = tuple(_product(self.shape[:i]) for i in range(len(order)))

    def coords(self, rank: int) -> dict[str, int]:
        return {t: (rank // d) % s for t, s, d in zip(self.order, self.shape, self.stride)}

    def groups(self, tokens: tuple[str, ...]) -> list[list[int]]:
        """Rank lists of the groups spanning ``tokens``: members vary only in those coordinates."""
        inner = [i for i, t in enumerate(self.order) if t in tokens]
        outer = [i for i, t in enumerate(self.order) if t not in tokens]

        def offsets(dims: list[int]) -> list[int]:
            # Every combination of the digits of ``dims``, first dim fastest, as a rank offset.
            out = [0]
            for i in dims:
                out = [o + k * self.stride[i] for k in range(self.shape[i]) for o in out]
            return out

        members = offsets(inner)
        return [[base + m for m in members] for base in offsets(outer)]


class Topology:
    """Sizes of the dense and expert grids over ``world_size`` ranks, validated.

    Args:
        world_size: number of ranks.
        tp, cp, pp: tensor-, context- and pipeline-parallel sizes (dense grid).
        ep: expert-parallel size (expert grid).
        etp: expert-tensor-parallel size; ``None`` means ``tp`` (megatron-core's default).
        dp: data-parallel size of the dense grid; ``None`` or ``-1`` derives it as
            ``world / (tp·cp·pp)``; a given value must match that.
        order: rank order, fastest-varying first, as Megatron's ``order`` argument. Tokens are
            ``tp cp ep dp pp``; a token may be left out only when its size is 1 in both grids
            (it is then appended, as Megatron does).

    Raises:
        ConfigError: naming the offending field (``parallel.tp``, ``parallel.order``, …).
    """

    def __init__(self, world_size: int, tp: int = 1, cp: int = 1, pp: int = 1, ep: int = 1,
                 etp: Optional[int] = None, dp: Optional[int] = None,
                 order: str = DEFAULT_ORDER):
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            _fail("world_size", f"must be a positive integer, got {world_size!r}")
        etp = tp if etp is None else etp
        for name, value in (("tp", tp), ("cp", cp), ("pp", pp), ("ep", ep), ("etp", etp)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(f"parallel.{name}", f"must be a positive integer, got {value!r}")
            if world_size % value:
                _fail(f"parallel.{name}", f"{value} does not divide world size {world_size}; "
                      f"choose a divisor of {world_size}")
        self.world_size = world_size
        self.tp, self.cp, self.pp, self.ep, self.etp = tp, cp, pp, ep, etp

        # Dense grid: world = pp × dp × cp × tp.
        self._check_product("dense", "pp·dp·cp·tp", (("tp", tp), ("cp", cp), ("pp", pp)))
        derived_dp = world_size // (tp * cp * pp)
        if dp is not None and dp != -1:
            if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
                _fail("parallel.dp", f"must be a positive integer or -1 (derive), got {dp!r}")
            if dp != derived_dp:
                _fail("parallel.dp", f"{dp} × tp·cp·pp ({tp}·{cp}·{pp}) = {dp * tp * cp * pp} "
                      f"!= world size {world_size}; set dp={derived_dp} or -1 to derive it")
        self.dp = derived_dp

        # Expert grid: world = pp × edp × etp × ep.
        self._check_product("expert", "pp·edp·etp·ep", (("etp", etp), ("ep", ep), ("pp", pp)))
        self.edp = world_size // (etp * ep * pp)

        self.order = self._parse_order(order)
        self._dense = _Grid(self.order, {"tp": tp, "cp": cp, "ep": 1, "dp": self.dp, "pp": pp})
        self._expert = _Grid(self.order, {"tp": etp, "cp": 1, "ep": ep, "dp": self.edp, "pp": pp})
        self._cache: dict[str, list[list[int]]] = {}
        if self.groups("pp") != self._expert.groups(("pp",)):
            _fail("parallel.order", f"'{order}' gives the dense and expert grids different "
                  f"pipeline groups (tp={tp}, cp={cp} vs etp={etp}, ep={ep} before pp); both "
                  f"grids must share PP: put pp last, or make the sizes before pp match")

    # ---------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int,
                    model: Optional[ModelConfig] = None) -> "Topology":
        """Build from a recipe's ``parallel`` section; with ``model``, also :meth:`check_model`."""
        parallel.validate("parallel")
        topo = cls(world_size, tp=parallel.tp, cp=parallel.cp, pp=parallel.pp, ep=parallel.ep,
                   etp=parallel.etp, dp=parallel.dp, order=parallel.order)
        if model is not None:
            topo.check_model(num_experts=model.num_experts, num_heads=model.num_heads,
                             num_kv_heads=model.num_kv_heads, num_layers=model.num_layers,
                             ffn_hidden_size=model.ffn_hidden_size)
        return topo

    def _check_product(self, grid: str, formula: str, factors: tuple) -> None:
        running, used = 1, []
        for name, value in factors:
            running *= value
            used.append((name, value))
            if self.world_size % running:
                names = "·".join(n for n, _ in used)
                values = "·".join(str(v) for _, v in used)
                _fail(f"parallel.{name}", f"{names} = {values} = {running} does not divide world "
                      f"size {self.world_size} (the {grid} grid needs world = {formula}); "
                      f"reduce {' or '.join(n for n, _ in used)}")

    def _parse_order(self, order: str) -> tuple[str, ...]:
        if not isinstance(order, str) or not order.strip():
            _fail("parallel.order", f"must be a '-'-separated string such as '{DEFAULT_ORDER}', "
                  f"got {order!r}")
        tokens = order.lower().split("-")
        for t in tokens:
            if t not in DIMS:
                _fail("parallel.order", f"unknown token '{t}' in '{order}'; use tokens of "
                      f"{'-'.join(DIMS)}")
            if tokens.count(t) > 1:
                _fail("parallel.order", f"token '{t}' appears twice in '{order}'")
        largest = {"tp": max(self.tp, self.etp), "cp": self.cp, "ep": self.ep,
                   "dp": max(self.dp, self.edp), "pp": self.pp}
        for t in DIMS:
            if t not in tokens:
                if largest[t] != 1:
                    _fail("parallel.order", f"'{order}' leaves out '{t}' whose size is "
                          f"{largest[t]}; name every dimension larger than 1, e.g. "
                          f"'{DEFAULT_ORDER}'")
                tokens.append(t)
        # megatron-core's rule: unless pp is the slowest dimension, the dense and expert data-
        # parallel sizes must agree (otherwise the two grids could not share PP groups).
        if self.pp > 1 and not order.lower().endswith("pp") and self.dp != self.edp:
            _fail("parallel.order", f"'{order}' does not end with pp, which needs dp == edp "
                  f"(got dp={self.dp}, edp={self.edp}, pp={self.pp}); end the order with pp "
                  f"or choose ep·etp = tp·cp")
        return tuple(tokens)

    # ----------------------------------------------------------------------------- model checks
    def check_model(self, num_experts: Optional[int] = None, num_heads: Optional[int] = None,
                    num_kv_heads: Optional[int] = None, num_layers: Optional[int] = None,
                    ffn_hidden_size: Optional[int] = None, path: str = "model") -> "Topology":
        """Check that the model's sizes split evenly over this topology; returns ``self``.

        Experts over EP, query and KV heads over TP, expert FFN width over ETP, layers over PP.
        """
        checks = (("num_experts", num_experts, "ep", self.ep),
                  ("num_heads", num_heads, "tp", self.tp),
                  ("num_kv_heads", num_kv_heads, "tp", self.tp),
                  ("ffn_hidden_size", ffn_hidden_size, "etp", self.etp),
                  ("num_layers", num_layers, "pp", self.pp))
        for field, value, dim, size in checks:
            if value is not None and value % size:
                _fail(f"{path}.{field}", f"{value} is not divisible by parallel.{dim}={size}; "
                      f"choose a multiple of {size} or a parallel.{dim} that divides {value}")
        return self

    # ---------------------------------------------------------------------------- rank queries
    def groups(self, name: str) -> list[list[int]]:
        """All groups of kind ``name`` (see :data:`GROUP_NAMES`) as lists of global ranks."""
        if name not in self._cache:
            if name in _GROUP_DIMS:
                grid, tokens = _GROUP_DIMS[name]
                found = (self._dense if grid == "dense" else self._expert).groups(tokens)
            elif name == "embd":
                found = [[g[0], g[-1]] if len(g) > 1 else [g[0]] for g in self.groups("pp")]
            elif name == "pos_embd":
                found = [[g[0]] for g in self.groups("pp")]
            else:
                raise KeyError(f"unknown group '{name}'; use one of {', '.join(GROUP_NAMES)}")
            self._cache[name] = found
        return [list(g) for g in self._cache[name]]

    def group(self, name: str, rank: int) -> Optional[list[int]]:
        """The ranks of the ``name`` group containing ``rank`` (None if it is in none)."""
        self._check_rank(rank)
        for g in self._groups_view(name):
            if rank in g:
                return list(g)
        return None

    def _groups_view(self, name: str) -> list[list[int]]:
        if name not in self._cache:
            self.groups(name)
        return self._cache[name]

    def rank_info(self, rank: int) -> RankInfo:
        """Coordinates of ``rank`` in the dense and expert grids."""
        self._check_rank(rank)
        d, e = self._dense.coords(rank), self._expert.coords(rank)
        return RankInfo(rank=rank, tp=d["tp"], cp=d["cp"], dp=d["dp"], pp=d["pp"],
                        ep=e["ep"], etp=e["tp"], edp=e["dp"])

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside 0..{self.world_size - 1}")

    def mesh(self, grid: str = "dense") -> tuple[tuple[str, ...], list]:
        """``(dim_names, nested rank lists)`` of a grid, slowest dimension first.

        Ready for ``DeviceMesh(device_type, mesh, mesh_dim_names=dim_names)``; slicing that mesh
        by one name gives the same groups as :meth:`groups` (``"etp"``, ``"edp"`` … for the
        expert grid). The size-1 slot of each grid (ep in dense, cp in expert) is dropped.
        """
        if grid not in ("dense", "expert"):
            raise ValueError(f"grid must be 'dense' or 'expert', got {grid!r}")
        g = self._dense if grid == "dense" else self._expert
        keep = [i for i, t in enumerate(g.order) if _MESH_NAMES[grid][t] is not None]
        names = tuple(_MESH_NAMES[grid][g.order[i]] for i in reversed(keep))

        def build(level: int, base: int):
            i = keep[len(keep) - 1 - level]
            if level == len(keep) - 1:
                return [base + k * g.stride[i] for k in range(g.shape[i])]
            return [build(level + 1, base + k * g.stride[i]) for k in range(g.shape[i])]

        return names, build(0, 0)

    # ------------------------------------------------------------------------------ reporting
    @property
    def sizes(self) -> dict[str, int]:
        return {"world": self.world_size, "tp": self.tp, "cp": self.cp, "dp": self.dp,
                "pp": self.pp, "ep": self.ep, "etp": self.etp, "edp": self.edp}

    def _key(self) -> tuple:
        return (self.world_size, self.tp, self.cp, self.pp, self.ep, self.etp, self.order)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Topology) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Topology(world={self.world_size}, dense pp{self.pp}×dp{self.dp}×cp{self.cp}"
                f"×tp{self.tp}, expert pp{self.pp}×edp{self.edp}×etp{self.etp}×ep{self.ep}, "
                f"order='{'-'.join(self.order)}')")
