"""A worker trusts nothing it receives (issue 19 items 5 and 6), against a coordinator that lies: a real gRPC
server in the test implementing the Coordinator service, honest where a case does not need a lie.

Downloads stop as soon as a chunk would pass the announced size or the cache's cap, before it is written (the
issue saw 40 MiB written with a 1 MiB cap); a payload cannot make the worker read a local file; a result the
coordinator answers with INTERNAL stays in the spool and reaches the real coordinator later, with credit."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from sqlalchemy import select

from coordinator import store as S
from coordinator.api import mujina_pb2 as pb
from coordinator.api import mujina_pb2_grpc as pb_grpc
from coordinator.api.client import CoordinatorClient
from data_shards.synthetic import model_files_hash
from tests.coordinator.conftest import TOKEN, Coord
from tests.worker.conftest import make_eval_inputs
from worker.cache import DownloadRefused, FileCache
from worker.daemon import Daemon, WorkerConfig

KiB, MiB = 1 << 10, 1 << 20


def honest(path: Path):
    """A file streamed as the real coordinator does (1 MiB chunks, true size and digest)."""
    def stream(request):
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        for off in range(request.offset, max(len(data), 1), MiB):
            yield pb.FileChunk(offset=off, data=data[off:off + MiB], total_size=len(data), sha256=sha)
    return stream


def lying(total_size: int, chunks: list[bytes], sha256: str = "0" * 64, sizes_after: list[int] | None = None):
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

    def __init__(self, tasks=(), files=None, complete_code=None):
        self.tasks, self.files, self.complete_code = list(tasks), files or {}, complete_code
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
            if task.kind in request.kinds:
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


@pytest.fixture
def serve():
    servers = []

    def start(servicer: Hostile) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(0)


def daemon(target: str, cache: Path, **kw) -> Daemon:
    return Daemon(WorkerConfig(coordinator=target, token=TOKEN, cache_dir=cache, benchmark=False, **kw))


def files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


# ---- downloads --------------------------------------------------------------------------------------------

def test_a_stream_longer_than_announced_stops_before_writing_past_it(tmp_path, serve):
    """Announces 512 KiB (under the 1 MiB cap), then streams 40 MiB: refused at the chunk that would pass
    512 KiB, the partial file deleted, the server's stream cancelled long before its end."""
    seen_on_disk: list[int] = []
    partial = tmp_path / "c" / "partial"

    def watching(request):
        for chunk in lying(512 * KiB, [b"x" * 256 * KiB] * 160)(request):
            seen_on_disk.append(sum(p.stat().st_size for p in partial.glob("*")))
            yield chunk

    h = Hostile(files={"big.bin": watching})
    cache = FileCache(tmp_path / "c", max_bytes=1 * MiB, client=CoordinatorClient(serve(h), TOKEN, retry_for=0))
    with pytest.raises(DownloadRefused, match="more than the 524288 bytes it announced; stopped before writing"):
        cache.fetch("shard", "big.bin")
    assert max(seen_on_disk) <= 512 * KiB and len(seen_on_disk) < 160
    assert files_under(tmp_path / "c" / "objects") == {} and files_under(partial) == {}


def test_a_file_announced_larger_than_the_cache_cap_is_refused_before_its_first_byte(tmp_path, serve):
    seen_on_disk: list[int] = []
    partial = tmp_path / "c" / "partial"

    def watching(request):
        for chunk in lying(40 * MiB, [b"x" * MiB] * 40)(request):
            seen_on_disk.append(sum(p.stat().st_size for p in partial.glob("*")))
            yield chunk

    h = Hostile(files={"ckpt/model.safetensors": watching})
    cache = FileCache(tmp_path / "c", max_bytes=1 * MiB, client=CoordinatorClient(serve(h), TOKEN, retry_for=0))
    with pytest.raises(DownloadRefused, match="more than the cache's cap.*raise --max-disk"):
        cache.fetch("checkpoint", "ckpt/model.safetensors")
    assert set(seen_on_disk) <= {0}
    assert files_under(partial) == {} and files_under(tmp_path / "c" / "objects") == {}


@pytest.mark.parametrize("case", ["size_changes", "wrong_digest", "ends_early"])
def test_a_stream_that_breaks_its_own_announcement_is_refused_and_deleted(tmp_path, serve, case):
    data = b"y" * 300 * KiB
    files = {"size_changes": lying([300 * KiB, 600 * KiB], [data[:150 * KiB], data[150 * KiB:]],
                                   hashlib.sha256(data).hexdigest()),
             "wrong_digest": lying(len(data), [data], "f" * 64),
             "ends_early": lying(len(data), [data[:100 * KiB]], hashlib.sha256(data).hexdigest())}
    h = Hostile(files={"s.bin": files[case]})
    cache = FileCache(tmp_path / "c", max_bytes=1 * MiB, client=CoordinatorClient(serve(h), TOKEN, retry_for=0))
    why = {"size_changes": "changed the file's announced size", "wrong_digest": "not the announced",
           "ends_early": "ended at 102400 of the 307200 bytes"}[case]
    with pytest.raises(DownloadRefused, match=why):
        cache.fetch("shard", "s.bin")
    assert files_under(tmp_path / "c" / "partial") == {} and files_under(tmp_path / "c" / "objects") == {}
    # the same cache takes an honest file afterwards
    (tmp_path / "ok.bin").write_bytes(data)
    h.files["ok.bin"] = honest(tmp_path / "ok.bin")
    assert cache.fetch("shard", "ok.bin").read_bytes() == data


def test_a_task_whose_download_lies_is_failed_with_the_reason(tmp_path, serve, caplog):
    """Through the daemon: an eval task whose checkpoint streams more than announced is given back as ERROR
    naming the lie (one log line, no traceback); nothing is left on disk."""
    payload = {"checkpoint": "tiny", "shard": "eval/s.bin", "shard_tokens": 100, "seq_len": 32}
    h = Hostile(tasks=[("eval", payload)], files={"tiny/config.json": lying(10, [b"{}" * 64])})
    with caplog.at_level(logging.INFO, logger="worker"):
        assert daemon(serve(h), tmp_path / "cache", kinds=["eval"], max_tasks=1).run() == 0
    assert [r for r, _ in h.fails] == ["ERROR"] and "more than the 10 bytes it announced" in h.fails[0][1]
    assert h.completes == [] and not any(r.exc_info for r in caplog.records)
    assert files_under(tmp_path / "cache" / "files" / "partial") == {}


# ---- payloads naming local files ------------------------------------------------------------------------

def generate_task(teacher: Path) -> tuple[str, dict]:
    return ("generate", {"teacher": {"name": "tiny", "sha256": model_files_hash(teacher), "path": str(teacher)},
                         "answer": 0, "prompts": [{"id": "p0", "lang": "ja", "messages": [
                             {"role": "user", "content": "質問"}]}],
                         "sampling": {"temperature": 1.0, "max_new_tokens": 8, "seed": 0}})


def test_a_teacher_path_in_a_payload_is_not_read_unless_the_volunteer_allows_its_directory(tmp_path, serve,
                                                                                          teacher_dir):
    h = Hostile(tasks=[generate_task(teacher_dir)])
    assert daemon(serve(h), tmp_path / "a", kinds=["generate"], max_tasks=1).run() == 2  # nothing else to run
    assert [r for r, _ in h.fails] == ["WORKER_FAULT"] and h.completes == []
    assert "no teacher 'tiny'" in h.fails[0][1] and "--allow-local-paths" in h.fails[0][1]
    # a directory the volunteer opted in: the same payload runs
    h = Hostile(tasks=[generate_task(teacher_dir)])
    assert daemon(serve(h), tmp_path / "b", kinds=["generate"], max_tasks=1,
                  allow_local_paths=[teacher_dir.parent]).run() == 0
    assert h.fails == [] and len(h.completes) == 1
    # another directory is still refused
    h = Hostile(tasks=[generate_task(teacher_dir)])
    assert daemon(serve(h), tmp_path / "c", kinds=["generate"], max_tasks=1, allow_local_paths=[tmp_path]).run() == 2
    assert "outside the directories this worker allows" in h.fails[0][1]


def test_a_train_payload_naming_a_local_token_file_is_an_invalid_task(tmp_path, serve):
    payload = {"round": 0, "checkpoint": "r/round_000000", "assignment": {"0": [0, 1]}, "slot": "s0",
               "settings": {"run": "r"}, "inner": {"inner_steps": 2, "batch_size": 2, "seq_len": 32,
                                                   "data_source": "tokens", "data_path": "/etc/passwd"}}
    h = Hostile(tasks=[("train", payload)])
    assert daemon(serve(h), tmp_path / "w", kinds=["train"], max_tasks=1).run() == 0
    assert [r for r, _ in h.fails] == ["INVALID_TASK"] and "data_path" in h.fails[0][1]
    assert h.served == []   # nothing fetched either


# ---- results the coordinator cannot take now ------------------------------------------------------------

def test_a_result_answered_internal_stays_spooled_and_reaches_the_real_coordinator_later(tmp_path, serve):
    """The issue's PostgreSQL restart: Complete answers INTERNAL. The result stays in the spool (it used to be
    deleted); the next start against the real coordinator uploads it and the volunteer is credited."""
    coord = Coord(tmp_path, f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}", leases={"duration_s": 600.0})
    try:
        inputs = make_eval_inputs(coord.cfg.state_dir)
        coord.scheduler.add_task("eval", inputs["payload"])
        real = coord.client()
        wid = real.register("alice-box", kinds=["eval"]).worker_id
        task = real.lease(wid, ["eval"]).task   # alice's lease, run by her daemon through the broken coordinator
        state = coord.cfg.state_dir
        files = {f"tiny/{p.name}": honest(p) for p in (state / "checkpoints" / "tiny").iterdir()}
        files[inputs["payload"]["shard"]] = honest(state / "shards" / inputs["payload"]["shard"])
        h = Hostile(tasks=[task], files=files, complete_code=grpc.StatusCode.INTERNAL)
        cache = tmp_path / "cache"
        assert daemon(serve(h), cache, kinds=["eval"], max_tasks=1).run() == 0
        assert len(h.completes) == 2   # at the end of the task, and once more before exiting
        spooled = [p.name for p in (cache / "spool").glob("*.json")]
        assert spooled == [f"{task.lease_id}.json"]
        header = json.loads((cache / "spool" / spooled[0]).read_text())
        assert header["sha256"] == hashlib.sha256((cache / "spool" / f"{task.lease_id}.bin").read_bytes()).hexdigest()
        # the next start, against the real coordinator: the spooled result is uploaded and credited
        assert daemon(coord.target, cache, kinds=["eval"], max_tasks=0).run() == 0
        assert list((cache / "spool").glob("*.json")) == []
        with coord.store.read() as conn:
            assert conn.execute(select(S.tasks.c.state)).scalars().all() == ["done"]
            assert conn.execute(select(S.ledger.c.volunteer)).scalars().all()[:1] == ["alice"]
    finally:
        coord.close()


@pytest.mark.parametrize("code", [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.PERMISSION_DENIED])
def test_a_definitive_refusal_drops_the_result_with_its_reason(tmp_path, serve, caplog, code):
    h = Hostile(tasks=[("eval", {"checkpoint": "tiny", "shard": "s.bin", "shard_tokens": 1, "seq_len": 32})],
                complete_code=code)
    d = daemon(serve(h), tmp_path / "cache", kinds=["eval"], max_tasks=1)
    header = {"task_id": "t" * 32, "lease_id": "l" * 32, "kind": "eval", "metrics": {"loss": 1.0},
              "metadata": {}, "seconds": 1.0}
    d.spool.put(header, b"result")
    d.register()
    with caplog.at_level(logging.WARNING, logger="worker"):
        d.flush_spool(final=True)
    d.client.close()
    assert len(h.completes) == 1 and len(d.spool) == 0
    assert any(f"refused, dropped from the spool: {code.name}" in r.getMessage() for r in caplog.records)
