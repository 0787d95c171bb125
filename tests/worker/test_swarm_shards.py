"""Swarm training on the project's shards: leases of a shard corpus, planned by the coordinator, trained on by
real worker daemons over gRPC; corrupted shards, over-claimed tokens and departed workers."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from coordinator import store as S
from coordinator.swarm_driver import SwarmDriver, init_swarm, start_bootstrap_dht
from data_shards.lease import Corpus, Cursor, Lease, lease_sequences
from data_shards.shards import HEADER, ShardReader
from model.checkpoint import save_checkpoint
from swarm.round import LeaseBatches, SwarmWorker
from swarm.settings import InnerConfig, SwarmSettings
from tests.conftest import tiny_model
from tests.coordinator.conftest import OTHER_TOKEN, TOKEN, Coord
from tests.data_shards.tiny_shards import BATCH, SEQ_LEN, STEPS, make_shards, readers_for, swarm_section
from tests.worker.conftest import spawn_worker

pytestmark = pytest.mark.slow  # spawned worker daemons and real hivemind peers, two rounds


def _corrupt(path: Path) -> None:
    """Flip the first token bytes: the header and offsets stay valid, only the SHA-256 tells."""
    r = ShardReader(path)
    at = HEADER.size + 8 * (r.num_documents + 1)
    data = bytearray(path.read_bytes())
    data[at:at + 4] = bytes(b ^ 0xFF for b in data[at:at + 4])
    path.write_bytes(bytes(data))


def _rows(coord, table, *where):
    with coord.store.read() as conn:
        return conn.execute(select(table).where(*where)).all()


def test_two_daemons_train_on_disjoint_leases_and_a_corrupted_shard_fails_its_task(tmp_path):
    """A real coordinator (gRPC, bootstrap DHT, swarm driver) and two `mujina-worker run` daemons, round 0:
    each task trains on its own lease (the loss is exactly a local replay on the leased sequences; the tokens
    reported and credited are the lease's). Round 1: one lease reads a corrupted shard; that task fails with a
    clear message and earns nothing, the other is credited, and the run completes."""
    shards = make_shards(tmp_path / "corpus")
    corpus = Corpus.open(shards, seed=0)
    r0, cursor = corpus.plan(Cursor(), 2, STEPS * BATCH, SEQ_LEN)
    r1, _ = corpus.plan(cursor, 2, STEPS * BATCH, SEQ_LEN)
    used0 = {s.shard for lease in r0 for s in lease.segments}
    only = [s.shard for i, lease in enumerate(r1) for s in lease.segments
            if s.shard not in used0 and all(s.shard not in {t.shard for t in o.segments} for o in r1[:i] + r1[i + 1:])]
    assert only, "the corpus should give round 1 a shard of its own"
    bad = only[0]
    _corrupt(shards / bad)  # before anything reads it: the coordinator only reads shard headers and offsets

    dht, peers = start_bootstrap_dht("127.0.0.1")
    coord = Coord(tmp_path, f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}", server={"bootstrap_peers": peers},
                  swarm=swarm_section(shards), leases={"duration_s": 5.0, "heartbeat_interval_s": 0.5})
    state = coord.cfg.state_dir
    init_swarm(state, coord.cfg.run, save_checkpoint(tmp_path / "moe", tiny_model()))
    procs, driver = [], None
    try:
        procs = [spawn_worker(coord.target, tmp_path / who, "--kinds", "train", token=tok)
                 for who, tok in (("a", TOKEN), ("b", OTHER_TOKEN))]
        deadline = time.monotonic() + 120
        while len(_rows(coord, S.workers)) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "daemons did not register"
            time.sleep(0.2)
        driver = SwarmDriver(coord.cfg, coord.store, coord.scheduler, poll_s=0.2).start()
        status_path = state / "swarm" / f"{coord.cfg.run}.json"
        round0: list[str] = []
        while True:
            status = json.loads(status_path.read_text())
            if status["round"] == 0 and status["tasks"]:
                round0 = list(status["tasks"])
            if status["round"] >= 2:
                break
            logs = "\n".join((tmp_path / f"{w}.log").read_text()[-3000:] for w in "ab")
            assert time.monotonic() < deadline + 120, f"the run did not finish:\n{logs}"
            assert all(p.poll() is None for p in procs), f"a daemon exited:\n{logs}"
            time.sleep(0.3)

        tasks = {t.id: t for t in _rows(coord, S.tasks, S.tasks.c.kind == "train")}
        results = {r.task_id: r for r in _rows(coord, S.results)}
        ledger = {(r.task_id, r.unit): r.amount for r in _rows(coord, S.ledger)}
        # round 0: the planned leases, disjoint, each trained exactly
        leases0 = [json.loads(tasks[t].payload)["inner"]["lease"] for t in round0]
        assert sorted(leases0, key=lambda x: x["start"]) == [lease.to_dict() for lease in r0]
        for t in round0:
            payload = json.loads(tasks[t].payload)
            lease = Lease.from_dict(payload["inner"]["lease"])
            metrics = json.loads(results[t].metrics)
            assert tasks[t].state == "done" and metrics["tokens"] == lease.tokens
            assert ledger[(t, "tokens_trained")] == lease.tokens
            # replay the slot's inner steps locally on the leased sequences: the same loss
            inner = InnerConfig(**payload["inner"])
            w = SwarmWorker(state / "checkpoints" / payload["checkpoint"],
                            {int(k): v for k, v in payload["assignment"].items()},
                            SwarmSettings(run="replay", averaging=False), inner)
            w.use_lease(LeaseBatches.from_sequences(*lease_sequences(lease, readers_for(shards, lease))))
            replay = w.run_round(0)
            assert replay["tokens"] == lease.tokens
            assert replay["loss"] == pytest.approx(metrics["loss"], rel=1e-4)
        # round 1: the task whose lease holds the corrupted shard failed and earned nothing
        round1 = [t for t in tasks if t not in round0]
        failed = [t for t in round1 if bad in json.dumps(json.loads(tasks[t].payload)["inner"]["lease"])]
        assert len(round1) == 2 and len(failed) == 1
        f = tasks[failed[0]]
        assert f.state == "dead" and "corrupted" in f.last_error and bad in f.last_error, f.last_error
        assert failed[0] not in results and not [k for k in ledger if k[0] == failed[0]]
        (ok,) = set(round1) - set(failed)
        lease = json.loads(tasks[ok].payload)["inner"]["lease"]
        assert tasks[ok].state == "done" and ledger[(ok, "tokens_trained")] == lease["tokens"]
        # the shards were published next to the checkpoints, by content name
        assert (state / "shards" / f"swarm-{coord.cfg.run}" / bad).is_file()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if driver is not None:
            driver.stop()
        coord.close()
        dht.shutdown()


