"""The batch that flows from the loader into the model.

Legend: B rows, T row length (data.seq_len), N documents (sequences) in the whole batch.

Rows are packed: each row of ``tokens`` holds the pieces of one or more documents. ``cu_seqlens``
gives the document boundaries over the *flattened* batch (``tokens.reshape(-1)``), so a row
boundary is always a sequence boundary and no attention (lightning state or softmax mask) crosses
either. ``position_ids`` restart at 0 at each document start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] int64 inputs
    labels: torch.Tensor  # [B, T] int64 next-token targets
    loss_mask: torch.Tensor  # [B, T] float32, 1 where the label counts
    cu_seqlens: torch.Tensor  # [N+1] int32, boundaries over tokens.reshape(-1)
    position_ids: torch.Tensor  # [B, T] int64, restart at 0 per document
    loss_tokens: Optional[float] = None  # loss_mask.sum(), counted on the host by ``to``

    def to(self, device) -> "Batch":
        """The batch on ``device``, with what the step needs on the host counted before the copy:
        ``loss_tokens``, and the boundaries as host ints on ``cu_seqlens.host`` (read by
        :func:`host_cu`), so no op has to read a device tensor back (no host sync)."""
        host = host_cu(self.cu_seqlens)
        n = self.loss_tokens if self.loss_tokens is not None else float(self.loss_mask.sum())
        pin = torch.device(device).type == "cuda"
        moved = [t.pin_memory().to(device, non_blocking=True) if pin and not t.is_cuda
                 else t.to(device) for t in (self.tokens, self.labels, self.loss_mask,
                                             self.cu_seqlens, self.position_ids)]
        out = Batch(*moved, loss_tokens=n)
        out.cu_seqlens.host = host
        return out

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]


def host_cu(cu_seqlens: torch.Tensor) -> list:
    """``cu_seqlens`` as a list of host ints: the copy a batch moved by :meth:`Batch.to` carries
    (``cu_seqlens.host``), else read from the tensor (a host sync when it is on a GPU)."""
    host = getattr(cu_seqlens, "host", None)
    return list(host) if host is not None else [int(x) for x in cu_seqlens.tolist()]


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] positions that restart at 0 at every boundary in ``cu_seqlens``."""
    idx = torch.arange(total, dtype=torch.int64)
    starts = cu_seqlens[:-1].to(torch.int64)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    return idx - torch.repeat_interleave(starts, lens, output_size=total)
