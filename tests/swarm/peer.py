"""A swarm worker in its own process, for tests that kill one: `python -m tests.swarm.peer ARGS`.

Prints `ready` once its averagers are up, waits for a line on stdin, then runs one round and prints
`published` as soon as its Δ norms are in the DHT (the test kills it there, mid-round).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from tests.swarm.conftest import inner, settings
from worker.executors.train import SwarmWorker


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--assignment", required=True, help='JSON {"0": [1, 2]}')
    p.add_argument("--expected", required=True, help="JSON module -> holders")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--peer", action="append", default=[])
    a = p.parse_args()
    torch.set_num_threads(1)
    w = SwarmWorker(a.checkpoint, {int(k): v for k, v in json.loads(a.assignment).items()},
                    settings(compression="none"), inner(data_offset=a.offset), initial_peers=a.peer,
                    expected_holders=json.loads(a.expected))
    collect = w.averager._publish_and_collect

    def publish_then_tell(*args):
        seen = collect(*args)
        print("published", flush=True)
        return seen

    w.averager._publish_and_collect = publish_then_tell
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps(w.run_round(0)), flush=True)
    w.shutdown()


if __name__ == "__main__":
    main()
