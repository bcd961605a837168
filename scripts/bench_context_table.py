"""The printed tables of ``scripts/bench_context.py`` (from its result dict, the same numbers as
its ``--out`` JSON): the local softmax op, the lightning ops per partition, the ring, the checks."""

#: the softmax impls of ``--softmax-impl`` and their names in the tables and logs
IMPL_NAMES = {"flash": "FlashAttention-2 varlen", "flex": "FlexAttention"}


def table(res) -> str:
    """The text tables of a :mod:`bench_context` result ``res`` (its JSON)."""
    world = res["world"]
    lines = []
    impls = res["softmax_impls"]
    if res["softmax_op"]:
        lines += ["", "local softmax op, fwd+bwd (H=%d over G=%d KV heads, d=128): DocSoftmaxOp "
                  "per impl vs SoftmaxOp (speed-up = SoftmaxOp / DocSoftmaxOp)" % (
                      res["softmax_op"][0]["H"], res["softmax_op"][0]["G"]),
                  f"{'T':>8} {'docs':>5} " + "".join(f"{i + ' ms':>12} {'speed-up':>9} "
                                                     for i in impls) + f"{'SoftmaxOp ms':>13}"]
        for r in res["softmax_op"]:
            lines.append(f"{r['T']:>8} {r['docs']:>5} " + "".join(
                f"{r[f'doc_{i}_ms']:>12.3f} {r[f'speedup_{i}']:>9.2f} " for i in impls)
                + f"{r['per_doc_sdpa_ms']:>13.3f}")
    emul = res.get("emulate_cp")
    lines += ["", f"lightning fwd+bwd, one document per row, CP={emul or world}"
              + (f" emulated on one GPU (each rank's share in turn, the slowest shown; no "
                 f"collectives, comm 0)" if emul else "")
              + " (ns/token per GPU; vs CP=1 = per-GPU throughput relative to one GPU; comm = "
              "collectives alone / op)",
              f"{'H':>3} {'T/GPU':>8} {'CP=1 ns/tok':>12} " + "".join(
                  f"{name + ' ns/tok':>{len(name) + 8}} {'vs CP=1':>8} {'comm':>6} "
                  for _, name in res["lightning_columns"])]
    for r in res["lightning"]:
        s = f"{r['H']:>3} {r['T_per_gpu']:>8} {r['cp1_ns_per_token']:>12.3f} "
        for key, name in res["lightning_columns"]:
            s += (f"{r[key + '_ns_per_token']:>{len(name) + 8}.3f} {r[key + '_vs_cp1']:>8.3f} "
                  f"{r[key + '_comm_share']:>6.1%} ")
        lines.append(s)
    for r in res["ring"]:
        lines += ["", f"varlen ring attention fwd+bwd, softmax impl {r['softmax_impl']} "
                  f"({IMPL_NAMES[r['softmax_impl']]}): {r['T_total']} tokens, {r['docs']} docs "
                  f"(max {r['max_doc']}), H={r['H']} over G={r['G']}"
                  + (f", {r['balance']} partition" if r["balance"] else ""),
                  f"CP=1 (whole batch, one GPU, DocSoftmaxOp {r['softmax_impl']}): "
                  f"{r['cp1_ms']:.3f} ms"]
        if world > 1:
            lines.append(f"CP={world}: {r['cp_ms']:.3f} ms (per rank {', '.join(f'{x:.3f}' for x in r['cp_ms_per_rank'])}); "
                         f"fraction of ideal scaling {r['ideal_fraction']:.3f}; attended pairs per "
                         f"rank {r['pairs_per_rank']}; hops {r['ring_hops']}")
    lines += ["", "checks: " + "; ".join(f"{c['check']}: {c['max_rel_err']:.1e}"
                                         for c in res["checks"])]
    return "\n".join(lines)
