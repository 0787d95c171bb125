"""A coordinator that lies, for the worker's tests: a real gRPC server implementing the Coordinator service
(started by the `serve` fixture in tests/worker/conftest.py), honest where a case does not need a lie."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import grpc

from coordinator.api import mujina_pb2 as pb
from coordinator.api import mujina_pb2_grpc as pb_grpc

MiB = 1 << 20


def honest(path: Path):
    """A file streamed as the real coordinator does (1 MiB chunks, true size and digest)."""
    def stream(request):
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        for off in range(request.offset, max(len(data), 1), MiB):
            yield pb.FileChunk(offset=off, data=data[off:off + MiB], total_size=len(data), sha256=sha)
    return stream


def lying(total_size: int | list[int], chunks: list[bytes], sha256: str = "0" * 64):
    """A stream that announces `total_size` (a list: one per chunk) and sends `chunks` whatever it announced."""
    def stream(request):
        off = 0
        for i, data in enumerate(chunks):
            total = total_size[i] if isinstance(total_size, list) else total_size
            yield pb.FileChunk(offset=off, data=data, total_size=total, sha256=sha256)
            off += len(data)
    return stream


class Hostile(pb_grpc.CoordinatorServicer):
    """Leases `tasks` ((kind, payload) or a pb.Task) once each to whoever asks for their kind; records Fail and
    Complete; streams files[name]; answers Complete with `complete_code` (None: accept)."""

    def __init__(self, tasks=(), files=None, complete_code=None, any_kind=False):
        self.tasks, self.files, self.complete_code = list(tasks), files or {}, complete_code
        self.any_kind = any_kind  # lease tasks whatever kinds the worker asked for
        self.fails: list[tuple[str, str]] = []
        self.completes: list[pb.CompleteHeader] = []
        self.served: list[str] = []

    def Register(self, request, context):
        return pb.RegisterResponse(worker_id="w" * 32, heartbeat_interval_s=5.0, lease_duration_s=60.0)

    def Heartbeat(self, request, context):
        return pb.HeartbeatResponse(directive=pb.CONTINUE, leases=[
            pb.LeaseStatus(lease_id=x.lease_id, directive=pb.CONTINUE) for x in request.leases])

    def Lease(self, request, context):
        for i, t in enumerate(self.tasks):
            task = t if isinstance(t, pb.Task) else pb.Task(
                task_id=uuid.uuid4().hex, lease_id=uuid.uuid4().hex, kind=t[0], payload_json=json.dumps(t[1]),
                attempt=1)
            if task.kind in request.kinds or self.any_kind:
                del self.tasks[i]
                return pb.LeaseResponse(task=task)
        return pb.LeaseResponse(no_work=pb.NoWork(retry_after_s=0.1, reason="nothing for you"))

    def Fail(self, request, context):
        self.fails.append((pb.FailReason.Name(request.reason), request.message))
        return pb.FailResponse(requeued=True)

    def CompleteInline(self, request, context):
        self.completes.append(request.header)
        if self.complete_code is not None:
            context.abort(self.complete_code, "the database is restarting")
        return pb.CompleteResponse(accepted=True, credited=True, message="thanks")

    def _fetch(self, request, context):
        self.served.append(request.name)
        if request.name not in self.files:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no file {request.name}")
        yield from self.files[request.name](request)

    FetchShard = FetchCheckpoint = _fetch
