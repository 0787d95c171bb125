"""A worker trusts nothing it receives (issue 19 items 5 and 6), against a coordinator that lies: a real gRPC
server in the test implementing the Coordinator service, honest where a case does not need a lie.

Downloads stop as soon as a chunk would pass the announced size or the cache's cap, before it is written (the
issue saw 40 MiB written with a 1 MiB cap); a payload cannot make the worker read a local file; a result the
coordinator answers with INTERNAL stays in the spool and reaches the real coordinator later, with credit."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import grpc
import pytest
from sqlalchemy import select

from coordinator import store as S
from coordinator.api.client import CoordinatorClient
from data_shards.synthetic import model_files_hash
from tests.coordinator.conftest import TOKEN, Coord
from tests.worker.conftest import make_eval_inputs
from tests.worker.hostile import Hostile, honest, lying
from worker.cache import DownloadRefused, FileCache
from worker.daemon import Daemon, WorkerConfig

KiB, MiB = 1 << 10, 1 << 20


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


def test_a_task_of_a_kind_the_worker_did_not_ask_for_is_given_back_unrun(tmp_path, serve, teacher_dir):
    h = Hostile(tasks=[generate_task(teacher_dir)], any_kind=True)
    assert daemon(serve(h), tmp_path / "w", kinds=["eval"], teachers={"tiny": teacher_dir}, max_tasks=1).run() == 0
    assert h.fails == [("INVALID_TASK", "this worker asked for kinds eval, not 'generate'")] and h.completes == []


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


def spooled_daemon(target: str, cache: Path) -> Daemon:
    d = daemon(target, cache, kinds=["eval"], max_tasks=1)
    d.spool.put({"task_id": "t" * 32, "lease_id": "l" * 32, "kind": "eval", "metrics": {"loss": 1.0},
                 "metadata": {}, "seconds": 1.0}, b"result")
    d.register()
    return d


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED,
                                  grpc.StatusCode.DEADLINE_EXCEEDED])
def test_an_answer_that_may_pass_keeps_the_result_and_data_loss_is_tried_three_times(tmp_path, serve, code):
    h = Hostile(complete_code=code)
    d = spooled_daemon(serve(h), tmp_path / "cache")
    for _ in range(4):
        d.flush_spool(final=True)
    assert len(h.completes) == 4 and len(d.spool) == 1
    h.complete_code = grpc.StatusCode.DATA_LOSS   # the upload arrived damaged: sent again, but not forever
    for _ in range(4):
        d.flush_spool(final=True)
    d.client.close()
    assert len(h.completes) == 4 + 3 and len(d.spool) == 0


@pytest.mark.parametrize("code", [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_a_definitive_refusal_drops_the_result_with_its_reason(tmp_path, serve, caplog, code):
    h = Hostile(complete_code=code)
    d = spooled_daemon(serve(h), tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="worker"):
        d.flush_spool(final=True)
    d.client.close()
    assert len(h.completes) == 1 and len(d.spool) == 0
    assert any(f"refused, dropped from the spool: {code.name}" in r.getMessage() for r in caplog.records)
