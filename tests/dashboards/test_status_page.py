"""The coordinator's status page (`serve --http-port`): its JSON against the store, and the page
itself in headless Chromium (Debian's `chromium`): it renders, the chart draws the run's real
losses, the tables hold the run's volunteers and workers, and the browser logs no console message."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error

import pytest
from sqlalchemy import func, select

from tests.coordinator.conftest import coordinator_cli, free_port, write_project
from tests.dashboards.conftest import EXPIRED, LOSSES, WORKER_NAME, http_get


def status(live) -> dict:
    return json.loads(http_get(live.http_url + "api/status"))


@pytest.mark.slow  # the live stack (tests/dashboards/conftest.py)
def test_api_status_reports_the_store(live):
    from coordinator import store as S

    d = status(live)
    assert d["run"] == "dash"
    # the swarm's round 0 was planned for one slot (no worker had registered yet) that fits 2 experts
    assert d["experts"] == [{"run": "dash", "layer": 0, "expert": e, "holders": ["slot0"] if e < 2 else []}
                            for e in range(4)]
    series, train = d["loss"]
    assert (series["run"], series["kind"]) == ("dash", "eval") and (train["run"], train["kind"]) == ("dash", "train")
    assert len(train["points"]) == 1 and train["points"][0][1] > 0
    assert [v for _, v in series["points"]] == LOSSES
    assert [t for t, _ in series["points"]] == sorted(t for t, _ in series["points"])

    store = S.Store.open(live.db_url, migrate=False)
    try:
        with store.read() as conn:
            ledger = {(v, u): a for v, u, a in conn.execute(
                select(S.ledger.c.volunteer, S.ledger.c.unit, func.sum(S.ledger.c.amount))
                .group_by(S.ledger.c.volunteer, S.ledger.c.unit))}
    finally:
        store.close()
    # 2 validated tasks before 1; ties by name (carol: the worker daemon's generate task and swarm round)
    assert [e["volunteer"] for e in d["leaderboard"]] == ["alice", "carol", "bob"]
    assert {(e["volunteer"], u): a for e in d["leaderboard"] for u, a in e["credit"].items()} == ledger
    assert ledger[("alice", "tasks")] == 2 and ledger[("bob", "tokens_evaluated")] == 500
    assert ledger[("carol", "tasks")] == 2 and ledger[("carol", "tokens_generated")] > 0
    assert ledger[("carol", "tokens_trained")] == 2 * 2 * 32  # inner_steps x batch_size x seq_len
    assert d["units"] == ["gpu_seconds", "tasks", "tokens_evaluated", "tokens_generated", "tokens_trained"]

    # `serve` hands the page its project: the one-round swarm run is finished (round 0 closed)
    assert d["swarm"]["finished"] and d["swarm_text"].startswith("finished: 1 of 1 rounds closed")
    assert [(r["kind"], r["count"]) for r in d["dead_reasons"]] == [("eval", 1)]
    counts = {t["state"]: t["count"] for t in d["tasks"] if t["kind"] == "eval"}
    assert counts == {"dead": 1, "done": len(LOSSES), "leased": 1, "pending": EXPIRED + 2}
    workers = {w["name"]: w for w in d["workers"]}
    assert set(workers) == {"alice-gpu", "bob-laptop", WORKER_NAME} and d["active_workers"] == 3
    assert workers["alice-gpu"]["leases"] == 1 and workers["alice-gpu"]["volunteer"] == "alice"
    assert workers["alice-gpu"]["gpu_memory"] == 24 << 30 and workers["bob-laptop"]["leases"] == 0


@pytest.mark.slow  # the live stack (tests/dashboards/conftest.py)
def test_unknown_paths_are_404_and_the_page_is_self_contained(live):
    with pytest.raises(urllib.error.HTTPError) as err:
        http_get(live.http_url + "metrics")
    assert err.value.code == 404
    html = http_get(live.http_url).decode()
    # Nothing is fetched from elsewhere: no external scripts, styles, fonts or images.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) and "@import" not in html
    assert "api/status" in html


def chromium(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start. The virtual time budget
    # lets the page's fetch of /api/status and its drawing finish before the DOM is dumped.
    # --disable-dev-shm-usage: containers often have a tiny /dev/shm, on which Chromium crashes.
    return subprocess.run([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=4000",
                           "--window-size=1280,1100", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # the live stack (tests/dashboards/conftest.py)
def test_page_renders_real_data_in_chromium(live, tmp_path):
    dom = chromium("--dump-dom", live.http_url)
    assert dom.returncode == 0, dom.stderr[-3000:]
    html = dom.stdout
    body = re.search(r"<body([^>]*)>", html).group(1)
    assert 'data-state="ok"' in body and 'data-errors="0"' in body, body
    assert int(re.search(r'data-updates="(\d+)"', body).group(1)) >= 1
    canvas = re.search(r'<canvas id="loss-chart"([^>]*)>', html).group(1)
    assert f'data-points="{len(LOSSES) + 1}"' in canvas and 'data-series="2"' in canvas, canvas
    assert f"dash / eval: {len(LOSSES)} points, latest 2.8" in html
    leaderboard = re.search(r'<table id="leaderboard">(.*?)</table>', html, re.S).group(1)
    assert leaderboard.index("alice") < leaderboard.index("bob")
    assert "alice-gpu" in html and "bob-laptop" in html and "nobody: frozen" in html
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, "the page logged to the console:\n" + "\n".join(console)

    shot = tmp_path / "status-page.png"
    out = chromium(f"--screenshot={shot}", live.http_url)
    assert out.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", out.stderr[-3000:]
    assert shot.stat().st_size > 20_000  # a blank page is a few kB; this one has a chart and four tables
    print(f"status page screenshot: {shot}")


@pytest.mark.slow  # the live stack (tests/dashboards/conftest.py)
def test_experts_and_their_holders_are_listed(live):
    # The swarm's coordinator side hands StatusPage a callable; here one with a held and a frozen expert.
    from coordinator import store as S
    from coordinator.status_page import StatusPage

    experts = [{"run": "dash", "layer": 0, "expert": 0, "holders": ["alice-gpu", "bob-laptop"]},
               {"run": "dash", "layer": 0, "expert": 1, "holders": []}]
    store = S.Store.open(live.db_url, migrate=False)
    page = StatusPage(store, "dash", "127.0.0.1", 0, experts=lambda: experts).start()
    try:
        assert json.loads(http_get(page.url + "api/status"))["experts"] == experts
        dom = chromium("--dump-dom", page.url)
    finally:
        page.stop()
        store.close()
    table = re.search(r'<table id="experts">(.*?)</table>', dom.stdout, re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows]
    assert cells == [["dash", "0", "0", "2", "alice-gpu, bob-laptop"], ["dash", "0", "1", "0", "nobody: frozen"]]


@pytest.mark.slow  # headless Chromium
def test_a_store_that_cannot_be_read_is_a_503_and_a_banner(tmp_path):
    from sqlalchemy import text

    from coordinator import store as S
    from coordinator.status_page import StatusPage

    store = S.Store.open(f"sqlite:///{tmp_path / 'broken.db'}")
    with store.tx() as conn:
        conn.execute(text("DROP TABLE ledger"))
    page = StatusPage(store, "broken", "127.0.0.1", 0).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            http_get(page.url + "api/status")
        assert err.value.code == 503 and "could not read its store" in err.value.read().decode()
        dom = chromium("--dump-dom", page.url)
    finally:
        page.stop()
        store.close()
    assert 'data-state="error"' in dom.stdout
    assert "cannot read the coordinator's status (HTTP 503" in dom.stdout


def test_http_port_in_use_is_a_clear_error(tmp_path):
    import socket

    project = write_project(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = coordinator_cli("serve", "--config", str(project), "--listen", f"127.0.0.1:{free_port()}",
                              "--http-host", "127.0.0.1", "--http-port", str(port), check=False, timeout=60)
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "pick another --http-port" in out.stderr
    bad = coordinator_cli("serve", "--config", str(project), "--http-port", "70000", check=False, timeout=60)
    assert bad.returncode == 2 and "--http-port must be a TCP port" in bad.stderr


# ---- what the organizer sees (issue 19, item 10) -------------------------------------------------------------

def _organizer_state(tmp_path):
    """A project with a swarm run at round 3 of 5, synthetic records refused for two reasons, dead tasks of two
    reasons, a worker that registered twice (a restart), a live one, and one not heard from in an hour."""
    import time

    import yaml

    from coordinator import store as S
    from coordinator.config import load_project

    project = write_project(tmp_path, swarm={"rounds": 5})
    cfg = load_project(project)
    state = cfg.state_dir
    (state / "swarm").mkdir(parents=True)
    (state / "swarm" / "test.json").write_text(json.dumps({"round": 2, "checkpoint": "test/round_000002",
                                                           "tasks": ["t-a", "t-b"], "assignment": {}}))
    (state / "synthetic").mkdir()
    (state / "synthetic" / "stats.json").write_text(json.dumps({"generate": {
        "accepted": 7, "tokens": 700, "rejected": {"language": 3, "exact_duplicate": 1}}}))
    store = S.Store.open(cfg.db_url())
    now = time.time()
    with store.tx() as conn:
        def worker(wid, token, name, registered, seen):
            conn.execute(S.workers.insert().values(id=wid, token=token, name=name, capabilities="{}", gpu_memory=0,
                                                   cuda=False, speed=1.0, registered=registered, last_seen=seen))
        worker("w-old", "alice", "alice-box", now - 300, now - 20)   # before alice's restart: still "recent"
        worker("w-new", "alice", "alice-box", now - 10, now - 1)     # the same machine after it
        worker("w-bob", "bob", "bob-box", now - 100, now - 2)
        worker("w-gone", "carol", "carol-box", now - 7200, now - 3600)
        for i, err in enumerate(["ERROR: teacher tiny has no chat template"] * 3
                                + ["EXPIRED: lease not renewed"] * 2):
            conn.execute(S.tasks.insert().values(
                id=f"dead{i}", kind="generate" if i < 3 else "eval", run="test", priority=0, state="dead",
                payload="{}", min_gpu_memory=0, needs_cuda=False, min_speed=0.0, attempts=3, max_attempts=3,
                last_error=err, created=now - 50 + i, updated=now - 50 + i))
    assert yaml.safe_load(project.read_text())["swarm"] == {"rounds": 5}
    return project, cfg, store


def test_status_shows_swarm_progress_rejections_dead_reasons_and_live_workers(tmp_path):
    from coordinator.status_page import StatusPage

    project, cfg, store = _organizer_state(tmp_path)
    page = StatusPage(store, "test", "127.0.0.1", 0, project=cfg).start()
    try:
        d = json.loads(http_get(page.url + "api/status"))
    finally:
        page.stop()
        store.close()
    assert d["swarm"] == {"started": True, "closed": 2, "rounds": 5, "finished": False, "slots": 2,
                          "checkpoint": "test/round_000002"}
    assert d["swarm_text"].startswith("round 3 of 5 (2 closed")
    assert d["synthetic"]["generate"]["rejected"] == {"language": 3, "exact_duplicate": 1}
    assert [(r["kind"], r["reason"], r["count"]) for r in d["dead_reasons"]] == [("generate", "ERROR", 3),
                                                                                 ("eval", "EXPIRED", 2)]
    assert d["dead_reasons"][0]["example"] == "ERROR: teacher tiny has no chat template"
    # alice's machine once (its newest registration), bob's; carol's is listed but not live
    rows = [(w["id"], w["active"]) for w in d["workers"]]
    assert rows == [("w-new", True), ("w-bob", True), ("w-gone", False)]
    assert d["active_workers"] == 2 and d["workers_registered"] == 3

    out = coordinator_cli("status", "--config", str(project)).stdout
    assert "swarm: round 3 of 5 (2 closed; 2 train slots; starts from test/round_000002)" in out
    assert "dead generate: 3 ERROR  (latest: ERROR: teacher tiny has no chat template)" in out
    assert "dead eval: 2 EXPIRED" in out
    assert "synthetic generate: 7 records accepted, 700 tokens; rejected: exact_duplicate 1, language 3" in out
    assert "workers: 2 active in the last 60 s, 3 registered" in out
    assert out.count("worker alice-box (alice)") == 1 and "worker bob-box (bob)" in out and "carol-box" not in out


def test_a_finished_swarm_run_says_so(tmp_path):
    project, cfg, store = _organizer_state(tmp_path)
    store.close()
    (cfg.state_dir / "swarm" / "test.json").write_text(json.dumps({"round": 5, "checkpoint": "test/round_000005",
                                                                   "tasks": []}))
    out = coordinator_cli("status", "--config", str(project)).stdout
    assert "swarm: finished: 5 of 5 rounds closed; final checkpoint test/round_000005" in out


@pytest.mark.slow  # headless Chromium
def test_the_new_rows_render_in_chromium(tmp_path):
    from coordinator.status_page import StatusPage

    _, cfg, store = _organizer_state(tmp_path)
    page = StatusPage(store, "test", "127.0.0.1", 0, project=cfg).start()
    try:
        dom = chromium("--dump-dom", page.url)
    finally:
        page.stop()
        store.close()
    html = dom.stdout
    assert 'data-state="ok"' in html and 'data-errors="0"' in html
    swarm = re.search(r'<p id="swarm"([^>]*)>(.*?)</p>', html, re.S)
    assert 'data-closed="2"' in swarm.group(1) and swarm.group(2).startswith("round 3 of 5")

    def cells(table_id):
        body = re.search(rf'<table id="{table_id}">(.*?)</table>', html, re.S).group(1)
        return [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", body, re.S)[1:]]

    assert [c[:3] for c in cells("dead")] == [["generate", "ERROR", "3"], ["eval", "EXPIRED", "2"]]
    assert cells("synthetic") == [["generate", "accepted", "7"], ["generate", "rejected: exact_duplicate", "1"],
                                  ["generate", "rejected: language", "3"]]
    workers = cells("workers")
    assert [(c[0], c[2]) for c in workers] == [("alice-box", "active"), ("bob-box", "active"), ("carol-box", "idle")]
    assert "2 live workers" in html


def _idle_clients(port: int, n: int) -> list:
    import socket

    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        socks.append(s)
    return socks


def test_idle_connections_are_closed_without_a_thread_each_and_the_page_still_serves(tmp_path):
    import threading

    from coordinator import store as S
    from coordinator.status_page import StatusPage

    store = S.Store.open(f"sqlite:///{tmp_path / 'c.db'}")
    page = StatusPage(store, "idle", "127.0.0.1", 0, idle_timeout_s=1.0).start()
    threads_before = threading.active_count()
    try:
        idle = _idle_clients(page.port, 150)
        # 150 idle connections wait in one selector: no thread each (the pool has a handful)
        assert threading.active_count() - threads_before <= 10
        assert json.loads(http_get(page.url + "api/status"))["run"] == "idle"   # served beside them
        for s in idle:
            assert s.recv(1) == b""   # EOF: the server closed it after idle_timeout_s
            s.close()
        assert "api/status" in http_get(page.url).decode()
    finally:
        page.stop()
        store.close()


def test_a_request_started_and_never_finished_does_not_hold_a_thread_forever(tmp_path):
    from coordinator import store as S
    from coordinator.status_page import StatusPage

    store = S.Store.open(f"sqlite:///{tmp_path / 'c.db'}")
    page = StatusPage(store, "slow", "127.0.0.1", 0, idle_timeout_s=1.0).start()
    try:
        stalled = _idle_clients(page.port, 12)   # more than the pool's 8 threads
        for s in stalled:
            s.sendall(b"GET /api/status HTTP/1.1\r\n")   # ... and never the rest of the headers
        for s in stalled:
            assert s.recv(1) == b""   # the socket timeout ended it
            s.close()
        assert json.loads(http_get(page.url + "api/status"))["run"] == "slow"
    finally:
        page.stop()
        store.close()


@pytest.mark.slow  # waits for the metrics endpoint's default idle timeout (10 s)
def test_metrics_endpoint_binds_loopback_and_closes_idle_connections(tmp_path):
    from coordinator import store as S
    from coordinator.metrics import make_metrics

    store = S.Store.open(f"sqlite:///{tmp_path / 'c.db'}")
    metrics = make_metrics(0, store)
    try:
        assert metrics._server.server_address[0] == "127.0.0.1"
        idle = _idle_clients(metrics.port, 50)
        assert b"mujina_tasks" in http_get(f"http://127.0.0.1:{metrics.port}/metrics")
        for s in idle:
            assert s.recv(1) == b""
            s.close()
    finally:
        metrics.close()
        store.close()


def test_serve_help_documents_the_bind_defaults():
    out = coordinator_cli("serve", "--help").stdout
    assert "--http-host" in out and "--metrics-host" in out and out.count("default: 127.0.0.1") == 2
