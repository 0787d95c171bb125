"""Prometheus metrics of the worker daemon (`--metrics-port P`, on `--metrics-host`, 127.0.0.1 by default), or a
null version when off.

The listening socket is not inherited: it is close-on-exec (a spawned program never holds it), and a fork()ed
child (hivemind's DHT process, multiprocessing) closes its copy at once, so the port is free again when the
daemon stops even while such a child lives on.

Chosen once at start-up (`make_metrics`); the daemon calls the same methods on either. Names are the
names the dashboards query (dashboards/README.md): mujina_worker_tasks_total{kind,outcome}, mujina_worker_state{state},
mujina_worker_task_seconds{kind}, mujina_worker_output_tokens_total{kind}, mujina_worker_pending_uploads.
Swarm rounds record mujina_swarm_* into the same registry (`SwarmMetrics`, or `NullSwarmMetrics`). Every
(kind, outcome) series of the worker's task kinds exists from start-up at 0, so rate() and alerts on
failures have a series before the first failure.
"""

from __future__ import annotations

import logging
import os
import weakref

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
    def __init__(self, port: int, host: str = "127.0.0.1", kinds: tuple[str, ...] = ()):
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
        _not_inherited(self._server.socket)
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
        self._server.server_close()  # the port is free again at once


def _not_inherited(sock) -> None:
    """Keep `sock` (a listening socket) out of every child: close-on-exec for spawned programs, and closed in a
    fork()ed child right after the fork (os.register_at_fork). The hook holds the socket weakly: a closed or
    collected server is skipped."""
    sock.set_inheritable(False)
    ref = weakref.ref(sock)

    def close_in_child() -> None:
        s = ref()
        if s is not None and s.fileno() != -1:
            s.close()  # this process's copy only: the parent keeps listening

    os.register_at_fork(after_in_child=close_in_child)


def make_metrics(port: int | None, host: str = "127.0.0.1", kinds: tuple[str, ...] = ()) -> NullMetrics:
    return NullMetrics() if port is None else PrometheusMetrics(port, host, kinds)


# ---- swarm rounds (swarm/round.py's RoundReport), recorded by the train executor ----------------------

class NullSwarmMetrics:
    """What the executor records into when the daemon serves no metrics."""

    def record_round(self, report, inner_loss: float, inner_seconds: float, round_seconds: float, *,
                     run: str) -> None:
        ...


class SwarmMetrics(NullSwarmMetrics):
    """The agreed swarm metrics (dashboards depend on these names), registered in the daemon's registry."""

    def __init__(self, registry):
        from prometheus_client import Counter, Gauge

        kw = {"registry": registry}
        self.rounds = Counter("mujina_swarm_rounds", "swarm rounds by outcome", ["outcome"], **kw)
        self.averaging = Counter("mujina_swarm_averaging", "module averagings by group and outcome",
                                 ["group", "outcome"], **kw)
        self.bytes_sent = Counter("mujina_swarm_bytes_sent", "bytes sent in all-reduce (compressed)", **kw)
        # run and phase label the loss as on mujina_train_* and mujina_latest_loss (phase: the project's stage)
        self.inner_loss = Gauge("mujina_swarm_inner_loss", "mean inner loss of the last round", ["run", "phase"],
                                **kw)
        self.inner_seconds = Counter("mujina_swarm_inner_seconds", "time in inner steps", **kw)
        self.round_seconds = Counter("mujina_swarm_round_seconds", "wall time of rounds", **kw)
        # every labelled series exists from start-up at 0, so rates and alerts have a series before the first event
        for outcome in ("averaged", "local_only", "failed"):
            self.rounds.labels(outcome)
        for group in ("trunk", "expert"):
            for outcome in ("ok", "failed", "refused"):
                self.averaging.labels(group, outcome)

    def record_round(self, report, inner_loss: float, inner_seconds: float, round_seconds: float, *,
                     run: str) -> None:
        outcomes = {m.outcome for m in report.modules}
        # averaged: some module was averaged; local_only: nothing to average with (averaging off, sole
        # holders); failed: every averaging failed (no other member's Δ arrived) or was refused
        label = "averaged" if "ok" in outcomes else "local_only" if outcomes == {"local"} else "failed"
        self.rounds.labels(label).inc()
        for m in report.modules:
            if m.outcome in ("ok", "failed", "refused"):
                self.averaging.labels("trunk" if m.module == "trunk" else "expert", m.outcome).inc()
        self.bytes_sent.inc(report.bytes_sent)
        self.inner_loss.labels(run, "swarm").set(inner_loss)
        self.inner_seconds.inc(inner_seconds)
        self.round_seconds.inc(round_seconds)
