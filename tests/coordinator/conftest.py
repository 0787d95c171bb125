"""Fixtures for the coordinator: a real PostgreSQL cluster, a fresh database per test, a real server.

PostgreSQL: MUJINA_TEST_POSTGRES_URL (a server URL whose user may CREATE DATABASE) if set; otherwise
a private cluster started with Debian's initdb/pg_ctl in a temporary directory on a free loopback
port (as the `postgres` user when running as root, since PostgreSQL refuses root). Tests skip only
when no PostgreSQL binaries exist; `.ci/run` installs them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO

TOKEN = "mj_test_token_alice"
OTHER_TOKEN = "mj_test_token_bob"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).resolve().parent if which else None


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL server URL (without database), e.g. postgresql+psycopg://postgres@127.0.0.1:5433."""
    url = os.environ.get("MUJINA_TEST_POSTGRES_URL")
    if url:
        yield url.rstrip("/")
        return
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    root = Path(tempfile.mkdtemp(prefix="mujina-pg-"))
    data = root / "data"
    run_as: list[str] = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as "
                        "(PostgreSQL refuses root); apt-get install postgresql creates it")
        os.chown(root, user.pw_uid, user.pw_gid)
        os.chmod(root, 0o700)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                    "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    # fsync off: a test cluster holds nothing worth keeping, and it makes the suite faster.
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"),
                    "-w", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def new_pg_database(server: str) -> str:
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server.replace("postgresql+psycopg://", "postgresql://") + "/postgres",
                         autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{server}/{name}"


# PostgreSQL runs in `make test` only: the fast lane (-m "not slow") covers the same tests on SQLite.
@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}"
    return new_pg_database(request.getfixturevalue("pg_server"))


def write_project(tmp_path: Path, **sections) -> Path:
    """A project file with short leases so expiry tests take about a second."""
    import yaml

    doc = {"run": "test", "state_dir": "state",
           "leases": {"duration_s": 1.5, "heartbeat_interval_s": 0.5, "sweep_interval_s": 0.1, "max_attempts": 3},
           "limits": {"max_leases_per_token": 100, "max_upload_bytes": 1 << 20, "no_work_retry_s": 1.0}}
    for key, value in sections.items():
        doc.setdefault(key, {}).update(value) if isinstance(value, dict) else doc.__setitem__(key, value)
    path = tmp_path / "project.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def make_tls_cert(tmp_path: Path) -> tuple[Path, Path]:
    """(key, cert) of a one-day self-signed certificate for localhost and 127.0.0.1; skips without openssl."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                           "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                           "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"openssl cannot make a test certificate: {made.stderr[-200:]!r}")
    return key, cert


class Coord:
    """An in-process coordinator on a free loopback port, with tokens for alice and bob."""

    def __init__(self, tmp_path: Path, db_url: str, **sections):
        from coordinator.config import load_project
        from coordinator.server import CoordinatorServer

        self.project = write_project(tmp_path, **sections)
        self.cfg = load_project(self.project)
        self.db_url = db_url
        self.server = CoordinatorServer(self.cfg, db_url=db_url, listen="127.0.0.1:0").start()
        self.target = f"127.0.0.1:{self.server.port}"
        self.store = self.server.store
        self.scheduler = self.server.scheduler
        self.store.add_token("alice", TOKEN)
        self.store.add_token("bob", OTHER_TOKEN)
        self.clients = []

    def client(self, token: str = TOKEN, **kw):
        from coordinator.api.client import CoordinatorClient

        c = CoordinatorClient(self.target, token, timeout=10, retry_for=5, **kw)
        self.clients.append(c)
        return c

    def add_eval(self, n: int = 1, shard_tokens: int = 1000, **kw) -> list[str]:
        return [self.scheduler.add_task("eval", {"checkpoint": "c", "shard": "s", "shard_tokens": shard_tokens}, **kw)
                for _ in range(n)]

    def close(self):
        for c in self.clients:
            c.close()
        self.server.stop(grace=0.5)


@pytest.fixture
def coord(tmp_path, db_url):
    c = Coord(tmp_path, db_url)
    yield c
    c.close()


def coordinator_cli(*args: str, check: bool = True, **kw):
    from tests.conftest import run_cli

    return run_cli("coordinator.cli", *args, check=check, **kw)


def spawn_server(project: Path, db_url: str, port: int, log: Path,
                 program: tuple[str, ...] = ("-m", "coordinator.cli")) -> subprocess.Popen:
    """`mujina-coordinator serve` as a subprocess (for kill -9); returns once it answers health checks.
    `program`: what python runs, e.g. ("-c", CODE, ARG) for a coordinator with a crash hook."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    proc = subprocess.Popen([sys.executable, *program, "serve", "--config", str(project),
                             "--db", db_url, "--listen", f"127.0.0.1:{port}"], cwd=REPO,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(300):
            if proc.poll() is not None:
                raise AssertionError(f"coordinator exited {proc.returncode}:\n{log.read_text()}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return proc
            except grpc.RpcError:
                time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"coordinator did not become healthy:\n{log.read_text()}")
