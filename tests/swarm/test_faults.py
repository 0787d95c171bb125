"""Faults of a worker's processes: a worker killed mid-round (with its DHT and p2pd, or alone) must not stop the
others' round nor leave processes behind; a DHT process that dies while starting or mid-round is an error,
not a wait forever; a stop request ends a round that waits for the others' Δs."""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import hivemind
import pytest
import torch

from swarm.exchange import SwarmExchange
from swarm.modules import held_modules
from swarm.processes import ChildDied
from swarm.ticket import RoundTicket, round_tickets
from tests.conftest import wait_until
from tests.swarm.conftest import alive, descendants, inner, member, run_round, settings, start_workers

pytestmark = pytest.mark.slow  # real hivemind peers, killed and restarted


def start_victim(checkpoint, assignment: dict, offset: int, peers: list[str]) -> tuple[subprocess.Popen, str]:
    """tests/swarm/peer.py in its own process group; returns it and its peer id once it is ready."""
    victim = subprocess.Popen(
        [sys.executable, "-m", "tests.swarm.peer", "--checkpoint", str(checkpoint),
         "--assignment", json.dumps(assignment), "--offset", str(offset), *[a for m in peers for a in ("--peer", m)]],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True)
    ready = victim.stdout.readline().split()
    assert ready[:1] == ["ready"] and len(ready) == 2, ready
    return victim, ready[1]


def round_zero_tickets(survivors, victim_id: str, victim_assignment: dict) -> tuple[list[RoundTicket], RoundTicket]:
    """The tickets a coordinator would sign once all three joined: the survivors', then the victim's."""
    members = {f"w{i}": member(w) for i, w in enumerate(survivors)}
    members["victim"] = (victim_id, held_modules(victim_assignment), members["w0"][2])
    out = round_tickets("t", 0, members, time.time() + 3600)
    return [out[f"w{i}"] for i in range(len(survivors))], out["victim"]


def kill_once_trained(victim: subprocess.Popen, ticket: RoundTicket, kill) -> tuple[threading.Thread, threading.Event]:
    """Hand the victim its ticket, and `kill()` it once its inner steps are done and before it sends its Δ."""
    killed = threading.Event()

    def go():
        victim.stdin.write(json.dumps(ticket.to_dict()) + "\n")
        victim.stdin.flush()
        if victim.stdout.readline().strip() == "trained":
            kill()
            killed.set()

    killer = threading.Thread(target=go)
    killer.start()
    return killer, killed


def end_group(victim: subprocess.Popen) -> None:
    """Whatever happened, nothing of the victim's process group outlives the test."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()


def test_killing_one_of_three_workers_mid_round_does_not_stop_the_round(tiny_checkpoint, shutdown):
    """The victim's whole process group (worker, DHT, p2pd: a machine gone) is killed after its inner steps,
    before it sends its Δ. The survivors aggregate what they share without it once averaging_timeout is up,
    and agree on it bit for bit; the expert each shared only with the victim (l0e0 for the first, l0e3 for the
    second) got no other Δ: failed."""
    assignments = [{0: [0, 1, 2]}, {0: [1, 2, 3]}, {0: [0, 1, 3]}]
    survivors = start_workers(tiny_checkpoint, assignments[:2], settings(compression="none", averaging_timeout=8.0),
                              inner())
    shutdown(survivors)
    victim, victim_id = start_victim(tiny_checkpoint, assignments[2], 4, survivors[0].exchange.visible_maddrs())
    try:
        given, victims = round_zero_tickets(survivors, victim_id, assignments[2])
        killer, killed = kill_once_trained(victim, victims, lambda: os.killpg(victim.pid, signal.SIGKILL))
        metrics = run_round(survivors, 0, given)
        killer.join()
        assert killed.is_set()
    finally:
        end_group(victim)
    for w, alone in zip(survivors, ("l0e0", "l0e3"), strict=True):
        outcomes = {o.module: o for o in w.last_report.modules}
        assert outcomes[alone].outcome == "failed"
        for module, left_out in (("trunk", [victim_id]), ("l0e1", [victim_id]), ("l0e2", [])):  # l0e2: no victim
            o = outcomes[module]
            assert o.outcome == "ok" and o.group_size == 2 and o.refused_peers == left_out, o
    for m in metrics:
        assert m["modules_averaged"] == 3 and m["modules_failed"] == 1, m
    for module in ("trunk", "l0e1", "l0e2"):
        assert torch.equal(survivors[0].module_state(module), survivors[1].module_state(module)), module


def test_a_worker_killed_alone_mid_round_leaves_no_process_and_the_others_finish(tiny_checkpoint, shutdown):
    """Only the victim's worker process is killed (SIGKILL, as the OOM killer does), after its inner steps: its
    DHT process and p2pd see their parent gone and exit (swarm/processes.py), and the two survivors' round
    completes with every module they share averaged (ok) without it."""
    assignments = [{0: [0, 1]}, {0: [0, 1]}, {0: [0, 1]}]
    survivors = start_workers(tiny_checkpoint, assignments[:2], settings(compression="none", averaging_timeout=8.0),
                              inner())
    shutdown(survivors)
    victim, victim_id = start_victim(tiny_checkpoint, assignments[2], 4, survivors[0].exchange.visible_maddrs())
    try:
        children = descendants(victim.pid)
        assert len(children) >= 2 and any("p2pd" in c for c in children.values()), children  # its DHT and p2pd
        given, victims = round_zero_tickets(survivors, victim_id, assignments[2])
        killer, killed = kill_once_trained(victim, victims, lambda: os.kill(victim.pid, signal.SIGKILL))
        metrics = run_round(survivors, 0, given)
        killer.join()
        assert killed.is_set()
        victim.wait(timeout=30)
        wait_until(lambda: not [p for p in children if alive(p)],
                   f"the killed worker's DHT and p2pd to exit: {children}", limit=60)
    finally:
        end_group(victim)
    for w, m in zip(survivors, metrics, strict=True):
        assert m["modules_averaged"] == 3 and m["modules_failed"] == 0, m
        for o in w.last_report.modules:
            assert o.outcome == "ok" and o.group_size == 2 and o.refused_peers == [victim_id], o
    for module in ("trunk", "l0e0", "l0e1"):
        assert torch.equal(survivors[0].module_state(module), survivors[1].module_state(module)), module


def absent_peer() -> str:
    """A well-formed peer id nobody has (a sha2-256 multihash, as libp2p's ids of RSA keys are)."""
    from hivemind.p2p import PeerID

    return PeerID(b"\x12\x20" + hashlib.sha256(b"nobody").digest()).to_base58()


def waiting_for_nobody(x: SwarmExchange) -> RoundTicket:
    """A ticket for round 0 whose trunk group is `x` and a member that never sends."""
    members = {"me": (x.peer_id, ["trunk"], 1.0), "absent": (absent_peer(), ["trunk"], 1.0)}
    return round_tickets("t", 0, members, time.time() + 3600)["me"]


def new_threads(before: set) -> list[str]:
    return [t.name for t in threading.enumerate() if t not in before and t.is_alive()]


def test_a_dht_that_dies_while_starting_fails_construction_and_leaves_nothing_running(monkeypatch):
    """hivemind's wait_until_ready has no deadline: a worker whose DHT process died while starting (a SIGTERM to
    its process group, an error of its own) used to wait forever. Now the exchange's construction raises, is
    not retried (the DHT was not killed by a fault) and stops the exchange's own thread. Fault injection: the
    DHT's process body exits at once."""
    made = []

    class Dying(hivemind.DHT):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

        def run(self):
            os._exit(3)

    monkeypatch.setattr(hivemind, "DHT", Dying)
    before = set(threading.enumerate())
    with pytest.raises(ChildDied, match=r"the DHT: its hivemind process died \(exit code 3\)"):
        SwarmExchange(settings(), {"trunk": 8, "l0e0": 8})
    assert len(made) == 1 and made[0].exitcode == 3
    assert "swarm-exchange" not in new_threads(before)


def test_a_dht_that_crashes_while_starting_is_started_again(monkeypatch):
    """A fork()ed child can crash on state inherited from its parent (see swarm.processes.fork_safely); a DHT
    that dies of a fault while starting is replaced instead of failing the worker. Fault injection: the first
    DHT process built kills itself with SIGSEGV before serving."""
    made = []

    class CrashingOnce(hivemind.DHT):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

        def run(self):
            if self is made[0]:
                faulthandler.disable()  # a crash without pytest's traceback dump on the console...
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # ...and without a core file
                os.kill(os.getpid(), signal.SIGSEGV)
            super().run()

    monkeypatch.setattr(hivemind, "DHT", CrashingOnce)
    x = SwarmExchange(settings(), {"trunk": 8})
    try:
        assert len(made) == 2 and made[0].exitcode == -signal.SIGSEGV
        assert x.dht is made[1] and made[1].is_alive()
        assert x.peer_id == str(made[1].peer_id)  # the replacement serves
    finally:
        x.shutdown()


@pytest.mark.parametrize("when", ["before the round", "while it waits"])
def test_a_dht_process_that_dies_mid_round_is_an_error_not_a_wait_forever(when):
    """hivemind's calls wait forever for an answer from a dead DHT process, and a member that never sends
    would keep the round waiting for averaging_timeout (60 s here): the round raises ChildDied instead, whether
    the DHT was dead when the round began or died while it waited for the other member's Δ."""
    x = SwarmExchange(settings(averaging_timeout=60.0), {"trunk": 8})
    try:
        x.set_ticket(waiting_for_nobody(x))

        def kill():
            os.kill(x.dht.pid, signal.SIGKILL)

        if when == "before the round":
            kill()
            x.dht.join(timeout=10)
        else:
            threading.Timer(1.0, kill).start()
        with pytest.raises(ChildDied, match=r"round 0: the DHT: its hivemind process died \(exit code -9\)"):
            x.average(0, {"trunk": torch.ones(8)})
    finally:
        x.shutdown()


def test_a_stop_request_ends_a_round_waiting_for_the_others_deltas():
    """A worker asked to stop (SIGTERM, the coordinator's CANCEL) while its round waits for a member's Δ that
    will not come must stop then, not after averaging_timeout (60 s here; the demo gives a worker 20 s after
    SIGTERM). The stop propagates as check_stop raised it."""
    from worker.executors import TaskStopped

    x = SwarmExchange(settings(averaging_timeout=60.0), {"trunk": 8})
    stop, calls = threading.Event(), []

    def check_stop():
        calls.append(1)
        if stop.is_set():
            raise TaskStopped("task t asked to stop")

    try:
        x.set_ticket(waiting_for_nobody(x))
        x.check_stop = check_stop
        threading.Timer(1.0, stop.set).start()
        with pytest.raises(TaskStopped, match="asked to stop"):
            x.average(0, {"trunk": torch.ones(8)})
        assert stop.is_set() and len(calls) >= 2  # polled while waiting, and raised once the request came
    finally:
        x.shutdown()
