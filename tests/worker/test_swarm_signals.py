"""A worker daemon in the middle of a swarm round stops by itself when SIGTERM reaches its whole process group
(systemd's default KillMode, `kill -- -PGID`), hivemind's DHT and p2pd processes included.

hivemind fork()s its DHT from the daemon, so they inherit the daemon's Python signal handler;
before worker/cli.py told them apart, each child took the group's SIGTERM as its own "stop leasing" and lived
on, and the daemon waited for them forever at exit. A real coordinator with a swarm run (tests/dashboards'
helpers) hands the worker its rounds; every process of the test carries MUJINA_SIGNAL_TEST in its
environment, so whatever outlives the daemon is found."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO, wait_until
from tests.coordinator.conftest import TOKEN, write_project
from tests.dashboards.conftest import init_swarm, start_coordinator
from tests.worker.conftest import worker_env

pytestmark = pytest.mark.slow  # a spawned worker daemon and its hivemind processes

MARKER = "MUJINA_SIGNAL_TEST"


def marked(value: str) -> dict[int, str]:
    """Live processes (no zombies) with MARKER=value in their environment: pid -> command line."""
    want, found = f"{MARKER}={value}".encode(), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if want in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") and \
                    Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
                found[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


@contextmanager
def train_worker_in_round_1(tmp_path: Path, run: str):
    """A coordinator with a one-slot swarm (rounds of a few seconds) and a train worker in its own process group
    whose round 0 has closed: its hivemind peer (DHT process and p2pd) is up and kept for round 1, which it is
    training or about to. Yields (worker, its log); kills whatever is left afterwards."""
    from coordinator import store as S
    from coordinator.config import load_project
    from coordinator.swarm_driver import read_status

    project = write_project(tmp_path, run=run, leases={"duration_s": 10.0}, swarm={
        "inner_steps": 300, "rounds": 3, "batch_size": 2, "micro_batch_size": 2, "seq_len": 32, "workers": 1,
        "averaging_timeout": 35.0, "compression": "none"})
    cfg = load_project(project)
    init_swarm(project, tmp_path)
    coord, port = start_coordinator(project, cfg.db_url(), tmp_path / "coordinator.log")
    worker, log = None, tmp_path / "worker.log"
    try:
        store = S.Store.open(cfg.db_url())
        store.add_token("vol", TOKEN)
        store.close()
        wait_until(lambda: (read_status(cfg.state_dir, run) or {}).get("tasks"), "the swarm's round 0")
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run", "--coordinator", f"127.0.0.1:{port}", "--token", TOKEN,
             "--cache-dir", str(tmp_path / "cache"), "--no-benchmark", "--kinds", "train"],
            cwd=REPO, env={**worker_env(), MARKER: str(tmp_path)}, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        wait_until(lambda: read_status(cfg.state_dir, run)["round"] >= 1, "the swarm's round 0", limit=120)
        yield worker, log
    finally:
        for pid in marked(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)
        if worker is not None and worker.poll() is None:
            worker.kill()
        coord.terminate()
        coord.wait(timeout=20)


def wait_for_exit(worker: subprocess.Popen, log: Path, what: str) -> int:
    try:
        return worker.wait(timeout=60)  # bounds a hang; a healthy daemon takes a few seconds
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the worker did not exit after {what}:\n{log.read_text()[-3000:]}") from None


def test_sigterm_to_the_process_group_mid_round_stops_the_worker_and_hivemind(tmp_path):
    # one slot, rounds of a few seconds: the signal finds the worker training, averaging or between rounds
    # (the train executor checks for a stop request between rounds, not between inner steps)
    with train_worker_in_round_1(tmp_path, "sig") as (worker, log):
        assert len(marked(str(tmp_path))) >= 3, marked(str(tmp_path))   # the daemon, its DHT and p2pd
        os.killpg(worker.pid, signal.SIGTERM)
        rc = wait_for_exit(worker, log, "SIGTERM")
        assert rc == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert text.count("SIGTERM: leasing nothing more") == 1, text[-3000:]  # the daemon's, not its children's
        # torch's shared-memory manager (hivemind shares tensors through it) exits a moment after its clients
        end = time.monotonic() + 15
        while marked(str(tmp_path)) and time.monotonic() < end:
            time.sleep(0.2)
        assert marked(str(tmp_path)) == {}


def test_ctrl_c_stops_a_train_worker_without_tracebacks_and_sums_up(tmp_path):
    """A terminal's Ctrl-C (SIGINT to the foreground process group: the daemon, its DHT process and p2pd) in the
    middle of a swarm run: the daemon hands its lease back and stops, nothing prints a traceback, and the last
    line says what the run did."""
    with train_worker_in_round_1(tmp_path, "int") as (worker, log):
        os.killpg(worker.pid, signal.SIGINT)
        rc = wait_for_exit(worker, log, "Ctrl-C")
        text = log.read_text()
        assert rc == 0, text[-3000:]
        assert text.count("SIGINT: leasing nothing more") == 1, text[-3000:]
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-5000:]
        last = text.strip().splitlines()[-1]
        assert "stopped after" in last and "completed" in last and "failed" in last, text[-3000:]
