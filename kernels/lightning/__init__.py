"""Lightning attention (SPEC §2): torch references and the Triton kernel behind one public op."""

from .reference import lightning_attn_block, lightning_attn_recurrent
from .autograd import lightning_attn, lightning_attn_qkv

__all__ = ["lightning_attn", "lightning_attn_qkv", "lightning_attn_block", "lightning_attn_recurrent"]
