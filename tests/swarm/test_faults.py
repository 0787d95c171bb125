"""A worker killed mid-round (its whole process group, SIGKILL) must not stop the others' round."""

from __future__ import annotations

import faulthandler
import json
import os
import resource
import signal
import subprocess
import sys
import threading

import hivemind
import pytest

from tests.swarm.conftest import holders, inner, run_round, settings, start_workers

pytestmark = pytest.mark.slow  # real hivemind peers, killed and restarted


def test_killing_one_of_three_workers_mid_round_does_not_stop_the_round(tiny_checkpoint, shutdown):
    assignments = [{0: [0, 1, 2]}, {0: [1, 2, 3]}, {0: [0, 1, 3]}]
    expected = holders(assignments)
    survivors = start_workers(tiny_checkpoint, assignments[:2], settings(compression="none"), inner(),
                              expected=expected)
    shutdown(survivors)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen(
        [sys.executable, "-m", "tests.swarm.peer", "--checkpoint", str(tiny_checkpoint),
         "--assignment", json.dumps(assignments[2]), "--expected", json.dumps(expected), "--offset", "4",
         *[arg for m in survivors[0].averager.visible_maddrs() for arg in ("--peer", m)]],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        assert victim.stdout.readline().strip() == "ready"
        killed = threading.Event()

        def kill_after_its_inner_steps():
            victim.stdin.write("go\n")
            victim.stdin.flush()
            if victim.stdout.readline().strip() == "trained":
                os.killpg(victim.pid, signal.SIGKILL)  # the worker and its averager/DHT processes
                killed.set()

        killer = threading.Thread(target=kill_after_its_inner_steps)
        killer.start()
        metrics = run_round(survivors, 0)
        killer.join()
        assert killed.is_set()
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    # the survivors averaged what they share, and agree on it; the expert each shared only with the victim
    # (l0e0 for the first, l0e3 for the second) found no group within averaging_timeout and failed
    for m in metrics:
        assert m["modules_averaged"] == 3 and m["modules_failed"] == 1, m
    for module in ("trunk", "l0e1", "l0e2"):
        a, b = survivors[0].module_state(module), survivors[1].module_state(module)
        assert (a - b).abs().max() <= 1e-7, module


def test_an_averager_that_dies_while_starting_fails_construction_and_stops_the_dht(monkeypatch):
    """hivemind's wait_until_ready has no deadline: a daemon whose averager process died while starting
    (a SIGTERM to its process group) used to wait forever. Fault injection: the process body exits at once."""
    import swarm.averager as swarm

    real = swarm.checked_averager_class()

    class Dying(real):
        def run(self):
            os._exit(3)

    monkeypatch.setattr(swarm, "checked_averager_class", lambda: Dying)
    dhts = []
    real_dht = hivemind.DHT

    def tracked(*args, **kwargs):
        dhts.append(real_dht(*args, **kwargs))
        return dhts[-1]

    monkeypatch.setattr(hivemind, "DHT", tracked)
    with pytest.raises(RuntimeError, match=r"averager of module \w+: its hivemind process died \(exit code 3\)"):
        swarm.SwarmAverager(settings(), {"trunk": 8, "l0e0": 8})
    assert len(dhts) == 1 and not dhts[0].is_alive()


def test_an_averager_that_crashes_while_starting_is_started_again(monkeypatch):
    """A fork()ed child can crash on state inherited from its parent (see swarm.processes.fork_safely); one that
    dies of a fault while starting is replaced instead of failing the round. Fault injection: the first
    averager process built kills itself with SIGSEGV before serving."""
    import swarm.averager as swarm

    real = swarm.checked_averager_class()
    made = []

    class CrashingOnce(real):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

        def run(self):
            if self is made[0]:
                faulthandler.disable()  # a crash without pytest's traceback dump on the console...
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # ...and without a core file
                os.kill(os.getpid(), signal.SIGSEGV)
            super().run()

    monkeypatch.setattr(swarm, "checked_averager_class", lambda: CrashingOnce)
    sa = swarm.SwarmAverager(settings(), {"trunk": 8})
    try:
        assert len(made) == 2 and made[0].exitcode == -signal.SIGSEGV
        assert sa.averagers["trunk"] is made[1] and made[1].is_alive()
    finally:
        sa.shutdown()


def test_a_dht_process_that_dies_mid_round_is_an_error_not_a_wait_forever():
    """hivemind's DHT calls wait forever for an answer from a dead DHT process; the round raises instead."""
    import torch

    import swarm.averager as swarm

    sa = swarm.SwarmAverager(settings(), {"trunk": 8}, expected_holders={"trunk": 2})
    try:
        os.kill(sa.dht.pid, signal.SIGKILL)
        sa.dht.join(timeout=10)
        died = r"round 0: the DHT: its hivemind process died \(exit code -9\)"
        with pytest.raises(swarm.ChildDied, match=died):
            sa.average(0, {"trunk": torch.ones(8)}, {"trunk": 1.0})
    finally:
        sa.shutdown()


def test_a_stop_request_ends_a_round_waiting_for_its_all_reduce():
    """A worker asked to stop (SIGTERM, the coordinator's CANCEL) while its round waits for a group that will not
    form must stop then, not after the all-reduce's timeout: the demo gives a worker 20 s after SIGTERM, and
    that timeout alone is ~13 s here. The stop propagates as check_stop raised it, and the step is cancelled."""
    import torch

    import swarm.averager as swarm
    from worker.executors import TaskStopped

    sa = swarm.SwarmAverager(settings(), {"trunk": 8}, expected_holders={"trunk": 2})  # the other holder never comes
    stop, calls = threading.Event(), []

    def check_stop():
        calls.append(1)
        if stop.is_set():
            raise TaskStopped("task t asked to stop")

    try:
        sa.check_stop = check_stop
        threading.Timer(1.0, stop.set).start()
        with pytest.raises(TaskStopped, match="asked to stop"):
            sa.average(0, {"trunk": torch.ones(8)}, {"trunk": 1.0})
        assert stop.is_set() and len(calls) >= 2  # polled while waiting, and raised once the request came
    finally:
        sa.shutdown()
