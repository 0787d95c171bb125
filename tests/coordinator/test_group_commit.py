"""Group commit (SQLite): the RPC handlers' transactions share one commit per event-loop turn, and
nothing is acknowledged before it is committed. See Store.group_commits."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from coordinator import store as S
from tests.coordinator.conftest import Coord

EVAL = {"loss": 2.5, "tokens": 500}


def _count(db_path, sql: str, *args) -> int:
    """Read through a connection of its own: sees committed rows only."""
    with sqlite3.connect(db_path) as conn:
        return conn.execute(sql, args).fetchone()[0]


def test_transactions_of_one_loop_turn_share_a_commit_and_a_failing_one_rolls_back_alone(tmp_path):
    db_path = tmp_path / "c.db"
    store = S.Store.open(f"sqlite:///{db_path}")
    insert = store.sql("INSERT INTO tokens (name, hash, created) VALUES (:n, :h, 0.0)")

    async def main():
        store.group_commits(asyncio.get_running_loop())
        with store.hot() as cur:
            cur.execute(insert, {"n": "a", "h": "1"})
        group = store.pending_commit()
        with pytest.raises(RuntimeError), store.hot() as cur:  # same turn: a savepoint in the same group
            cur.execute(insert, {"n": "b", "h": "2"})
            raise RuntimeError("refused")
        with store.hot() as cur:
            cur.execute(insert, {"n": "c", "h": "3"})
        assert store.pending_commit() is group and store.group_uses == 3
        assert _count(db_path, "SELECT count(*) FROM tokens") == 0  # not committed yet: nobody was answered
        await group
        assert store.pending_commit() is None
        assert _count(db_path, "SELECT count(*) FROM tokens") == 2
        assert _count(db_path, "SELECT count(*) FROM tokens WHERE name = 'b'") == 0
        # tx() on the loop's thread commits the open group first instead of waiting for it
        with store.hot() as cur:
            cur.execute(insert, {"n": "d", "h": "4"})
        group = store.pending_commit()
        store.add_token("e", "5")
        assert group.done() and _count(db_path, "SELECT count(*) FROM tokens") == 4

    asyncio.run(main())
    store.close()


def test_every_acknowledged_rpc_is_committed_under_concurrent_load(tmp_path):
    coord = Coord(tmp_path, f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}")
    db_path = tmp_path / "state" / "coordinator.db"
    try:
        coord.add_eval(48)
        errors = []

        def client_loop():
            try:
                c = coord.client()
                wid = c.register("w").worker_id
                for _ in range(4):
                    t = c.lease(wid, ["eval"]).task
                    assert _count(db_path, "SELECT count(*) FROM leases WHERE id = ? AND state = 'active'",
                                  t.lease_id) == 1
                    (st,) = c.heartbeat(wid, [(t.lease_id, 0.5)]).leases
                    assert _count(db_path, "SELECT count(*) FROM leases WHERE id = ? AND progress = 0.5",
                                  t.lease_id) == 1
                    assert c.complete(t.task_id, t.lease_id, b"x" * 64, EVAL).accepted
                    assert _count(db_path, "SELECT count(*) FROM results WHERE task_id = ?", t.task_id) == 1
                    assert _count(db_path, "SELECT count(*) FROM ledger WHERE task_id = ?", t.task_id) == 2
            except Exception as exc:  # reported below with its traceback
                errors.append(exc)

        threads = [threading.Thread(target=client_loop) for _ in range(12)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        assert _count(db_path, "SELECT count(*) FROM tasks WHERE state = 'done'") == 48
        assert coord.store.group_uses >= 48 * 4  # the handlers did go through the group
    finally:
        coord.close()
