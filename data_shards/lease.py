"""Leases: disjoint ranges of a shard corpus handed to swarm workers, one per `train` task.

The coordinator walks the corpus (a shard directory: content-addressed shards + manifest.json) in
*epochs*. Epoch e visits the shards in a seeded order (`shard_order(seed, e)`) and, inside each shard,
its documents in file order; together they form one virtual document stream. A lease is a contiguous
run of that stream, `[start, end)`, as one or more `Segment`s (shard file, sha256, first document, end
document), so a worker downloads only the one or two shards its lease touches.

Both sides pack a lease the same way (`pack_lease`): best-fit decreasing over the lease's documents
(data_shards/packing.py) and keep the first `sequences` bins (BFD opens bins fullest first; the few
tokens of any bins past `sequences` are not trained). The coordinator picks the smallest `end` whose
packing fills `sequences` bins, so consecutive leases tile the stream without gaps; it records the exact
`tokens` of the kept bins, which bounds what a worker may claim to have trained on. When the rest of an
epoch cannot fill a lease, the next lease starts the next epoch (the epoch's tail is skipped once).

    corpus = Corpus.open("shards/train", seed=0)
    leases, cursor = corpus.plan(Cursor(0, 0), count=2, sequences=H * B, seq_len=L)
    lease.to_dict()                                  # the JSON a train payload carries
    seqs, tokens = lease_sequences(Lease.from_dict(d), readers)    # the worker's H·B packed sequences

Pure: numpy and this package only (no torch: the coordinator plans and validates leases without it).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .packing import Chunk, PackedSequence, build_sequence, pack
from .shards import Manifest, ShardError, ShardReader


@dataclass(frozen=True)
class Segment:
    """Documents [start, end) of one shard (file name as in the manifest, its SHA-256)."""

    shard: str
    sha256: str
    start: int
    end: int


@dataclass(frozen=True)
class Cursor:
    """Where the next lease begins: document `position` of epoch `epoch`'s stream."""

    epoch: int = 0
    position: int = 0


@dataclass(frozen=True)
class Lease:
    epoch: int
    start: int                      # position of the first document in the epoch's stream
    end: int
    segments: tuple[Segment, ...]
    sequences: int                  # packed sequences to train on (inner_steps · batch_size)
    seq_len: int
    tokens: int                     # real (non-padding) tokens of those sequences

    def to_dict(self) -> dict:
        return {**asdict(self), "segments": [asdict(s) for s in self.segments]}

    @classmethod
    def from_dict(cls, d: Mapping) -> Lease:
        try:
            segs = tuple(Segment(str(s["shard"]), str(s["sha256"]), int(s["start"]), int(s["end"]))
                         for s in d["segments"])
            lease = cls(int(d["epoch"]), int(d["start"]), int(d["end"]), segs, int(d["sequences"]),
                        int(d["seq_len"]), int(d["tokens"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed lease {dict(d)!r}: {e}") from None
        if not segs or lease.sequences < 1 or lease.seq_len < 1 or lease.tokens < 1:
            raise ValueError(f"lease needs segments, sequences >= 1, seq_len >= 1 and tokens >= 1: {dict(d)!r}")
        for s in segs:
            if not 0 <= s.start < s.end or "/" in s.shard or s.shard in ("", ".", ".."):
                raise ValueError(f"lease segment {s} is not a document range [start < end) of a shard file name")
        return lease


def shard_order(seed: int, epoch: int, n_shards: int) -> np.ndarray:
    """The order epoch `epoch` visits the shards in: a permutation seeded by (seed, epoch)."""
    digest = hashlib.sha256(repr((seed, "swarm-shards", epoch)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(n_shards)


def pack_lease(lengths: np.ndarray, seq_len: int, sequences: int) -> list[list[Chunk]]:
    """The bins a lease trains on: BFD over its documents' lengths, the first `sequences` bins (fewer when
    the documents do not fill that many). Chunk.doc indexes `lengths`."""
    return pack(np.asarray(lengths, dtype=np.int64), seq_len)[:sequences]


def bin_tokens(bins: list[list[Chunk]]) -> int:
    return sum(c.length for b in bins for c in b)


class Corpus:
    """The coordinator's view of a shard directory: document lengths per shard, nothing else loaded."""

    def __init__(self, manifest: Manifest, lengths: list[np.ndarray], seed: int):
        if not manifest.shards:
            raise ShardError("the swarm's shard directory has no shards: nothing to train on")
        self.manifest, self.lengths, self.seed = manifest, lengths, seed
        self._epoch: int | None = None

    @classmethod
    def open(cls, directory: str | os.PathLike, seed: int = 0) -> Corpus:
        """Read manifest.json and each shard's header and document offsets (not its tokens)."""
        manifest = Manifest.load(directory)
        lengths = []
        for s in manifest.shards:
            r = ShardReader(Path(directory) / s.file)
            if r.num_documents != s.documents or r.num_tokens != s.tokens:
                raise ShardError(f"{directory}/{s.file}: {r.num_documents} documents / {r.num_tokens} tokens, but "
                                 f"manifest.json says {s.documents} / {s.tokens}: rebuild the shards")
            lengths.append(r.lengths())
        return cls(manifest, lengths, seed)

    def _stream(self, epoch: int) -> None:
        """Cache epoch's stream: shard order, and each document's length and (shard, index)."""
        if self._epoch == epoch:
            return
        self._order = shard_order(self.seed, epoch, len(self.lengths))
        self._len = np.concatenate([self.lengths[i] for i in self._order])
        self._first = np.concatenate([[0], np.cumsum([len(self.lengths[i]) for i in self._order])])
        self._cum = np.concatenate([[0], np.cumsum(self._len)])  # tokens before position p
        self._epoch = epoch

    def _segments(self, start: int, end: int) -> tuple[Segment, ...]:
        out = []
        k = int(np.searchsorted(self._first, start, side="right")) - 1
        while start < end:
            lo, hi = int(self._first[k]), int(self._first[k + 1])
            info = self.manifest.shards[int(self._order[k])]
            stop = min(end, hi)
            if stop > start:
                out.append(Segment(info.file, info.sha256, start - lo, stop - lo))
            start, k = stop, k + 1
        return tuple(out)

    def _fills(self, start: int, end: int, seq_len: int, sequences: int) -> bool:
        return len(pack_lease(self._len[start:end], seq_len, sequences)) >= sequences

    def _lease_end(self, start: int, seq_len: int, sequences: int) -> int | None:
        """The smallest end whose documents pack into `sequences` bins, or None if the epoch's rest cannot.
        Only documents up to the first end holding `sequences · seq_len` tokens are ever packed."""
        n = len(self._len)
        # `sequences · seq_len` tokens always fill the bins; at least `sequences` chunks are needed
        hi = int(np.searchsorted(self._cum, self._cum[start] + sequences * seq_len, side="left"))
        if hi > n:
            if start >= n or not self._fills(start, n, seq_len, sequences):
                return None
            hi = n
        chunks = np.cumsum(-(-self._len[start:hi] // seq_len))
        lo = start + 1 + int(np.searchsorted(chunks, sequences, side="left"))
        lo = min(lo, hi)
        while lo < hi:  # binary search for the first end that fills (BFD's bin count grows with the documents)
            mid = (lo + hi) // 2
            if self._fills(start, mid, seq_len, sequences):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def plan(self, cursor: Cursor, count: int, sequences: int, seq_len: int) -> tuple[list[Lease], Cursor]:
        """`count` consecutive, disjoint leases of `sequences` packed sequences each, from `cursor`; returns
        them and the cursor after the last. Deterministic in (corpus, seed, cursor, count, sizes)."""
        leases = []
        epoch, pos = cursor.epoch, cursor.position
        for _ in range(count):
            self._stream(epoch)
            end = self._lease_end(pos, seq_len, sequences)
            if end is None:  # the rest of this epoch is too short: the next epoch starts over
                if pos == 0:
                    total = int(self._cum[-1])
                    raise ShardError(f"the swarm corpus ({len(self._len)} documents, {total} tokens) cannot fill one "
                                     f"lease of {sequences} sequences of {seq_len} tokens: add data, or lower "
                                     "swarm.inner_steps / batch_size / seq_len")
                epoch, pos = epoch + 1, 0
                self._stream(epoch)
                end = self._lease_end(pos, seq_len, sequences)
                if end is None:
                    return self.plan(Cursor(epoch, 0), 1, sequences, seq_len)  # raises the error above
            tokens = bin_tokens(pack_lease(self._len[pos:end], seq_len, sequences))
            leases.append(Lease(epoch, pos, end, self._segments(pos, end), sequences, seq_len, tokens))
            pos = end
        return leases, Cursor(epoch, pos)


def lease_sequences(lease: Lease, readers: Mapping[str, ShardReader],
                    pad_id: int = 0) -> tuple[list[PackedSequence], list[int]]:
    """Materialise a lease: its `sequences` packed sequences (build_sequence: labels stop at each document's
    end, doc_ids per chunk, positions restarting) and the real (non-padding) tokens of each. `readers` maps
    each segment's shard file to its reader. Raises ShardError when the shards do not give back exactly the
    lease's sequences and tokens."""
    docs: list[tuple[ShardReader, int]] = []
    for s in lease.segments:
        r = readers[s.shard]
        if s.end > r.num_documents:
            raise ShardError(f"lease reads documents [{s.start}, {s.end}) of {s.shard}, which has {r.num_documents}")
        docs.extend((r, i) for i in range(s.start, s.end))
    lengths = np.array([len(r.document(i)) for r, i in docs], dtype=np.int64)
    bins = pack_lease(lengths, lease.seq_len, lease.sequences)
    if len(bins) != lease.sequences or bin_tokens(bins) != lease.tokens:
        raise ShardError(f"the lease's documents pack into {len(bins)} sequences of {bin_tokens(bins)} tokens, not "
                         f"{lease.sequences} of {lease.tokens}: the shards differ from the coordinator's")
    with_mask = any(r.has_mask for r, _ in docs)

    def tokens_of(d: int) -> np.ndarray:
        r, i = docs[d]
        return np.asarray(r.document(i), dtype=np.int64)

    def mask_of(d: int) -> np.ndarray:
        r, i = docs[d]
        m = r.document_mask(i)
        return np.ones(len(r.document(i)), dtype=np.uint8) if m is None else np.asarray(m)

    seqs = [build_sequence(b, tokens_of, lease.seq_len, pad_id, loss_mask_of=mask_of if with_mask else None)
            for b in bins]
    return seqs, [sum(c.length for c in b) for b in bins]
