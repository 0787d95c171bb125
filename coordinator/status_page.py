"""The coordinator's live status page: one self-contained HTML page and the JSON endpoint behind it.

    page = StatusPage(store, run="demo", host="127.0.0.1", port=8080, project=cfg).start()   # port 0 picks one
    print(page.url)        # http://127.0.0.1:8080/  (GET / the page, GET /api/status the JSON)
    page.stop()

For organizers and volunteers who run neither Prometheus nor Grafana: a leaderboard, the loss chart,
tasks by state, why tasks died, the swarm's progress, synthetic records refused by reason, live workers,
and experts with their holders. The page (coordinator/static/status.html)
loads nothing from the network: its inline script fetches /api/status every few seconds and draws
the loss on a <canvas>.

It is served by a BoundedHTTPServer (coordinator/http_serve.py) on threads of its own: a slow browser
never touches the gRPC event loop, a fixed number of threads serve requests, and a connection that
sends nothing is closed after IDLE_TIMEOUT_S. It binds 127.0.0.1 unless told otherwise (--http-host).
It only reads the store (SQLite in WAL mode lets readers run beside the writer; on PostgreSQL they
are plain SELECTs), at most once per CACHE_S seconds however many browsers are open.

Where the numbers come from: tasks and workers from their tables (one row per (volunteer, worker
name): a worker that registered again, e.g. after a restart, is shown once, as its newest
registration, live when that one was heard from within ACTIVE_WORKER_WINDOW_S); dead tasks grouped
by the reason of their last error (the word before its colon: ERROR, OUT_OF_MEMORY, INVALID_RESULT,
EXPIRED, CANCELLED...); the leaderboard from the contribution ledger (validated credit only); the loss
from the `loss` metric of accepted results (e.g. `eval` results), one series per (run, kind) in
completion order. Experts and their holders come from `experts`, a callable the swarm's coordinator
side supplies; without it the table is empty. With `project` (the ProjectConfig), the swarm's
progress comes from its status file (STATE_DIR/swarm/RUN.json: round N of swarm.rounds) and the
synthetic rejections from STATE_DIR/synthetic/stats.json; `mujina-coordinator status` prints the same.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from importlib import resources
from pathlib import Path

from sqlalchemy import func, select

from . import store as S
from .http_serve import IDLE_TIMEOUT_S, BoundedHTTPServer
from .metrics import ACTIVE_WORKER_WINDOW_S, live_workers

log = logging.getLogger(__name__)

MAX_LOSS_POINTS = 2000   # newest loss points sent to the page, over all series
MAX_WORKERS = 200        # most recently seen workers listed
REFRESH_S = 5.0          # how often the page asks for /api/status
CACHE_S = 2.0            # viewers within this share one reading of the store

# One row per expert: {"run": str, "layer": int, "expert": int, "holders": [worker names]}.
ExpertsFn = Callable[[], list[dict]]


def _loss_series(conn) -> list[dict]:
    """Loss per (run, kind) from accepted results, oldest first; only the newest MAX_LOSS_POINTS points."""
    rows = conn.execute(
        select(S.tasks.c.run, S.tasks.c.kind, S.results.c.at, S.results.c.metrics)
        .join(S.tasks, S.tasks.c.id == S.results.c.task_id)
        .where(S.results.c.metrics.like('%"loss"%'))
        .order_by(S.results.c.at.desc()).limit(MAX_LOSS_POINTS)).all()
    series: dict[tuple[str, str], list[list[float]]] = {}
    for run, kind, at, metrics_json in reversed(rows):
        loss = json.loads(metrics_json).get("loss")
        # The server refuses non-finite metrics; the check keeps one odd row from breaking the JSON.
        if isinstance(loss, int | float) and math.isfinite(loss):
            series.setdefault((run, kind), []).append([at, float(loss)])
    return [{"run": run, "kind": kind, "points": pts} for (run, kind), pts in sorted(series.items())]


def dead_reasons(conn) -> list[dict]:
    """Dead tasks by kind and reason (the word before the colon of last_error), most first; each with the
    newest message as an example."""
    c = S.tasks.c
    groups: dict[tuple[str, str], dict] = {}
    for kind, err, n, at in conn.execute(select(c.kind, c.last_error, func.count(), func.max(c.updated))
                                         .where(c.state == "dead").group_by(c.kind, c.last_error)):
        reason = (err or "UNKNOWN").split(":", 1)[0].strip() or "UNKNOWN"
        g = groups.setdefault((kind, reason), {"kind": kind, "reason": reason, "count": 0, "example": "", "at": -1})
        g["count"] += n
        if at > g["at"]:
            g["example"], g["at"] = (err or "")[:300], at
    return [{k: v for k, v in g.items() if k != "at"}
            for g in sorted(groups.values(), key=lambda g: (-g["count"], g["kind"], g["reason"]))]


def swarm_progress(project) -> dict | None:
    """{"round", "rounds", "finished", "slots", "checkpoint"} of the project's swarm run, or None without one.
    `round` counts closed rounds: round 3 of 10 is being trained while 2 are closed."""
    if project is None or project.swarm is None:
        return None
    from .swarm_driver import read_status

    st = read_status(project.state_dir, project.run)
    rounds = project.swarm.rounds
    if st is None:
        return {"started": False, "closed": 0, "rounds": rounds, "finished": False, "slots": 0, "checkpoint": None}
    closed = int(st["round"])
    return {"started": True, "closed": closed, "rounds": rounds, "finished": closed >= rounds,
            "slots": len(st.get("tasks", [])), "checkpoint": st.get("checkpoint")}


def swarm_text(p: dict) -> str:
    if not p["started"]:
        return "not started: `mujina-coordinator init-swarm --checkpoint MOE` starts it"
    if p["finished"]:
        return f"finished: {p['closed']} of {p['rounds']} rounds closed; final checkpoint {p['checkpoint']}"
    return (f"round {p['closed'] + 1} of {p['rounds']} ({p['closed']} closed; {p['slots']} train slots; "
            f"starts from {p['checkpoint']})")


def synthetic_stats(project) -> dict:
    """STATE_DIR/synthetic/stats.json (kind -> {accepted, tokens, rejected: {reason: n}}), {} without one."""
    if project is None:
        return {}
    try:
        stats = json.loads((Path(project.state_dir) / "synthetic" / "stats.json").read_text())
    except (OSError, ValueError):
        return {}
    return stats if isinstance(stats, dict) else {}


def collect_status(store: S.Store, run: str, experts: ExpertsFn | None = None, project=None) -> dict:
    """Everything the page shows, as one JSON-ready dict (read-only queries)."""
    now = time.time()
    with store.read() as conn:
        tasks = [{"kind": k, "state": s, "count": n} for k, s, n in conn.execute(
            select(S.tasks.c.kind, S.tasks.c.state, func.count())
            .group_by(S.tasks.c.kind, S.tasks.c.state).order_by(S.tasks.c.kind, S.tasks.c.state))]
        credit: dict[str, dict[str, float]] = {}
        for vol, unit, amount in conn.execute(select(S.ledger.c.volunteer, S.ledger.c.unit,
                                                     func.sum(S.ledger.c.amount))
                                              .group_by(S.ledger.c.volunteer, S.ledger.c.unit)):
            credit.setdefault(vol, {})[unit] = float(amount)
        leases = dict(conn.execute(select(S.leases.c.worker_id, func.count()).where(S.leases.c.state == "active")
                                   .group_by(S.leases.c.worker_id)).all())
        rows, live, registered = live_workers(conn, now, MAX_WORKERS)
        workers = [{"id": w.id, "name": w.name, "volunteer": w.token, "speed": w.speed, "gpu_memory": w.gpu_memory,
                    "cuda": bool(w.cuda), "last_seen_s": max(0.0, now - w.last_seen),
                    "active": w.last_seen > now - ACTIVE_WORKER_WINDOW_S, "leases": leases.get(w.id, 0)}
                   for w in rows]
        dead = dead_reasons(conn)
        loss = _loss_series(conn)
    # Ranked by validated tasks, then by name so equal volunteers keep their order between refreshes.
    leaderboard = [{"volunteer": vol, "credit": units}
                   for vol, units in sorted(credit.items(), key=lambda kv: (-kv[1].get("tasks", 0.0), kv[0]))]
    swarm = swarm_progress(project)
    return {"run": run, "time": now, "refresh_s": REFRESH_S, "active_window_s": ACTIVE_WORKER_WINDOW_S,
            "tasks": tasks, "leaderboard": leaderboard, "units": sorted({u for c in credit.values() for u in c}),
            "workers": workers, "workers_registered": registered, "active_workers": live, "loss": loss,
            "dead_reasons": dead, "swarm": swarm, "swarm_text": swarm_text(swarm) if swarm else None,
            "synthetic": synthetic_stats(project),
            "experts": experts() if experts is not None else []}


def page_html() -> bytes:
    return resources.files(__package__).joinpath("static/status.html").read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", self.server.html)
        elif path == "/api/status":
            try:
                body = self.server.status_json()
            except Exception:  # the store is down or restarting: say so, keep serving
                log.exception("status page: reading the store failed")
                self._send(503, "application/json", b'{"error": "the coordinator could not read its store; '
                                                    b'see its log"}')
                return
            self._send(200, "application/json", body)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: the status page is at / and its data at "
                                                         b"/api/status\n")

    def _send(self, code: int, ctype: str, body: bytes):
        # one request per connection: a kept-alive one would hold a server thread until its timeout
        self.close_connection = True
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):  # one debug line per request instead of stderr noise
        log.debug("status page %s: " + fmt, self.address_string(), *args)


class _Server(BoundedHTTPServer):
    def __init__(self, addr, store: S.Store, run: str, experts: ExpertsFn | None, project=None,
                 idle_timeout_s: float = IDLE_TIMEOUT_S):
        self.store, self.run, self.experts, self.project, self.html = store, run, experts, project, page_html()
        self._lock = threading.Lock()
        self._cached: tuple[float, bytes] = (-CACHE_S, b"")
        super().__init__(addr, _Handler, idle_timeout_s=idle_timeout_s)

    def status_json(self) -> bytes:
        """collect_status as JSON, read at most once per CACHE_S however many pages are open: the loss
        query reads the results table, which grows with every accepted result."""
        with self._lock:
            at, body = self._cached
            if time.monotonic() - at >= CACHE_S:
                body = json.dumps(collect_status(self.store, self.run, self.experts, self.project)).encode()
                self._cached = (time.monotonic(), body)
            return body


class StatusPage:
    """The page's HTTP server on its own threads; `start()` binds (raising OSError naming the port).
    `project` (a ProjectConfig, optional, settable until start()) adds the swarm's progress and the synthetic
    rejections. A connection that sends no request within `idle_timeout_s` is closed."""

    def __init__(self, store: S.Store, run: str, host: str = "127.0.0.1", port: int = 0,
                 experts: ExpertsFn | None = None, project=None, idle_timeout_s: float = IDLE_TIMEOUT_S):
        self.store, self.run, self.host, self.experts, self.project = store, run, host, experts, project
        self.idle_timeout_s = idle_timeout_s
        self._want_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> StatusPage:
        try:
            self._server = _Server((self.host, self._want_port), self.store, self.run, self.experts,
                                   self.project, self.idle_timeout_s)
        except OSError as err:
            raise OSError(f"status page: cannot listen on {self.host}:{self._want_port} ({err.strerror}); "
                          "pick another --http-port") from None
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="status-page", daemon=True)
        self._thread.start()
        log.info("status page on %s", self.url)
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None
