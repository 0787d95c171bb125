"""`mujina-coordinator` as the organizer runs it: tokens, tasks, status, ledger, serve with metrics and TLS.

Each command is run as a subprocess (`python -m coordinator.cli`), against SQLite and PostgreSQL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from coordinator import store as S
from coordinator.api.client import CoordinatorClient
from tests.conftest import REPO, wait_until
from tests.coordinator.conftest import coordinator_cli, free_port, make_tls_cert, spawn_server, write_project

PAYLOAD = '{"checkpoint": "ckpt", "shard": "ja/0001.bin", "shard_tokens": 4096}'


def test_token_add_list_revoke_stores_only_hashes(tmp_path, db_url):
    project = write_project(tmp_path)
    common = ("--config", str(project), "--db", db_url)
    token = coordinator_cli("token", "add", "alice", *common).stdout.strip().splitlines()[-1]
    assert token.startswith("mj_") and len(token) > 40
    coordinator_cli("token", "add", "bob", "--max-leases", "2", *common)
    dup = coordinator_cli("token", "add", "alice", *common, check=False)
    assert dup.returncode == 2 and "a token named 'alice' exists" in dup.stderr
    listing = coordinator_cli("token", "list", *common).stdout
    assert "alice" in listing and "bob" in listing and token not in listing
    store = S.Store.open(db_url)
    with store.read() as conn:
        rows = {r.name: r for r in conn.execute(select(S.tokens))}
    assert rows["alice"].hash == S.hash_token(token) and rows["bob"].max_leases == 2
    if db_url.startswith("sqlite"):  # the token itself appears nowhere in the database file
        assert token.encode() not in (tmp_path / "state" / "coordinator.db").read_bytes()
    coordinator_cli("token", "revoke", "alice", *common)
    assert "revoked" in coordinator_cli("token", "list", *common).stdout
    again = coordinator_cli("token", "revoke", "alice", *common, check=False)
    assert again.returncode == 2 and "no valid token named 'alice'" in again.stderr
    store.close()


@pytest.mark.slow  # a coordinator subprocess and a dozen CLI runs
def test_tasks_status_ledger_through_a_served_coordinator(tmp_path, db_url):
    project = write_project(tmp_path)
    common = ("--config", str(project), "--db", db_url)
    token = coordinator_cli("token", "add", "carol", *common).stdout.strip().splitlines()[-1]
    ids = coordinator_cli("tasks", "add", "--kind", "eval", "--payload", PAYLOAD, "--count", "3",
                          *common).stdout.split()
    assert len(ids) == 3
    bad = coordinator_cli("tasks", "add", "--kind", "eval", "--payload", '{"shard": "x"}', *common, check=False)
    assert bad.returncode == 2 and "payload.checkpoint must be a non-empty string" in bad.stderr
    bad = coordinator_cli("tasks", "add", "--kind", "nope", "--payload", "{}", *common, check=False)
    assert bad.returncode == 2 and "unknown task kind 'nope'" in bad.stderr
    bad = coordinator_cli("tasks", "add", "--kind", "eval", "--payload", "{oops", *common, check=False)
    assert bad.returncode == 2 and "--payload is not valid JSON" in bad.stderr

    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", *common, "--listen",
                             f"127.0.0.1:{port}", "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        spawn_ready(port, proc)
        with CoordinatorClient(f"127.0.0.1:{port}", token) as c:
            w = c.register("box", speed=50.0).worker_id
            t1 = c.lease(w, ["eval"]).task
            c.complete(t1.task_id, t1.lease_id, b"r", {"loss": 3.25, "tokens": 4096, "gpu_seconds": 0.5})
            t2 = c.lease(w, ["eval"]).task
            c.fail(t2.task_id, t2.lease_id, message="boom")
            c.heartbeat(w)
        # Prometheus text format, parsed by prometheus_client's own parser
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
        assert samples[("mujina_leases_granted_total", (("kind", "eval"),))] == 2
        assert samples[("mujina_leases_completed_total", (("kind", "eval"),))] == 1
        assert samples[("mujina_latest_loss", (("kind", "eval"), ("phase", "eval"), ("run", "test")))] == 3.25
        assert samples[("mujina_tasks", (("kind", "eval"), ("state", "done")))] == 1
        assert samples[("mujina_tasks", (("kind", "eval"), ("state", "pending")))] == 2
        assert samples[("mujina_active_workers", ())] == 1
        assert samples[("mujina_contributions", (("kind", "eval"), ("unit", "tokens_evaluated"),
                                                 ("volunteer", "carol")))] == 4096
        assert samples[("mujina_leases_expired_total", ())] == 0 and "mujina_rpc_duration_seconds" in fams
        assert samples[("mujina_rpc_duration_seconds_count", (("code", "OK"), ("method", "Lease")))] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "SIGTERM: draining and stopping" in err

    listing = coordinator_cli("tasks", "list", "--json", *common).stdout.splitlines()
    rows = [json.loads(line) for line in listing]
    assert sorted(r["state"] for r in rows) == ["done", "pending", "pending"]
    assert any(r["last_error"] == "ERROR: boom" for r in rows)
    status = coordinator_cli("status", *common).stdout
    assert "eval" in status and "tokens_evaluated 4,096" in status and "1 registered" in status
    csv_out = coordinator_cli("ledger", "--csv", *common).stdout.splitlines()
    assert csv_out[0] == "volunteer,kind,unit,amount,tasks"
    assert set(csv_out[1:]) == {"carol,eval,gpu_seconds,0.5,1", "carol,eval,tasks,1,1",
                                "carol,eval,tokens_evaluated,4096,1"}
    assert "carol" in coordinator_cli("ledger", *common).stdout
    done = next(r["id"] for r in rows if r["state"] == "done")
    bad = coordinator_cli("tasks", "retry", done, *common, check=False)
    assert bad.returncode == 2 and "only dead or pending tasks can be retried" in bad.stderr
    assert coordinator_cli("tasks", "retry", "no-such", *common, check=False).returncode == 2


def spawn_ready(port: int, proc: subprocess.Popen):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(300):
            assert proc.poll() is None, proc.stderr.read()
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise AssertionError("coordinator did not become healthy")


def test_bad_project_file_is_a_clear_cli_error(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("run: x\nleasez: {}\n")
    out = coordinator_cli("status", "--config", str(f), check=False)
    assert out.returncode == 2 and "leasez: unknown key" in out.stderr
    out = coordinator_cli("status", "--config", str(tmp_path / "missing.yaml"), check=False)
    assert out.returncode == 2 and "start from configs/project.yaml" in out.stderr


def test_tls(tmp_path):
    key, cert = make_tls_cert(tmp_path)
    project = write_project(tmp_path)
    db = f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}"
    token = coordinator_cli("token", "add", "tls", "--config", str(project), "--db", db).stdout.split()[-1]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", "--config", str(project), "--db", db,
                             "--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert), "--tls-key", str(key)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with CoordinatorClient(f"127.0.0.1:{port}", token, root_certificates=cert.read_bytes(), retry_for=30) as c:
            hb = None
            for _ in range(100):  # wait for start-up: the TLS channel reports UNAVAILABLE until it listens
                try:
                    hb = c.heartbeat(c.register("tls-box").worker_id)
                    break
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE and proc.poll() is None, err.details()
                    time.sleep(0.2)
            assert hb is not None and hb.directive == 1
        with CoordinatorClient(f"127.0.0.1:{port}", token, timeout=3, retry_for=0) as plain:
            with pytest.raises(grpc.RpcError):  # a plaintext client cannot talk to a TLS server
                plain.register("plain")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


@pytest.mark.slow  # two coordinator subprocesses
def test_restart_reuses_the_migrated_store(tmp_path):
    # A served store is usable again after a plain restart (schema already at the current version).
    project = write_project(tmp_path)
    db = f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}"
    port = free_port()
    for _ in range(2):
        proc = spawn_server(project, db, port, tmp_path / "serve.log")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert (tmp_path / "serve.log").read_text().count(f"created store schema version {S.SCHEMA_VERSION}") == 1


def test_the_ledger_prints_amounts_exactly(tmp_path):
    """Credit amounts are never rounded: 38,855,593 tokens stay 38,855,593 (`%g` printed 3.88556e+07), in the
    table, the CSV and `status`; a fractional amount keeps every digit it has."""
    import time

    from coordinator import store as S
    from coordinator.store import Store

    project = write_project(tmp_path)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    store = Store.open(url)
    with store.tx() as conn:
        conn.execute(S.ledger.insert(), [
            {"task_id": "t1", "volunteer": "dana", "kind": "generate", "unit": "tokens_generated",
             "amount": 38_855_593.0, "at": time.time()},
            {"task_id": "t2", "volunteer": "dana", "kind": "eval", "unit": "gpu_seconds", "amount": 0.1 + 0.2,
             "at": time.time()}])
    store.close()
    common = ("--config", str(project), "--db", url)
    rows = coordinator_cli("ledger", "--csv", *common).stdout.splitlines()[1:]
    assert set(rows) == {"dana,generate,tokens_generated,38855593,1", "dana,eval,gpu_seconds,0.30000000000000004,1"}
    table = coordinator_cli("ledger", *common).stdout
    assert "38,855,593" in table and "e+07" not in table
    assert "tokens_generated 38,855,593" in coordinator_cli("status", *common).stdout


def test_a_second_coordinator_on_the_same_state_dir_is_refused(tmp_path):
    """Two `serve` on one state dir would both write its results, status and checkpoints: the second exits 2
    naming the first's pid; once the first is killed (-9: the kernel drops its lock) a new one starts."""
    project = write_project(tmp_path)
    common = ("--config", str(project), "--db", f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}")
    first = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", *common, "--listen",
                              f"127.0.0.1:{free_port()}"], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "state" / "coordinator.lock"
        wait_until(lambda: f"pid {first.pid}" in (lock.read_text() if lock.exists() else ""), "the first to lock")
        second = coordinator_cli("serve", *common, "--listen", f"127.0.0.1:{free_port()}", check=False, timeout=60)
        assert second.returncode == 2 and "already served by a coordinator" in second.stderr
        assert f"pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    third = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", *common, "--listen",
                              f"127.0.0.1:{free_port()}"], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: f"pid {third.pid}" in lock.read_text(), "a new coordinator to take the state dir")
    finally:
        third.terminate()
        third.wait(timeout=30)
