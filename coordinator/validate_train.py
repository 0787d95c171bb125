"""The `train` validator: a worker reports one swarm round (coordinator/swarm_driver.py merges its upload).

The upload is checked before the result is accepted or credited (swarm/uploads.py): it parses, its key
set is exactly the slot's modules, every tensor has the module's shape and dtype, holds finite values,
and lies within what one honest round can reach from the round's checkpoint.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from swarm.modules import held_modules
from swarm.settings import TrainPayload
from swarm.uploads import ModuleStart, UploadError, check_upload, module_starts

from .validate import Credit, ValidationError, Validator, finite_number


def _payload(payload: dict) -> TrainPayload:
    try:
        return TrainPayload.from_dict(payload)
    except ValueError as e:
        raise ValidationError(str(e)) from None


@lru_cache(maxsize=64)
def _starts(checkpoint: str, modules: tuple[str, ...], mtime_ns: int) -> dict[str, ModuleStart]:
    """module_starts, once per slot of a round checkpoint; `mtime_ns` (of model.safetensors) keys a rewrite."""
    return module_starts(checkpoint, list(modules))


class TrainValidator(Validator):
    """payload: swarm.settings.TrainPayload (as built by coordinator/swarm_plan.py's `round_payloads`).
    metrics: loss (finite, >= 0), tokens (whole, 0 < T <= inner_steps · batch_size · seq_len, and with a shard
    lease T <= the lease's tokens: a worker cannot claim more data than it was given), delta_norm_trunk and
    delta_norm_max (finite, >= 0: a worker whose Δ was refused reports the norms of the modules it kept, and
    modules_refused). data: the upload (swarm/uploads.py's check). Credit: 1 task and T tokens_trained."""

    kind = "train"
    checkpoints: Path | None = None     # STATE_DIR/checkpoints of the bound project; None: uploads unchecked

    def bind(self, cfg) -> Validator:
        bound = TrainValidator()
        bound.checkpoints = Path(cfg.state_dir) / "checkpoints"
        return bound

    def check_payload(self, payload: dict) -> None:
        _payload(payload)

    def check_result(self, payload: dict, metrics: dict[str, float], elapsed_s: float,
                     data: bytes = b"") -> list[Credit]:
        finite_number(metrics, "loss")
        for key in ("delta_norm_trunk", "delta_norm_max"):
            finite_number(metrics, key)
        tokens = finite_number(metrics, "tokens")
        p = _payload(payload)
        inner = p.inner
        bound = inner.tokens_bound
        what = ("the tokens of the leased shard range" if inner.lease is not None
                else "inner_steps · batch_size · seq_len")
        if tokens != int(tokens) or not 0 < tokens <= bound:
            raise ValidationError(f"metrics.tokens ({tokens!r}) must be a whole number in (0, {bound}] ({what})")
        if self.checkpoints is not None:
            self._check_upload(p, data)
        return [Credit("tasks", 1), Credit("tokens_trained", tokens)]

    def _check_upload(self, p: TrainPayload, data: bytes) -> None:
        start = self.checkpoints / p.checkpoint
        weights = start / "model.safetensors"
        if not weights.is_file():
            raise ValidationError(f"the round's checkpoint {p.checkpoint} is gone; the result cannot be checked")
        modules = tuple(held_modules(p.assignment))
        try:
            check_upload(data, p, _starts(str(start.resolve()), modules, weights.stat().st_mtime_ns))
        except UploadError as e:
            raise ValidationError(f"upload refused: {e}") from None
