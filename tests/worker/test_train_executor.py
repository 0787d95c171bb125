"""The worker's train executor (worker/executors/train.py): stopping mid-round, refusing a round that does not fit."""

from __future__ import annotations

import pytest

from coordinator.swarm_driver import init_swarm
from worker.executors import TaskContext
from worker.executors.train import TrainExecutor


def test_a_stop_request_ends_the_round_between_inner_steps_and_the_retry_starts_from_the_checkpoint(
        tiny_checkpoint, tmp_path):
    """A daemon asked to stop (SIGTERM, a cancelled lease) leaves a round after the current inner step, not
    after all H; the half-trained worker is dropped, so the next attempt of the round starts from θ_start."""
    import dataclasses

    from tests.swarm.conftest import settings
    from worker.executors import TaskStopped

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

    run_train = TrainExecutor()
    try:
        with pytest.raises(TaskStopped):
            run_train(ctx(0, stop_after=3))
        assert len(progress) == 3 and "s0" not in run_train.kept  # 3 of 50 inner steps, and the worker is gone
        progress.clear()
        full = run_train(ctx(1, stop_after=None))
        assert full.metrics["tokens"] == 50 * 2 * 32 and progress[-1] == 1.0
        # the same round again from the checkpoint: the same losses (a reused half-trained worker would differ)
        progress.clear()
        run_train.kept.pop("s0").worker.shutdown()
        again = run_train(ctx(2, stop_after=None))
        assert again.metrics["loss"] == full.metrics["loss"]
    finally:
        run_train.close()


def test_a_worker_gives_back_a_round_it_cannot_hold(tiny_checkpoint, tmp_path):
    """The slot was planned for another worker; this one's budget (--max-gpu-memory) is below the memory
    model's peak for 4 experts per layer, so the task ends in a TaskError naming both figures."""
    import dataclasses

    from tests.swarm.conftest import settings
    from worker.executors import TaskError

    state = tmp_path / "state"
    name = init_swarm(state, "small", tiny_checkpoint)
    payload = {"round": 0, "checkpoint": name, "assignment": {"0": [0, 1, 2, 3]}, "slot": "s0",
               "settings": dataclasses.asdict(settings(run="small", averaging=False)),
               "inner": {"inner_steps": 2, "total_steps": 2, "batch_size": 2, "micro_batch_size": 2, "seq_len": 32}}
    ctx = TaskContext("t", "l", "train", payload, 1, tmp_path / "work", max_memory_bytes=64 * 1024,
                      fetch=lambda what, fname: state / "checkpoints" / fname)
    ctx.work_dir.mkdir()
    run_train = TrainExecutor()
    with pytest.raises(TaskError, match=r"needs about 0\.\d+ GiB .* has 0\.00 GiB"):
        run_train(ctx)
    assert "s0" not in run_train.kept


def test_a_payload_that_names_local_files_or_paths_outside_the_cache_is_refused(tmp_path):
    """The payload is the coordinator's word, and the coordinator may be hostile: it cannot make the worker train
    on a local file, pick its device, or fetch a checkpoint by a path that climbs out of checkpoints/. Each is a
    TaskError (the daemon reports INVALID_TASK) before anything is fetched or started."""
    from worker.executors import TaskError

    fetched = []
    base = {"round": 0, "checkpoint": "r/round_000000", "assignment": {"0": [0, 1]}, "slot": "s0",
            "settings": {"run": "r"}, "inner": {"inner_steps": 2, "batch_size": 2, "seq_len": 32}}
    bad = [{**base, "inner": {**base["inner"], "data_source": "tokens", "data_path": "/etc/passwd"}},
           {**base, "inner": {**base["inner"], "device": "cuda:7"}},
           {**base, "checkpoint": "../../home/volunteer"},
           {**base, "inner": {**base["inner"], "data_source": "shards", "lease": None, "shards_at": "../x"}}]
    run_train = TrainExecutor()
    for i, payload in enumerate(bad):
        ctx = TaskContext(f"t{i}", f"l{i}", "train", payload, 1, tmp_path / f"w{i}",
                          fetch=lambda what, name: fetched.append(name))
        with pytest.raises(TaskError, match="train payload"):
            run_train(ctx)
    assert fetched == [] and run_train.kept == {}


def test_the_executor_table_refuses_unknown_kinds_and_keeps_one_train_executor():
    """A coordinator can name any kind: one the table does not know is a TaskError (INVALID_TASK), never an
    import of a module it names. The daemon's train executor is built once, and closed with the daemon."""
    from worker.executors import Executors, TaskError

    executors = Executors()
    for kind in ("nope", "../train", "worker.daemon", "__init__", ""):
        with pytest.raises(TaskError, match="no executor for task kind"):
            executors(kind)
    train = executors("train")
    assert isinstance(train, TrainExecutor) and executors("train") is train
    executors.close()
    assert train.kept == {}


def test_a_ticket_not_signed_by_the_pinned_key_or_not_for_this_task_fails_the_task(tmp_path):
    """Tickets reach the worker from the coordinator, possibly over a plaintext path: one signed by another key,
    one for another slot, round or peer, or an expired one is refused (TaskError) before anything averages;
    the pinned key's own ticket for this task passes."""
    import dataclasses
    import time
    from types import SimpleNamespace

    from swarm.settings import TrainPayload
    from swarm.ticket import RoundTicket, TicketKey
    from tests.swarm.conftest import settings
    from worker.executors import TaskError

    peer = "12D3KooW" + "A" * 44
    payload = TrainPayload.from_dict({
        "round": 3, "checkpoint": "r/round_000003", "assignment": {"0": [0, 1]}, "slot": "s0",
        "settings": dataclasses.asdict(settings(run="r")),
        "inner": {"inner_steps": 2, "total_steps": 10, "batch_size": 2, "micro_batch_size": 2, "seq_len": 32}})
    pinned, other = TicketKey.generate(), TicketKey.generate()
    good = dict(run="r", round=3, slot="s0", peer_id=peer, groups={"trunk": {peer: 128.0}},
                expires=time.time() + 600)

    def tickets_with(key: TicketKey, **change):
        signed = key.sign(RoundTicket(**{**good, **change}))
        ctx = TaskContext("t", "l", "train", {}, 1, tmp_path, settings={"ticket_key": pinned.public_hex},
                          join=lambda peer_id: signed)
        return TrainExecutor._tickets(ctx, payload, SimpleNamespace(peer_id=peer))

    assert tickets_with(pinned)(True).peer_id == peer
    for key, change, why in ((other, {}, "not the coordinator's"), (pinned, {"slot": "s1"}, "slot"),
                             (pinned, {"round": 4}, "round"), (pinned, {"run": "x"}, "run"),
                             (pinned, {"peer_id": "12D3KooW" + "B" * 44}, "peer_id"),
                             (pinned, {"expires": time.time() - 5}, "expired")):
        with pytest.raises(TaskError, match=why):
            tickets_with(key, **change)
    ctx = TaskContext("t", "l", "train", {}, 1, tmp_path, settings={})   # a coordinator that sent no key
    with pytest.raises(TaskError, match="round tickets"):
        TrainExecutor._tickets(ctx, payload, SimpleNamespace(peer_id=peer))
