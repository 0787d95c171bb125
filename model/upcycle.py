"""Sparse upcycling: a dense checkpoint becomes a Mixture-of-Experts.

Every expert starts as a copy of the dense FFN, and the router is freshly initialised.
Because routing renormalises the top-k weights to sum to one, k identical experts give
exactly the dense FFN's output: at step 0 the MoE's logits equal the dense model's (up to
fp32 rounding), whatever the router says.

Identical experts receive nearly identical gradients, so they diversify slowly. Two options
break the symmetry:
  * drop_ratio r (Drop-Upcycling, Nakamura et al. 2025): in each expert, a random share r of
    the FFN's intermediate neurons (rows of w1 and w3, columns of w2) is re-initialised from a
    normal distribution with the mean and standard deviation of the original matrix;
  * noise_std s: Gaussian noise of standard deviation s added to every expert weight.
Either breaks exactness on purpose.
"""

from __future__ import annotations

import dataclasses

import torch

from .config import MoEConfig
from .transformer import Transformer


@torch.no_grad()
def upcycle(
    dense: Transformer,
    num_experts: int,
    top_k: int,
    *,
    noise_std: float = 0.0,
    drop_ratio: float = 0.0,
    seed: int = 0,
) -> Transformer:
    """Return a new MoE Transformer built from `dense` (which is left unchanged)."""
    if dense.cfg.moe is not None:
        raise ValueError("the checkpoint is already a Mixture-of-Experts; upcycle a dense checkpoint")
    if not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(f"drop_ratio must be in [0, 1], got {drop_ratio}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    cfg = dataclasses.replace(dense.cfg, moe=MoEConfig(num_experts=num_experts, top_k=top_k))
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        moe = Transformer(cfg)
    moe.to_empty(device="cpu")
    moe.init_weights(generator=g)  # gives the routers their fresh initialisation
    moe = moe.to(next(dense.parameters()).dtype)

    src = dense.state_dict()
    dst = moe.state_dict()
    for key, value in src.items():
        if key in dst:
            dst[key].copy_(value)
    for i, layer in enumerate(moe.layers):
        ff = layer.feed_forward
        for name, stacked in (("w1", ff.w1_EFD), ("w3", ff.w3_EFD), ("w2", ff.w2_EDF)):
            stacked.copy_(src[f"layers.{i}.feed_forward.{name}.weight"].expand_as(stacked))
        if drop_ratio > 0:
            _drop_reinit(ff, src, i, drop_ratio, g)
        if noise_std > 0:
            for p in (ff.w1_EFD, ff.w3_EFD, ff.w2_EDF):
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * noise_std)
    return moe


def _drop_reinit(ff, src: dict[str, torch.Tensor], layer: int, ratio: float, g: torch.Generator) -> None:
    E, F_, _ = ff.w1_EFD.shape
    n_drop = round(ratio * F_)
    if n_drop == 0:
        return
    stats = {name: (src[f"layers.{layer}.feed_forward.{name}.weight"].float().mean().item(),
                    src[f"layers.{layer}.feed_forward.{name}.weight"].float().std().item())
             for name in ("w1", "w3", "w2")}
    for e in range(E):
        idx = torch.randperm(F_, generator=g)[:n_drop]  # the neurons this expert re-learns
        for name, w, rows in (("w1", ff.w1_EFD[e], True), ("w3", ff.w3_EFD[e], True),
                              ("w2", ff.w2_EDF[e], False)):
            mean, std = stats[name]
            shape = (n_drop, w.shape[1]) if rows else (w.shape[0], n_drop)
            fresh = (torch.randn(shape, generator=g) * std + mean).to(w.dtype)
            if rows:
                w[idx] = fresh  # w1/w3 [F, D]: neuron j is row j
            else:
                w[:, idx] = fresh  # w2 [D, F]: neuron j is column j
