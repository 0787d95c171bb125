"""Prometheus metrics of the worker daemon (`--metrics-port P`), or a null version when off.

Chosen once at start-up (`make_metrics`); the daemon calls the same methods on either. Names are the
names the dashboards query (dashboards/README.md): mujina_worker_tasks_total{kind,outcome}, mujina_worker_state{state},
mujina_worker_task_seconds{kind}, mujina_worker_output_tokens_total{kind}, mujina_worker_pending_uploads.
The swarm code registers its own metrics in `registry`. Every (kind, outcome) series of the worker's task
kinds exists from start-up at 0, so rate() and alerts on failures have a series before the first failure.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

STATES = ("running", "waiting_for_work", "outside_active_hours", "backoff", "draining")
OUTCOMES = ("completed", "failed", "cancelled", "refused")


class NullMetrics:
    registry = None

    def task_done(self, kind: str, outcome: str, seconds: float, output_tokens: float = 0.0) -> None: ...
    def state(self, state: str) -> None: ...
    def pending_uploads(self, n: int) -> None: ...
    def close(self) -> None: ...


class PrometheusMetrics(NullMetrics):
    def __init__(self, port: int, host: str = "0.0.0.0", kinds: tuple[str, ...] = ()):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        self.registry = CollectorRegistry()
        self._tasks = Counter("mujina_worker_tasks_total", "Tasks finished by this worker, by outcome",
                              ["kind", "outcome"], registry=self.registry)
        self._state = Gauge("mujina_worker_state", "1 for the daemon's current state", ["state"],
                            registry=self.registry)
        self._seconds = Histogram("mujina_worker_task_seconds", "Wall time of a task", ["kind"],
                                  registry=self.registry, buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600))
        self._tokens = Counter("mujina_worker_output_tokens_total", "Tokens generated (generate/judge)", ["kind"],
                               registry=self.registry)
        self._pending = Gauge("mujina_worker_pending_uploads", "Finished results waiting on disk for the coordinator",
                              registry=self.registry)
        for s in STATES:
            self._state.labels(s).set(0)
        for kind in kinds:
            for outcome in OUTCOMES:
                self._tasks.labels(kind, outcome)
            self._seconds.labels(kind)
            self._tokens.labels(kind)
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)

    def task_done(self, kind, outcome, seconds, output_tokens=0.0):
        self._tasks.labels(kind, outcome).inc()
        self._seconds.labels(kind).observe(seconds)
        if output_tokens:
            self._tokens.labels(kind).inc(output_tokens)

    def state(self, state):
        for s in STATES:
            self._state.labels(s).set(1 if s == state else 0)

    def pending_uploads(self, n):
        self._pending.set(n)

    def close(self):
        self._server.shutdown()


def make_metrics(port: int | None, host: str = "0.0.0.0", kinds: tuple[str, ...] = ()) -> NullMetrics:
    return NullMetrics() if port is None else PrometheusMetrics(port, host, kinds)
