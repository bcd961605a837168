"""The parameter inventory: every parameter of the model, counted by sharding class (TP-split
GEMM, TP-split other, k/v projection, replicated, router, experts) and layer kind, read off the
model built on the meta device so that it follows the code rather than a formula; an unknown
parameter name is an error, not a guess. Also the PP split of the layers, which both the memory
and the time model walk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmtrain.config import ModelConfig


@dataclass
class Inventory:
    """Parameter counts by sharding class, read off the model built on the meta device."""

    cfg: ModelConfig
    kinds: list  # layer kinds
    embed: int = 0
    lm_head: int = 0
    final_norm: int = 0
    # per layer kind: numel by class (identical for every layer of a kind)
    tp_gemm: dict = field(default_factory=dict)  # split over TP, cast to bf16 for a GEMM
    tp_other: dict = field(default_factory=dict)  # split over TP, not a GEMM (lightning norm)
    kv_gemm: dict = field(default_factory=dict)  # k/v projections (split or replicated)
    replicated: dict = field(default_factory=dict)  # layer norms (not GEMMs)
    router: dict = field(default_factory=dict)  # replicated, fp32 GEMM (no bf16 copy)
    experts: dict = field(default_factory=dict)  # all experts of one layer
    flops_per_token: float = 0.0  # training FLOPs at the stage's seq_len (account)
    flops_per_token_no_seq: float = 0.0  # the same at seq_len 0 (no softmax attention core)

    @property
    def total(self) -> int:
        per = sum(sum(d.get(k, 0) for d in (self.tp_gemm, self.tp_other, self.kv_gemm,
                                            self.replicated, self.router, self.experts))
                  for k in self.kinds)
        return self.embed + self.lm_head + self.final_norm + per


_CLASSES = {"qkv_proj": "tp_gemm", "gate_proj": "tp_gemm", "out_proj": "tp_gemm",
            "q_proj": "tp_gemm", "o_proj": "tp_gemm", "k_proj": "kv_gemm", "v_proj": "kv_gemm",
            "norm": "tp_other"}


def build_inventory(cfg: ModelConfig, seq_len: int) -> Inventory:
    from mmtrain.model.accounting import account, build_meta_model

    model = build_meta_model(cfg)
    inv = Inventory(cfg=cfg, kinds=cfg.layer_types())
    seen: dict = {}
    for name, p in model.named_parameters():
        n = p.numel()
        if name == "embed.weight":
            inv.embed = n
        elif name == "lm_head.weight":
            inv.lm_head = n
        elif name == "final_norm.weight":
            inv.final_norm = n
        else:
            parts = name.split(".")  # layers.<i>.<module>...
            i, kind = int(parts[1]), inv.kinds[int(parts[1])]
            if parts[2] in ("input_norm", "post_norm"):
                cls = "replicated"
            elif parts[2] == "moe":
                cls = "router" if parts[3] == "router" else "experts"
            elif parts[2] == "attn" and parts[3] in _CLASSES:
                cls = _CLASSES[parts[3]]
            else:
                raise ValueError(f"plan: no sharding rule for parameter {name}; "
                                 f"teach mmtrain/plan/inventory.py about it")
            seen.setdefault((i, cls), 0)
            seen[(i, cls)] += n
    for (i, cls), n in seen.items():
        d = getattr(inv, cls)
        kind = inv.kinds[i]
        if d.get(kind, n) != n:
            raise ValueError(f"plan: layers of kind {kind} differ in {cls} parameters")
        d[kind] = n
    inv.flops_per_token = account(cfg, seq_len).flops_per_token
    inv.flops_per_token_no_seq = account(cfg, 0).flops_per_token
    return inv


def stage_layers(kinds: list, pp: int) -> list:
    """Per PP stage: (lightning layers, softmax layers) of its contiguous share (layers split
    evenly and in order over the stages, as ``Layout.pp`` requires ``pp | num_layers``)."""
    n = len(kinds) // pp
    return [(kinds[s * n:(s + 1) * n].count("lightning"), kinds[s * n:(s + 1) * n].count("softmax"))
            for s in range(pp)]

