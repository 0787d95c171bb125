"""The averaging layer's processes do not grow with the modules held, and a worker's peer id survives a
restart (the identity file in its cache dir)."""

from __future__ import annotations

import pytest

from swarm.exchange import SwarmExchange
from swarm.processes import _children_of
from tests.swarm.conftest import settings

pytestmark = pytest.mark.slow  # real hivemind peers (DHT, p2pd) on loopback


def descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        for child in _children_of(todo.pop()):
            out.add(child)
            todo.append(child)
    return out


def tanuki_modules(layers: int = 32, experts: int = 8) -> dict[str, int]:
    """Every module of Tanuki's 32 x 8 shape (tiny sizes: the count is what matters here)."""
    return {"trunk": 16} | {f"l{i}e{e}": 16 for i in range(layers) for e in range(experts)}


def test_a_worker_holding_all_257_modules_of_tanukis_shape_runs_two_child_processes(shutdown):
    import os

    before = descendants(os.getpid())
    x = SwarmExchange(settings(), tanuki_modules())
    shutdown([x])
    started = descendants(os.getpid()) - before
    # the DHT's process and its p2pd; one averager per module was 257 processes more
    assert len(started) == 2, started
    x.shutdown()
    assert not (descendants(os.getpid()) - before) & started


def test_the_peer_id_survives_a_restart_with_the_identity_file(tmp_path, shutdown):
    path = str(tmp_path / "swarm_identity.key")
    first = SwarmExchange(settings(), {"trunk": 8}, identity_path=path)
    peer = first.peer_id
    first.shutdown()
    again = SwarmExchange(settings(), {"trunk": 8}, identity_path=path)
    other = SwarmExchange(settings(), {"trunk": 8})
    shutdown([again, other])
    assert again.peer_id == peer and other.peer_id != peer
