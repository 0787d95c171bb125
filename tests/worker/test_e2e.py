"""Whole pipeline on loopback: a coordinator and two worker daemons (subprocesses) go through
plan -> generate -> judge -> validate -> shard -> credit; then SIGTERM and kill -9 in the middle of a task."""

from __future__ import annotations

import json
import signal
import time

import pytest
from sqlalchemy import func, select

from coordinator import store as S
from coordinator.plan import plan
from tests.coordinator.conftest import OTHER_TOKEN, Coord
from tests.worker.conftest import spawn_worker, synthetic_section

pytestmark = pytest.mark.slow  # a coordinator and spawned worker daemons through the whole pipeline


def counts(coord, kind):
    with coord.store.read() as conn:
        return dict(conn.execute(select(S.tasks.c.state, func.count()).where(S.tasks.c.kind == kind)
                                 .group_by(S.tasks.c.state)).all())


def wait_for(pred, what, procs=(), limit=180.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if pred():
            return
        for p in procs:
            assert p.poll() is None, f"a worker exited early ({p.returncode}) while waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_plan_generate_judge_validate_shard_credit(tmp_path, teacher_dir, shard_tokenizer):
    from data_shards.loader import ShardSource, SourceSpec

    coord = Coord(tmp_path, f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}",
                  synthetic=synthetic_section(tmp_path, teacher_dir, shard_tokenizer))
    workers = []
    try:
        assert plan(coord.cfg, coord.scheduler)["generate"] == 4
        teachers = ("--teacher", f"tiny={teacher_dir}", "--kinds", "generate,judge")
        workers = [spawn_worker(coord.target, tmp_path / "w1", *teachers),
                   spawn_worker(coord.target, tmp_path / "w2", *teachers, token=OTHER_TOKEN)]
        wait_for(lambda: counts(coord, "generate").get("done") == 4, "4 generate tasks", workers)
        synthetic = coord.cfg.state_dir / "synthetic"
        accepted = [json.loads(x) for x in (synthetic / "generated.jsonl").read_text().splitlines()]
        added = plan(coord.cfg, coord.scheduler)
        assert added["judge"] == 1 and added["generate"] == 0 and added["shards"] == 1
        wait_for(lambda: counts(coord, "judge").get("done") == 1, "the judge task", workers)
        for w in workers:
            w.send_signal(signal.SIGTERM)
        assert [w.wait(timeout=60) for w in workers] == [0, 0]
        logs = (tmp_path / "w1.log").read_text() + (tmp_path / "w2.log").read_text()
        assert "idle: no work" in logs and "SIGTERM: leasing nothing more" in logs
        # shards: every accepted record, readable by the loader, loss on the answers only
        src = ShardSource(SourceSpec(str(synthetic / "shards"), 1.0), seq_len=256, seed=0)
        assert src.num_documents == len(accepted) and src.mask_of(0) is not None
        # credit: accepted output tokens for generate, the judge's tokens for judge, split by volunteer
        with coord.store.read() as conn:
            credit = conn.execute(select(S.ledger.c.kind, func.sum(S.ledger.c.amount))
                                  .where(S.ledger.c.unit == "tokens_generated").group_by(S.ledger.c.kind)).all()
            volunteers = set(conn.execute(select(S.ledger.c.volunteer)).scalars())
        credit = dict(credit)
        assert credit["generate"] == sum(r["output_tokens"] for r in accepted) > 0
        assert credit["judge"] > 0 and volunteers <= {"alice", "bob"}
        stats = json.loads((synthetic / "stats.json").read_text())
        assert stats["generate"]["accepted"] == len(accepted)
        assert stats["judge"]["rejected"].get("unparseable", 0) + stats["judge"]["accepted"] >= 1
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        coord.close()


def test_sigterm_hands_the_lease_back_and_a_killed_worker_loses_its_task(tmp_path, teacher_dir):
    slow = {"sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 600, "seed": 0}, "batch_size": 1,
            "max_prompts": 1}
    coord = Coord(tmp_path, f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}",
                  synthetic=synthetic_section(tmp_path, teacher_dir, **slow))
    args = ("--teacher", f"tiny={teacher_dir}", "--kinds", "generate")
    try:
        plan(coord.cfg, coord.scheduler)
        with coord.store.read() as conn:
            assert conn.execute(select(func.count()).select_from(S.tasks)).scalar_one() == 2

        def leased():
            return counts(coord, "generate").get("leased", 0) == 1

        a = spawn_worker(coord.target, tmp_path / "a", *args)
        wait_for(leased, "worker a's lease", [a])
        wait_for(lambda: "loading teacher" in (tmp_path / "a.log").read_text(), "worker a's executor to start", [a])
        a.send_signal(signal.SIGTERM)
        assert a.wait(timeout=60) == 0
        with coord.store.read() as conn:
            tasks = conn.execute(select(S.tasks)).all()
        assert all(t.state in ("pending", "done") for t in tasks)
        handed_back = [t for t in tasks if (t.last_error or "").startswith("SHUTDOWN")]  # never-leased: None
        assert any(t.state == "pending" and t.attempts == 0 for t in handed_back), \
            (tmp_path / "a.log").read_text()
        b = spawn_worker(coord.target, tmp_path / "b", *args)
        wait_for(leased, "worker b's lease", [b])
        wait_for(lambda: "loading teacher" in (tmp_path / "b.log").read_text(), "worker b's executor to start", [b])
        b.kill()  # kill -9: no Fail; the lease must expire (1.5 s) and the task be redone
        b.wait()
        c = spawn_worker(coord.target, tmp_path / "c", *args, "--max-tasks", "2", token=OTHER_TOKEN)
        assert c.wait(timeout=180) == 0, (tmp_path / "c.log").read_text()
        assert counts(coord, "generate") == {"done": 2}
        with coord.store.read() as conn:
            expired = conn.execute(select(func.count()).select_from(S.leases).where(S.leases.c.state == "expired"))
            assert expired.scalar_one() == 1
            assert set(conn.execute(select(S.results.c.token)).scalars()) == {"bob"}
    finally:
        coord.close()
