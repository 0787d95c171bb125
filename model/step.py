"""One optimizer step, shared by the trainer (model/train.py) and the swarm's inner loop (swarm/round.py).

    opt = build_optimizer(net, OptimConfig(lr=1e-3))
    out = train_step(net, opt, batches, lr=1e-3, n_targets=sum(b.num_targets for b in batches),
                     grad_clip=1.0, device=torch.device("cpu"))
    out.loss, out.grad_norm, out.tokens_per_expert_LE     # floats; (layers, experts) routed token slots

A step: forward/backward over this process's micro-batches (gradients accumulate), clip the global
gradient norm, check that loss and norm are finite (one host sync), AdamW step. The loss is the mean over
every target token of the step's *global* batch: each micro-batch's summed loss is divided by `n_targets`,
the step's target count over all processes, and multiplied by the world size, because FSDP averages
gradients over processes. So the per-step losses do not depend on how a batch is split into micro-batches
or processes. The MoE auxiliary loss is added as the mean over the micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .data import IGNORE, Batch
from .optim import OptimConfig


def build_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW without weight decay on norms and vectors; fused when the parameters are on CUDA (one kernel per
    group, no temporaries the size of the parameters as the default foreach path makes: 34.2% -> 39.2% MFU
    for a 1B model on an H100, benchmarks/RESULTS.md). Frozen parameters (a LoRA base) are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith("norm.weight") else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    cuda = bool(decay + no_decay) and all(p.device.type == "cuda" for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True if cuda else None)


def forward_loss(model: torch.nn.Module, b: Batch, device: torch.device, autocast_dtype: torch.dtype | None):
    """(summed token loss in fp32, the model's MoE aux output or None for a dense model) of one micro-batch.
    `autocast_dtype` None runs in the parameters' dtype; bf16 autocasts the matmuls."""
    ids, labels, docs = (t.to(device, non_blocking=True) for t in (b.input_ids, b.labels, b.doc_ids))
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits, aux = model(ids, doc_ids=docs, return_aux=True)  # (B, T, V)
    loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss_sum, aux


class NonFiniteStep(FloatingPointError):
    """The step's loss or gradient norm was NaN or Inf; the weights were not updated."""

    def __init__(self, loss: float, grad_norm: float):
        self.loss, self.grad_norm = loss, grad_norm
        self.what = "loss" if not math.isfinite(loss) else "gradient norm"
        super().__init__(f"non-finite {self.what} (loss={loss}, grad_norm={grad_norm}); weights were not updated")


@dataclass
class StepResult:
    loss: float                    # mean token loss over the global batch (summed over processes)
    aux_loss: float                # MoE auxiliary loss, mean over micro-batches and processes; 0 for dense
    grad_norm: float               # global gradient norm before clipping
    lr: float
    tokens_per_expert_LE: torch.Tensor | None  # (layers, experts) token slots routed on this process; None if dense


def _local(*values: float) -> list[float]:
    return list(values)


def clip_gradients(model: torch.nn.Module, grad_clip: float) -> torch.Tensor:
    """Clip the global gradient norm (no clipping when grad_clip <= 0); returns the norm before clipping, over
    every shard under FSDP."""
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP: the norm over every shard
        grad_norm = grad_norm.full_tensor()
    return grad_norm


def step_if_finite(optimizer: torch.optim.Optimizer, loss: float, grad_norm: float) -> None:
    """The optimizer step, or NonFiniteStep (gradients dropped) before anything is updated."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStep(loss, grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Sequence[Batch], *, lr: float,
               n_targets: int, grad_clip: float, device: torch.device, autocast_dtype: torch.dtype | None = None,
               world: int = 1, all_sum: Callable[..., list[float]] = _local) -> StepResult:
    """One step on this process's micro-batches `batches`; `n_targets` counts the target tokens of the whole
    step over every process, `all_sum` sums floats over processes (Dist.all_sum under torchrun). Raises
    NonFiniteStep, before updating anything, when the loss or the gradient norm is not finite."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    cfg: ModelConfig = model.cfg
    accum = len(batches)
    lm_total, aux_total = torch.zeros((), device=device), torch.zeros((), device=device)
    counts_LE = None
    for b in batches:
        loss_sum, aux = forward_loss(model, b, device, autocast_dtype)
        # x world: FSDP averages gradients over processes, the loss is a sum over all of them.
        loss = loss_sum * (world / n_targets)
        if aux is not None:  # the mean over every micro-batch of the step, after FSDP's average
            aux_loss = aux.loss(cfg)
            loss = loss + aux_loss / accum
            aux_total += aux_loss.detach() / accum
            counts_LE = aux.tokens_per_expert_LE if counts_LE is None else counts_LE + aux.tokens_per_expert_LE
        loss.backward()
        lm_total += loss_sum.detach() / n_targets
    grad_norm = clip_gradients(model, grad_clip)
    # One host sync per step: a non-finite loss or gradient must never reach the weights.
    lm, aux_mean = all_sum(lm_total.item(), aux_total.item() / world)
    gn = grad_norm.item()
    step_if_finite(optimizer, lm, gn)
    return StepResult(lm, aux_mean, gn, lr, None if counts_LE is None else counts_LE.detach().cpu())
