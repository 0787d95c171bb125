"""A thin typed client of the Coordinator service, for workers, tests and benchmarks.

    c = CoordinatorClient("127.0.0.1:50051", token="mj_...")
    wid = c.register("host1", speed=1200.0, devices=[("cuda", "RTX 4090", 24 << 30)]).worker_id
    r = c.lease(wid, ["eval"])
    if r.HasField("task"):
        c.complete(r.task.task_id, r.task.lease_id, b"...", metrics={"loss": 2.1, "tokens": 4096})

Every call sends `authorization: Bearer TOKEN` and has a deadline (`timeout`, seconds). Calls that
are safe to repeat (Heartbeat; Join; Complete, idempotent per lease; fetches, resumed at the bytes already
written) retry on UNAVAILABLE — the coordinator restarting — or on its "Concurrent RPC limit exceeded"
(busy) until `retry_for` seconds have passed, then raise. Register, Lease and Fail are not retried:
repeating them could lease twice or count a failure twice, so the caller decides. This module imports
only grpc and the generated protocol, so the worker can use it without the rest of the coordinator.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc

from . import mujina_pb2 as pb
from . import mujina_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

UPLOAD_CHUNK = 1 << 20
INLINE_MAX_BYTES = 1 << 20  # CompleteInline's limit (mujina.proto): larger results go through the Complete stream
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)  # the status meaning "the same request may succeed later"
BUSY = "Concurrent RPC limit exceeded"  # gRPC's RESOURCE_EXHAUSTED past the server's limits.max_concurrent_rpcs


def retryable(err: grpc.RpcError) -> bool:
    """UNAVAILABLE (the coordinator restarting), or the coordinator busy with limits.max_concurrent_rpcs calls
    (gRPC refused this one before reading it; other RESOURCE_EXHAUSTED answers are refusals and final)."""
    code = err.code()
    return code in RETRYABLE or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and BUSY in (err.details() or ""))


class CoordinatorClient:
    def __init__(self, target: str, token: str, *, timeout: float = 30.0, retry_for: float = 60.0,
                 root_certificates: bytes | None = None, tls: bool = False):
        if tls or root_certificates is not None:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates))
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.timeout, self.retry_for = timeout, retry_for
        self.inline = True  # False once the coordinator turned out to predate CompleteInline

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _retrying(self, what: str, fn):
        """Call fn() again on UNAVAILABLE (with back-off) until retry_for seconds have passed."""
        give_up, delay = time.monotonic() + self.retry_for, 0.05
        while True:
            try:
                return fn()
            except grpc.RpcError as err:
                if not retryable(err) or time.monotonic() + delay > give_up:
                    raise
                log.info("%s: coordinator unavailable (%s); retrying in %.2f s", what, err.details(), delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _call(self, rpc, request, timeout):
        return rpc(request, metadata=self.metadata, timeout=timeout or self.timeout)

    # RPCs

    def register(self, name: str, *, speed: float = 0.0, devices: Iterable[tuple[str, str, int]] = (),
                 host_memory_bytes: int = 0, software: dict[str, str] | None = None, kinds: Iterable[str] = (),
                 timeout: float | None = None) -> pb.RegisterResponse:
        caps = pb.Capabilities(devices=[pb.Device(kind=k, name=n, memory_bytes=m) for k, n, m in devices],
                               host_memory_bytes=host_memory_bytes, speed=speed, software=software or {},
                               kinds=list(kinds))
        return self._call(self.stub.Register, pb.RegisterRequest(name=name, capabilities=caps), timeout)

    def heartbeat(self, worker_id: str, leases: Iterable[tuple[str, float]] = (), *,
                  timeout: float | None = None) -> pb.HeartbeatResponse:
        req = pb.HeartbeatRequest(worker_id=worker_id,
                                  leases=[pb.LeaseProgress(lease_id=lid, progress=p) for lid, p in leases])
        return self._retrying("Heartbeat", lambda: self._call(self.stub.Heartbeat, req, timeout))

    def lease(self, worker_id: str, kinds: Iterable[str], *, timeout: float | None = None) -> pb.LeaseResponse:
        return self._call(self.stub.Lease, pb.LeaseRequest(worker_id=worker_id, kinds=list(kinds)), timeout)

    def fail(self, task_id: str, lease_id: str, reason: int = pb.ERROR, message: str = "", *,
             timeout: float | None = None) -> pb.FailResponse:
        return self._call(self.stub.Fail, pb.FailRequest(task_id=task_id, lease_id=lease_id, reason=reason,
                                                         message=message), timeout)

    def join(self, worker_id: str, task_id: str, lease_id: str, peer_id: str, *,
             timeout: float | None = None) -> pb.JoinResponse:
        """Join the swarm round of a leased `train` task as hivemind peer `peer_id` (idempotent; retried on
        UNAVAILABLE). Not `ready`: ask again after `retry_s`; ready: `ticket` and its `signature`."""
        req = pb.JoinRequest(worker_id=worker_id, task_id=task_id, lease_id=lease_id, peer_id=peer_id)
        return self._retrying("Join", lambda: self._call(self.stub.Join, req, timeout))

    def complete(self, task_id: str, lease_id: str, data: bytes = b"", metrics: dict[str, float] | None = None,
                 metadata_json: str = "", *, timeout: float | None = None) -> pb.CompleteResponse:
        """Upload a result (held in memory; results are small) and its metrics; retried on UNAVAILABLE.
        Up to INLINE_MAX_BYTES in one CompleteInline call, larger results as a Complete stream."""
        header = pb.CompleteHeader(task_id=task_id, lease_id=lease_id, size_bytes=len(data),
                                   sha256=hashlib.sha256(data).hexdigest(), metrics=metrics or {},
                                   metadata_json=metadata_json)
        if len(data) <= INLINE_MAX_BYTES and self.inline:
            request = pb.CompleteInlineRequest(header=header, data=data)
            try:
                return self._retrying("Complete", lambda: self._call(self.stub.CompleteInline, request, timeout))
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                log.info("the coordinator has no CompleteInline (an older version): uploading with Complete")
                self.inline = False
        return self._retrying("Complete", lambda: self.complete_raw(self._chunks(header, data), timeout=timeout))

    @staticmethod
    def _chunks(header: pb.CompleteHeader, data: bytes) -> Iterator[pb.CompleteChunk]:
        yield pb.CompleteChunk(header=header)
        for i in range(0, len(data), UPLOAD_CHUNK):
            yield pb.CompleteChunk(data=data[i:i + UPLOAD_CHUNK])

    def complete_raw(self, chunks: Iterable[pb.CompleteChunk], *, timeout: float | None = None) -> pb.CompleteResponse:
        """Send Complete messages as given (no retry): for tests of malformed uploads."""
        return self.stub.Complete(iter(chunks), metadata=self.metadata, timeout=timeout or self.timeout)

    def remote_sha256(self, what: str, name: str, *, timeout: float | None = None) -> str:
        """The SHA-256 the coordinator announces for shards/NAME or checkpoints/NAME, reading one chunk
        of it (a cache asks this before reusing a copy of a file that may have been rewritten)."""
        rpc = {"shard": self.stub.FetchShard, "checkpoint": self.stub.FetchCheckpoint}[what]

        def attempt():
            call = rpc(pb.FetchRequest(name=name, offset=0), metadata=self.metadata, timeout=timeout or self.timeout)
            try:
                return next(iter(call)).sha256
            finally:
                call.cancel()

        return self._retrying(f"Fetch{what.title()} {name}", attempt)

    def fetch(self, what: str, name: str, dest: str | Path, *, timeout: float | None = None) -> Path:
        """Download shards/NAME (what="shard") or checkpoints/NAME (what="checkpoint") into `dest`,
        resuming from the bytes already there, and check its SHA-256. Raises ValueError on a mismatch
        (after deleting the bad file, so the next call starts afresh)."""
        rpc = {"shard": self.stub.FetchShard, "checkpoint": self.stub.FetchCheckpoint}[what]
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)

        def attempt():
            offset = dest.stat().st_size if dest.exists() else 0
            sha = None
            with open(dest, "ab") as f:
                for chunk in rpc(pb.FetchRequest(name=name, offset=offset), metadata=self.metadata,
                                 timeout=timeout or self.timeout):
                    if chunk.offset != f.tell():
                        raise ValueError(f"fetch {name}: chunk at offset {chunk.offset}, expected {f.tell()}")
                    f.write(chunk.data)
                    sha = chunk.sha256
            return sha

        sha = self._retrying(f"Fetch{what.title()} {name}", attempt)
        digest = hashlib.sha256()
        with open(dest, "rb") as f:
            while block := f.read(UPLOAD_CHUNK):
                digest.update(block)
        if digest.hexdigest() != sha:
            dest.unlink()
            raise ValueError(f"fetch {name}: SHA-256 mismatch ({digest.hexdigest()} != {sha}); deleted, fetch again")
        return dest
