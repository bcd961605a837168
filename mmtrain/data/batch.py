"""The batch that flows from the loader into the model.

Legend: B rows, T row length (data.seq_len), N documents (sequences) in the whole batch.

Rows are packed: each row of ``tokens`` holds the pieces of one or more documents. ``cu_seqlens``
gives the document boundaries over the *flattened* batch (``tokens.reshape(-1)``), so a row
boundary is always a sequence boundary and no attention (lightning state or softmax mask) crosses
either. ``position_ids`` restart at 0 at each document start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] int64 inputs
    labels: torch.Tensor  # [B, T] int64 next-token targets
    loss_mask: torch.Tensor  # [B, T] float32, 1 where the label counts
    cu_seqlens: torch.Tensor  # [N+1] int32, boundaries over tokens.reshape(-1)
    position_ids: torch.Tensor  # [B, T] int64, restart at 0 per document

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.tokens, self.labels, self.loss_mask,
                                               self.cu_seqlens, self.position_ids)))

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] positions that restart at 0 at every boundary in ``cu_seqlens``."""
    idx = torch.arange(total, dtype=torch.int64)
    starts = cu_seqlens[:-1].to(torch.int64)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    return idx - torch.repeat_interleave(starts, lens, output_size=total)
