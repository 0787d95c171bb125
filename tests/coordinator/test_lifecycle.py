"""Task lifecycle, matching, leases and the ledger against a real server on SQLite and PostgreSQL.

Reference: the issue's lifecycle (pending -> leased -> done | pending | dead) and SQS/BOINC
semantics: a lease not renewed expires and requeues; completion is idempotent per (task, lease);
the first accepted result wins and is credited once."""

from __future__ import annotations

import grpc
import pytest
from sqlalchemy import select

from coordinator import store as S
from coordinator.api import mujina_pb2 as pb
from tests.conftest import wait_until
from tests.coordinator.conftest import OTHER_TOKEN, TOKEN

EVAL = {"loss": 2.5, "tokens": 500}


def ledger_rows(coord):
    with coord.store.read() as conn:
        return sorted((r.task_id, r.volunteer, r.unit, r.amount) for r in conn.execute(select(S.ledger)))


def task_state(coord, task_id):
    with coord.store.read() as conn:
        return conn.execute(select(S.tasks).where(S.tasks.c.id == task_id)).first()


def test_lease_heartbeat_complete_credits_once(coord):
    (tid,) = coord.add_eval()
    c = coord.client()
    reg = c.register("host", speed=100.0)
    assert reg.lease_duration_s == 1.5 and reg.settings["run"] == "test"
    got = c.lease(reg.worker_id, ["eval"])
    assert got.task.task_id == tid and got.task.attempt == 1
    hb = c.heartbeat(reg.worker_id, [(got.task.lease_id, 0.5)])
    assert hb.directive == pb.CONTINUE and hb.leases[0].directive == pb.CONTINUE
    assert hb.leases[0].deadline >= got.task.deadline
    first = c.complete(tid, got.task.lease_id, b"result bytes", EVAL)
    assert first.accepted and first.credited and not first.duplicate
    again = c.complete(tid, got.task.lease_id, b"result bytes", EVAL)  # a retry after a lost answer
    assert again.accepted and again.duplicate
    assert task_state(coord, tid).state == "done"
    assert ledger_rows(coord) == [(tid, "alice", "tasks", 1.0), (tid, "alice", "tokens_evaluated", 500.0)]
    stored = coord.cfg.state_dir / f"results/{tid}.{got.task.lease_id}.bin"
    assert stored.read_bytes() == b"result bytes"
    # the finished lease is no longer renewed
    assert c.heartbeat(reg.worker_id, [(got.task.lease_id, 1.0)]).leases[0].directive == pb.CANCEL
    assert c.lease(reg.worker_id, ["eval"]).no_work.reason.startswith("no pending tasks")


def test_matching_respects_requirements_and_priorities_and_says_why(coord):
    big = coord.add_eval(min_gpu_memory=40 << 30)[0]
    cuda = coord.add_eval(needs_cuda=True)[0]
    fast = coord.add_eval(min_speed=1000.0)[0]
    low = coord.add_eval(priority=0)[0]
    high = coord.add_eval(priority=5)[0]
    c = coord.client()
    cpu = c.register("cpu", speed=10.0, devices=[("cpu", "x86", 64 << 30)]).worker_id
    assert c.lease(cpu, ["eval"]).task.task_id == high
    assert c.lease(cpu, ["eval"]).task.task_id == low
    nothing = c.lease(cpu, ["eval"])
    assert nothing.HasField("no_work") and nothing.no_work.retry_after_s == 1.0
    why = nothing.no_work.reason
    assert "3 pending eval tasks" in why and "more GPU memory" in why and "CUDA" in why and "speed" in why
    assert "no pending tasks of kind generate" in c.lease(cpu, ["generate"]).no_work.reason
    gpu = c.register("gpu", speed=5000.0, devices=[("cuda", "H100", 80 << 30)]).worker_id
    assert {c.lease(gpu, ["eval"]).task.task_id for _ in range(3)} == {big, cuda, fast}
    small = c.register("small-gpu", speed=5000.0, devices=[("cuda", "T4", 16 << 30)]).worker_id
    assert c.lease(small, ["eval"]).HasField("no_work")


def test_expired_lease_requeues_and_late_result_wins_over_newer_lease(coord):
    (tid,) = coord.add_eval()
    a, b = coord.client(), coord.client(OTHER_TOKEN)
    wa = a.register("slow", speed=1.0).worker_id
    wb = b.register("fast", speed=1.0).worker_id
    la = a.lease(wa, ["eval"]).task
    wait_until(lambda: task_state(coord, tid).state == "pending", "the sweeper to requeue the unrenewed lease")
    assert task_state(coord, tid).attempts == 1
    assert a.heartbeat(wa, [(la.lease_id, 0.9)]).leases[0].directive == pb.CANCEL  # expired: stop
    lb = b.lease(wb, ["eval"]).task
    assert lb.task_id == tid and lb.attempt == 2
    # alice's late result arrives while the task is not done: accepted, alice credited ...
    late = a.complete(tid, la.lease_id, b"late", EVAL)
    assert late.accepted and late.credited
    # ... and bob's newer lease is cancelled at its next heartbeat; his result is refused, no credit
    assert b.heartbeat(wb, [(lb.lease_id, 0.5)]).leases[0].directive == pb.CANCEL
    with pytest.raises(grpc.RpcError) as err:
        b.complete(tid, lb.lease_id, b"second", EVAL)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already completed" in err.value.details()
    assert {v for _, v, _, _ in ledger_rows(coord)} == {"alice"}
    assert len(ledger_rows(coord)) == 2


def test_fail_shutdown_requeues_without_attempt_and_errors_go_dead_with_reasons(coord):
    """SHUTDOWN gives a task back without an attempt (the same worker may take it again); a counted failure
    keeps the task from the failing token, and the task goes dead after max_attempts failures by two tokens."""
    (tid,) = coord.add_eval(max_attempts=2)
    c, other = coord.client(), coord.client(OTHER_TOKEN)
    w = c.register("w", speed=1.0).worker_id
    wb = other.register("wb", speed=1.0).worker_id
    t = c.lease(w, ["eval"]).task
    r = c.fail(tid, t.lease_id, pb.SHUTDOWN, "SIGTERM")
    assert r.requeued and not r.dead and task_state(coord, tid).attempts == 0
    with pytest.raises(grpc.RpcError) as err:  # a lease given back cannot be failed again
        c.fail(tid, t.lease_id, pb.ERROR, "again")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    t = c.lease(w, ["eval"]).task
    assert c.fail(tid, t.lease_id, pb.OUT_OF_MEMORY, "CUDA OOM at batch 3").requeued
    nothing = c.lease(w, ["eval"])   # alice failed it: it waits for another volunteer
    assert nothing.HasField("no_work") and "this token failed them" in nothing.no_work.reason
    t = other.lease(wb, ["eval"]).task
    assert t.task_id == tid and t.attempt == 2
    r = other.fail(tid, t.lease_id, pb.ERROR, "ValueError: boom")
    assert r.dead and not r.requeued
    row = task_state(coord, tid)
    assert row.state == "dead" and row.last_error == "ERROR: ValueError: boom"
    with coord.store.read() as conn:
        reasons = [(f.reason, f.token) for f in conn.execute(select(S.failures).where(S.failures.c.task_id == tid)
                                                             .order_by(S.failures.c.id))]
    assert reasons == [("SHUTDOWN", ""), ("OUT_OF_MEMORY", "alice"), ("ERROR", "bob")]
    assert c.lease(w, ["eval"]).HasField("no_work")
    coord.scheduler.retry_task(tid)  # the organizer's retry opens it to every token again
    assert c.lease(w, ["eval"]).task.task_id == tid


def test_one_token_failing_everything_kills_nothing(coord):
    """A misconfigured or hostile volunteer leases and fails in a loop: each task it failed is kept from it
    (it gets no_work saying why) and stays pending, however many times it fails; another token then finishes
    them all. A single token's failures never make a task dead (max_attempts 3)."""
    tids = coord.add_eval(5)
    bad, good = coord.client(), coord.client(OTHER_TOKEN)
    wb = bad.register("storm", speed=1.0).worker_id
    for _ in range(20):
        got = bad.lease(wb, ["eval"])
        if got.HasField("no_work"):
            break
        bad.fail(got.task.task_id, got.task.lease_id, pb.ERROR, "no chat template")
    assert got.HasField("no_work") and "5 need another volunteer" in got.no_work.reason
    assert all(task_state(coord, t).state == "pending" for t in tids)
    wg = good.register("fine", speed=1.0).worker_id
    for _ in tids:
        t = good.lease(wg, ["eval"]).task
        assert good.complete(t.task_id, t.lease_id, b"ok", EVAL).accepted
    assert all(task_state(coord, t).state == "done" for t in tids)


def test_per_token_lease_limit(tmp_path, db_url):
    from tests.coordinator.conftest import Coord

    coord = Coord(tmp_path, db_url, limits={"max_leases_per_token": 2})
    try:
        coord.add_eval(4)
        c = coord.client()
        w1, w2 = c.register("a").worker_id, c.register("b").worker_id
        assert c.lease(w1, ["eval"]).HasField("task") and c.lease(w2, ["eval"]).HasField("task")
        assert "already holds 2 leases, its limit is 2" in c.lease(w1, ["eval"]).no_work.reason
        other = coord.client(OTHER_TOKEN)  # the limit is per token
        assert other.lease(other.register("c").worker_id, ["eval"]).HasField("task")
    finally:
        coord.close()


def test_workers_and_leases_belong_to_their_token(coord):
    (tid,) = coord.add_eval()
    alice, bob = coord.client(TOKEN), coord.client(OTHER_TOKEN)
    w = alice.register("a").worker_id
    t = alice.lease(w, ["eval"]).task
    for call in (lambda: bob.lease(w, ["eval"]), lambda: bob.heartbeat(w),
                 lambda: bob.complete(tid, t.lease_id, b"x", EVAL), lambda: bob.fail(tid, t.lease_id)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.slow  # waits out the server's 5 s token cache
def test_revoked_token_is_refused(coord):
    c = coord.client()
    c.register("before")
    coord.store.revoke_token("alice")
    # The server caches a token's verdict for TOKEN_CACHE_S (5 s), so revocation lands within that.
    wait_until(lambda: _refused(c), "revocation to reach the server's token cache", limit=10)


def _refused(c) -> bool:
    try:
        c.register("after")
        return False
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        return True


def test_drain_tells_workers_and_stops_leasing(coord):
    coord.add_eval()
    c = coord.client()
    w = c.register("w").worker_id
    coord.server.drain()  # what SIGTERM does before stopping
    assert c.heartbeat(w).directive == pb.DRAIN
    assert "shutting down" in c.lease(w, ["eval"]).no_work.reason


def test_store_refuses_a_newer_schema(db_url):
    # Reference: the schema_version row written by Store.migrate.
    store = S.Store.open(db_url)
    with store.tx() as conn:
        conn.execute(S.schema_version.update().values(version=S.SCHEMA_VERSION + 1))
    with pytest.raises(RuntimeError, match="newer than this coordinator's"):
        S.Store.open(db_url)
    with store.tx() as conn:
        conn.execute(S.schema_version.update().values(version=S.SCHEMA_VERSION))
    S.Store.open(db_url).close()  # current version: opens without migrating
    store.close()


def test_a_version_1_store_is_migrated_to_failures_by_token(db_url):
    """A store made before failures carried their token (schema 1) is migrated when opened: the column and
    its index are added, old failures count as nobody's, and new ones keep the task from their token."""
    from sqlalchemy import inspect, text

    store = S.Store.open(db_url)
    with store.tx() as conn:   # back to schema 1's failures table
        conn.execute(text("DROP INDEX ix_failures_token_task"))
        conn.execute(text("ALTER TABLE failures DROP COLUMN token"))
        conn.execute(text("INSERT INTO failures (task_id, lease_id, reason, message, at) "
                          "VALUES ('old', 'l', 'ERROR', 'before the migration', 0)"))
        conn.execute(S.schema_version.update().values(version=1))
    store.close()
    store = S.Store.open(db_url)
    with store.read() as conn:
        assert conn.execute(select(S.schema_version.c.version)).scalar_one() == S.SCHEMA_VERSION
        assert "token" in {c["name"] for c in inspect(conn).get_columns("failures")}
        assert conn.execute(select(S.failures.c.token).where(S.failures.c.task_id == "old")).scalar_one() == ""
    store.close()


def test_concurrent_uploads_for_one_lease_store_one_result_and_credit_once(coord):
    # A worker that retries Complete while its first upload is still streaming (a timeout on its side).
    import threading

    (tid,) = coord.add_eval()
    c = coord.client()
    t = c.lease(c.register("w").worker_id, ["eval"]).task
    data = b"z" * (3 << 18)  # 768 KiB: several chunks, so the two streams interleave
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(c.complete(tid, t.lease_id, data, EVAL)))
               for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(answers) == 4 and all(a.accepted for a in answers)
    assert sum(not a.duplicate for a in answers) == 1
    assert len(ledger_rows(coord)) == 2
    assert [p.name for p in (coord.cfg.state_dir / "results").glob("*.bin")] == [f"{tid}.{t.lease_id}.bin"]
    assert not list((coord.cfg.state_dir / "results" / ".tmp").iterdir())


def test_a_lease_is_not_renewed_past_its_lifetime(tmp_path, db_url):
    """leases.max_lifetime_s: however often its worker heartbeats, a lease older than that is told CANCEL and
    expires; its task is requeued with the attempt counted, and another worker can lease it."""
    from tests.coordinator.conftest import Coord

    coord = Coord(tmp_path, db_url, leases={"max_lifetime_s": 2.0})
    try:
        (tid,) = coord.add_eval()
        c = coord.client()
        w = c.register("keeper", speed=1.0).worker_id
        t = c.lease(w, ["eval"]).task
        assert c.heartbeat(w, [(t.lease_id, 0.1)]).leases[0].directive == pb.CONTINUE
        wait_until(lambda: c.heartbeat(w, [(t.lease_id, 0.2)]).leases[0].directive == pb.CANCEL,
                   "the lease's lifetime to pass while its worker keeps heartbeating", every=0.3)
        wait_until(lambda: task_state(coord, tid).state == "pending", "the sweeper to requeue it")
        assert task_state(coord, tid).attempts == 1
        other = coord.client(OTHER_TOKEN)
        assert other.lease(other.register("next", speed=1.0).worker_id, ["eval"]).task.task_id == tid
    finally:
        coord.close()
