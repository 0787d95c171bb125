"""A tiny shard corpus for the lease and swarm-data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_shards.lease import Lease
from data_shards.shards import Manifest, ShardInfo, ShardReader, write_shard

SEQ_LEN, BATCH, STEPS = 32, 2, 2   # a swarm round's sequences on the tiny MoE: H=2 steps of 2 x 32 tokens


def make_shards(directory: Path, n_shards: int = 10, docs_per_shard: int = 5, seed: int = 0) -> Path:
    """A tiny corpus of random documents (ids 2..63, as the tiny MoE's vocabulary) written by data_shards."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    infos = []
    for _ in range(n_shards):
        docs = [np.concatenate([[1], rng.integers(2, 64, size=int(rng.integers(4, 50)))])
                for _ in range(docs_per_shard)]
        name, tokens, n = write_shard(directory, docs, vocab_size=64)
        infos.append(ShardInfo(name, name.removesuffix(".bin"), tokens, n, "test", "en"))
    Manifest("0" * 64, 64, infos).save(directory)
    return directory


def readers_for(directory: Path, lease: Lease) -> dict[str, ShardReader]:
    return {s.shard: ShardReader(directory / s.shard, expected_sha256=s.sha256) for s in lease.segments}


def swarm_section(shards: Path | None = None, **kw) -> dict:
    """A project `swarm:` section of 2 rounds of STEPS x BATCH x SEQ_LEN, on `shards` when given."""
    s = {"inner_steps": STEPS, "rounds": 2, "batch_size": BATCH, "micro_batch_size": BATCH, "seq_len": SEQ_LEN,
         "averaging_timeout": 35.0, "checkpoint_every": 1, "compression": "none",
         "inner_warmup_steps": 0, **kw}
    if shards is not None:
        s["shards"] = str(shards)
    return s
