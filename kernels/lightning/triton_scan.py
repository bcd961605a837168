"""Triton kernels for decayed causal linear attention with a per-head scalar decay (SPEC §2).

Legend: T tokens (flattened batch*time), H heads, K key dim, V value dim, I work items
(a contiguous token range inside one sequence), N sequences, BT rows per block (chunk).

One generic operation, ``scan attention``, serves the forward and all three backward products:

    forward  (REVERSE=False): o_t = sum_{u<=t} lam^(t-u) (q_t . k_u) v_u  + lam^(t-bos+1) S0^T q_t
    backward (REVERSE=True):  o_u = sum_{t>=u} lam^(t-u) (q_u . k_t) v_t  + lam^(eos-u)   S0^T q_u

(the reverse form is the forward one run from the end of the sequence). With the state
``S = sum k v^T`` decayed along the scan direction:
    dq = fwd scan(q=do, k=v,  v=k,  S0 = S_init^T)
    dv = rev scan(q=k,  k=q,  v=do, S0 = dS_final / lam)   and its final state * lam = dS_init
    dk = rev scan(q=v,  k=do, v=q,  S0 = (dS_final / lam)^T)

Three kernels:
* ``_scan_out``:    walks the blocks of one work item with the running state on chip (fp32) and
                    writes the output; one program per (V tile, item, head). Intra-block left
                    product, inter-block right product, state update, all fused.
* ``_scan_state``:  the local state of each item (from zero), for the sequence-split mode.
* ``_scan_chain``:  per sequence, chains the item states into each item's incoming state (and the
                    sequence's final state). Tiny.

When (sequences x heads x V tiles) already fills the GPU, items are whole sequences and only
``_scan_out`` runs ("single pass"). Otherwise sequences are cut into segments ("two pass": state,
chain, out), which re-reads k and v once more but gives every SM work.

The kernels are defined as plain functions and wrapped with ``triton.jit`` lazily at call time, so
``TRITON_INTERPRET=1`` set at any point before a call selects the CPU interpreter (the test suite
flips it per test without reloading modules). The kernels call only builtins of triton.language,
never its @jit helpers (tl.zeros, tl.cdiv, ...): those are bound to the mode triton was imported
in and would fail in the other. No atomics: every output element is written by
exactly one program, so results are deterministic.
"""

from __future__ import annotations

import math
import os

import torch

try:  # triton is optional on CPU-only installs
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAVE_TRITON = False

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


# --------------------------------------------------------------------------------------------
# kernels (plain functions; see _jit)
# --------------------------------------------------------------------------------------------

def _scan_out(q, k, v, o, q_st: tl.constexpr, q_sh: tl.constexpr, k_st: tl.constexpr,
              k_sh: tl.constexpr, v_st: tl.constexpr, v_sh: tl.constexpr, o_st: tl.constexpr,
              o_sh: tl.constexpr, slog2, item_bos, item_eos,
              s_in, s_in_si, s_in_sh, s_in_sk, s_in_sv, s_out,
              s_loc, item_seq, seq_items, s_keep,
              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
              BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, REVERSE: tl.constexpr,
              CHAIN: tl.constexpr, KEEP: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Outputs of one item. ``CHAIN``: the item's incoming state is chained here from its
    sequence's initial state (``s_in``, one per sequence) and the local states ``s_loc`` of the
    items before it (the same recursion as ``_scan_chain``, so the same values); ``KEEP`` stores
    it in ``s_keep``; the final state is stored by the sequence's last item, per sequence.
    Otherwise ``s_in`` holds one incoming state per item and ``s_out`` one final state per item."""
    i_v = tl.program_id(0)
    i_n = tl.program_id(1)
    i_h = tl.program_id(2)
    bos = tl.load(item_bos + i_n).to(tl.int64)
    eos = tl.load(item_eos + i_n).to(tl.int64)
    L = (eos - bos).to(tl.int32)
    sl = tl.load(slog2 + i_h)  # lam = 2^-sl

    ot = tl.arange(0, BT)
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk = ok < K
    mv = ov < V
    mkv = mk[:, None] & mv[None, :]
    tile = ok[:, None] * V + ov[None, :]  # of a contiguous [K, V] state

    row = i_n
    if CHAIN:
        row = tl.load(item_seq + i_n)
        a = tl.load(seq_items + row)
        b = tl.load(seq_items + row + 1)
        if REVERSE:
            n_prev = b - 1 - i_n
            is_last = i_n == a
        else:
            n_prev = i_n - a
            is_last = i_n == b - 1
    S = tl.full([BK, BV], 0., tl.float32)
    if HAS_INIT:
        p_s = s_in + row * s_in_si + i_h * s_in_sh + ok[:, None] * s_in_sk + ov[None, :] * s_in_sv
        S += tl.load(p_s, mask=mkv, other=0.).to(tl.float32)
    if CHAIN:
        for j in range(0, n_prev):
            if REVERSE:
                it = b - 1 - j
            else:
                it = a + j
            ln = (tl.load(item_eos + it) - tl.load(item_bos + it)).to(tl.float32)
            S = S * tl.exp2(-sl * ln) + tl.load(
                s_loc + (it * H + i_h).to(tl.int64) * K * V + tile, mask=mkv, other=0.)
        if KEEP:
            tl.store(s_keep + (i_n * H + i_h).to(tl.int64) * K * V + tile, S, mask=mkv)

    tf = ot.to(tl.float32)
    if REVERSE:
        diff = tf[None, :] - tf[:, None]
    else:
        diff = tf[:, None] - tf[None, :]
    Dm = tl.where(diff >= 0, tl.exp2(-sl * tl.maximum(diff, 0.)), 0.)

    n_c = (L + BT - 1) // BT
    for c in range(0, n_c):
        if REVERSE:
            ci = n_c - 1 - c
        else:
            ci = c
        m = tl.minimum(L - ci * BT, BT)
        mr = ot < m
        rows = bos + ci * BT + ot
        p_q = q + rows[:, None] * q_st + i_h * q_sh + ok[None, :]
        p_k = k + rows[:, None] * k_st + i_h * k_sh + ok[None, :]
        p_v = v + rows[:, None] * v_st + i_h * v_sh + ov[None, :]
        b_q = tl.load(p_q, mask=mr[:, None] & mk[None, :], other=0.)
        b_k = tl.load(p_k, mask=mr[:, None] & mk[None, :], other=0.)
        b_v = tl.load(p_v, mask=mr[:, None] & mv[None, :], other=0.)
        if UPCAST:
            b_q = b_q.to(tl.float32)
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        mf = m.to(tl.float32)
        if REVERSE:
            qd = tl.where(mr, tl.exp2(-sl * (mf - tf)), 0.)
            kd = tl.where(mr, tl.exp2(-sl * tf), 0.)
        else:
            qd = tl.where(mr, tl.exp2(-sl * (tf + 1.)), 0.)
            kd = tl.where(mr, tl.exp2(-sl * (mf - 1. - tf)), 0.)
        cd = tl.exp2(-sl * mf)
        b_a = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * Dm
        b_o = tl.dot(b_q, S.to(b_q.dtype), input_precision=DOT_PREC) * qd[:, None]
        b_o += tl.dot(b_a.to(b_v.dtype), b_v, input_precision=DOT_PREC)
        p_o = o + rows[:, None] * o_st + i_h * o_sh + ov[None, :]
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=mr[:, None] & mv[None, :])
        S = S * cd + tl.dot(tl.trans(b_k), (b_v * kd[:, None]).to(b_k.dtype),
                            input_precision=DOT_PREC)

    if STORE_FINAL:
        p_f = s_out + ((row * H + i_h) * K + ok[:, None]).to(tl.int64) * V + ov[None, :]
        if CHAIN:
            tl.store(p_f, S, mask=mkv & is_last)
        else:
            tl.store(p_f, S, mask=mkv)


def _scan_state(k, v, k_st: tl.constexpr, k_sh: tl.constexpr, v_st: tl.constexpr,
                v_sh: tl.constexpr, slog2, item_bos, item_eos, s_loc,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
                REVERSE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Local state of one item from a zero start: sum_j lam^(dist of j to the item's far end) k_j v_j^T."""
    i_kv = tl.program_id(0)
    i_n = tl.program_id(1)
    i_h = tl.program_id(2)
    i_k = i_kv // NV
    i_v = i_kv % NV
    bos = tl.load(item_bos + i_n).to(tl.int64)
    eos = tl.load(item_eos + i_n).to(tl.int64)
    L = (eos - bos).to(tl.int32)
    sl = tl.load(slog2 + i_h)
    ot = tl.arange(0, BT)
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk = ok < K
    mv = ov < V
    tf = ot.to(tl.float32)
    S = tl.full([BK, BV], 0., tl.float32)
    n_c = (L + BT - 1) // BT
    for c in range(0, n_c):
        if REVERSE:
            ci = n_c - 1 - c
        else:
            ci = c
        m = tl.minimum(L - ci * BT, BT)
        mr = ot < m
        rows = bos + ci * BT + ot
        b_k = tl.load(k + rows[:, None] * k_st + i_h * k_sh + ok[None, :],
                      mask=mr[:, None] & mk[None, :], other=0.)
        b_v = tl.load(v + rows[:, None] * v_st + i_h * v_sh + ov[None, :],
                      mask=mr[:, None] & mv[None, :], other=0.)
        if UPCAST:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        mf = m.to(tl.float32)
        if REVERSE:
            kd = tl.where(mr, tl.exp2(-sl * tf), 0.)
        else:
            kd = tl.where(mr, tl.exp2(-sl * (mf - 1. - tf)), 0.)
        S = S * tl.exp2(-sl * mf) + tl.dot(tl.trans(b_k), (b_v * kd[:, None]).to(b_k.dtype),
                                           input_precision=DOT_PREC)
    p_s = s_loc + ((i_n * H + i_h) * K + ok[:, None]).to(tl.int64) * V + ov[None, :]
    tl.store(p_s, S, mask=mk[:, None] & mv[None, :])


def _scan_chain(slog2, item_bos, item_eos, seq_items, s_loc, s_in,
                s0, s0_si, s0_sh, s0_sk, s0_sv, s_fin,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
                HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, REVERSE: tl.constexpr):
    """Per sequence: incoming state of each of its items, then the sequence's final state."""
    i_kv = tl.program_id(0)
    i_s = tl.program_id(1)
    i_h = tl.program_id(2)
    i_k = i_kv // NV
    i_v = i_kv % NV
    a = tl.load(seq_items + i_s)
    b = tl.load(seq_items + i_s + 1)
    sl = tl.load(slog2 + i_h)
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    msk = (ok < K)[:, None] & (ov < V)[None, :]
    S = tl.full([BK, BV], 0., tl.float32)
    if HAS_INIT:
        p0 = s0 + i_s * s0_si + i_h * s0_sh + ok[:, None] * s0_sk + ov[None, :] * s0_sv
        S += tl.load(p0, mask=msk, other=0.).to(tl.float32)
    for j in range(0, b - a):
        if REVERSE:
            it = b - 1 - j
        else:
            it = a + j
        off = ((it * H + i_h) * K + ok[:, None]).to(tl.int64) * V + ov[None, :]
        tl.store(s_in + off, S, mask=msk)
        ln = (tl.load(item_eos + it) - tl.load(item_bos + it)).to(tl.float32)
        S = S * tl.exp2(-sl * ln) + tl.load(s_loc + off, mask=msk, other=0.)
    if STORE_FINAL:
        p_f = s_fin + ((i_s * H + i_h) * K + ok[:, None]).to(tl.int64) * V + ov[None, :]
        tl.store(p_f, S, mask=msk)


_JIT_CACHE: dict = {}
_INTERP_FIXED = False


def _fix_interpreter():
    """Triton 3.6's interpreter holds scalars as 1-element arrays and turns them into loop bounds
    with int(array), which numpy >= 2.4 refuses; give its tensors an __index__ that takes the one
    element. Touches nothing outside interpreter runs."""
    global _INTERP_FIXED
    if _INTERP_FIXED:
        return
    from triton.runtime import interpreter as ti
    orig = ti._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    ti._patch_lang_tensor = patched
    _INTERP_FIXED = True


def _jit(fn, interp: bool | None = None):
    """``fn`` wrapped by ``triton.jit`` for the current mode (``interp``: the caller's already
    read ``interpreting()``, which saves an environment read a launch)."""
    key = (fn.__name__, interpreting() if interp is None else interp)
    if key[1]:
        _fix_interpreter()
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = triton.jit(fn)
    return _JIT_CACHE[key]


# --------------------------------------------------------------------------------------------
# planning: work items
# --------------------------------------------------------------------------------------------

class Plan:
    """Work items (token ranges inside one sequence) for one call shape; reused by the backward."""

    def __init__(self, bounds: list[tuple[int, int]], seg_len: int | None, device,
                 two_pass: bool = False):
        bos, eos, seq_items = [], [], [0]
        for a, b in bounds:
            if seg_len is None or b - a <= seg_len:
                bos.append(a)
                eos.append(b)
            else:
                for s in range(a, b, seg_len):
                    bos.append(s)
                    eos.append(min(s + seg_len, b))
            seq_items.append(len(bos))
        self.n_seq = len(bounds)
        self.n_items = len(bos)
        self.two_pass = two_pass or self.n_items != self.n_seq  # forced: a state hook needs it
        self.seg_len = seg_len
        self.host_bos, self.host_eos, self.host_seq_items = bos, eos, seq_items
        self.cache: dict = {}  # derived device tensors of callers (parallel.lasp_fused)
        idx = torch.tensor([bos, eos], dtype=torch.int32)
        self.item_bos = idx[0].to(device)
        self.item_eos = idx[1].to(device)
        self.seq_items = torch.tensor(seq_items, dtype=torch.int32).to(device)
        most = max((b - a for a, b in zip(seq_items, seq_items[1:])), default=0)
        # Few items a sequence: the out pass chains its own incoming state (one launch less; each
        # program re-reads the local states before its item, so not for long chains).
        self.fuse_chain = self.two_pass and most <= CHAIN_FUSE_MAX
        self.item_seq = None
        if self.fuse_chain:
            seq_of = [n for n in range(self.n_seq) for _ in range(seq_items[n + 1] - seq_items[n])]
            self.item_seq = torch.tensor(seq_of, dtype=torch.int32).to(device)


_PLAN_CACHE: dict = {}
CHAIN_FUSE_MAX = int(os.environ.get("MMTRAIN_LA_CHAIN_FUSE", "8"))  # items a sequence; 0: never
#: ... and only in calls of at most this many token-heads (T·H). The fused chain costs the out
#: pass registers (on an H200: 255 and two spills, against none): with 4 items a sequence, from
#: 2^20 to 2^23 token-heads (H = 8 to 64), the fused out pass took 12-13% longer, the whole scan
#: 9-11%. Below 2^18 (the short sequences: 16K at H = 8 is 2^17) a call is host-bound and the
#: launch it saves counts for more (docs/benchmarks.md).
CHAIN_FUSE_WORK = int(os.environ.get("MMTRAIN_LA_CHAIN_FUSE_WORK", str(1 << 18)))


def get_plan(bounds, seg_len, device, two_pass: bool = False) -> Plan:
    """Plans are cached per (bounds, seg_len, device, two_pass): the index tensors are built
    once."""
    key = (tuple(bounds), seg_len, str(device), two_pass)
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        if len(_PLAN_CACHE) > 256:
            _PLAN_CACHE.clear()
        plan = _PLAN_CACHE[key] = Plan(bounds, seg_len, device, two_pass)
    return plan


_SMS: dict = {}


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SMS.get(idx)
    if n is None:  # the properties query costs ~30 us of host time: once per device
        n = _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def choose_seg_len(bounds, H, NV, device, seg_len=None):
    """Sequence-split length: None (single pass) when the sequences alone fill the GPU."""
    env = os.environ.get("MMTRAIN_LA_SEG")
    if seg_len is None and env:
        seg_len = int(env)
    if seg_len is not None:
        return None if seg_len <= 0 else seg_len
    lens = [b - a for a, b in bounds]
    total, longest = sum(lens), max(lens) if lens else 0
    if longest <= 4096:  # short: the split's extra launches cost more host time than it saves
        return None
    # Single pass: one program per (sequence, head, V tile), each walks its whole sequence; its
    # time is set by the longest sequence. Balanced: the same work spread over every SM. The
    # split costs a second read of k and v (6 instead of 4 units of traffic), so split only when
    # the single pass would leave SMs idle for a long time.
    balanced = total * H * NV / _num_sms(device)
    if longest <= 1.5 * balanced:
        return None
    return max(2048, int(math.ceil(balanced / 2 / 1024.0)) * 1024)


# --------------------------------------------------------------------------------------------
# launch
# --------------------------------------------------------------------------------------------

def _rows_heads(*xs):
    """(row stride, head stride) of each [T, H, D] tensor, flattened; its last dim must be
    contiguous. The kernels take them as compile-time constants (one compile per layout: the
    contiguous [T, H, D] and the packed per-head [T, H, 3K]): as runtime arguments the op ran
    25-35% slower on an H200 (docs/benchmarks.md)."""
    out = []
    for x in xs:
        if x.dim() != 3 or x.stride(-1) != 1:
            raise ValueError(f"lightning scan: a [T, H, D] tensor with its last dim contiguous is "
                             f"needed, got shape {list(x.shape)} strides {x.stride()}")
        out += [x.stride(0), x.stride(1)]
    return out


def _cfg(K, V, dtype, device):
    interp = interpreting()
    BK = max(16, triton.next_power_of_2(K))
    BV_full = max(16, triton.next_power_of_2(V))
    BV = min(BV_full, int(os.environ.get("MMTRAIN_LA_BV", "64")))
    BT = int(os.environ.get("MMTRAIN_LA_BT", "64"))
    return dict(BT=BT, BK=BK, BV=BV, UPCAST=interp,
                DOT_PREC="ieee" if dtype == torch.float32 else "tf32",
                num_warps=int(os.environ.get("MMTRAIN_LA_WARPS", "4")),
                num_stages=int(os.environ.get("MMTRAIN_LA_STAGES", "3")))


def scan_attention(q, k, v, slopes, plan: Plan, initial_state=None, output_final_state=False,
                   reverse=False, out_dtype=None, block_t: int | None = None, state_hook=None,
                   items_in=None, keep_items_in: bool = False, cfg=None, slog2=None, out=None):
    """o = scan attention (see module doc). q, k: [T, H, K]; v: [T, H, V]: any row and head
    strides, the last dim contiguous (views into a packed per-head ``[T, H, 3K]`` qkv run as
    they are, no copy). ``out`` [T, H, V] (the same rule): where to write o (else a new
    contiguous tensor of ``out_dtype``).

    initial_state: [N, H, K, V] (any strides, any float dtype) or None.
    ``state_hook(s_loc, plan) -> initial_state`` (two-pass plans only): called between the state
    pass and the chain with the items' local states ``s_loc`` [I, H, K, V] (fp32, from zero,
    decayed to the item's end — its start when ``reverse``); what it returns is the initial
    state of the chain and the outputs (context parallelism computes it from every rank's states
    there, so the states cost no pass of their own).
    ``items_in`` [I, H, K, V] (any strides): every item's incoming state, already known — only
    the out pass runs. The backward passes it the transposed incoming states of a scan over the
    same tensors (dq's are the forward's, dk's are dv's: the states ``Σ k vᵀ`` and ``Σ v kᵀ``
    are transposes), which saves their state and chain passes.
    ``cfg`` (:func:`_cfg` of these K, V, dtype) and ``slog2`` (``slopes · log2 e``, fp32, on the
    device) may be passed in by a caller that launches several scans (less host time a call).
    Returns (o [T, H, V] in out_dtype or q's dtype, final [N, H, K, V] fp32 or None), plus the
    items' incoming states (two-pass plans; else None) when ``keep_items_in``."""
    T, H, K = q.shape
    V = v.shape[-1]
    dev = q.device
    cfg = dict(cfg) if cfg is not None else _cfg(K, V, q.dtype, dev)
    if block_t is not None:
        cfg["BT"] = block_t
    BT, BK, BV = cfg["BT"], cfg["BK"], cfg["BV"]
    NV = triton.cdiv(V, BV)
    if slog2 is None:
        slog2 = (slopes.detach().to(device=dev, dtype=torch.float32) * LOG2E).contiguous()
    if out is not None and (tuple(out.shape) != (T, H, V) or out.stride(-1) != 1):
        raise ValueError(f"scan_attention: out must be [T, H, V] = {[T, H, V]} with its last dim "
                         f"contiguous, got {list(out.shape)} strides {out.stride()}")
    o = out if out is not None else torch.empty((T, H, V), dtype=out_dtype or q.dtype, device=dev)
    strides = _rows_heads(q, k, v, o)
    N, I = plan.n_seq, plan.n_items
    final = (torch.empty((N, H, K, V), dtype=torch.float32, device=dev)
             if output_final_state else None)
    interp = cfg["UPCAST"]  # _cfg: upcast exactly when interpreting
    common = dict(UPCAST=interp, DOT_PREC=cfg["DOT_PREC"])
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if I == 0:
        if output_final_state:
            final.copy_(initial_state.float() if initial_state is not None else 0.)
        return (o, final, None) if keep_items_in else (o, final)
    dummy = slog2

    def out_pass(s_init, store_final: bool, s_loc=None, keep=None):
        """The output pass from per-item initial states ``s_init`` (or none); with ``s_loc``
        (a plan with ``fuse_chain``), ``s_init`` is per sequence and the pass chains the items'
        incoming states itself (stored in ``keep`` if given)."""
        st = s_init.stride() if s_init is not None else (0, 0, 0, 0)
        chain = s_loc is not None
        _jit(_scan_out, interp)[(NV, I, H)](
            q, k, v, o, *strides, slog2, plan.item_bos, plan.item_eos,
            s_init if s_init is not None else dummy, *st, final if store_final else dummy,
            s_loc if chain else dummy, plan.item_seq if chain else plan.item_bos,
            plan.seq_items, keep if keep is not None else dummy,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, HAS_INIT=s_init is not None,
            STORE_FINAL=store_final, REVERSE=reverse, CHAIN=chain, KEEP=keep is not None,
            **common, **launch)

    def done(fin, s_in=None):
        return (o, fin, s_in) if keep_items_in else (o, fin)

    if items_in is not None:
        if output_final_state or state_hook is not None:
            raise ValueError("scan_attention: items_in runs the out pass alone (no final state, "
                             "no hook)")
        out_pass(items_in, False)
        return done(None)
    if state_hook is not None and not plan.two_pass:
        raise ValueError("scan_attention: a state hook needs a two-pass plan (get_plan(..., "
                         "two_pass=True))")
    if not plan.two_pass:
        out_pass(initial_state, output_final_state)
        return done(final)
    # two pass: local item states, chain them per sequence, then the outputs
    s_loc = local_states(k, v, slog2, plan, reverse, cfg)
    s0 = initial_state if state_hook is None else state_hook(s_loc, plan)
    if I == N:
        # One item a sequence (a hook asked for the state pass): each item's incoming state is
        # its sequence's initial state, so the plain out pass runs — the fused chain's prologue
        # costs the out pass 16-25% (docs/benchmarks.md), for a loop of no iterations here.
        out_pass(s0, output_final_state)
        if keep_items_in and s0 is None:
            s0 = torch.zeros_like(s_loc)
        return done(final, s0)
    if plan.fuse_chain and T * H <= CHAIN_FUSE_WORK:
        s_in = torch.empty_like(s_loc) if keep_items_in else None
        out_pass(s0, output_final_state, s_loc=s_loc, keep=s_in)
        return done(final, s_in)
    s_in = torch.empty_like(s_loc)
    st = s0.stride() if s0 is not None else (0, 0, 0, 0)
    CBK, CBV = min(BK, 64), min(triton.next_power_of_2(V), 64)
    CNV = triton.cdiv(V, CBV)
    _jit(_scan_chain, interp)[(triton.cdiv(K, CBK) * CNV, N, H)](
        slog2, plan.item_bos, plan.item_eos, plan.seq_items, s_loc, s_in,
        s0 if s0 is not None else dummy, *st, final if final is not None else dummy,
        H=H, K=K, V=V, BK=CBK, BV=CBV, NV=CNV, HAS_INIT=s0 is not None,
        STORE_FINAL=output_final_state, REVERSE=reverse, num_warps=4)
    out_pass(s_in, False)
    return done(final, s_in)


def local_states(k, v, slog2, plan: Plan, reverse: bool = False, cfg=None):
    """The state pass alone: every item's local state from zero, ``Σ_j w_j k_jᵀ v_j`` decayed to
    the item's end (its start when ``reverse``) -> [I, H, K, V] fp32. One program per (item,
    head) holds the whole state where K, V <= 128 (8 warps): on an H200 at H=64 that reads k
    and v at 4.4 TB/s, 23% faster than 64-wide tiles with 4 warps (docs/benchmarks.md)."""
    T, H, K = k.shape
    V = v.shape[-1]
    cfg = cfg if cfg is not None else _cfg(K, V, k.dtype, k.device)
    SBK, SBV = min(cfg["BK"], 128), min(triton.next_power_of_2(V), 128)
    SNK, SNV = triton.cdiv(K, SBK), triton.cdiv(V, SBV)
    s_loc = torch.empty((plan.n_items, H, K, V), dtype=torch.float32, device=k.device)
    _jit(_scan_state, cfg["UPCAST"])[(SNK * SNV, plan.n_items, H)](
        k, v, *_rows_heads(k, v), slog2, plan.item_bos, plan.item_eos, s_loc,
        H=H, K=K, V=V, BT=cfg["BT"], BK=SBK, BV=SBV, NV=SNV, REVERSE=reverse,
        UPCAST=cfg["UPCAST"], DOT_PREC=cfg["DOT_PREC"],
        num_warps=8 if SBK * SBV >= 128 * 128 else cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return s_loc
