"""The MiniMax architecture in plain single-device PyTorch (no collectives here)."""

from mmtrain.model.accounting import Accounting, account, build_meta_model
from mmtrain.model.transformer import MiniMaxModel, ModelOutput

__all__ = ["Accounting", "MiniMaxModel", "ModelOutput", "account", "build_meta_model"]
