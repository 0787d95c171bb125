"""mujina's network and how it learns on one machine or one cluster.

Pure PyTorch: nothing here imports hivemind, gRPC, SQLAlchemy or prometheus (tests enforce it).

    >>> from model import ModelConfig, Transformer, load_checkpoint, save_checkpoint
    >>> net = load_checkpoint("runs/debug/final")
    >>> logits = net(input_ids)      # (batch, seq) int64 -> (batch, seq, vocab)

The names below are imported on first use (PEP 562), so `import model.config` or `model.optim` (the
configs, parameter counts and the learning-rate schedule) stays free of torch: the coordinator validates a
project's swarm settings and builds `train` payloads (swarm/settings.py) without loading it.
"""

from __future__ import annotations

import importlib

_LAZY = {"load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint", "PRESETS": "config",
         "ModelConfig": "config", "MoEConfig": "config", "Transformer": "transformer"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
