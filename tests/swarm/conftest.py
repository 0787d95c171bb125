"""In-process swarm workers on 127.0.0.1 (each with its own hivemind DHT and averagers) on the tiny MoE of
tests/conftest.py (`tiny_model`, the `tiny_checkpoint` fixture)."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from swarm.modules import count_holders
from swarm.round import SwarmWorker
from swarm.settings import InnerConfig, SwarmSettings
from tests.conftest import tiny_model  # noqa: F401  (imported from here by other tests)


def settings(**kw) -> SwarmSettings:
    # all-reduce timeout (averaging_timeout - matchmaking_time - stats_timeout) / 3 = 10 s, chunks 3.3 s
    base = dict(run="t", matchmaking_time=3.0, request_timeout=1.0, averaging_timeout=35.0, stats_timeout=2.0)
    return SwarmSettings(**{**base, **kw})


def inner(**kw) -> InnerConfig:
    base = dict(inner_steps=3, total_steps=30, batch_size=2, micro_batch_size=2, seq_len=32)
    return InnerConfig(**{**base, **kw})


def holders(assignments: list[dict[int, list[int]]]) -> dict[str, int]:
    return count_holders(assignments)


def start_workers(checkpoint, assignments, s: SwarmSettings, cfg: InnerConfig, cls=SwarmWorker, peers=(),
                  expected=None) -> list[SwarmWorker]:
    """One worker per assignment; worker i reads batch indices [i*B, (i+1)*B). The first bootstraps the DHT."""
    expected = expected or holders(assignments)
    workers: list[SwarmWorker] = []
    for i, a in enumerate(assignments):
        c = dataclasses.replace(cfg, data_offset=i * cfg.batch_size)
        boot = list(peers) or (workers[0].averager.visible_maddrs() if workers else [])
        workers.append(cls(checkpoint, a, s, c, initial_peers=boot, expected_holders=expected))
    return workers


def run_round(workers: list[SwarmWorker], round_: int) -> list[dict]:
    """Run one round on every worker at once (threads: torch and hivemind release the GIL)."""
    results: list = [None] * len(workers)
    errors: list = []

    def go(i):
        try:
            results[i] = workers[i].run_round(round_)
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


def average_together(peers, given: list[dict], weights: list[float], round_: int = 0) -> list[dict]:
    """SwarmAverager.average on every peer at once (threads), peer i with given[i] and weight weights[i]."""
    out: list = [None] * len(peers)
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(
        i, peers[i].average(round_, given[i], {m: weights[i] for m in given[i]}))) for i in range(len(peers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out
