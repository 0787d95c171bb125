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
