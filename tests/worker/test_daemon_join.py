"""The daemon's side of round tickets (worker/daemon.py), in-process against a real coordinator on loopback:
it pins the coordinator's ticket key at the first Register and refuses to run when a later coordinator names
another (a coordinator that changed keys, or a plaintext path between them, could otherwise sign any group);
a task's `ctx.join` joins its round with the task's own lease."""

from __future__ import annotations

import json

import pytest

from coordinator.server import CoordinatorServer
from coordinator.swarm_driver import SwarmDriver, init_swarm
from model.checkpoint import save_checkpoint
from swarm.ticket import SignedTicket, verify_ticket
from tests.conftest import tiny_model
from tests.coordinator.conftest import OTHER_TOKEN, TOKEN, Coord
from tests.coordinator.test_swarm_join import CAPS, P, Q
from tests.data_shards.tiny_shards import swarm_section
from worker.daemon import TICKET_KEY_FILE, Daemon, WorkerConfig
from worker.executors import TaskError


def swarm_coord(tmp_path) -> Coord:
    return Coord(tmp_path, f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}", swarm=swarm_section(),
                 leases={"duration_s": 300, "heartbeat_interval_s": 5})


def daemon(coord: Coord, cache_dir) -> Daemon:
    return Daemon(WorkerConfig(coordinator=coord.target, token=TOKEN, kinds=["eval"], cache_dir=cache_dir,
                               benchmark=False))


def test_the_daemon_pins_the_ticket_key_and_refuses_a_coordinator_with_another(tmp_path):
    coord = swarm_coord(tmp_path)
    cache = tmp_path / "worker"
    pin = cache / TICKET_KEY_FILE
    try:
        key = coord.client().register("probe").settings["ticket_key"]
        d = daemon(coord, cache)
        assert d.register() and d.register()  # a second Register naming the same key is fine
        assert pin.read_text().strip() == key and d.settings["ticket_key"] == key
        d.client.close()
    finally:
        coord.close()
    # the organizer's key is gone (rotated): the coordinator starts with a new one
    (coord.cfg.state_dir / "keys" / "ticket_ed25519").unlink()
    server = CoordinatorServer(coord.cfg, db_url=coord.db_url, listen="127.0.0.1:0").start()
    try:
        coord.target = f"127.0.0.1:{server.port}"
        with pytest.raises(ValueError) as err:
            daemon(coord, cache).run()
        assert str(pin) in str(err.value) and "delete" in str(err.value) and "rotated" in str(err.value)
        assert pin.read_text().strip() == key  # the pin stands
        pin.unlink()  # what the message says to do
        d = daemon(coord, cache)
        assert d.register() and d.settings["ticket_key"] != key
        assert pin.read_text().strip() == d.settings["ticket_key"]
        d.client.close()
    finally:
        server.stop(grace=0.5)


def test_ctx_join_joins_the_tasks_round_with_its_lease(tmp_path):
    coord = swarm_coord(tmp_path)
    try:
        init_swarm(coord.cfg.state_dir, coord.cfg.run, save_checkpoint(tmp_path / "moe", tiny_model()))
        d = daemon(coord, tmp_path / "worker")
        assert d.register()
        bob = coord.client(OTHER_TOKEN)
        b_wid = bob.register("bob", **CAPS).worker_id
        coord.client(TOKEN).register("alice", **CAPS)  # a slot for alice's token (the daemon said: eval only)
        SwarmDriver(coord.cfg, coord.store, coord.scheduler, joins=coord.server.joins).step()  # 2 slots
        task = d.client.lease(d.worker_id, ["train"]).task
        other = bob.lease(b_wid, ["train"]).task
        seen = {}

        def fake_train(ctx):  # stands in for the train executor: joins, then gives the task back
            seen["early"] = ctx.join(P)  # bob's slot has not joined yet
            seen["bob"] = bob.join(b_wid, other.task_id, other.lease_id, Q).ready  # the last slot: frozen
            try:
                ctx.join(Q)  # bob's peer
            except TaskError as e:
                seen["refused"] = str(e)
            seen["ticket"] = ctx.join(P)
            seen["key"] = ctx.settings["ticket_key"]
            raise TaskError("the test stops here")

        d.executors._built["train"] = fake_train
        d.kinds.append("train")  # the daemon runs only the kinds it leases (it registered for eval)
        d.run_task(task)
        assert seen["early"] is None and seen["bob"]
        assert "PERMISSION_DENIED" in seen["refused"] and "one peer, one slot" in seen["refused"]
        signed = seen["ticket"]
        assert isinstance(signed, SignedTicket)
        ticket = verify_ticket(seen["key"], signed.body, signed.signature)
        assert (ticket.peer_id, ticket.slot) == (P, json.loads(task.payload_json)["slot"])
        assert set(ticket.members("trunk")) == {P, Q}
        d.client.close()
    finally:
        coord.close()


def test_a_task_whose_ids_could_name_paths_is_refused_before_anything_runs(tmp_path, caplog):
    """A coordinator (malicious, or anyone on a plaintext path) hands out a task id `../../evil`: the daemon
    refuses it before the id names a work dir or a spool file, and runs nothing."""
    import logging

    coord = Coord(tmp_path, f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}")
    try:
        coord.scheduler.add_tasks("eval", [("../../evil", {"checkpoint": "c", "shard": "s", "shard_tokens": 10})])
        d = daemon(coord, tmp_path / "worker")
        assert d.register()
        task = d.client.lease(d.worker_id, ["eval"]).task
        assert task.task_id == "../../evil"
        ran = []
        d.executors._built["eval"] = ran.append
        with caplog.at_level(logging.ERROR, logger="worker"):
            d.run_task(task)
        assert ran == [] and any("malformed task id" in r.getMessage() for r in caplog.records)
        assert not any("evil" in p.name for p in tmp_path.rglob("*"))
        d.client.close()
    finally:
        coord.close()
