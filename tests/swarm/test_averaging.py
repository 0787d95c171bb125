"""Real hivemind peers on 127.0.0.1: ticket-weighted aggregates, identical holders, refusals, newcomers."""

from __future__ import annotations

import logging

import pytest
import torch

from model.checkpoint import load_checkpoint
from swarm.round import SwarmWorker
from swarm.round_checkpoint import load_outer_state, save_round_checkpoint
from tests.swarm.conftest import average_together, inner, run_round, settings, start_exchanges, start_workers

pytestmark = pytest.mark.slow  # real hivemind peers (DHT, p2pd) on loopback


def test_two_peers_get_the_ticket_weighted_mean(shutdown):
    """Two holders: Δ = [1..5] and −2·[1..5] with ticket weights 1 and 3: both get (1 − 6)/4·[1..5]."""
    peers = start_exchanges(2, {"trunk": 5}, settings(compression="none"))
    shutdown(peers)
    given = [{"trunk": torch.arange(1.0, 6.0)}, {"trunk": torch.arange(1.0, 6.0) * -2}]
    out = average_together(peers, given, [1.0, 3.0])
    for i in range(2):
        assert out[i]["trunk"].outcome == "ok" and out[i]["trunk"].group_size == 2 and out[i]["trunk"].bytes_sent > 0
        torch.testing.assert_close(given[i]["trunk"], torch.arange(1.0, 6.0) * -1.25, rtol=0, atol=1e-6)


def test_three_honest_deltas_average_to_their_mean_identically_on_every_peer(shutdown):
    """Honest Δs of equal weight scattered alike about their mean: CenteredClip clips none of them and is their
    mean, and every member computes it from the same bytes, so the results are equal bit for bit."""
    peers = start_exchanges(3, {"trunk": 1000}, settings(compression="fp16"))
    shutdown(peers)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1000, generator=g)
    deltas = [base + 0.1 * torch.randn(1000, generator=g) for _ in range(3)]
    weights = [2.0, 2.0, 2.0]
    coded = [d.half().float() for d in deltas]   # what fp16 delivers
    expected = sum(w * d for w, d in zip(weights, coded, strict=True)) / sum(weights)
    given = [{"trunk": d.clone()} for d in deltas]
    out = average_together(peers, given, weights)
    for i in range(3):
        assert out[i]["trunk"].outcome == "ok" and out[i]["trunk"].group_size == 3
        torch.testing.assert_close(given[i]["trunk"], expected, rtol=0, atol=1e-5)
        assert torch.equal(given[i]["trunk"], given[0]["trunk"])


def test_8bit_compression_averages_across_peers(shutdown):
    """The 8-bit option really averages: hivemind 1.1.12's own decoder fails under numpy 2;
    swarm/hivemind_compat.py registers a fixed one. Two peers, a smooth Δ each."""
    peers = start_exchanges(2, {"trunk": 4096}, settings(compression="8bit"))
    shutdown(peers)
    x = torch.linspace(-1.0, 1.0, 4096)
    given = [{"trunk": torch.sin(3 * x)}, {"trunk": torch.cos(2 * x)}]
    expected = (given[0]["trunk"] + given[1]["trunk"]) / 2
    out = average_together(peers, given, [1.0, 1.0])
    for i in range(2):
        assert out[i]["trunk"].outcome == "ok" and out[i]["trunk"].group_size == 2
        torch.testing.assert_close(given[i]["trunk"], expected, rtol=0, atol=0.02)  # 256 levels over ±3σ
    assert torch.equal(given[0]["trunk"], given[1]["trunk"])


def _assert_holders_equal(workers, assignments, shared):
    for module in shared:
        states = [w.module_state(module) for w, a in zip(workers, assignments, strict=True)
                  if module == "trunk" or int(module[3:]) in a[0]]
        assert len(states) >= 2, module
        for st in states[1:]:
            assert torch.equal(st, states[0]), module


@pytest.mark.parametrize("compression", ["none", "fp16"])
def test_after_a_round_every_holder_of_a_module_has_the_same_parameters(tiny_checkpoint, shutdown, compression):
    """Two rounds, three workers, overlapping expert sets: every holder of a module ends each round with
    the same parameters, bit for bit, compression or not."""
    assignments = [{0: [0, 1]}, {0: [1, 2, 3]}, {0: [0, 2, 3]}]
    workers = start_workers(tiny_checkpoint, assignments, settings(compression=compression), inner())
    shutdown(workers)
    start = workers[0].module_state("trunk").clone()
    for r in range(2):
        metrics = run_round(workers, r)
        for m in metrics:
            assert m["modules_failed"] == 0 and m["modules_refused"] == 0 and m["modules_averaged"] >= 3, m
            assert m["bytes_sent"] > 0
        _assert_holders_equal(workers, assignments, ["trunk", "l0e0", "l0e1", "l0e2", "l0e3"])
    assert not torch.equal(workers[0].module_state("trunk"), start)  # training did move the trunk


class NaNWorker(SwarmWorker):
    """Fault injection: expert 1's parameters turn NaN after the inner steps (a diverged or broken GPU)."""

    def before_outer(self, round_):
        with torch.no_grad():
            self.model.layers[0].feed_forward.w1_EFD[self.index["l0e1"]].fill_(float("nan"))


def test_a_nan_delta_is_not_sent_and_the_others_average_without_it(tiny_checkpoint, shutdown, caplog):
    assignments = [{0: [0, 1]}, {0: [1, 2]}, {0: [1, 3]}]
    workers = start_workers(tiny_checkpoint, assignments[:2], settings(compression="none", averaging_timeout=5.0),
                            inner())
    bad = NaNWorker(tiny_checkpoint, assignments[2], settings(compression="none", averaging_timeout=5.0),
                    inner(data_offset=4), initial_peers=workers[0].exchange.visible_maddrs())
    shutdown(workers + [bad])
    before = bad.module_state("l0e1").clone()
    with caplog.at_level(logging.WARNING, logger="swarm"):
        metrics = run_round(workers + [bad], 0)
    assert metrics[2]["modules_refused"] == 1
    assert torch.equal(bad.module_state("l0e1"), before)  # back to θ_start, finite
    assert metrics[0]["modules_refused"] == 0 and metrics[0]["modules_failed"] == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(bad.peer_id in m and "l0e1" in m for m in messages), messages  # the others name the silent peer
    a, b = workers[0].module_state("l0e1"), workers[1].module_state("l0e1")
    assert torch.isfinite(a).all() and torch.equal(a, b)


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
                           initial_peers=workers[0].exchange.visible_maddrs())
    shutdown([newcomer])
    assert newcomer.start_round == 1
    for module, holder in (("trunk", workers[0]), ("l0e0", workers[0]), ("l0e3", workers[1])):
        torch.testing.assert_close(newcomer.module_state(module), holder.module_state(module), rtol=0, atol=0)
        torch.testing.assert_close(newcomer.outer.momentum[module], holder.outer.momentum[module], rtol=0, atol=0)
        assert newcomer.outer.momentum[module].abs().sum() > 0


def test_a_member_that_never_sends_follows_the_failure_policy(tiny_checkpoint, shutdown, caplog):
    """A ticket names a partner that never sends (dead, or refusing to take part): 'retry' keeps θ_start and
    the local progress (next round's Δ carries it), 'local' takes the outer step with its own Δ. Both warn,
    naming the module and the silent member; neither waits past averaging_timeout."""
    from tests.swarm.conftest import member, tickets

    fast = dict(compression="none", averaging_timeout=3.0)
    retry = SwarmWorker(tiny_checkpoint, {0: [0, 1]}, settings(run="retry", failure_policy="retry", **fast), inner())
    local = SwarmWorker(tiny_checkpoint, {0: [0, 1]}, settings(run="local", failure_policy="local", **fast), inner())
    ghost = SwarmWorker(tiny_checkpoint, {0: [0, 1]}, settings(run="ghost", **fast), inner())
    shutdown([retry, local, ghost])
    given = [tickets([w], 0, {"ghost": member(ghost)}, run=w.settings.run)[0] for w in (retry, local)]
    start = retry.outer.theta["trunk"].clone()
    with caplog.at_level(logging.WARNING, logger="swarm"):
        metrics = run_round([retry, local], 0, given)
    assert metrics[0]["modules_failed"] == 3 and metrics[1]["modules_failed"] == 3
    assert any("module trunk" in r.getMessage() and ghost.peer_id in r.getMessage() for r in caplog.records)
    # retry: the reference stays θ_start, the parameters keep the inner steps' progress
    assert torch.equal(retry.outer.theta["trunk"], start)
    assert not torch.equal(retry.module_state("trunk"), start)
    # local: outer step with the local Δ alone: θ = θ_start − lr·(Δ + μ·Δ) with fresh momentum
    delta = local.outer.momentum["trunk"]  # after one outer step from zero, the momentum is Δ itself
    torch.testing.assert_close(local.outer.theta["trunk"], start - 0.7 * (1 + 0.9) * delta, rtol=0, atol=1e-6)
    torch.testing.assert_close(local.module_state("trunk"), local.outer.theta["trunk"], rtol=0, atol=0)
