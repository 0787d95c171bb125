"""A volunteer's worker over TLS: `mujina-worker run|doctor --tls --ca-cert` against a TLS coordinator, and
never the token in plaintext to another machine unless --insecure is given."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_cli, wait_until
from tests.coordinator.conftest import coordinator_cli, free_port, make_tls_cert, write_project


@pytest.fixture
def tls_coordinator(tmp_path):
    key, cert = make_tls_cert(tmp_path)
    project = write_project(tmp_path)
    db = f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}"
    token = coordinator_cli("token", "add", "vol", "--config", str(project), "--db", db).stdout.split()[-1]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", "--config", str(project), "--db", db,
                             "--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert), "--tls-key", str(key)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "state" / "coordinator.lock"
    wait_until(lambda: lock.exists() and f"pid {proc.pid}" in lock.read_text(), "the TLS coordinator to start")
    yield f"localhost:{port}", token, cert, project, db
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)


@pytest.mark.slow  # a TLS coordinator and worker processes
def test_doctor_and_run_reach_a_tls_coordinator_and_plaintext_does_not(tls_coordinator, tmp_path):
    target, token, cert, project, db = tls_coordinator
    tls = ("--tls", "--ca-cert", str(cert))
    ok = None
    for _ in range(50):  # the server may still be starting up
        ok = run_cli("worker.cli", "doctor", "--coordinator", target, "--token", token, "--no-benchmark",
                     "--cache-dir", str(tmp_path / "w"), *tls, check=False)
        if "accepts the token" in ok.stdout:
            break
    assert "accepts the token" in ok.stdout, ok.stdout + ok.stderr
    plain = run_cli("worker.cli", "doctor", "--coordinator", target, "--token", token, "--no-benchmark",
                    "--cache-dir", str(tmp_path / "w"), "--insecure", check=False)
    assert "accepts the token" not in plain.stdout   # a plaintext client cannot talk to a TLS server
    ran = run_cli("worker.cli", "run", "--coordinator", target, "--token", token, "--no-benchmark", "--max-tasks",
                  "0", "--kinds", "eval", "--cache-dir", str(tmp_path / "w"), *tls, check=False, timeout=120)
    assert ran.returncode == 0 and "registered as worker" in ran.stderr, ran.stderr[-2000:]
    workers = coordinator_cli("status", "--config", str(project), "--db", db).stdout
    assert "1 registered" in workers


@pytest.mark.parametrize("cmd", ["run", "doctor"])
def test_the_token_is_not_sent_in_plaintext_to_another_machine(tmp_path, cmd):
    """Without --tls, a non-loopback coordinator is refused before anything is sent (exit 2, the fix named);
    loopback stays plaintext (the demo, tests), and --insecure is the explicit opt-out."""
    args = ("--coordinator", "10.255.255.1:50051", "--token", "mj_secret", "--cache-dir", str(tmp_path / "w"),
            "--no-benchmark")
    out = run_cli("worker.cli", cmd, *args, check=False, timeout=60)
    assert out.returncode == 2 and "refusing to send your token in plaintext" in out.stderr and "--tls" in out.stderr
    missing = run_cli("worker.cli", cmd, *args, "--ca-cert", str(tmp_path / "nope.pem"), check=False, timeout=60)
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_transport_rules():
    from worker.transport import check_transport

    for ok in (("127.0.0.1:5", False, None, False), ("localhost:5", False, None, False),
               ("[::1]:5", False, None, False), ("example.org:5", True, None, False),
               ("example.org:5", False, None, True)):
        check_transport(*ok)
    with pytest.raises(ValueError, match="plaintext"):
        check_transport("example.org:5", False, None, False)
