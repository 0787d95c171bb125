"""Holders of a module must end a round agreeing, also when hivemind's all-reduce loses parts silently.

hivemind 1.1.12 finishes an all-reduce whose parts missed `next_chunk_timeout` with those parts left at
the local values, and `step()` reports success. Real peers on 127.0.0.1: a slow reducer provokes exactly
that; a wrapper at hivemind's boundary corrupts one holder's average where hivemind does not notice."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

import pytest
import torch
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2
from prometheus_client import CollectorRegistry, generate_latest

import swarm.averager as averager
from swarm.agreement import agreement_sketch, sketches_agree
from swarm.averager import SwarmAverager
from swarm.hivemind_compat import checked_averager_class
from swarm.round import SwarmWorker
from tests.swarm.conftest import inner, run_round, settings, start_workers
from worker.metrics import SwarmMetrics


def slow_reducer_class(delay: float):
    """An averager that answers every all-reduce stream only after `delay` seconds (a peer on a slow link)."""

    class DecentralizedAverager(checked_averager_class()):  # hivemind's RPC names carry the class name
        async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData],
                                     context: P2PContext) -> AsyncIterator[averaging_pb2.AveragingData]:
            await asyncio.sleep(delay)  # the fault itself: this peer is slow on purpose, no condition to wait on
            async for message in super().rpc_aggregate_part(stream, context):
                yield message

    return DecentralizedAverager


@pytest.mark.slow  # real hivemind peers
def test_a_slow_reducer_leaves_parts_unaveraged_and_every_holder_detects_it(shutdown, caplog, monkeypatch):
    """One peer answers all-reduce streams only after 6 s, beyond next_chunk_timeout (3 s): hivemind leaves
    the late parts at the local values on some holders, averages others' shares without the late senders,
    and reports success on all three (which holders lose what depends on how it splits the vector)."""
    s = settings(compression="none", averaging_timeout=32.0)  # all-reduce timeout 9 s, next_chunk_timeout 3 s
    first = SwarmAverager(s, {"m": 3000}, expected_holders={"m": 3})
    second = SwarmAverager(s, {"m": 3000}, initial_peers=first.visible_maddrs(), expected_holders={"m": 3})
    with monkeypatch.context() as patch:
        slow_class = slow_reducer_class(delay=6.0)
        patch.setattr(averager, "checked_averager_class", lambda: slow_class)
        slow = SwarmAverager(s, {"m": 3000}, initial_peers=first.visible_maddrs(), expected_holders={"m": 3})
    peers = [first, second, slow]
    shutdown(peers)
    torch.manual_seed(0)
    local = [torch.randn(3000) * k for k in (1.0, 2.0, 3.0)]
    given = [{"m": d.clone()} for d in local]
    out: list = [None] * 3

    def go(i):
        out[i] = peers[i].average(0, given[i], {"m": 1.0})

    threads = [threading.Thread(target=go, args=(i,), name=f"peer{i}") for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="swarm"):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    said = {f"peer{i}": [r.getMessage() for r in caplog.records if r.threadName == f"peer{i}"] for i in range(3)}
    assert any("received only" in m for ms in said.values() for m in ms), said  # hivemind's own count, read back
    for i, peer in enumerate(peers):
        assert out[i]["m"].outcome == "mismatch", out[i]
        assert torch.equal(given[i]["m"], local[i])  # the policy then applies to this holder's own Δ
        # each says why: its own result was partial, or another member's was (named); a peer whose own
        # result is complete learns it only from the others' verdicts in the DHT
        others = [p.peer_id for p in peers if p is not peer]
        assert any(f"this peer {peer.peer_id} received only" in m
                   or ("disagree" in m and any(o in m for o in others)) for m in said[f"peer{i}"]), said


class CorruptedAverage:
    """Fault injection at hivemind's boundary: after `step()` returns, the first half of the averaged
    tensor is put back to this holder's own Δ (one reducer's share in a group of two), as hivemind does with
    parts that missed next_chunk_timeout, while the result says that everything arrived."""

    def __init__(self, averager, rounds: set[int]):
        self._averager, self._rounds, self._calls = averager, rounds, 0

    def __getattr__(self, name):
        return getattr(self._averager, name)

    def step(self, **kwargs):
        control = self._averager.step(**kwargs)
        corrupt = self._calls in self._rounds
        self._calls += 1
        return _Corrupting(control, self._averager) if corrupt else control


class _Corrupting:
    """A hivemind StepControl whose result is corrupted as above."""

    def __init__(self, control, averager):
        self.control, self.averager, self.local = control, averager, None

    def __getattr__(self, name):
        return getattr(self.control, name)

    def __setattr__(self, name, value):
        if name == "weight":
            self.control.weight = value
        else:
            super().__setattr__(name, value)

    def allow_allreduce(self):
        with self.averager.get_tensors() as (t,):
            self.local = t.clone()  # SwarmAverager put this holder's Δ in just before
        self.control.allow_allreduce()

    def result(self, timeout=None):
        result = self.control.result(timeout=timeout)
        with self.averager.get_tensors() as (t,):
            half = t.numel() // 2
            t[:half] = self.local[:half]
        return result


@pytest.mark.slow  # real hivemind peers
def test_a_corrupted_average_is_a_mismatch_on_every_holder_and_retry_keeps_them_identical(
        tiny_checkpoint, shutdown, caplog):
    """fp16 (the default): the trunk and l0e2 average normally and agree to rounding; l0e1's average is
    corrupted on the second worker in round 0: both holders see the mismatch, keep θ_start and momentum
    (retry) and their own progress, and round 1 (no fault) averages the two rounds' Δ and agrees again."""
    assignments = [{0: [0, 1, 2]}, {0: [1, 2, 3]}]
    workers = start_workers(tiny_checkpoint, assignments, settings(averaging_timeout=95.0), inner())
    shutdown(workers)
    bad = workers[1]
    bad.averager.averagers["l0e1"] = CorruptedAverage(bad.averager.averagers["l0e1"], rounds={0})
    start = {m: workers[0].outer.theta[m].clone() for m in ("trunk", "l0e1", "l0e2")}
    with caplog.at_level(logging.WARNING, logger="swarm"):
        metrics = run_round(workers, 0)
    for m in metrics:
        assert (m["modules_mismatch"], m["modules_averaged"], m["modules_failed"]) == (1, 2, 0), m
    messages = [r.getMessage() for r in caplog.records]
    assert any("module l0e1" in m and bad.peer_id in m and "checksum differs" in m for m in messages), messages
    for w in workers:
        assert torch.equal(w.outer.theta["l0e1"], start["l0e1"])  # retry: the reference stays θ_start...
        assert not w.outer.momentum["l0e1"].any()                 # ...and the momentum (zero in round 0)
        assert not torch.equal(w.module_state("l0e1"), start["l0e1"])  # ...the local progress is kept
        assert not torch.equal(w.outer.theta["trunk"], start["trunk"])  # the others took the outer step
    for module in ("trunk", "l0e2"):
        torch.testing.assert_close(workers[0].outer.theta[module], workers[1].outer.theta[module], rtol=0, atol=1e-6)

    registry = CollectorRegistry()
    SwarmMetrics(registry).record_round(bad.last_report, 2.0, 1.0, 2.0, run="t")
    text = generate_latest(registry).decode()
    assert 'mujina_swarm_averaging_total{group="expert",outcome="mismatch"} 1.0' in text
    assert 'mujina_swarm_averaging_total{group="trunk",outcome="ok"} 1.0' in text

    metrics = run_round(workers, 1)  # no fault: every shared module averages and the holders agree again
    for m in metrics:
        assert (m["modules_mismatch"], m["modules_averaged"], m["modules_failed"]) == (0, 3, 0), m
    for module in ("trunk", "l0e1", "l0e2"):
        torch.testing.assert_close(workers[0].outer.theta[module], workers[1].outer.theta[module], rtol=0, atol=1e-6)
        torch.testing.assert_close(workers[0].module_state(module), workers[1].module_state(module),
                                   rtol=0, atol=1e-6)


def test_the_sketch_tolerates_rounding_and_catches_a_part_left_local():
    """The sketch of r and of r + fp16-size noise agree; with 1% of r back at the local values they do not."""
    torch.manual_seed(0)
    local_BN = torch.randn(2, 200_000) * 1e-3
    avg = local_BN.mean(0)
    rounded = [x + (avg - x).half().float() for x in local_BN]  # hivemind's result on each of two holders
    a, b = (agreement_sketch(r, x, "fp16") for r, x in zip(rounded, local_BN, strict=True))
    assert sketches_agree(a, b)
    partial = rounded[1].clone()
    partial[5000:7000] = local_BN[1, 5000:7000]
    assert not sketches_agree(a, agreement_sketch(partial, local_BN[1], "fp16"))
    assert not sketches_agree(a, {"proj": [float("nan")] * len(a["proj"]), "tol": a["tol"]})


class RecordingWorker(SwarmWorker):
    """Keeps each round's local Δ (taken just before averaging) for comparison."""

    def before_outer(self, round_):
        self.local_delta = {m: d.clone() for m, d in self.outer.deltas().items()}


@pytest.mark.slow  # real hivemind peers
def test_with_policy_local_a_mismatched_module_steps_with_each_holders_own_delta(tiny_checkpoint, shutdown):
    """'local': neither holder applies the corrupted average; each takes the outer step with its own Δ,
    θ = θ_start − lr·(Δ + μ·Δ) with fresh momentum, while the trunk uses the agreed average."""
    assignments = [{0: [0, 1]}, {0: [1, 2]}]
    workers = start_workers(tiny_checkpoint, assignments, settings(failure_policy="local", averaging_timeout=95.0),
                            inner(), cls=RecordingWorker)
    shutdown(workers)
    workers[0].averager.averagers["l0e1"] = CorruptedAverage(workers[0].averager.averagers["l0e1"], rounds={0})
    start = workers[0].outer.theta["l0e1"].clone()
    metrics = run_round(workers, 0)
    for w, m in zip(workers, metrics, strict=True):
        assert (m["modules_mismatch"], m["modules_averaged"]) == (1, 1), m
        own = w.local_delta["l0e1"]
        assert torch.equal(w.outer.momentum["l0e1"], own)  # after one step from zero, the momentum is the Δ used
        torch.testing.assert_close(w.outer.theta["l0e1"], start - 0.7 * (1 + 0.9) * own, rtol=0, atol=1e-6)
        assert not torch.equal(w.outer.momentum["trunk"], w.local_delta["trunk"])  # the trunk was averaged
    torch.testing.assert_close(workers[0].outer.theta["trunk"], workers[1].outer.theta["trunk"], rtol=0, atol=1e-6)
