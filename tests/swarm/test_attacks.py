"""Attacks on a module's averaging, with real peers on 127.0.0.1: a stranger without a ticket, a member that
lies about its weight, sends a reversed or scaled Δ, sends twice, sends garbage, or stays silent. Each test
checks the honest outcome: the applied average is what CenteredClip makes of what the honest members sent
(within the stated bound of their mean), equal on every honest member, and the liar is named in the log."""

from __future__ import annotations

import asyncio
import json
import logging
import math

import pytest
import torch

from swarm.exchange import HANDLER, SwarmExchange
from swarm.robust import centered_clip
from tests.swarm.conftest import average_on, average_together, settings, start_exchanges, ticket_all

pytestmark = pytest.mark.slow  # real hivemind peers (DHT, p2pd) on loopback

SIZE = 2000
CLOSED_EARLY = "closed early"   # a refusal that reached the sender as its stream closed under it


def honest_deltas(n: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SIZE, generator=g)
    return [base + 0.5 * torch.randn(SIZE, generator=g) for _ in range(n)], base


def send_raw(attacker: SwarmExchange, target: str, header: dict | bytes, values: torch.Tensor | None = None, *,
             weight: float = 1.0, compression: str = "none", messages=None) -> str:
    """What a hostile peer can put on the wire: any header, tensor, weight, compression, or raw messages."""
    from hivemind.compression import CompressionInfo
    from hivemind.p2p import PeerID
    from hivemind.proto import averaging_pb2
    from hivemind.utils.streaming import split_for_streaming

    from swarm.hivemind_compat import compressions

    MC = averaging_pb2.MessageCode
    if messages is None:
        head = header if isinstance(header, bytes) else json.dumps(header).encode()
        packed = compressions()[compression]().compress(values, CompressionInfo.from_tensor(values))
        messages = [averaging_pb2.AveragingData(code=MC.PART_FOR_AVERAGING, tensor_part=part, weight=weight,
                                                group_id=head if i == 0 else b"")
                    for i, part in enumerate(split_for_streaming(packed, 1 << 16))]

    async def call():
        async def stream():
            for m in messages:
                yield m
        try:
            reply = await attacker._p2p.call_protobuf_handler(PeerID.from_base58(target), HANDLER, stream(),
                                                               averaging_pb2.AveragingData)
        # it answered, and closed, before reading all of it: a broken pipe or a reset while we write, or no
        # answer at all once the stream is gone (hivemind's asingle() raises ValueError on an empty reply)
        except (BrokenPipeError, ConnectionResetError, ValueError):
            return CLOSED_EARLY
        except Exception as e:
            return f"error: {type(e).__name__}"
        return MC.Name(reply.code)

    return attacker._run(call(), 30.0)


def expected_aggregate(deltas: list[torch.Tensor], peers: list[SwarmExchange], weights: list[float], s):
    """CenteredClip of exactly these Δs with the ticket's weights (compression none: what the members get)."""
    return centered_clip({p.peer_id: d for p, d in zip(peers, deltas, strict=True)},
                         {p.peer_id: w for p, w in zip(peers, weights, strict=True)}, s.clip_factor, s.clip_iters,
                         s.exclude_factor)


@pytest.fixture
def four(shutdown, request):
    """Four members (exclude_factor: the default, or the test's indirect parameter)."""
    s = settings(compression="none", averaging_timeout=4.0, exclude_factor=getattr(request, "param", 1.3))
    peers = start_exchanges(4, {"trunk": SIZE}, s)
    shutdown(peers)
    return peers, s


@pytest.mark.parametrize("attack", ["reversed", "scaled"])
@pytest.mark.parametrize("four", [1.3, math.inf], ids=["exclude", "clip-only"], indirect=True)
def test_one_liar_among_four_moves_the_average_at_most_its_share_of_the_clipping_radius(four, attack, caplog):
    """Three honest members and one that sends −(honest mean) at the honest norm ("reversed") or 9x an honest
    Δ ("scaled"; it reports nothing, so it cannot lie about its norm either). Each honest member leaves it
    out (it is far from the others) or, with exclusion off, clips it: the applied average is within
    clip_iters · (w_liar / W) · τ of the honest mean (exactly the mean when left out), less than half as far
    as the plain mean would be, equal on all three, and the liar is named in the log."""
    peers, s = four
    honest, _ = honest_deltas(3)
    mean = sum(honest) / 3
    lie = -mean / mean.norm() * honest[0].norm() if attack == "reversed" else 9 * honest[0]
    deltas = honest + [lie]
    weights = [1.0] * 4
    given = [{"trunk": d.clone()} for d in deltas]
    with caplog.at_level(logging.INFO, logger="swarm"):
        out = average_together(peers, given, weights)
    agg = expected_aggregate(deltas, peers, weights, s)
    naive = sum(deltas) / 4
    bound = s.clip_iters * (1 / 4) * agg.tau
    excluded = s.exclude_factor < math.inf
    for i in range(3):
        assert out[i]["trunk"].outcome == "ok" and out[i]["trunk"].group_size == (3 if excluded else 4)
        assert torch.equal(given[i]["trunk"], agg.value)
    err, naive_err = float((agg.value - mean).norm()), float((naive - mean).norm())
    assert err <= bound and err < naive_err / 2, (err, bound, naive_err)
    if excluded:
        assert set(agg.excluded) == {peers[3].peer_id} and out[0]["trunk"].refused_peers == [peers[3].peer_id]
        torch.testing.assert_close(agg.value, mean, rtol=0, atol=1e-5)
        assert any("left out" in r.getMessage() and peers[3].peer_id in r.getMessage() for r in caplog.records)
    else:
        assert peers[3].peer_id in agg.clipped
        assert any("clipped" in r.getMessage() and peers[3].peer_id in r.getMessage() for r in caplog.records)


def test_the_weight_a_sender_claims_is_ignored(four, caplog):
    """A member sends its Δ claiming weight 1e6, another claims −1: every member weighs them by the ticket."""
    peers, s = four
    honest, _ = honest_deltas(4, seed=1)
    ticket_all(peers, [1.0] * 4)
    header = {"run": "t", "round": 0, "module": "trunk"}
    for target in (peers[0], peers[1]):
        assert send_raw(peers[2], target.peer_id, header, honest[2], weight=1e6) == "ACCEPTED"
        assert send_raw(peers[3], target.peer_id, header, honest[3], weight=-1.0) == "ACCEPTED"
    given = [{"trunk": honest[i].clone()} for i in range(2)]
    out = average_on(peers, given)
    agg = expected_aggregate(honest, peers, [1.0] * 4, s)
    for i in range(2):
        assert out[i]["trunk"].outcome == "ok" and out[i]["trunk"].group_size == 4
        assert torch.equal(given[i]["trunk"], agg.value)
    torch.testing.assert_close(agg.value, sum(honest) / 4, rtol=0, atol=1e-5)


def test_a_stranger_without_a_ticket_is_refused(four, shutdown, caplog):
    """A peer on the same DHT, not on the ticket, sends a huge Δ to every member: refused and named; the
    members' aggregate is theirs alone."""
    peers, s = four
    stranger = SwarmExchange(s, {"trunk": SIZE}, initial_peers=peers[0].visible_maddrs())
    shutdown([stranger])
    honest, _ = honest_deltas(4, seed=2)
    ticket_all(peers, [1.0] * 4)
    with caplog.at_level(logging.WARNING, logger="swarm"):
        codes = {send_raw(stranger, p.peer_id, {"run": "t", "round": 0, "module": "trunk"}, 1e6 * honest[0])
                 for p in peers}
        given = [{"trunk": d.clone()} for d in honest]
        out = average_together(peers, given, [1.0] * 4)
    assert codes <= {"BAD_GROUP_ID", CLOSED_EARLY}   # refused before the stream was all read
    agg = expected_aggregate(honest, peers, [1.0] * 4, s)
    for i in range(4):
        assert out[i]["trunk"].group_size == 4 and torch.equal(given[i]["trunk"], agg.value)
    assert any(stranger.peer_id in r.getMessage() and "not a member" in r.getMessage() for r in caplog.records)


def test_a_second_delta_from_a_member_is_refused_and_the_first_stands(four):
    """A member sends its honest Δ, then tries to overwrite it with a huge one: the second is refused."""
    peers, s = four
    honest, _ = honest_deltas(4, seed=3)
    ticket_all(peers, [1.0] * 4)
    header = {"run": "t", "round": 0, "module": "trunk"}
    assert send_raw(peers[3], peers[0].peer_id, header, honest[3]) == "ACCEPTED"
    assert send_raw(peers[3], peers[0].peer_id, header, 1e6 * honest[3]) == "DUPLICATE_PEER_ID"
    given = [{"trunk": d.clone()} for d in honest[:3]]
    out = average_on(peers, given)
    # peer 0 got peer 3's first Δ; peers 1 and 2 got nothing from it (peer 3 never ran average) and left it out
    assert torch.equal(given[0]["trunk"], expected_aggregate(honest, peers, [1.0] * 4, s).value)
    assert out[1]["trunk"].group_size == 3 and out[1]["trunk"].refused_peers == [peers[3].peer_id]


def test_a_silent_member_cannot_veto_the_module(four, caplog):
    """One member never sends (a veto, in the old protocol, was one 'failed' report): the other three
    aggregate without it after averaging_timeout, with outcome ok, and name it."""
    peers, s = four
    honest, _ = honest_deltas(3, seed=4)
    ticket_all(peers, [1.0] * 4)
    given = [{"trunk": d.clone()} for d in honest]
    with caplog.at_level(logging.WARNING, logger="swarm"):
        out = average_on(peers, given)
    agg = expected_aggregate(honest, peers[:3], [1.0] * 3, s)
    for i in range(3):
        assert out[i]["trunk"].outcome == "ok" and out[i]["trunk"].refused_peers == [peers[3].peer_id]
        assert torch.equal(given[i]["trunk"], agg.value)
    assert any(peers[3].peer_id in r.getMessage() and "did not arrive" in r.getMessage() for r in caplog.records)


def test_malformed_deltas_are_refused_and_named(four, caplog):
    """From a member: a garbage header, an empty stream, a header of the wrong types, of a module it does not
    hold, of another run, of a round this peer has no ticket for yet (retry later), a Δ of the wrong size.
    Each is refused; a member's first Δ is the one judged, so it is then left out of the aggregate."""
    peers, s = four
    ticket_all(peers, [1.0] * 4)
    header = {"run": "t", "round": 0, "module": "trunk"}
    liar, victim = peers[3], peers[0].peer_id
    nan = torch.zeros(SIZE)
    nan[7] = float("nan")
    def early(code: str, refusal: str) -> bool:
        # a refusal before the whole stream was read may reach the sender as a closed stream instead
        return code in (refusal, CLOSED_EARLY)

    with caplog.at_level(logging.WARNING, logger="swarm"):
        assert early(send_raw(liar, victim, b"{not json", torch.zeros(SIZE)), "PROTOCOL_VIOLATION")
        assert early(send_raw(liar, victim, header, messages=[]), "PROTOCOL_VIOLATION")   # an empty stream
        assert early(send_raw(liar, victim, {**header, "round": "0"}, torch.zeros(SIZE)), "PROTOCOL_VIOLATION")
        assert early(send_raw(liar, victim, {**header, "module": "l0e9"}, torch.zeros(SIZE)), "BAD_GROUP_ID")
        assert early(send_raw(liar, victim, {**header, "run": "other"}, torch.zeros(SIZE)), "BAD_GROUP_ID")
        assert early(send_raw(liar, victim, {**header, "round": 5}, torch.zeros(SIZE)), "NOT_DECLARED")
        # the first Δ this member sends for the module is judged, and any later one refused as a duplicate
        assert send_raw(liar, victim, header, torch.zeros(SIZE + 1)) == "PROTOCOL_VIOLATION"
        assert early(send_raw(liar, victim, header, nan), "DUPLICATE_PEER_ID")
    messages = [r.getMessage() for r in caplog.records]
    assert any(liar.peer_id in m and "shape [2001]" in m for m in messages), messages
    assert any(liar.peer_id in m and "malformed header" in m for m in messages), messages
    honest, _ = honest_deltas(1, seed=5)
    given = [{"trunk": honest[0].clone()}]
    out = peers[0].average(0, given[0])
    assert out["trunk"].outcome == "failed"   # the others never sent; the liar's Δ was refused, not used
    assert torch.equal(given[0]["trunk"], honest[0])


@pytest.mark.parametrize("bad", ["nan", "fp16", "oversized"])
def test_each_malformed_delta_is_refused_on_its_own(four, caplog, bad):
    """NaN values, another compression than the run's, more bytes than the module can take (refused while
    the stream is read, before it is all in memory)."""
    from hivemind.proto import averaging_pb2

    peers, s = four
    ticket_all(peers, [1.0] * 4)
    header = {"run": "t", "round": 0, "module": "trunk"}
    MC = averaging_pb2.MessageCode
    nan = torch.zeros(SIZE)
    nan[7] = float("nan")
    kw = {"nan": {"values": nan}, "fp16": {"values": torch.zeros(SIZE), "compression": "fp16"},
          "oversized": {"messages": [averaging_pb2.AveragingData(code=MC.PART_FOR_AVERAGING,
                                                                 group_id=json.dumps(header).encode())]
                        + [averaging_pb2.AveragingData(tensor_part={"buffer": bytes(1 << 16)})] * 3}}[bad]
    with caplog.at_level(logging.WARNING, logger="swarm"):
        assert send_raw(peers[3], peers[0].peer_id, header, **kw) in ("PROTOCOL_VIOLATION", CLOSED_EARLY)
    why = {"nan": "non-finite", "fp16": "compression", "oversized": "bytes for"}[bad]
    assert any(peers[3].peer_id in r.getMessage() and why in r.getMessage() for r in caplog.records)


def test_a_member_that_stalls_its_stream_is_refused_after_the_timeout(four, caplog):
    """A member sends its header and then nothing, holding the stream open: the receiver gives up on it after
    averaging_timeout, names it, and aggregates the others' Δs."""
    from hivemind.p2p import PeerID
    from hivemind.proto import averaging_pb2

    peers, s = four
    honest, _ = honest_deltas(3, seed=6)
    ticket_all(peers, [1.0] * 4)
    header = json.dumps({"run": "t", "round": 0, "module": "trunk"}).encode()

    async def stall():
        async def stream():
            yield averaging_pb2.AveragingData(code=averaging_pb2.MessageCode.PART_FOR_AVERAGING, group_id=header)
            await asyncio.sleep(3600)
        try:
            await peers[3]._p2p.call_protobuf_handler(PeerID.from_base58(peers[0].peer_id), HANDLER, stream(),
                                                      averaging_pb2.AveragingData)
        except Exception:
            pass

    staller = asyncio.run_coroutine_threadsafe(stall(), peers[3]._loop)
    given = [{"trunk": d.clone()} for d in honest]
    with caplog.at_level(logging.WARNING, logger="swarm"):
        out = average_on(peers, given)
    staller.cancel()
    assert out[0]["trunk"].outcome == "ok" and out[0]["trunk"].refused_peers == [peers[3].peer_id]
    assert torch.equal(given[0]["trunk"], expected_aggregate(honest, peers[:3], [1.0] * 3, s).value)
    assert any(peers[3].peer_id in r.getMessage() and "stall" in r.getMessage() for r in caplog.records)
