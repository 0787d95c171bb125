"""Swarm training on the project's shards: leases of a shard corpus, planned by the coordinator, trained on by
real worker daemons over gRPC; corrupted shards, over-claimed tokens and departed workers."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from coordinator import store as S
from coordinator.swarm import SwarmDriver, TrainValidator, init_swarm, start_bootstrap_dht
from coordinator.validate import ValidationError
from data_shards.lease import Corpus, Cursor, Lease, lease_sequences, pack_lease
from data_shards.shards import HEADER, Manifest, ShardError, ShardInfo, ShardReader, write_shard
from model.checkpoint import save_checkpoint
from tests.coordinator.conftest import OTHER_TOKEN, TOKEN, Coord
from tests.swarm.conftest import tiny_model
from tests.worker.conftest import spawn_worker
from worker.executors.train import InnerConfig, LeaseBatches, SwarmWorker
from worker.swarm import SwarmSettings

SEQ_LEN, BATCH, STEPS = 32, 2, 2


def make_shards(directory: Path, n_shards: int = 10, docs_per_shard: int = 5, seed: int = 0) -> Path:
    """A tiny corpus of random documents (ids 2..63, as the tiny MoE's vocabulary) written by data_shards."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    infos = []
    for _ in range(n_shards):
        docs = [np.concatenate([[1], rng.integers(2, 64, size=int(rng.integers(4, 50)))])
                for _ in range(docs_per_shard)]
        name, tokens, n = write_shard(directory, docs, vocab_size=64)
        infos.append(ShardInfo(name, name.removesuffix(".bin"), tokens, n, "test", "en"))
    Manifest("0" * 64, 64, infos).save(directory)
    return directory


def readers_for(directory: Path, lease: Lease) -> dict[str, ShardReader]:
    return {s.shard: ShardReader(directory / s.shard, expected_sha256=s.sha256) for s in lease.segments}


def test_leases_tile_the_corpus_disjointly_and_wrap_into_new_epochs(tmp_path):
    d = make_shards(tmp_path / "shards")
    corpus = Corpus.open(d, seed=3)
    n = STEPS * BATCH
    cursor, seen = Cursor(), {}
    for _ in range(12):  # several epochs
        leases, after = corpus.plan(cursor, 3, n, SEQ_LEN)
        assert leases == corpus.plan(cursor, 3, n, SEQ_LEN)[0]  # deterministic
        for lease in leases:
            seen.setdefault(lease.epoch, []).append((lease.start, lease.end))
            seqs, tokens = lease_sequences(Lease.from_dict(json.loads(json.dumps(lease.to_dict()))),
                                           readers_for(d, lease))
            assert len(seqs) == n and sum(tokens) == lease.tokens
            # the worker's sequences are the coordinator's packing of exactly the leased documents
            docs = [ShardReader(d / s.shard).document(i) for s in lease.segments for i in range(s.start, s.end)]
            bins = pack_lease(np.array([len(x) for x in docs]), SEQ_LEN, n)
            assert [int(q.input_ids[0]) for q in seqs] == [int(docs[b[0].doc][b[0].start]) for b in bins]
            # the smallest range that fills the lease: one document fewer does not
            assert len(pack_lease(np.array([len(x) for x in docs[:-1]]), SEQ_LEN, n)) < n
        cursor = after
    assert len(seen) >= 3, seen
    total = sum(len(r.lengths()) for r in map(ShardReader, sorted(d.glob("*.bin"))))
    for ranges in seen.values():
        assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False)), ranges
        assert ranges[-1][1] <= total
    # each epoch visits the shards in its own order
    first = [corpus.plan(Cursor(e, 0), 1, n, SEQ_LEN)[0][0].segments[0].shard for e in range(6)]
    assert len(set(first)) > 1
    with pytest.raises(ShardError, match="cannot fill one lease"):
        corpus.plan(Cursor(), 1, 10_000, SEQ_LEN)


def test_validator_refuses_tokens_beyond_the_lease(tmp_path):
    d = make_shards(tmp_path / "shards")
    lease = Corpus.open(d).plan(Cursor(), 1, STEPS * BATCH, SEQ_LEN)[0][0]
    assert lease.tokens < STEPS * BATCH * SEQ_LEN  # padding: the lease bound is tighter than H·B·T
    payload = {"round": 0, "checkpoint": "r/round_000000", "assignment": {"0": [0, 1]}, "settings": {},
               "inner": {"inner_steps": STEPS, "batch_size": BATCH, "seq_len": SEQ_LEN, "data_source": "shards",
                         "lease": lease.to_dict(), "shards_at": "swarm-r"}}
    v = TrainValidator()
    v.check_payload(payload)
    good = {"loss": 3.0, "tokens": float(lease.tokens), "delta_norm_trunk": 0.1, "delta_norm_max": 0.1}
    assert {c.unit: c.amount for c in v.check_result(payload, good, 1.0)}["tokens_trained"] == lease.tokens
    with pytest.raises(ValidationError, match="leased shard range"):
        v.check_result(payload, {**good, "tokens": float(lease.tokens + 1)}, 1.0)
    with pytest.raises(ValidationError, match="inner.lease"):
        v.check_payload({**payload, "inner": {**payload["inner"], "batch_size": BATCH + 1}})
    with pytest.raises(ValidationError, match="inner.lease"):
        v.check_payload({**payload, "inner": {**payload["inner"], "lease": {"epoch": 0}}})


def _swarm_section(shards: Path | None = None, **kw) -> dict:
    s = {"inner_steps": STEPS, "rounds": 2, "batch_size": BATCH, "micro_batch_size": BATCH, "seq_len": SEQ_LEN,
         "matchmaking_time": 2.0, "averaging_timeout": 35.0, "checkpoint_every": 1, "compression": "none",
         "inner_warmup_steps": 0, **kw}
    if shards is not None:
        s["shards"] = str(shards)
    return s


def test_a_departed_worker_gets_no_slot(tmp_path):
    """Two workers register over gRPC; only bob keeps talking to the coordinator. Once alice is silent for
    longer than the lease duration, the next round is planned for bob alone. A worker that said it runs
    no train tasks never gets a slot."""
    coord = Coord(tmp_path, f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}", swarm=_swarm_section())
    try:
        init_swarm(coord.cfg.state_dir, coord.cfg.run, save_checkpoint(tmp_path / "moe", tiny_model()))
        driver = SwarmDriver(coord.cfg, coord.store, coord.scheduler)
        caps = {"devices": [("cpu", "cpu", 0)], "host_memory_bytes": 8 * 2**30}
        alice, bob = coord.client(TOKEN), coord.client(OTHER_TOKEN)
        a = alice.register("alice", **caps).worker_id
        b = bob.register("bob", kinds=["generate", "train"], **caps).worker_id
        bob.register("bob-writer", kinds=["generate", "judge"], **caps)  # live, but runs no train tasks
        time.sleep(0.3)  # the sweeper writes last_seen
        assert set(driver._capacities()) == {a, b}
        end = time.monotonic() + driver.live_window_s() + 1.0
        while time.monotonic() < end:  # bob heartbeats as an idle daemon does; alice has left
            bob.heartbeat(b)
            time.sleep(0.2)
        assert set(driver._capacities()) == {b}
        driver.step()
        status = json.loads((coord.cfg.state_dir / "swarm" / f"{coord.cfg.run}.json").read_text())
        assert list(status["assignment"]) == [b] and len(status["tasks"]) == 1
    finally:
        coord.close()


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
                  swarm=_swarm_section(shards), leases={"duration_s": 5.0, "heartbeat_interval_s": 0.5})
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


def test_the_swarm_shards_key_resolves_against_the_project_file_and_is_published(tmp_path):
    import yaml

    from coordinator.config import load_project
    from coordinator.swarm import publish_shards

    make_shards(tmp_path / "data" / "train")
    project = tmp_path / "project.yaml"
    project.write_text(yaml.safe_dump({"run": "r", "state_dir": "state", "swarm": {"shards": "data/train"}}))
    cfg = load_project(project)
    assert cfg.swarm.shards == (tmp_path / "data" / "train").resolve()
    project.write_text(yaml.safe_dump({"run": "r", "state_dir": "state", "swarm": {"shards": "data/nope"}}))
    with pytest.raises(ValueError, match="swarm.shards: .*no manifest.json"):
        load_project(project)
    # outside the state directory: linked into shards/NAME; inside shards/: served where it is
    assert publish_shards(cfg.swarm.shards, cfg.state_dir, "swarm-r") == "swarm-r"
    files = sorted(p.name for p in (cfg.state_dir / "shards" / "swarm-r").iterdir())
    assert files == sorted(p.name for p in cfg.swarm.shards.iterdir())
    assert publish_shards(cfg.state_dir / "shards" / "swarm-r", cfg.state_dir, "other") == "swarm-r"
