"""A module's tensors in a model, and the *local model*: the trunk plus the experts a worker holds.

The local model of an assignment is a MoE with k experts per layer whose router rows are the held rows of
the full router. Softmax over the held logits equals softmax over all logits with the others masked to
-inf, so it is exactly the full model with `active_experts` set to the held experts, at a fraction of the
memory. Flat vectors (`flatten`) are how modules travel: fp32, the module's tensors in a fixed order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from model.transformer import Transformer

from .modules import EXPERT_TENSORS, TRUNK, Assignment, check_assignment, is_expert_param, parse_module


def full_assignment(model: Transformer) -> Assignment:
    return {i: list(range(model.cfg.moe.num_experts)) for i in range(model.cfg.num_layers)}


def trunk_names(model: Transformer) -> list[str]:
    return [n for n, _ in model.named_parameters() if not is_expert_param(n)]


def module_tensors(model: Transformer, module: str, index: dict[str, int] | None = None) -> list[Tensor]:
    """Views of `module`'s parameters in `model`.

    For an expert module "l{i}e{e}", `index` maps it to the expert's position in the model's stacked
    tensors (the local model's position, which differs from e when the model holds a subset).
    """
    if module == TRUNK:
        params = dict(model.named_parameters())
        return [params[n].data for n in trunk_names(model)]
    layer, expert = parse_module(module)
    j = expert if index is None else index[module]
    ff = model.layers[layer].feed_forward
    return [ff.w1_EFD.data[j], ff.w3_EFD.data[j], ff.w2_EDF.data[j], ff.router.weight.data[j]]


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1).float() for t in tensors])


def unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Copy a flat vector back into `tensors` (views of the model's parameters)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n
    assert offset == flat.numel(), "flat vector does not match the module's size"


@torch.no_grad()
def local_model(full: Transformer, assignment: Assignment) -> Transformer:
    """A MoE holding only the assigned experts (k per layer) with their router rows; trunk copied."""
    assignment = check_assignment(full.cfg.moe, full.cfg.num_layers, assignment)
    with torch.device("meta"):
        local = Transformer(_local_config(full.cfg, assignment))
    local.to_empty(device=next(full.parameters()).device)
    local = local.to(next(full.parameters()).dtype)
    _copy_held(full, local, assignment, to_local=True)
    return local


def _expert_tensors(dst_ff, src_ff) -> list[tuple[Tensor, Tensor]]:
    """(destination, source) pairs of the per-expert tensors of two MoE feed-forwards: w1, w3, w2 and the
    router's rows, each indexed by expert along dim 0."""
    return [(dst_ff.w1_EFD, src_ff.w1_EFD), (dst_ff.w3_EFD, src_ff.w3_EFD), (dst_ff.w2_EDF, src_ff.w2_EDF),
            (dst_ff.router.weight, src_ff.router.weight)]


def _copy_held(src: Transformer, dst: Transformer, assignment: Assignment, *, to_local: bool) -> None:
    """Copy the trunk and the held experts from `src` to `dst`: full -> local (`to_local`, expert e of layer
    i lands at its position j in the assignment) or local -> full (position j back to expert e)."""
    params = dict(src.named_parameters())
    for name, p in dst.named_parameters():
        if not is_expert_param(name):
            p.copy_(params[name])
    for i, experts in assignment.items():
        for j, e in enumerate(experts):
            for d, s in _expert_tensors(dst.layers[i].feed_forward, src.layers[i].feed_forward):
                d[j if to_local else e].copy_(s[e if to_local else j])


def _local_config(full_cfg, assignment: Assignment):
    k = len(assignment[0])
    return dataclasses.replace(full_cfg, moe=dataclasses.replace(full_cfg.moe, num_experts=k))


@torch.no_grad()
def local_model_from_checkpoint(directory: str | Path, assignment: Assignment) -> Transformer:
    """`local_model` straight from a checkpoint directory, reading only the trunk and the held experts'
    slices (safetensors slicing), so a worker never holds the full MoE in memory. Weights in fp32."""
    from safetensors import safe_open

    from model.checkpoint import WEIGHTS, load_config

    full_cfg = load_config(directory)
    assignment = check_assignment(full_cfg.moe, full_cfg.num_layers, assignment)
    with torch.device("meta"):
        local = Transformer(_local_config(full_cfg, assignment))
    local.to_empty(device="cpu")
    with safe_open(str(Path(directory) / WEIGHTS), framework="pt") as f:
        for name, p in local.named_parameters():
            if not is_expert_param(name):
                key = "tok_embeddings.weight" if name == "output.weight" and full_cfg.tie_word_embeddings else name
                p.copy_(f.get_tensor(key))
                continue
            layer = int(name.split(".")[1])
            sl = f.get_slice(name)
            for j, e in enumerate(assignment[layer]):
                p[j].copy_(sl[e:e + 1][0])
    if full_cfg.tie_word_embeddings:
        local.output.weight = local.tok_embeddings.weight
    return local


@torch.no_grad()
def merge_into(full: Transformer, local: Transformer, assignment: Assignment) -> None:
    """Write the local model's trunk and held experts back into the full model."""
    _copy_held(local, full, assignment, to_local=False)


def momentum_views(momentum_full: dict[str, Tensor], template: Transformer, module: str) -> list[Tensor]:
    """Views of one module's momentum inside full-layout momentum tensors (same naming as parameters)."""
    if module == TRUNK:
        return [momentum_full[n] for n in trunk_names(template)]
    layer, expert = parse_module(module)
    pre = f"layers.{layer}.feed_forward."
    return [momentum_full[pre + name][expert] for name in EXPERT_TENSORS]


def momentum_into(momentum_full: dict[str, Tensor], full: Transformer, momentum: dict[str, Tensor]) -> None:
    """Write flat per-module momentum into full-layout tensors (created as zeros when missing)."""
    if not momentum_full:
        momentum_full.update({n: torch.zeros_like(p, dtype=torch.float32) for n, p in full.named_parameters()})
    for m, flat in momentum.items():
        unflatten_into(flat, momentum_views(momentum_full, full, m))
