"""A swarm round's settings, and the `train` task payload that is the whole contract of a round.

Torch-free: the coordinator builds and validates payloads without loading torch.

    s = SwarmSettings(run="demo")                         # averaging and the outer step, one set of defaults
    inner = InnerConfig(inner_steps=50, total_steps=500)  # the inner loop on one worker
    p = TrainPayload(round=0, checkpoint="demo/round_000000", slot="w1", assignment={0: [0, 1]},
                     settings=s, inner=inner, expected_holders={"trunk": 2, "l0e0": 2, "l0e1": 2})
    TrainPayload.from_dict(p.to_dict()) == p              # what travels as the task's JSON payload

`from_dict` is strict on both ends: unknown keys, wrong types and inconsistent fields raise ValueError
naming the field. A payload decides only what the round is; what is local to a worker (its device, its
inner optimizer's implementation, activation checkpointing, a local token file) is not in it, so a
coordinator cannot make a worker read a local file or pick its device.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from data_shards.lease import Lease
from model.config import checked_fields, help_field
from model.optim import OptimConfig

from .modules import Assignment, parse_module

COMPRESSIONS = ("fp16", "8bit", "none")


@dataclass(frozen=True)
class SwarmSettings:
    """How a run's workers average and take the outer step. The coordinator's `swarm:` section (project.yaml)
    exposes the same fields with the same defaults, and every `train` task carries them."""

    run: str = help_field("The swarm run's name: in every ticket and Δ header (no '.' or '/').")
    outer_lr: float = help_field("Outer Nesterov SGD learning rate (DiLoCo: 0.7).", default=0.7)
    outer_momentum: float = help_field("Outer Nesterov momentum (DiLoCo: 0.9).", default=0.9)
    compression: str = help_field("How Δ travels: fp16, 8bit or none.", default="fp16")
    averaging: bool = help_field("False: every module takes the outer step with its local Δ alone.", default=True)
    averaging_timeout: float = help_field("Seconds a member waits for the other members' Δs once its own is ready; "
                                          "a member whose Δ has not arrived by then is left out of the round's "
                                          "aggregate (swarm/exchange.py).", default=60.0)
    failure_policy: str = help_field("A module whose group fails: retry (carry its Δ to the next round) or local "
                                     "(apply it alone).", default="retry")
    clip_factor: float = help_field("CenteredClip's radius, in medians of the Δs' distances from their coordinate-wise "
                                    "median (swarm/robust.py): a Δ farther than that counts only that far.",
                                    default=1.0)
    exclude_factor: float = help_field("Leave out a Δ farther than this many medians of the Δs' distances from "
                                       "their coordinate-wise median (a reversed or scaled Δ; honest ones sit "
                                       "within ~1.05 of it, benchmarks/RESULTS.md), before CenteredClip.",
                                       default=1.3)
    clip_iters: int = help_field("CenteredClip iterations; each bounds what one member moves the aggregate by its "
                                 "weight's share of the radius.", default=3)

    def __post_init__(self) -> None:
        if not isinstance(self.run, str) or "." in self.run or "/" in self.run or not self.run:
            raise ValueError(f"swarm run name {self.run!r} must be non-empty without '.' or '/'")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"swarm compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        if self.failure_policy not in ("retry", "local"):
            raise ValueError(f"swarm failure_policy must be retry or local, got {self.failure_policy!r}")
        if not (self.outer_lr > 0 and 0 <= self.outer_momentum < 1):
            raise ValueError("swarm outer_lr must be > 0 and outer_momentum in [0, 1)")
        if not self.averaging_timeout > 0:
            raise ValueError("swarm averaging_timeout must be > 0")
        if not 0 < self.clip_factor < math.inf:
            raise ValueError(f"swarm clip_factor must be finite and > 0, got {self.clip_factor!r}")
        if not self.exclude_factor > 1:
            raise ValueError(f"swarm exclude_factor must be > 1 (inf: never), got {self.exclude_factor!r}")
        if type(self.clip_iters) is not int or not 1 <= self.clip_iters <= 100:
            raise ValueError(f"swarm clip_iters must be an integer in [1, 100], got {self.clip_iters!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "settings") -> SwarmSettings:
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be a mapping, got {type(d).__name__}")
        if "run" not in d:
            raise ValueError(f"{where}.run is missing")
        return cls(**checked_fields(cls, d, where))


DATA_SOURCES = ("synthetic", "tokens", "shards")
LOCAL_INNER_KEYS = ("data_path", "data_dtype", "optimizer", "activation_checkpointing", "device")


@dataclass
class InnerConfig:
    """The inner loop of a round: H AdamW steps on this worker's share of each step's batch."""

    inner_steps: int = help_field("H: inner steps per round.", default=50)
    total_steps: int = help_field("Inner steps of the whole run: the learning-rate schedule's length.", default=1000)
    batch_size: int = help_field("Sequences per inner step on this worker.", default=8)
    micro_batch_size: int | None = help_field("Sequences per forward/backward (default: batch_size).", default=None)
    seq_len: int = help_field("Tokens per sequence.", default=128)
    data_source: str = help_field("synthetic (the built-in stream), shards (the task's lease of the "
                                  "coordinator's corpus) or tokens (a local token file, never in a payload).",
                                  default="synthetic")
    lease: Lease | None = help_field("data_source=shards: this task's lease (data_shards/lease.py).", default=None)
    shards_at: str | None = help_field("data_source=shards: the lease's directory under the coordinator's shards/.",
                                       default=None)
    data_seed: int = help_field("Seed of the synthetic stream.", default=0)
    data_offset: int = help_field("First sequence index of this worker's share of each step (synthetic).", default=0)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # local to the worker, never in a payload:
    data_path: str | None = help_field("data_source=tokens: the token file.", default=None)
    data_dtype: str = help_field("data_source=tokens: uint16 or uint32.", default="uint16")
    optimizer: str = help_field("adamw, or adamw8bit (bitsandbytes, CUDA only).", default="adamw")
    activation_checkpointing: bool = help_field("Recompute each block's activations in backward.", default=False)
    device: str = help_field("The torch device the round runs on.", default="cpu")

    def __post_init__(self) -> None:
        if self.micro_batch_size is None:
            self.micro_batch_size = self.batch_size
        if isinstance(self.optim, dict):
            self.optim = OptimConfig(**checked_fields(OptimConfig, self.optim, "inner.optim"))
        if isinstance(self.lease, dict):
            try:
                self.lease = Lease.from_dict(self.lease)
            except ValueError as e:
                raise ValueError(f"inner.lease: {e}") from None
        for name in ("inner_steps", "total_steps", "batch_size", "micro_batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"inner.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"inner.batch_size={self.batch_size} must be a multiple of "
                             f"inner.micro_batch_size={self.micro_batch_size}")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise ValueError(f"inner.optimizer must be adamw or adamw8bit, got {self.optimizer!r}")
        if self.data_offset < 0:
            raise ValueError("inner.data_offset must be >= 0")
        if self.data_source not in DATA_SOURCES:
            raise ValueError(f"inner.data_source must be one of {', '.join(DATA_SOURCES)}, got {self.data_source!r}")
        if self.data_source == "tokens" and not self.data_path:
            raise ValueError("inner.data_source=tokens needs inner.data_path")
        if self.lease is not None and (self.lease.sequences != self.inner_steps * self.batch_size
                                       or self.lease.seq_len != self.seq_len):
            raise ValueError("inner.lease must hold inner_steps · batch_size sequences of seq_len tokens")

    @property
    def tokens_bound(self) -> int:
        """The most tokens a round can train on: H · B · T, or the lease's tokens when it has one."""
        bound = self.inner_steps * self.batch_size * self.seq_len
        return min(bound, self.lease.tokens) if self.lease is not None else bound

    def to_payload(self) -> dict[str, Any]:
        """The fields a `train` payload carries (no worker-local ones)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in LOCAL_INNER_KEYS}
        out["optim"] = dataclasses.asdict(self.optim)
        out["lease"] = self.lease.to_dict() if self.lease is not None else None
        return out

    @classmethod
    def from_payload(cls, d: Any, device: str = "cpu") -> InnerConfig:
        """The inner config of a payload's `inner` object, run on `device`."""
        if not isinstance(d, dict):
            raise ValueError(f"inner must be a mapping, got {type(d).__name__}")
        local = sorted(set(d) & set(LOCAL_INNER_KEYS))
        if local:
            raise ValueError(f"inner.{local[0]} is the worker's own choice, not a payload's")
        for key in ("inner_steps", "batch_size", "seq_len"):
            if key not in d:
                raise ValueError(f"inner.{key} is missing")
        d = dict(d)
        optim, lease = d.pop("optim", None), d.pop("lease", None)
        kw = checked_fields(cls, d, "inner")
        if optim is not None and not isinstance(optim, dict):
            raise ValueError("inner.optim must be a mapping")
        if lease is not None and not isinstance(lease, dict):
            raise ValueError("inner.lease must be a mapping")
        if kw.get("data_source", "synthetic") == "tokens":
            raise ValueError("inner.data_source=tokens reads a local file: a payload may ask for synthetic or shards")
        inner = cls(**kw, optim=optim or {}, lease=lease, device=device)
        if inner.data_source == "shards" and (inner.lease is None or not inner.shards_at):
            raise ValueError("inner.data_source=shards needs inner.lease and inner.shards_at (where the lease's "
                             "shards are on the coordinator)")
        if inner.shards_at is not None and not _NAME.fullmatch(inner.shards_at):
            raise ValueError(f"inner.shards_at {inner.shards_at!r} must be a relative name of letters, digits and ._-")
        return inner


# a name under the coordinator's checkpoints/ or shards/: relative, no '..', no empty parts
_NAME = re.compile(r"(?!\.\.?(/|$))[A-Za-z0-9_-][A-Za-z0-9._-]*(/(?!\.\.?(/|$))[A-Za-z0-9_-][A-Za-z0-9._-]*)*")


@dataclass
class TrainPayload:
    """A `train` task: one swarm round on one slot."""

    round: int
    checkpoint: str                     # the round checkpoint under the coordinator's checkpoints/
    slot: str                           # which of the round's slots this task fills
    assignment: Assignment              # layer -> experts this slot holds
    settings: SwarmSettings
    inner: InnerConfig
    expected_holders: dict[str, int]    # module -> holders this round (what the exchange may receive: memory)

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "checkpoint": self.checkpoint, "slot": self.slot,
                "assignment": {str(k): list(v) for k, v in sorted(self.assignment.items())},
                "settings": self.settings.to_dict(), "inner": self.inner.to_payload(),
                "expected_holders": dict(self.expected_holders)}

    @classmethod
    def from_dict(cls, d: Any, device: str = "cpu") -> TrainPayload:
        """Parse and validate a payload; ValueError names the field ("train payload.inner.seq_len ...")."""
        if not isinstance(d, dict):
            raise ValueError(f"train payload must be a JSON object, got {type(d).__name__}")
        missing = [k for k in ("round", "checkpoint", "assignment", "settings", "inner") if k not in d]
        if missing:
            raise ValueError(f"train payload.{missing[0]} is missing")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"train payload: unknown key(s) {', '.join(unknown)}")
        r = d["round"]
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError("train payload.round must be a non-negative integer")
        if not isinstance(d["checkpoint"], str) or not _NAME.fullmatch(d["checkpoint"]):
            raise ValueError(f"train payload.checkpoint {d['checkpoint']!r} must be a relative name under "
                             "checkpoints/ (letters, digits, ._-, no '..')")
        slot = d.get("slot", "0")
        if not isinstance(slot, str) or not slot:
            raise ValueError("train payload.slot must be a non-empty string")
        try:
            assignment = _assignment(d["assignment"])
            try:
                settings = SwarmSettings.from_dict(d["settings"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"settings: {e}") from None
            inner = InnerConfig.from_payload(d["inner"], device)
            holders = _holders(d.get("expected_holders") or {})
        except (TypeError, ValueError) as e:
            raise ValueError(f"train payload.{e}") from None
        return cls(r, d["checkpoint"], slot, assignment, settings, inner, holders)


def _assignment(a: Any) -> Assignment:
    """Structure only (layers -> distinct non-negative experts, the same count in each); the worker checks it
    against the model (swarm.modules.check_assignment)."""
    if not isinstance(a, dict) or not a:
        raise ValueError("assignment must map layers to lists of experts")
    out = {}
    for k, v in a.items():
        if not (isinstance(k, int) or (isinstance(k, str) and k.isdigit())):
            raise ValueError(f"assignment: layer {k!r} is not an integer")
        if not isinstance(v, list) or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in v):
            raise ValueError(f"assignment.{k} must be a list of expert indices")
        if len(set(v)) != len(v):
            raise ValueError(f"assignment.{k}: experts {v} repeat")
        out[int(k)] = sorted(v)
    if len({len(v) for v in out.values()}) != 1:
        raise ValueError("assignment must hold the same number of experts in every layer")
    return out


def _holders(h: Any) -> dict[str, int]:
    if not isinstance(h, dict):
        raise ValueError("expected_holders must map modules to counts")
    out = {}
    for m, n in h.items():
        try:
            parse_module(m)
        except ValueError as e:
            raise ValueError(f"expected_holders: {e}") from None
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"expected_holders.{m} must be a positive integer")
        out[m] = n
    return out
