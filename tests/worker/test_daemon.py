"""The daemon against a real coordinator: lease -> eval -> complete -> credit; back-off while the
coordinator is away; spooled results uploaded later; SIGTERM hands the lease back; config errors.

Reference for the eval loss: the same checkpoint's cross-entropy computed here directly, window by window."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F
from sqlalchemy import select

from coordinator import store as S
from tests.coordinator.conftest import free_port, spawn_server, write_project
from tests.worker.conftest import make_eval_inputs, run_worker, spawn_worker


def direct_loss(net, docs, seq_len):
    total, n = 0.0, 0
    with torch.no_grad():
        for d in docs:
            ids = torch.as_tensor(d, dtype=torch.long)
            for s in range(0, len(ids) - 1, seq_len - 1):
                w = ids[s:s + seq_len][None]
                if w.shape[1] < 2:
                    break
                total += float(F.cross_entropy(net(w)[0, :-1], w[0, 1:], reduction="sum"))
                n += w.shape[1] - 1
    return total / n, n


def results(store):
    with store.read() as conn:
        return {r.task_id: r for r in conn.execute(select(S.results))}


def ledger(store):
    with store.read() as conn:
        return sorted((r.volunteer, r.unit, r.amount) for r in conn.execute(select(S.ledger)))


@pytest.mark.slow  # a spawned worker daemon
def test_eval_task_runs_through_the_daemon_and_is_credited(coord, tmp_path):
    inputs = make_eval_inputs(coord.cfg.state_dir)
    (tid,) = [coord.scheduler.add_task("eval", inputs["payload"])]
    log = run_worker(coord.target, tmp_path / "w1", "--once", "--kinds", "eval")
    res = results(coord.store)[tid]
    loss, n = direct_loss(inputs["net"].eval(), inputs["docs"], 32)
    assert json.loads(res.metrics) == pytest.approx({"loss": loss, "tokens": float(n)}, rel=1e-4)
    assert ledger(coord.store) == [("alice", "tasks", 1.0), ("alice", "tokens_evaluated", float(n))]
    assert "registered as worker" in log and "accepted" in log
    # the cache kept the downloads, content-addressed
    assert len(list((tmp_path / "w1" / "files" / "objects").iterdir())) == 3


@pytest.mark.slow  # a spawned worker daemon
def test_eval_refetches_a_checkpoint_directory_the_coordinator_rewrote(coord, tmp_path):
    """checkpoints/tiny/ (config.json + model.safetensors, fetched file by file) is evaluated, then
    overwritten by another model: the same worker cache must not evaluate its stale copy."""
    from model import Transformer
    from model.checkpoint import save_checkpoint

    inputs = make_eval_inputs(coord.cfg.state_dir)
    first = coord.scheduler.add_task("eval", inputs["payload"])
    run_worker(coord.target, tmp_path / "w", "--once", "--kinds", "eval")
    torch.manual_seed(1)
    other = Transformer(inputs["net"].cfg)
    save_checkpoint(coord.cfg.state_dir / "checkpoints" / "tiny", other)
    second = coord.scheduler.add_task("eval", inputs["payload"])
    log = run_worker(coord.target, tmp_path / "w", "--once", "--kinds", "eval")
    res = results(coord.store)
    for tid, net in ((first, inputs["net"]), (second, other)):
        loss, n = direct_loss(net.eval(), inputs["docs"], 32)
        assert json.loads(res[tid].metrics) == pytest.approx({"loss": loss, "tokens": float(n)}, rel=1e-4)
    assert "checkpoint tiny/model.safetensors changed on the coordinator" in log
    assert "tiny/config.json changed" not in log  # same config: the cached copy is still current
    # shard, config and both weights files, each once
    assert len(list((tmp_path / "w" / "files" / "objects").iterdir())) == 4


@pytest.mark.slow  # a spawned worker daemon
def test_bad_eval_payload_is_handed_back_as_invalid_task(coord, tmp_path):
    tid = coord.scheduler.add_task("eval", {"checkpoint": "nope", "shard": "s", "shard_tokens": 5}, max_attempts=1)
    # a torchrun (DCP) checkpoint directory: config.json beside .distcp files, no model.safetensors
    dcp = coord.cfg.state_dir / "checkpoints" / "dcp"
    dcp.mkdir(parents=True)
    (dcp / "config.json").write_text("{}")
    (dcp / "__0_0.distcp").write_bytes(b"x")
    tid_dcp = coord.scheduler.add_task("eval", {"checkpoint": "dcp", "shard": "s", "shard_tokens": 5},
                                       max_attempts=1)
    log = run_worker(coord.target, tmp_path / "w", "--max-tasks", "2", "--kinds", "eval")
    with coord.store.read() as conn:
        task, task_dcp = (conn.execute(select(S.tasks).where(S.tasks.c.id == t)).first() for t in (tid, tid_dcp))
    assert task.state == "dead" and task.last_error.startswith("INVALID_TASK") and "no checkpoint" in task.last_error
    assert task_dcp.state == "dead" and "no model.safetensors" in task_dcp.last_error
    assert "mujina-model convert --dcp" in task_dcp.last_error
    assert "gave lease" in log


@pytest.mark.slow  # a spawned worker daemon
def test_backoff_while_unreachable_then_spooled_result_uploaded(tmp_path):
    """The worker starts before the coordinator: it backs off, registers once the server is up, runs the
    task; a result spooled by an earlier run is uploaded too."""
    port = free_port()
    project = write_project(tmp_path, leases={"duration_s": 30, "heartbeat_interval_s": 1})
    from coordinator.config import load_project
    from coordinator.scheduler import Scheduler
    from coordinator.store import Store

    cfg = load_project(project)
    db = f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}"
    store = Store.open(db)
    store.add_token("alice", "mj_test_token_alice")
    inputs = make_eval_inputs(cfg.state_dir)
    sched = Scheduler(store, cfg)
    first, second = sched.add_task("eval", inputs["payload"]), sched.add_task("eval", inputs["payload"])
    store.close()
    worker = spawn_worker(f"127.0.0.1:{port}", tmp_path / "w", "--max-tasks", "2", "--kinds", "eval")
    # start the server only once the worker has found it away (on a loaded machine its start-up takes a while)
    end = time.monotonic() + 120
    while "unreachable during Register" not in (tmp_path / "w.log").read_text():
        assert worker.poll() is None and time.monotonic() < end, (tmp_path / "w.log").read_text()
        time.sleep(0.2)
    server = spawn_server(project, db, port, tmp_path / "server.log")
    try:
        assert worker.wait(timeout=120) == 0
        log = (tmp_path / "w.log").read_text()
        assert "retrying with back-off" in log and "registered as worker" in log
        store = Store.open(db)
        done = results(store)
        assert set(done) == {first, second}
        store.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow  # a spawned worker daemon
def test_spooled_results_of_an_earlier_run_are_uploaded(coord, tmp_path):
    from worker.daemon import Spool

    inputs = make_eval_inputs(coord.cfg.state_dir)
    tid = coord.scheduler.add_task("eval", inputs["payload"])
    c = coord.client()
    wid = c.register("earlier run").worker_id
    t = c.lease(wid, ["eval"]).task
    spool = Spool(tmp_path / "w" / "spool")
    spool.put({"task_id": tid, "lease_id": t.lease_id, "kind": "eval", "metrics": {"loss": 6.0, "tokens": 10.0},
               "metadata": {}, "seconds": 1.0}, b"")
    log = run_worker(coord.target, tmp_path / "w", "--max-tasks", "0", "--kinds", "eval")
    assert tid in results(coord.store) and len(spool) == 0, log


def test_config_errors_are_clear(tmp_path):
    from tests.conftest import run_cli

    bad = tmp_path / "worker.toml"
    bad.write_text('coordinator = "127.0.0.1:1"\ntoken = "x"\ncolour = "blue"\n')
    p = run_cli("worker.cli", "run", "--config", str(bad), check=False)
    assert p.returncode == 2 and "unknown keys ['colour']" in p.stderr
    p = run_cli("worker.cli", "run", "--coordinator", "127.0.0.1:1", "--token", "x", "--active-hours", "25-3",
                check=False)
    assert p.returncode == 2 and "HH:MM-HH:MM" in p.stderr
    p = run_cli("worker.cli", "run", "--token", "x", check=False)
    assert p.returncode == 2 and "--coordinator is required" in p.stderr


@pytest.mark.slow  # a spawned worker daemon
def test_unknown_token_exits_with_a_clear_message(coord, tmp_path):
    from tests.conftest import run_cli

    p = run_cli("worker.cli", "run", "--coordinator", coord.target, "--token", "mj_wrong", "--cache-dir",
                str(tmp_path / "w"), "--no-benchmark", check=False)
    assert p.returncode == 2 and "UNAUTHENTICATED" in p.stderr


def test_active_hours_and_backoff_units():
    import datetime as dt

    from worker.daemon import Backoff, parse_active_hours, seconds_until_active

    h = parse_active_hours("22:00-07:00")
    assert h == (1320, 420)
    assert seconds_until_active(h, dt.datetime(2026, 1, 1, 23, 0)) == 0
    assert seconds_until_active(h, dt.datetime(2026, 1, 1, 6, 59)) == 0
    assert seconds_until_active(h, dt.datetime(2026, 1, 1, 12, 0)) == 10 * 3600
    assert seconds_until_active(parse_active_hours("09:00-17:00"), dt.datetime(2026, 1, 1, 18, 0)) == 15 * 3600
    b = Backoff(base=1.0, cap=8.0)
    delays = [b.next() for _ in range(6)]
    assert all(0.5 * min(8, 2 ** i) <= d < min(8, 2 ** i) for i, d in enumerate(delays))
