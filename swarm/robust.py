"""Robust aggregation of a module's Δs: what each member applies, from what it received itself.

Every member of a module's group receives the other members' Δs (swarm/exchange.py) and aggregates them
with its own, each weighed by the ticket (the tokens the coordinator leased to its slot). A liar may send
any Δ; its weight it cannot choose. First the Δs far from the others are left out: with d_i the distance
of x_i from the coordinate-wise median, those with d_i > exclude_factor · median_i d_i (at most
(n − 1) // 2 of them, the farthest first). Honest Δs sit close to that median distance (within ~5% in
benchmarks/swarm_quality.py's runs: in many dimensions distances concentrate), while a reversed Δ of
honest norm sits at 1.4-2.2 of it, a scaled one far beyond. The rest are aggregated by CenteredClip
(Karimireddy, He & Jaggi, "Learning from history for Byzantine robust optimization", 2021), started at
their coordinate-wise median:

    v₀ = median_i x_i  (per coordinate)           τ = clip_factor · median_i ‖x_i − v₀‖
    v_{k+1} = v_k + Σ_i w_i · min(1, τ / ‖x_i − v_k‖) · (x_i − v_k) / Σ_i w_i      (clip_iters times)

Both v₀ and τ come from the Δs the member received, never from figures a peer reports about itself. Each
iteration a peer of weight w_b moves v by at most (w_b / W) · τ, however large or oriented its Δ: with one
liar among four equal holders, a quarter of the honest Δs' typical distance from their median per
iteration, where the mean moves by a quarter of whatever the liar sends. Honest Δs within τ of the
centre are averaged exactly as the weighted mean would. What no distance rule can catch is a Δ that
looks honest by distance but adds nothing (a zero Δ sits closer to the centre than honest ones when
they agree little): it dilutes the average by its weight's share, as a member that trained on nothing.

Two holders cannot out-vote a liar (nor can the coordinator's median of their uploads): with fewer than
three contributions the aggregate is the weighted mean. Put replication >= 3 where that matters.

Deterministic: members that received the same bytes compute bit-identical aggregates (inputs sorted by
peer id, fixed-order CPU arithmetic), so honest holders end the round with the same parameters.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Aggregate:
    value: Tensor                  # the aggregated Δ (flat fp32)
    tau: float                     # the clipping radius (0 with fewer than three contributions)
    clipped: dict[str, float]      # peer -> the smallest scale its Δ got in any iteration, where < 1
    excluded: dict[str, float] = field(default_factory=dict)   # peer -> its distance from the centre, in τ


MEDIAN_CHUNK = 1 << 18   # coordinates per chunk of the coordinate-wise median (n x chunk floats at a time)


@torch.no_grad()
def centered_clip(deltas: dict[str, Tensor], weights: dict[str, float], clip_factor: float = 1.0,
                  iters: int = 3, exclude_factor: float = math.inf) -> Aggregate:
    """CenteredClip of flat Δs (peer -> Δ), weighted, after leaving out the Δs farther than `exclude_factor`
    medians from the coordinate-wise median (at most (n - 1) // 2 of them, the farthest first); see the
    module docstring.

    Memory beyond the inputs: the centre, the next centre and one Δ-sized temporary (and the median's
    n x MEDIAN_CHUNK chunk), whatever the number of contributions: a group of n holders of the trunk
    does not need n more copies of it."""
    peers = sorted(deltas)
    if not peers:
        raise ValueError("nothing to aggregate")
    xs = {p: deltas[p].detach().float().cpu().reshape(-1) for p in peers}
    w = {p: float(weights[p]) for p in peers}
    if not all(v > 0 for v in w.values()):   # NaN fails too
        raise ValueError(f"weights must be > 0, got {w}")
    excluded: dict[str, float] = {}
    if len(peers) >= 3 and exclude_factor < math.inf:
        centre = _median([xs[p] for p in peers])
        dist = {p: float(torch.dist(xs[p], centre)) for p in peers}
        med = statistics.median(dist.values())
        far = sorted((p for p in peers if dist[p] > exclude_factor * med), key=lambda p: (-dist[p], p))
        excluded = {p: dist[p] / med for p in far[:(len(peers) - 1) // 2]}
        peers = [p for p in peers if p not in excluded]
    value, tau, smallest = _centered_clip([xs[p] for p in peers], [w[p] for p in peers], clip_factor, iters)
    clipped = {p: s for p, s in zip(peers, smallest, strict=True) if s < 1.0}
    return Aggregate(value, tau, clipped, excluded)


def _centered_clip(xs: list[Tensor], weights: list[float], clip_factor: float,
                   iters: int) -> tuple[Tensor, float, list[float]]:
    total = sum(weights)
    share = [wt / total for wt in weights]
    n = len(xs)
    if n < 3:
        out = torch.zeros_like(xs[0])
        for x, c in zip(xs, share, strict=True):
            out.add_(x, alpha=c)
        return out, 0.0, [1.0] * n
    v = _median(xs)
    tau = clip_factor * statistics.median([float(torch.dist(x, v)) for x in xs])
    smallest = [1.0] * n
    if tau > 0:
        for _ in range(iters):
            dist = [float(torch.dist(x, v)) for x in xs]
            scale = [min(1.0, tau / max(d, 1e-30)) for d in dist]
            smallest = [min(a, b) for a, b in zip(smallest, scale, strict=True)]
            step = torch.zeros_like(v)
            for x, c, sc in zip(xs, share, scale, strict=True):
                step.add_(x - v, alpha=c * sc)
            v = v + step
    return v, tau, smallest


def _median(xs: list[Tensor]) -> Tensor:
    """The coordinate-wise median (the mean of the middle two for an even count), chunk by chunk."""
    n, size = len(xs), xs[0].numel()
    out = torch.empty(size)
    lo, hi = (n - 1) // 2, n // 2 + 1
    for start in range(0, size, MEDIAN_CHUNK):
        stop = min(size, start + MEDIAN_CHUNK)
        block = torch.stack([x[start:stop] for x in xs]).sort(dim=0).values
        out[start:stop] = block[lo:hi].mean(0)
    return out
