"""A swarm worker in its own process, for tests that kill one: `python -m tests.swarm.peer ARGS`.

Prints `ready PEER_ID` once its DHT and exchange are up, then reads its round ticket as one line of JSON on
stdin (RoundTicket.to_dict(), what the test built for every member with swarm.ticket.round_tickets) and
runs round 0 with it: it prints `trained` after its inner steps, once it has taken the ticket (so the
others' Δs are welcome), and waits there, before it sends its own, for the test to kill it mid-round.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from swarm.round import SwarmWorker
from swarm.ticket import RoundTicket
from tests.swarm.conftest import inner, settings


class Victim(SwarmWorker):
    def before_outer(self, round_: int) -> None:
        print("trained", flush=True)
        sys.stdin.readline()  # never answered: the test kills this process here


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--assignment", required=True, help='JSON {"0": [1, 2]}')
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--peer", action="append", default=[])
    a = p.parse_args()
    torch.set_num_threads(1)
    w = Victim(a.checkpoint, {int(k): v for k, v in json.loads(a.assignment).items()},
               settings(compression="none"), inner(data_offset=a.offset), initial_peers=a.peer)
    try:
        print("ready", w.peer_id, flush=True)
        line = sys.stdin.readline()
        if line:  # the test went away without a ticket: nothing to run
            print(json.dumps(w.run_round(0, ticket=RoundTicket(**json.loads(line)))), flush=True)
    finally:
        w.shutdown()


if __name__ == "__main__":
    main()
