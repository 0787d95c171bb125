"""Task lifecycle and matching: pending -> leased -> done, or back to pending, or dead.

    pending --Lease--> leased --Complete (validated)--> done
                         |--Fail(SHUTDOWN)------------> pending (attempt not counted)
                         |--Fail(other) / expiry------> pending, or dead after max_attempts

Every transition is one store transaction, so a crash leaves each task in exactly one state. A lease
has a deadline that heartbeats move; `sweep_expired` requeues what was not renewed. Completion is
idempotent per (task, lease) and the first accepted result wins: the results table's primary key is
the task id and the ledger's unique constraint is (task, unit), so no code path can record a task
twice. Errors are `RequestError`s carrying a gRPC status name; the server turns them into statuses.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from sqlalchemy import Boolean, and_, bindparam, func, insert, or_, select, update

from . import store as S
from .config import ProjectConfig
from .metrics import NullMetrics
from .validate import Credit, ValidationError, Validator, validator_for

log = logging.getLogger(__name__)


# The hot path's statements, built once: constructing SQLAlchemy statements costs more Python time
# per call than SQLite spends running them.
_RENEW = update(S.leases).where(S.leases.c.id == bindparam("lid"), S.leases.c.worker_id == bindparam("wid"),
                                S.leases.c.state == "active").values(deadline=bindparam("dl"), progress=bindparam("p"))
_HELD = select(func.count()).select_from(S.leases).where(S.leases.c.token == bindparam("tok"),
                                                         S.leases.c.state == "active")
_TOKEN_LIMIT = select(S.tokens.c.max_leases).where(S.tokens.c.name == bindparam("tok"))
_PICK = (select(S.tasks.c.id, S.tasks.c.kind, S.tasks.c.payload, S.tasks.c.attempts)
         .where(S.tasks.c.state == "pending", S.tasks.c.kind.in_(bindparam("kinds", expanding=True)),
                S.tasks.c.min_gpu_memory <= bindparam("gpu"), S.tasks.c.min_speed <= bindparam("speed"),
                or_(S.tasks.c.needs_cuda.is_(False), bindparam("cuda", type_=Boolean)))
         .order_by(S.tasks.c.priority.desc(), S.tasks.c.created, S.tasks.c.id).limit(1))
_PICK_LOCKED = _PICK.with_for_update(skip_locked=True)  # PostgreSQL: concurrent pickers skip each other's rows
_TAKE = update(S.tasks).where(S.tasks.c.id == bindparam("tid"), S.tasks.c.state == "pending") \
    .values(state="leased", lease_id=bindparam("lid"), updated=bindparam("now"))
_NEW_LEASE = insert(S.leases)
_LEASE = select(S.leases).where(S.leases.c.id == bindparam("lid"))
_TASK = select(S.tasks).where(S.tasks.c.id == bindparam("tid"))
_NEW_RESULT = insert(S.results)
_LEASE_DONE = update(S.leases).where(S.leases.c.id == bindparam("lid")).values(state="completed")
_TASK_DONE = update(S.tasks).where(S.tasks.c.id == bindparam("tid")).values(state="done", lease_id=None,
                                                                          updated=bindparam("now"))
_CREDIT = insert(S.ledger)
_RESULT = select(S.results.c.lease_id, S.results.c.credited).where(S.results.c.task_id == bindparam("tid"))


class RequestError(Exception):
    """A request the coordinator refuses; `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def new_id() -> str:
    return uuid.uuid4().hex


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
        self._workers: dict[str, object] = {}
        self._seen: dict[str, float] = {}

    # workers

    def register(self, token: str, name: str, capabilities: dict, gpu_memory: int, cuda: bool, speed: float) -> str:
        worker_id, now = new_id(), time.time()
        with self.store.tx() as conn:
            conn.execute(insert(S.workers).values(id=worker_id, token=token, name=name[:256],
                                                  capabilities=json.dumps(capabilities), gpu_memory=gpu_memory,
                                                  cuda=cuda, speed=speed, registered=now, last_seen=now))
        return worker_id

    def _worker(self, token: str, worker_id: str):
        w = self._workers.get(worker_id)
        if w is None:
            with self.store.read() as conn:
                w = conn.execute(select(S.workers).where(S.workers.c.id == worker_id)).first()
            if w is None:
                raise RequestError("NOT_FOUND", f"unknown worker id {worker_id!r}: register again")
            self._workers[worker_id] = w
        if w.token != token:
            raise RequestError("PERMISSION_DENIED", f"worker {worker_id} belongs to another token")
        return w

    def heartbeat(self, token: str, worker_id: str, progress: list[tuple[str, float]]):
        """Renew the worker's active leases; returns (drain, [(lease_id, renewed, deadline)])."""
        now = time.time()
        deadline = now + self.cfg.leases.duration_s
        out = []
        self._worker(token, worker_id)
        self._seen[worker_id] = now
        if not progress:
            return self.draining, out
        with self.store.tx() as conn:
            for lease_id, frac in progress:
                n = conn.execute(_RENEW, {"lid": lease_id, "wid": worker_id, "dl": deadline, "p": frac}).rowcount
                out.append((lease_id, n == 1, deadline if n == 1 else 0.0))
        return self.draining, out

    # leasing

    def _lease_limit(self, conn, token: str) -> int:
        own = conn.execute(_TOKEN_LIMIT, {"tok": token}).scalar()
        return own or self.cfg.limits.max_leases_per_token

    def lease(self, token: str, worker_id: str, kinds: list[str]) -> Grant | NoWork:
        if self.draining:
            return NoWork("the coordinator is shutting down")
        now = time.time()
        w = self._worker(token, worker_id)
        self._seen[worker_id] = now
        with self.store.tx() as conn:
            held = conn.execute(_HELD, {"tok": token}).scalar_one()
            limit = self._lease_limit(conn, token)
            if held >= limit:
                return NoWork(f"token {token!r} already holds {held} leases, its limit is {limit}")
            t = conn.execute(_PICK if self.store.is_sqlite else _PICK_LOCKED,
                             {"kinds": kinds, "gpu": w.gpu_memory, "speed": w.speed, "cuda": bool(w.cuda)}).first()
            if t is None:
                return NoWork(self._why_nothing(conn, w, kinds))
            lease_id, deadline = new_id(), now + self.cfg.leases.duration_s
            n = conn.execute(_TAKE, {"tid": t.id, "lid": lease_id, "now": now}).rowcount
            if n != 1:  # taken by another process between select and update; the worker asks again
                return NoWork("contention: retry")
            conn.execute(_NEW_LEASE, dict(id=lease_id, task_id=t.id, worker_id=worker_id, token=token,
                                          state="active", granted=now, deadline=deadline, progress=0.0))
        self.metrics.lease_granted(t.kind)
        return Grant(t.id, lease_id, t.kind, t.payload, deadline, t.attempts + 1)

    def _why_nothing(self, conn, w, kinds: list[str]) -> str:
        pending = select(func.count()).select_from(S.tasks).where(S.tasks.c.state == "pending",
                                                                  S.tasks.c.kind.in_(kinds))
        total = conn.execute(pending).scalar_one()
        if total == 0:
            return f"no pending tasks of kind {', '.join(kinds)}"
        reasons = []
        for label, cond in (("more GPU memory", S.tasks.c.min_gpu_memory > w.gpu_memory),
                            ("CUDA", and_(S.tasks.c.needs_cuda.is_(True), not w.cuda)),
                            ("a higher measured speed", S.tasks.c.min_speed > w.speed)):
            n = conn.execute(pending.where(cond)).scalar_one()
            if n:
                reasons.append(f"{n} need {label}")
        return (f"{total} pending {'/'.join(kinds)} tasks, none this worker can run: " + "; ".join(reasons)
                + f" (this worker: {w.gpu_memory} bytes GPU memory, cuda={bool(w.cuda)}, speed={w.speed:g})")

    # ending leases without a result

    def _end_attempt(self, conn, task, lease_id: str, reason: str, message: str, count: bool, now: float):
        """Put the task back to pending (or dead) after a lease ended without a result."""
        conn.execute(insert(S.failures).values(task_id=task.id, lease_id=lease_id, reason=reason,
                                               message=message[:2000], at=now))
        attempts = task.attempts + (1 if count else 0)
        state = "dead" if attempts >= task.max_attempts else "pending"
        conn.execute(update(S.tasks).where(S.tasks.c.id == task.id).values(
            state=state, attempts=attempts, lease_id=None, last_error=f"{reason}: {message}"[:2000], updated=now))
        if state == "dead":
            log.warning("task %s is dead after %d attempts (last: %s: %s)", task.id, attempts, reason, message)
        return state

    def _owned_lease(self, conn, token: str, task_id: str, lease_id: str):
        lease = conn.execute(_LEASE, {"lid": lease_id}).first()
        if lease is None:
            raise RequestError("NOT_FOUND", f"unknown lease id {lease_id!r}")
        if lease.token != token:
            raise RequestError("PERMISSION_DENIED", f"lease {lease_id} belongs to another token")
        if lease.task_id != task_id:
            raise RequestError("INVALID_ARGUMENT", f"lease {lease_id} is for task {lease.task_id}, not {task_id!r}")
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
            if task.state != "leased" or task.lease_id != lease_id:
                return False, task.state == "dead"
            state = self._end_attempt(conn, task, lease_id, reason, message, count=not shutdown, now=now)
        return state == "pending", state == "dead"

    def flush_seen(self) -> int:
        """Write the gathered last_seen times (one executemany); returns how many workers."""
        seen, self._seen = self._seen, {}
        if seen:
            with self.store.tx() as conn:
                conn.execute(update(S.workers).where(S.workers.c.id == bindparam("wid"))
                             .values(last_seen=bindparam("seen")),
                             [{"wid": w, "seen": t} for w, t in seen.items()])
        return len(seen)

    def sweep_expired(self) -> int:
        """Expire every active lease past its deadline; requeue (or kill) its task. Returns how many."""
        now = time.time()
        with self.store.tx() as conn:
            expired = conn.execute(select(S.leases.c.id, S.leases.c.task_id).where(
                S.leases.c.state == "active", S.leases.c.deadline < now)).all()
            for lease_id, task_id in expired:
                conn.execute(update(S.leases).where(S.leases.c.id == lease_id).values(state="expired"))
                task = conn.execute(select(S.tasks).where(S.tasks.c.id == task_id)).first()
                if task.state == "leased" and task.lease_id == lease_id:
                    self._end_attempt(conn, task, lease_id, "EXPIRED", "lease not renewed before its deadline",
                                      count=True, now=now)
        if expired:
            log.info("expired %d leases", len(expired))
            self.metrics.lease_expired(len(expired))
        return len(expired)

    # completion

    def lease_for_complete(self, token: str, task_id: str, lease_id: str) -> LeaseInfo:
        """Check a Complete's header before its upload is read."""
        with self.store.read() as conn:
            lease = self._owned_lease(conn, token, task_id, lease_id)
            task = conn.execute(_TASK, {"tid": task_id}).first()
            done = conn.execute(_RESULT, {"tid": task_id}).first()
        info = dict(lease_id=lease_id, task_id=task_id, kind=task.kind, run=task.run,
                    payload=json.loads(task.payload), granted=lease.granted, worker_id=lease.worker_id)
        if done is not None:
            if done.lease_id == lease_id:
                return LeaseInfo(**info, duplicate=CompleteOutcome(
                    True, done.credited, True, "already completed by this lease; the first result stands"))
            raise RequestError("FAILED_PRECONDITION", f"task {task_id} was already completed by another lease; "
                               "this result is refused without credit")
        if lease.state in ("failed", "released"):
            raise RequestError("FAILED_PRECONDITION", f"lease {lease_id} was given back ({lease.state}); "
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
                    self._end_attempt(conn, task, info.lease_id, "INVALID_RESULT", str(err), count=True, now=now)
                else:
                    conn.execute(insert(S.failures).values(task_id=task.id, lease_id=info.lease_id,
                                                           reason="INVALID_RESULT", message=str(err)[:2000], at=now))
            raise RequestError("INVALID_ARGUMENT", f"result refused by the {info.kind} validator: {err}") from None

    def complete(self, info: LeaseInfo, sha256: str, size: int, rel_path: str, metrics: dict[str, float],
                 credits: list[Credit], commit_file, metadata_json: str = "{}", data: bytes = b"") -> CompleteOutcome:
        """Record an uploaded, validated result. `commit_file()` moves the upload into place; it runs
        inside the transaction so that a refused completion leaves no file behind."""
        now = time.time()
        with self.store.tx() as conn:
            done = conn.execute(_RESULT, {"tid": info.task_id}).first()
            if done is not None:  # a concurrent completion won while this upload was streaming
                if done.lease_id == info.lease_id:
                    return CompleteOutcome(True, done.credited, True, "already completed by this lease")
                raise RequestError("FAILED_PRECONDITION", f"task {info.task_id} was already completed by another "
                                   "lease; this result is refused without credit")
            task = conn.execute(_TASK, {"tid": info.task_id}).first()
            lease = conn.execute(_LEASE, {"lid": info.lease_id}).first()
            if lease.state in ("failed", "released"):
                raise RequestError("FAILED_PRECONDITION", f"lease {info.lease_id} was given back ({lease.state})")
            token = lease.token
            conn.execute(_NEW_RESULT, dict(task_id=info.task_id, lease_id=info.lease_id, worker_id=lease.worker_id,
                                           token=token, sha256=sha256, size=size, path=rel_path,
                                           metrics=json.dumps(metrics), metadata=metadata_json, credited=True,
                                           at=now))
            conn.execute(_LEASE_DONE, {"lid": info.lease_id})
            if task.lease_id and task.lease_id != info.lease_id:
                # A late result for an expired lease won: the newer lease is cancelled at its next heartbeat.
                conn.execute(update(S.leases).where(S.leases.c.id == task.lease_id, S.leases.c.state == "active")
                             .values(state="cancelled"))
            conn.execute(_TASK_DONE, {"tid": info.task_id, "now": now})
            if credits:
                conn.execute(_CREDIT, [dict(task_id=info.task_id, volunteer=token, kind=info.kind, unit=c.unit,
                                            amount=c.amount, at=now) for c in credits])
            self.validator(info.kind).commit(info.task_id, info.payload, data)
            commit_file()
        self.metrics.lease_completed(info.kind)
        if "loss" in metrics:
            self.metrics.latest_loss(info.run, info.kind, metrics["loss"])
        return CompleteOutcome(True, True, False, "result accepted", credits)

    # organizer operations (CLI)

    def add_task(self, kind: str, payload: dict, priority: int = 0, min_gpu_memory: int = 0,
                 needs_cuda: bool = False, min_speed: float = 0.0, max_attempts: int | None = None,
                 task_id: str | None = None) -> str:
        """Add a pending task; `task_id` (at most 32 characters) makes the id deterministic (plan.py)."""
        validator_for(kind).check_payload(payload)
        task_id, now = task_id or new_id(), time.time()
        with self.store.tx() as conn:
            conn.execute(insert(S.tasks).values(
                id=task_id, kind=kind, run=self.cfg.run, priority=priority, state="pending",
                payload=json.dumps(payload), min_gpu_memory=min_gpu_memory, needs_cuda=needs_cuda,
                min_speed=min_speed, attempts=0, max_attempts=max_attempts or self.cfg.leases.max_attempts,
                created=now, updated=now))
        return task_id

    def retry_task(self, task_id: str) -> None:
        """Send a dead (or pending) task back to the queue with its attempts reset."""
        with self.store.tx() as conn:
            task = conn.execute(select(S.tasks).where(S.tasks.c.id == task_id)).first()
            if task is None:
                raise RequestError("NOT_FOUND", f"unknown task id {task_id!r}; `tasks list` shows them")
            if task.state not in ("dead", "pending"):
                raise RequestError("FAILED_PRECONDITION", f"task {task_id} is {task.state}; only dead or pending "
                                   "tasks can be retried")
            conn.execute(update(S.tasks).where(S.tasks.c.id == task_id, S.tasks.c.state.in_(("dead", "pending")))
                         .values(state="pending", attempts=0, lease_id=None, updated=time.time()))
