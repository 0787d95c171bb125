"""The coordinator's check of a `train` upload (swarm/uploads.py through coordinator/validate_train.py): an
honest round's upload passes; garbage, another slot's modules and values no round can reach are refused
before anything is accepted or credited."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load, save

from coordinator.swarm_driver import init_swarm
from coordinator.validate import ValidationError
from coordinator.validate_train import TrainValidator
from swarm.round import SwarmWorker
from swarm.settings import TrainPayload
from swarm.uploads import MODULE_STARTS, adam_step_ratio, read_starts
from tests.swarm.conftest import inner, settings

GOOD = {"loss": 2.5, "tokens": 192.0, "delta_norm_trunk": 0.01, "delta_norm_max": 0.02}


@pytest.fixture
def honest(tiny_checkpoint, tmp_path):
    """A round checkpoint, a slot's payload and the upload an honest worker made of that slot's round."""
    state = tmp_path / "state"
    name = init_swarm(state, "r", tiny_checkpoint)
    s = settings(run="r", averaging=False)
    payload = TrainPayload(0, name, "w1", {0: [1, 2]}, s, inner(), {"trunk": 1, "l0e1": 1, "l0e2": 1}).to_dict()
    w = SwarmWorker(state / "checkpoints" / name, {0: [1, 2]}, s, inner())
    try:
        w.run_round(0)
        data = w.upload()
    finally:
        w.shutdown()
    validator = TrainValidator().bind(SimpleNamespace(state_dir=state))
    return validator, payload, data


def test_an_honest_upload_is_accepted_and_credited(honest):
    validator, payload, data = honest
    credits = {c.unit: c.amount for c in validator.check_result(payload, GOOD, 10.0, data)}
    assert credits == {"tasks": 1, "tokens_trained": 192.0}


def _edit(data: bytes, **change) -> bytes:
    tensors = load(data)
    for key, value in change.items():
        if value is None:
            tensors.pop(key.replace("__", "."))
        else:
            tensors[key.replace("__", ".")] = value
    return save(tensors)


@pytest.mark.parametrize("make, why", [
    (lambda d: b"", "empty"),
    (lambda d: b"\x00" * 64, "not safetensors"),
    (lambda d: d[: len(d) // 2], "not safetensors"),
    (lambda d: _edit(d, trunk__theta=np.full_like(load(d)["trunk.theta"], 1e30)), "beyond"),
    (lambda d: _edit(d, l0e1__momentum=np.full_like(load(d)["l0e1.momentum"], 1e6)), "beyond"),
    (lambda d: _edit(d, l0e1__theta=np.full_like(load(d)["l0e1.theta"], np.nan)), "NaN"),
    (lambda d: _edit(d, l0e1__theta=load(d)["l0e1.theta"].astype(np.float64)), "float64"),
    (lambda d: _edit(d, l0e1__theta=load(d)["l0e1.theta"][:-1]), "shape|float32"),
    (lambda d: _edit(d, l0e1__theta=None), "missing"),
    (lambda d: _edit(d, l0e3__theta=load(d)["l0e1.theta"], l0e3__momentum=load(d)["l0e1.momentum"]), "unexpected"),
    (lambda d: _edit(d, evil=np.zeros(3, np.float32)), "unexpected"),
])
def test_a_bad_upload_is_refused_before_credit(honest, make, why):
    validator, payload, data = honest
    with pytest.raises(ValidationError, match=f"upload refused: .*({why})"):
        validator.check_result(payload, GOOD, 10.0, make(data))


def test_another_slots_modules_are_refused(honest):
    """An upload of slot w1 (experts 1, 2) offered for a slot holding experts 0, 1."""
    validator, payload, data = honest
    other = {**payload, "slot": "w0", "assignment": {"0": [0, 1]}}
    with pytest.raises(ValidationError, match="not this slot's"):
        validator.check_result(other, GOOD, 10.0, data)


def test_the_reach_bound_holds_honest_rounds_with_room_and_is_recorded_with_each_checkpoint(honest, tmp_path):
    """What an honest round moved is far inside the bound (the margin is the point: no false refusals), and the
    starts the validator reads are the ones the checkpoint's tensors give."""
    from swarm.uploads import module_starts, reach

    validator, payload, data = honest
    p = TrainPayload.from_dict(payload)
    start_dir = validator.checkpoints / p.checkpoint
    assert (start_dir / MODULE_STARTS).is_file()
    starts = read_starts(start_dir)
    assert module_starts(start_dir, ["trunk", "l0e1"]) == {m: starts[m] for m in ("trunk", "l0e1")}
    tensors = load(data)
    for m in ("trunk", "l0e1", "l0e2"):
        theta_bound, momentum_bound = reach(starts[m], p.inner, p.settings)
        moved = float(np.abs(tensors[f"{m}.theta"]).max()) - starts[m].theta_max
        assert moved < 0.2 * (theta_bound - starts[m].theta_max), m
        assert float(np.abs(tensors[f"{m}.momentum"]).max()) < 0.2 * momentum_bound, m
    # AdamW's step bound: 1.17 lr for beta 0.9/0.95, doubled
    assert adam_step_ratio(0.9, 0.95) == pytest.approx(2 * 0.1 / 0.05 ** 0.5 / (1 - 0.81 / 0.95) ** 0.5)
