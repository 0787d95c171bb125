"""The `swarm:` section of project.yaml, and how a round is planned: expert assignment and `train` payloads.

Torch-free: the coordinator validates the section and plans rounds without loading torch. The round
driver (coordinator/swarm_driver.py) calls `plan_assignment` and `round_payloads` once per round; the
payloads are swarm.settings.TrainPayload, the typed contract the workers parse.

The averaging fields of the section (outer_lr, outer_momentum, compression, averaging_timeout,
failure_policy, clip_factor, exclude_factor, clip_iters) are swarm.settings.SwarmSettings' own fields, with its
defaults and help: one set of defaults for the coordinator and the workers.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from swarm.modules import count_holders, uniform_assignment
from swarm.settings import InnerConfig, SwarmSettings, TrainPayload

log = logging.getLogger(__name__)

_SETTINGS = {f.name: f for f in dataclasses.fields(SwarmSettings)}


def _setting(name: str, **constraints):
    """A section field that is SwarmSettings' field `name`: its default and its help."""
    f = _SETTINGS[name]
    return Field(f.default, description=f.metadata["help"], **constraints)


class SwarmSection(BaseModel):
    """The `swarm` section of project.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inner_steps: int = Field(100, ge=1, description="H: inner AdamW steps per round")
    rounds: int = Field(100, ge=1, description="rounds in the run")
    batch_size: int = Field(8, ge=1, description="sequences per inner step on each worker")
    micro_batch_size: int = Field(8, ge=1, description="sequences per forward/backward on a worker")
    seq_len: int = Field(128, ge=2, description="tokens per sequence")
    data_seed: int = Field(0, description="seed of the synthetic data stream, or of the shard order of each epoch")
    inner_lr: float = Field(1e-3, gt=0, description="peak inner AdamW learning rate")
    inner_min_lr: float = Field(1e-4, ge=0, description="inner learning rate at the end of the cosine decay")
    inner_warmup_steps: int = Field(10, ge=0, description="inner warmup steps (counted over the whole run)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay per token, as in single-process "
                                "training; workers apply it divided by the outer step's amplification "
                                "(`inner_weight_decay`)")
    outer_lr: float = _setting("outer_lr", gt=0)
    outer_momentum: float = _setting("outer_momentum", ge=0, lt=1)
    compression: Literal["fp16", "8bit", "none"] = _setting("compression")
    averaging_timeout: float = _setting("averaging_timeout", gt=0)
    failure_policy: Literal["retry", "local"] = _setting("failure_policy")
    clip_factor: float = _setting("clip_factor", gt=0)
    exclude_factor: float = _setting("exclude_factor", gt=1)
    clip_iters: int = _setting("clip_iters", ge=1, le=100)
    replication: int = Field(2, ge=1, description="holders wanted per expert")
    checkpoint_every: int = Field(10, ge=1, description="K: keep a round checkpoint every K rounds (the current "
                                  "round's is always kept, as `latest`)")
    round_timeout_s: float = Field(3600.0, gt=0, description="a round's deadline, from when its tasks are added: "
                                   "slots unfinished by then are cancelled (no credit) and the round closes with "
                                   "the results it has")
    join_timeout_s: float = Field(60.0, gt=0, description="how long a round waits, from when its tasks are added, "
                                  "for every slot's worker to join (the Join RPC, with its hivemind peer id) before "
                                  "it freezes the averaging groups with the slots that joined; a slot that joins "
                                  "later keeps its Δs local this round")
    workers: int = Field(2, ge=1, description="train slots per round when no worker has registered yet")
    slots_per_token: int = Field(1, ge=1, description="train slots one token's workers may fill per round: the "
                                 "most recently seen ones (a restarted daemon's old registration, or a token's "
                                 "extra registrations, get none)")
    memory_budget_bytes: int = Field(8 * 2**30, ge=0, description="memory budget of a worker that reports none")
    shards: Path | None = Field(None, description="a shard directory (`mujina-data shard` output: manifest.json + "
                                "shards) the rounds train on, relative to the project file; each train task gets a "
                                "disjoint lease of it. Unset: the built-in synthetic arithmetic data")

    @model_validator(mode="after")
    def _checks(self):
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"swarm.batch_size ({self.batch_size}) must be a multiple of swarm.micro_batch_size "
                             f"({self.micro_batch_size})")
        if self.inner_min_lr > self.inner_lr:
            raise ValueError("swarm.inner_min_lr must not exceed swarm.inner_lr")
        self.settings("check")  # the fields SwarmSettings checks across each other
        return self

    def settings(self, run: str) -> SwarmSettings:
        """The SwarmSettings every train task of the run carries."""
        return SwarmSettings(run=run, **{k: getattr(self, k) for k in _SETTINGS if k in type(self).model_fields})


def outer_amplification(rounds: int, lr: float, mu: float) -> float:
    """How much the outer Nesterov step multiplies a Δ that is the same every round, averaged over the run:
    round k steps lr·(1 + μ·(1 − μ^(k+1))/(1 − μ))·Δ (1.33 in round 0, up to lr/(1 − μ) = 7 for 0.7/0.9)."""
    return sum(lr * (1 + mu * (1 - mu ** (k + 1)) / (1 - mu)) for k in range(rounds)) / rounds


def inner_weight_decay(s: SwarmSection) -> float:
    """The workers' AdamW weight decay: `weight_decay` divided by the outer amplification. Decay is part of
    each worker's Δ and, unlike the gradients' noise, does not shrink when holders average their Δs; the outer
    step then multiplies it, so with the single-process decay a swarm would shrink weights about 3x faster per
    token (benchmarks/swarm_quality.py: loss ratio 1.034 instead of 1.028)."""
    return s.weight_decay / outer_amplification(s.rounds, s.outer_lr, s.outer_momentum)


# ---- assignment ----------------------------------------------------------------------------------

@dataclass
class Plan:
    assignment: dict[str, list[int]]     # slot (worker id) -> experts held, the same in every layer
    holders: dict[int, int]              # expert -> number of holders
    frozen: list[int]                    # experts nobody holds this round


def plan_assignment(capacities: dict[str, int], num_experts: int, top_k: int, replication: int = 2,
                    previous: dict[str, list[int]] | None = None) -> Plan:
    """Give each worker min(capacity, E) experts, experts with the fewest holders first.

    Slots are filled one at a time across workers (round-robin), so every expert gets a first holder
    before any gets a second; ties prefer what a worker held last round (`previous`), so a join or a
    leave moves as few experts as possible. Workers whose capacity is below top_k hold nothing."""
    previous = previous or {}
    cap = {w: min(c, num_experts) for w, c in capacities.items() if c >= top_k}
    held: dict[str, list[int]] = {w: [] for w in cap}
    count = [0] * num_experts
    for slot in range(max(cap.values(), default=0)):
        for w in sorted(cap, key=lambda w: (-cap[w], w)):
            if slot >= cap[w]:
                continue
            before = set(previous.get(w, ()))
            e = min((e for e in range(num_experts) if e not in held[w]),
                    key=lambda e: (min(count[e], replication), e not in before, count[e], e))
            held[w].append(e)
            count[e] += 1
    frozen = [e for e in range(num_experts) if count[e] == 0]
    short = [e for e in range(num_experts) if 0 < count[e] < replication]
    if frozen:
        log.warning("experts %s have no holder this round: they stay frozen (add workers or memory)", frozen)
    if short:
        log.info("experts %s have fewer than %d holders", short, replication)
    return Plan({w: sorted(v) for w, v in held.items()}, dict(enumerate(count)), frozen)


def worker_budget(capabilities: dict, default: int) -> int:
    """A worker's memory for a round: its largest accelerator, else its host memory, else the default."""
    accel = [d.get("memory_bytes", 0) for d in capabilities.get("devices", []) if d.get("kind") in ("cuda", "mps")]
    return max(accel, default=0) or int(capabilities.get("host_memory_bytes") or 0) or default




def round_payloads(s: SwarmSection, run: str, round_: int, checkpoint: str, plan: Plan, num_layers: int,
                   leases: list | None = None, shards_at: str | None = None) -> list[dict]:
    """One `train` payload (TrainPayload.to_dict()) per slot, slots in sorted order. With `leases` (one
    data_shards.lease.Lease per slot), slot i trains on leases[i], its shards fetched as shards/{shards_at}/FILE;
    without, on the synthetic stream, reading sequence indices [i·B, (i+1)·B) of every inner step."""
    if leases is not None and len(leases) != len(plan.assignment):
        raise ValueError(f"{len(leases)} leases for {len(plan.assignment)} slots")
    assignments = {slot: uniform_assignment(experts, num_layers) for slot, experts in plan.assignment.items()}
    holders = count_holders(assignments.values())
    settings = s.settings(run)
    optim = {"lr": s.inner_lr, "min_lr": s.inner_min_lr, "warmup_steps": s.inner_warmup_steps,
             "weight_decay": inner_weight_decay(s)}
    out = []
    for i, slot in enumerate(sorted(assignments)):
        data = ({"data_offset": i * s.batch_size} if leases is None else
                {"data_source": "shards", "data_offset": 0, "lease": leases[i], "shards_at": shards_at})
        inner = InnerConfig(inner_steps=s.inner_steps, total_steps=s.rounds * s.inner_steps, batch_size=s.batch_size,
                            micro_batch_size=s.micro_batch_size, seq_len=s.seq_len, data_seed=s.data_seed,
                            optim=optim, **data)
        out.append(TrainPayload(round_, checkpoint, slot, assignments[slot], settings, inner, holders).to_dict())
    return out
