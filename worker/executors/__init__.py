"""Executors: one per task kind (`generate`, `judge`, `eval`, `train`), found through one table, `KINDS`.

The daemon (worker/daemon.py) leases a task, builds a `TaskContext` and calls the executor of the task's
kind. An executor returns a `Result`: the bytes uploaded with `Complete` and the metrics the coordinator's
validator for that kind checks. It raises `TaskError` for a payload it cannot run (the daemon reports
INVALID_TASK), `WorkerFault` when this machine cannot run the kind at all (no or wrong teacher, no chat
template; an `ImportError` is one too): the daemon reports WORKER_FAULT, which counts no attempt, and stops
leasing the kind. Other exceptions propagate (reported as ERROR, or OUT_OF_MEMORY for `torch.OutOfMemoryError`).

    executors = Executors(registry)      # the daemon's, with its Prometheus registry (or None)
    result = executors("eval")(ctx)
    executors.close()                    # at exit: stateful executors (train's swarm peers) shut down

An executor is a function, or a class whose instance the daemon keeps (its state lives in the instance,
not in module globals): `train` keeps its swarm peers and verified shards between rounds. Executor modules
are imported on first use, so a worker that never runs `generate` never imports transformers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from swarm.ticket import SignedTicket


class TaskError(ValueError):
    """The task's payload cannot be run here (bad field, missing file): reported as INVALID_TASK."""


class WorkerFault(Exception):
    """This machine cannot run the task's kind, whatever the task (a teacher missing or without a chat template,
    a package not installed): reported as WORKER_FAULT, and the daemon leases the kind no more. The message
    says what to fix, e.g. "teacher 'qwen' has no chat template in /m/tokenizer_config.json"."""


class TaskStopped(Exception):
    """Raised by `TaskContext.check_stop()` when the daemon asks the task to stop (cancel or shutdown)."""


@dataclass
class TaskContext:
    task_id: str
    lease_id: str
    kind: str
    payload: dict[str, Any]
    attempt: int
    work_dir: Path                      # private scratch directory of this task, removed afterwards
    device: str = "cpu"                 # torch device string the task should use, e.g. "cuda:0"
    max_memory_bytes: int = 0           # memory budget for this task (0: no limit given)
    # RegisterResponse.settings (e.g. "run"); "ticket_key": the coordinator's round-ticket key, as pinned in
    # the worker's cache (the daemon refuses to run when the coordinator's key differs from the pinned one)
    settings: dict[str, str] = field(default_factory=dict)
    bootstrap_peers: list[str] = field(default_factory=list)  # hivemind multiaddrs (swarm tasks)
    teachers: dict[str, Path] = field(default_factory=dict)   # teacher model name -> local HF directory
    # directories under which a payload may name local files (teacher `path`, train `data_path`): the
    # volunteer's --allow-local-paths; empty: a payload names no local file
    local_paths: tuple[Path, ...] = ()
    # Fetch a file through the worker's content-addressed cache; returns its local path.
    # fetch(what, name) with what in {"shard", "checkpoint"}.
    fetch: Callable[[str, str], Path] | None = None
    # Report progress in [0, 1]; the heartbeat thread sends the latest value.
    report_progress: Callable[[float], None] = lambda fraction: None
    # True once the daemon wants this task to stop (lease cancelled, SIGTERM).
    stop_requested: Callable[[], bool] = lambda: False
    # Swarm tasks: join(peer_id) joins this task's round as that hivemind peer (the Join RPC, this task's lease):
    # the ticket once the coordinator froze the round's members, not yet verified (swarm.ticket.verify_ticket
    # with settings["ticket_key"]); None while it has not (call again after about 0.5 s) or the coordinator
    # is unreachable; TaskError when the coordinator refuses. None outside a daemon.
    join: Callable[[str], SignedTicket | None] | None = None

    def check_stop(self) -> None:
        if self.stop_requested():
            raise TaskStopped(f"task {self.task_id} asked to stop")


@dataclass
class Result:
    data: bytes = b""                                  # uploaded with Complete (SHA-256 checked)
    metrics: dict[str, float] = field(default_factory=dict)  # checked by the coordinator's validator
    metadata: dict[str, Any] = field(default_factory=dict)   # stored with the result as JSON


Executor = Callable[[TaskContext], Result]

# kind -> (module under worker/executors, its executor: a function, or a class built once per daemon with
# the daemon's Prometheus registry and closed when the daemon exits)
KINDS: dict[str, tuple[str, str]] = {
    "generate": ("generate", "run_generate"),
    "judge": ("judge", "run_judge"),
    "eval": ("eval", "run_eval"),
    "train": ("train", "TrainExecutor"),
}


class Executors:
    """The executors one daemon uses, built on first use."""

    def __init__(self, registry=None):
        self.registry = registry          # the daemon's prometheus_client registry; None: metrics off
        self._built: dict[str, Executor] = {}

    def __call__(self, kind: str) -> Executor:
        """The executor of `kind`. TaskError for a kind this worker does not know."""
        if kind not in self._built:
            if kind not in KINDS:
                raise TaskError(f"this worker has no executor for task kind {kind!r} (known: {', '.join(KINDS)})")
            module, name = KINDS[kind]
            found = getattr(importlib.import_module(f"{__name__}.{module}"), name)
            self._built[kind] = found(self.registry) if isinstance(found, type) else found
        return self._built[kind]

    def close(self) -> None:
        """Release what stateful executors hold (swarm peers: their DHT process and p2pd)."""
        for executor in self._built.values():
            close = getattr(executor, "close", None)
            if close is not None:
                close()


def allowed_local_path(ctx: TaskContext, path: str, what: str) -> Path:
    """`path` from a payload, resolved, if it lies under one of the volunteer's --allow-local-paths; else
    TaskError: a coordinator must not make the worker read (and upload what it learnt from) any local file."""
    resolved = Path(path).expanduser().resolve()
    if not any(resolved.is_relative_to(d) for d in ctx.local_paths):
        allowed = ", ".join(map(str, ctx.local_paths)) or "none"
        raise TaskError(f"{what} names the local path {path!r}, outside the directories this worker allows "
                        f"({allowed}): refused. To let the coordinator name files there, start the worker with "
                        f"--allow-local-paths DIR")
    return resolved


def executor_for(kind: str) -> Executor:
    """A stateless kind's executor (tests and tools; the daemon keeps an `Executors`)."""
    return Executors()(kind)
