"""Process groups (and DeviceMeshes) for a :class:`~mmtrain.parallel.topology.Topology`.

This is the only step of the layout that talks to ``torch.distributed``; the rank lists come from
the pure :class:`Topology`, so invalid sizes have already failed before anything here runs.

``torch.distributed.new_group`` is collective over the whole world: every rank must call it for
every group, in the same order, even for groups it is not a member of. :func:`create_process_groups`
therefore walks :data:`GROUP_NAMES` and each name's groups in a fixed order on every rank, keeping
the handle of the group that contains the caller. The result is a plain :class:`ProcessGroups`
object that callers pass explicitly (there are no module-level globals).

Each name gets its own communicator even when two names have the same ranks (e.g. ``dp`` and
``dp_cp`` when cp = 1): separate communicators let collectives of different kinds (EP all-to-all
and ETP all-gather, SPEC §6) overlap instead of queueing on one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Iterable, Optional

import torch.distributed as dist

from mmtrain.parallel.topology import GROUP_NAMES, Topology

__all__ = ["ProcessGroups", "create_process_groups", "create_device_meshes"]

ProcessGroup = dist.ProcessGroup


@dataclass
class ProcessGroups:
    """The calling rank's process group of every kind (see :mod:`mmtrain.parallel.topology`).

    A field is ``None`` when the group kind was not requested, or (``embd``, ``pos_embd``) when
    the rank is in no group of that kind.
    """

    topology: Topology
    rank: int
    tp: Optional[ProcessGroup] = None
    cp: Optional[ProcessGroup] = None
    dp: Optional[ProcessGroup] = None
    dp_cp: Optional[ProcessGroup] = None
    pp: Optional[ProcessGroup] = None
    mp: Optional[ProcessGroup] = None
    tp_cp: Optional[ProcessGroup] = None
    tp_dp: Optional[ProcessGroup] = None
    tp_dp_cp: Optional[ProcessGroup] = None
    ep: Optional[ProcessGroup] = None
    etp: Optional[ProcessGroup] = None
    edp: Optional[ProcessGroup] = None
    etp_ep: Optional[ProcessGroup] = None
    etp_ep_pp: Optional[ProcessGroup] = None
    embd: Optional[ProcessGroup] = None
    pos_embd: Optional[ProcessGroup] = None

    def __getitem__(self, name: str) -> Optional[ProcessGroup]:
        if name not in GROUP_NAMES:
            raise KeyError(f"unknown group '{name}'; use one of {', '.join(GROUP_NAMES)}")
        return getattr(self, name)

    def ranks(self, name: str) -> Optional[list[int]]:
        """Global ranks of this rank's ``name`` group (from the topology; no collective)."""
        return self.topology.group(name, self.rank)

    def names(self) -> list[str]:
        """Names of the groups that were created and contain this rank."""
        return [f.name for f in fields(self) if f.name in GROUP_NAMES and getattr(self, f.name)]


def create_process_groups(topology: Topology, *, backend: Optional[str] = None,
                          timeout: Optional[timedelta] = None,
                          names: Optional[Iterable[str]] = None) -> ProcessGroups:
    """Create the process groups of ``topology``; collective: every rank must call it alike.

    Args:
        topology: the validated layout; its world size must equal the default group's.
        backend: backend of the new groups (``None``: the default group's).
        timeout: collective timeout of the new groups (``None``: the backend's default).
        names: group kinds to create (default: all of :data:`GROUP_NAMES`); creation always
            follows the canonical order, whatever order ``names`` lists them in.
    """
    if not dist.is_initialized():
        raise RuntimeError("create_process_groups needs torch.distributed to be initialised "
                           "(init_process_group) first")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != topology.world_size:
        raise ValueError(f"the launched world has {world} ranks but the topology was built for "
                         f"{topology.world_size}; launch {topology.world_size} processes or "
                         f"rebuild the topology with world_size={world}")
    wanted = set(GROUP_NAMES if names is None else names)
    unknown = wanted - set(GROUP_NAMES)
    if unknown:
        raise KeyError(f"unknown group(s) {sorted(unknown)}; use names of {', '.join(GROUP_NAMES)}")

    out = ProcessGroups(topology=topology, rank=rank)
    for name in GROUP_NAMES:  # fixed order: identical on every rank
        if name not in wanted:
            continue
        for ranks in topology.groups(name):
            pg = dist.new_group(ranks, timeout=timeout, backend=backend,
                                group_desc=f"mmtrain_{name}")
            if rank in ranks:
                setattr(out, name, pg)
    return out


def create_device_meshes(topology: Topology, device_type: str = "cpu"):
    """``(dense, expert)`` DeviceMeshes of ``topology``; collective like the groups above.

    The dense mesh has dims named from ``("pp", "dp", "cp", "tp")`` and the expert mesh from
    ``("pp", "edp", "ep", "etp")``, slowest first in ``topology.order``; ``mesh[name]`` covers the
    same ranks as ``topology.groups(name)``.
    """
    from torch.distributed.device_mesh import DeviceMesh

    meshes = []
    for grid in ("dense", "expert"):
        dim_names, ranks = topology.mesh(grid)
        meshes.append(DeviceMesh(device_type, ranks, mesh_dim_names=dim_names))
    return tuple(meshes)
