"""Fail(WORKER_FAULT): the worker's own machine cannot run the kind (no teacher, no chat template, a missing
dependency). Reference: issue 19, item 1 — such a failure counts against the worker, not the task: the task
goes back to pending without an attempt, is not kept from the token, and does not count toward the two
distinct tokens a task needs before it can go dead. The row is kept, with its token, for the organizer."""

from __future__ import annotations

from sqlalchemy import select

from coordinator import store as S
from coordinator.api import mujina_pb2 as pb
from tests.coordinator.conftest import OTHER_TOKEN

EVAL = {"loss": 2.5, "tokens": 500}


def task_row(coord, task_id):
    with coord.store.read() as conn:
        return conn.execute(select(S.tasks).where(S.tasks.c.id == task_id)).first()


def failures(coord, task_id):
    with coord.store.read() as conn:
        return [(f.reason, f.token) for f in conn.execute(
            select(S.failures).where(S.failures.c.task_id == task_id).order_by(S.failures.c.id))]


def test_worker_fault_requeues_without_an_attempt_and_keeps_the_task_open_to_its_token(coord):
    (tid,) = coord.add_eval(max_attempts=2)
    c = coord.client()
    w = c.register("no-teacher", speed=1.0).worker_id
    for _ in range(3):  # the same token may lease it again: its machine, not the task, was at fault
        t = c.lease(w, ["eval"]).task
        assert t.task_id == tid and t.attempt == 1
        r = c.fail(tid, t.lease_id, pb.WORKER_FAULT, "teacher 'qwen' not found: --teacher qwen=DIR")
        assert r.requeued and not r.dead
    row = task_row(coord, tid)
    assert row.state == "pending" and row.attempts == 0
    assert row.last_error.startswith("WORKER_FAULT: teacher 'qwen' not found")
    assert failures(coord, tid) == [("WORKER_FAULT", "alice")] * 3   # the organizer sees whose machine it was
    t = c.lease(w, ["eval"]).task   # once fixed, the same volunteer finishes it
    assert c.complete(tid, t.lease_id, b"ok", EVAL).accepted
    assert task_row(coord, tid).state == "done"


def test_worker_faults_do_not_count_toward_the_two_tokens_a_dead_task_needs(coord):
    """max_attempts 2: alice's machine fails the task (WORKER_FAULT), then bob calls it broken twice
    (INVALID_TASK, two counted attempts). Only one token counted a failure, so the task stays pending; a
    WORKER_FAULT counted as a second token would have killed it."""
    (tid,) = coord.add_eval(max_attempts=2)
    alice, bob = coord.client(), coord.client(OTHER_TOKEN)
    wa, wb = alice.register("a", speed=1.0).worker_id, bob.register("b", speed=1.0).worker_id
    t = alice.lease(wa, ["eval"]).task
    alice.fail(tid, t.lease_id, pb.WORKER_FAULT, "no chat template")
    for _ in range(2):
        t = bob.lease(wb, ["eval"]).task
        assert t.task_id == tid
        r = bob.fail(tid, t.lease_id, pb.INVALID_TASK, "shard s missing")
        assert r.requeued and not r.dead
    row = task_row(coord, tid)
    assert row.state == "pending" and row.attempts == 2
    assert failures(coord, tid) == [("WORKER_FAULT", "alice"), ("INVALID_TASK", "bob"), ("INVALID_TASK", "bob")]
    # a counted failure from a second token is what kills it
    t = alice.lease(wa, ["eval"]).task
    assert alice.fail(tid, t.lease_id, pb.INVALID_TASK, "shard s missing").dead
