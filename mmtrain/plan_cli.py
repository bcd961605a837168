"""``mmtrain plan`` on the command line: overrides into a :class:`PlanRequest` (the recipe,
``cluster=``/``cluster.*`` from ``recipes/cluster/``, ``plan.*``, layout pins), the search, and the
report (a table, or ``--json``). The model itself is :mod:`mmtrain.plan`; docs/plan.md has it all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from mmtrain.config import Config, ConfigError
from mmtrain.plan import (GIB, ClusterConfig, Inventory, Layout, PlanConfig, Planner, Stage,
                          build_inventory)

__all__ = ["PlanRequest", "parse_request", "plan", "main", "result_dict", "format_result",
           "load_cluster"]


# ---------------------------------------------------------------------------------- reporting
def _gib(x: float) -> float:
    return x / GIB


def result_dict(res: dict) -> dict:
    """JSON-ready view of :meth:`Planner.evaluate` (bytes in GiB, seconds)."""
    mem, lay = res["memory"], res["layout"]
    out_mem = {}
    for key, v in mem.items():
        if isinstance(v, dict):
            out_mem[key] = {k: round(_gib(x), 4) for k, x in v.items()}
        elif isinstance(v, bool) or key in ("stage", "inflight_micro_batches"):
            out_mem[key] = v
        elif key == "params":
            out_mem["params"] = int(v)
        else:
            out_mem[key] = round(_gib(v), 4)
    t = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in res["time"].items()
         if k != "per_micro_batch"}
    t["per_micro_batch_s"] = {k: round(v, 6) for k, v in res["time"]["per_micro_batch"].items()}
    return {"layout": asdict(lay), "name": lay.name(), "memory_gib": out_mem, "time": t,
            "fits": mem["fits"]}


def format_result(res: dict) -> str:
    mem, t, lay = res["memory"], res["time"], res["layout"]
    act, comm = mem["activations"], mem["comm_buffers"]
    rows = [("weights", mem["weights"]),
            ("bf16 weight copies (autocast)", mem["bf16_weight_copies"]),
            ("gradients (fp32)", mem["grads"]), ("optimizer: fp32 master", mem["optimizer_master"]),
            ("optimizer: 2 moments (fp32)", mem["optimizer_moments"]),
            ("optimizer: wd mask (fp32)", mem["optimizer_wd_mask"])]
    rows += [(f"activations: {k}", v) for k, v in act.items()]
    rows += [(f"comm buffers: {k}", v) for k, v in comm.items()]
    lines = [f"layout  {lay.name()}   (PP stage {mem['stage']} is the largest; "
             f"{mem['params'] / 1e9:.3f} B params on it)"]
    lines += [f"  {name:<36}{_gib(v):>10.2f} GiB" for name, v in rows if v]
    lines.append(f"  {'peak (backward)':<36}{_gib(mem['backward_peak']):>10.2f} GiB")
    lines.append(f"  {'peak (optimizer step)':<36}{_gib(mem['step_peak']):>10.2f} GiB")
    lines.append(f"  {'usable (after headroom)':<36}{_gib(mem['capacity']):>10.2f} GiB   "
                 + ("fits" if mem["fits"] else "DOES NOT FIT"))
    pm = t["per_micro_batch"]
    lines.append(f"step {t['step_s']:.3f} s  ({t['tokens_per_s']:,.0f} tokens/s, MFU "
                 f"{t['mfu'] * 100:.1f}%): {t['micro_batches']} micro-batches × "
                 f"{pm['total'] * 1e3:.1f} ms [compute {pm['compute'] * 1e3:.1f}, TP "
                 f"{pm['tp'] * 1e3:.1f}, EP {pm['ep'] * 1e3:.1f}, CP {pm['cp'] * 1e3:.1f}, PP "
                 f"{pm['pp'] * 1e3:.1f}], bubble {t['bubble'] * 100:.1f}%, DP exposed "
                 f"{t['dp_exposed_s'] * 1e3:.1f} ms, optimizer {t['optimizer_s'] * 1e3:.1f} ms")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- CLI
_PINNABLE = ("tp", "cp", "pp", "dp", "ep", "etp", "zero1")


def _parse_value(s: str):
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    import yaml

    try:
        return yaml.safe_load(s)
    except yaml.YAMLError:
        return s


def load_cluster(name: str, overrides: dict) -> ClusterConfig:
    import yaml

    from mmtrain.config import _build
    from mmtrain.recipe import recipes_dir

    folder = recipes_dir() / "cluster"
    options = sorted(p.stem for p in folder.glob("*.yaml"))
    if name not in options:
        raise ConfigError(f"cluster.gpu: no cluster recipe '{name}'; available: "
                          f"{', '.join(options)} (files in recipes/cluster/)")
    data = yaml.safe_load((folder / f"{name}.yaml").read_text())
    data.update(overrides)
    data["gpu"] = name
    cl = _build("cluster", ClusterConfig, data)
    cl.validate("cluster")
    return cl


@dataclass
class PlanRequest:
    cfg: Config
    cluster: ClusterConfig
    opts: PlanConfig
    stage: Stage
    pins: dict
    micro_batch: Optional[int]


def parse_request(args: list) -> PlanRequest:
    """Split ``mmtrain plan`` overrides into the recipe's and the planner's (``cluster=NAME``,
    ``cluster.*``, ``plan.*``) and validate everything; ConfigError names the field."""
    from mmtrain.config import _build
    from mmtrain.recipe import compose, config_from_dict

    recipe, cl_over, plan_over, cluster_name = [], {}, {}, "h800"
    pins: dict = {}
    for a in args:
        if "=" not in a:
            raise ConfigError(f"{a}: an override must look like key=value "
                              f"(e.g. cluster.gpus=1024)")
        key, value = a.split("=", 1)
        if key == "cluster":
            cluster_name = value
        elif key.startswith("cluster."):
            sub = key[len("cluster."):]
            if sub == "gpu":
                cluster_name = value
            else:
                cl_over[sub] = _parse_value(value)
        elif key.startswith("plan."):
            plan_over[key[len("plan."):]] = _parse_value(value)
        else:
            recipe.append(a)
            if key.startswith("parallel.") and key[len("parallel."):] in _PINNABLE:
                pins[key[len("parallel."):]] = None  # value read from the composed recipe
            elif key == "parallel":
                pins.update({k: None for k in _PINNABLE if k != "dp"})
    data = compose(recipe)
    cfg = config_from_dict(data)
    opts = _build("plan", PlanConfig, plan_over)
    opts.validate("plan")
    cluster = load_cluster(cluster_name, cl_over)
    for k in list(pins):
        pins[k] = getattr(cfg.parallel, k)
    if pins.get("dp") == -1:
        del pins["dp"]
    seq = cfg.data.seq_len
    if opts.global_batch_tokens is not None:
        if opts.global_batch_tokens % seq:
            raise ConfigError(f"plan.global_batch_tokens: {opts.global_batch_tokens} is not a "
                              f"multiple of data.seq_len={seq}; make it one (whole rows)")
        rows = opts.global_batch_tokens // seq
    else:
        rows = cfg.train.global_batch
    if not opts.search:
        pins = {k: getattr(cfg.parallel, k) for k in _PINNABLE}
        if pins["dp"] == -1:
            del pins["dp"]
        if opts.recompute == "auto":
            opts.recompute = cfg.train.recompute  # the recipe's own setting
    if opts.fused_ce is None:
        opts.fused_ce = bool(cfg.train.fused_ce)
    if opts.cp_balanced is None:
        opts.cp_balanced = cfg.parallel.cp_balance != "contiguous"
    return PlanRequest(cfg, cluster, opts, Stage(seq, rows), pins, cfg.train.micro_batch)


def plan(req: PlanRequest, inv: Optional[Inventory] = None) -> tuple:
    """(planner, search result) of a request; the inventory may be passed in (tests reuse it)."""
    inv = inv or build_inventory(req.cfg.model, req.stage.seq_len)
    pl = Planner(inv, req.stage, req.cluster, req.opts, req.cfg.parallel.moe_overlap_groups,
                 req.cfg.parallel.bucket_mb)
    if not req.opts.search:
        p = req.pins
        tp, cp, pp = p["tp"], p["cp"], p["pp"]
        W = req.cluster.gpus
        if W % (tp * cp * pp):
            raise ConfigError(f"parallel.tp: tp·cp·pp = {tp * cp * pp} does not divide "
                              f"cluster.gpus={W}; choose sizes whose product divides it")
        dp = W // (tp * cp * pp)
        if W % (pp * p["ep"] * p["etp"]):
            raise ConfigError(f"parallel.ep: pp·ep·etp = {pp * p['ep'] * p['etp']} does not "
                              f"divide cluster.gpus={W}")
        mb = req.micro_batch or max(req.stage.global_rows // dp, 1)
        lay = Layout(tp, cp, pp, dp, p["ep"], p["etp"], W // (pp * p["ep"] * p["etp"]), mb,
                     req.opts.recompute, p["zero1"])
        bad = pl.problems(lay)
        if bad:
            raise ConfigError(f"parallel: the layout {lay.name()} cannot run: {bad[0]}")
        pl.topology_check(lay)
        return pl, {"searched": 1, "fitting": int(pl.memory(lay)["fits"]),
                    "results": [pl.evaluate(lay)]}
    res = pl.search(req.pins, req.micro_batch)
    if not res["searched"]:
        where = ("parallel." + next(iter(req.pins))) if req.pins else "cluster.gpus"
        pinned = f" with {req.pins} pinned" if req.pins else ""
        raise ConfigError(f"{where}: no valid layout of {req.cluster.gpus} GPUs{pinned} for "
                          f"{req.cfg.model.name} at seq {req.stage.seq_len} and "
                          f"{req.stage.global_rows} rows; sizes must divide the model and every "
                          f"DP rank needs whole micro-batches (docs/plan.md, Validity)")
    return pl, res


def main(args: list) -> int:
    """``mmtrain plan [--json] [overrides]``: 0 when a layout fits, 1 when none does."""
    import json

    as_json = "--json" in args
    req = parse_request([a for a in args if a != "--json"])
    pl, res = plan(req)
    results = res["results"]
    fits = bool(results) and results[0]["memory"]["fits"]
    if as_json:
        print(json.dumps({
            "model": req.cfg.model.name, "params_total": pl.inv.total,
            "flops_per_token": pl.inv.flops_per_token,
            "stage": {"seq_len": req.stage.seq_len, "global_rows": req.stage.global_rows,
                      "global_tokens": req.stage.global_tokens},
            "cluster": asdict(req.cluster), "options": asdict(req.opts),
            "pins": req.pins, "searched": res["searched"], "fitting": res["fitting"],
            "fits": fits, "results": [result_dict(r) for r in results]}))
        return 0 if fits else 1
    cl, st = req.cluster, req.stage
    print(f"plan: {req.cfg.model.name} ({pl.inv.total / 1e9:.2f} B params, "
          f"{pl.inv.flops_per_token / 1e9:.1f} GFLOP/token at seq {st.seq_len:,}) on "
          f"{cl.gpus} × {cl.gpu} ({cl.memory_gib} GiB, {cl.bf16_tflops:g} TFLOP/s bf16); "
          f"global batch {st.global_rows} rows = {st.global_tokens:,} tokens; "
          f"params {req.opts.param_dtype}, efficiency {req.opts.efficiency}, "
          f"headroom {req.opts.headroom}")
    if req.opts.search:
        print(f"searched {res['searched']} valid layouts, {res['fitting']} fit"
              + (f"; pinned {req.pins}" if req.pins else ""))
    if not fits:
        print("NO LAYOUT FITS; the closest (least memory):")
    print(format_result(results[0]))
    if len(results) > 1:
        print(f"\n{'#':<3}{'layout':<52}{'peak GiB':>10}{'step s':>10}{'MFU':>8}")
        for i, r in enumerate(results, 1):
            print(f"{i:<3}{r['layout'].name():<52}{_gib(r['memory']['peak']):>10.2f}"
                  f"{r['time']['step_s']:>10.3f}{r['time']['mfu'] * 100:>7.1f}%")
    return 0 if fits else 1
