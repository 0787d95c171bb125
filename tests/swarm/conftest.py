"""In-process swarm workers on 127.0.0.1 (each with its own hivemind DHT and exchange), with the tickets a
coordinator would sign for them, on the tiny MoE of
tests/conftest.py (`tiny_model`, the `tiny_checkpoint` fixture); and the process tree of a worker that runs in
its own process (`descendants`, `alive`), for tests that kill one."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import pytest

from swarm.exchange import SwarmExchange
from swarm.round import SwarmWorker
from swarm.settings import InnerConfig, SwarmSettings
from swarm.ticket import round_tickets
from tests.conftest import tiny_model  # noqa: F401  (imported from here by other tests)


def settings(**kw) -> SwarmSettings:
    return SwarmSettings(**{**dict(run="t", averaging_timeout=20.0), **kw})


def inner(**kw) -> InnerConfig:
    base = dict(inner_steps=3, total_steps=30, batch_size=2, micro_batch_size=2, seq_len=32)
    return InnerConfig(**{**base, **kw})


def start_workers(checkpoint, assignments, s: SwarmSettings, cfg: InnerConfig, cls=SwarmWorker,
                  peers=()) -> list[SwarmWorker]:
    """One worker per assignment; worker i reads batch indices [i*B, (i+1)*B). The first bootstraps the DHT."""
    workers: list[SwarmWorker] = []
    for i, a in enumerate(assignments):
        c = dataclasses.replace(cfg, data_offset=i * cfg.batch_size)
        boot = list(peers) or (workers[0].exchange.visible_maddrs() if workers else [])
        workers.append(cls(checkpoint, a, s, c, initial_peers=boot))
    return workers


def member(w: SwarmWorker, weight: float | None = None) -> tuple[str, list[str], float]:
    """A worker's entry in round_tickets: its peer id, modules, and (by default) the tokens of its round."""
    i = w.inner
    return w.peer_id, list(w.modules), float(weight or i.inner_steps * i.batch_size * i.seq_len)


def tickets(workers: list[SwarmWorker], round_: int, extra: dict | None = None, run: str = "t") -> list:
    """What the coordinator would sign for these workers' round (plus `extra` slot -> member entries)."""
    members = {f"w{i}": member(w) for i, w in enumerate(workers)} | (extra or {})
    out = round_tickets(run, round_, members, time.time() + 3600)
    return [out[f"w{i}"] for i in range(len(workers))]


def run_round(workers: list[SwarmWorker], round_: int, given: list | None = None) -> list[dict]:
    """Run one round on every worker at once (threads: torch and hivemind release the GIL), each with its
    ticket (`given`, or the tickets of exactly these workers)."""
    given = given or tickets(workers, round_, run=workers[0].settings.run)
    results: list = [None] * len(workers)
    errors: list = []

    def go(i):
        try:
            results[i] = workers[i].run_round(round_, ticket=given[i])
        except BaseException as e:  # re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture
def shutdown():
    """Collects workers to shut down at the end of the test, whatever happened."""
    started: list = []
    yield started.extend
    for w in started:
        w.shutdown()


def start_exchanges(n: int, sizes: dict[str, int], s: SwarmSettings) -> list[SwarmExchange]:
    first = SwarmExchange(s, sizes)
    return [first] + [SwarmExchange(s, sizes, initial_peers=first.visible_maddrs()) for _ in range(n - 1)]


def exchange_tickets(peers: list[SwarmExchange], weights: list[float], round_: int = 0,
                     run: str = "t") -> list:
    members = {f"p{i}": (x.peer_id, list(x.sizes), w) for i, (x, w) in enumerate(zip(peers, weights, strict=True))}
    out = round_tickets(run, round_, members, time.time() + 3600)
    return [out[f"p{i}"] for i in range(len(peers))]


def ticket_all(peers: list[SwarmExchange], weights: list[float], round_: int = 0) -> None:
    """Give every peer its ticket of one group of all of them, with these weights."""
    for x, t in zip(peers, exchange_tickets(peers, weights, round_, peers[0].settings.run), strict=True):
        x.set_ticket(t)


def average_on(peers: list[SwarmExchange], given: list[dict], round_: int = 0) -> list:
    """SwarmExchange.average on peers[:len(given)] at once (threads), peer i with given[i]; the tickets set."""
    out: list = [None] * len(given)
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, peers[i].average(round_, given[i])))
               for i in range(len(given))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def average_together(peers: list[SwarmExchange], given: list[dict], weights: list[float], round_: int = 0) -> list:
    """SwarmExchange.average on every peer at once (threads), peer i with given[i] and ticket weight weights[i]."""
    ticket_all(peers, weights, round_)
    return average_on(peers, given, round_)


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie has exited; only its gone parent would have reaped it). Linux /proc."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid` (children, theirs, ...) -> the start of its command line. Linux /proc."""
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
