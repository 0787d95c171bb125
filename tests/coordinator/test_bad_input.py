"""Bad input gets a precise gRPC status and message; the server keeps serving and keeps nothing half-written.

Reference: the issue's "Reliability and bad input" list, one case per test, each followed by a
health check and a look at results/ (only accepted uploads may be there)."""

from __future__ import annotations

import hashlib
import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import func, select

from coordinator import store as S
from coordinator.api import mujina_pb2 as pb
from coordinator.api.client import CoordinatorClient
from tests.coordinator.conftest import Coord

GOOD = {"loss": 2.0, "tokens": 100}


@pytest.fixture
def leased(tmp_path, db_url):
    coord = Coord(tmp_path, db_url)
    tid = coord.add_eval(shard_tokens=1000)[0]
    c = coord.client()
    w = c.register("w").worker_id
    t = c.lease(w, ["eval"]).task
    yield coord, c, t
    # after every bad request: still serving, nothing half-written kept, nothing credited
    with grpc.insecure_channel(coord.target) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.SERVING
    results = coord.cfg.state_dir / "results"
    kept = sorted(p.name for p in results.rglob("*") if p.is_file()) if results.exists() else []
    with coord.store.read() as conn:
        n_results = conn.execute(select(func.count()).select_from(S.results)).scalar_one()
    assert len(kept) == n_results, kept
    coord.close()
    del tid


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def header(t, data: bytes, **kw) -> pb.CompleteChunk:
    fields = dict(task_id=t.task_id, lease_id=t.lease_id, size_bytes=len(data),
                  sha256=hashlib.sha256(data).hexdigest(), metrics=GOOD)
    fields.update(kw)
    return pb.CompleteChunk(header=pb.CompleteHeader(**fields))


def test_missing_and_wrong_tokens_are_unauthenticated(leased):
    coord, _, _ = leased
    for token in ("wrong", ""):
        with CoordinatorClient(coord.target, token) as bad:
            code, msg = code_of(lambda b=bad: b.register("x"))
            assert code == grpc.StatusCode.UNAUTHENTICATED
    ch = grpc.insecure_channel(coord.target)
    from coordinator.api import mujina_pb2_grpc as pb_grpc
    code, msg = code_of(lambda: pb_grpc.CoordinatorStub(ch).Register(pb.RegisterRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer TOKEN" in msg
    ch.close()


def test_unknown_ids_are_not_found(leased):
    coord, c, t = leased
    assert code_of(lambda: c.lease("nope", ["eval"]))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: c.heartbeat("nope"))[0] == grpc.StatusCode.NOT_FOUND
    code, msg = code_of(lambda: c.complete(t.task_id, "no-such-lease", b"x", GOOD))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown lease id" in msg
    assert code_of(lambda: c.fail("t", "no-such-lease"))[0] == grpc.StatusCode.NOT_FOUND
    code, msg = code_of(lambda: c.complete("other-task", t.lease_id, b"x", GOOD))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"is for task {t.task_id}" in msg


def test_oversized_upload_is_refused_before_reading(leased):
    coord, c, t = leased
    big = b"\0" * (coord.cfg.limits.max_upload_bytes + 1)
    code, msg = code_of(lambda: c.complete(t.task_id, t.lease_id, big, GOOD))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limits.max_upload_bytes" in msg
    assert c.complete(t.task_id, t.lease_id, b"ok", GOOD).accepted  # the lease is still good


def test_sha256_mismatch_is_data_loss_and_retry_succeeds(leased):
    coord, c, t = leased
    data = b"payload" * 1000
    chunks = [header(t, data, sha256="0" * 64), pb.CompleteChunk(data=data)]
    code, msg = code_of(lambda: c.complete_raw(chunks))
    assert code == grpc.StatusCode.DATA_LOSS and "SHA-256 mismatch" in msg
    assert c.complete(t.task_id, t.lease_id, data, GOOD).accepted


def test_truncated_and_overlong_streams_are_data_loss(leased):
    coord, c, t = leased
    data = b"x" * 5000
    code, msg = code_of(lambda: c.complete_raw([header(t, data), pb.CompleteChunk(data=data[:1000])]))
    assert code == grpc.StatusCode.DATA_LOSS and "truncated: received 1000 of 5000 bytes" in msg
    code, msg = code_of(lambda: c.complete_raw([header(t, data), pb.CompleteChunk(data=data + b"more")]))
    assert code == grpc.StatusCode.DATA_LOSS and "more than the declared" in msg


def test_client_that_vanishes_mid_upload_leaves_nothing(leased):
    coord, c, t = leased
    data = b"y" * 4096

    def chunks():
        yield header(t, data)
        yield pb.CompleteChunk(data=data[:100])
        raise RuntimeError("the worker crashed mid-upload")  # grpc cancels the call

    with pytest.raises(grpc.RpcError) as err:
        c.complete_raw(chunks())
    assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
    assert c.complete(t.task_id, t.lease_id, data, GOOD).accepted


def test_complete_inline_checks_what_complete_checks(leased, monkeypatch):
    """The one-message upload (what CoordinatorClient.complete sends for results up to 1 MiB) refuses what the
    stream refuses, plus data over its 1 MiB; larger results go through the stream; both are one completion."""
    from coordinator.api import mujina_pb2_grpc as pb_grpc
    from coordinator.api.client import INLINE_MAX_BYTES
    coord, c, t = leased
    stub = pb_grpc.CoordinatorStub(c.channel)

    def inline(data: bytes, **kw):
        req = pb.CompleteInlineRequest(header=header(t, data, **kw).header, data=data)
        return stub.CompleteInline(req, metadata=c.metadata, timeout=10)

    code, msg = code_of(lambda: stub.CompleteInline(pb.CompleteInlineRequest(data=b"x"), metadata=c.metadata))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "needs a header" in msg
    code, msg = code_of(lambda: inline(b"\0" * (INLINE_MAX_BYTES + 1)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "upload it with Complete" in msg
    code, msg = code_of(lambda: inline(b"x" * 10, size_bytes=20))
    assert code == grpc.StatusCode.DATA_LOSS and "truncated: received 10 of 20 bytes" in msg
    code, msg = code_of(lambda: inline(b"x" * 30, size_bytes=20))
    assert code == grpc.StatusCode.DATA_LOSS and "more than the declared 20 bytes" in msg
    code, msg = code_of(lambda: inline(b"x" * 10, sha256="0" * 64))
    assert code == grpc.StatusCode.DATA_LOSS and "SHA-256 mismatch" in msg
    code, msg = code_of(lambda: inline(b"x", metrics={"loss": math.nan, "tokens": 1}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    monkeypatch.setattr("coordinator.api.client.INLINE_MAX_BYTES", 1000)  # the client streams what is larger
    big = bytes(range(256)) * 20
    streamed, raw = [], c.complete_raw
    monkeypatch.setattr(c, "complete_raw", lambda chunks, **kw: streamed.append(1) or raw(chunks, **kw))
    first = c.complete(t.task_id, t.lease_id, big, GOOD)
    assert streamed == [1]
    again = inline(big[:10], size_bytes=len(big), sha256=hashlib.sha256(big).hexdigest())  # a retry, inline
    assert first.accepted and first.credited and again.duplicate and again.accepted
    stored = coord.cfg.state_dir / "results" / f"{t.task_id}.{t.lease_id}.bin"
    assert stored.read_bytes() == big


def test_client_falls_back_to_the_stream_for_a_coordinator_without_complete_inline(leased):
    """A worker newer than its coordinator: CompleteInline answers UNIMPLEMENTED (here: a method the real
    server does not have), and the client uploads through Complete from then on."""
    coord, c, t = leased
    c.stub.CompleteInline = c.channel.unary_unary(
        "/mujina.v1.Coordinator/NoSuchMethod", request_serializer=pb.CompleteInlineRequest.SerializeToString,
        response_deserializer=pb.CompleteResponse.FromString)
    assert c.inline
    r = c.complete(t.task_id, t.lease_id, b"small result", GOOD)
    assert r.accepted and r.credited and not c.inline


def test_malformed_complete_messages_are_invalid_argument(leased):
    coord, c, t = leased
    code, msg = code_of(lambda: c.complete_raw([pb.CompleteChunk(data=b"no header")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "first Complete message must be a header" in msg
    code, _ = code_of(lambda: c.complete_raw([header(t, b"", sha256="not-hex")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = code_of(lambda: c.complete_raw([header(t, b"ab"), header(t, b"ab")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: c.complete_raw([]))[0] == grpc.StatusCode.INVALID_ARGUMENT
    for bad in ("[1, 2]", "{not json", "{}" + " " * 70000):
        code, msg = code_of(lambda b=bad: c.complete(t.task_id, t.lease_id, b"r", GOOD, metadata_json=b))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "metadata_json" in msg
    assert c.complete(t.task_id, t.lease_id, b"r", GOOD, metadata_json='{"device": "cpu"}').accepted
    with coord.store.read() as conn:
        assert conn.execute(select(S.results.c.metadata)).scalar_one() == '{"device": "cpu"}'


@pytest.mark.parametrize("metrics, needle", [
    ({"loss": math.nan, "tokens": 10}, "metrics.loss is nan"),
    ({"loss": math.inf, "tokens": 10}, "metrics.loss is inf"),
    ({"loss": -1.0, "tokens": 10}, "metrics.loss must be >= 0"),
    ({"loss": 1.0, "tokens": -5}, "metrics.tokens must be >= 0"),
    ({"loss": 1.0, "tokens": 0}, "positive whole number"),
    ({"loss": 1.0, "tokens": 5000}, "exceeds the shard's 1000 tokens"),
    ({"tokens": 10}, "metrics.loss is missing"),
    ({"loss": 1.0, "tokens": 10, "gpu_seconds": 1e9}, "exceeds the lease's age"),
])
def test_bad_numbers_are_invalid_argument_and_count_as_a_failed_attempt(leased, metrics, needle):
    coord, c, t = leased
    code, msg = code_of(lambda: c.complete(t.task_id, t.lease_id, b"r", metrics))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in msg, msg
    with coord.store.read() as conn:
        task = conn.execute(select(S.tasks).where(S.tasks.c.id == t.task_id)).first()
        credit = conn.execute(select(func.count()).select_from(S.ledger)).scalar_one()
    assert credit == 0
    if "is nan" not in needle and "is inf" not in needle:  # refused by the validator: attempt counted
        assert task.state == "pending" and task.attempts == 1 and "INVALID_RESULT" in task.last_error


def test_bad_numbers_elsewhere(leased):
    coord, c, t = leased
    code, msg = code_of(lambda: c.register("x", speed=math.nan))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "capabilities.speed" in msg
    assert code_of(lambda: c.register("x", speed=-1.0))[0] == grpc.StatusCode.INVALID_ARGUMENT
    for kinds in ([""], ["k" * 65], [f"k{i}" for i in range(33)]):
        code, msg = code_of(lambda kinds=kinds: c.register("x", kinds=kinds))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "capabilities.kinds" in msg
    w = c.register("ok").worker_id
    code, msg = code_of(lambda: c.heartbeat(w, [(t.lease_id, 1.5)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "progress must be in [0, 1]" in msg
    assert code_of(lambda: c.lease(w, []))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_lease_kinds_and_heartbeat_entries_are_bounded(leased):
    """One token cannot grow the coordinator: Lease names at most 32 kinds of 1-64 characters (each distinct
    count of kinds caches an SQL statement; duplicates are merged), a Heartbeat renews at most 1024 leases
    (300,000 entries once blocked every RPC for seconds)."""
    coord, c, t = leased
    w = c.register("ok").worker_id
    for kinds in ([f"k{i}" for i in range(33)], ["eval", "k" * 65]):
        code, msg = code_of(lambda kinds=kinds: c.lease(w, kinds))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most 32 names" in msg
    assert c.lease(w, ["eval"] * 500).HasField("no_work")   # duplicates merged: one kind
    code, msg = code_of(lambda: c.heartbeat(w, [(f"l{i}", 0.5) for i in range(1025)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most 1024 leases" in msg
    assert len(c.heartbeat(w, [(t.lease_id, 0.5)] * 3).leases) == 3


def test_fetch_is_resumable_checked_and_path_safe(leased, tmp_path):
    coord, c, _ = leased
    shard = coord.cfg.state_dir / "shards" / "ja" / "0001.bin"
    shard.parent.mkdir(parents=True)
    blob = bytes(range(256)) * 9000  # 2.3 MB: three chunks
    shard.write_bytes(blob)
    dest = tmp_path / "dl" / "0001.bin"
    dest.parent.mkdir()
    dest.write_bytes(blob[:777_777])  # an earlier download stopped here: resume
    assert c.fetch("shard", "ja/0001.bin", dest).read_bytes() == blob
    dest.write_bytes(b"corrupt" + blob[7:1000])  # wrong prefix: the checksum catches it, the file is deleted
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        c.fetch("shard", "ja/0001.bin", dest)
    assert not dest.exists()
    for name in ("../coordinator.db", "/etc/passwd", "ja/../../x", "", "a//b"):
        code, _ = code_of(lambda n=name: c.fetch("shard", n, tmp_path / "x"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, name
    assert code_of(lambda: c.fetch("checkpoint", "missing.safetensors", tmp_path / "y"))[0] == \
        grpc.StatusCode.NOT_FOUND
    stub_chunks = c.stub.FetchShard(pb.FetchRequest(name="ja/0001.bin", offset=len(blob) + 1),
                                    metadata=c.metadata, timeout=5)
    assert code_of(lambda: list(stub_chunks))[0] == grpc.StatusCode.OUT_OF_RANGE
