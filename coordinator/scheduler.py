"""Task lifecycle and matching: pending -> leased -> done, or back to pending, or dead.

    pending --Lease--> leased --Complete (validated)--> done
                         |--Fail(SHUTDOWN, WORKER_FAULT)--> pending (attempt not counted)
                         |--Fail(other) / expiry------> pending, or dead after max_attempts

Every transition is one store transaction, so a crash leaves each task in exactly one state. A lease
has a deadline that heartbeats move; `sweep_expired` requeues what was not renewed. Completion is
idempotent per (task, lease) and the first accepted result wins: the results table's primary key is
the task id and the ledger's unique constraint is (task, unit), so no code path can record a task
twice. Errors are `RequestError`s (coordinator/errors.py) carrying a gRPC status name; the server turns them
into statuses.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from sqlalchemy import and_, func, insert, select, update

from . import store as S
from .config import ProjectConfig
from .errors import RequestError
from .metrics import NullMetrics, loss_phase
from .validate import Credit, ValidationError, Validator
from .validators import validator_for

log = logging.getLogger(__name__)


# The hot path's statements, as plain SQL run on a DBAPI cursor (Store.hot; :name parameters,
# Store.sql converts them for psycopg): SQLAlchemy's per-statement Python cost is several times what
# SQLite spends running them. A cycle (lease, heartbeat, complete) is 9 statements and 3 commits.
_RENEW = ("UPDATE leases SET deadline = :dl, progress = :p WHERE id = :lid AND worker_id = :wid "
          "AND state = 'active' AND granted >= :oldest")
_HELD_AND_LIMIT = ("SELECT (SELECT count(*) FROM leases WHERE token = :tok AND state = 'active'), "
                   "(SELECT max_leases FROM tokens WHERE name = :tok)")
# Pick and take in one statement; ix_tasks_pick serves the order. On PostgreSQL concurrent pickers
# skip each other's rows ({lock}); the outer `state = 'pending'` makes the take safe against writers
# in other processes either way.
_PICK_TAKE = ("UPDATE tasks SET state = 'leased', lease_id = :lid, updated = :now WHERE state = 'pending' AND id = "
              "(SELECT id FROM tasks WHERE state = 'pending' AND kind IN ({kinds}) AND min_gpu_memory <= :gpu "
              "AND min_speed <= :speed{cuda} AND NOT EXISTS (SELECT 1 FROM failures f WHERE f.token = :tok "
              "AND f.task_id = tasks.id AND f.reason IN ('ERROR', 'OUT_OF_MEMORY', 'INVALID_RESULT')) "
              "ORDER BY priority DESC, created, id LIMIT 1{lock}) "
              "RETURNING id, kind, payload, attempts")
_NEW_LEASE = ("INSERT INTO leases (id, task_id, worker_id, token, state, granted, deadline, progress) "
              "VALUES (:id, :tid, :wid, :tok, 'active', :now, :dl, 0.0)")
# Everything Complete checks, in one read: the lease, its task, and the task's result if any.
_LEASE_TASK_RESULT = ("SELECT l.token, l.task_id, l.state, l.granted, l.worker_id, t.kind, t.run, t.payload, "
                      "t.lease_id, r.lease_id, r.credited FROM leases l JOIN tasks t ON t.id = l.task_id "
                      "LEFT JOIN results r ON r.task_id = l.task_id WHERE l.id = :lid")
_NEW_RESULT = ("INSERT INTO results (task_id, lease_id, worker_id, token, sha256, size, path, metrics, metadata, "
               "credited, at) VALUES (:tid, :lid, :wid, :tok, :sha, :size, :path, :metrics, :meta, :credited, :now)")
_LEASE_DONE = "UPDATE leases SET state = 'completed' WHERE id = :lid"
_CANCEL_NEWER = "UPDATE leases SET state = 'cancelled' WHERE id = :lid AND state = 'active'"
_TASK_DONE = "UPDATE tasks SET state = 'done', lease_id = NULL, updated = :now WHERE id = :tid"
_SEEN = "UPDATE workers SET last_seen = :seen WHERE id = :wid"
_CREDIT = ("INSERT INTO ledger (task_id, volunteer, kind, unit, amount, at) "
           "VALUES (:tid, :vol, :kind, :unit, :amount, :now)")


BLAMED = ("ERROR", "OUT_OF_MEMORY", "INVALID_RESULT")   # failures that keep the task from their token (_PICK_TAKE)
# Fail reasons that count no attempt: the worker is stopping, or its own machine cannot run the kind. A
# WORKER_FAULT row keeps its token (the organizer sees whose machine it was, the rate limit counts it) but,
# like SHUTDOWN, neither keeps the task from that token nor counts toward the two tokens a task needs to die.
UNCOUNTED = ("SHUTDOWN", "WORKER_FAULT")
RETRIED = "-"   # failures.token of a failure from before the organizer's `tasks retry`: it no longer counts


def _record_failure(conn, task_id: str, lease_id: str, reason: str, message: str, now: float, token: str) -> None:
    """One row of `failures`; `token` is the failing lease's ('' when the failure is nobody's fault)."""
    conn.execute(insert(S.failures).values(task_id=task_id, lease_id=lease_id, reason=reason, message=message[:2000],
                                           at=now, token=token))


def new_id() -> str:
    """128 random bits as 32 hex digits (uuid4().hex's form, without its version bits and a third of its cost)."""
    return os.urandom(16).hex()


class WorkerRow(NamedTuple):
    """What the hot path needs of a worker (rows never change after Register, so they are cached)."""
    token: str
    gpu_memory: int
    cuda: bool
    speed: float


@dataclass
class Grant:
    task_id: str
    lease_id: str
    kind: str
    payload_json: str
    deadline: float
    attempt: int


@dataclass
class NoWork:
    reason: str
    retry_after_s: float | None = None  # None: the project's limits.no_work_retry_s


@dataclass
class CompleteOutcome:
    accepted: bool
    credited: bool
    duplicate: bool
    message: str
    credits: list[Credit] = field(default_factory=list)


@dataclass(frozen=True)
class LeaseInfo:
    """What Complete needs to know about a lease before reading the upload."""
    lease_id: str
    task_id: str
    kind: str
    run: str
    payload: dict
    granted: float
    worker_id: str
    duplicate: CompleteOutcome | None  # set when this (task, lease) was already completed


class Scheduler:
    def __init__(self, store: S.Store, cfg: ProjectConfig, metrics: NullMetrics | None = None):
        self.store, self.cfg = store, cfg
        self.metrics = metrics or NullMetrics()
        self.draining = False  # set on SIGTERM: heartbeats answer DRAIN, Lease gives nothing
        self._validators: dict[str, Validator] = {}
        # Workers never change after Register, so their rows are cached; `last_seen` is gathered in
        # memory and written in one statement per sweep (flush_seen): an idle worker's heartbeat
        # (2,000 workers every 10 s is 200 a second) then costs no write transaction.
        self._workers: dict[str, WorkerRow] = {}
        self._seen: dict[str, float] = {}
        self._pick_sql: dict[tuple[int, bool], str] = {}  # (number of kinds, worker has CUDA) -> statement
        # token -> {worker id: last call}: the token's live workers (limits.max_workers_per_token)
        self._live: dict[str, dict[str, float]] = {}
        # token -> times of its last limits.max_failures_per_token failures (Fail other than SHUTDOWN, refused
        # results): in memory, so the hot path pays a dict lookup; a restart forgets them (a fresh budget)
        self._failed: dict[str, deque] = {}
        self._register_lock = threading.Lock()

    # workers

    def register(self, token: str, name: str, capabilities: dict, gpu_memory: int, cuda: bool, speed: float) -> str:
        """A new worker of `token`; RequestError RESOURCE_EXHAUSTED when the token has
        limits.max_workers_per_token live workers (heard from within leases.duration_s) already."""
        worker_id, now = new_id(), time.time()
        # Checked before any transaction, so a refused Register storm costs no write; the lock makes check and
        # reservation one step for the store's threads (PostgreSQL).
        with self._register_lock:
            live = self.room_for_worker(token, now)
            live[worker_id] = now
        try:
            with self.store.tx() as conn:
                conn.execute(insert(S.workers).values(id=worker_id, token=token, name=name[:256],
                                                      capabilities=json.dumps(capabilities), gpu_memory=gpu_memory,
                                                      cuda=cuda, speed=speed, registered=now, last_seen=now))
        except BaseException:
            live.pop(worker_id, None)
            raise
        self._workers[worker_id] = WorkerRow(token, gpu_memory, bool(cuda), speed)
        return worker_id

    def room_for_worker(self, token: str, now: float) -> dict[str, float]:
        """The token's live workers {id: last call}; RequestError RESOURCE_EXHAUSTED when they are
        limits.max_workers_per_token already (the server asks before it reads a Register's fields)."""
        limit, live_s = self.cfg.limits.max_workers_per_token, self.cfg.leases.duration_s
        live = self._live.setdefault(token, {})
        for wid, seen in list(live.items()):   # a snapshot: heartbeats on other threads may add to it
            if seen < now - live_s:
                live.pop(wid, None)
        if len(live) >= limit:
            raise RequestError("RESOURCE_EXHAUSTED", f"token {token!r} has {len(live)} live workers (heard from "
                               f"in the last {live_s:g} s); the limit is {limit} (limits.max_workers_per_token): "
                               "stop one, or wait until a stopped one has been silent that long")
        return live

    def _worker(self, token: str, worker_id: str):
        w = self._workers.get(worker_id)
        if w is None:
            with self.store.read() as conn:
                c = S.workers.c
                row = conn.execute(select(c.token, c.gpu_memory, c.cuda, c.speed).where(c.id == worker_id)).first()
            if row is None:
                raise RequestError("NOT_FOUND", f"unknown worker id {worker_id!r}: register again")
            w = self._workers[worker_id] = WorkerRow(row.token, row.gpu_memory, bool(row.cuda), row.speed)
        if w.token != token:
            raise RequestError("PERMISSION_DENIED", f"worker {worker_id} belongs to another token")
        return w

    def _seen_now(self, token: str, worker_id: str, now: float) -> None:
        self._seen[worker_id] = now
        live = self._live.get(token)
        if live is None:
            live = self._live[token] = {}
        live[worker_id] = now

    # rate limit on failures

    def note_failure(self, token: str, now: float) -> None:
        """Count a failure against `token` (a Fail other than SHUTDOWN, or a result its validator refused)."""
        times = self._failed.get(token)
        if times is None:
            times = self._failed[token] = deque(maxlen=self.cfg.limits.max_failures_per_token)
        times.append(now)

    def _throttled(self, token: str, now: float) -> NoWork | None:
        """NoWork while `token` has failed limits.max_failures_per_token tasks within limits.failure_window_s."""
        times = self._failed.get(token)
        if times is None or len(times) < times.maxlen:
            return None
        window = self.cfg.limits.failure_window_s
        wait = times[0] + window - now   # when the oldest of them leaves the window
        if wait <= 0:
            return None
        return NoWork(f"token {token!r} failed {len(times)} tasks in the last {window:g} s (limits."
                      f"max_failures_per_token); no task for it for {wait:.0f} s: fix what makes its tasks fail "
                      "(the worker's log says what)", retry_after_s=wait)

    def heartbeat(self, token: str, worker_id: str, progress: list[tuple[str, float]]):
        """Renew the worker's active leases; returns (drain, [(lease_id, renewed, deadline)])."""
        now = time.time()
        deadline = now + self.cfg.leases.duration_s
        out = []
        self._worker(token, worker_id)
        self._seen_now(token, worker_id, now)
        if not progress:
            return self.draining, out
        renew = self.store.sql(_RENEW)
        oldest = now - self.cfg.leases.max_lifetime_s   # an older lease is not renewed: it expires, requeued
        with self.store.hot() as cur:
            for lease_id, frac in progress:
                n = cur.execute(renew, {"lid": lease_id, "wid": worker_id, "dl": deadline, "p": frac,
                                        "oldest": oldest}).rowcount
                out.append((lease_id, n == 1, deadline if n == 1 else 0.0))
        return self.draining, out

    # leasing

    def _pick_take(self, n_kinds: int, cuda: bool) -> str:
        key = (n_kinds, cuda)
        stmt = self._pick_sql.get(key)
        if stmt is None:
            stmt = self._pick_sql[key] = self.store.sql(_PICK_TAKE.format(
                kinds=", ".join(f":k{i}" for i in range(n_kinds)), cuda="" if cuda else " AND NOT needs_cuda",
                lock="" if self.store.is_sqlite else " FOR UPDATE SKIP LOCKED"))
        return stmt

    def lease(self, token: str, worker_id: str, kinds: list[str]) -> Grant | NoWork:
        if self.draining:
            return NoWork("the coordinator is shutting down")
        now = time.time()
        w = self._worker(token, worker_id)
        self._seen_now(token, worker_id, now)
        throttled = self._throttled(token, now)
        if throttled is not None:
            return throttled
        lease_id, deadline = new_id(), now + self.cfg.leases.duration_s
        with self.store.hot() as cur:
            held, own_limit = cur.execute(self.store.sql(_HELD_AND_LIMIT), {"tok": token}).fetchone()
            limit = own_limit or self.cfg.limits.max_leases_per_token
            if held >= limit:
                return NoWork(f"token {token!r} already holds {held} leases, its limit is {limit}")
            params = {"lid": lease_id, "now": now, "gpu": w.gpu_memory, "speed": w.speed, "tok": token}
            params.update((f"k{i}", k) for i, k in enumerate(kinds))
            t = cur.execute(self._pick_take(len(kinds), w.cuda), params).fetchone()
            if t is not None:
                task_id, kind, payload, attempts = t
                cur.execute(self.store.sql(_NEW_LEASE), {"id": lease_id, "tid": task_id, "wid": worker_id,
                                                         "tok": token, "now": now, "dl": deadline})
        if t is None:  # nothing this worker can run: say why (a read of its own, off the write lock)
            with self.store.read() as conn:
                return NoWork(self._why_nothing(conn, w, kinds, token))
        self.metrics.lease_granted(kind)
        return Grant(task_id, lease_id, kind, payload, deadline, attempts + 1)

    def _why_nothing(self, conn, w, kinds: list[str], token: str) -> str:
        pending = select(func.count()).select_from(S.tasks).where(S.tasks.c.state == "pending",
                                                                  S.tasks.c.kind.in_(kinds))
        total = conn.execute(pending).scalar_one()
        if total == 0:
            return f"no pending tasks of kind {', '.join(kinds)}"
        reasons = []
        for label, cond in (("more GPU memory", S.tasks.c.min_gpu_memory > w.gpu_memory),
                            ("CUDA", and_(S.tasks.c.needs_cuda.is_(True), not w.cuda)),
                            ("a higher measured speed", S.tasks.c.min_speed > w.speed),
                            ("another volunteer (this token failed them)", S.tasks.c.id.in_(
                                select(S.failures.c.task_id).where(S.failures.c.token == token,
                                                                   S.failures.c.reason.in_(BLAMED))))):
            n = conn.execute(pending.where(cond)).scalar_one()
            if n:
                reasons.append(f"{n} need {label}")
        return (f"{total} pending {'/'.join(kinds)} tasks, none this worker can run: " + "; ".join(reasons)
                + f" (this worker: {w.gpu_memory} bytes GPU memory, cuda={bool(w.cuda)}, speed={w.speed:g})")

    # ending leases without a result

    def _end_attempt(self, conn, task, lease_id: str, reason: str, message: str, count: bool, now: float,
                     token: str):
        """Put the task back to pending (or dead) after a lease ended without a result.

        Every counted failure is recorded with the lease's token, and so is a WORKER_FAULT (which counts no
        attempt); a SHUTDOWN is nobody's. A failure the token's machine or result caused (BLAMED: Fail with
        ERROR or OUT_OF_MEMORY, a result its validator refused) keeps the task from that token from then on;
        a task the worker calls broken (INVALID_TASK), a lease that expired (a crash, the network and a
        coordinator restart look alike) or a WORKER_FAULT (the machine, not the task) does not. The task goes
        dead after `max_attempts` counted failures from at least two tokens (one, when max_attempts is 1): one
        misconfigured or hostile volunteer cannot kill the queue."""
        _record_failure(conn, task.id, lease_id, reason, message, now,
                        token if count or reason == "WORKER_FAULT" else "")
        attempts = task.attempts + (1 if count else 0)
        f = S.failures.c
        tokens = conn.execute(select(func.count(func.distinct(f.token))).where(
            f.task_id == task.id, f.token.not_in(("", RETRIED)), f.reason.not_in(UNCOUNTED))).scalar_one()
        state = "dead" if attempts >= task.max_attempts and tokens >= min(2, task.max_attempts) else "pending"
        conn.execute(update(S.tasks).where(S.tasks.c.id == task.id).values(
            state=state, attempts=attempts, lease_id=None, last_error=f"{reason}: {message}"[:2000], updated=now))
        if state == "dead":
            log.warning("task %s is dead after %d attempts (last: %s: %s)", task.id, attempts, reason, message)
        return state

    def _owned_lease(self, conn, token: str, task_id: str, lease_id: str):
        lease = conn.execute(select(S.leases).where(S.leases.c.id == lease_id)).first()
        if lease is None:
            raise RequestError("NOT_FOUND", f"unknown lease id {lease_id!r}")
        if lease.token != token:
            raise RequestError("PERMISSION_DENIED", f"lease {lease_id} belongs to another token")
        if lease.task_id != task_id:
            raise RequestError("INVALID_ARGUMENT", f"lease {lease_id} is for task {lease.task_id}, not {task_id!r}")
        return lease

    def active_lease(self, token: str, worker_id: str, task_id: str, lease_id: str):
        """The lease `lease_id` if it is active and held by worker `worker_id` of `token` on task `task_id`;
        RequestError otherwise (swarm Join: only a slot's current worker speaks for it)."""
        self._worker(token, worker_id)
        with self.store.read() as conn:
            lease = self._owned_lease(conn, token, task_id, lease_id)
        if lease.worker_id != worker_id:
            raise RequestError("INVALID_ARGUMENT", f"lease {lease_id} is held by another worker of this token, "
                               f"not {worker_id}")
        if lease.state != "active":
            raise RequestError("FAILED_PRECONDITION", f"lease {lease_id} is {lease.state}, not active: lease the "
                               "task again")
        return lease

    def fail(self, token: str, task_id: str, lease_id: str, reason: str, message: str) -> tuple[bool, bool]:
        """Returns (requeued, dead)."""
        now = time.time()
        with self.store.tx() as conn:
            lease = self._owned_lease(conn, token, task_id, lease_id)
            if lease.state != "active":
                raise RequestError("FAILED_PRECONDITION", f"lease {lease_id} is {lease.state}, not active; "
                                   "nothing to give back")
            shutdown = reason == "SHUTDOWN"
            conn.execute(update(S.leases).where(S.leases.c.id == lease_id)
                         .values(state="released" if shutdown else "failed"))
            task = conn.execute(select(S.tasks).where(S.tasks.c.id == task_id)).first()
            if task.state != "leased" or task.lease_id != lease_id:  # requeued already (expired), or done
                state = "dead" if task.state == "dead" else "not requeued"
            else:
                state = self._end_attempt(conn, task, lease_id, reason, message, count=reason not in UNCOUNTED,
                                          now=now, token=lease.token)
        if not shutdown:  # a stopping worker gives back what it holds (a few leases); anything else is throttled
            self.note_failure(token, now)
        return state == "pending", state == "dead"

    def flush_seen(self) -> int:
        """Write the gathered last_seen times (one executemany); returns how many workers."""
        seen, self._seen = self._seen, {}
        if seen:
            with self.store.hot() as cur:
                cur.executemany(self.store.sql(_SEEN), [{"wid": w, "seen": t} for w, t in seen.items()])
        return len(seen)

    def sweep_expired(self) -> int:
        """Expire every active lease past its deadline; requeue (or kill) its task. Returns how many."""
        now = time.time()
        with self.store.tx() as conn:
            expired = conn.execute(select(S.leases.c.id, S.leases.c.task_id, S.leases.c.token).where(
                S.leases.c.state == "active", S.leases.c.deadline < now)).all()
            for lease_id, task_id, token in expired:
                conn.execute(update(S.leases).where(S.leases.c.id == lease_id).values(state="expired"))
                task = conn.execute(select(S.tasks).where(S.tasks.c.id == task_id)).first()
                if task.state == "leased" and task.lease_id == lease_id:
                    self._end_attempt(conn, task, lease_id, "EXPIRED", "lease not renewed before its deadline",
                                      count=True, now=now, token=token)
        if expired:
            log.info("expired %d leases", len(expired))
            self.metrics.lease_expired(len(expired))
        return len(expired)

    # completion

    def _lease_task_result(self, cur, token: str, task_id: str, lease_id: str) -> tuple:
        """The lease (owned by `token`, for `task_id`), its task and the task's result, in one read:
        (lease token, task id, lease state, granted, worker id, kind, run, payload, task's lease id,
        result's lease id or None, result credited or None)."""
        row = cur.execute(self.store.sql(_LEASE_TASK_RESULT), {"lid": lease_id}).fetchone()
        if row is None:
            raise RequestError("NOT_FOUND", f"unknown lease id {lease_id!r}")
        if row[0] != token:
            raise RequestError("PERMISSION_DENIED", f"lease {lease_id} belongs to another token")
        if row[1] != task_id:
            raise RequestError("INVALID_ARGUMENT", f"lease {lease_id} is for task {row[1]}, not {task_id!r}")
        return row

    def lease_for_complete(self, token: str, task_id: str, lease_id: str) -> LeaseInfo:
        """Check a Complete's header before its upload is read."""
        with self.store.hot() as cur:
            _, _, state, granted, worker_id, kind, run, payload, _, done_lease, done_credited = \
                self._lease_task_result(cur, token, task_id, lease_id)
        info = dict(lease_id=lease_id, task_id=task_id, kind=kind, run=run, payload=json.loads(payload),
                    granted=granted, worker_id=worker_id)
        if done_lease is not None:
            if done_lease == lease_id:
                return LeaseInfo(**info, duplicate=CompleteOutcome(
                    True, bool(done_credited), True, "already completed by this lease; the first result stands"))
            raise RequestError("FAILED_PRECONDITION", f"task {task_id} was already completed by another lease; "
                               "this result is refused without credit")
        if state in ("failed", "released", "cancelled"):
            raise RequestError("FAILED_PRECONDITION", f"lease {lease_id} was given back or cancelled ({state}); "
                               "its result is refused")
        return LeaseInfo(**info, duplicate=None)

    def validator(self, kind: str) -> Validator:
        """The kind's validator bound to this project (stateful ones keep their state per coordinator)."""
        v = self._validators.get(kind)
        if v is None:
            v = self._validators[kind] = validator_for(kind).bind(self.cfg)
        return v

    def check_result(self, info: LeaseInfo, metrics: dict[str, float], data: bytes = b"") -> list[Credit]:
        """Run the kind's validator on the metrics and the uploaded bytes; a refused result ends the
        lease as a failed attempt."""
        try:
            return self.validator(info.kind).check_result(info.payload, metrics, time.time() - info.granted, data)
        except ValidationError as err:
            now = time.time()
            with self.store.tx() as conn:
                lease = conn.execute(select(S.leases).where(S.leases.c.id == info.lease_id)).first()
                if lease.state == "active":
                    conn.execute(update(S.leases).where(S.leases.c.id == info.lease_id).values(state="failed"))
                task = conn.execute(select(S.tasks).where(S.tasks.c.id == info.task_id)).first()
                if task.state == "leased" and task.lease_id == info.lease_id:
                    self._end_attempt(conn, task, info.lease_id, "INVALID_RESULT", str(err), count=True, now=now,
                                      token=lease.token)
                else:
                    _record_failure(conn, task.id, info.lease_id, "INVALID_RESULT", str(err), now, lease.token)
            self.note_failure(lease.token, now)
            raise RequestError("INVALID_ARGUMENT", f"result refused by the {info.kind} validator: {err}") from None

    def complete(self, info: LeaseInfo, sha256: str, size: int, rel_path: str, metrics: dict[str, float],
                 credits: list[Credit], commit_file, metadata_json: str = "{}", data: bytes = b"") -> CompleteOutcome:
        """Record an uploaded, validated result. `commit_file()` moves the upload into place; it runs
        inside the transaction so that a refused completion leaves no file behind. The transaction is
        committed before this returns, so an acknowledged completion survives a crash."""
        now = time.time()
        with self.store.hot() as cur:
            token, _, state, _, worker_id, _, _, _, task_lease, done_lease, done_credited = \
                cur.execute(self.store.sql(_LEASE_TASK_RESULT), {"lid": info.lease_id}).fetchone()
            if done_lease is not None:  # a concurrent completion won while this upload was streaming
                if done_lease == info.lease_id:
                    return CompleteOutcome(True, bool(done_credited), True, "already completed by this lease")
                raise RequestError("FAILED_PRECONDITION", f"task {info.task_id} was already completed by another "
                                   "lease; this result is refused without credit")
            if state in ("failed", "released", "cancelled"):
                raise RequestError("FAILED_PRECONDITION", f"lease {info.lease_id} was given back or cancelled "
                                   f"({state})")
            cur.execute(self.store.sql(_NEW_RESULT), {
                "tid": info.task_id, "lid": info.lease_id, "wid": worker_id, "tok": token, "sha": sha256, "size": size,
                "path": rel_path, "metrics": json.dumps(metrics), "meta": metadata_json, "credited": True, "now": now})
            cur.execute(self.store.sql(_LEASE_DONE), {"lid": info.lease_id})
            if task_lease and task_lease != info.lease_id:
                # A late result for an expired lease won: the newer lease is cancelled at its next heartbeat.
                cur.execute(self.store.sql(_CANCEL_NEWER), {"lid": task_lease})
            cur.execute(self.store.sql(_TASK_DONE), {"tid": info.task_id, "now": now})
            if credits:
                cur.executemany(self.store.sql(_CREDIT), [
                    {"tid": info.task_id, "vol": token, "kind": info.kind, "unit": c.unit, "amount": c.amount,
                     "now": now} for c in credits])
            self.validator(info.kind).commit(info.task_id, info.payload, data)
            commit_file()
        self.metrics.lease_completed(info.kind)
        if "loss" in metrics:
            self.metrics.latest_loss(info.run, info.kind, loss_phase(info.kind, info.payload), metrics["loss"])
        return CompleteOutcome(True, True, False, "result accepted", credits)

    # organizer operations (CLI)

    def add_task(self, kind: str, payload: dict, priority: int = 0, min_gpu_memory: int = 0,
                 needs_cuda: bool = False, min_speed: float = 0.0, max_attempts: int | None = None,
                 task_id: str | None = None) -> str:
        """Add a pending task; `task_id` (at most 32 characters) makes the id deterministic (plan.py)."""
        validator_for(kind).check_payload(payload)
        task_id = task_id or new_id()
        with self.store.tx() as conn:
            conn.execute(insert(S.tasks).values(self._task_row(
                task_id, kind, payload, time.time(), priority=priority, min_gpu_memory=min_gpu_memory,
                needs_cuda=needs_cuda, min_speed=min_speed, max_attempts=max_attempts)))
        return task_id

    def _task_row(self, task_id: str, kind: str, payload: dict, created: float, *, priority: int = 0,
                  min_gpu_memory: int = 0, needs_cuda: bool = False, min_speed: float = 0.0,
                  max_attempts: int | None = None) -> dict:
        return dict(id=task_id, kind=kind, run=self.cfg.run, priority=priority, state="pending",
                    payload=json.dumps(payload), min_gpu_memory=min_gpu_memory, needs_cuda=needs_cuda,
                    min_speed=min_speed, attempts=0, max_attempts=max_attempts or self.cfg.leases.max_attempts,
                    created=created, updated=created)

    def add_tasks(self, kind: str, tasks: list[tuple[str, dict]], priority: int = 0) -> list[str]:
        """Add `(task_id, payload)` tasks in one transaction, skipping ids that exist already: adding the same
        tasks again (a driver resuming after a crash) changes nothing."""
        v = validator_for(kind)
        for _, payload in tasks:
            v.check_payload(payload)
        now, ids = time.time(), [tid for tid, _ in tasks]
        with self.store.tx() as conn:
            have = {r for (r,) in conn.execute(select(S.tasks.c.id).where(S.tasks.c.id.in_(ids)))}
            # created in list order (a microsecond apart): leases hand them out in that order, as separate adds did
            new = [self._task_row(tid, kind, payload, now + i * 1e-6, priority=priority)
                   for i, (tid, payload) in enumerate(tasks) if tid not in have]
            if new:
                conn.execute(insert(S.tasks), new)
        return ids

    def cancel_tasks(self, task_ids: list[str], why: str) -> int:
        """End every task of `task_ids` that is not done: it goes dead (no credit) and its active lease is
        cancelled, so its worker is told CANCEL at its next heartbeat and a late result is refused. Returns how
        many tasks were cancelled."""
        now, n = time.time(), 0
        with self.store.tx() as conn:
            for task in conn.execute(select(S.tasks).where(S.tasks.c.id.in_(task_ids),
                                                           S.tasks.c.state.in_(("pending", "leased")))).all():
                if task.lease_id is not None:
                    conn.execute(update(S.leases).where(S.leases.c.id == task.lease_id, S.leases.c.state == "active")
                                 .values(state="cancelled"))
                _record_failure(conn, task.id, task.lease_id or "", "CANCELLED", why, now, "")
                conn.execute(update(S.tasks).where(S.tasks.c.id == task.id).values(
                    state="dead", lease_id=None, last_error=f"CANCELLED: {why}"[:2000], updated=now))
                n += 1
        return n

    def retry_task(self, task_id: str) -> None:
        """Send a dead (or pending) task back to the queue with its attempts reset, open to every token again."""
        with self.store.tx() as conn:
            task = conn.execute(select(S.tasks).where(S.tasks.c.id == task_id)).first()
            if task is None:
                raise RequestError("NOT_FOUND", f"unknown task id {task_id!r}; `tasks list` shows them")
            if task.state not in ("dead", "pending"):
                raise RequestError("FAILED_PRECONDITION", f"task {task_id} is {task.state}; only dead or pending "
                                   "tasks can be retried")
            conn.execute(update(S.tasks).where(S.tasks.c.id == task_id, S.tasks.c.state.in_(("dead", "pending")))
                         .values(state="pending", attempts=0, lease_id=None, updated=time.time()))
            # the organizer's word: every token may take it again, and its failures so far no longer count (they
            # stay, as history)
            conn.execute(update(S.failures).where(S.failures.c.task_id == task_id).values(token=RETRIED))
