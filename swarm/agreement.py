"""Whether the holders of a module ended an all-reduce with the same average.

hivemind 1.1.12 can finish an all-reduce with parts missing (a reducer that misses `next_chunk_timeout`,
a part that fails to deserialise): it logs "Averaging: received N% results", leaves those parts at the
local values, and `step()` reports success. After the all-reduce every member publishes a report per
module (swarm/averager.py): its Δ norm and `agreement_sketch` of its average, or that its result was
partial or failed; each member compares the others' with its own (`report_mismatch`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

SKETCH_CHUNK = 1 << 16       # elements per chunk; every chunk is projected on the same sign vectors
SKETCH_PROJECTIONS = 4       # ±1 projections per block: a missing part escapes all four with tiny probability
SKETCH_MAX_BLOCKS = 32       # a module's sketch is at most 32 blocks × (4 projections + 1 bound) floats
SKETCH_SIGMAS = 10.0         # tolerance in units of the rounding bound's norm (sub-Gaussian tail: e^-50)
FP32_EPS = 2.0 ** -23


@lru_cache(maxsize=1)
def _signs() -> Tensor:
    """(SKETCH_PROJECTIONS, SKETCH_CHUNK) fp64 of ±1 from murmur3's integer finaliser: plain int64
    arithmetic, so every holder builds the same signs whatever its torch version or platform."""
    h = torch.arange(SKETCH_PROJECTIONS * SKETCH_CHUNK, dtype=torch.int64)
    mask = 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & mask
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & mask
    h = h ^ (h >> 16)
    return ((h & 1) * 2 - 1).double().view(SKETCH_PROJECTIONS, SKETCH_CHUNK)


def _rounding_bound(x: Tensor, compression: str) -> Tensor:
    """Per element, a bound on |x − decompress(compress(x))| for hivemind's compressions: fp16 rounds to
    11 significant bits (2^-25 in the subnormal range); Uniform8BitQuantization maps mean ± 3σ onto 256
    buckets (each decoded as its members' mean, so off by at most a bucket, 6σ/256) and clamps the rest
    into the edge buckets. For 8-bit this is an estimate: hivemind takes σ per part, we per chunk."""
    if compression == "none":
        return torch.zeros_like(x)
    if compression == "fp16":
        return x.abs() * 2.0 ** -11 + 2.0 ** -25
    mean, std = x.mean(), x.std() if x.numel() > 1 else x.new_zeros(())
    return 6 * std / 256 + ((x - mean).abs() - 3 * std).clamp_min(0)


@torch.no_grad()
def agreement_sketch(averaged: Tensor, local: Tensor, compression: str) -> dict[str, list[float]]:
    """A few numbers that tell whether two holders' averaged Δ̄ differ by more than rounding.

    hivemind gives each holder p the result r_p = Δ_p + C(avg − C(Δ_p)) (C: the compression), so the
    holders of one module differ by at most b_p + b_q element-wise, with b_p = the rounding of C(Δ_p) and of
    the returned difference d_p = r_p − Δ_p, plus fp32 rounding. Per block of the flat vector the sketch
    holds `proj`, the projections Σ g_i r_i on fixed pseudo-random signs g, and `tol`, ‖b‖₂. For signs
    independent of the data, Σ g_i (r_p − r_q)_i is sub-Gaussian with scale ≤ ‖b_p‖ + ‖b_q‖, so
    `sketches_agree` tolerates SKETCH_SIGMAS × (tol_p + tol_q). A part left at the local values moves the
    projections by about ‖d_part‖₂: detected once it exceeds the tolerance, for fp16 a part carrying more
    than ~1e-4 of its block's squared norm. Cost: one pass over the module in chunks of 64 Ki elements.
    """
    n = averaged.numel()
    chunks = max(1, math.ceil(n / SKETCH_CHUNK))
    blocks = min(SKETCH_MAX_BLOCKS, chunks)
    proj = torch.zeros(blocks, SKETCH_PROJECTIONS, dtype=torch.float64)
    tol2 = torch.zeros(blocks, dtype=torch.float64)
    signs = _signs()
    for c in range(chunks):
        lo, hi = c * SKETCH_CHUNK, min(n, (c + 1) * SKETCH_CHUNK)
        r, x = averaged[lo:hi].float().cpu(), local[lo:hi].float().cpu()
        d = r - x
        k = c * blocks // chunks
        proj[k] += signs[:, :hi - lo] @ r.double()
        b = _rounding_bound(x, compression) + _rounding_bound(d, compression) + 2 * FP32_EPS * (d.abs() + r.abs())
        tol2[k] += b.double().square().sum()
    return {"proj": proj.flatten().tolist(), "tol": tol2.sqrt().tolist()}


def sketches_agree(a: dict, b: dict) -> bool:
    """Whether two `agreement_sketch`es are within rounding of each other (False for malformed ones, NaN)."""
    try:
        pa, pb, ta, tb = (list(map(float, v)) for v in (a["proj"], b["proj"], a["tol"], b["tol"]))
    except (KeyError, TypeError, ValueError):
        return False
    if len(pa) != len(pb) or len(ta) != len(tb) or len(pa) != SKETCH_PROJECTIONS * len(ta):
        return False
    return all(abs(x - y) <= SKETCH_SIGMAS * (ta[i // SKETCH_PROJECTIONS] + tb[i // SKETCH_PROJECTIONS])
               for i, (x, y) in enumerate(zip(pa, pb, strict=True)))


def report_mismatch(mine: dict, theirs: dict) -> str:
    """Why another member's report (a sketch, or partial / failed) disagrees with this peer's sketch; '' if not."""
    if "partial" in theirs:
        return f"received {100 * float(theirs['partial']):.1f}% of the average"
    if "failed" in theirs:
        return "its averaging failed"
    return "" if sketches_agree(mine, theirs) else "checksum differs"


def reported_norm(report: dict) -> float:
    """The Δ norm in another member's report; a malformed one counts as non-finite (refused)."""
    try:
        return float(report["norm"])
    except (KeyError, TypeError, ValueError):
        return math.inf

