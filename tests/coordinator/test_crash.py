"""kill -9 the coordinator while 50 clients lease and complete, restart it: no task lost, none done twice,
no credit counted twice.

Reference: the issue's crash-safety requirement. The store (not the clients' bookkeeping) is the
judge: every task ends done with exactly one stored result whose bytes match its SHA-256, and the
ledger holds exactly one `tasks` credit per task, given to the token that stored the result."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

import grpc
import pytest
from sqlalchemy import func, select

from coordinator import store as S
from coordinator.api.client import CoordinatorClient
from coordinator.config import load_project
from coordinator.scheduler import Scheduler
from tests.coordinator.conftest import TOKEN, free_port, spawn_server, write_project

pytestmark = pytest.mark.slow  # a coordinator subprocess killed under 50 clients' traffic

N_TASKS = 200
N_CLIENTS = 50


def _worker_loop(target: str, stop: threading.Event, accepted: list, errors: list, i: int):
    c = CoordinatorClient(target, TOKEN, timeout=10, retry_for=60)
    try:
        wid = None
        while not stop.is_set():
            try:
                if wid is None:
                    wid = c.register(f"w{i}").worker_id
                r = c.lease(wid, ["eval"])
                if not r.HasField("task"):
                    time.sleep(0.2)
                    continue
                data = f"result of {r.task.task_id}".encode()
                out = c.complete(r.task.task_id, r.task.lease_id, data, {"loss": 1.0, "tokens": 10})
                if out.accepted:
                    accepted.append(r.task.task_id)
            except grpc.RpcError as err:
                # UNAVAILABLE: the coordinator is down (a Lease whose answer was lost expires and is
                # requeued). FAILED_PRECONDITION: an expired lease whose task another client finished.
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION,
                                      grpc.StatusCode.DEADLINE_EXCEEDED):
                    errors.append(f"{err.code()}: {err.details()}")
                time.sleep(0.1)
    finally:
        c.close()


def _done(store) -> int:
    with store.read() as conn:
        return conn.execute(select(func.count()).select_from(S.tasks).where(S.tasks.c.state == "done")).scalar_one()


def test_kill9_mid_traffic_loses_nothing_and_credits_once(tmp_path, db_url):
    project = write_project(tmp_path, leases={"duration_s": 2.0, "heartbeat_interval_s": 0.5,
                                              "sweep_interval_s": 0.2, "max_attempts": 100})
    cfg = load_project(project)
    store = S.Store.open(db_url)
    store.add_token("alice", TOKEN)
    sched = Scheduler(store, cfg)
    task_ids = {sched.add_task("eval", {"checkpoint": "c", "shard": "s", "shard_tokens": 100})
                for _ in range(N_TASKS)}
    port = free_port()
    log = tmp_path / "serve.log"
    proc = spawn_server(project, db_url, port, log)
    stop, accepted, errors = threading.Event(), [], []
    threads = [threading.Thread(target=_worker_loop, args=(f"127.0.0.1:{port}", stop, accepted, errors, i),
                                daemon=True) for i in range(N_CLIENTS)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 120  # bounds a broken run only; nothing asserts on time
        while _done(store) < N_TASKS // 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # mid-traffic: some Complete transactions are in flight
        proc.wait()
        killed_at = _done(store)
        assert killed_at < N_TASKS, "all tasks finished before the kill; the test proved nothing"
        proc = spawn_server(project, db_url, port, log)
        while _done(store) < N_TASKS and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

    assert not errors, errors[:5]
    with store.read() as conn:
        states = dict(conn.execute(select(S.tasks.c.state, func.count()).group_by(S.tasks.c.state)).all())
        results = conn.execute(select(S.results)).all()
        credits = conn.execute(select(S.ledger).where(S.ledger.c.unit == "tasks")).all()
    assert states == {"done": N_TASKS}, states                      # no task lost
    assert sorted(r.task_id for r in results) == sorted(task_ids)  # exactly one result per task
    assert len(credits) == N_TASKS and {c.task_id for c in credits} == task_ids  # credit once per task
    assert sum(c.amount for c in credits) == N_TASKS
    by_task = {r.task_id: r for r in results}
    for c in credits:
        assert c.volunteer == by_task[c.task_id].token
    for r in results:  # the stored bytes are the accepted ones; nothing half-written remains
        data = (cfg.state_dir / r.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r.sha256 and data == f"result of {r.task_id}".encode()
    on_disk = {p.name for p in (cfg.state_dir / "results").glob("*.bin")}
    assert on_disk == {os.path.basename(r.path) for r in results}
    assert set(accepted) == task_ids  # every task's completion was acknowledged to some client
    store.close()
