"""The table of validators: task kind -> its validator. The one place a kind is made known to the coordinator.

    validator_for("eval").check_result(payload, metrics, elapsed_s)
"""

from __future__ import annotations

from .validate import EvalValidator, ValidationError, Validator
from .validate_synthetic import GenerateValidator, JudgeValidator
from .validate_train import TrainValidator

VALIDATORS: dict[str, Validator] = {v.kind: v for v in (EvalValidator(), GenerateValidator(), JudgeValidator(),
                                                       TrainValidator())}


def validator_for(kind: str) -> Validator:
    try:
        return VALIDATORS[kind]
    except KeyError:
        raise ValidationError(f"unknown task kind {kind!r}; known kinds: {', '.join(sorted(VALIDATORS))}") from None
