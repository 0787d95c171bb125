"""The optimizer's settings and learning-rate schedule, shared by the trainer and the swarm's inner loop.

Torch-free on purpose: the coordinator validates a swarm's inner optimizer (swarm/settings.py) with
`OptimConfig` without loading torch. `model/step.py` builds the optimizer and takes the steps.

    o = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lr_at(0, o, total=1000)        # 1e-4: warmup step 1 of 10
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import help_field


@dataclass
class OptimConfig:
    lr: float = help_field("Peak learning rate (reached after warmup).", default=3e-4)
    min_lr: float = help_field("Learning rate at the end of the cosine decay.", default=3e-5)
    warmup_steps: int = help_field("Linear warmup steps from 0 to lr.", default=100)
    weight_decay: float = help_field("AdamW decoupled weight decay (not applied to norms).", default=0.1)
    beta1: float = help_field("AdamW beta1.", default=0.9)
    beta2: float = help_field("AdamW beta2.", default=0.95)
    eps: float = help_field("AdamW epsilon.", default=1e-8)
    grad_clip: float = help_field("Clip the global gradient norm to this; 0 disables.", default=1.0)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim: need 0 <= min_lr <= lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})")
        if self.warmup_steps < 0:
            raise ValueError("optim.warmup_steps must be >= 0")


def lr_at(step: int, o: OptimConfig, total: int) -> float:
    """Linear warmup to o.lr, then cosine decay to o.min_lr at `total` steps."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
