"""Join and round tickets (coordinator/swarm_join.py) against a real gRPC server on loopback and a real SQLite:
one test per attack on who averages with whom, each asserting the honest outcome.

Reference: swarm/ticket.py's contract. A ticket names, for every module of the requester's slot, the frozen
members whose slots hold it, weighted by the tokens the coordinator leased to each slot; it verifies with the
key Register hands out. Peer ids are made-up base58 strings of libp2p's form (no hivemind needed)."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from coordinator.api import mujina_pb2 as pb
from coordinator.server import CoordinatorServer
from coordinator.swarm_driver import SwarmDriver, init_swarm
from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from swarm.memory import estimate_round_memory
from swarm.modules import held_modules
from swarm.settings import TrainPayload
from swarm.ticket import RoundTicket, TicketError, TicketKey, verify_ticket
from tests.conftest import TINY, tiny_model, wait_until
from tests.coordinator.conftest import OTHER_TOKEN, TOKEN, Coord
from tests.data_shards.tiny_shards import BATCH, SEQ_LEN, STEPS, make_shards, swarm_section

B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
CAPS = {"devices": [("cpu", "cpu", 0)], "host_memory_bytes": 8 * 2**30, "kinds": ["train"]}


def peer(n: int) -> str:
    """A made-up libp2p peer id: "12D3KooW" + 44 base58 characters."""
    return "12D3KooW" + "".join(B58[(7 * n + 3 * i) % 58] for i in range(44))


P, Q, R = peer(1), peer(2), peer(3)


class Swarm:
    """A coordinator with a swarm run and round 0 open: alice's and bob's workers each lease one slot's task
    (`a`, `b`). Leases last long enough that none expires during a test."""

    def __init__(self, tmp_path, host_memory_bytes: int = 8 * 2**30, **swarm):
        self.coord = Coord(tmp_path, f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}",
                           swarm=swarm_section(**swarm), leases={"duration_s": 300, "heartbeat_interval_s": 5})
        self.cfg = self.coord.cfg
        init_swarm(self.cfg.state_dir, self.cfg.run, save_checkpoint(tmp_path / "moe", tiny_model()))
        self._connect()
        caps = {**CAPS, "host_memory_bytes": host_memory_bytes}
        self.a_reg = self.alice.register("alice", **caps)
        self.b_reg = self.bob.register("bob", **caps)
        self.driver.step()  # opens round 0: one slot per token
        self.a = self.alice.lease(self.a_reg.worker_id, ["train"]).task
        self.b = self.bob.lease(self.b_reg.worker_id, ["train"]).task
        assert {self.a.task_id, self.b.task_id} == set(self.status()["tasks"])

    def _connect(self) -> None:
        self.driver = SwarmDriver(self.cfg, self.coord.store, self.coord.scheduler, joins=self.coord.server.joins)
        self.alice, self.bob = self.coord.client(TOKEN), self.coord.client(OTHER_TOKEN)

    def restart(self) -> None:
        """Stop the coordinator and start a new one on the same state directory and database."""
        for c in self.coord.clients:
            c.close()
        self.coord.clients.clear()
        self.coord.server.stop(grace=0.5)
        self.coord.server = CoordinatorServer(self.cfg, db_url=self.coord.db_url, listen="127.0.0.1:0").start()
        self.coord.target = f"127.0.0.1:{self.coord.server.port}"
        self.coord.store, self.coord.scheduler = self.coord.server.store, self.coord.server.scheduler
        self._connect()

    def status(self) -> dict:
        return json.loads((self.cfg.state_dir / "swarm" / f"{self.cfg.run}.json").read_text())

    def join_a(self, peer_id: str, task=None) -> pb.JoinResponse:
        task = task or self.a
        return self.alice.join(self.a_reg.worker_id, task.task_id, task.lease_id, peer_id)

    def join_b(self, peer_id: str) -> pb.JoinResponse:
        return self.bob.join(self.b_reg.worker_id, self.b.task_id, self.b.lease_id, peer_id)

    def ticket(self, r: pb.JoinResponse) -> RoundTicket:
        assert r.ready, r
        return verify_ticket(self.a_reg.settings["ticket_key"], r.ticket, r.signature)

    def close(self) -> None:
        self.coord.close()


@pytest.fixture
def make_swarm(tmp_path):
    made = []

    def make(**kw) -> Swarm:
        made.append(Swarm(tmp_path, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def modules_of(task) -> list[str]:
    return held_modules(TrainPayload.from_dict(json.loads(task.payload_json)).assignment)


def test_no_token_or_a_wrong_token_is_refused(make_swarm):
    sw = make_swarm()
    req = pb.JoinRequest(worker_id=sw.a_reg.worker_id, task_id=sw.a.task_id, lease_id=sw.a.lease_id, peer_id=P)
    code, _ = refused(lambda: sw.alice.stub.Join(req, timeout=10))  # no metadata at all
    assert code == grpc.StatusCode.UNAUTHENTICATED
    stranger = sw.coord.client("mj_not_a_token")
    code, msg = refused(lambda: stranger.join(sw.a_reg.worker_id, sw.a.task_id, sw.a.lease_id, P))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "unknown or revoked token" in msg
    # neither joined: once bob joins the round still waits for alice's slot
    assert not sw.join_b(Q).ready


def test_a_volunteer_quoting_another_tokens_lease_is_refused(make_swarm):
    sw = make_swarm()
    bob_wid = sw.b_reg.worker_id
    code, msg = refused(lambda: sw.bob.join(bob_wid, sw.a.task_id, sw.a.lease_id, P))  # alice's lease
    assert code == grpc.StatusCode.PERMISSION_DENIED and "belongs to another token" in msg
    code, msg = refused(lambda: sw.bob.join(sw.a_reg.worker_id, sw.a.task_id, sw.a.lease_id, P))  # and worker
    assert code == grpc.StatusCode.PERMISSION_DENIED and "belongs to another token" in msg
    # another worker of alice's own token may not speak for the slot either: only the lease's worker does
    other = sw.alice.register("alice-2", **CAPS).worker_id
    code, msg = refused(lambda: sw.alice.join(other, sw.a.task_id, sw.a.lease_id, P))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "another worker" in msg
    assert not sw.join_b(Q).ready  # bob's own lease joins; alice's slot has not joined
    assert sw.ticket(sw.join_a(P)).members("trunk") == {P: STEPS * BATCH * SEQ_LEN, Q: STEPS * BATCH * SEQ_LEN}


def test_a_task_not_of_the_current_round_is_refused(make_swarm):
    sw = make_swarm()
    # a train task that is not one of the round's (as a previous round's would be), leased by alice
    stale = sw.coord.scheduler.add_task("train", json.loads(sw.a.payload_json), priority=1)
    wid = sw.alice.register("alice-2", **CAPS).worker_id
    task = sw.alice.lease(wid, ["train"]).task
    assert task.task_id == stale
    code, msg = refused(lambda: sw.alice.join(wid, stale, task.lease_id, P))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "the round moved on" in msg
    # a lease that is no longer active cannot join either
    sw.alice.fail(stale, task.lease_id, pb.SHUTDOWN)
    code, msg = refused(lambda: sw.alice.join(wid, stale, task.lease_id, P))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not active" in msg


def test_one_peer_id_cannot_fill_two_slots(make_swarm):
    sw = make_swarm()
    assert not sw.join_a(P).ready
    code, msg = refused(lambda: sw.join_b(P))  # a sybil: the same peer in a second slot
    assert code == grpc.StatusCode.PERMISSION_DENIED and "one peer, one slot" in msg
    code, msg = refused(lambda: sw.join_a(R))  # one lease, one peer id
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "one peer id" in msg
    assert sw.status().get("members") is None
    assert sw.ticket(sw.join_b(Q)).peer_id == Q  # bob's own peer: the last slot joined, members frozen
    assert sw.status()["members"] == {sw.a.task_id: P, sw.b.task_id: Q}
    code, msg = refused(lambda: sw.join_b(P))  # after the freeze as well
    assert code == grpc.StatusCode.PERMISSION_DENIED and "one peer, one slot" in msg
    code, msg = refused(lambda: sw.join_a("12D3KooW-not-base58"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "base58" in msg


def test_not_ready_until_every_slot_joined_then_ready_for_all_with_identical_groups(make_swarm):
    sw = make_swarm()
    first = sw.join_a(P)
    assert not first.ready and first.retry_s == 0.5 and not first.ticket
    assert not sw.join_a(P).ready  # asking again changes nothing
    assert "members" not in sw.status()
    tb = sw.ticket(sw.join_b(Q))
    ta = sw.ticket(sw.join_a(P))
    status = sw.status()
    assert status["members"] == {sw.a.task_id: P, sw.b.task_id: Q}
    tokens = float(STEPS * BATCH * SEQ_LEN)  # synthetic data: every slot trains H · B · T tokens
    for t, task, me in ((ta, sw.a, P), (tb, sw.b, Q)):
        payload = json.loads(task.payload_json)
        assert (t.run, t.round, t.slot, t.peer_id) == (sw.cfg.run, 0, payload["slot"], me)
        assert t.expires == status["opened_at"] + sw.cfg.swarm.round_timeout_s
        assert sorted(t.groups) == sorted(modules_of(task))
        assert all(t.members(m) == {P: tokens, Q: tokens} for m in t.groups)  # both slots hold every module
    assert ta.groups == tb.groups


def test_each_group_names_only_the_members_whose_slot_holds_its_module(make_swarm):
    two = estimate_round_memory(ModelConfig.from_dict(TINY), 2, micro_batch_size=BATCH, seq_len=SEQ_LEN).total
    sw = make_swarm(host_memory_bytes=two)  # room for 2 of the 4 experts: the slots hold disjoint experts
    sw.join_a(P)
    tb, ta = sw.ticket(sw.join_b(Q)), sw.ticket(sw.join_a(P))
    tokens = STEPS * BATCH * SEQ_LEN
    a_experts, b_experts = set(modules_of(sw.a)) - {"trunk"}, set(modules_of(sw.b)) - {"trunk"}
    assert len(a_experts) == len(b_experts) == 2 and not a_experts & b_experts
    for t, own, experts in ((ta, P, a_experts), (tb, Q, b_experts)):
        assert set(t.groups) == {"trunk"} | experts  # every module of its own slot, no other
        assert t.members("trunk") == {P: tokens, Q: tokens}
        assert all(t.members(m) == {own: tokens} for m in experts)


def test_the_ticket_verifies_with_the_key_from_register_and_a_tampered_one_does_not(make_swarm):
    sw = make_swarm()
    key = sw.a_reg.settings["ticket_key"]
    assert key == sw.b_reg.settings["ticket_key"] == TicketKey.load_or_create(
        sw.cfg.state_dir / "keys" / "ticket_ed25519").public_hex
    sw.join_a(P)
    r = sw.join_b(Q)
    assert verify_ticket(key, r.ticket, r.signature).peer_id == Q
    heavier = r.ticket.replace(str(STEPS * BATCH * SEQ_LEN).encode(), b"1000000")  # a worker inflating weights
    assert heavier != r.ticket
    for body, with_key in ((heavier, key), (r.ticket, TicketKey.generate().public_hex)):
        with pytest.raises(TicketError, match="not the coordinator's"):
            verify_ticket(with_key, body, r.signature)


def test_weights_are_the_tokens_leased_to_each_slot(make_swarm, tmp_path):
    sw = make_swarm(shards=make_shards(tmp_path / "shards"))
    leased = {task.task_id: json.loads(task.payload_json)["inner"]["lease"]["tokens"] for task in (sw.a, sw.b)}
    assert leased[sw.a.task_id] != leased[sw.b.task_id]  # (103 and 120 of 128: real tokens of packed sequences)
    # the worker reports as much as it likes: progress, then Join again; the weights are the coordinator's
    sw.alice.heartbeat(sw.a_reg.worker_id, [(sw.a.lease_id, 1.0)])
    sw.join_a(P)
    ticket = sw.ticket(sw.join_b(Q))
    assert sw.ticket(sw.join_a(P)).groups == ticket.groups
    want = {P: float(leased[sw.a.task_id]), Q: float(leased[sw.b.task_id])}
    assert all(ticket.members(m) == want for m in ticket.groups), (ticket.groups, want)


def test_a_slot_that_never_joined_is_left_out_after_the_join_timeout(make_swarm):
    sw = make_swarm(join_timeout_s=0.2)
    assert not sw.join_a(P).ready
    opened = sw.status()["opened_at"]
    wait_until(lambda: time.time() > opened + 0.2, "the join timeout to pass", every=0.05)
    assert not sw.join_a(P).ready  # the freeze is the driver's: nothing changes until it steps
    sw.driver.step()
    assert sw.status()["members"] == {sw.a.task_id: P}
    ta = sw.ticket(sw.join_a(P))
    assert all(ta.members(m) == {P: STEPS * BATCH * SEQ_LEN} for m in ta.groups)
    # bob's slot joins late: a ticket in which it is a member of no group, and no group names it
    tb = sw.ticket(sw.join_b(Q))
    assert tb.peer_id == Q and all(tb.members(m) == {} and Q not in tb.groups[m] for m in tb.groups)
    assert all(tb.groups[m] == {P: STEPS * BATCH * SEQ_LEN} for m in tb.groups)
    assert sw.status()["members"] == {sw.a.task_id: P}


def test_a_restarted_coordinator_serves_the_same_members(make_swarm):
    sw = make_swarm()
    sw.join_a(P)
    before = sw.join_b(Q)
    assert before.ready
    sw.restart()
    assert sw.bob.register("bob-again", **CAPS).settings["ticket_key"] == sw.a_reg.settings["ticket_key"]
    after = sw.join_b(Q)  # served from the status file's members: alice need not join again
    assert (after.ticket, after.signature) == (before.ticket, before.signature)
    assert sw.ticket(sw.join_a(P)).groups == sw.ticket(after).groups


def test_joins_before_the_freeze_are_asked_again_after_a_restart(make_swarm):
    sw = make_swarm()
    assert not sw.join_a(P).ready
    sw.restart()  # joins before the freeze lived in memory: alice's is gone
    assert not sw.join_b(Q).ready
    assert sw.join_a(P).ready  # alice's worker, polling, joins again
    assert sw.status()["members"] == {sw.a.task_id: P, sw.b.task_id: Q}


def test_a_slot_re_leased_before_the_freeze_takes_its_new_peer(make_swarm):
    sw = make_swarm()
    assert not sw.join_a(P).ready
    sw.alice.fail(sw.a.task_id, sw.a.lease_id, pb.SHUTDOWN, "the worker was stopped")
    again = sw.alice.lease(sw.a_reg.worker_id, ["train"]).task
    assert again.task_id == sw.a.task_id and again.lease_id != sw.a.lease_id
    code, _ = refused(lambda: sw.join_a(P))  # the old lease is over
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert not sw.join_a(R, again).ready
    assert sw.join_b(P).ready  # P left the round with the old lease: bob's worker may be P
    assert sw.status()["members"] == {sw.a.task_id: R, sw.b.task_id: P}


def test_a_slot_re_leased_after_the_freeze_gets_a_ticket_in_which_it_is_no_member(make_swarm):
    sw = make_swarm()
    sw.join_a(P)
    assert sw.join_b(Q).ready
    sw.alice.fail(sw.a.task_id, sw.a.lease_id, pb.SHUTDOWN, "the worker was stopped")
    again = sw.alice.lease(sw.a_reg.worker_id, ["train"]).task
    assert again.task_id == sw.a.task_id
    t = sw.ticket(sw.join_a(R, again))
    assert (t.peer_id, t.slot) == (R, json.loads(again.payload_json)["slot"])
    tokens = STEPS * BATCH * SEQ_LEN
    assert all(t.members(m) == {} and t.groups[m] == {P: tokens, Q: tokens} for m in t.groups)
    assert sw.status()["members"] == {sw.a.task_id: P, sw.b.task_id: Q}
    code, msg = refused(lambda: sw.join_b(R))  # R is the re-leased slot's peer now: not bob's too
    assert code == grpc.StatusCode.PERMISSION_DENIED and "one peer, one slot" in msg


def test_a_driver_writing_an_older_copy_of_the_status_keeps_the_frozen_members(make_swarm):
    sw = make_swarm()
    older = sw.driver._status()  # read by the driver before the freeze (its step runs beside the server)
    sw.join_a(P)
    assert sw.join_b(Q).ready
    sw.driver._write_status(older)
    assert sw.status()["members"] == {sw.a.task_id: P, sw.b.task_id: Q}


def test_the_members_are_cleared_when_the_round_closes(make_swarm):
    sw = make_swarm(round_timeout_s=0.5)
    sw.join_a(P)
    assert sw.join_b(Q).ready
    opened = sw.status()["opened_at"]
    wait_until(lambda: time.time() > opened + 0.5, "the round's deadline to pass", every=0.05)
    sw.driver.step()  # cancels both unfinished slots and closes round 0
    status = sw.status()
    assert status["round"] == 1 and status["tasks"] == [] and "members" not in status
    code, _ = refused(lambda: sw.join_a(P))  # the cancelled lease of round 0
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    sw.driver.step()  # opens round 1: its slots join afresh, with the same peers
    a = sw.alice.lease(sw.a_reg.worker_id, ["train"]).task
    b = sw.bob.lease(sw.b_reg.worker_id, ["train"]).task
    assert not sw.alice.join(sw.a_reg.worker_id, a.task_id, a.lease_id, P).ready
    t = sw.ticket(sw.bob.join(sw.b_reg.worker_id, b.task_id, b.lease_id, Q))
    assert t.round == 1 and sw.status()["members"] == {a.task_id: P, b.task_id: Q}
