"""Robust aggregation of a module's Δs: what each member applies, from what it received itself.

Every member of a module's group receives the other members' Δs (swarm/exchange.py) and aggregates them
with its own, each weighed by the ticket (the tokens the coordinator leased to its slot). A liar may send
any Δ; its weight it cannot choose. The aggregate is CenteredClip (Karimireddy, He & Jaggi, "Learning from
history for Byzantine robust optimization", 2021), started at the coordinate-wise median:

    v₀ = median_i x_i  (per coordinate)           τ = clip_factor · median_i ‖x_i − v₀‖
    v_{k+1} = v_k + Σ_i w_i · min(1, τ / ‖x_i − v_k‖) · (x_i − v_k) / Σ_i w_i      (clip_iters times)

Both v₀ and τ come from the Δs the member received, never from figures a peer reports about itself. Each
iteration a peer of weight w_b moves v by at most (w_b / W) · τ, however large or oriented its Δ: with one
liar among four equal holders, a quarter of the honest Δs' typical distance from their median per
iteration, where the mean moves by a quarter of whatever the liar sends. Honest Δs within τ of the
centre are averaged exactly as the weighted mean would.

Two holders cannot out-vote a liar (nor can the coordinator's median of their uploads): with fewer than
three contributions the aggregate is the weighted mean. Put replication >= 3 where that matters.

Deterministic: members that received the same bytes compute bit-identical aggregates (inputs sorted by
peer id, fixed-order CPU arithmetic), so honest holders end the round with the same parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Aggregate:
    value: Tensor                  # the aggregated Δ (flat fp32)
    tau: float                     # the clipping radius (0 with fewer than three contributions)
    clipped: dict[str, float]      # peer -> the smallest scale its Δ got in any iteration, where < 1


@torch.no_grad()
def centered_clip(deltas: dict[str, Tensor], weights: dict[str, float], clip_factor: float = 1.0,
                  iters: int = 3) -> Aggregate:
    """CenteredClip of flat Δs (peer -> Δ), weighted; see the module docstring."""
    peers = sorted(deltas)
    if not peers:
        raise ValueError("nothing to aggregate")
    x = torch.stack([deltas[p].float().cpu() for p in peers])                       # (n, d)
    w = torch.tensor([float(weights[p]) for p in peers], dtype=torch.float64)
    if not bool((w > 0).all()):
        raise ValueError(f"weights must be > 0, got {dict(zip(peers, w.tolist(), strict=True))}")
    wf = (w / w.sum()).float()
    if len(peers) < 3:
        return Aggregate(wf @ x, 0.0, {})
    n = len(peers)
    v = x.sort(dim=0).values[(n - 1) // 2:n // 2 + 1].mean(0)   # coordinate-wise median (mean of the middle two)
    tau = clip_factor * float((x - v).norm(dim=1).median())
    smallest = torch.ones(len(peers))
    if tau > 0:
        for _ in range(iters):
            diff = x - v
            scale = (tau / diff.norm(dim=1).clamp_min(1e-30)).clamp(max=1.0)
            smallest = torch.minimum(smallest, scale)
            v = v + (wf * scale) @ diff
    clipped = {p: float(s) for p, s in zip(peers, smallest.tolist(), strict=True) if s < 1.0}
    return Aggregate(v, tau, clipped)
