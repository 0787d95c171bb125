"""Prometheus metrics of the coordinator, or a null version when `--metrics-port` is not given.

`make_metrics(port, store, host)` is called once at start-up (host 127.0.0.1 unless --metrics-host
says otherwise; served by a bounded pool of threads, idle connections closed: coordinator/http_serve.py);
the server calls the same methods on either object, so the hot path never asks whether metrics are on.
Names follow Prometheus conventions (`_total` counters, `_seconds` durations, base units).

Gauges that are facts of the store (tasks by kind and state, active workers, contributions) are
read from it at scrape time by a collector, so they are right after a restart too.
"""

from __future__ import annotations

import logging
import re
import threading
import time

from sqlalchemy import and_, func, select

from . import store as S

log = logging.getLogger(__name__)

ACTIVE_WORKER_WINDOW_S = 60.0  # a worker seen within this is "active"
KIND_PHASES = {"train": "swarm"}  # the coordinator's train tasks are swarm rounds
_PHASE_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")


def live_workers(conn, now: float, limit: int = 200) -> tuple[list, int, int]:
    """(rows, live, registered): one worker row per (token, name), its newest registration (older ones of the
    same volunteer and name are the same worker before a restart), most recently seen first; `live` counts
    those heard from within ACTIVE_WORKER_WINDOW_S; `registered` the distinct (token, name) pairs."""
    w = S.workers.c
    newest = (select(w.token, w.name, func.max(w.registered).label("registered"))
              .group_by(w.token, w.name).subquery())
    join = S.workers.join(newest, and_(w.token == newest.c.token, w.name == newest.c.name,
                                       w.registered == newest.c.registered))
    rows = conn.execute(select(S.workers).select_from(join).order_by(w.last_seen.desc()).limit(limit)).all()
    live = conn.execute(select(func.count()).select_from(join)
                        .where(w.last_seen > now - ACTIVE_WORKER_WINDOW_S)).scalar_one()
    registered = conn.execute(select(func.count()).select_from(newest)).scalar_one()
    return rows, live, registered


def loss_phase(kind: str, payload: dict) -> str:
    """The `phase` label of a result's loss (as on mujina_train_* and mujina_swarm_inner_loss): payload.phase
    when the task names one (an eval task of a pretrain or sft checkpoint: {"phase": "pretrain", ...}), else
    by kind: train tasks are swarm rounds ("swarm"); any other kind is its own phase ("eval")."""
    phase = payload.get("phase")
    return phase if isinstance(phase, str) and _PHASE_RE.fullmatch(phase) else KIND_PHASES.get(kind, kind)


class NullMetrics:
    def rpc(self, method: str, code: str, seconds: float) -> None: ...
    def lease_granted(self, kind: str) -> None: ...
    def lease_expired(self, n: int) -> None: ...
    def lease_completed(self, kind: str) -> None: ...
    def latest_loss(self, run: str, kind: str, phase: str, loss: float) -> None: ...
    def close(self) -> None: ...


class StoreCollector:
    """Reads gauges from the store on every scrape (one small query each)."""

    def __init__(self, store: S.Store):
        self.store = store

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        tasks = GaugeMetricFamily("mujina_tasks", "Tasks by kind and state", labels=["kind", "state"])
        workers = GaugeMetricFamily("mujina_active_workers",
                                    f"Workers that heartbeated within {ACTIVE_WORKER_WINDOW_S:.0f} s")
        contrib = GaugeMetricFamily("mujina_contributions", "Validated contributions by volunteer, kind and unit",
                                    labels=["volunteer", "kind", "unit"])
        try:
            with self.store.read() as conn:
                for kind, state, n in conn.execute(select(S.tasks.c.kind, S.tasks.c.state, func.count())
                                                   .group_by(S.tasks.c.kind, S.tasks.c.state)):
                    tasks.add_metric([kind, state], n)
                # one per (volunteer, worker name): a worker that registered again is the same worker
                workers.add_metric([], live_workers(conn, time.time(), limit=0)[1])
                for vol, kind, unit, amount in conn.execute(
                        select(S.ledger.c.volunteer, S.ledger.c.kind, S.ledger.c.unit, func.sum(S.ledger.c.amount))
                        .group_by(S.ledger.c.volunteer, S.ledger.c.kind, S.ledger.c.unit)):
                    contrib.add_metric([vol, kind, unit], float(amount))
        except Exception:  # a scrape must never take the server down; the store's error is logged
            log.exception("metrics: reading the store failed")
        yield from (tasks, workers, contrib)


class SyntheticCollector:
    """mujina_synthetic_records{kind,outcome,reason}: accepted and rejected synthetic records, read from
    STATE_DIR/synthetic/stats.json (written by the generate and judge validators) at scrape time."""

    def __init__(self, state_dir):
        from pathlib import Path

        self.path = Path(state_dir) / "synthetic" / "stats.json"

    def collect(self):
        import json

        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily("mujina_synthetic_records", "Synthetic records by kind, outcome and rejection reason",
                              labels=["kind", "outcome", "reason"])
        try:
            stats = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, ValueError):
            stats = {}
        for kind, s in stats.items():
            g.add_metric([kind, "accepted", ""], s["accepted"])
            for reason, n in s["rejected"].items():
                g.add_metric([kind, "rejected", reason], n)
        yield g


class SwarmCollector:
    """mujina_swarm_round{run} and mujina_swarm_expert_holders{run,layer,expert} (0: frozen), read from the
    run's swarm status (STATE_DIR/swarm/RUN.json, written by the round driver) at scrape time."""

    def __init__(self, state_dir, run: str):
        self.state_dir, self.run = state_dir, run

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from .swarm_driver import expert_holders, read_status

        status = read_status(self.state_dir, self.run)
        if status is None:
            return
        rnd = GaugeMetricFamily("mujina_swarm_round", "The swarm run's current round", labels=["run"])
        rnd.add_metric([self.run], status["round"])
        holders = GaugeMetricFamily("mujina_swarm_expert_holders", "Workers holding each expert this round",
                                    labels=["run", "layer", "expert"])
        for row in expert_holders(self.state_dir, self.run):
            holders.add_metric([self.run, str(row["layer"]), str(row["expert"])], len(row["holders"]))
        yield rnd
        yield holders


class PrometheusMetrics(NullMetrics):
    def __init__(self, port: int, store: S.Store, host: str = "127.0.0.1", state_dir=None, run: str | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.exposition import MetricsHandler

        from .http_serve import BoundedHTTPServer

        self.registry = CollectorRegistry()
        self._rpc = Histogram("mujina_rpc_duration_seconds", "Coordinator RPC latency", ["method", "code"],
                              registry=self.registry,
                              buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10))
        self._granted = Counter("mujina_leases_granted_total", "Leases granted", ["kind"], registry=self.registry)
        self._expired = Counter("mujina_leases_expired_total", "Leases that expired unrenewed", registry=self.registry)
        self._completed = Counter("mujina_leases_completed_total", "Leases whose result was accepted", ["kind"],
                                  registry=self.registry)
        self._loss = Gauge("mujina_latest_loss", "Latest validated loss per run, task kind and phase",
                           ["run", "kind", "phase"], registry=self.registry)
        self.registry.register(StoreCollector(store))
        if state_dir is not None:
            self.registry.register(SyntheticCollector(state_dir))
            if run is not None:
                self.registry.register(SwarmCollector(state_dir, run))
        # prometheus_client's start_http_server runs a thread per connection with no timeout: served here by
        # a fixed pool instead, idle connections closed (coordinator/http_serve.py)
        try:
            self._server = BoundedHTTPServer((host, port), MetricsHandler.factory(self.registry))
        except OSError as err:
            raise OSError(f"metrics: cannot listen on {host}:{port} ({err.strerror}); pick another --metrics-port "
                          "(0 picks a free one) or --metrics-host") from None
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def rpc(self, method, code, seconds):
        self._rpc.labels(method, code).observe(seconds)

    def lease_granted(self, kind):
        self._granted.labels(kind).inc()

    def lease_expired(self, n):
        self._expired.inc(n)

    def lease_completed(self, kind):
        self._completed.labels(kind).inc()

    def latest_loss(self, run, kind, phase, loss):
        self._loss.labels(run, kind, phase).set(loss)

    def close(self):
        self._server.shutdown()
        self._server.server_close()


def make_metrics(port: int | None, store: S.Store, host: str = "127.0.0.1", state_dir=None,
                 run: str | None = None) -> NullMetrics:
    return NullMetrics() if port is None else PrometheusMetrics(port, store, host, state_dir, run)
