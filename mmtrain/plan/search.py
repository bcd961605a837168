"""The layout search and the :class:`Planner` that runs it: which layouts can run a model and stage
at all (mirroring ``parallel.apply.check_layout`` and ``Topology``, extended to CP and PP), the
enumeration of every such layout of the cluster's GPUs under the pins, and the ranking: the
fastest layouts that fit, or the least-memory ones when none does, each checked against
``Topology`` itself before it is reported.

``Planner`` is the memory model and the time model of one (model, stage, cluster, options) with
this search on top; callers import it from :mod:`mmtrain.plan`.
"""

from __future__ import annotations

import itertools
from typing import Optional

from mmtrain.config import ConfigError
from mmtrain.plan.config import ORDER, RECOMPUTE, Layout
from mmtrain.plan.memory import MemoryModel
from mmtrain.plan.timing import TimeModel


class Planner(MemoryModel, TimeModel):
    """Evaluates layouts of one (model, stage, cluster, options): :meth:`memory` (memory.py),
    :meth:`step_time` (timing.py), their shared constants and per-GPU shares (sharding.py), and
    validity and the search here."""

    def problems(self, lay: Layout) -> list:
        """Why a layout cannot run this model and stage (empty: valid). Mirrors
        ``parallel.apply.check_layout`` and ``Topology`` (cp and pp included, as planned)."""
        m, W, out = self.inv.cfg, self.cl.gpus, []
        if lay.world != W:
            out.append(f"tp·cp·pp·dp = {lay.world} != cluster.gpus={W}")
        if W % (lay.pp * lay.ep * lay.etp) or lay.edp != W // (lay.pp * lay.ep * lay.etp):
            out.append(f"pp·ep·etp = {lay.pp * lay.ep * lay.etp} does not divide {W}")
        if m.num_heads % lay.tp:
            out.append(f"model.num_heads={m.num_heads} not divisible by tp={lay.tp}")
        if m.num_kv_heads % lay.tp and lay.tp % m.num_kv_heads:
            out.append(f"model.num_kv_heads={m.num_kv_heads} and tp={lay.tp} must divide one "
                       f"another")
        if m.vocab_size % lay.tp:
            out.append(f"model.vocab_size={m.vocab_size} not divisible by tp={lay.tp}")
        if m.num_experts % lay.ep:
            out.append(f"model.num_experts={m.num_experts} not divisible by ep={lay.ep}")
        if m.ffn_hidden_size % lay.etp:
            out.append(f"model.ffn_hidden_size={m.ffn_hidden_size} not divisible by etp={lay.etp}")
        if m.num_layers % lay.pp:
            out.append(f"model.num_layers={m.num_layers} not divisible by pp={lay.pp}")
        if self.stage.seq_len % lay.cp:
            out.append(f"data.seq_len={self.stage.seq_len} not divisible by cp={lay.cp}")
        elif (lay.micro_batch * self.stage.seq_len // lay.cp) % lay.tp:
            out.append(f"micro-batch tokens per CP rank not divisible by tp={lay.tp} (SP)")
        if self.stage.global_rows % (lay.dp * lay.micro_batch):
            out.append(f"global batch {self.stage.global_rows} rows not a multiple of "
                       f"micro_batch·dp = {lay.micro_batch}·{lay.dp}")
        return out

    def topology_check(self, lay: Layout) -> None:
        """Raise ConfigError unless :class:`Topology` accepts the layout (both grids)."""
        from mmtrain.parallel.topology import Topology

        topo = Topology(self.cl.gpus, tp=lay.tp, cp=lay.cp, pp=lay.pp, ep=lay.ep, etp=lay.etp,
                        dp=lay.dp, order=ORDER)
        topo.check_model(num_experts=self.E, num_heads=self.H, num_layers=self.inv.cfg.num_layers,
                         ffn_hidden_size=self.F)
        assert topo.edp == lay.edp

    def evaluate(self, lay: Layout) -> dict:
        """One layout's report: {layout, memory, time} (``plan_cli.result_dict`` renders it)."""
        return {"layout": lay, "memory": self.memory(lay), "time": self.step_time(lay)}

    def candidates(self, pins: dict, micro_batch: Optional[int]):
        """Every layout of the cluster's GPUs satisfying :meth:`problems` and the pins."""
        W, cl, o = self.cl.gpus, self.cl, self.opts
        divs = [d for d in range(1, W + 1) if W % d == 0]
        max_tp = o.max_tp or cl.gpus_per_node
        max_etp = o.max_etp or cl.gpus_per_node

        def choices(name, pool):
            return [pins[name]] if name in pins else pool

        modes = [o.recompute] if o.recompute != "auto" else list(RECOMPUTE)
        zero = [pins["zero1"]] if "zero1" in pins else [True]
        for tp, cp, pp in itertools.product(choices("tp", [d for d in divs if d <= max_tp]),
                                            choices("cp", divs), choices("pp", divs)):
            if W % (tp * cp * pp):
                continue
            dp = W // (tp * cp * pp)
            if "dp" in pins and pins["dp"] not in (-1, dp):
                continue
            if self.stage.global_rows % dp:
                continue
            rows = self.stage.global_rows // dp
            mbs = [micro_batch] if micro_batch else [b for b in (1, 2, 4, 8) if rows % b == 0]
            for ep, etp in itertools.product(choices("ep", divs),
                                             choices("etp", [d for d in divs if d <= max_etp])):
                if W % (pp * ep * etp):
                    continue
                edp = W // (pp * ep * etp)
                for mb, mode, z in itertools.product(mbs, modes, zero):
                    lay = Layout(tp, cp, pp, dp, ep, etp, edp, mb, mode, z)
                    if not self.problems(lay):
                        yield lay

    def search(self, pins: dict, micro_batch: Optional[int]) -> dict:
        """The ``plan.top`` fastest fitting candidates (or, when none fits, the least-memory
        ones), in order; ties keep the enumeration order (the sorts are stable). Step time is
        computed only for the layouts that fit: only they are ranked by it."""
        fitting, closest, n = [], [], 0
        for lay in self.candidates(pins, micro_batch):
            n += 1
            mem = self.memory(lay)
            if mem["fits"]:
                fitting.append((self.step_time(lay)["step_s"], lay))
            else:
                closest.append((mem["peak"], lay))
        fitting.sort(key=lambda x: x[0])
        closest.sort(key=lambda x: x[0])
        top = []
        for _, lay in fitting if fitting else closest:
            try:
                self.topology_check(lay)
            except ConfigError:
                continue
            top.append(self.evaluate(lay))
            if len(top) >= self.opts.top:
                break
        return {"searched": n, "fitting": len(fitting), "results": top}
