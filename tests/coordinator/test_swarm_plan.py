"""The swarm section and round planning (coordinator/swarm_plan.py): assignment, payloads, the train
validator, init-swarm."""

from __future__ import annotations

import pytest

from coordinator.swarm_plan import plan_assignment
from coordinator.validate import ValidationError
from coordinator.validate_train import TrainValidator
from data_shards.lease import Corpus, Cursor
from swarm.round_checkpoint import load_outer_state
from tests.data_shards.tiny_shards import BATCH, SEQ_LEN, STEPS, make_shards


def test_every_expert_gets_two_holders_when_memory_allows():
    plan = plan_assignment({"a": 2, "b": 2, "c": 2, "d": 2}, num_experts=4, top_k=2, replication=2)
    assert plan.holders == {0: 2, 1: 2, 2: 2, 3: 2} and plan.frozen == []
    assert all(len(v) == 2 for v in plan.assignment.values())


def test_unheld_experts_are_frozen_and_small_workers_hold_nothing():
    plan = plan_assignment({"a": 2, "tiny": 1}, num_experts=4, top_k=2)
    assert plan.assignment == {"a": [0, 1]} and plan.frozen == [2, 3]


def test_rebalancing_on_join_and_leave_keeps_what_workers_held():
    first = plan_assignment({"a": 3, "b": 3}, num_experts=4, top_k=2)
    assert set(first.holders.values()) >= {1} and not first.frozen
    joined = plan_assignment({"a": 3, "b": 3, "c": 3}, num_experts=4, top_k=2, previous=first.assignment)
    assert min(joined.holders.values()) >= 2  # 9 slots over 4 experts: everyone replicated
    assert len(set(joined.assignment["a"]) & set(first.assignment["a"])) >= 2
    left = plan_assignment({"a": 3, "c": 3}, num_experts=4, top_k=2, previous=joined.assignment)
    assert left.frozen == [] and left.assignment["a"] == joined.assignment["a"]


PAYLOAD = {"round": 0, "checkpoint": "r/round_000000", "assignment": {"0": [0, 1]}, "settings": {"run": "r"},
           "inner": {"inner_steps": 3, "batch_size": 2, "seq_len": 32}}


def test_train_validator_credits_tokens_and_refuses_bad_results():
    v = TrainValidator()
    v.check_payload(PAYLOAD)
    good = {"loss": 2.5, "tokens": 192.0, "delta_norm_trunk": 0.01, "delta_norm_max": 0.02}
    credits = {c.unit: c.amount for c in v.check_result(PAYLOAD, good, 10.0)}
    assert credits == {"tasks": 1, "tokens_trained": 192.0}
    for bad, match in (({**good, "tokens": 193.0}, "tokens"), ({**good, "loss": float("nan")}, "loss"),
                       ({k: x for k, x in good.items() if k != "delta_norm_max"}, "delta_norm_max")):
        with pytest.raises(ValidationError, match=match):
            v.check_result(PAYLOAD, bad, 10.0)
    with pytest.raises(ValidationError, match="inner.batch_size"):
        v.check_payload({**PAYLOAD, "inner": {"inner_steps": 3, "seq_len": 32}})


def test_init_swarm_command_and_the_swarm_section(tiny_checkpoint, tmp_path):
    """The shipped example swarm section (configs/project.yaml, uncommented) loads; init-swarm writes round 0."""
    import re

    import yaml

    from tests.conftest import REPO, run_cli

    text = (REPO / "configs" / "project.yaml").read_text()
    block = re.search(r"^# swarm:\n((?:#   .*\n)+)", text, re.M)
    swarm = yaml.safe_load("swarm:\n" + "".join(line[1:] + "\n" for line in block.group(1).splitlines()))
    project = tmp_path / "project.yaml"
    project.write_text(yaml.safe_dump({"run": "demo", "state_dir": "state", **swarm}))
    out = run_cli("coordinator.cli", "init-swarm", "--config", str(project), "--checkpoint", str(tiny_checkpoint))
    assert "demo/round_000000" in out.stdout
    ckpt = tmp_path / "state" / "checkpoints" / "demo" / "round_000000"
    assert (ckpt / "config.json").exists() and load_outer_state(ckpt)[1] == 0
    project.write_text(yaml.safe_dump({"run": "demo", "state_dir": "state", "swarm": {"inner_step": 3}}))
    bad = run_cli("coordinator.cli", "init-swarm", "--config", str(project), "--checkpoint", str(tiny_checkpoint),
                  check=False)
    assert bad.returncode == 2 and "swarm.inner_step" in bad.stderr


def test_validator_refuses_tokens_beyond_the_lease(tmp_path):
    d = make_shards(tmp_path / "shards")
    lease = Corpus.open(d).plan(Cursor(), 1, STEPS * BATCH, SEQ_LEN)[0][0]
    assert lease.tokens < STEPS * BATCH * SEQ_LEN  # padding: the lease bound is tighter than H·B·T
    payload = {"round": 0, "checkpoint": "r/round_000000", "assignment": {"0": [0, 1]}, "settings": {"run": "r"},
               "inner": {"inner_steps": STEPS, "batch_size": BATCH, "seq_len": SEQ_LEN, "data_source": "shards",
                         "lease": lease.to_dict(), "shards_at": "swarm-r"}}
    v = TrainValidator()
    v.check_payload(payload)
    good = {"loss": 3.0, "tokens": float(lease.tokens), "delta_norm_trunk": 0.1, "delta_norm_max": 0.1}
    assert {c.unit: c.amount for c in v.check_result(payload, good, 1.0)}["tokens_trained"] == lease.tokens
    with pytest.raises(ValidationError, match="leased shard range"):
        v.check_result(payload, {**good, "tokens": float(lease.tokens + 1)}, 1.0)
    with pytest.raises(ValidationError, match="inner.lease"):
        v.check_payload({**payload, "inner": {**payload["inner"], "batch_size": BATCH + 1}})
    with pytest.raises(ValidationError, match="inner.lease"):
        v.check_payload({**payload, "inner": {**payload["inner"], "lease": {"epoch": 0}}})


def test_the_swarm_shards_key_resolves_against_the_project_file_and_is_published(tmp_path):
    import yaml

    from coordinator.config import load_project
    from coordinator.swarm_driver import publish_shards

    make_shards(tmp_path / "data" / "train")
    project = tmp_path / "project.yaml"
    project.write_text(yaml.safe_dump({"run": "r", "state_dir": "state", "swarm": {"shards": "data/train"}}))
    cfg = load_project(project)
    assert cfg.swarm.shards == (tmp_path / "data" / "train").resolve()
    project.write_text(yaml.safe_dump({"run": "r", "state_dir": "state", "swarm": {"shards": "data/nope"}}))
    with pytest.raises(ValueError, match="swarm.shards: .*no manifest.json"):
        load_project(project)
    # outside the state directory: linked into shards/NAME; inside shards/: served where it is
    assert publish_shards(cfg.swarm.shards, cfg.state_dir, "swarm-r") == "swarm-r"
    files = sorted(p.name for p in (cfg.state_dir / "shards" / "swarm-r").iterdir())
    assert files == sorted(p.name for p in cfg.swarm.shards.iterdir())
    assert publish_shards(cfg.state_dir / "shards" / "swarm-r", cfg.state_dir, "other") == "swarm-r"
