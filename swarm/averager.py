"""One worker's membership of the swarm: a DHT node and one hivemind `DecentralizedAverager` per held module.

Every module is averaged only among its holders, by its own averager with prefix `{run}/{module}`.

Overlap. Matchmaking runs while the inner steps do: after inner step 1 each worker starts every shared
module's hivemind step scheduled for when its inner steps should end (`SwarmAverager.begin`; hivemind's
`require_trigger`, as hivemind.Optimizer pre-schedules its own), so the group has usually formed when the
Δ is ready and `average` only starts the all-reduce. Finding a group used to cost ~0.8 s per round here,
after a Δ-norm exchange in the DHT of another ~0.25 s; both were on the critical path.

Agreement. hivemind returns each peer the *difference* between the average and its own Δ, compressed
(fp16 by default), so two holders' Δ̄ agree to the compression's rounding only, never bit for bit (not
even with compression "none": fp32 rounding); we do not paper over that with a second broadcast. hivemind
can also finish an all-reduce with parts missing and report success. Two checks keep such a Δ̄ out: (1)
our averager subclass reads how much of its result arrived (swarm/hivemind_compat.py); (2) after the
all-reduce every member publishes a report per module in one DHT record (key
`{run}/check/{round}/{attempt}`, subkey = its peer id): its Δ norm, and `agreement_sketch` of its Δ̄ or
that its result was partial or failed (swarm/agreement.py); it reads the other members'. A reducer that
dropped a slow sender returns a complete but different average to the rest, which only (2) sees. A partial
result or a sketch outside the rounding bound makes the module's outcome "mismatch" on every member, which
follows the failure policy (swarm/outer.py) with its local Δ, as a failed averaging does.

Bad updates. A Δ with NaN/Inf, or (with >= 3 reports) a norm above `outlier_factor` × the median of the
members' reported norms, is refused, and every member logs the peer id. A worker whose own Δ is
non-finite knows before the all-reduce: it sends zeros with weight 0, so the group's average stands. A
finite outlier is only seen in the reports, after its Δ went into the average: the other members then
average once more without it (attempt 1, fresh matchmaking), and its owner goes back to θ_start. This
keeps a faulty worker's Δ out; a malicious peer could lie about its norm, which only the coordinator's
validator (Δ norms are reported with each result) can catch.

Faults. `averaging_timeout` T is the most a peer dying mid-round delays the others, and the phases are
budgeted to fit in it: each all-reduce may take A = (T - matchmaking_time - stats_timeout) / 3
(`SwarmSettings.allreduce_timeout`; hivemind bans a sender that stalls for A / 3). A member that dies
after its group formed (the price of matchmaking early) stalls the others' all-reduce for at most A,
leaves their results partial and sends no report; they wait for the reports at most A + stats_timeout
(a living member's all-reduce ends within A of ours, plus slack for the DHT), then average once more
without it (matchmaking_time, then at most A): A + (A + stats_timeout) + (matchmaking_time + A) = T.
A shorter wait for the reports would not be safe: a live but slow member would decide on its own, and
holders would diverge. A group that has not formed A after its scheduled time (a holder died before it
formed, or is that late) fails; so does a holder that triggers its all-reduce more than A / 3 after the
others (they ban it as a sender): timeouts trade the delay a dead peer can cause against how late a live
one may be. A holder later still (past A / 3 + stats_timeout) is taken for dead: the others average again
without it while it keeps its θ_start, and that module differs on it from then on (nothing resyncs it
yet; before this budget the same happened past T / 3 + stats_timeout). The coordinator's plan should keep
holders' rounds about equally long.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .agreement import agreement_sketch, report_mismatch, reported_norm
from .hivemind_compat import checked_averager_class, compressions, quiet_group_size_advice
from .outer import NO_TIMINGS, ModuleOutcome, is_outlier
from .processes import READY_TIMEOUT_S, ChildDied, child_result, start_children, start_dht
from .settings import SwarmSettings

log = logging.getLogger(__name__)

POLL_S = 0.02  # how often a peer looks in the DHT for the other members' reports
STOP_POLL_S = 0.25  # how often a round waiting for its all-reduce looks for a stop request


@dataclass
class _Attempt:
    """This peer's side of one all-reduce of a module: the group (empty if none formed) and its report."""

    members: set[str]
    report: dict            # norm, zeroed (sent as zeros with weight 0), and sketch keys | partial | failed
    bytes_sent: int = 0


class SwarmAverager:
    """One worker's membership of the swarm: a DHT node and one `DecentralizedAverager` per held module.

    `modules` maps module name -> number of floats; `expected_holders` (module -> count, from the
    coordinator's assignment) sizes each module's group, so that it forms as soon as every holder joined.
    """

    def __init__(self, settings: SwarmSettings, modules: dict[str, int], *, initial_peers: Sequence[str] = (),
                 dht=None, client_mode: bool = False, host: str = "127.0.0.1",
                 expected_holders: dict[str, int] | None = None):
        self.settings = settings
        self.expected_holders = expected_holders or {}
        quiet_group_size_advice()
        self._own_dht = dht is None
        self.averagers = {}
        self._pending: tuple[int, dict] | None = None   # (round, module -> hivemind StepControl) from begin()
        self.timings = dict(NO_TIMINGS)   # seconds waited in the last average(), by phase
        self._last_scheduled = 0.0
        # Polled while average() waits for an all-reduce (every STOP_POLL_S): a stop request raises there, and
        # the round stops at once instead of after the all-reduce's timeout (SIGTERM, the coordinator's CANCEL).
        self.check_stop: Callable[[], None] | None = None
        if dht is None:
            dht = start_dht(initial_peers=list(initial_peers), client_mode=client_mode,
                            host_maddrs=[f"/ip4/{host}/tcp/0"])
        self.dht = dht
        try:
            asked = dht.run_coroutine(type(dht)._get_peer_id, return_future=True)  # dht.peer_id waits forever
            self.peer_id = str(child_result(asked.result, dht, "the DHT's peer id", READY_TIMEOUT_S))
            self.compression = compressions()[settings.compression]()
            if settings.averaging:
                averager_class, s = checked_averager_class(), settings
                # Not start=True: hivemind's run_in_background sets SIGINT to SIG_IGN in *this* process (the
                # daemon's handler would be lost) and raises outside the main thread, where the daemon runs
                # executors.
                self.averagers = start_children({name: lambda name=name, size=size: averager_class(
                    [torch.zeros(size)], self.dht, prefix=f"{s.run}/{name}", start=False,
                    # a group starts as soon as every expected holder joined, else after matchmaking_time
                    target_group_size=min(s.target_group_size, self.expected_holders.get(name, s.target_group_size)),
                    min_group_size=2,
                    min_matchmaking_time=s.matchmaking_time, request_timeout=s.request_timeout,
                    allreduce_timeout=s.allreduce_timeout, next_chunk_timeout=s.chunk_timeout,
                    compression=self.compression, client_mode=client_mode) for name, size in modules.items()},
                    lambda name: f"the averager of module {name}")
        except BaseException:
            self.shutdown()  # what started must not outlive a failed construction
            raise

    def visible_maddrs(self) -> list[str]:
        return [str(a) for a in self.dht.get_visible_maddrs()]

    def shutdown(self) -> None:
        for a in self.averagers.values():
            a.shutdown()
        if self._own_dht:
            self.dht.shutdown()

    # -- one round --

    def begin(self, round_: int, ready_in: float) -> None:
        """Look for every shared module's group now, while the inner steps run; this peer expects to be ready
        to average in about `ready_in` seconds. `average` then only starts the all-reduce (hivemind's scheduled
        step with a trigger, as hivemind.Optimizer pre-schedules its own)."""
        self.cancel()
        if self.averagers:
            self._pending = (round_, self._start_steps(round_, 0, self._shared(self.averagers), ready_in))

    def cancel(self) -> None:
        """Leave the groups `begin` looked for (a round stopped or failed before averaging)."""
        _, controls = self._pending or (None, {})
        self._pending = None
        for control in controls.values():
            control.cancel()

    def _shared(self, modules: Iterable[str]) -> list[str]:
        return [m for m in modules if self.expected_holders.get(m, 2) > 1]

    def _start_steps(self, round_: int, attempt: int, modules: Iterable[str], ready_in: float) -> dict:
        from hivemind.utils import get_dht_time

        s, now = self.settings, get_dht_time()
        # hivemind declares the averager in the DHT until the scheduled time, and the DHT keeps an entry's
        # latest expiration: a declaration that expires before the previous one would be dropped
        scheduled = max(now + max(ready_in, s.matchmaking_time), self._last_scheduled + 1e-3)
        self._last_scheduled = scheduled
        return {m: self.averagers[m].step(weight=1.0, gather={"round": round_, "attempt": attempt},
                                          scheduled_time=scheduled, timeout=scheduled - now + s.allreduce_timeout,
                                          allow_retries=True, require_trigger=True, wait=False)
                for m in modules}

    def average(self, round_: int, deltas: dict[str, Tensor], weights: dict[str, float]) -> dict[str, ModuleOutcome]:
        """Average each module's Δ among its holders, weighted; returns outcome per module and writes the
        averaged Δ into `deltas` in place (left untouched where averaging did not happen)."""
        s = self.settings
        self.timings = dict(NO_TIMINGS)
        norms = {m: float(d.norm()) for m, d in deltas.items()}
        out = {m: ModuleOutcome(m, "local", norms[m]) for m in deltas}
        pending_round, controls = self._pending or (None, {})
        self._pending = None
        shared = self._shared(deltas) if s.averaging else []
        if shared and not self.dht.is_alive():
            # Every step below would wait for it; and checked before any new step starts, because a hivemind
            # process killed while it held hivemind's cross-process MPFuture lock leaves the averagers unable to
            # answer a step's start (seen: a DHT SIGKILLed mid-update, the averager blocked in set_result).
            for control in controls.values():
                control.cancel()
            raise ChildDied(f"round {round_}: the DHT", self.dht.exitcode)
        if pending_round != round_ or set(controls) != set(shared):
            for control in controls.values():
                control.cancel()
            controls = self._start_steps(round_, 0, shared, 0.0) if shared else {}
        if not controls:
            return out

        first = self._all_reduce(round_, 0, controls, deltas, weights, norms)
        seen = self._reports(round_, 0, first)
        redo: dict[str, set[str]] = {}
        for m, got in first.items():
            if not got.members:
                out[m] = ModuleOutcome(m, "failed", norms[m])
                continue
            reported = {self.peer_id: got.report["norm"]} | {p: reported_norm(v) for p, v in seen[m].items()}
            refused = is_outlier(reported, s.outlier_factor)
            finite = [v for v in reported.values() if math.isfinite(v)]
            for p in sorted(refused):
                log.warning("round %d, module %s: refusing the Δ of peer %s (norm %s, group median %s)", round_, m, p,
                            reported[p], statistics.median(finite or [0.0]))
            out[m] = ModuleOutcome(m, "ok", norms[m], group_size=len(got.members), bytes_sent=got.bytes_sent,
                                   refused_peers=sorted(refused))
            if self.peer_id in refused:
                out[m].outcome = "refused"
                continue
            silent = got.members - {self.peer_id} - seen[m].keys()
            # a refused peer that sent its Δ (a finite norm far above the median: only the group can tell)
            spoiled = {p for p in refused if not seen[m].get(p, {}).get("zeroed")}
            if silent or spoiled:
                # the group averaged with a Δ it refuses, or a member died or stalled after the group formed
                # (matchmaking ran during the inner steps): average once more without them
                log.warning("round %d, module %s: averaging again without %s", round_, m,
                            ", ".join([f"silent peer {p}" for p in sorted(silent)] +
                                      [f"refused peer {p}" for p in sorted(spoiled)]))
                redo[m] = got.members - silent - refused
                out[m].outcome = "failed"
                continue
            self._judge(round_, m, got, seen[m], refused, out[m])

        again = {m: r for m, r in redo.items() if len(r) >= 2}
        for m in redo.keys() - again.keys():
            log.warning("round %d, module %s: no other holder left to average with; policy %s", round_, m,
                        s.failure_policy)
        if again:
            second = self._all_reduce(round_, 1, self._start_steps(round_, 1, again, 0.0), deltas, weights, norms)
            seen2 = self._reports(round_, 1, second)
            for m, got in second.items():
                out[m].bytes_sent += got.bytes_sent
                if got.members and got.members != again[m]:
                    log.warning("round %d, module %s: the second group %s is not the holders left %s; policy %s",
                                round_, m, sorted(got.members), sorted(again[m]), s.failure_policy)
                elif got.members:
                    out[m].outcome, out[m].group_size = "ok", len(got.members)
                    self._judge(round_, m, got, seen2[m], set(), out[m])
        for m, o in out.items():
            if o.outcome == "ok":
                with self.averagers[m].get_tensors() as (t,):
                    deltas[m].copy_(t)
        return out

    def _all_reduce(self, round_: int, attempt: int, controls: dict, deltas: dict[str, Tensor],
                    weights: dict[str, float], norms: dict[str, float]) -> dict[str, _Attempt]:
        """Put each module's Δ in its averager, start the all-reduce of its (scheduled) step, wait for it.

        A non-finite Δ goes in as zeros with weight 0: the group averages without it whatever its members
        saw, and its owner refuses it (outcome "refused")."""
        from hivemind.utils import get_dht_time

        s = self.settings
        finite = {m: math.isfinite(norms[m]) for m in controls}
        sent = {m: deltas[m] if finite[m] else torch.zeros_like(deltas[m]) for m in controls}
        for m, control in controls.items():
            with self.averagers[m].get_tensors() as (t,):
                t.copy_(sent[m])
            control.weight = max(weights[m], 1e-6) if finite[m] else 0.0
            control.allow_allreduce()
        got, t0 = {}, time.perf_counter()
        for m, control in controls.items():
            report = {"norm": norms[m] if finite[m] else math.inf, "zeroed": not finite[m]}
            got[m] = _Attempt(set(), report | {"failed": 1.0})
            # matchmaking ends by the step's deadline, the all-reduce within allreduce_timeout of it
            result, e = self._wait(control, max(0.0, control.deadline - get_dht_time()) + s.allreduce_timeout
                                   + s.request_timeout, controls)
            if e is not None:  # hivemind raises AllreduceException, MatchmakingException, TimeoutError...
                control.cancel()
                log.warning("round %d, module %s: averaging failed (%s: %s); policy %s", round_, m,
                            type(e).__name__, e, s.failure_policy)
                continue
            if result is None:
                log.warning("round %d, module %s: no group formed; policy %s", round_, m, s.failure_policy)
                continue
            gathered, received = result
            members = {str(p) for p in gathered}
            strays = sorted(p for p, g in gathered.items() if g != {"round": round_, "attempt": attempt})
            if strays:
                log.warning("round %d, module %s: peer(s) %s averaged another round with this one; discarding the "
                            "average (policy %s)", round_, m, strays, s.failure_policy)
                continue
            got[m] = _Attempt(members, report, self._bytes_sent(deltas[m], len(members)))
            if received < 1.0:
                log.warning("round %d, module %s: this peer %s received only %.1f%% of the average (group %s); "
                            "policy %s", round_, m, self.peer_id, 100 * received, sorted(members), s.failure_policy)
                got[m].report["partial"] = received
            else:
                with self.averagers[m].get_tensors() as (t,):
                    got[m].report |= agreement_sketch(t, sent[m], s.compression)
        self.timings["allreduce"] += time.perf_counter() - t0
        return got

    def _wait(self, control, timeout: float, controls: dict) -> tuple[Any, Exception | None]:
        """(control.result(timeout), None), or (None, the exception the step ended with or TimeoutError). Calls
        check_stop every STOP_POLL_S meanwhile; if it raises, every step of `controls` is cancelled (this peer
        leaves its groups) and the exception propagates."""
        end = time.monotonic() + timeout
        while True:
            try:
                return control.result(timeout=max(0.0, min(STOP_POLL_S, end - time.monotonic()))), None
            except Exception as e:
                if control.done():  # the step's own outcome (perhaps reached just after the poll timed out)
                    try:
                        return control.result(timeout=0), None
                    except Exception as outcome:
                        return None, outcome
                if time.monotonic() >= end:
                    return None, e
            if self.check_stop is not None:
                try:
                    self.check_stop()
                except BaseException:
                    for c in controls.values():
                        c.cancel()
                    raise

    def _reports(self, round_: int, attempt: int, got: dict[str, _Attempt]) -> dict[str, dict[str, dict]]:
        """Publish this peer's report on every module (Δ norm, and a sketch of its average, or that it was
        partial or failed) in one DHT record, and gather the other members' reports: module -> peer -> report.

        Waits until every member of each group has reported, at most allreduce_timeout + stats_timeout: a
        living member's all-reduce ends within allreduce_timeout of ours (it cannot end before the last
        member's trigger, ours neither), so a member that has not reported by then has died or stalled."""
        from hivemind.utils import get_dht_time

        s, t0 = self.settings, time.perf_counter()
        key = f"{s.run}/check/{round_}/{attempt}"
        stored = self.dht.store(key, {m: a.report for m, a in got.items()},
                                get_dht_time() + max(60.0, 4 * s.averaging_timeout), subkey=self.peer_id,
                                return_future=True)
        seen: dict[str, dict[str, dict]] = {m: {} for m in got}
        pending = {m for m, a in got.items() if a.members - {self.peer_id}}
        deadline = time.monotonic() + s.allreduce_timeout + s.stats_timeout
        while pending:
            found = self._dht_result(self.dht.get(key, latest=True, return_future=True), "reading the DHT")
            entries = found.value if found is not None and isinstance(found.value, dict) else {}
            for peer, entry in entries.items():
                peer = str(peer)
                for m, r in (entry.value.items() if isinstance(entry.value, dict) else ()):
                    if m in pending and peer in got[m].members and peer != self.peer_id and isinstance(r, dict):
                        seen[m][peer] = r
            pending = {m for m in pending if not seen[m].keys() >= got[m].members - {self.peer_id}}
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        self._dht_result(stored, "storing this peer's reports")
        self.timings["reports"] += time.perf_counter() - t0
        return seen

    def _judge(self, round_: int, m: str, got: _Attempt, seen: dict[str, dict], refused: set[str],
               outcome: ModuleOutcome) -> None:
        """Outcome "mismatch" when this peer's average was partial or another member's differs (refused
        members' own results do not count), or a member never reported."""
        s = self.settings
        if "partial" in got.report:
            outcome.outcome = "mismatch"
            return
        why = {p: report_mismatch(got.report, r) for p, r in seen.items() if p not in refused}
        why |= {p: "no report" for p in got.members - {self.peer_id} - seen.keys()}
        why = {p: w for p, w in why.items() if w}
        if why:
            log.warning("round %d, module %s: the group's averages disagree (%s); policy %s", round_, m,
                        "; ".join(f"peer {p}: {w}" for p, w in sorted(why.items())), s.failure_policy)
            outcome.outcome = "mismatch"

    def _dht_result(self, future, what: str):
        """A DHT call's result; its process dying (or never answering) is an error, not a wait forever."""
        return child_result(future.result, self.dht, what, self.settings.averaging_timeout)

    def _bytes_sent(self, delta: Tensor, group_size: int) -> int:
        """What this peer sends in one butterfly all-reduce of `delta` in a group of n: (n-1)/n of its Δ,
        compressed, to the other reducers, and (n-1)/n of its own share's averages back to them."""
        from hivemind.compression import CompressionInfo

        size = self.compression.compress(delta, CompressionInfo.from_tensor(delta)).ByteSize()
        return int(2 * size * (group_size - 1) / group_size)

