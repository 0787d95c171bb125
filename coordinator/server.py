"""The gRPC server: authentication, request checking, uploads and downloads around the Scheduler.

    srv = CoordinatorServer(cfg, db_url="sqlite:///state/coordinator.db", listen="127.0.0.1:0")
    srv.start(); print(srv.port); ...; srv.stop()

Every handler runs inside `_guard`: a RequestError becomes its gRPC status, any other exception
becomes INTERNAL with a log line, so no request can take the server down. A streamed upload (Complete)
is written to results/.tmp/ as it arrives, one at a time per lease, and renamed into results/ inside the
transaction that records it; a CompleteInline (<= 1 MiB) arrives whole. Start-up deletes whatever a crash
left half-way.

Limits (each refused with its status and a message naming it): Lease kinds and Heartbeat entries (below),
Register's sizes (MAX_NAME_CHARS...), live workers per token and failures per token (Scheduler), one
streamed upload per lease (ABORTED), calls in flight (limits.max_concurrent_rpcs: RESOURCE_EXHAUSTED from
gRPC itself). Nothing slow runs on the event loop: file digests are hashed in a thread (once per
file version, cached), and with PostgreSQL the token lookup and every statement run in a thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from sqlalchemy import select

from . import store as S
from .api import mujina_pb2 as pb
from .api import mujina_pb2_grpc as pb_grpc
from .api.client import INLINE_MAX_BYTES
from .config import ProjectConfig
from .metrics import NullMetrics, make_metrics
from .scheduler import Grant, RequestError, Scheduler
from .status_page import StatusPage

JOIN_RETRY_S = 0.5  # JoinResponse.retry_s while a swarm round's members are not frozen yet

log = logging.getLogger(__name__)

SERVICE = "mujina.v1.Coordinator"
CHUNK = 1 << 20          # fetch chunk size; below the default 4 MiB message limit
MAX_METADATA_CHARS = 65536  # Complete's metadata_json; results themselves go in the upload
MAX_KINDS = 32  # Register's capabilities.kinds and Lease's kinds (each 1-64 characters)
MAX_HEARTBEAT_LEASES = 1024  # leases one Heartbeat may renew (a worker holds a few)
# Register's sizes: a worker's description is a few hundred bytes; these bound what one call may store
MAX_NAME_CHARS = 256     # RegisterRequest.name, a device's name, a software version
MAX_KEY_CHARS = 64       # a device's kind, a software entry's name
MAX_DEVICES = 64         # capabilities.devices
MAX_SOFTWARE = 64        # capabilities.software entries
MAX_SHA_CACHE = 4096     # file digests kept (one per file version fetched)
THREAD_BYTES = 64 << 10  # an upload chunk this large is hashed and written in a thread (~1 ms per MiB)
# Bytes a request may have, checked before it is parsed: parsing is the costly part of an oversized
# call (a 4 MiB Heartbeat of 80,000 entries held the event loop and ~25 MB per call in flight before its
# size was refused). Each is several times what the largest valid request needs (a Register with every
# field at its bound is ~45 KB, a Heartbeat of MAX_HEARTBEAT_LEASES leases ~48 KB). Uploads
# (Complete's chunks, CompleteInline) are bounded by limits.max_message_bytes instead.
MAX_REQUEST_BYTES = {"Register": 128 << 10, "Heartbeat": 256 << 10, "Lease": 16 << 10, "Fail": 64 << 10,
                     "Join": 16 << 10, "FetchShard": 16 << 10, "FetchCheckpoint": 16 << 10}
TOKEN_CACHE_S = 5.0      # a revoked token stops working within this many seconds
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class _Oversized:
    """What a request larger than MAX_REQUEST_BYTES[method] is parsed into: its size, nothing else."""
    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size


def _size_checked(parse, limit: int):
    def parse_bounded(data: bytes):
        return parse(data) if len(data) <= limit else _Oversized(len(data))
    return parse_bounded


def add_service(service: CoordinatorService, server) -> None:
    """Serve `service` on `server`: the generated method table, with each request's size checked before it
    is parsed (MAX_REQUEST_BYTES; `_guard` answers an oversized one INVALID_ARGUMENT)."""
    class _Table:   # catches the table the generated code would register
        def add_generic_rpc_handlers(self, handlers):
            pass

        def add_registered_method_handlers(self, service_name, handlers):
            self.handlers = handlers

    table = _Table()
    pb_grpc.add_CoordinatorServicer_to_server(service, table)
    handlers = {name: h._replace(request_deserializer=_size_checked(h.request_deserializer, MAX_REQUEST_BYTES[name]))
                if name in MAX_REQUEST_BYTES else h for name, h in table.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _guard(method):
    """Map RequestError to its status, anything unexpected to INTERNAL; time the call."""
    name = method.__name__
    limit = MAX_REQUEST_BYTES.get(name)

    def _check_size(request) -> None:
        if request.__class__ is _Oversized:
            raise RequestError("INVALID_ARGUMENT", f"a {name} request is {request.size} bytes; at most {limit} "
                               "(refused unread)")

    async def _fail(self, context, exc: BaseException) -> str:
        if isinstance(exc, RequestError):
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.message)
        log.error("%s failed", name, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name}; the coordinator logged it")

    @functools.wraps(method)
    async def unary(self, request, context):
        t0, code = time.perf_counter(), "OK"
        try:
            token = self._cached_token(context) or await self._look_up_token(context)
            _check_size(request)
            return await method(self, token, request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):  # already answered, or the client went away
            code = "CANCELLED"
            raise
        except Exception as exc:
            code = exc.code if isinstance(exc, RequestError) else "INTERNAL"
            await _fail(self, context, exc)
        finally:
            self.metrics.rpc(name, code, time.perf_counter() - t0)

    @functools.wraps(method)
    async def streaming(self, request, context):
        t0, code = time.perf_counter(), "OK"
        try:
            token = self._cached_token(context) or await self._look_up_token(context)
            _check_size(request)
            async for item in method(self, token, request, context):
                yield item
        except (grpc.aio.AbortError, asyncio.CancelledError):
            code = "CANCELLED"
            raise
        except Exception as exc:
            code = exc.code if isinstance(exc, RequestError) else "INTERNAL"
            await _fail(self, context, exc)
        finally:
            self.metrics.rpc(name, code, time.perf_counter() - t0)

    return streaming if name.startswith("Fetch") else unary


def _authorization(context) -> str:
    return next((v for k, v in context.invocation_metadata() or () if k == "authorization"), "")


def _bounded(value: str, field: str, limit: int) -> str:
    if len(value) > limit:
        raise RequestError("INVALID_ARGUMENT", f"{field} is {len(value)} characters; at most {limit}")
    return value


def _sha256_file(path: str, st: os.stat_result) -> str:
    """SHA-256 of a whole file (in a thread: 0.75 s per GiB). Raises DATA_LOSS if it changed meanwhile."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    now = os.stat(path)
    if (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise RequestError("DATA_LOSS", f"{os.path.basename(path)} changed while it was hashed; fetch it again")
    return digest.hexdigest()


def _take(digest, f, data: bytes) -> None:
    digest.update(data)
    f.write(data)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _check_received(h: pb.CompleteHeader, size: int, digest) -> None:
    if size != h.size_bytes:
        raise RequestError("DATA_LOSS", f"upload truncated: received {size} of {h.size_bytes} bytes; send it again")
    if digest.hexdigest() != h.sha256:
        raise RequestError("DATA_LOSS", f"SHA-256 mismatch: received data hashes to {digest.hexdigest()}, "
                           f"header says {h.sha256}; send it again")


def _finite(value: float, field: str, minimum: float = 0.0) -> float:
    if not math.isfinite(value) or value < minimum:
        raise RequestError("INVALID_ARGUMENT", f"{field} must be a finite number >= {minimum}, got {value!r}")
    return value


async def _inline(store: S.Store, fn, *args):
    uses = store.group_uses
    out = fn(*args)
    group = store.pending_commit()
    if group is not None and store.group_uses != uses:  # answer once what this call wrote (or read) is committed
        await asyncio.shield(group)
    return out


async def _in_pool(pool, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, cfg: ProjectConfig, store: S.Store, scheduler: Scheduler, metrics: NullMetrics, joins=None):
        self.cfg, self.store, self.scheduler, self.metrics = cfg, store, scheduler, metrics
        self.joins = joins  # a swarm run's RoundJoins (coordinator/swarm_join.py); None without a swarm section
        self.settings = {"run": cfg.run}  # RegisterResponse.settings
        if joins is not None:
            self.settings["ticket_key"] = joins.key.public_hex  # workers pin it and verify round tickets with it
        # How handlers reach the store, chosen once: SQLite answers in microseconds, so calling it on
        # the event loop is cheapest; PostgreSQL statements are round trips and commits wait for its
        # fsync, which would stall every other RPC (idle heartbeats included), so they run in threads.
        self._pool = None
        if store.is_sqlite:
            self._db = functools.partial(_inline, store)
        else:
            self._pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="store")
            self._db = functools.partial(_in_pool, self._pool)
        self.state_dir = Path(cfg.state_dir)
        self.results_dir = self.state_dir / "results"
        self.tmp_dir = self.results_dir / ".tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_prefix, self._state_prefix = f"{self.tmp_dir}{os.sep}", f"{self.state_dir}{os.sep}"
        self._tokens: dict[str, tuple[str | None, float]] = {}
        self._sha_cache: dict[tuple, asyncio.Future] = {}  # (path, size, mtime_ns) -> its SHA-256 (hex)
        self._uploading: set[str] = set()  # leases with a Complete stream open

    # auth

    def _cached_token(self, context) -> str | None:
        """The token's name from the cache (None: look it up). Cached by the header's value for
        TOKEN_CACHE_S, so a known token costs one dict lookup (no SHA-256, no store) per call."""
        hit = self._tokens.get(_authorization(context))
        if hit is None or hit[1] < time.monotonic():
            return None
        if hit[0] is None:
            raise RequestError("UNAUTHENTICATED", "unknown or revoked token")
        return hit[0]

    async def _look_up_token(self, context) -> str:
        """Look the token up in the store, through `_db`: with PostgreSQL a round trip, so it runs in the
        store's thread pool and never stalls the loop. A revocation (`token revoke`, another process)
        reaches the server when the cached verdict expires, within TOKEN_CACHE_S."""
        value = _authorization(context)
        if not value.startswith("Bearer ") or not value[7:].strip():
            raise RequestError("UNAUTHENTICATED", "missing metadata 'authorization: Bearer TOKEN'; get a token "
                               "from the organizer (`mujina-coordinator token add NAME`)")
        row = await self._db(self.store.token_by_hash, S.hash_token(value[7:].strip()))
        if len(self._tokens) > 10_000:  # bounded: someone may be trying random tokens
            self._tokens.clear()
        self._tokens[value] = (row.name if row else None, time.monotonic() + TOKEN_CACHE_S)
        if row is None:
            raise RequestError("UNAUTHENTICATED", "unknown or revoked token")
        return row.name

    # RPCs

    @_guard
    async def Register(self, token, request, context):
        self.scheduler.room_for_worker(token, time.time())  # a token at its cap is refused before anything is read
        caps = request.capabilities
        _finite(caps.speed, "capabilities.speed")
        _bounded(request.name, "name", MAX_NAME_CHARS)
        if len(caps.devices) > MAX_DEVICES:
            raise RequestError("INVALID_ARGUMENT", f"capabilities.devices: at most {MAX_DEVICES}, got "
                               f"{len(caps.devices)}")
        for d in caps.devices:
            _bounded(d.kind, "capabilities.devices.kind", MAX_KEY_CHARS)
            _bounded(d.name, "capabilities.devices.name", MAX_NAME_CHARS)
        if len(caps.software) > MAX_SOFTWARE:
            raise RequestError("INVALID_ARGUMENT", f"capabilities.software: at most {MAX_SOFTWARE} entries, got "
                               f"{len(caps.software)}")
        for k, v in caps.software.items():
            _bounded(k, "capabilities.software name", MAX_KEY_CHARS)
            _bounded(v, f"capabilities.software[{k!r}]", MAX_NAME_CHARS)
        accel = [d for d in caps.devices if d.kind in ("cuda", "mps")]
        gpu_memory = max((d.memory_bytes for d in accel), default=0)
        if gpu_memory >= 2**63:
            raise RequestError("INVALID_ARGUMENT", "capabilities.devices.memory_bytes is implausibly large")
        cuda = any(d.kind == "cuda" for d in caps.devices)
        if len(caps.kinds) > MAX_KINDS or not all(0 < len(k) <= 64 for k in caps.kinds):
            raise RequestError("INVALID_ARGUMENT", f"capabilities.kinds: at most {MAX_KINDS} names of 1-64 characters")
        record = {"devices": [{"kind": d.kind, "name": d.name, "memory_bytes": d.memory_bytes} for d in caps.devices],
                  "host_memory_bytes": caps.host_memory_bytes, "speed": caps.speed, "software": dict(caps.software),
                  "kinds": sorted(set(caps.kinds))}
        worker_id = await self._db(self.scheduler.register, token, request.name or "unnamed", record, gpu_memory,
                                   cuda, caps.speed)
        log.info("registered worker %s (%s) for %s: gpu_memory=%d cuda=%s speed=%g", worker_id, request.name, token,
                 gpu_memory, cuda, caps.speed)
        return pb.RegisterResponse(worker_id=worker_id, heartbeat_interval_s=self.cfg.leases.heartbeat_interval_s,
                                   lease_duration_s=self.cfg.leases.duration_s,
                                   bootstrap_peers=self.cfg.server.bootstrap_peers, settings=self.settings)

    @_guard
    async def Heartbeat(self, token, request, context):
        if not request.worker_id:
            raise RequestError("INVALID_ARGUMENT", "worker_id is empty")
        if len(request.leases) > MAX_HEARTBEAT_LEASES:
            raise RequestError("INVALID_ARGUMENT", f"a heartbeat renews at most {MAX_HEARTBEAT_LEASES} leases, got "
                               f"{len(request.leases)}")
        progress = []
        for p in request.leases:
            if not math.isfinite(p.progress) or not 0.0 <= p.progress <= 1.0:
                raise RequestError("INVALID_ARGUMENT", f"lease {p.lease_id}: progress must be in [0, 1], "
                                   f"got {p.progress!r}")
            progress.append((p.lease_id, p.progress))
        drain, renewed = await self._db(self.scheduler.heartbeat, token, request.worker_id, progress)
        return pb.HeartbeatResponse(
            directive=pb.DRAIN if drain else pb.CONTINUE,
            leases=[pb.LeaseStatus(lease_id=lid, directive=pb.CONTINUE if ok else pb.CANCEL, deadline=dl)
                    for lid, ok, dl in renewed])

    @_guard
    async def Lease(self, token, request, context):
        if not request.worker_id:
            raise RequestError("INVALID_ARGUMENT", "worker_id is empty")
        kinds = sorted({k for k in request.kinds if k})   # each count of kinds is one cached SQL statement
        if not kinds:
            raise RequestError("INVALID_ARGUMENT", "kinds is empty: name the task kinds this worker runs")
        if len(kinds) > MAX_KINDS or not all(len(k) <= 64 for k in kinds):
            raise RequestError("INVALID_ARGUMENT", f"kinds: at most {MAX_KINDS} names of 1-64 characters")
        out = await self._db(self.scheduler.lease, token, request.worker_id, kinds)
        if isinstance(out, Grant):
            return pb.LeaseResponse(task=pb.Task(task_id=out.task_id, lease_id=out.lease_id, kind=out.kind,
                                                 payload_json=out.payload_json, deadline=out.deadline,
                                                 attempt=out.attempt))
        retry = self.cfg.limits.no_work_retry_s if out.retry_after_s is None else out.retry_after_s
        return pb.LeaseResponse(no_work=pb.NoWork(retry_after_s=retry, reason=out.reason))

    @_guard
    async def Complete(self, token, request_iterator, context):
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise RequestError("INVALID_ARGUMENT", "the first Complete message must be a header")
        return await self._complete(token, first.header, request_iterator)

    @_guard
    async def CompleteInline(self, token, request, context):
        if not request.HasField("header"):
            raise RequestError("INVALID_ARGUMENT", "CompleteInline needs a header")
        if len(request.data) > INLINE_MAX_BYTES:
            raise RequestError("RESOURCE_EXHAUSTED", f"CompleteInline carries at most {INLINE_MAX_BYTES} bytes of "
                               f"data, got {len(request.data)}: upload it with Complete")
        return await self._complete(token, request.header, request.data)

    async def _complete(self, token: str, h: pb.CompleteHeader, rest) -> pb.CompleteResponse:
        """Complete and CompleteInline: `rest` is the stream after the header, or the inline data."""
        if not h.task_id or not h.lease_id:
            raise RequestError("INVALID_ARGUMENT", "header.task_id and header.lease_id are required")
        if not _SHA_RE.match(h.sha256):
            raise RequestError("INVALID_ARGUMENT", "header.sha256 must be 64 lowercase hex digits")
        for k, v in h.metrics.items():
            if not math.isfinite(v):
                raise RequestError("INVALID_ARGUMENT", f"metrics.{k} is {v!r}; numbers must be finite")
        metadata_json = h.metadata_json or "{}"
        if len(metadata_json) > MAX_METADATA_CHARS:
            raise RequestError("INVALID_ARGUMENT", f"metadata_json is {len(metadata_json)} characters; the limit is "
                               f"{MAX_METADATA_CHARS} (put bulk data in the upload itself)")
        try:
            if not isinstance(json.loads(metadata_json), dict):
                raise ValueError("not an object")
        except ValueError as err:  # JSONDecodeError is a ValueError
            raise RequestError("INVALID_ARGUMENT", f"metadata_json must be a JSON object ({err})") from None
        limit = self.cfg.limits.max_upload_bytes
        if h.size_bytes > limit:
            raise RequestError("RESOURCE_EXHAUSTED", f"upload of {h.size_bytes} bytes exceeds the coordinator's "
                               f"limit of {limit} bytes (limits.max_upload_bytes)")
        info = await self._db(self.scheduler.lease_for_complete, token, h.task_id, h.lease_id)
        if info.duplicate is not None:
            d = info.duplicate
            return pb.CompleteResponse(accepted=d.accepted, credited=d.credited, duplicate=True, message=d.message)
        metrics = dict(h.metrics)
        rel = f"results/{h.task_id}.{h.lease_id}.bin"
        if isinstance(rest, bytes):  # CompleteInline: at most INLINE_MAX_BYTES, already whole in memory
            if len(rest) > h.size_bytes:
                raise RequestError("DATA_LOSS", f"upload sent more than the declared {h.size_bytes} bytes")
            _check_received(h, len(rest), hashlib.sha256(rest))
            commit = functools.partial(self._write_result, h.lease_id, rest, rel)
            return await self._record(info, h, metrics, rest, rel, metadata_json, commit)
        # A Complete stream goes to a temporary file as it arrives, so a slow or large upload holds no
        # memory; one at a time per lease (a worker retrying while its first upload still streams is told
        # ABORTED, not buffered twice). Checked after the lease's owner, so nobody else can block it.
        if h.lease_id in self._uploading:
            raise RequestError("ABORTED", f"lease {h.lease_id} already has an upload in flight; one upload per "
                               "lease at a time: wait for the first one's answer")
        self._uploading.add(h.lease_id)
        tmp = f"{self._tmp_prefix}{h.lease_id}.{os.urandom(8).hex()}"
        try:
            digest, size = hashlib.sha256(), 0
            with open(tmp, "wb") as f:
                async for msg in rest:
                    if not msg.HasField("data"):
                        raise RequestError("INVALID_ARGUMENT", "only the first Complete message may be a header")
                    size += len(msg.data)
                    if size > h.size_bytes:
                        raise RequestError("DATA_LOSS", f"upload sent more than the declared {h.size_bytes} bytes")
                    if len(msg.data) < THREAD_BYTES:
                        _take(digest, f, msg.data)
                    else:  # hashing and writing release the GIL: in a thread, the loop serves others meanwhile
                        await asyncio.to_thread(_take, digest, f, msg.data)
            _check_received(h, size, digest)
            # validators read the whole result (bounded by limits.max_upload_bytes, one per lease at a time)
            data = _read(tmp) if size <= CHUNK else await asyncio.to_thread(_read, tmp)
            commit = functools.partial(os.replace, tmp, f"{self._state_prefix}{rel}")
            return await self._record(info, h, metrics, data, rel, metadata_json, commit)
        finally:
            self._uploading.discard(h.lease_id)
            with contextlib.suppress(FileNotFoundError):   # refused, broken off or failed: nothing is kept
                os.unlink(tmp)

    async def _record(self, info, h: pb.CompleteHeader, metrics: dict, data: bytes, rel: str, metadata_json: str,
                      commit_file) -> pb.CompleteResponse:
        """Validate a received upload and record it; `commit_file()` puts it at STATE_DIR/`rel` inside the
        transaction."""
        credits = await self._db(self.scheduler.check_result, info, metrics, data)
        out = await self._db(functools.partial(
            self.scheduler.complete, info, h.sha256, h.size_bytes, rel, metrics, credits, commit_file=commit_file,
            metadata_json=metadata_json, data=data))
        return pb.CompleteResponse(accepted=out.accepted, credited=out.credited, duplicate=out.duplicate,
                                   message=out.message)

    def _write_result(self, lease_id: str, data: bytes, rel: str) -> None:
        """Write an accepted upload to STATE_DIR/`rel` atomically (a temporary file, then a rename).

        No fsync: like the store's synchronous=NORMAL, the file survives a crash or kill -9 of the
        coordinator (it is in the OS cache); a power cut may lose the newest results."""
        # str paths and os calls: pathlib's objects were ~4% of the server's GIL time with small results
        tmp = f"{self._tmp_prefix}{lease_id}.{os.urandom(8).hex()}"  # unique: a lease may be uploading twice
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, f"{self._state_prefix}{rel}")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @_guard
    async def Fail(self, token, request, context):
        if not request.task_id or not request.lease_id:
            raise RequestError("INVALID_ARGUMENT", "task_id and lease_id are required")
        reason = pb.FailReason.Name(request.reason) if request.reason in pb.FailReason.values() else "ERROR"
        if reason == "FAIL_REASON_UNSPECIFIED":
            reason = "ERROR"
        requeued, dead = await self._db(self.scheduler.fail, token, request.task_id, request.lease_id, reason,
                                        request.message)
        return pb.FailResponse(requeued=requeued, dead=dead)

    @_guard
    async def Join(self, token, request, context):
        for name in ("worker_id", "task_id", "lease_id", "peer_id"):
            if not getattr(request, name):
                raise RequestError("INVALID_ARGUMENT", f"{name} is empty")
        if self.joins is None:
            raise RequestError("FAILED_PRECONDITION", f"run {self.cfg.run!r} is not a swarm run: this coordinator's "
                               "project has no `swarm:` section")
        signed = await self._db(self.joins.join, token, request.worker_id, request.task_id, request.lease_id,
                                request.peer_id)
        if signed is None:
            return pb.JoinResponse(ready=False, retry_s=JOIN_RETRY_S)
        return pb.JoinResponse(ready=True, ticket=signed.body, signature=signed.signature)

    async def _serve_file(self, root: str, request):
        name = request.name
        if not _NAME_RE.match(name) or any(part in (".", "..") for part in name.split("/")):
            raise RequestError("INVALID_ARGUMENT", f"name {name!r} must be a relative path of letters, digits "
                               "and ._- (no '..', no leading '/')")
        base = (self.state_dir / root).resolve()
        path = (base / name).resolve()
        if not path.is_relative_to(base) or not path.is_file():
            raise RequestError("NOT_FOUND", f"no {root[:-1]} named {name!r}")
        st = path.stat()
        if request.offset > st.st_size:
            raise RequestError("OUT_OF_RANGE", f"offset {request.offset} is past the end ({st.st_size} bytes)")
        sha = await self._file_sha256(str(path), st)
        loop = asyncio.get_running_loop()
        with open(path, "rb") as f:
            f.seek(request.offset)
            offset = request.offset
            while True:
                # in a thread: a cold read of a large checkpoint may wait for the disk
                data = await loop.run_in_executor(None, f.read, CHUNK)
                if not data and offset < st.st_size:
                    raise RequestError("DATA_LOSS", f"{name} shrank while being read")
                yield pb.FileChunk(offset=offset, data=data, total_size=st.st_size, sha256=sha)
                offset += len(data)
                if offset >= st.st_size:
                    return

    async def _file_sha256(self, path: str, st: os.stat_result) -> str:
        """The file's SHA-256, hashed once per version (path, size, mtime) in a thread; fetches of the same
        file arriving meanwhile (every worker at the start of a round) wait for that one computation."""
        key = (path, st.st_size, st.st_mtime_ns)
        fut = self._sha_cache.get(key)
        if fut is None:
            if len(self._sha_cache) >= MAX_SHA_CACHE:
                self._sha_cache.clear()
            fut = self._sha_cache[key] = asyncio.ensure_future(asyncio.to_thread(_sha256_file, path, st))
        try:
            return await asyncio.shield(fut)   # a fetch that goes away does not cancel the others' hash
        except Exception:   # changed meanwhile, or unreadable: the next fetch hashes it afresh
            self._sha_cache.pop(key, None)
            raise

    @_guard
    async def FetchShard(self, token, request, context):
        async for chunk in self._serve_file("shards", request):
            yield chunk

    @_guard
    async def FetchCheckpoint(self, token, request, context):
        async for chunk in self._serve_file("checkpoints", request):
            yield chunk


def clean_state_dir(store: S.Store, state_dir: Path) -> int:
    """Delete uploads a crash left behind: partial ones in results/.tmp and complete files whose
    transaction never committed. Returns how many files were removed."""
    results_dir = state_dir / "results"
    removed = 0
    for p in (results_dir / ".tmp").glob("*"):
        p.unlink(missing_ok=True)
        removed += 1
    if results_dir.is_dir():
        with store.read() as conn:
            kept = {row[0] for row in conn.execute(select(S.results.c.path))}
        for p in results_dir.glob("*.bin"):
            if f"results/{p.name}" not in kept:
                p.unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("removed %d uploads left half-way by an earlier run", removed)
    return removed


class CoordinatorServer:
    """The whole service: store, scheduler, expiry sweeper, gRPC + health, optional metrics and status page.

    gRPC runs on grpc.aio in an event loop of its own thread: one thread serves every RPC, so calls
    do not queue for a thread pool or fight over the GIL, and a slow upload holds no thread. With
    SQLite the handlers call the store on that thread, and the transactions of one loop turn share
    a commit (Store.group_commits) that each handler awaits before it answers; PostgreSQL calls run
    in a small thread pool. WAL checkpoints run in the sweeper thread."""

    def __init__(self, cfg: ProjectConfig, db_url: str | None = None, listen: str | None = None,
                 metrics_port: int | None = None, tls_cert: Path | None = None, tls_key: Path | None = None,
                 metrics_host: str = "127.0.0.1", http_port: int | None = None, http_host: str = "127.0.0.1"):
        self.cfg = cfg
        self.listen = listen or cfg.server.listen
        self.tls = (tls_cert or cfg.server.tls_cert, tls_key or cfg.server.tls_key)
        if (self.tls[0] is None) != (self.tls[1] is None):
            raise ValueError("--tls-cert and --tls-key go together: give both to serve TLS, or neither")
        Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
        self.store = S.Store.open(db_url or cfg.db_url())
        clean_state_dir(self.store, Path(cfg.state_dir))
        self.metrics = make_metrics(metrics_port, self.store, metrics_host, state_dir=cfg.state_dir, run=cfg.run)
        # The status page runs on threads of its own and only reads the store (coordinator/status_page.py).
        experts = None
        if cfg.swarm is not None:
            from .swarm_driver import expert_holders

            experts = lambda: expert_holders(cfg.state_dir, cfg.run, self._worker_names())  # noqa: E731
        self.status_page = (None if http_port is None
                            else StatusPage(self.store, cfg.run, http_host, http_port, experts=experts))
        self.scheduler = Scheduler(self.store, cfg, self.metrics)
        self.joins = None  # a swarm run's joins and round tickets, signed with a key kept in the state directory
        if cfg.swarm is not None:
            from swarm.ticket import TicketKey

            from .swarm_join import RoundJoins

            key = TicketKey.load_or_create(Path(cfg.state_dir) / "keys" / "ticket_ed25519")
            self.joins = RoundJoins(cfg, self.store, self.scheduler, key)
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="lease-sweeper", daemon=True)
        # uvloop: the handlers and gRPC's callbacks run on this one loop, and uvloop's scheduling costs less
        # than asyncio's (benchmarks/RESULTS.md, coordinator: +2-27% cycles/s in alternating runs)
        self._loop = uvloop.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="grpc-loop", daemon=True)
        self._loop_thread.start()
        try:
            self.port = self._run(self._build())
        except BaseException:
            self._close_loop()
            raise
        if self.port == 0:
            self._close_loop()
            raise OSError(f"cannot listen on {self.listen}: the address is in use or not local")

    def _run(self, coro):
        """Run a coroutine on the server's loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _build(self) -> int:
        opts = [("grpc.max_receive_message_length", self.cfg.limits.max_message_bytes),
                ("grpc.max_send_message_length", self.cfg.limits.max_message_bytes),
                ("grpc.so_reuseport", 0)]
        # calls in flight are bounded (each may hold a message of max_message_bytes); past it gRPC answers
        # RESOURCE_EXHAUSTED before reading the request, and clients retry (coordinator/api/client.py)
        self.server = grpc.aio.server(options=opts, maximum_concurrent_rpcs=self.cfg.limits.max_concurrent_rpcs)
        self.health = HealthServicer()
        self.service = CoordinatorService(self.cfg, self.store, self.scheduler, self.metrics, self.joins)
        if self.store.is_sqlite:  # the handlers' transactions share a commit per loop turn (Store.group_commits)
            self.store.group_commits(asyncio.get_running_loop())
        add_service(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.tls[0]:
            creds = grpc.ssl_server_credentials([(Path(self.tls[1]).read_bytes(), Path(self.tls[0]).read_bytes())])
            return self.server.add_secure_port(self.listen, creds)
        return self.server.add_insecure_port(self.listen)

    def _worker_names(self) -> dict[str, str]:
        """worker id -> the name it registered with (for the status page's expert holders)."""
        with self.store.read() as conn:
            return dict(conn.execute(select(S.workers.c.id, S.workers.c.name)).all())

    def _sweep_loop(self):
        while not self._stop.wait(self.cfg.leases.sweep_interval_s):
            try:
                self.scheduler.flush_seen()
                self.scheduler.sweep_expired()
                self.store.checkpoint()
            except Exception:  # e.g. PostgreSQL restarting: log and try again at the next interval
                log.exception("lease sweep failed; retrying in %.1f s", self.cfg.leases.sweep_interval_s)

    async def _set_health(self, status):
        for svc in ("", SERVICE):
            await self.health.set(svc, status)

    def start(self) -> CoordinatorServer:
        self._run(self.server.start())
        self._sweeper.start()
        if self.status_page is not None:
            try:
                self.status_page.start()
            except OSError:  # its port is taken: stop what started, the caller shows the message
                self.stop(grace=0)
                raise
        self._run(self._set_health(health_pb2.HealthCheckResponse.SERVING))
        log.info("coordinator for run %r serving on %s (port %d, %s, store %s)", self.cfg.run, self.listen,
                 self.port, "TLS" if self.tls[0] else "plaintext",
                 self.store.engine.url.render_as_string(hide_password=True))
        return self

    def drain(self):
        """Stop handing out tasks; heartbeats tell workers to DRAIN."""
        self.scheduler.draining = True
        self._run(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))

    def stop(self, grace: float = 2.0):
        self.drain()
        self._stop.set()
        self._run(self.server.stop(grace))
        self._close_loop()
        if self.service._pool is not None:
            self.service._pool.shutdown(wait=True)
        self.scheduler.flush_seen()
        self.metrics.close()
        if self.status_page is not None:
            self.status_page.stop()
        self.store.close()

    def _close_loop(self):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=10)
        self._loop.close()
