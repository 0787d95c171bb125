"""Runs one swarm round in a fresh process and prints its baseline and peak RSS as JSON:
`python -m tests.swarm.memory_probe CHECKPOINT EXPERTS_PER_LAYER`."""

from __future__ import annotations

import json
import sys

import torch

from swarm.memory import peak_rss_bytes, pin_allocator, warm_baseline_rss
from swarm.round import SwarmWorker
from tests.swarm.conftest import inner, settings


def main() -> None:
    torch.set_num_threads(1)
    assert pin_allocator(), "glibc's mallopt is needed for the memory model's CPU measurements"
    checkpoint, k = sys.argv[1], int(sys.argv[2])
    base = warm_baseline_rss()
    from model.checkpoint import load_config

    layers = load_config(checkpoint).num_layers
    w = SwarmWorker(checkpoint, {i: list(range(k)) for i in range(layers)}, settings(averaging=False),
                    inner(inner_steps=2, batch_size=2, micro_batch_size=2, seq_len=32))
    w.run_round(0)
    print(json.dumps({"base": base, "peak": peak_rss_bytes()}))


if __name__ == "__main__":
    main()
