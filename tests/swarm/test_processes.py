"""hivemind's processes die with the process that started them (swarm/processes.py): a worker killed with
kill -9 (or by the OOM killer) leaves no DHT and no p2pd behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO, wait_until
from tests.swarm.conftest import alive, descendants

pytestmark = pytest.mark.slow  # real hivemind processes

OWNER = """
import sys
from swarm.exchange import SwarmExchange
from tests.swarm.conftest import settings

x = SwarmExchange(settings(), {"trunk": 8, "l0e0": 8, "l0e1": 8})
print("ready", flush=True)
sys.stdin.readline()
"""


def test_a_killed_owner_leaves_no_hivemind_process_behind():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert owner.stdout.readline().strip() == "ready"
        children = descendants(owner.pid)
        # the DHT and its p2pd daemon, whatever the number of modules (and nothing that is not ours)
        assert len(children) >= 2 and any("p2pd" in c for c in children.values()), children
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=30)
        wait_until(lambda: not [p for p in children if alive(p)],
                   f"the owner's hivemind processes to exit: {children}", limit=60)
    finally:
        if owner.poll() is None:
            owner.kill()
