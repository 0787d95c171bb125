"""A swarm worker in its own process, for tests that kill one: `python -m tests.swarm.peer ARGS`.

Prints `ready` once its averagers are up, waits for a line on stdin, then runs one round: it prints
`trained` after its inner steps, when its groups have formed (matchmaking overlaps the inner steps), and
waits there for the test to kill it, mid-round.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from swarm.round import SwarmWorker
from tests.swarm.conftest import inner, settings


class Victim(SwarmWorker):
    def before_outer(self, round_: int) -> None:
        print("trained", flush=True)
        sys.stdin.readline()  # never answered: the test kills this process group here


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--assignment", required=True, help='JSON {"0": [1, 2]}')
    p.add_argument("--expected", required=True, help="JSON module -> holders")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--peer", action="append", default=[])
    a = p.parse_args()
    torch.set_num_threads(1)
    w = Victim(a.checkpoint, {int(k): v for k, v in json.loads(a.assignment).items()},
               settings(compression="none"), inner(data_offset=a.offset), initial_peers=a.peer,
               expected_holders=json.loads(a.expected))
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps(w.run_round(0)), flush=True)
    w.shutdown()


if __name__ == "__main__":
    main()
