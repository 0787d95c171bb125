"""Real hivemind peers on 127.0.0.1: weighted averages, identical holders, refusals, newcomers."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from model.checkpoint import load_checkpoint
from swarm.averager import SwarmAverager
from swarm.round import SwarmWorker
from swarm.round_checkpoint import load_outer_state, save_round_checkpoint
from swarm.tensors import module_tensors
from tests.swarm.conftest import average_together, inner, run_round, settings, start_workers

pytestmark = pytest.mark.slow  # real hivemind peers (DHT, p2pd, averagers) on loopback


def test_weighted_average_of_hand_made_deltas(shutdown):
    """Three peers average Δ = [1..5]·k with weights 1, 2, 3: every peer must get Σ w Δ / Σ w."""
    s = settings(compression="none")
    first = SwarmAverager(s, {"m": 5}, expected_holders={"m": 3})
    peers = [first] + [SwarmAverager(s, {"m": 5}, initial_peers=first.visible_maddrs(), expected_holders={"m": 3})
                       for _ in range(2)]
    shutdown(peers)
    deltas = [torch.arange(1.0, 6.0) * k for k in (1.0, -2.0, 4.0)]
    weights = [1.0, 2.0, 3.0]
    expected = sum(w * d for w, d in zip(weights, deltas, strict=True)) / sum(weights)  # (−3+12)/6·[1..5] = 1.5·[1..5]
    given = [{"m": d.clone()} for d in deltas]
    out = average_together(peers, given, weights)
    for i in range(3):
        assert out[i]["m"].outcome == "ok" and out[i]["m"].group_size == 3
        torch.testing.assert_close(given[i]["m"], expected, rtol=0, atol=1e-5)
        assert out[i]["m"].bytes_sent > 0


def test_groups_form_while_the_inner_steps_run_and_average_once_the_deltas_are_ready(shutdown):
    """begin(): matchmaking starts before Δ exists. Both peers' hivemind steps reach AWAITING_TRIGGER (group
    formed, all-reduce not started) while this test stands in for the inner steps; average() then only
    starts the all-reduce, of the Δs given to it, not of what the averagers held when the group formed."""
    from hivemind.averaging.control import AveragingStage

    s = settings(compression="none")
    first = SwarmAverager(s, {"m": 4}, expected_holders={"m": 2})
    peers = [first, SwarmAverager(s, {"m": 4}, initial_peers=first.visible_maddrs(), expected_holders={"m": 2})]
    shutdown(peers)
    for p in peers:
        p.begin(0, ready_in=60.0)  # a long inner loop: the group must not wait for the scheduled time
    controls = [p._pending[1]["m"] for p in peers]
    deadline = time.monotonic() + 60
    while not all(c.stage == AveragingStage.AWAITING_TRIGGER for c in controls):
        assert time.monotonic() < deadline, [c.stage for c in controls]
        assert not any(c.done() for c in controls), [c.exception() for c in controls if c.done()]
        time.sleep(0.1)
    given = [{"m": torch.full((4,), v)} for v in (1.0, 3.0)]
    out = average_together(peers, given, [1.0, 1.0])
    for i in range(2):
        assert out[i]["m"].outcome == "ok" and out[i]["m"].group_size == 2, out[i]
        torch.testing.assert_close(given[i]["m"], torch.full((4,), 2.0), rtol=0, atol=1e-6)


def test_8bit_compression_averages_across_peers(shutdown):
    """The 8-bit option really averages: hivemind 1.1.12's own decoder fails under numpy 2 (every received part
    was lost, a silent local update); swarm/hivemind_compat.py registers a fixed one. Two peers, a smooth Δ each."""
    s = settings(compression="8bit", averaging_timeout=95.0)
    first = SwarmAverager(s, {"m": 4096}, expected_holders={"m": 2})
    peers = [first, SwarmAverager(s, {"m": 4096}, initial_peers=first.visible_maddrs(), expected_holders={"m": 2})]
    shutdown(peers)
    x = torch.linspace(-1.0, 1.0, 4096)
    given = [{"m": torch.sin(3 * x)}, {"m": torch.cos(2 * x)}]
    expected = (given[0]["m"] + given[1]["m"]) / 2
    out = average_together(peers, given, [1.0, 1.0])
    for i in range(2):
        assert out[i]["m"].outcome == "ok" and out[i]["m"].group_size == 2
        # each peer adds the 8-bit-coded (average - own Δ) to its own Δ: 256 levels over ±3σ of a range ~1
        torch.testing.assert_close(given[i]["m"], expected, rtol=0, atol=0.02)


def _assert_holders_agree(workers, assignments, atol, shared):
    for module in shared:
        states = [w.module_state(module) for w, a in zip(workers, assignments, strict=True)
                  if module == "trunk" or int(module[3:]) in a[0]]
        assert len(states) >= 2, module
        for st in states[1:]:
            torch.testing.assert_close(st, states[0], rtol=0, atol=atol, msg=module)


def test_after_a_round_every_holder_of_a_module_has_the_same_parameters(tiny_checkpoint, shutdown):
    """Two rounds, three workers, overlapping expert sets; exact without compression, fp16-close with it."""
    assignments = [{0: [0, 1]}, {0: [1, 2, 3]}, {0: [0, 2, 3]}]
    # A generous chunk timeout (10 s: a third of the all-reduce timeout, (95 - 3 - 2) / 3): on a loaded
    # machine hivemind may finish an all-reduce with parts missing (it logs "received N% results" and keeps
    # local values there); the swarm then reports a "mismatch" and keeps θ_start
    # (tests/swarm/test_agreement.py), but this test wants averages.
    workers = start_workers(tiny_checkpoint, assignments, settings(compression="none", averaging_timeout=95.0),
                            inner())
    shutdown(workers)
    start = workers[0].module_state("trunk").clone()
    for r in range(2):
        metrics = run_round(workers, r)
        for m in metrics:
            assert m["modules_failed"] == 0 and m["modules_refused"] == 0, m
            assert m["bytes_sent"] > 0
        _assert_holders_agree(workers, assignments, 1e-7, ["trunk", "l0e0", "l0e1", "l0e2", "l0e3"])
    assert not torch.equal(workers[0].module_state("trunk"), start)  # training did move the trunk


def test_fp16_compression_keeps_holders_within_rounding(tiny_checkpoint, shutdown):
    assignments = [{0: [0, 1, 2]}, {0: [1, 2, 3]}]
    workers = start_workers(tiny_checkpoint, assignments, settings(compression="fp16", averaging_timeout=95.0),
                            inner())
    shutdown(workers)
    metrics = run_round(workers, 0)
    assert all(m["modules_failed"] == 0 for m in metrics)
    # Δ norms are ~1e-3: fp16 rounding of the returned difference is ~1e-3 · 2^-11 per element
    _assert_holders_agree(workers, assignments, 1e-6, ["trunk", "l0e1", "l0e2"])


class NaNWorker(SwarmWorker):
    """Fault injection: expert 1's parameters turn NaN after the inner steps (a diverged or broken GPU)."""

    def before_outer(self, round_):
        with torch.no_grad():
            self.model.layers[0].feed_forward.w1_EFD[self.index["l0e1"]].fill_(float("nan"))


def test_a_nan_delta_is_refused_and_logged_with_the_peer_id(tiny_checkpoint, shutdown, caplog):
    assignments = [{0: [0, 1]}, {0: [1, 2]}, {0: [1, 3]}]
    workers = start_workers(tiny_checkpoint, assignments[:2], settings(compression="none"), inner(),
                            expected={"trunk": 3, "l0e0": 1, "l0e1": 3, "l0e2": 1, "l0e3": 1})
    shutdown(workers)
    bad = NaNWorker(tiny_checkpoint, assignments[2], settings(compression="none"),
                    inner(data_offset=4), initial_peers=workers[0].averager.visible_maddrs(),
                    expected_holders={"trunk": 3, "l0e0": 1, "l0e1": 3, "l0e2": 1, "l0e3": 1})
    shutdown([bad])
    before = bad.module_state("l0e1").clone()
    with caplog.at_level(logging.WARNING, logger="swarm"):
        metrics = run_round(workers + [bad], 0)
    assert metrics[2]["modules_refused"] == 1
    assert torch.equal(bad.module_state("l0e1"), before)  # back to θ_start, finite
    assert metrics[0]["modules_refused"] == 0 and metrics[0]["modules_failed"] == 0
    assert any(bad.peer_id in r.getMessage() and "l0e1" in r.getMessage() for r in caplog.records)
    a, b = workers[0].module_state("l0e1"), workers[1].module_state("l0e1")
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


class LoudWorker(SwarmWorker):
    """Keeps its local Δs; with `loud`, its trunk moves by 1.0 per parameter after the inner steps: a finite
    Δ far above the others', which only the group can tell from a good one."""

    loud = False

    def before_outer(self, round_):
        if self.loud:
            with torch.no_grad():
                for p in module_tensors(self.model, "trunk", self.index):
                    p.add_(1.0)
        self.local_delta = {m: d.clone() for m, d in self.outer.deltas().items()}


def test_a_delta_far_above_the_median_is_refused_and_the_others_average_without_it(tiny_checkpoint, shutdown,
                                                                                   caplog):
    """The group formed while the inner steps ran, so the loud Δ went into its all-reduce; the reports
    after it show the outlier, its owner goes back to θ_start, and the other two average again without it."""
    workers = start_workers(tiny_checkpoint, [{0: [0, 1]}, {0: [1, 2]}, {0: [2, 3]}], settings(compression="none"),
                            inner(), cls=LoudWorker)
    shutdown(workers)
    loud = workers[2]
    loud.loud = True
    start = loud.outer.theta["trunk"].clone()
    with caplog.at_level(logging.WARNING, logger="swarm"):
        metrics = run_round(workers, 0)
    assert metrics[2]["modules_refused"] == 1
    assert torch.equal(loud.outer.theta["trunk"], start) and torch.equal(loud.module_state("trunk"), start)
    messages = [r.getMessage() for r in caplog.records]
    assert any("module trunk" in m and "refusing" in m and loud.peer_id in m for m in messages), messages
    assert any("module trunk" in m and "again" in m and loud.peer_id in m for m in messages), messages
    mean = (workers[0].local_delta["trunk"] + workers[1].local_delta["trunk"]) / 2  # equal token counts
    for w, m in zip(workers[:2], metrics[:2], strict=True):
        assert (m["modules_refused"], m["modules_failed"], m["modules_mismatch"]) == (0, 0, 0), m
        torch.testing.assert_close(w.outer.momentum["trunk"], mean, rtol=0, atol=1e-6)  # Δ̄ after one step


def test_a_worker_joining_at_round_r_gets_round_r_parameters_and_momentum(tiny_checkpoint, tmp_path, shutdown):
    assignments = [{0: [0, 1, 2]}, {0: [1, 2, 3]}]
    workers = start_workers(tiny_checkpoint, assignments, settings(compression="none"), inner())
    shutdown(workers)
    run_round(workers, 0)
    # the coordinator's copy after round 0: every module from one of its holders, momentum included
    full = load_checkpoint(tiny_checkpoint)
    momentum: dict = {}
    for w in reversed(workers):
        w.export_into(full, momentum)
    ckpt = save_round_checkpoint(tmp_path / "round_1", full, momentum, 1)
    assert load_outer_state(ckpt)[1] == 1
    newcomer = SwarmWorker(ckpt, {0: [0, 3]}, settings(compression="none"), inner(data_offset=4),
                           initial_peers=workers[0].averager.visible_maddrs())
    shutdown([newcomer])
    assert newcomer.start_round == 1
    for module, holder in (("trunk", workers[0]), ("l0e0", workers[0]), ("l0e3", workers[1])):
        torch.testing.assert_close(newcomer.module_state(module), holder.module_state(module), rtol=0, atol=0)
        torch.testing.assert_close(newcomer.outer.momentum[module], holder.outer.momentum[module], rtol=0, atol=0)
        assert newcomer.outer.momentum[module].abs().sum() > 0


def test_a_group_that_does_not_form_follows_the_failure_policy(tiny_checkpoint, shutdown, caplog):
    """A lone holder that expects a partner: 'retry' keeps θ_start and the local progress (next round's Δ
    carries it), 'local' takes the outer step with its own Δ. Both warn, naming the module."""
    fast = dict(compression="none", matchmaking_time=1.0, request_timeout=0.5, averaging_timeout=8.0,
                stats_timeout=1.0)
    expected = {"trunk": 2, "l0e0": 2, "l0e1": 2}
    retry = SwarmWorker(tiny_checkpoint, {0: [0, 1]}, settings(run="retry", failure_policy="retry", **fast),
                        inner(), expected_holders=expected)
    local = SwarmWorker(tiny_checkpoint, {0: [0, 1]}, settings(run="local", failure_policy="local", **fast),
                        inner(), expected_holders=expected)
    shutdown([retry, local])
    start = retry.outer.theta["trunk"].clone()
    with caplog.at_level(logging.WARNING, logger="swarm"):
        metrics = run_round([retry, local], 0)
    assert metrics[0]["modules_failed"] == 3 and metrics[1]["modules_failed"] == 3
    assert any("module trunk" in r.getMessage() and "policy retry" in r.getMessage() for r in caplog.records)
    # retry: the reference stays θ_start, the parameters keep the inner steps' progress
    assert torch.equal(retry.outer.theta["trunk"], start)
    assert not torch.equal(retry.module_state("trunk"), start)
    # local: outer step with the local Δ alone: θ = θ_start − lr·(Δ + μ·Δ) with fresh momentum
    delta = local.outer.momentum["trunk"]  # after one outer step from zero, the momentum is Δ itself
    torch.testing.assert_close(local.outer.theta["trunk"], start - 0.7 * (1 + 0.9) * delta, rtol=0, atol=1e-6)
    torch.testing.assert_close(local.module_state("trunk"), local.outer.theta["trunk"], rtol=0, atol=0)
