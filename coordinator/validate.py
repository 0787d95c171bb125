"""Validators: what every kind's validator is, and the `eval` validator. The table of kinds is
coordinator/validators.py.

A validator checks two things: a task's payload when the organizer adds it (`check_payload`), and a
worker's reported result before it is accepted (`check_result`), which returns the ledger credit
for that task. Raising `ValidationError` refuses the result (the worker gets INVALID_ARGUMENT and the
attempt counts as failed). The scheduler writes the credit they return to the ledger; nothing else
credits a volunteer. `generate` and `judge` live in validate_synthetic.py, `train` in validate_train.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class ValidationError(ValueError):
    """A payload or result that breaks its kind's rules; the message says which field and why."""


@dataclass(frozen=True)
class Credit:
    unit: str      # tasks | tokens_evaluated | gpu_seconds | tokens_generated | tokens_trained
    amount: float


class Validator:
    kind: str = ""

    def check_payload(self, payload: dict) -> None:
        """Raise ValidationError if `payload` (the task's JSON object) cannot describe a task of this kind."""

    def bind(self, cfg) -> Validator:
        """The validator one coordinator uses (cfg: its ProjectConfig). Stateless validators return
        themselves; stateful ones (generate, judge) return an instance holding that project's state."""
        return self

    def check_result(self, payload: dict, metrics: dict[str, float], elapsed_s: float,
                     data: bytes = b"") -> list[Credit]:
        """Check a worker's result for the task with `payload`; return the credit it earns.

        `elapsed_s` is the wall time since the lease was granted: an upper bound for reported GPU time.
        `data` is the uploaded result (its size and SHA-256 already checked)."""
        raise NotImplementedError

    def commit(self, task_id: str, payload: dict, data: bytes) -> None:
        """Store what an accepted result adds beyond the results table (e.g. synthetic records). Runs
        inside the transaction that records the result, after `check_result` accepted it."""


def finite_number(metrics: dict[str, float], key: str, *, minimum: float = 0.0, required: bool = True) -> float | None:
    """metrics[key] as a finite float >= minimum (NaN, Inf and negative numbers are refused)."""
    if key not in metrics:
        if required:
            raise ValidationError(f"metrics.{key} is missing")
        return None
    v = metrics[key]
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise ValidationError(f"metrics.{key} must be a finite number, got {v!r}")
    if v < minimum:
        raise ValidationError(f"metrics.{key} must be >= {minimum}, got {v!r}")
    return float(v)


def gpu_seconds_credit(metrics: dict[str, float], elapsed_s: float, devices: int = 1) -> list[Credit]:
    gpu_s = finite_number(metrics, "gpu_seconds", required=False)
    if gpu_s is None:
        return []
    # A worker cannot have computed longer than its lease existed (plus clock slack), per device.
    if gpu_s > (elapsed_s + 5.0) * max(devices, 1):
        raise ValidationError(f"metrics.gpu_seconds ({gpu_s:.1f}) exceeds the lease's age ({elapsed_s:.1f} s)")
    return [Credit("gpu_seconds", gpu_s)]


class EvalValidator(Validator):
    """A worker reports the loss of a checkpoint on a shard.

    payload: {"checkpoint": NAME, "shard": NAME, "shard_tokens": N}; metrics: {"loss": L, "tokens": T
    [, "gpu_seconds": S]}. Accepted when L is finite and >= 0, T is a whole number with 0 < T <= N.
    Credit: 1 task, T tokens_evaluated (and S gpu_seconds)."""

    kind = "eval"

    def check_payload(self, payload: dict) -> None:
        for key in ("checkpoint", "shard"):
            if not isinstance(payload.get(key), str) or not payload[key]:
                raise ValidationError(f"eval payload.{key} must be a non-empty string (a name under {key}s/)")
        n = payload.get("shard_tokens")
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValidationError(f"eval payload.shard_tokens must be a positive integer, got {n!r}")

    def check_result(self, payload: dict, metrics: dict[str, float], elapsed_s: float,
                     data: bytes = b"") -> list[Credit]:
        finite_number(metrics, "loss")
        tokens = finite_number(metrics, "tokens")
        if tokens != int(tokens) or tokens <= 0:
            raise ValidationError(f"metrics.tokens must be a positive whole number, got {tokens!r}")
        if tokens > payload["shard_tokens"]:
            raise ValidationError(f"metrics.tokens ({int(tokens)}) exceeds the shard's {payload['shard_tokens']} "
                                  "tokens")
        return [Credit("tasks", 1), Credit("tokens_evaluated", tokens), *gpu_seconds_credit(metrics, elapsed_s)]

