"""The volunteer's daemon: register -> lease -> run -> heartbeat -> complete, politely.

    cfg = WorkerConfig(coordinator="host:50051", token="mj_...", kinds=["generate", "judge"])
    Daemon(cfg).run()          # until SIGTERM, DRAIN-then-stop, or --max-tasks

Behaviour a volunteer can rely on:
  * while the coordinator is unreachable, every call is retried with exponential back-off and jitter
    (no thundering herd when it comes back); finished results are spooled to CACHE_DIR/spool first
    and uploaded when it answers again, also after a restart of the daemon;
  * a heartbeat thread reports progress every heartbeat_interval_s, renews the lease, and obeys
    CANCEL (the task is asked to stop) and DRAIN (nothing new is leased until the coordinator says
    CONTINUE again);
  * SIGTERM (or a first SIGINT): lease nothing more, ask the running task to stop and hand its lease
    back with Fail(SHUTDOWN), so the task is requeued without counting an attempt; a second SIGINT
    aborts at once; the last line logged sums up the tasks done and failed;
  * a fault of this machine (a teacher missing or without a chat template, a package not installed, out of
    memory twice in a row) is reported as Fail(WORKER_FAULT), which counts no attempt; the daemon then
    leases that kind no more and says in one line why and what to fix; with no kind left it stops
    (`run` returns 2). So a misconfigured worker cannot burn through the queue with Lease + Fail;
  * a result whose upload the coordinator answers with an error that may pass (INTERNAL, UNKNOWN,
    UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, RESOURCE_EXHAUSTED from a busy server) stays in the spool and is
    tried again with back-off, also after a restart; a definitive refusal (INVALID_ARGUMENT,
    FAILED_PRECONDITION, NOT_FOUND, PERMISSION_DENIED, RESOURCE_EXHAUSTED for an upload over the coordinator's
    limit, ...) drops it with the reason logged; DATA_LOSS (the upload arrived damaged) is tried
    DATA_LOSS_TRIES times;
  * outside --active-hours it leases nothing; one log line always says why the daemon is idle;
  * the coordinator's round-ticket key (RegisterResponse.settings["ticket_key"]) is pinned in
    CACHE_DIR/coordinator_ticket_key at the first Register; a coordinator that later names another key is
    refused (delete the file if the organizer rotated it). Swarm tasks join their round through
    TaskContext.join (the Join RPC).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from coordinator.api import mujina_pb2 as pb
from coordinator.api.client import retryable

from .cache import DownloadRefused, FileCache
from .executors import KINDS, Executors, TaskContext, TaskError, TaskStopped, WorkerFault
from .hardware import cached_benchmark, parse_size, probe_devices
from .metrics import NullMetrics, make_metrics
from .transport import check_address, check_transport, coordinator_client

log = logging.getLogger(__name__)

TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Complete answers after which the result stays in the spool: the coordinator may take it later (a database
# restarting answers INTERNAL; ABORTED: another upload of the lease is in flight), and so does a busy server
# (RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded", client.retryable). Any other code is a refusal, the
# coordinator's other RESOURCE_EXHAUSTED (an upload over limits.max_upload_bytes) included.
UPLOAD_KEPT = (*TRANSIENT, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED,
               grpc.StatusCode.CANCELLED)
DATA_LOSS_TRIES = 3   # uploads answered DATA_LOSS (arrived damaged) before the result is dropped
OOM_IN_A_ROW = 2      # out-of-memory failures of one kind in a row that make it a fault of this machine
TICKET_KEY_FILE = "coordinator_ticket_key"  # in the cache dir: the coordinator's round-ticket key, pinned


def parse_active_hours(text: str | None) -> tuple[int, int] | None:
    """'22:00-07:00' -> (1320, 420): minutes after local midnight of start and end; may wrap midnight."""
    if not text:
        return None
    try:
        a, b = text.split("-")
        start, end = (int(h) * 60 + int(m) for h, m in (a.strip().split(":"), b.strip().split(":")))
    except ValueError:
        raise ValueError(f"--active-hours {text!r}: write HH:MM-HH:MM, e.g. 22:00-07:00") from None
    if not (0 <= start < 1440 and 0 <= end < 1440) or start == end:
        raise ValueError(f"--active-hours {text!r}: times must be 00:00..23:59 and differ")
    return start, end


def seconds_until_active(hours: tuple[int, int] | None, now: dt.datetime) -> float:
    """0 inside the active window (or without one), else seconds until it opens."""
    if hours is None:
        return 0.0
    start, end = hours
    minute = now.hour * 60 + now.minute + now.second / 60
    inside = start <= minute < end if start < end else (minute >= start or minute < end)
    if inside:
        return 0.0
    return ((start - minute) % 1440) * 60


@dataclass
class WorkerConfig:
    coordinator: str
    token: str
    name: str = field(default_factory=socket.gethostname)
    devices: list[str] | None = None            # e.g. ["cuda:0"]; None: the first device found
    max_gpu_memory: int = 0                     # bytes a task may use on the device (0: all of it)
    active_hours: tuple[int, int] | None = None
    kinds: list[str] = field(default_factory=lambda: ["generate", "judge", "eval"])
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "mujina")
    max_disk: int = 50 << 30
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"             # address the metrics port listens on (0.0.0.0: every interface)
    max_tasks: int | None = None                # stop after this many tasks (tests, benchmarks)
    teachers: dict[str, Path] = field(default_factory=dict)
    benchmark: bool = True                      # measure speed (cached) and send it at Register
    backoff_max_s: float = 60.0                 # longest wait between tries while the coordinator is away
    tls: bool = False                           # talk to the coordinator over TLS
    ca_cert: Path | None = None                 # the CA (or self-signed) certificate to trust; None: the system's
    insecure: bool = False                      # allow plaintext to a non-loopback coordinator (token in the clear)
    # directories under which a task's payload may name local files (a teacher's `path`); none by default
    allow_local_paths: list[Path] = field(default_factory=list)

    KEYS = ("coordinator", "token", "name", "devices", "max_gpu_memory", "active_hours", "kinds", "cache_dir",
            "max_disk", "metrics_port", "metrics_host", "max_tasks", "teachers", "benchmark", "backoff_max_s", "tls",
            "ca_cert", "insecure", "allow_local_paths")

    def __post_init__(self):
        check_address(self.coordinator)
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"--kinds {','.join(unknown) or '(empty)'}: no such task kind; known: {', '.join(KINDS)}")
        self.kinds = list(dict.fromkeys(self.kinds))
        dirs = []
        for d in self.allow_local_paths:
            if not Path(d).expanduser().is_dir():
                raise ValueError(f"--allow-local-paths {d}: no such directory")
            dirs.append(Path(d).expanduser().resolve())
        self.allow_local_paths = dirs

    @classmethod
    def load(cls, path: str | os.PathLike | None, **overrides) -> WorkerConfig:
        """worker.toml (same keys as the options, with _ or -) overridden by options that were given."""
        import tomllib

        data: dict = {}
        if path is not None:
            try:
                data = {k.replace("-", "_"): v for k, v in tomllib.loads(Path(path).read_text()).items()}
            except FileNotFoundError:
                raise ValueError(f"worker config {path} not found") from None
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: not valid TOML ({e})") from None
            unknown = sorted(set(data) - set(cls.KEYS))
            if unknown:
                raise ValueError(f"{path}: unknown keys {unknown}; known: {', '.join(cls.KEYS)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("coordinator", "token"):
            if not data.get(key):
                raise ValueError(f"--{key} is required (or `{key} = ...` in worker.toml)")
        if isinstance(data.get("devices"), str):
            data["devices"] = [d for d in data["devices"].split(",") if d]
        if isinstance(data.get("kinds"), str):
            data["kinds"] = [k for k in data["kinds"].split(",") if k]
        if isinstance(data.get("active_hours"), str):
            data["active_hours"] = parse_active_hours(data["active_hours"])
        for key in ("max_gpu_memory", "max_disk"):
            if key in data:
                data[key] = parse_size(data[key])
        if "cache_dir" in data:
            data["cache_dir"] = Path(data["cache_dir"]).expanduser()
        if "teachers" in data:
            if not isinstance(data["teachers"], dict):
                raise ValueError("teachers must be a table of NAME = PATH")
            data["teachers"] = {k: Path(v).expanduser() for k, v in data["teachers"].items()}
        if data.get("ca_cert") is not None:
            data["ca_cert"] = Path(data["ca_cert"]).expanduser()
        if isinstance(data.get("allow_local_paths"), str):
            data["allow_local_paths"] = [data["allow_local_paths"]]
        if "allow_local_paths" in data:
            data["allow_local_paths"] = [Path(d) for d in data["allow_local_paths"]]
        check_address(data["coordinator"])
        check_transport(data["coordinator"], bool(data.get("tls")), data.get("ca_cert"), bool(data.get("insecure")))
        return cls(**data)


class Backoff:
    """Exponential back-off with full jitter: base * 2^n, capped, times a random factor in [0.5, 1)."""

    def __init__(self, base: float = 0.5, cap: float = 60.0):
        self.base, self.cap, self.n = base, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2 ** self.n) * random.uniform(0.5, 1.0)
        self.n += 1
        return delay

    def reset(self) -> None:
        self.n = 0


ID = re.compile(r"[A-Za-z0-9_-]{1,64}")   # a task or lease id as the coordinator makes them (32 hex digits)


def check_id(what: str, value: str) -> str:
    """An id from the network, before it names a file: a malicious coordinator's `../../x` is refused."""
    if not isinstance(value, str) or not ID.fullmatch(value):
        raise ValueError(f"the coordinator sent a malformed {what} {value[:80]!r}: refusing the task")
    return value


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class Spool:
    """Finished results waiting for the coordinator: LEASE.bin (the data) + LEASE.json (the rest, with the data's
    SHA-256 under "sha256").

    Both are fsynced; the .json is written last and atomically, so an entry is either complete or ignored.
    A lease id that could name a path outside the spool is refused; an entry that does not read back (a
    torn write, a disk error, an edited file, data that does not hash to its header's SHA-256) is moved to
    `corrupt/` with a warning, never uploaded and never a crash at start. An entry written before headers
    carried the SHA-256 is uploaded unchecked (the coordinator checks what it receives against what is sent)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def put(self, header: dict, data: bytes) -> Path:
        lease = check_id("lease id", header["lease_id"])
        header = {**header, "sha256": hashlib.sha256(data).hexdigest()}
        _write_synced(self.root / f"{lease}.bin", data)
        tmp = self.root / f"{lease}.json.tmp"
        _write_synced(tmp, json.dumps(header).encode())
        os.replace(tmp, self.root / f"{lease}.json")
        return self.root / f"{lease}.json"

    def entries(self) -> list[tuple[dict, bytes]]:
        out = []
        for p in sorted(self.root.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                header = json.loads(p.read_text())
                if not isinstance(header, dict) or check_id("lease id", header.get("lease_id", "")) != p.stem:
                    raise ValueError("its lease id is not its file name")
                data = (self.root / f"{p.stem}.bin").read_bytes()
                if "sha256" in header and hashlib.sha256(data).hexdigest() != header["sha256"]:
                    raise ValueError(f"its data does not hash to its header's SHA-256 {str(header['sha256'])[:16]}")
                out.append((header, data))
            except (OSError, ValueError) as e:
                self._set_aside(p.stem, e)
        return out

    def _set_aside(self, stem: str, why: Exception) -> None:
        corrupt = self.root / "corrupt"
        corrupt.mkdir(exist_ok=True)
        for suffix in (".json", ".bin"):
            src = self.root / f"{stem}{suffix}"
            if src.exists():
                os.replace(src, corrupt / src.name)
        log.warning("spool entry %s does not read back (%s): moved to %s, not uploaded", stem, why, corrupt)

    def remove(self, lease_id: str) -> None:
        lease_id = check_id("lease id", lease_id)
        (self.root / f"{lease_id}.json").unlink(missing_ok=True)
        (self.root / f"{lease_id}.bin").unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(list(self.root.glob("*.json")))


def _missing_package(err: ImportError) -> str:
    """A missing dependency, in words a volunteer can act on."""
    name = (err.name or "").split(".")[0]
    return f"a package is missing: {err} (pip install {name})" if name else f"a package is missing: {err}"


class Progress:
    """A progress bar with ETA on a terminal; plain log lines at every quarter otherwise."""

    def __init__(self, label: str, tty: bool | None = None):
        self.label, self.t0, self.fraction, self.logged = label, time.monotonic(), 0.0, 0
        self.tty = sys.stderr.isatty() if tty is None else tty

    def update(self, fraction: float) -> None:
        self.fraction = min(max(float(fraction), 0.0), 1.0)
        elapsed = time.monotonic() - self.t0
        eta = elapsed / self.fraction * (1 - self.fraction) if self.fraction > 0 else float("nan")
        eta_s = f"{eta:.0f}s" if eta == eta else "?"
        if self.tty:
            bar = "#" * int(30 * self.fraction)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {100 * self.fraction:5.1f}% ETA {eta_s}  ")
            sys.stderr.flush()
        elif int(self.fraction * 4) > self.logged:
            self.logged = int(self.fraction * 4)
            log.info("%s: %.0f%% done, ETA %s", self.label, 100 * self.fraction, eta_s)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


class Daemon:
    def __init__(self, cfg: WorkerConfig, metrics: NullMetrics | None = None):
        self.cfg = cfg
        self.client = coordinator_client(cfg.coordinator, cfg.token, cfg.tls, cfg.ca_cert, timeout=30.0,
                                         retry_for=1.0)
        self.metrics = metrics or make_metrics(cfg.metrics_port, cfg.metrics_host, kinds=tuple(cfg.kinds))
        self.executors = Executors(self.metrics.registry)
        self.kinds = list(cfg.kinds)        # what Lease asks for: the configured kinds less those this machine lacks
        self.outcomes: dict[str, int] = {}  # tasks by outcome, for the summary at exit
        self._ooms: dict[str, int] = {}     # kind -> out-of-memory failures in a row
        self._retry_at: dict[str, tuple[float, Backoff, int]] = {}  # kept lease -> (next try, back-off, DATA_LOSSes)
        self._t0 = time.monotonic()
        if "train" in cfg.kinds:
            # built now: swarm rounds record mujina_swarm_* into the daemon's registry (worker/metrics.py
            # SwarmMetrics), every series present from start-up
            try:
                self.executors("train")
            except ImportError as err:
                self._drop_kind("train", _missing_package(err))
        self.probe = probe_devices(cfg.devices)
        self.device = self.probe.devices[0]
        if "train" in cfg.kinds and self.device.torch_device == "cpu":
            from swarm.memory import pin_allocator

            pin_allocator()  # RSS follows live tensors, as the coordinator's memory model assumes
        cfg.cache_dir.mkdir(parents=True, exist_ok=True)
        self.cache = FileCache(cfg.cache_dir / "files", cfg.max_disk, self.client)
        self.spool = Spool(cfg.cache_dir / "spool")
        self.stopping = threading.Event()   # set by SIGTERM / SIGINT: lease nothing more
        self.draining = False               # set by a DRAIN heartbeat: lease nothing until CONTINUE
        self.worker_id = ""
        self.heartbeat_interval = 10.0
        self.settings: dict[str, str] = {}
        self.bootstrap_peers: list[str] = []
        self.tasks_ended = 0
        self._idle_reason: str | None = None
        self._backoff = Backoff(cap=cfg.backoff_max_s)

    # plumbing

    def _drop_kind(self, kind: str, why: str) -> None:
        """Lease `kind` no more: this machine cannot run it. One line says why and what to do."""
        if kind in self.kinds:
            self.kinds.remove(kind)
            why = " ".join(why.split())  # one line, whatever the exception's message held
            log.error("%s: %s; fix it or run without --kinds %s", kind, why, kind)

    def _count(self, kind: str, outcome: str, seconds: float, tokens: float = 0.0) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.metrics.task_done(kind, outcome, seconds, tokens if outcome == "completed" else 0.0)

    def summary(self) -> str:
        """One line on what this run of the daemon did."""
        done = ", ".join(f"{self.outcomes.get(o, 0)} {o}" for o in ("completed", "failed", "cancelled", "refused"))
        waiting = len(self.spool)
        return (f"stopped after {time.monotonic() - self._t0:.1f} s: tasks {done}"
                + (f"; {waiting} result(s) wait in {self.spool.root} for the next start" if waiting else ""))

    def request_stop(self, why: str) -> None:
        if not self.stopping.is_set():
            log.info("%s: leasing nothing more; the current task is asked to stop and its lease handed back", why)
        self.stopping.set()

    def _idle(self, state: str, reason: str) -> None:
        self.metrics.state(state)
        if reason != self._idle_reason:
            log.info("idle: %s", reason)
            self._idle_reason = reason

    def _sleep(self, seconds: float) -> None:
        self.stopping.wait(seconds)

    def _retry(self, what: str, fn):
        """fn() until it succeeds, waiting with back-off while the coordinator is unreachable.
        Returns None if the daemon is asked to stop meanwhile; other errors propagate."""
        while True:
            try:
                out = fn()
                self._backoff.reset()
                return out
            except grpc.RpcError as err:
                if err.code() not in TRANSIENT:
                    raise
                delay = self._backoff.next()
                self._idle("backoff", f"coordinator {self.cfg.coordinator} unreachable during {what} "
                           f"({err.code().name}); retrying with back-off (now {delay:.1f} s)")
                if self.stopping.is_set():
                    return None
                self._sleep(delay)

    def register(self) -> bool:
        speed = cached_benchmark(self.cfg.cache_dir, self.device) if self.cfg.benchmark else 0.0
        mem = self.device.memory_bytes
        if self.cfg.max_gpu_memory:
            mem = min(mem, self.cfg.max_gpu_memory)
        devices = [(self.device.kind, self.device.name, mem)]
        r = self._retry("Register", lambda: self.client.register(
            self.cfg.name, speed=speed, devices=devices, host_memory_bytes=self.probe.host_memory_bytes,
            software=self.probe.software, kinds=self.cfg.kinds))
        if r is None:
            return False
        self.worker_id, self.heartbeat_interval = r.worker_id, r.heartbeat_interval_s
        self.settings, self.bootstrap_peers = self._pin_ticket_key(dict(r.settings)), list(r.bootstrap_peers)
        log.info("registered as worker %s with %s (%s, %.1f GiB), speed %.0f tokens/s, kinds %s", self.worker_id,
                 self.device.torch_device, self.device.name, mem / 2**30, speed, ",".join(self.cfg.kinds))
        return True

    def _pin_ticket_key(self, settings: dict[str, str]) -> dict[str, str]:
        """Pin the coordinator's round-ticket key (settings["ticket_key"]) in the cache the first time; refuse a
        later Register that names another. settings["ticket_key"] is then the pinned key, also when a Register
        answer carries none: the only key this worker verifies tickets with."""
        path = self.cfg.cache_dir / TICKET_KEY_FILE
        pinned = path.read_text().strip() if path.exists() else None
        got = settings.get("ticket_key")
        if got is not None and not re.fullmatch(r"[0-9a-f]{64}", got):
            raise ValueError(f"the coordinator's ticket key {got[:80]!r} is not a hex Ed25519 public key: is "
                             f"{self.cfg.coordinator} a mujina coordinator?")
        if got is not None and pinned is None:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(got + "\n")
            os.replace(tmp, path)
            log.info("pinned the coordinator's round-ticket key %s in %s", got, path)
            pinned = got
        elif got is not None and got != pinned:
            raise ValueError(f"the coordinator's round-ticket key {got} is not the one pinned in {path} ({pinned}): "
                             "refusing to run, since tickets signed with another key could put this worker in "
                             "anyone's averaging group. If the organizer rotated the key (or you now work for "
                             f"another coordinator), delete {path} and start again")
        if pinned is not None:
            settings["ticket_key"] = pinned
        return settings

    # the loop

    def run(self) -> int:
        """Work until asked to stop: 0, or 2 when no configured kind can run on this machine."""
        try:
            if not self.kinds:
                return self._nothing_to_run()
            if not self.register():
                return 0
            while not self.stopping.is_set():
                if not self.kinds:
                    self.flush_spool(final=True)
                    return self._nothing_to_run()
                self.flush_spool()
                if self.cfg.max_tasks is not None and self.tasks_ended >= self.cfg.max_tasks:
                    break
                wait = seconds_until_active(self.cfg.active_hours, dt.datetime.now())
                if wait > 0:
                    self._idle("outside_active_hours", f"outside the active hours; they start in {wait / 60:.0f} min")
                    self._sleep(min(wait, 60.0))
                    continue
                if self.draining:
                    self._idle("draining", "the coordinator asked workers to drain; waiting until it says continue")
                    self._sleep(self.heartbeat_interval)
                    self._worker_heartbeat()
                    continue
                resp = self._lease()
                if resp is None:
                    continue
                if resp.HasField("no_work"):
                    self._idle("waiting_for_work", f"no work: {resp.no_work.reason}")
                    self._sleep(resp.no_work.retry_after_s)
                    continue
                self._idle_reason = None
                self.run_task(resp.task)
            self.flush_spool(final=True)
        finally:
            self.executors.close()  # swarm peers (DHT, p2pd) leave cleanly
            self.client.close()
            self.metrics.close()
            log.info("%s", self.summary())
        return 0

    def _nothing_to_run(self) -> int:
        log.error("no task kind left that this worker can run (configured: %s): stopping; see the lines above "
                  "for what to fix", ",".join(self.cfg.kinds))
        return 2

    def _lease(self):
        try:
            return self._retry("Lease", lambda: self.client.lease(self.worker_id, self.kinds))
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:  # the coordinator forgot us (new store): register again
                log.info("coordinator does not know worker %s: registering again", self.worker_id)
                self.register()
                return None
            raise

    def _worker_heartbeat(self) -> None:
        try:
            r = self.client.heartbeat(self.worker_id, [])
            self.draining = r.directive == pb.DRAIN
        except grpc.RpcError as err:
            log.debug("heartbeat failed: %s", err.code().name)

    # one task

    def run_task(self, task) -> None:
        try:   # before they name a work dir or a spool file
            check_id("task id", task.task_id)
            check_id("lease id", task.lease_id)
        except ValueError as e:   # nothing to give back: its ids cannot be trusted in a Fail either
            log.error("%s", e)
            self._sleep(self._backoff.next())
            return
        if task.kind not in self.kinds:   # a coordinator may not choose what runs on this machine
            log.warning("the coordinator leased a %s task (%s); this worker runs only %s: given back",
                        task.kind, task.task_id, ",".join(self.kinds))
            self._give_back(task, pb.INVALID_TASK, f"this worker asked for kinds {','.join(self.kinds)}, "
                            f"not {task.kind!r}")
            self.tasks_ended += 1
            return
        self.metrics.state("running")
        log.info("running %s task %s (attempt %d)", task.kind, task.task_id, task.attempt)
        cancel, done = threading.Event(), threading.Event()
        progress = Progress(f"{task.kind} {task.task_id[:8]}")
        work_dir = Path(tempfile.mkdtemp(prefix=f"task-{task.task_id[:8]}-", dir=self.cfg.cache_dir))
        beat = threading.Thread(target=self._heartbeat_loop, args=(task.lease_id, progress, cancel, done),
                                name="heartbeat", daemon=True)
        t0 = time.monotonic()
        outcome, tokens = "failed", 0.0
        try:
            try:
                payload = json.loads(task.payload_json or "{}")
            except json.JSONDecodeError as err:
                self._give_back(task, pb.INVALID_TASK, f"payload_json is not JSON: {err}")
                return
            ctx = TaskContext(task_id=task.task_id, lease_id=task.lease_id, kind=task.kind, payload=payload,
                              attempt=task.attempt, work_dir=work_dir, device=self.device.torch_device,
                              max_memory_bytes=self.cfg.max_gpu_memory, settings=self.settings,
                              bootstrap_peers=self.bootstrap_peers, teachers=self.cfg.teachers,
                              local_paths=tuple(self.cfg.allow_local_paths),
                              fetch=self.cache.fetch, report_progress=progress.update,
                              stop_requested=lambda: self.stopping.is_set() or cancel.is_set(),
                              join=functools.partial(self._join, task))
            beat.start()
            try:
                result = self.executors(task.kind)(ctx)
            except TaskStopped:
                outcome = "cancelled"
                if cancel.is_set():
                    log.info("task %s cancelled by the coordinator", task.task_id)
                else:
                    self._give_back(task, pb.SHUTDOWN, "the worker is shutting down")
                return
            except TaskError as err:
                log.warning("task %s cannot run here: %s", task.task_id, err)
                self._give_back(task, pb.INVALID_TASK, str(err))
                return
            except (WorkerFault, ImportError) as err:  # this machine, not the task: no attempt counted
                why = str(err) if isinstance(err, WorkerFault) else _missing_package(err)
                self._give_back(task, pb.WORKER_FAULT, why)
                self._drop_kind(task.kind, why)
                return
            except Exception as err:
                import torch

                if isinstance(err, DownloadRefused):  # the coordinator's fault, said in its message
                    log.error("task %s failed: %s", task.task_id, err)
                    self._give_back(task, pb.ERROR, f"{type(err).__name__}: {err}")
                    return
                if not isinstance(err, torch.OutOfMemoryError):
                    log.exception("task %s failed", task.task_id)
                    self._give_back(task, pb.ERROR, f"{type(err).__name__}: {err}")
                    return
                # the task may fit a bigger machine (OUT_OF_MEMORY keeps it from this token only); twice in a row,
                # this machine's memory is the fault
                self._ooms[task.kind] = self._ooms.get(task.kind, 0) + 1
                log.warning("task %s ran out of memory on %s: %s", task.task_id, self.device.torch_device,
                            str(err).splitlines()[0] if str(err) else "")
                self._give_back(task, pb.OUT_OF_MEMORY, f"{type(err).__name__}: {err}")
                if self._ooms[task.kind] >= OOM_IN_A_ROW:
                    self._drop_kind(task.kind, f"out of memory {OOM_IN_A_ROW} times in a row on "
                                    f"{self.device.torch_device}: free memory on it or pass a lower --max-gpu-memory")
                return
            self._ooms.pop(task.kind, None)
            tokens = float(result.metrics.get("output_tokens", 0.0))
            header = {"task_id": task.task_id, "lease_id": task.lease_id, "kind": task.kind,
                      "metrics": result.metrics, "metadata": result.metadata, "seconds": time.monotonic() - t0}
            self.spool.put(header, result.data)
            outcome = self._upload(header, result.data) or "pending"
        finally:
            done.set()
            progress.close()
            shutil.rmtree(work_dir, ignore_errors=True)
            self.tasks_ended += 1
            if outcome != "pending":  # a spooled result is counted when its upload is answered
                self._count(task.kind, outcome, time.monotonic() - t0, tokens)
            self.metrics.pending_uploads(len(self.spool))

    def _heartbeat_loop(self, lease_id: str, progress: Progress, cancel: threading.Event,
                        done: threading.Event) -> None:
        while not done.wait(self.heartbeat_interval):
            try:
                r = self.client.heartbeat(self.worker_id, [(lease_id, progress.fraction)], timeout=10.0)
            except grpc.RpcError as err:
                log.info("heartbeat failed (%s); the lease lives until its deadline, retrying", err.code().name)
                continue
            if r.directive == pb.DRAIN and not self.draining:
                log.info("the coordinator asked to drain: finishing this task, then leasing nothing new")
                self.draining = True
            if r.leases and r.leases[0].directive == pb.CANCEL and not cancel.is_set():
                log.info("lease %s cancelled by the coordinator (expired or done elsewhere): stopping the task",
                         lease_id)
                cancel.set()

    def _join(self, task, peer_id: str):
        """TaskContext.join of `task`: its round ticket (swarm.ticket.SignedTicket, unverified) once the
        coordinator froze the round's members; None before, or while the coordinator is unreachable (the task
        asks again); TaskError with the coordinator's reason when it refuses."""
        from swarm.ticket import SignedTicket

        try:
            r = self.client.join(self.worker_id, task.task_id, task.lease_id, peer_id, timeout=10.0)
        except grpc.RpcError as err:
            if err.code() in TRANSIENT:
                log.info("Join of task %s: coordinator unreachable (%s); asking again", task.task_id, err.code().name)
                return None
            raise TaskError(f"the coordinator refused task {task.task_id}'s Join as peer {peer_id}: "
                            f"{err.code().name}: {err.details()}") from None
        return SignedTicket(r.ticket, r.signature) if r.ready else None

    def _give_back(self, task, reason: int, message: str) -> None:
        try:
            r = self.client.fail(task.task_id, task.lease_id, reason, message[:2000], timeout=10.0)
            log.info("gave lease %s back (%s): requeued=%s dead=%s", task.lease_id, pb.FailReason.Name(reason),
                     r.requeued, r.dead)
        except grpc.RpcError as err:  # the lease expires on its own; nothing else to do
            log.info("could not give lease %s back (%s): it will expire", task.lease_id, err.code().name)

    def _upload(self, header: dict, data: bytes) -> str | None:
        """Complete one spooled result: 'completed', 'refused' (removed from the spool), or None (kept, and tried
        again by flush_spool once its back-off has passed)."""
        lease = header["lease_id"]
        try:
            r = self.client.complete(header["task_id"], lease, data, header["metrics"],
                                     json.dumps(header["metadata"]), timeout=120.0)
        except grpc.RpcError as err:
            code = err.code()
            _, backoff, losses = self._retry_at.get(lease, (0.0, Backoff(cap=self.cfg.backoff_max_s), 0))
            losses += code == grpc.StatusCode.DATA_LOSS
            if code in UPLOAD_KEPT or retryable(err) or 0 < losses < DATA_LOSS_TRIES:
                delay = backoff.next()
                self._retry_at[lease] = (time.monotonic() + delay, backoff, losses)
                log.info("result of task %s kept on disk, tried again in %.0f s: the coordinator answered %s (%s)",
                         header["task_id"], delay, code.name, err.details())
                return None
            log.warning("result of task %s refused, dropped from the spool: %s: %s", header["task_id"], code.name,
                        err.details())
            self._forget(lease)
            return "refused"
        self._forget(lease)
        log.info("task %s %s: %s", header["task_id"], "accepted" if r.accepted else "not accepted", r.message)
        return "completed" if r.accepted else "refused"

    def _forget(self, lease_id: str) -> None:
        self.spool.remove(lease_id)
        self._retry_at.pop(lease_id, None)

    def flush_spool(self, final: bool = False) -> None:
        """Upload results spooled while the coordinator was away (or by an earlier run of the daemon): each whose
        back-off has passed (every one when `final`), without waiting for the others."""
        now = time.monotonic()
        for header, data in self.spool.entries():
            if header.get("seconds") is None:
                continue
            if not final and self._retry_at.get(header["lease_id"], (0.0,))[0] > now:
                continue
            outcome = self._upload(header, data)
            if outcome is None:
                continue
            self._count(header["kind"], outcome, header["seconds"], header["metrics"].get("output_tokens", 0.0))
        self.metrics.pending_uploads(len(self.spool))
