"""mujina's network and how it learns on one machine or one cluster.

Pure PyTorch: nothing here imports hivemind, gRPC, SQLAlchemy or prometheus (tests enforce it).

    >>> from model import ModelConfig, Transformer, load_checkpoint, save_checkpoint
    >>> net = load_checkpoint("runs/debug/final")
    >>> logits = net(input_ids)      # (batch, seq) int64 -> (batch, seq, vocab)
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import PRESETS, ModelConfig, MoEConfig
from .transformer import Transformer

__all__ = ["PRESETS", "ModelConfig", "MoEConfig", "Transformer", "load_checkpoint", "save_checkpoint"]
