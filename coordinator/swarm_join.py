"""Who averages with whom in a swarm round: the coordinator's side of the `Join` RPC, and round tickets.

A round's `train` task runs on a worker that starts its hivemind peer and calls Join with the task's lease
and its peer id, every JoinResponse.retry_s until the answer is ready. Joins live in memory (a restarted
coordinator gets them again: the workers poll). The round's members, {task id: peer id}, are frozen into the
status file (`status["members"]`) as soon as every task of the round joined (inside Join, so nobody waits a
poll), or once `swarm.join_timeout_s` passed since the round opened (SwarmDriver.step calls
`freeze_if_late`). From then on Join answers with a RoundTicket (swarm/ticket.py) signed with the
coordinator's key:

    groups[m] = {members[t]: tokens leased to t's slot, for every member task t whose slot holds m}
                for every module m the requester's slot holds
    expires   = opened_at + swarm.round_timeout_s

    joins = RoundJoins(cfg, store, scheduler, TicketKey.load_or_create(state_dir / "keys" / "ticket_ed25519"))
    signed = joins.join(token, worker_id, task_id, lease_id, peer_id)    # None: not frozen yet, ask again

A weight is what the coordinator leased (the lease's tokens on shards, else inner_steps · batch_size ·
seq_len), never a figure a worker reports. Refused: a lease that is not active or not this worker's, a task
that is not of the current round, a peer id that another task of the round joined with (one peer, one slot:
a token cannot put one peer into several groups). A requester whose peer id is not its task's frozen member
(it joined late, or its slot was leased again after the freeze) gets a ticket in which it is a member of no
group, and keeps its Δs local.

The driver and Join both write the status file, through `write_status`, under one lock; a write keeps the
frozen members of its round when the status being written (a copy the driver read earlier) lacks them.
Torch-free: Join runs on the server's event loop.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from swarm.modules import held_modules
from swarm.settings import TrainPayload
from swarm.ticket import PEER_ID, RoundTicket, SignedTicket, TicketKey

from .errors import RequestError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Slot:
    """What a round's task gives its ticket: its slot, the modules it holds, its weight (tokens leased)."""

    slot: str
    modules: frozenset[str]
    weight: float

    @classmethod
    def of(cls, payload: dict) -> Slot:
        p = TrainPayload.from_dict(payload)
        inner = p.inner
        tokens = inner.lease.tokens if inner.data_source == "shards" else \
            inner.inner_steps * inner.batch_size * inner.seq_len
        return cls(p.slot, frozenset(held_modules(p.assignment)), float(tokens))


def write_status_file(path: Path, status: dict) -> None:
    """Write the status file atomically (a temporary file, fsync, rename), as model.checkpoint.write_json
    does, without importing torch."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(status, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RoundJoins:
    """The current round's joins, its frozen members and the tickets signed from them (see the module doc)."""

    def __init__(self, cfg, store, scheduler, key: TicketKey):
        self.cfg, self.store, self.scheduler, self.key = cfg, store, scheduler, key
        self.status_path = Path(cfg.state_dir) / "swarm" / f"{cfg.run}.json"
        self.lock = threading.Lock()  # held around every read-modify-write of the status file
        self._round: tuple | None = None  # (round, task ids) the state below belongs to
        self._joins: dict[str, tuple[str, str]] = {}  # task id -> (lease id, peer id), this round
        self._slots: dict[str, Slot] = {}  # task id -> its Slot, read from the task's payload once per round

    # the status file

    def _read(self) -> dict | None:
        try:
            return json.loads(self.status_path.read_text())
        except FileNotFoundError:
            return None

    def write_status(self, status: dict) -> None:
        """Write the status file (the driver's writes); keeps the round's frozen members (see the module doc)."""
        with self.lock:
            self._write(status)

    def _write(self, status: dict) -> None:
        if "members" not in status and status.get("tasks"):
            now = self._read() or {}
            if "members" in now and (now.get("round"), now.get("tasks")) == (status["round"], status["tasks"]):
                status["members"] = now["members"]
        write_status_file(self.status_path, status)

    def _follow(self, status: dict) -> None:
        """Forget the joins of an earlier round."""
        key = (status["round"], tuple(status["tasks"]))
        if key != self._round:
            self._round, self._joins, self._slots = key, {}, {}

    # joining

    def join(self, token: str, worker_id: str, task_id: str, lease_id: str, peer_id: str) -> SignedTicket | None:
        """Record that the worker of `lease_id` on `task_id` averages as `peer_id`; its ticket once the round's
        members are frozen, None before (the worker asks again). RequestError when refused."""
        if not PEER_ID.fullmatch(peer_id):
            raise RequestError("INVALID_ARGUMENT", f"peer_id {peer_id[:200]!r} is not a base58 peer id (libp2p's "
                               "form, e.g. 12D3KooW...)")
        self.scheduler.active_lease(token, worker_id, task_id, lease_id)
        with self.lock:
            status = self._read()
            if status is None:
                raise RequestError("FAILED_PRECONDITION", f"run {self.cfg.run!r} is not a swarm run yet "
                                   "(mujina-coordinator init-swarm)")
            if task_id not in status.get("tasks", []):
                raise RequestError("FAILED_PRECONDITION", f"task {task_id} is not a task of swarm round "
                                   f"{status['round']}: the round moved on; lease a task of the current round")
            self._follow(status)
            members = status.get("members")
            taken = [*((t, p) for t, (_, p) in self._joins.items()), *(members or {}).items()]
            other = next((t for t, p in taken if p == peer_id and t != task_id), None)
            if other is not None:
                raise RequestError("PERMISSION_DENIED", f"peer {peer_id} already joined swarm round "
                                   f"{status['round']} for another slot (task {other}): one peer, one slot")
            held = self._joins.get(task_id)
            if held is not None and held[0] == lease_id and held[1] != peer_id:
                raise RequestError("FAILED_PRECONDITION", f"lease {lease_id} joined as peer {held[1]}: a lease "
                                   "joins with one peer id")
            self._joins[task_id] = (lease_id, peer_id)
            if members is None:
                if not set(status["tasks"]) <= set(self._joins):
                    return None
                members = self._freeze(status, "every slot joined")
            return self.key.sign(self._ticket(status, members, task_id, peer_id))

    def freeze_if_late(self, now: float | None = None) -> None:
        """Freeze the current round's members with the tasks that joined, once swarm.join_timeout_s has passed
        since the round opened (the driver calls it every step)."""
        now = time.time() if now is None else now
        with self.lock:
            status = self._read()
            if (not status or not status.get("tasks") or "opening" in status or "members" in status
                    or now <= status["opened_at"] + self.cfg.swarm.join_timeout_s):
                return
            self._follow(status)
            self._freeze(status, f"swarm.join_timeout_s = {self.cfg.swarm.join_timeout_s:g} passed")

    def _freeze(self, status: dict, why: str) -> dict[str, str]:
        members = {t: self._joins[t][1] for t in status["tasks"] if t in self._joins}
        status["members"] = members
        self._write(status)
        missing = len(status["tasks"]) - len(members)
        (log.warning if missing else log.info)(
            "swarm round %d: members frozen (%s): %d of %d slots%s", status["round"], why, len(members),
            len(status["tasks"]), f"; {missing} that did not join keep their Δs local" if missing else "")
        return members

    def _ticket(self, status: dict, members: dict[str, str], task_id: str, peer_id: str) -> RoundTicket:
        missing = [t for t in (task_id, *members) if t not in self._slots]
        if missing:
            from sqlalchemy import select

            from . import store as S

            with self.store.read() as conn:
                rows = conn.execute(select(S.tasks.c.id, S.tasks.c.payload).where(S.tasks.c.id.in_(missing))).all()
            self._slots.update((t, Slot.of(json.loads(payload))) for t, payload in rows)
        own = self._slots[task_id]
        groups = {m: {peer: self._slots[t].weight for t, peer in members.items() if m in self._slots[t].modules}
                  for m in sorted(own.modules)}
        return RoundTicket(run=self.cfg.run, round=status["round"], slot=own.slot, peer_id=peer_id, groups=groups,
                           expires=status["opened_at"] + self.cfg.swarm.round_timeout_s)
