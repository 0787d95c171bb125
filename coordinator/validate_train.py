"""The `train` validator: a worker reports one swarm round (coordinator/swarm_driver.py merges its upload)."""

from __future__ import annotations

from swarm.settings import TrainPayload

from .validate import Credit, ValidationError, Validator, finite_number


def _payload(payload: dict) -> TrainPayload:
    try:
        return TrainPayload.from_dict(payload)
    except ValueError as e:
        raise ValidationError(str(e)) from None


class TrainValidator(Validator):
    """payload: swarm.settings.TrainPayload (as built by coordinator/swarm_plan.py's `round_payloads`).
    metrics: loss (finite, >= 0), tokens (whole, 0 < T <= inner_steps · batch_size · seq_len, and with a shard
    lease T <= the lease's tokens: a worker cannot claim more data than it was given), delta_norm_trunk and
    delta_norm_max (finite, >= 0: a worker whose Δ was refused reports the norms of the modules it kept, and
    modules_refused). Credit: 1 task and T tokens_trained."""

    kind = "train"

    def check_payload(self, payload: dict) -> None:
        _payload(payload)

    def check_result(self, payload: dict, metrics: dict[str, float], elapsed_s: float,
                     data: bytes = b"") -> list[Credit]:
        finite_number(metrics, "loss")
        for key in ("delta_norm_trunk", "delta_norm_max"):
            finite_number(metrics, key)
        tokens = finite_number(metrics, "tokens")
        inner = _payload(payload).inner
        bound = inner.tokens_bound
        what = ("the tokens of the leased shard range" if inner.lease is not None
                else "inner_steps · batch_size · seq_len")
        if tokens != int(tokens) or not 0 < tokens <= bound:
            raise ValidationError(f"metrics.tokens ({tokens!r}) must be a whole number in (0, {bound}] ({what})")
        return [Credit("tasks", 1), Credit("tokens_trained", tokens)]
