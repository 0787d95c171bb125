"""kill -9 of the coordinator inside the synthetic validators' commit window (issue 19, item 6).

`commit` of the generate and judge validators writes records, fingerprints and counters inside the Complete
transaction, before it commits. A coordinator killed between the two (os._exit at a named point, no cleanup,
as kill -9) leaves those side effects without a completed task; the worker then uploads the same result to
the restarted coordinator. Reference: the store and the files are the judge. The re-upload is accepted and
credited once (one `tasks` credit in the ledger), the generated data and the shards built from it hold each
record once, the counters count each record once, and the duplicate index still refuses the same text for
another task."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from sqlalchemy import select

from coordinator import store as S
from coordinator.api.client import CoordinatorClient
from coordinator.config import load_project
from coordinator.scheduler import Scheduler
from coordinator.validate_synthetic import GenerateValidator, SyntheticState, forget_states
from data_shards.build import ShardConfig, build_shards
from tests.coordinator.conftest import TOKEN, free_port, spawn_server, write_project
from tests.data_shards.conftest import corpus, tokenizer_dir  # noqa: F401 - fixtures for the shard build
from tests.data_shards.corpus import japanese_documents

# `mujina-coordinator serve` whose generate and judge validators die (os._exit) at the point named by argv[1].
CHILD = """
import os, sys
import coordinator.validators as V
from coordinator.validate_synthetic import GenerateValidator, JudgeValidator

def crashing(base):
    class Crashing(base):
        def _crash_point(self, where):
            if where == sys.argv[1]:
                os._exit(137)
    return Crashing()

V.VALIDATORS["generate"], V.VALIDATORS["judge"] = crashing(GenerateValidator), crashing(JudgeValidator)
from coordinator.cli import main
sys.exit(main(sys.argv[2:]))
"""

TEACHER = {"name": "tiny", "sha256": "a" * 64}
IDS = ["p1", "p2", "p3"]
TEXTS = japanese_documents(4, seed=23)


def spawn_crashing(project: Path, db_url: str, port: int, log: Path, where: str) -> subprocess.Popen:
    return spawn_server(project, db_url, port, log, program=("-c", CHILD, where))


def generate_payload(ids):
    return {"teacher": TEACHER, "answer": 0, "limits": {"min_chars": 20, "max_chars": 5000},
            "sampling": {"max_new_tokens": 2000, "seed": len(ids)}, "batch_size": len(ids),
            "prompts": [{"id": i, "lang": "ja", "template": "qa", "messages": [{"role": "user", "content": f"q {i}"}]}
                        for i in ids]}


def generate_upload(ids, texts):
    return "".join(json.dumps({"prompt_id": i, "answer": 0, "output": t, "prompt_tokens": 3, "output_tokens": 100,
                               "engine": "transformers", "model_sha256": TEACHER["sha256"]}, ensure_ascii=False)
                   + "\n" for i, t in zip(ids, texts, strict=True)).encode()


def judge_payload():
    return {"teacher": TEACHER, "batch_size": 2, "sampling": {"max_new_tokens": 64, "temperature": 0.0},
            "pairs": [{"prompt_id": i, "lang": "ja", "messages": [{"role": "user", "content": f"q {i}"}],
                       "answers": [TEXTS[k], TEXTS[k + 1]]} for k, i in enumerate(IDS[:2])]}


def judge_upload():
    return "".join(json.dumps({"prompt_id": i, "judgement": f"Score A: {7 - k}\nScore B: 4", "output_tokens": 12,
                               "engine": "transformers", "model_sha256": TEACHER["sha256"]}) + "\n"
                   for k, i in enumerate(IDS[:2])).encode()


class Setup:
    def __init__(self, tmp_path: Path, db_url: str):
        self.tmp = tmp_path
        self.project = write_project(tmp_path, leases={"duration_s": 120.0, "heartbeat_interval_s": 1.0,
                                                       "sweep_interval_s": 0.2, "max_attempts": 3})
        self.cfg = load_project(self.project)
        self.db_url = db_url
        self.store = S.Store.open(db_url)
        self.store.add_token("alice", TOKEN)
        self.sched = Scheduler(self.store, self.cfg)
        self.synthetic = self.cfg.state_dir / "synthetic"

    def crash_during_complete(self, kind: str, payload: dict, data: bytes, where: str):
        """Lease the task, upload its result to a coordinator that dies at `where`; returns the grant."""
        task_id = self.sched.add_task(kind, payload)
        port = free_port()
        proc = spawn_crashing(self.project, self.db_url, port, self.tmp / "crash.log", where)
        with CoordinatorClient(f"127.0.0.1:{port}", TOKEN, timeout=10, retry_for=0) as c:
            grant = c.lease(c.register("w", kinds=[kind]).worker_id, [kind]).task
            assert grant.task_id == task_id
            with pytest.raises(grpc.RpcError):
                c.complete(grant.task_id, grant.lease_id, data, {"output_tokens": 1.0})
        assert proc.wait(timeout=60) == 137, (self.tmp / "crash.log").read_text()
        assert self.task_state(task_id) == "leased" and not self.credits(task_id)  # the transaction never committed
        return grant

    def upload_again(self, grant, data: bytes):
        """The worker's retry: the same task, lease and bytes, to a restarted coordinator."""
        port = free_port()
        proc = spawn_server(self.project, self.db_url, port, self.tmp / "serve.log")
        try:
            with CoordinatorClient(f"127.0.0.1:{port}", TOKEN, timeout=10, retry_for=5) as c:
                return c.complete(grant.task_id, grant.lease_id, data, {"output_tokens": 1.0}), port, proc
        except BaseException:
            proc.kill()
            raise

    def task_state(self, task_id: str) -> str:
        with self.store.read() as conn:
            return conn.execute(select(S.tasks.c.state).where(S.tasks.c.id == task_id)).scalar_one()

    def credits(self, task_id: str) -> list[tuple[str, float]]:
        with self.store.read() as conn:
            return sorted(conn.execute(select(S.ledger.c.unit, S.ledger.c.amount)
                                       .where(S.ledger.c.task_id == task_id)).all())

    def lines(self, name: str) -> list[dict]:
        path = self.synthetic / name
        return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []

    def stats(self) -> dict:
        return json.loads((self.synthetic / "stats.json").read_text())


@pytest.mark.slow  # two coordinator processes per case, one of them killed
@pytest.mark.parametrize("where", ["commit:journal", "commit:fingerprints", "commit:written"])
def test_generate_reupload_after_a_kill_in_the_commit_window_is_credited_once_and_stored_once(
        tmp_path, db_url, where, tokenizer_dir):  # noqa: F811 - the fixture imported above
    s = Setup(tmp_path, db_url)
    data = generate_upload(IDS, TEXTS[:3])
    grant = s.crash_during_complete("generate", generate_payload(IDS), data, where)
    if where == "commit:fingerprints":  # and a kill in the middle of the next append: a torn line
        with open(s.synthetic / "generated.jsonl", "a", encoding="utf-8") as f:
            f.write('{"id": "p1/0", "prompt_id": "p1", "answ')
    out, port, proc = s.upload_again(grant, data)
    try:
        assert out.accepted and out.credited, out.message
        assert s.task_state(grant.task_id) == "done"
        assert s.credits(grant.task_id) == [("tasks", 1.0), ("tokens_generated", 300.0)]
        rows = s.lines("generated.jsonl")
        assert sorted(r["id"] for r in rows) == ["p1/0", "p2/0", "p3/0"]
        assert [r["messages"][-1]["content"] for r in sorted(rows, key=lambda r: r["id"])] == TEXTS[:3]
        assert {r["task_id"] for r in rows} == {grant.task_id}
        assert s.stats()["generate"]["accepted"] == 3 and s.stats()["generate"]["tokens"] == 300
        # the duplicate index survived: the same texts for another task are refused
        other = s.sched.add_task("generate", generate_payload(["q1", "q2", "q3"]))
        with CoordinatorClient(f"127.0.0.1:{port}", TOKEN, timeout=10, retry_for=5) as c:
            t = c.lease(c.register("w2", kinds=["generate"]).worker_id, ["generate"]).task
            assert t.task_id == other
            with pytest.raises(grpc.RpcError) as err:
                c.complete(t.task_id, t.lease_id, generate_upload(["q1", "q2", "q3"], TEXTS[:3]),
                           {"output_tokens": 1.0})
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exact_duplicate 3" in err.value.details()
    finally:
        proc.kill()
        proc.wait()
    assert len(s.lines("generated.jsonl")) == 3
    # what `plan` shards (dedup off, as plan.shard_accepted builds it): each record once
    manifest = build_shards([s.synthetic / "generated.jsonl"], tokenizer_dir, tmp_path / "shards",
                            ShardConfig(source="synthetic", workers=1, dedup=False, shard_tokens=1 << 20))
    assert manifest.documents == 3


@pytest.mark.slow  # two coordinator processes, one of them killed
def test_judge_reupload_after_a_kill_in_the_commit_window_stores_each_pair_once(tmp_path, db_url):
    s = Setup(tmp_path, db_url)
    grant = s.crash_during_complete("judge", judge_payload(), judge_upload(), "commit:written")
    assert len(s.lines("dpo.jsonl")) == 2  # written before the kill, with no completed task
    out, _, proc = s.upload_again(grant, judge_upload())
    proc.kill()
    proc.wait()
    assert out.accepted and out.credited, out.message
    assert s.credits(grant.task_id) == [("tasks", 1.0), ("tokens_generated", 24.0)]
    rows = s.lines("dpo.jsonl")
    assert sorted(r["prompt_id"] for r in rows) == IDS[:2] and {r["task_id"] for r in rows} == {grant.task_id}
    assert s.stats()["judge"]["accepted"] == 2 and s.stats()["judge"]["tokens"] == 24


# ---- the same keying, through the validator alone (no processes) ----------------------------------------------

def test_a_commit_repeated_without_its_transaction_replaces_instead_of_adding(tmp_path):
    """What the crash window amounts to for the validator: commit() ran, the transaction did not, the state is
    reloaded from disk (a restart), the same upload is checked and committed again."""
    cfg = SimpleNamespace(state_dir=tmp_path)
    payload, data = generate_payload(IDS), generate_upload(IDS, [*TEXTS[:2], "短すぎる"])  # the third is too short
    v = GenerateValidator().bind(cfg)
    assert dict((c.unit, c.amount) for c in v.check_result(payload, {}, 1.0, data))["tokens_generated"] == 200
    v.commit("t1", payload, data)
    forget_states()
    v = GenerateValidator().bind(cfg)
    assert dict((c.unit, c.amount) for c in v.check_result(payload, {}, 1.0, data))["tokens_generated"] == 200
    v.commit("t1", payload, data)
    rows = [json.loads(x) for x in (tmp_path / "synthetic" / "generated.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["p1/0", "p2/0"]
    stats = json.loads((tmp_path / "synthetic" / "stats.json").read_text())["generate"]
    assert stats == {"accepted": 2, "tokens": 200, "rejected": {"too_short": 1}}
    # another task with other prompts but the same texts: duplicates of t1's records, not of itself
    other = generate_payload(["x1", "x2", "x3"])
    with pytest.raises(ValueError, match="exact_duplicate 2"):
        v.check_result(other, {}, 1.0, generate_upload(["x1", "x2", "x3"], [*TEXTS[:2], "短すぎる"]))
    live = json.loads((tmp_path / "synthetic" / "stats.json").read_text())
    assert live["generate"]["rejected"] == {"too_short": 2, "exact_duplicate": 2}  # refusals add up
    forget_states()
    assert SyntheticState(tmp_path / "synthetic").stats == live  # the journal folds to the same counters


def test_a_state_dir_from_before_the_journal_keeps_its_index_and_counters(tmp_path):
    root = tmp_path / "synthetic"
    root.mkdir()
    old = SyntheticState(tmp_path / "scratch")
    key, sig = old.dedup.fingerprint(TEXTS[0])
    rec = np.zeros(1, dtype=[("key", "<u8"), ("sig", "<u4", (old.dedup.num_perm,))])
    rec[0] = (key, sig)
    (root / "fingerprints.bin").write_bytes(rec.tobytes())
    counters = {"generate": {"accepted": 1, "tokens": 100, "rejected": {"language": 2}}}
    (root / "stats.json").write_text(json.dumps(counters))
    state = SyntheticState(root)
    assert state.dedup.check(TEXTS[0]) == "exact_duplicate" and state.stats == counters
    assert not (root / "fingerprints.bin").exists() and (root / "journal.jsonl").exists()
    assert SyntheticState(root).stats == counters
