"""Swarm data leases (data_shards/lease.py): disjoint ranges of a shard corpus that pack into a round."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_shards.lease import Corpus, Cursor, Lease, lease_sequences, pack_lease
from data_shards.shards import ShardError, ShardReader
from tests.data_shards.tiny_shards import BATCH, SEQ_LEN, STEPS, make_shards, readers_for


def test_leases_tile_the_corpus_disjointly_and_wrap_into_new_epochs(tmp_path):
    d = make_shards(tmp_path / "shards")
    corpus = Corpus.open(d, seed=3)
    n = STEPS * BATCH
    cursor, seen = Cursor(), {}
    for _ in range(12):  # several epochs
        leases, after = corpus.plan(cursor, 3, n, SEQ_LEN)
        assert leases == corpus.plan(cursor, 3, n, SEQ_LEN)[0]  # deterministic
        for lease in leases:
            seen.setdefault(lease.epoch, []).append((lease.start, lease.end))
            seqs, tokens = lease_sequences(Lease.from_dict(json.loads(json.dumps(lease.to_dict()))),
                                           readers_for(d, lease))
            assert len(seqs) == n and sum(tokens) == lease.tokens
            # the worker's sequences are the coordinator's packing of exactly the leased documents
            docs = [ShardReader(d / s.shard).document(i) for s in lease.segments for i in range(s.start, s.end)]
            bins = pack_lease(np.array([len(x) for x in docs]), SEQ_LEN, n)
            assert [int(q.input_ids[0]) for q in seqs] == [int(docs[b[0].doc][b[0].start]) for b in bins]
            # the smallest range that fills the lease: one document fewer does not
            assert len(pack_lease(np.array([len(x) for x in docs[:-1]]), SEQ_LEN, n)) < n
        cursor = after
    assert len(seen) >= 3, seen
    total = sum(len(r.lengths()) for r in map(ShardReader, sorted(d.glob("*.bin"))))
    for ranges in seen.values():
        assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False)), ranges
        assert ranges[-1][1] <= total
    # each epoch visits the shards in its own order
    first = [corpus.plan(Cursor(e, 0), 1, n, SEQ_LEN)[0][0].segments[0].shard for e in range(6)]
    assert len(set(first)) > 1
    with pytest.raises(ShardError, match="cannot fill one lease"):
        corpus.plan(Cursor(), 1, 10_000, SEQ_LEN)
