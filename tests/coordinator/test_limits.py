"""Per-token and per-call limits of the coordinator, each through real gRPC on loopback.

Reference: issue 19, items 1 and 3 — one token cannot drain or churn the queue (failures per token throttle
its Lease), cannot register without bound (Register sizes, live workers per token), cannot make the server
buffer uploads (one streamed upload per lease, written to a temporary file), cannot hold every call slot
without the others being retried, and a checkpoint's digest is hashed off the event loop and cached."""

from __future__ import annotations

import hashlib
import os
import signal
import threading

import grpc
import pytest
from sqlalchemy import select

from coordinator import store as S
from coordinator.api import mujina_pb2 as pb
from tests.conftest import wait_until
from tests.coordinator.conftest import OTHER_TOKEN, TOKEN, Coord, free_port, spawn_server

EVAL = {"loss": 2.5, "tokens": 500}
MiB = 1 << 20


@pytest.fixture
def make_coord(tmp_path, db_url):
    made = []

    def make(**sections):
        made.append(Coord(tmp_path, db_url, **sections))
        return made[-1]

    yield make
    for c in made:
        c.close()


def states(coord, task_ids) -> dict[str, int]:
    with coord.store.read() as conn:
        rows = conn.execute(select(S.tasks.c.state).where(S.tasks.c.id.in_(task_ids))).scalars().all()
    return {s: rows.count(s) for s in set(rows)}


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def tmp_files(coord) -> list:
    return sorted((coord.cfg.state_dir / "results" / ".tmp").iterdir())


# failures per token


@pytest.mark.parametrize("how", ["fail", "worker_fault", "refused_result"])
def test_a_token_failing_in_a_loop_is_throttled_and_an_honest_token_finishes_everything(make_coord, how):
    """One token leases and fails (or uploads results its validator refuses) in a loop over 30 tasks: after
    limits.max_failures_per_token failures its Lease says why and when to come back, no task went dead,
    and a second token finishes every task."""
    coord = make_coord(limits={"max_failures_per_token": 5, "failure_window_s": 3600})
    tids = coord.add_eval(30)
    bad, good = coord.client(), coord.client(OTHER_TOKEN)
    wb = bad.register("storm", speed=1.0).worker_id
    failed = 0
    for _ in range(30):
        got = bad.lease(wb, ["eval"])
        if got.HasField("no_work"):
            break
        t = got.task
        if how == "fail":
            bad.fail(t.task_id, t.lease_id, pb.ERROR, "no chat template")
        elif how == "worker_fault":
            bad.fail(t.task_id, t.lease_id, pb.WORKER_FAULT, "no chat template")
        else:
            code, msg = code_of(lambda t=t: bad.complete(t.task_id, t.lease_id, b"x", {"loss": -1.0, "tokens": 5}))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "refused by the eval validator" in msg
        failed += 1
    assert failed == 5
    assert "failed 5 tasks in the last 3600 s" in got.no_work.reason
    assert "limits.max_failures_per_token" in got.no_work.reason
    assert 0 < got.no_work.retry_after_s <= 3600
    assert states(coord, tids) == {"pending": 30}
    wg = good.register("honest", speed=1.0).worker_id
    for _ in tids:
        t = good.lease(wg, ["eval"]).task
        assert good.complete(t.task_id, t.lease_id, b"ok", EVAL).accepted
    assert states(coord, tids) == {"done": 30}


def test_shutdowns_are_not_throttled_and_the_throttle_lifts_after_the_window(make_coord):
    coord = make_coord(limits={"max_failures_per_token": 2, "failure_window_s": 1.0})
    coord.add_eval(4)
    c = coord.client()
    w = c.register("w", speed=1.0).worker_id
    for _ in range(5):  # a stopping worker gives its leases back: no attempt, no throttle
        t = c.lease(w, ["eval"]).task
        c.fail(t.task_id, t.lease_id, pb.SHUTDOWN, "SIGTERM")
    for _ in range(2):
        t = c.lease(w, ["eval"]).task
        c.fail(t.task_id, t.lease_id, pb.ERROR, "boom")
    assert "failed 2 tasks in the last 1 s" in c.lease(w, ["eval"]).no_work.reason
    wait_until(lambda: c.lease(w, ["eval"]).HasField("task"), "the failure window to pass", every=0.2)


# Register


@pytest.mark.parametrize("field, caps, needle", [
    ("name", {}, "name is 257 characters; at most 256"),
    ("devices", {"devices": [("cuda", "gpu", 1)] * 65}, "capabilities.devices: at most 64"),
    ("device kind", {"devices": [("c" * 65, "gpu", 1)]}, "capabilities.devices.kind is 65 characters"),
    ("device name", {"devices": [("cuda", "g" * 257, 1)]}, "capabilities.devices.name is 257 characters"),
    ("software", {"software": {f"pkg{i}": "1" for i in range(65)}}, "capabilities.software: at most 64 entries"),
    ("software name", {"software": {"p" * 65: "1"}}, "capabilities.software name is 65 characters"),
    ("software version", {"software": {"torch": "9" * 257}}, "capabilities.software['torch'] is 257 characters"),
])
def test_register_sizes_are_bounded(coord, field, caps, needle):
    c = coord.client()
    name = "n" * 257 if field == "name" else "w"
    code, msg = code_of(lambda: c.register(name, **caps))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in msg, msg
    with coord.store.read() as conn:
        assert conn.execute(select(S.workers.c.id)).all() == []
    c.register("n" * 256, devices=[("cuda", "g" * 256, 1)] * 64, software={"p" * 64: "9" * 256})  # the bounds fit


def test_live_workers_per_token_are_bounded_and_silent_ones_make_room(make_coord):
    coord = make_coord(limits={"max_workers_per_token": 3})
    alice = coord.client()
    ids = [alice.register(f"w{i}").worker_id for i in range(3)]
    code, msg = code_of(lambda: alice.register("storm"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "has 3 live workers" in msg and "limits.max_workers_per_token" in msg
    bob = coord.client(OTHER_TOKEN)
    bob.register("b")   # the limit is per token
    for w in ids:       # alice's workers keep working
        alice.heartbeat(w)
    # a worker is live until leases.duration_s (1.5 s here) after its last call: then its place is free
    wait_until(lambda: _registers(alice), "alice's silent workers to stop counting", every=0.3)


def _registers(c) -> bool:
    try:
        c.register("later")
        return True
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return False


# uploads


def _held_upload(c, t, total: int, sent_before_hold: int, hold: threading.Event):
    """A Complete stream of `total` bytes that stops after `sent_before_hold` until `hold` is set."""
    data = b"u" * total

    def chunks():
        yield pb.CompleteChunk(header=pb.CompleteHeader(task_id=t.task_id, lease_id=t.lease_id, size_bytes=total,
                                                        sha256=hashlib.sha256(data).hexdigest(), metrics=EVAL))
        for i in range(0, total, MiB):
            if i >= sent_before_hold:
                hold.wait()
            yield pb.CompleteChunk(data=data[i:i + MiB])

    return c.stub.Complete.future(chunks(), metadata=c.metadata, timeout=60)


def test_a_streamed_upload_goes_to_a_temp_file_one_per_lease_and_an_aborted_one_leaves_nothing(make_coord):
    coord = make_coord(limits={"max_upload_bytes": 64 * MiB})
    (tid,) = coord.add_eval()
    c = coord.client()
    t = c.lease(c.register("w").worker_id, ["eval"]).task
    hold = threading.Event()
    first = _held_upload(c, t, 16 * MiB, 6 * MiB, hold)
    # the bytes received so far are on disk, not in the server's memory
    wait_until(lambda: [p.stat().st_size for p in tmp_files(coord)] == [6 * MiB], "6 MiB in results/.tmp")
    # a second upload on the same lease while the first is open: refused, not buffered beside it
    code, msg = code_of(lambda: c.complete_raw(c._chunks(pb.CompleteHeader(
        task_id=tid, lease_id=t.lease_id, size_bytes=2 * MiB, sha256=hashlib.sha256(b"v" * 2 * MiB).hexdigest(),
        metrics=EVAL), b"v" * 2 * MiB)))
    assert code == grpc.StatusCode.ABORTED and "already has an upload in flight" in msg
    first.cancel()   # the worker goes away mid-upload
    hold.set()
    wait_until(lambda: tmp_files(coord) == [], "the aborted upload's temp file to be removed")
    # the lease may upload again, and its result lands in results/ by a rename
    done = c.complete(tid, t.lease_id, b"w" * (2 * MiB), EVAL)
    assert done.accepted and not done.duplicate
    assert (coord.cfg.state_dir / "results" / f"{tid}.{t.lease_id}.bin").read_bytes() == b"w" * (2 * MiB)
    assert tmp_files(coord) == []


def test_a_refused_streamed_upload_leaves_no_temp_file(make_coord):
    coord = make_coord(limits={"max_upload_bytes": 64 * MiB})
    (tid,) = coord.add_eval()
    c = coord.client()
    t = c.lease(c.register("w").worker_id, ["eval"]).task
    data = b"r" * (3 * MiB)
    code, msg = code_of(lambda: c.complete(tid, t.lease_id, data, {"loss": float("inf"), "tokens": 5}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    header = pb.CompleteHeader(task_id=tid, lease_id=t.lease_id, size_bytes=len(data), sha256="0" * 64,
                               metrics=EVAL)
    code, msg = code_of(lambda: c.complete_raw(c._chunks(header, data)))
    assert code == grpc.StatusCode.DATA_LOSS and "SHA-256 mismatch" in msg
    assert tmp_files(coord) == [] and list((coord.cfg.state_dir / "results").glob("*.bin")) == []


@pytest.mark.slow   # a coordinator subprocess, killed and started again
def test_a_kill_mid_upload_leaves_no_stray_file_after_restart(tmp_path, db_url):
    from coordinator.api.client import CoordinatorClient
    from coordinator.config import load_project
    from coordinator.scheduler import Scheduler
    from tests.coordinator.conftest import write_project

    project = write_project(tmp_path, limits={"max_upload_bytes": 64 * MiB})
    tmp_dir = tmp_path / "state" / "results" / ".tmp"
    store = S.Store.open(db_url)
    store.add_token("alice", TOKEN)
    Scheduler(store, load_project(project)).add_task("eval", {"checkpoint": "c", "shard": "s", "shard_tokens": 1000})
    store.close()
    port = free_port()
    proc = spawn_server(project, db_url, port, tmp_path / "serve.log")
    hold = threading.Event()
    try:
        with CoordinatorClient(f"127.0.0.1:{port}", TOKEN, timeout=10, retry_for=5) as c:
            t = c.lease(c.register("w").worker_id, ["eval"]).task
            upload = _held_upload(c, t, 8 * MiB, 3 * MiB, hold)
            wait_until(lambda: [p.stat().st_size for p in tmp_dir.iterdir()] == [3 * MiB], "3 MiB in results/.tmp")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            hold.set()
            with pytest.raises(grpc.RpcError):
                upload.result()
        assert len(list(tmp_dir.iterdir())) == 1   # the kill left it
        proc = spawn_server(project, db_url, port, tmp_path / "serve.log")
        assert list(tmp_dir.iterdir()) == []        # the restart swept it
    finally:
        hold.set()
        proc.kill()
        proc.wait(timeout=30)


# calls in flight


def test_calls_past_max_concurrent_rpcs_are_refused_and_the_client_retries_them(make_coord):
    coord = make_coord(limits={"max_concurrent_rpcs": 2, "max_upload_bytes": 64 * MiB})
    coord.add_eval(2)
    c = coord.client()
    w = c.register("w").worker_id
    leases = [c.lease(w, ["eval"]).task for _ in range(2)]
    hold = threading.Event()
    uploads = [_held_upload(c, t, 4 * MiB, MiB, hold) for t in leases]   # two calls held open
    wait_until(lambda: len(tmp_files(coord)) == 2, "both uploads to be open")
    code, msg = code_of(lambda: c.stub.Heartbeat(pb.HeartbeatRequest(worker_id=w), metadata=c.metadata,
                                                  timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Concurrent RPC limit exceeded" in msg
    answered = []
    beat = threading.Thread(target=lambda: answered.append(c.heartbeat(w)))  # retries while the server is busy
    beat.start()
    hold.set()
    beat.join(timeout=30)
    assert answered and answered[0].directive == pb.CONTINUE
    assert all(u.result().accepted for u in uploads)


# file digests


@pytest.mark.slow   # hashes a 1 GiB (sparse) checkpoint
def test_a_checkpoint_digest_is_hashed_off_the_event_loop_and_cached(coord):
    """While the first fetch of a large checkpoint is hashed, heartbeats are answered (a digest on the event
    loop would hold every call until it is done); the digest is then cached, and a new version is hashed
    anew."""
    path = coord.cfg.state_dir / "checkpoints" / "big.pt"
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        f.write(b"head")
        f.truncate(1 << 30)   # sparse: no disk used, but 1 GiB to hash
    c = coord.client()
    w = c.register("w").worker_id
    got = []
    fetch = threading.Thread(target=lambda: got.append(c.remote_sha256("checkpoint", "big.pt", timeout=120)))
    fetch.start()
    beats = 0
    while fetch.is_alive():
        c.heartbeat(w)
        beats += 1
    fetch.join()
    expected = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 * MiB):
            expected.update(block)
    assert got == [expected.hexdigest()]
    assert beats >= 20, f"only {beats} heartbeats were answered while the checkpoint was hashed"
    assert c.remote_sha256("checkpoint", "big.pt") == got[0]   # cached (the key is path, size, mtime)
    path.write_bytes(b"a new round")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    assert c.remote_sha256("checkpoint", "big.pt") == hashlib.sha256(b"a new round").hexdigest()


# request sizes


@pytest.mark.parametrize("rpc", ["Heartbeat", "Lease", "Register", "Fail"])
def test_an_oversized_request_is_refused_unread_and_the_server_keeps_serving(coord, rpc):
    """A request several times larger than the largest valid one (here ~1 MiB) is answered INVALID_ARGUMENT
    from its size alone, before it is parsed; the same worker's normal calls go on."""
    c = coord.client()
    w = c.register("w").worker_id
    big = {"Heartbeat": pb.HeartbeatRequest(worker_id=w, leases=[pb.LeaseProgress(lease_id=f"{i:032x}")
                                                                  for i in range(25_000)]),
           "Lease": pb.LeaseRequest(worker_id=w, kinds=[f"{i:016x}" for i in range(60_000)]),
           "Register": pb.RegisterRequest(name="w", capabilities=pb.Capabilities(
               software={f"{i:016x}": "v" for i in range(60_000)})),
           "Fail": pb.FailRequest(task_id="t", lease_id="l", message="m" * (1 << 20))}[rpc]
    code, msg = code_of(lambda: getattr(c.stub, rpc)(big, metadata=c.metadata, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, msg
    assert f"a {rpc} request is {big.ByteSize()} bytes; at most" in msg and "refused unread" in msg
    assert c.heartbeat(w).directive == pb.CONTINUE
