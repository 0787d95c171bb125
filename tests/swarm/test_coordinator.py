"""Coordinator side: assignment, the train validator, and whole rounds through the real store and scheduler
(SQLite), with real workers running the `train` executor against a bootstrap DHT the coordinator runs."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import torch

from coordinator.config import ProjectConfig
from coordinator.scheduler import Scheduler
from coordinator.store import Store
from coordinator.swarm import (
    SwarmDriver,
    TrainValidator,
    init_swarm,
    merge_uploads,
    plan_assignment,
    start_bootstrap_dht,
)
from coordinator.validate import ValidationError
from model.checkpoint import load_checkpoint
from worker.executors import TaskContext
from worker.executors.train import run_train
from worker.swarm import load_outer_state


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


PAYLOAD = {"round": 0, "checkpoint": "r/round_000000", "assignment": {"0": [0, 1]}, "settings": {},
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


def _complete(sched: Scheduler, state_dir: Path, token: str, grant, result) -> None:
    info = sched.lease_for_complete(token, grant.task_id, grant.lease_id)
    credits = sched.check_result(info, result.metrics)
    rel = f"results/{grant.task_id}.{grant.lease_id}.bin"
    (state_dir / "results").mkdir(exist_ok=True)
    tmp = state_dir / "results" / "upload.tmp"
    tmp.write_bytes(result.data)
    sched.complete(info, hashlib.sha256(result.data).hexdigest(), len(result.data), rel, result.metrics, credits,
                   commit_file=lambda: os.replace(tmp, state_dir / rel), metadata_json=json.dumps(result.metadata))


def test_two_rounds_through_the_coordinator(tiny_checkpoint, tmp_path):
    """init-swarm, rounds planned from registered workers, results validated and merged into the full copy,
    round checkpoint with momentum written and served by name to the next round."""
    state = tmp_path / "state"
    cfg = ProjectConfig.model_validate({
        "run": "demo", "state_dir": str(state),
        "swarm": {"inner_steps": 3, "rounds": 2, "batch_size": 2, "micro_batch_size": 2, "seq_len": 32,
                  "matchmaking_time": 3.0, "averaging_timeout": 35.0, "checkpoint_every": 1, "compression": "none"}})
    state.mkdir()
    store = Store.open(cfg.db_url())
    sched = Scheduler(store, cfg)
    name = init_swarm(state, "demo", tiny_checkpoint)
    with pytest.raises(ValueError, match="already a swarm run"):
        init_swarm(state, "demo", tiny_checkpoint)
    dht, peers = start_bootstrap_dht("127.0.0.1")
    caps = {"devices": [{"kind": "cpu", "name": "cpu", "memory_bytes": 0}], "host_memory_bytes": 8 * 2**30}
    workers = []
    for who in ("alice", "bob"):
        store.add_token(who, f"tok_{who}")
        workers.append((who, sched.register(who, who, caps, 0, False, 1.0)))
    driver = SwarmDriver(cfg, store, sched)

    def fetch(what, fname):
        assert what == "checkpoint"
        return state / "checkpoints" / fname

    try:
        for r in range(2):
            driver.step()  # opens round r
            status = json.loads((state / "swarm" / "demo.json").read_text())
            assert status["round"] == r and len(status["tasks"]) == 2
            assert status["frozen"] == [] and all(len(v) == 4 for v in status["assignment"].values())
            grants = [(who, sched.lease(who, wid, ["train"])) for who, wid in workers]
            # weight decay 0.1 per token, applied by the workers divided by the outer amplification:
            # rounds 0 and 1 of 0.7/0.9 Nesterov multiply a steady Δ by 1.33 and 1.897 (mean 1.6135)
            optim = json.loads(grants[0][1].payload_json)["inner"]["optim"]
            assert optim["weight_decay"] == pytest.approx(0.1 / 1.6135)
            results = [None, None]

            def run(i, grant, r, results):
                ctx = TaskContext(grant.task_id, grant.lease_id, "train", json.loads(grant.payload_json), 1,
                                  tmp_path / f"work{i}{r}", bootstrap_peers=peers, fetch=fetch)
                ctx.work_dir.mkdir()
                results[i] = run_train(ctx)

            threads = [threading.Thread(target=run, args=(i, g, r, results)) for i, (_, g) in enumerate(grants)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for (who, grant), res in zip(grants, results, strict=True):
                assert res.metrics["modules_averaged"] == 5, res.metrics
                _complete(sched, state, who, grant, res)
            driver.step()  # closes round r
        status = json.loads((state / "swarm" / "demo.json").read_text())
        assert status["round"] == 2 and status["checkpoint"] == "demo/round_000002"
        ckpt = state / "checkpoints" / "demo" / "round_000002"
        momentum, round_ = load_outer_state(ckpt)
        assert round_ == 2 and float(momentum["tok_embeddings.weight"].abs().sum()) > 0
        from worker.executors.train import _WORKERS

        w = next(iter(_WORKERS.values()))["worker"]
        merged = load_checkpoint(ckpt)
        torch.testing.assert_close(merged.tok_embeddings.weight, w.model.tok_embeddings.weight, rtol=0, atol=1e-6)
        assert not torch.equal(merged.tok_embeddings.weight, load_checkpoint(tiny_checkpoint).tok_embeddings.weight)
        driver.step()  # the run is complete: nothing more
        assert json.loads((state / "swarm" / "demo.json").read_text())["tasks"] == []
        assert name == "demo/round_000000"
        # What the status page and the Prometheus gauges show: every expert of every layer held by both.
        from coordinator.metrics import SwarmCollector
        from coordinator.swarm import expert_holders

        rows = expert_holders(state, "demo", {wid: who for who, wid in workers})
        layers, experts = merged.cfg.num_layers, merged.cfg.moe.num_experts
        assert len(rows) == layers * experts and all(sorted(r["holders"]) == ["alice", "bob"] for r in rows)
        families = {f.name: f for f in SwarmCollector(state, "demo").collect()}
        assert [s.value for s in families["mujina_swarm_round"].samples] == [2]
        assert [s.value for s in families["mujina_swarm_expert_holders"].samples] == [2] * (layers * experts)
        assert expert_holders(state, "other-run") == [] and list(SwarmCollector(state, "other-run").collect()) == []
    finally:
        from worker.executors.train import shutdown_workers

        shutdown_workers()
        dht.shutdown()
        store.close()


def test_merge_ignores_uploads_with_wrong_sizes_or_non_finite_values():
    from safetensors.torch import save

    from tests.swarm.conftest import tiny_model

    full = tiny_model()
    before = full.tok_embeddings.weight.clone()
    bad = save({"trunk.theta": torch.full((3,), float("nan")), "l0e0.theta": torch.full((10,), 1.0)})
    assert merge_uploads(full, {}, [bad]) == set()
    assert torch.equal(full.tok_embeddings.weight, before)


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


def test_a_stop_request_ends_the_round_between_inner_steps_and_the_retry_starts_from_the_checkpoint(
        tiny_checkpoint, tmp_path):
    """A daemon asked to stop (SIGTERM, a cancelled lease) leaves a round after the current inner step, not
    after all H; the half-trained worker is dropped, so the next attempt of the round starts from θ_start."""
    import dataclasses

    from tests.swarm.conftest import settings
    from worker.executors import TaskStopped
    from worker.executors.train import _WORKERS, shutdown_workers

    state = tmp_path / "state"
    name = init_swarm(state, "stop", tiny_checkpoint)
    payload = {"round": 0, "checkpoint": name, "assignment": {"0": [0, 1, 2, 3]}, "slot": "s0",
               "settings": dataclasses.asdict(settings(run="stop", averaging=False)),
               "inner": {"inner_steps": 50, "total_steps": 50, "batch_size": 2, "micro_batch_size": 2, "seq_len": 32}}
    progress: list[float] = []

    def ctx(i, stop_after):
        c = TaskContext(f"t{i}", f"l{i}", "train", payload, 1, tmp_path / f"work{i}",
                        fetch=lambda what, fname: state / "checkpoints" / fname, report_progress=progress.append,
                        stop_requested=lambda: stop_after is not None and len(progress) >= stop_after)
        c.work_dir.mkdir()
        return c

    try:
        with pytest.raises(TaskStopped):
            run_train(ctx(0, stop_after=3))
        assert len(progress) == 3 and "s0" not in _WORKERS  # 3 of 50 inner steps, and the worker is gone
        progress.clear()
        full = run_train(ctx(1, stop_after=None))
        assert full.metrics["tokens"] == 50 * 2 * 32 and progress[-1] == 1.0
        # the same round again from the checkpoint: the same losses (a reused half-trained worker would differ)
        progress.clear()
        _WORKERS.pop("s0")["worker"].shutdown()
        again = run_train(ctx(2, stop_after=None))
        assert again.metrics["loss"] == full.metrics["loss"]
    finally:
        shutdown_workers()


def test_a_worker_gives_back_a_round_it_cannot_hold(tiny_checkpoint, tmp_path):
    """The slot was planned for another worker; this one's budget (--max-gpu-memory) is below the memory
    model's peak for 4 experts per layer, so the task ends in a TaskError naming both figures."""
    import dataclasses

    from tests.swarm.conftest import settings
    from worker.executors import TaskError
    from worker.executors.train import _WORKERS

    state = tmp_path / "state"
    name = init_swarm(state, "small", tiny_checkpoint)
    payload = {"round": 0, "checkpoint": name, "assignment": {"0": [0, 1, 2, 3]}, "slot": "s0",
               "settings": dataclasses.asdict(settings(run="small", averaging=False)),
               "inner": {"inner_steps": 2, "total_steps": 2, "batch_size": 2, "micro_batch_size": 2, "seq_len": 32}}
    ctx = TaskContext("t", "l", "train", payload, 1, tmp_path / "work", max_memory_bytes=64 * 1024,
                      fetch=lambda what, fname: state / "checkpoints" / fname)
    ctx.work_dir.mkdir()
    with pytest.raises(TaskError, match=r"needs about 0\.\d+ GiB .* has 0\.00 GiB"):
        run_train(ctx)
    assert "s0" not in _WORKERS
