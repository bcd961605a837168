"""Torch references for lightning attention (SPEC §2).

Legend: B batch, T time, H heads, K key dim (= head dim), V value dim, N sequences.

Two implementations of the same function:

* ``lightning_attn_recurrent`` — the plain recurrence ``S_t = λ S_{t-1} + k_t v_tᵀ``,
  ``o_t = S_tᵀ q_t``, one token at a time. The oracle (run it in fp64).
* ``lightning_attn_block`` — the block form (intra-block left product, inter-block right
  product, state carried between blocks). Differentiable through torch autograd; it is the local
  CPU implementation of the model's lightning op and the reference the Triton kernel is tested
  against.

Both take the same arguments as the public kernel entry point:

    q, k, v:        [B, T, H, K] / [B, T, H, V]; with ``cu_seqlens`` B must be 1 (packed)
    slopes:         [H] decay rates s, λ = exp(-s)
    cu_seqlens:     optional int [N+1] boundaries of packed sequences in the T axis
    initial_state:  optional [N, H, K, V] (N = B without cu_seqlens), state before each sequence
    output_final_state: return the [N, H, K, V] state after each sequence (fp32 or fp64)

The state is kept in fp32 (fp64 when the inputs are fp64); the output has the dtype of q.
"""

from __future__ import annotations

import torch

__all__ = ["lightning_attn_recurrent", "lightning_attn_block", "sequence_bounds"]


def sequence_bounds(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch index, start, end) of every sequence, in state order."""
    B, T = q.shape[0], q.shape[1]
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    if B != 1:
        raise ValueError(f"with cu_seqlens the inputs must be packed as [1, T, H, D], got batch {B}")
    host = getattr(cu_seqlens, "host", None)  # a host copy that travels with the batch
    cu = [int(x) for x in (host if host is not None else cu_seqlens.tolist())]
    if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {cu}")
    return [(0, a, b) for a, b in zip(cu, cu[1:])]


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(q, k, v, slopes, initial_state, n_seq):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v must be [B, T, H, D] alike, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    if slopes.shape != (H,):
        raise ValueError(f"slopes must be [H]={H}, got {tuple(slopes.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (n_seq, H, K, V):
        raise ValueError(f"initial_state must be [N, H, K, V]={(n_seq, H, K, V)}, "
                         f"got {tuple(initial_state.shape)}")


def lightning_attn_recurrent(q, k, v, slopes, cu_seqlens=None, initial_state=None,
                             output_final_state=False):
    """The plain recurrence of SPEC §2, token by token (slow; the oracle)."""
    bounds = sequence_bounds(q, cu_seqlens)
    _check(q, k, v, slopes, initial_state, len(bounds))
    sd = _state_dtype(q)
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    lam = torch.exp(-slopes.to(sd))[:, None, None]  # [H,1,1]
    out = torch.zeros(q.shape[:3] + (V,), dtype=sd, device=q.device)
    finals = []
    for n, (b, s, e) in enumerate(bounds):
        S = (initial_state[n].to(sd) if initial_state is not None
             else torch.zeros(H, K, V, dtype=sd, device=q.device))
        for t in range(s, e):
            S = lam * S + k[b, t].to(sd)[:, :, None] * v[b, t].to(sd)[:, None, :]
            out[b, t] = torch.einsum("hk,hkv->hv", q[b, t].to(sd), S)
        finals.append(S)
    final = torch.stack(finals) if output_final_state else None
    return out.to(q.dtype), final


def _block_sequence(q, k, v, s, S, block):
    """One sequence: q, k [L, H, K], v [L, H, V] in state dtype, s [H], S [H, K, V].

    Returns (o [L, H, V], S_final)."""
    L = q.shape[0]
    outs = []
    idx = torch.arange(block, device=q.device, dtype=q.dtype)
    for a in range(0, L, block):
        m = min(block, L - a)
        Qb = q[a:a + m].transpose(0, 1)  # [H, m, K]
        Kb = k[a:a + m].transpose(0, 1)
        Vb = v[a:a + m].transpose(0, 1)  # [H, m, V]
        i = idx[:m]
        diff = i[:, None] - i[None, :]  # i - j
        decay = torch.exp(-s[:, None, None] * diff.clamp(min=0)) * (diff >= 0)  # D [H, m, m]
        q_decay = torch.exp(-s[:, None] * (i + 1))[..., None]  # λ^(i+1) [H, m, 1]
        k_decay = torch.exp(-s[:, None] * (m - 1 - i))[..., None]  # λ^(m-1-j) [H, m, 1]
        intra = ((Qb @ Kb.transpose(1, 2)) * decay) @ Vb
        inter = (Qb * q_decay) @ S
        outs.append((intra + inter).transpose(0, 1))
        S = torch.exp(-s * m)[:, None, None] * S + (Kb * k_decay).transpose(1, 2) @ Vb
    return torch.cat(outs, dim=0), S


def lightning_attn_block(q, k, v, slopes, cu_seqlens=None, initial_state=None,
                         output_final_state=False, block_size: int = 64):
    """Block form of SPEC §2 in torch (autograd gives the backward)."""
    bounds = sequence_bounds(q, cu_seqlens)
    _check(q, k, v, slopes, initial_state, len(bounds))
    sd = _state_dtype(q)
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    s = slopes.to(device=q.device, dtype=sd)
    qs, ks, vs = q.to(sd), k.to(sd), v.to(sd)
    pieces, finals = [], []
    for n, (b, st, en) in enumerate(bounds):
        S0 = (initial_state[n].to(sd) if initial_state is not None
              else q.new_zeros((H, K, V), dtype=sd))
        if en > st:
            o, S = _block_sequence(qs[b, st:en], ks[b, st:en], vs[b, st:en], s, S0, block_size)
        else:
            o, S = qs.new_zeros((0, H, V)), S0
        pieces.append((b, o))
        finals.append(S)
    if cu_seqlens is None:
        out = torch.stack([o for _, o in pieces])
    else:
        out = torch.cat([o for _, o in pieces], dim=0)[None]
    final = torch.stack(finals) if output_final_state else None
    return out.to(q.dtype), final
