"""hivemind's processes die with the process that started them (swarm/processes.py): a worker killed with
kill -9 (or by the OOM killer) leaves no DHT, no averager and no p2pd behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, wait_until

pytestmark = pytest.mark.slow  # real hivemind processes

OWNER = """
import sys
from swarm.averager import SwarmAverager
from tests.swarm.conftest import settings

sa = SwarmAverager(settings(), {"trunk": 8, "l0e0": 8, "l0e1": 8})
print("ready", flush=True)
sys.stdin.readline()
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its (gone) parent would have reaped it


def _descendants(pid: int) -> dict[int, str]:
    parent_of = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent_of[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = {}, [pid]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent_of.items():
            if ppid == p and child not in found:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
                except OSError:
                    found[child] = "?"
                frontier.append(child)
    return found


def test_a_killed_owner_leaves_no_hivemind_process_behind():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert owner.stdout.readline().strip() == "ready"
        children = _descendants(owner.pid)
        # the DHT, three averagers and the DHT's p2pd daemon (and nothing that is not ours)
        assert len(children) >= 5 and any("p2pd" in c for c in children.values()), children
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=30)
        wait_until(lambda: not [p for p in children if _alive(p)],
                   f"the owner's hivemind processes to exit: {children}", limit=60)
    finally:
        if owner.poll() is None:
            owner.kill()
