"""`kill -USR1` on a worker daemon writes every thread's stack to its stderr and the daemon goes on; the
demo relies on it to show where a daemon that ignores SIGTERM is stuck before it SIGKILLs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # a spawned worker daemon


def test_sigusr1_dumps_the_daemons_stacks_and_it_keeps_running(tmp_path):
    # a coordinator that is not there: the daemon retries Register with back-off until stopped
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run", "--coordinator", "127.0.0.1:1", "--token", "t",
             "--cache-dir", str(tmp_path / "cache"), "--no-benchmark"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while "unreachable during Register" not in err.read_text():  # its signal handlers are installed
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        while "most recent call first" not in err.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.2)
        dump = err.read_text()
        assert 'worker/daemon.py", line' in dump and "in run" in dump, dump
        assert proc.poll() is None  # still running
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, err.read_text()
        assert "SIGTERM: leasing nothing more" in err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
