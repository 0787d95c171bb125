"""The worker's Prometheus metrics (worker/metrics.py)."""

from __future__ import annotations


def test_swarm_metrics_use_the_agreed_names():
    from prometheus_client import CollectorRegistry, generate_latest

    from swarm.outer import ModuleOutcome, RoundReport
    from worker.metrics import SwarmMetrics

    reg = CollectorRegistry()
    m = SwarmMetrics(reg)
    report = RoundReport(0, [ModuleOutcome("trunk", "ok", 0.1, 2, 1000), ModuleOutcome("l0e1", "refused", 9.0)], 1.0)
    m.record_round(report, inner_loss=2.5, inner_seconds=9.0, round_seconds=10.0, run="r1")
    text = generate_latest(reg).decode()
    for line in ('mujina_swarm_rounds_total{outcome="averaged"} 1.0',
                 'mujina_swarm_averaging_total{group="trunk",outcome="ok"} 1.0',
                 'mujina_swarm_averaging_total{group="expert",outcome="refused"} 1.0',
                 "mujina_swarm_bytes_sent_total 1000.0", 'mujina_swarm_inner_loss{phase="swarm",run="r1"} 2.5',
                 "mujina_swarm_inner_seconds_total 9.0", "mujina_swarm_round_seconds_total 10.0"):
        assert line in text, line
