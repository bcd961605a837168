"""Typed configuration: one dataclass per recipe section, each with its own ``validate()``.

A recipe (Hydra YAML plus command-line overrides) is turned into :class:`Config` by
:func:`config_from_dict`, which rejects unknown keys and wrong types, then every section checks its
own invariants. Every error is one :class:`ConfigError` line that names the field and the fix, and
all of it happens before any process group or model exists.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A recipe value is wrong; the message names the field (dotted path) and the fix."""


def _fail(path: str, msg: str) -> None:
    raise ConfigError(f"{path}: {msg}")


def _check_seed(path: str, seed: int) -> None:
    if not 0 <= seed < 2**63:
        _fail(path, f"must be within 0..2**63-1 (a torch seed), got {seed}")


# --------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The MiniMax architecture (SPEC §1–5)."""

    name: str = "tiny"
    vocab_size: int = 258
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    head_dim: Optional[int] = 32  # null: hidden_size // num_heads (must divide)
    num_kv_heads: int = 2
    # Layer layout: softmax at every k-th layer (0-based l with (l+1) % k == 0), or the explicit list
    # ``softmax_layers`` (takes precedence). softmax_every=0 and softmax_layers=[] mean all-lightning;
    # softmax_every=1 means all-softmax.
    softmax_every: int = 8
    softmax_layers: Optional[list] = None
    # MoE
    num_experts: int = 4
    top_k: int = 2
    ffn_hidden_size: int = 256
    capacity_factor: Optional[float] = None  # None: dropless
    # Global routing (SPEC §4): capacity is judged over the tokens of every rank of the step's
    # batch (counts all-gathered) instead of each rank's own tokens. Same as local on one process.
    global_routing: bool = False
    # Positions
    rope_theta: float = 10000.0
    rotary_dim: Optional[int] = None  # None: head_dim // 2 (MiniMax's partial RoPE)
    max_position_embeddings: int = 10_240_000
    # Norms and residual
    norm_eps: float = 1e-5
    lightning_norm_eps: float = 1e-6
    norm_scheme: str = "deepnorm"  # "deepnorm" (post-norm, as released) or "prenorm"
    embedding_init_std: float = 1.0
    # Lightning attention block size of the torch/Triton block form
    lightning_block_size: int = 64

    def layer_types(self) -> list[str]:
        if self.softmax_layers is not None:
            soft = set(int(i) for i in self.softmax_layers)
        elif self.softmax_every == 0:
            soft = set()
        else:
            soft = {l for l in range(self.num_layers) if (l + 1) % self.softmax_every == 0}
        return ["softmax" if l in soft else "lightning" for l in range(self.num_layers)]

    @property
    def deepnorm_alpha(self) -> float:
        return (2.0 * self.num_layers) ** 0.25

    @property
    def deepnorm_beta(self) -> float:
        return (8.0 * self.num_layers) ** -0.25

    @property
    def rope_dim(self) -> int:
        return self.head_dim // 2 if self.rotary_dim is None else int(self.rotary_dim)

    def validate(self, path: str = "model") -> None:
        if self.head_dim is None:
            if self.num_heads < 1 or self.hidden_size % self.num_heads:
                _fail(f"{path}.num_heads", f"{self.num_heads} heads do not divide hidden_size="
                      f"{self.hidden_size}; choose a divisor of hidden_size or set model.head_dim")
            self.head_dim = self.hidden_size // self.num_heads
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim",
                     "num_kv_heads", "num_experts", "top_k", "ffn_hidden_size",
                     "lightning_block_size"):
            if getattr(self, name) < 1:
                _fail(f"{path}.{name}", f"must be a positive integer, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            _fail(f"{path}.num_kv_heads", f"{self.num_kv_heads} does not divide num_heads="
                  f"{self.num_heads}; choose a divisor of num_heads (GQA groups must be equal)")
        if self.top_k > self.num_experts:
            _fail(f"{path}.top_k", f"{self.top_k} exceeds num_experts={self.num_experts}; "
                  f"set top_k <= num_experts")
        if self.softmax_every < 0:
            _fail(f"{path}.softmax_every", f"must be >= 0 (0 = all lightning), got {self.softmax_every}")
        if self.softmax_layers is not None:
            for i in self.softmax_layers:
                if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.num_layers:
                    _fail(f"{path}.softmax_layers", f"index {i} is out of range for num_layers="
                          f"{self.num_layers}; use 0-based indices 0..{self.num_layers - 1}")
        rd = self.rope_dim
        if rd < 0 or rd > self.head_dim or rd % 2:
            _fail(f"{path}.rotary_dim", f"{rd} must be even and within 0..head_dim={self.head_dim}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            _fail(f"{path}.capacity_factor", f"must be > 0 or null (dropless), got {self.capacity_factor}")
        if self.norm_scheme not in ("deepnorm", "prenorm"):
            _fail(f"{path}.norm_scheme", f"unknown '{self.norm_scheme}'; use 'deepnorm' or 'prenorm'")
        for name in ("norm_eps", "lightning_norm_eps", "rope_theta", "embedding_init_std"):
            if not getattr(self, name) > 0:
                _fail(f"{path}.{name}", f"must be > 0, got {getattr(self, name)}")
        if self.max_position_embeddings < 1:
            _fail(f"{path}.max_position_embeddings",
                  f"must be >= 1, got {self.max_position_embeddings}")


# --------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Tokenizer, corpus and packing."""

    tokenizer: str = "byte"  # "byte" or a path to a HF tokenizer.json
    corpus: str = "stdlib"  # "stdlib" (embedded), a text file, a folder of text files, or a .jsonl
    corpus_max_bytes: int = 8_000_000  # cap on the text read from the corpus (0 = no cap)
    seq_len: int = 256
    seed: int = 1234
    # Where data.corpus is preprocessed to .bin/.idx on first use (null: $MMTRAIN_CACHE or
    # ~/.cache/mmtrain). See mmtrain/data/preprocess.py.
    cache_dir: Optional[str] = None
    # Megatron blend: a flat list of weight/prefix pairs [0.3, /data/a_text_document, 0.7, ...];
    # null: data.corpus alone. Weights are shares of rows (hence tokens). mmtrain/data/blend.py.
    blend: Optional[list] = None
    # Length mixture (mmtrain/data/mixture.py): documents bucketed by token length into short <
    # length_bounds[0] <= medium <= length_bounds[1] < long; ``mixture`` = [short, medium, long]
    # shares of rows (null: no bucketing). ``mixture_from`` (the previous stage's weights) moves
    # linearly to ``mixture`` over the first ``transition`` fraction of the stage's tokens.
    length_bounds: list = field(default_factory=lambda: [32768, 131072])
    mixture: Optional[list] = None
    mixture_from: Optional[list] = None
    transition: float = 0.0
    # QA component: a blend of its own, ``qa_fraction`` of the rows in the last ``qa_window``
    # fraction of the stage (SPEC §7: 10% in the last 20%).
    qa_blend: Optional[list] = None
    qa_fraction: float = 0.0
    qa_window: float = 0.2

    def validate(self, path: str = "data") -> None:
        from mmtrain.data.mixture import validate_data_config

        validate_data_config(self, path)
        if self.seq_len < 2:
            _fail(f"{path}.seq_len", f"must be >= 2, got {self.seq_len}")
        if self.corpus_max_bytes < 0:
            _fail(f"{path}.corpus_max_bytes", f"must be >= 0 (0 = no cap), got {self.corpus_max_bytes}")
        if not self.tokenizer:
            _fail(f"{path}.tokenizer", "is empty; use 'byte' or a path to a tokenizer.json")
        if not self.corpus:
            _fail(f"{path}.corpus", "is empty; use 'stdlib' or a path to text")
        _check_seed(f"{path}.seed", self.seed)


# --------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints and logging."""

    max_steps: int = 200
    global_batch: int = 8  # rows (packed sequences of data.seq_len) per optimizer step
    # rows per forward/backward on one data-parallel rank; null: global_batch / dp (no
    # accumulation), so the same recipe runs on any number of processes
    micro_batch: Optional[int] = None
    lr: float = 3e-3
    min_lr: float = 3e-4
    # constant: linear warm-up then lr. cosine: warm-up then cosine from lr to min_lr at max_steps.
    # exp_decay: warm-up, constant lr until decay_start, then exponential decay reaching min_lr at
    # max_steps (the paper's main-run shape: 2e-4 constant, then decay to 3e-5).
    schedule: str = "cosine"
    warmup_steps: int = 20
    decay_start: int = 0  # exp_decay: step where the exponential decay starts (>= warmup_steps)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    aux_loss_coef: float = 0.01  # in mmtrain's E·Σ f·m normalisation (SPEC §4)
    seed: int = 1234
    ckpt_every: int = 0  # 0: only at the end
    keep_last: int = 2
    log_every: int = 1
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    # Parameter storage (Megatron's --bf16): bf16 stores bf16 parameters (and so bf16
    # activations and residual stream) with fp32 master weights in the optimizer and gradients
    # accumulated over micro-batches in fp32 buckets (mmtrain/parallel/data.py); fp32 keeps fp32
    # parameters under bf16 autocast. auto: bf16 when the compute dtype is bf16 (train.dtype=bf16,
    # or auto on CUDA), else fp32. Checkpoints hold the fp32 masters either way.
    param_dtype: str = "auto"
    init_from: Optional[str] = None
    # Token-based schedules (mmtrain/train/schedules.py). max_tokens > 0: the run's token budget;
    # max_steps is then derived (the steps that consume it at the batch schedule).
    max_tokens: int = 0
    # Batch-size warm-up in tokens: [[at_tokens, batch_tokens], ...] from at_tokens=0, e.g. the
    # paper's [[0, 16Mi], [69e9, 32Mi], [790e9, 64Mi], [4.7e12, 128Mi]]; global batch rows =
    # batch_tokens / data.seq_len. null: train.global_batch rows throughout.
    batch_schedule: Optional[list] = None
    # exp_decay / wsd with max_tokens > 0: the decay starts at this many tokens (0: decay_start
    # steps); wsd decays linearly, exp_decay geometrically, both to min_lr at the end.
    decay_start_tokens: int = 0
    # A step with a non-finite loss or gradient norm is skipped (no update); this many in a row
    # stop the run (see mmtrain/train/health.py).
    max_bad_steps: int = 5
    spike_factor: float = 0.0  # > 1: log losses above spike_factor x their running mean; 0: off
    # Memory (mmtrain/model/fused_ce.py, mmtrain/model/recompute.py). fused_ce: the LM loss is a
    # chunked linear cross-entropy that never holds the logits of all tokens (fused_ce_chunk
    # tokens at a time; the backward recomputes each chunk's logits); false: full logits, then
    # cross-entropy. recompute: none | selective (attention cores, MoE combine) | full (each
    # decoder layer keeps only its input).
    fused_ce: bool = True
    fused_ce_chunk: int = 4096
    recompute: str = "none"
    # Speed (mmtrain/model/compiled.py): run the model's small pure-tensor regions (residual add +
    # RMSNorm, router softmax/top-k, RoPE, lightning output norm + gate) through torch.compile,
    # compiled once per process with the token dimension dynamic (no recompile per document
    # layout); false: the eager code, bit for bit.
    compile: bool = False

    def autocast_bf16(self, device_type: str) -> bool:
        """Whether the forward runs under bf16 autocast: ``dtype=bf16``, or ``auto`` on CUDA."""
        return self.dtype == "bf16" or (self.dtype == "auto" and device_type == "cuda")

    def bf16_params(self, device_type: str, path: str = "train") -> bool:
        """Whether parameters are stored in bf16 (``param_dtype``, ``auto`` resolved for
        ``device_type``). bf16 parameters with fp32 compute would silently compute in bf16 where
        the recipe asked for fp32, so that combination is refused, naming the fix."""
        compute = self.autocast_bf16(device_type)
        if self.param_dtype == "auto":
            return compute
        if self.param_dtype == "bf16" and not compute:
            _fail(f"{path}.param_dtype", f"bf16 parameters need bf16 compute, but "
                  f"{path}.dtype={self.dtype} resolves to fp32 on {device_type}; set "
                  f"{path}.dtype=bf16, or {path}.param_dtype=fp32 (or auto)")
        return self.param_dtype == "bf16"

    def validate(self, path: str = "train") -> None:
        if self.max_steps < 1:
            _fail(f"{path}.max_steps", f"must be >= 1, got {self.max_steps}")
        if self.global_batch < 1 or (self.micro_batch is not None and self.micro_batch < 1):
            _fail(f"{path}.global_batch", "global_batch and micro_batch must be >= 1")
        if self.lr <= 0 or not math.isfinite(self.lr):
            _fail(f"{path}.lr", f"must be a positive learning rate, got {self.lr}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            _fail(f"{path}.min_lr", f"must be within 0..lr={self.lr}, got {self.min_lr}")
        if self.schedule not in ("constant", "cosine", "exp_decay", "wsd"):
            _fail(f"{path}.schedule", f"unknown '{self.schedule}'; use constant, cosine, exp_decay "
                  f"or wsd")
        if self.warmup_steps < 0:
            _fail(f"{path}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.decay_start < 0:
            _fail(f"{path}.decay_start", f"must be >= 0, got {self.decay_start}")
        if not self.eps > 0:
            _fail(f"{path}.eps", f"must be > 0 (Adam's epsilon), got {self.eps}")
        _check_seed(f"{path}.seed", self.seed)
        if self.init_from is not None and not self.init_from:
            _fail(f"{path}.init_from", "is empty; give a checkpoint or HF directory, or null")
        if self.weight_decay < 0:
            _fail(f"{path}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                _fail(f"{path}.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        if self.grad_clip < 0:
            _fail(f"{path}.grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")
        if self.aux_loss_coef < 0:
            _fail(f"{path}.aux_loss_coef", f"must be >= 0, got {self.aux_loss_coef}")
        if self.ckpt_every < 0:
            _fail(f"{path}.ckpt_every", f"must be >= 0 (0 = only at the end), got {self.ckpt_every}")
        for name in ("keep_last", "log_every"):
            if getattr(self, name) < 1:
                _fail(f"{path}.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            _fail(f"{path}.device", f"unknown '{self.device}'; use auto, cpu or cuda")
        if self.dtype not in ("auto", "fp32", "bf16"):
            _fail(f"{path}.dtype", f"unknown '{self.dtype}'; use auto, fp32 or bf16")
        if self.param_dtype not in ("auto", "fp32", "bf16"):
            _fail(f"{path}.param_dtype", f"unknown '{self.param_dtype}'; use auto, fp32 or bf16")
        if self.param_dtype == "bf16" and self.dtype == "fp32":
            _fail(f"{path}.param_dtype", f"bf16 parameters need bf16 compute, but "
                  f"{path}.dtype=fp32; set {path}.dtype=bf16 (or auto on CUDA), or "
                  f"{path}.param_dtype=fp32")
        from mmtrain.train.schedules import validate_train_schedules

        validate_train_schedules(self, path)
        if self.max_bad_steps < 1:
            _fail(f"{path}.max_bad_steps", f"must be >= 1, got {self.max_bad_steps}")
        if self.spike_factor != 0 and not self.spike_factor > 1:
            _fail(f"{path}.spike_factor", f"must be 0 (off) or > 1, got {self.spike_factor}")
        if self.fused_ce_chunk < 1:
            _fail(f"{path}.fused_ce_chunk", f"must be >= 1 token, got {self.fused_ce_chunk} "
                  f"(4096 is a good start; lower it if one chunk's logits do not fit)")
        if self.recompute not in ("none", "selective", "full"):
            _fail(f"{path}.recompute", f"unknown '{self.recompute}'; use none, selective or full")
        if not isinstance(self.compile, bool):
            _fail(f"{path}.compile", f"must be true or false, got {self.compile!r}")


# --------------------------------------------------------------------------------------------------
@dataclass
class ParallelConfig:
    """Sizes of the parallel dimensions (SPEC §6). dp = -1 derives it from the world size."""

    dp: int = -1
    tp: int = 1
    cp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    # null: on whenever tp > 1. Tensor parallelism always runs with sequence parallelism (the MoE
    # routes each TP rank's sequence shard); false with tp > 1 is rejected.
    sequence_parallel: Optional[bool] = None
    zero1: bool = False  # shard the optimizer state (and fp32 master shard) over DP / EDP
    # lightning layers under context parallelism: laspplus (all-gather of the per-rank states,
    # SPEC §6) or lasp (the state passed rank to rank, the serial baseline)
    cp_lightning: str = "laspplus"
    # how rows split over CP ranks: zigzag (2·cp pieces a row, rank r holds pieces r and
    # 2·cp-1-r: balanced causal attention; needs seq_len divisible by 2·cp) or contiguous (rank r
    # holds the r-th of cp pieces: LASP's layout, causally imbalanced). Both layer kinds see it.
    cp_balance: str = "zigzag"
    # zigzag only: the row is this many consecutive stretches of 2·cp pieces, each split zigzag
    # (balances packed documents shorter than the row; seq_len must divide by 2·cp·rounds).
    # 0 = auto: 2 where seq_len divides by 4·cp, else 1 (contiguous: 1)
    cp_zigzag_rounds: int = 0
    bucket_mb: float = 40.0  # gradient-reduction bucket size (fp32 MiB)
    order: str = "tp-cp-ep-dp-pp"
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    timeout_s: int = 600
    # EP-ETP overlap: split each MoE layer's dispatched tokens into this many groups so one
    # group's all-to-all / ETP collectives overlap another's expert GEMMs (1 = off).
    moe_overlap_groups: int = 1

    def validate(self, path: str = "parallel") -> None:
        for name in ("tp", "cp", "pp", "ep", "etp"):
            if getattr(self, name) < 1:
                _fail(f"{path}.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.dp == 0 or self.dp < -1:
            _fail(f"{path}.dp", f"must be >= 1, or -1 to derive it from the world size, got {self.dp}")
        if self.cp_lightning not in ("laspplus", "lasp"):
            _fail(f"{path}.cp_lightning", f"unknown '{self.cp_lightning}'; use laspplus or lasp")
        if self.cp_balance not in ("zigzag", "contiguous"):
            _fail(f"{path}.cp_balance", f"unknown '{self.cp_balance}'; use zigzag or contiguous")
        if self.cp_zigzag_rounds < 0:
            _fail(f"{path}.cp_zigzag_rounds", f"must be >= 1, or 0 for auto, got "
                  f"{self.cp_zigzag_rounds}")
        if self.cp_zigzag_rounds > 1 and self.cp_balance != "zigzag":
            _fail(f"{path}.cp_zigzag_rounds", f"{self.cp_zigzag_rounds} rounds need "
                  f"{path}.cp_balance=zigzag; set {path}.cp_zigzag_rounds=1 for "
                  f"{self.cp_balance}")
        if self.cp > 1 and self.cp_lightning == "lasp" and self.cp_balance != "contiguous":
            _fail(f"{path}.cp_balance", "LASP (cp_lightning=lasp, the serial baseline) passes the "
                  f"state rank to rank over contiguous chunks; set {path}.cp_balance=contiguous "
                  f"(or {path}.cp_lightning=laspplus)")
        if self.backend not in ("auto", "gloo", "nccl"):
            _fail(f"{path}.backend", f"unknown '{self.backend}'; use auto, gloo or nccl")
        if self.timeout_s < 1:
            _fail(f"{path}.timeout_s", f"must be >= 1, got {self.timeout_s}")
        if not self.bucket_mb > 0:
            _fail(f"{path}.bucket_mb", f"must be > 0, got {self.bucket_mb}")
        if self.moe_overlap_groups < 1:
            _fail(f"{path}.moe_overlap_groups", f"must be >= 1 (1 = no overlap), got "
                  f"{self.moe_overlap_groups}")


@dataclass
class WandbConfig:
    enabled: bool = False
    mode: str = "offline"  # offline by default: never needs a network or an account
    project: str = "mmtrain"

    def validate(self, path: str = "run.wandb") -> None:
        if self.mode not in ("offline", "online", "disabled"):
            _fail(f"{path}.mode", f"unknown '{self.mode}'; use offline, online or disabled")
        if not self.project:
            _fail(f"{path}.project", "is empty; name a wandb project (e.g. mmtrain)")


@dataclass
class RunConfig:
    dir: str = "runs/default"
    progress: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self, path: str = "run") -> None:
        if not self.dir:
            _fail(f"{path}.dir", "is empty; set run.dir=PATH")
        self.wandb.validate(f"{path}.wandb")


@dataclass
class StageConfig:
    """Which curriculum stage the recipe is (recipes/stage/); descriptive, the values it sets live
    in model/data/train. ``previous``: the stage whose final checkpoint this one starts from."""

    name: str = "none"
    previous: Optional[str] = None
    note: str = ""
    eval_seq_len: Optional[int] = None  # an evaluation-only length (ctx1m: 4M, extrapolation)

    def validate(self, path: str = "stage") -> None:
        if not self.name:
            _fail(f"{path}.name", "is empty; name the stage (e.g. ctx128k) or use 'none'")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    stage: StageConfig = field(default_factory=StageConfig)

    def validate(self) -> "Config":
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")
        self.parallel.validate("parallel")
        self.run.validate("run")
        self.stage.validate("stage")
        if self.train.micro_batch and self.train.global_batch % self.train.micro_batch:
            _fail("train.global_batch", f"{self.train.global_batch} is not a multiple of "
                  f"train.micro_batch={self.train.micro_batch}; make it one")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
def _coerce(path: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(path, args[0], value)
    if dataclasses.is_dataclass(tp):
        return _build(path, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(path, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            _fail(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            _fail(path, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            _fail(path, f"expected a string, got {value!r}")
        return str(value)
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            _fail(path, f"expected a list, got {value!r}")
        return list(value)
    return value


def _build(path: str, cls: type, data: Any):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        _fail(path, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = sorted(names, key=lambda n: _distance(n, str(key)))[:1]
            _fail(f"{path}.{key}" if path else str(key),
                  f"unknown key; valid keys of '{path or 'config'}' are {sorted(names)}"
                  + (f" (did you mean '{close[0]}'?)" if close else ""))
    kwargs = {k: _coerce(f"{path}.{k}" if path else k, hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


def _distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def config_from_dict(data: dict) -> Config:
    """Build and validate a :class:`Config` from a plain (resolved) dict."""
    return _build("", Config, data).validate()
