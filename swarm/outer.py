"""The outer step of a round: each module's outcome, and Nesterov SGD on θ_start with the averaged Δ.

One round (DiLoCo, Douillard et al. 2023), per module m held:

    Δ_m       = θ_start_m − θ_local_m                 (after H inner AdamW steps, swarm/round.py)
    Δ̄_m       = CenteredClip_p(Δ_m,p; w_p)           over the holders p (swarm/robust.py); w_p = the tokens the
                                                    coordinator leased to p's slot, from the round's ticket
    mom_m     = μ · mom_m + Δ̄_m                       (outer Nesterov SGD, lr 0.7, μ 0.9 by default)
    θ_start_m = θ_start_m − lr · (Δ̄_m + μ · mom_m)    the next round's start, the same on every holder

Holders that start from the same θ and momentum and receive the same Δ̄ end the round with the same
parameters. A module whose group fails (no other member's Δ arrived) follows the failure policy:
"retry" keeps the module's θ_start and momentum, identical on every holder, and its local progress, so the
next round's Δ carries both rounds of work; "local" applies the outer step with the local Δ alone (holders
then differ until their next agreed average). A non-finite Δ is never sent and never reaches the weights:
its holder goes back to θ_start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model.transformer import Transformer

from .settings import SwarmSettings
from .tensors import flatten, module_tensors, unflatten_into

NO_TIMINGS = {"allreduce": 0.0, "aggregate": 0.0}   # SwarmExchange.timings before any wait


@dataclass
class ModuleOutcome:
    module: str
    outcome: str                 # ok | failed (no other member's Δ arrived) | refused (own Δ not finite) |
                                 # local (averaging off, sole holder, or not on the ticket's group)
    delta_norm: float
    group_size: int = 1
    bytes_sent: int = 0
    refused_peers: list[str] = field(default_factory=list)   # members whose Δ did not arrive or was refused


@dataclass
class RoundReport:
    round: int
    modules: list[ModuleOutcome]
    seconds: float
    # of `seconds`: sending the Δs and waiting for the other members' (the group's slowest member, then the
    # transfer); and CenteredClip (what the robust aggregation costs over a plain mean)
    allreduce_seconds: float = 0.0
    aggregate_seconds: float = 0.0

    @property
    def bytes_sent(self) -> int:
        return sum(m.bytes_sent for m in self.modules)

    def count(self, outcome: str) -> int:
        return sum(m.outcome == outcome for m in self.modules)


class OuterState:
    """θ_start and Nesterov momentum per module (flat fp32), and the outer step."""

    def __init__(self, model: Transformer, modules: list[str], index: dict[str, int],
                 momentum: dict[str, Tensor] | None = None):
        self.model, self.modules, self.index = model, modules, index
        self.theta = {m: flatten(module_tensors(model, m, index)).clone() for m in modules}
        self.momentum = momentum or {m: torch.zeros_like(self.theta[m]) for m in modules}

    def deltas(self) -> dict[str, Tensor]:
        return {m: self.theta[m] - flatten(module_tensors(self.model, m, self.index)) for m in self.modules}

    @torch.no_grad()
    def step(self, m: str, delta: Tensor, lr: float, mu: float) -> None:
        """Nesterov SGD on θ_start with the averaged pseudo-gradient; writes the result into the model."""
        buf = self.momentum[m].mul_(mu).add_(delta)
        self.theta[m] -= lr * (delta + mu * buf)
        unflatten_into(self.theta[m], module_tensors(self.model, m, self.index))

    @torch.no_grad()
    def revert(self, m: str) -> None:
        unflatten_into(self.theta[m], module_tensors(self.model, m, self.index))


def outer_round(exchange, state: OuterState, settings: SwarmSettings, round_: int) -> RoundReport:
    """Δ per module, averaging among holders, outer step (see the module docstring for the policies)."""
    t0 = time.perf_counter()
    deltas = state.deltas()
    if exchange is None:
        outcomes = {m: ModuleOutcome(m, "local", float(d.norm())) for m, d in deltas.items()}
    else:
        outcomes = exchange.average(round_, deltas)
    for m, o in outcomes.items():
        failed = o.outcome == "failed"  # deltas[m] is then this holder's own Δ
        if o.outcome in ("ok", "local") or (failed and settings.failure_policy == "local"):
            state.step(m, deltas[m], settings.outer_lr, settings.outer_momentum)
        elif o.outcome == "refused":
            state.revert(m)  # a bad Δ never reaches the weights; this holder resumes from θ_start
        # failed + retry: keep θ_start and momentum (the same on every holder) as the reference and
        # the local progress; next round's Δ carries both rounds
    timings = exchange.timings if exchange is not None else NO_TIMINGS
    return RoundReport(round_, [outcomes[m] for m in state.modules], time.perf_counter() - t0,
                       allreduce_seconds=timings["allreduce"], aggregate_seconds=timings["aggregate"])

