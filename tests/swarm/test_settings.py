"""The typed contract of a round (swarm/settings.py): one set of swarm defaults, and a `train` payload that
parses back to itself and refuses what a payload must not decide."""

from __future__ import annotations

import dataclasses

import pytest

from coordinator.swarm_plan import Plan, SwarmSection, round_payloads
from swarm.modules import parse_module
from swarm.settings import InnerConfig, SwarmSettings, TrainPayload


def payload(**over) -> dict:
    p = TrainPayload(round=3, checkpoint="demo/round_000003", slot="w1", assignment={0: [1, 2], 1: [1, 2]},
                     settings=SwarmSettings(run="demo"), inner=InnerConfig(inner_steps=4, batch_size=2, seq_len=16),
                     expected_holders={"trunk": 2, "l0e1": 2, "l0e2": 1, "l1e1": 2, "l1e2": 1}).to_dict()
    return {**p, **over}


def test_a_payload_parses_back_to_itself():
    d = payload()
    p = TrainPayload.from_dict(d, device="cpu")
    assert p.to_dict() == d and p.assignment == {0: [1, 2], 1: [1, 2]} and p.inner.device == "cpu"
    assert TrainPayload.from_dict(d, device="cuda:1").inner.device == "cuda:1"  # the worker's own choice


def test_the_coordinator_and_the_workers_share_one_set_of_swarm_defaults():
    section, settings = SwarmSection(), SwarmSettings(run="r")
    for f in dataclasses.fields(SwarmSettings):
        if f.name in SwarmSection.model_fields:
            assert getattr(section, f.name) == getattr(settings, f.name), f.name
    assert section.settings("r") == settings
    # CenteredClip's settings are the project's to choose; the old protocol's timeouts and outlier rule are gone
    assert (section.clip_factor, section.clip_iters) == (settings.clip_factor, settings.clip_iters) == (1.0, 3)
    assert not {"matchmaking_time", "outlier_factor", "request_timeout", "target_group_size"} \
        & set(SwarmSection.model_fields)


def test_round_payloads_are_train_payloads():
    s = SwarmSection(inner_steps=3, rounds=2, batch_size=2, micro_batch_size=2, seq_len=32)
    out = round_payloads(s, "r", 1, "r/round_000001", Plan({"b": [2, 3], "a": [0, 1]}, {}, []), num_layers=2)
    parsed = [TrainPayload.from_dict(p) for p in out]
    assert [p.slot for p in parsed] == ["a", "b"] and [p.inner.data_offset for p in parsed] == [0, 2]
    assert parsed[1].assignment == {0: [2, 3], 1: [2, 3]}
    assert parsed[0].expected_holders == {"trunk": 2, "l0e0": 1, "l0e1": 1, "l1e0": 1, "l1e1": 1, "l0e2": 1,
                                          "l0e3": 1, "l1e2": 1, "l1e3": 1}


@pytest.mark.parametrize("change, match", [
    (lambda d: d.pop("inner"), r"payload\.inner is missing"),
    (lambda d: d.update(extra=1), "unknown key"),
    (lambda d: d.update(round=-1), "round must be"),
    (lambda d: d.update(round=True), "round must be"),
    (lambda d: d.update(checkpoint="../../etc"), "checkpoint"),
    (lambda d: d.update(checkpoint="/abs/path"), "checkpoint"),
    (lambda d: d.update(checkpoint="a/../../b"), "checkpoint"),
    (lambda d: d["inner"].update(device="cuda:0"), "inner.device is the worker's own choice"),
    (lambda d: d["inner"].update(data_path="/etc/passwd"), "inner.data_path is the worker's own choice"),
    (lambda d: d["inner"].update(data_source="tokens"), "local file"),
    (lambda d: d["inner"].update(data_source="shards"), "needs inner.lease and inner.shards_at"),
    (lambda d: d["inner"].update(shards_at="../x"), "shards_at"),
    (lambda d: d["inner"].update(batch_size="2"), "inner.batch_size must be an int"),
    (lambda d: d["inner"].pop("seq_len"), "inner.seq_len is missing"),
    (lambda d: d["inner"]["optim"].update(lr=-1.0), "lr"),
    (lambda d: d["inner"]["optim"].update(momentum=0.9), "unknown key"),
    (lambda d: d["settings"].pop("run"), "settings.run is missing"),
    (lambda d: d["settings"].update(compression="zip"), "compression"),
    (lambda d: d["settings"].update(clip_iters=0), "clip_iters"),
    (lambda d: d["settings"].update(clip_iters=2.5), "settings.clip_iters must be an int"),
    (lambda d: d["settings"].update(clip_factor=-1.0), "clip_factor"),
    (lambda d: d["settings"].update(matchmaking_time=5.0), "unknown key.*matchmaking_time"),  # the old protocol's
    (lambda d: d.update(assignment={"0": [1, 1]}), "repeat"),
    (lambda d: d.update(assignment={"x": [1]}), "not an integer"),
    (lambda d: d.update(assignment={"0": [1, 2], "1": [1]}), "same number"),
    (lambda d: d.update(expected_holders={"../x": 1}), "not a swarm module"),
    (lambda d: d.update(expected_holders={"trunk": 0}), "positive integer"),
])
def test_a_malformed_payload_names_the_field(change, match):
    d = payload()
    change(d)
    with pytest.raises(ValueError, match=match):
        TrainPayload.from_dict(d)


def test_module_names_have_one_parser():
    assert parse_module("trunk") is None and parse_module("l12e7") == (12, 7)
    for bad in ("l1", "l1e", "e1", "l-1e2", "l1e2x", "trunk2", "", None):
        with pytest.raises(ValueError, match="not a swarm module"):
            parse_module(bad)
