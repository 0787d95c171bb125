"""One worker's averaging: every member of a module's ticketed group sends its Δ to every other member,
and each aggregates what it received, robustly (swarm/robust.py).

    x = SwarmExchange(settings, {"trunk": 1234, "l0e1": 567}, initial_peers=[...])
    x.set_ticket(ticket)                           # swarm/ticket.py: the coordinator's groups and weights
    outcomes = x.average(round_, deltas)           # writes each module's aggregate into deltas, in place
    x.shutdown()

Membership. The coordinator's ticket names each module's members (hivemind peer ids) and their weights.
A Δ arrives over libp2p, which authenticates the sender: its peer id is the hash of the key that signed
the connection. A member accepts one Δ per member of the group and round, of exactly the module's size,
finite, in this run's compression; it refuses a stranger's, a second one, an oversized or malformed one
(and logs the peer id). Weights are the ticket's: a sender has no say in its own. No DHT record, report
or matchmaking is involved: the DHT only connects peers, so nobody can overwrite, forge or veto anything.

Aggregation. Each member aggregates the Δs it received with its own (as the others received it: the
compressed bytes, decoded) by CenteredClip with the ticket's weights. Members that received the same
bytes compute bit-identical aggregates, so honest holders end the round with the same parameters without
a second exchange. A member whose Δ did not arrive by the deadline is left out; nobody waits for it again.

Timing. A member waits for the others' Δs at most `averaging_timeout` after its own is ready; messages
that arrive earlier (a faster peer) wait in its inbox, which exists from `set_ticket` on (a sender told
"no ticket yet" retries until its own deadline). The inbox holds at most one Δ per ticketed member.

Processes: the DHT's process and its p2pd, whatever the number of modules (one asyncio thread here runs
every transfer). Cost: a member sends its compressed Δ to each of the n - 1 others, (n - 1)·|Δ| where a
butterfly all-reduce sends about 2·|Δ|: the price of every member checking every Δ itself, with no
reducer to trust. Residual risks (README, "Threat model"): a liar can send different Δs to different
members, whose aggregates then differ within the clipping bound, and the coordinator's merge (the median
of the holders' uploads) decides; two holders cannot out-vote a liar.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .hivemind_compat import compressions
from .outer import NO_TIMINGS, ModuleOutcome
from .processes import READY_TIMEOUT_S, ChildDied, child_result, start_dht
from .robust import centered_clip
from .settings import SwarmSettings
from .ticket import RoundTicket

log = logging.getLogger(__name__)

HANDLER = "mujina.swarm.delta"
CHUNK_BYTES = 1 << 20       # one stream message; libp2p's limit is 4 MiB
RETRY_S = 0.2               # a sender told "no ticket yet" tries again after this
STOP_POLL_S = 0.25          # how often a round waiting for the others' Δs looks for a stop request
HEADER_BYTES = 512          # a Δ's header (run, round, module) is small; a larger one is refused


@dataclass
class _Inbox:
    """The Δs of one module and round this member accepts: one per other member of the ticket's group."""

    size: int
    expected: set[str]
    received: dict[str, Tensor] = field(default_factory=dict)
    receiving: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)   # peer -> why its Δ was refused
    closed: bool = False
    complete: asyncio.Event = field(default_factory=asyncio.Event)

    def done(self) -> bool:
        return self.expected <= self.received.keys() | self.refused.keys()


class SwarmExchange:
    """A DHT node (connectivity only) and the ticketed exchange of Δs for every held module."""

    def __init__(self, settings: SwarmSettings, modules: dict[str, int], *, initial_peers: Sequence[str] = (),
                 dht=None, client_mode: bool = False, host: str = "127.0.0.1", identity_path: str | None = None):
        self.settings, self.sizes = settings, dict(modules)
        self.compression = compressions()[settings.compression]()
        self.timings = dict(NO_TIMINGS)
        self.check_stop: Callable[[], None] | None = None
        self._own_dht = dht is None
        self._tickets: dict[int, RoundTicket] = {}
        self._inbox: dict[tuple[int, str], _Inbox] = {}      # touched only on the loop's thread
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="swarm-exchange", daemon=True)
        self._thread.start()
        self._p2p = None
        try:
            if dht is None:
                extra = {"identity_path": identity_path} if identity_path else {}
                dht = start_dht(initial_peers=list(initial_peers), client_mode=client_mode,
                                host_maddrs=[f"/ip4/{host}/tcp/0"], **extra)
            self.dht = dht
            asked = dht.run_coroutine(type(dht)._get_peer_id, return_future=True)  # dht.peer_id waits forever
            self.peer_id = str(child_result(asked.result, dht, "the DHT's peer id", READY_TIMEOUT_S))
            self._p2p = self._run(self._start(), READY_TIMEOUT_S)
        except BaseException:
            self.shutdown()  # what started must not outlive a failed construction
            raise

    # -- plumbing --

    def _run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self):
        from hivemind.proto import averaging_pb2

        p2p = await self.dht.replicate_p2p()
        await p2p.add_protobuf_handler(HANDLER, self._receive, averaging_pb2.AveragingData, stream_input=True)
        return p2p

    def visible_maddrs(self) -> list[str]:
        return [str(a) for a in self.dht.get_visible_maddrs()]

    def shutdown(self) -> None:
        if self._loop.is_running():
            try:
                self._run(self._close(), 10.0)
            except Exception:  # the DHT (and its p2pd) may be gone already
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()
        if self._own_dht and getattr(self, "dht", None) is not None:
            self.dht.shutdown()

    async def _close(self) -> None:
        """Leave the daemon (the DHT's process owns it) and end every task of this loop."""
        if self._p2p is not None:
            try:
                await self._p2p.remove_protobuf_handler(HANDLER, stream_input=True)
            finally:
                await self._p2p.shutdown()
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    # -- tickets --

    def set_ticket(self, ticket: RoundTicket) -> None:
        """Accept Δs for the ticket's round from its groups' members from now on; forget older rounds."""
        if ticket.peer_id != self.peer_id:
            raise ValueError(f"the ticket is for peer {ticket.peer_id}, this one is {self.peer_id}")
        unknown = set(ticket.groups) - self.sizes.keys()
        if unknown:
            raise ValueError(f"the ticket names modules this worker does not hold: {sorted(unknown)}")

        async def install() -> None:
            self._tickets = {r: t for r, t in self._tickets.items() if r >= ticket.round}
            self._tickets[ticket.round] = ticket
            self._inbox = {k: v for k, v in self._inbox.items() if k[0] >= ticket.round}
            for m in ticket.groups:
                others = set(ticket.members(m)) - {self.peer_id}
                if others and (ticket.round, m) not in self._inbox:
                    self._inbox[(ticket.round, m)] = _Inbox(self.sizes[m], others)

        self._run(install(), 10.0)

    def ticket(self, round_: int) -> RoundTicket | None:
        return self._tickets.get(round_)

    # -- receiving --

    async def _receive(self, stream, context):
        """One member's Δ of one module: accepted once, from a member of the ticket's group, checked; a stream
        that takes longer than averaging_timeout (a peer that opens it and stalls) is refused."""
        from hivemind.proto import averaging_pb2

        try:
            return await asyncio.wait_for(self._take(stream, context), self.settings.averaging_timeout)
        except TimeoutError:
            log.warning("refusing a Δ from peer %s: its stream stalled past averaging_timeout",
                        context.remote_id.to_base58())
            return averaging_pb2.AveragingData(code=averaging_pb2.MessageCode.PROTOCOL_VIOLATION)

    async def _take(self, stream, context):
        from hivemind.proto import averaging_pb2

        MC = averaging_pb2.MessageCode
        sender = context.remote_id.to_base58()

        def answer(code, why: str = ""):
            if why:
                log.warning("refusing a Δ from peer %s: %s", sender, why)
            return averaging_pb2.AveragingData(code=code)

        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return answer(MC.PROTOCOL_VIOLATION, "an empty stream")
        try:
            if len(first.group_id) > HEADER_BYTES:
                raise ValueError("oversized header")
            head = json.loads(first.group_id)
            run, round_, module = head["run"], head["round"], head["module"]
            if not (isinstance(run, str) and isinstance(module, str) and type(round_) is int):
                raise ValueError("header fields of the wrong type")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return answer(MC.PROTOCOL_VIOLATION, "a malformed header")
        ticket = self._tickets.get(round_)
        if ticket is None:
            return answer(MC.NOT_DECLARED)  # no ticket for that round yet: the sender retries
        box = self._inbox.get((round_, module))
        if run != ticket.run or box is None or sender not in box.expected:
            return answer(MC.BAD_GROUP_ID, f"not a member of module {module!r}'s group in round {round_} "
                                           f"of run {run!r} on this peer's ticket")
        if box.closed:
            return answer(MC.CANCELLED, f"its Δ of {module} (round {round_}) came after the deadline")
        if sender in box.receiving:
            return answer(MC.DUPLICATE_PEER_ID, f"a second Δ of {module} in round {round_}")
        box.receiving.add(sender)
        limit = 4 * box.size + 4096   # fp32 is the largest encoding; 8-bit adds its codebook
        chunks, total = [first.tensor_part], len(first.tensor_part.buffer)
        try:
            async for msg in stream:
                total += len(msg.tensor_part.buffer)
                if total > limit:
                    raise ValueError(f"more than {limit} bytes for {box.size} values")
                chunks.append(msg.tensor_part)
            delta = self._decode(chunks, box.size)
        except asyncio.CancelledError:   # stalled past averaging_timeout (_receive), or this peer shuts down
            box.refused[sender] = "its stream stalled"
            if box.done():
                box.complete.set()
            raise
        except Exception as e:
            box.refused[sender] = str(e)
            if box.done():
                box.complete.set()
            return answer(MC.PROTOCOL_VIOLATION, f"its Δ of {module} (round {round_}): {e}")
        if box.closed:
            return answer(MC.CANCELLED)
        box.received[sender] = delta
        if box.done():
            box.complete.set()
        return averaging_pb2.AveragingData(code=MC.ACCEPTED)

    def _decode(self, chunks: list, size: int) -> Tensor:
        from hivemind.utils.streaming import combine_from_streaming

        t = combine_from_streaming(chunks)
        if t.compression != self.compression.compression_type:
            raise ValueError(f"compression {t.compression}, this run uses {self.settings.compression}")
        if t.dtype != "float32" or list(t.size) != [size]:
            raise ValueError(f"a {t.dtype} tensor of shape {list(t.size)}, expected float32 [{size}]")
        delta = self.compression.extract(t).float().reshape(-1)
        if delta.numel() != size:
            raise ValueError(f"{delta.numel()} values, expected {size}")
        if not bool(torch.isfinite(delta).all()):
            raise ValueError("non-finite values")
        return delta

    # -- sending --

    async def _send(self, peer: str, header: bytes, parts: list, deadline: float) -> str:
        """Send one Δ to one member (again while it has no ticket yet); returns its answer's code name."""
        from hivemind.p2p import PeerID
        from hivemind.proto import averaging_pb2

        MC = averaging_pb2.MessageCode
        while True:
            async def stream():
                for i, part in enumerate(parts):
                    yield averaging_pb2.AveragingData(code=MC.PART_FOR_AVERAGING, tensor_part=part,
                                                      group_id=header if i == 0 else b"")
            try:
                left = deadline - time.monotonic()
                reply = await asyncio.wait_for(self._p2p.call_protobuf_handler(
                    PeerID.from_base58(peer), HANDLER, stream(), averaging_pb2.AveragingData), max(left, 0.01))
                code = MC.Name(reply.code)
            except Exception as e:  # unreachable, died, timed out; or it answered before reading all we sent
                code = f"error: {type(e).__name__}: {e}"
            # "no ticket yet" (often cut short while we still stream: an error here) is worth another try
            if not (code == "NOT_DECLARED" or code.startswith("error")) or time.monotonic() + RETRY_S >= deadline:
                return code
            await asyncio.sleep(RETRY_S)

    async def _exchange(self, round_: int, sends: dict[str, tuple[bytes, list, list[str]]], deadline: float) -> dict:
        """Send every module's Δ to its members; wait for theirs until all arrived or the deadline; close the
        inboxes. Returns module -> (received Δs, refused peer -> why, answers to our sends)."""
        jobs = {(m, p): asyncio.ensure_future(self._send(p, header, parts, deadline))
                for m, (header, parts, peers) in sends.items() for p in peers}
        boxes = {m: self._inbox[(round_, m)] for m in sends if (round_, m) in self._inbox}
        waits = [asyncio.ensure_future(b.complete.wait()) for b in boxes.values() if not b.done()]
        try:   # a stopped round (cancelled here) stops its sends and closes its inboxes too
            if waits:
                await asyncio.wait(waits, timeout=max(deadline - time.monotonic(), 0.0))
            for b in boxes.values():
                b.closed = True
            if jobs:
                await asyncio.wait(jobs.values(), timeout=max(deadline - time.monotonic(), 0.0) + 1.0)
        finally:
            for b in boxes.values():
                b.closed = True
            for task in [*waits, *jobs.values()]:
                task.cancel()
        answers: dict[str, dict[str, str]] = {m: {} for m in sends}
        for (m, p), job in jobs.items():
            answers[m][p] = job.result() if job.done() and not job.cancelled() else "no answer"
        return {m: (dict(b.received), dict(b.refused), answers.get(m, {})) for m, b in boxes.items()}

    # -- a round --

    def average(self, round_: int, deltas: dict[str, Tensor]) -> dict[str, ModuleOutcome]:
        """Exchange and aggregate each module's Δ with its ticketed group; writes the aggregate into `deltas`
        in place (left untouched where no other member's Δ arrived). Needs `set_ticket` for the round."""
        from hivemind.compression import CompressionInfo
        from hivemind.utils.streaming import split_for_streaming

        s = self.settings
        self.timings = dict(NO_TIMINGS)
        ticket = self._tickets.get(round_)
        if ticket is None:
            raise ValueError(f"round {round_}: no ticket (set_ticket) to average with")
        if not self.dht.is_alive():
            raise ChildDied(f"round {round_}: the DHT", self.dht.exitcode)
        norms = {m: float(d.norm()) for m, d in deltas.items()}
        out = {m: ModuleOutcome(m, "local", norms[m]) for m in deltas}
        own, sends = {}, {}
        header = lambda m: json.dumps({"run": s.run, "round": round_, "module": m}).encode()  # noqa: E731
        for m, d in deltas.items():
            others = sorted(set(ticket.members(m)) - {self.peer_id})
            if not others:
                continue  # the sole holder, or not a member (joined after the coordinator froze the round)
            if not math.isfinite(norms[m]):
                out[m].outcome = "refused"   # sends nothing: the others aggregate without it
                log.warning("round %d, module %s: this peer's Δ is not finite; not sent, back to θ_start", round_, m)
                continue
            packed = self.compression.compress(d.detach().float().cpu().reshape(-1),
                                               CompressionInfo.from_tensor(d))
            own[m] = packed   # decoded when aggregated: what the others receive
            sends[m] = (header(m), list(split_for_streaming(packed, CHUNK_BYTES)), others)
            out[m].bytes_sent = packed.ByteSize() * len(others)
        if not sends:
            return out
        t0 = time.perf_counter()
        future = asyncio.run_coroutine_threadsafe(
            self._exchange(round_, sends, time.monotonic() + s.averaging_timeout), self._loop)
        try:
            while True:
                try:
                    got = future.result(STOP_POLL_S)
                    break
                except TimeoutError:
                    if self.check_stop is not None:
                        self.check_stop()
                    if not self.dht.is_alive():
                        raise ChildDied(f"round {round_}: the DHT", self.dht.exitcode) from None
        except BaseException:
            future.cancel()
            raise
        self.timings["allreduce"] = time.perf_counter() - t0
        for m, (received, refused, answers) in got.items():
            members = ticket.members(m)
            missing = sorted(set(members) - {self.peer_id} - received.keys())
            for p in missing:
                log.warning("round %d, module %s: no Δ from member %s (%s); aggregated without it", round_, m, p,
                            refused.get(p, "did not arrive in time"))
            for p, code in sorted(answers.items()):
                if code != "ACCEPTED":
                    log.warning("round %d, module %s: member %s did not take this peer's Δ: %s", round_, m, p, code)
            if not received:
                out[m].outcome = "failed"
                continue
            contributions = {self.peer_id: self.compression.extract(own[m]).float().reshape(-1), **received}
            t_agg = time.perf_counter()
            agg = centered_clip(contributions, {p: members[p] for p in contributions}, s.clip_factor, s.clip_iters,
                                s.exclude_factor)
            for p, far in sorted(agg.excluded.items()):
                log.warning("round %d, module %s: left out the Δ of %s: %.2f medians from the group's centre "
                            "(exclude_factor %g)", round_, m, p, far, s.exclude_factor)
            for p, scale in sorted(agg.clipped.items()):
                log.info("round %d, module %s: clipped the Δ of %s to %.3g of its distance (τ %.3g)", round_, m,
                         p, scale, agg.tau)
            deltas[m].copy_(agg.value.to(deltas[m].device, deltas[m].dtype))
            self.timings["aggregate"] += time.perf_counter() - t_agg
            out[m].outcome, out[m].group_size = "ok", len(contributions) - len(agg.excluded)
            out[m].refused_peers = sorted([*missing, *agg.excluded])
        return out
