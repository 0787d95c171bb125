"""Batches of packed sequences from several shard directories, mixed by weight.

    loader = MixtureLoader([SourceSpec("shards/ja", 0.6), SourceSpec("shards/en", 0.3),
                            SourceSpec("shards/synthetic", 0.1)], seq_len=2048, seed=0)
    batch = loader.next_batch(global_batch=64)        # this rank's slice of the global batch
    state = loader.state_dict(); ...; loader.load_state_dict(state)   # exact resumption

Each source is an endless stream of packed sequences: every epoch visits its documents in a
seeded random order, in blocks of `block_docs` documents, and each block is packed with best-fit
decreasing (data_shards/packing.py). Which source fills each slot of the global stream is decided
by smooth weighted round-robin: deterministic, exactly proportional over any window, and its
whole state is one number per source. No randomness depends on the rank or the world size: every
rank walks the same global stream and materialises only its own slice of each batch, so N
processes see exactly the batch one process would.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .packing import Chunk, build_sequence, pack
from .shards import Manifest, ShardError, ShardReader


@dataclass(frozen=True)
class SourceSpec:
    path: str
    weight: float
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"source {self.path}: weight must be > 0, got {self.weight}")


@dataclass
class LoaderBatch:
    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, IGNORE where no loss
    doc_ids: torch.Tensor  # (B, T) int64: attention never crosses a document; positions restart

    @property
    def num_targets(self) -> int:
        return int((self.labels != -100).sum())


def seeded_rng(*key: object) -> np.random.Generator:
    """A generator seeded by the key's hash: an independent, reproducible stream per key."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class ShardSource:
    """One shard directory as an endless, resumable stream of packed sequences (as chunk lists)."""

    def __init__(self, spec: SourceSpec, seq_len: int, seed: int, *, tokenizer_sha256: str | None = None,
                 verify: bool = False, block_docs: int = 4096):
        self.name = spec.name or Path(spec.path).name
        self.manifest = Manifest.load(spec.path)
        if tokenizer_sha256 is not None:
            self.manifest.check_tokenizer(tokenizer_sha256, spec.path)
        if not self.manifest.shards:
            raise ShardError(f"{spec.path} has no shards: nothing to train on")
        self.readers = [ShardReader(Path(spec.path) / s.file, expected_sha256=s.sha256 if verify else None)
                        for s in self.manifest.shards]
        self.lengths = np.concatenate([r.lengths() for r in self.readers])  # tokens per document
        counts = np.array([r.num_documents for r in self.readers])
        self.first_doc = np.concatenate([[0], np.cumsum(counts)])  # global doc index of each shard's first doc
        self.seq_len, self.seed, self.block_docs = seq_len, seed, block_docs
        self.epoch, self.block, self.position = 0, 0, 0
        self._bins: list[list[Chunk]] | None = None
        self._order: np.ndarray | None = None

    @property
    def num_documents(self) -> int:
        return len(self.lengths)

    def _load_block(self) -> None:
        if self._order is None:
            self._order = seeded_rng(self.seed, self.name, "epoch", self.epoch).permutation(self.num_documents)
        docs = self._order[self.block * self.block_docs: (self.block + 1) * self.block_docs]
        bins = pack(self.lengths[docs].tolist(), self.seq_len)
        # pack() numbers documents within the block; map them back to global document indices
        self._bins = [[Chunk(int(docs[c.doc]), c.start, c.end) for c in b] for b in bins]

    def next_bin(self) -> list[Chunk]:
        if self._bins is None:
            self._load_block()
        assert self._bins is not None
        b = self._bins[self.position]
        self.position += 1
        if self.position == len(self._bins):  # block exhausted: next block, or next epoch
            self.position, self._bins = 0, None
            self.block += 1
            if self.block * self.block_docs >= self.num_documents:
                self.block, self.epoch, self._order = 0, self.epoch + 1, None
        return b

    def tokens_of(self, doc: int) -> np.ndarray:
        s = int(np.searchsorted(self.first_doc, doc, side="right")) - 1
        return np.asarray(self.readers[s].document(doc - int(self.first_doc[s])), dtype=np.int64)

    def mask_of(self, doc: int) -> np.ndarray | None:
        s = int(np.searchsorted(self.first_doc, doc, side="right")) - 1
        m = self.readers[s].document_mask(doc - int(self.first_doc[s]))
        return None if m is None else np.asarray(m)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "block": self.block, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.block, self.position = state["epoch"], state["block"], state["position"]
        self._bins, self._order = None, None


class MixtureLoader:
    """Deterministic weighted mixture of shard sources, split by rank; see the module docstring."""

    def __init__(self, sources: list[SourceSpec], seq_len: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 pad_id: int = 0, tokenizer_sha256: str | None = None, verify: bool = False,
                 block_docs: int = 4096):
        if not sources:
            raise ValueError("a mixture needs at least one source (path and weight)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        names = [s.name or Path(s.path).name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"two mixture sources share the name(s) {names}: give each a distinct `name`")
        self.sources = [ShardSource(s, seq_len, seed, tokenizer_sha256=tokenizer_sha256, verify=verify,
                                    block_docs=block_docs) for s in sources]
        self.weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.weights /= self.weights.sum()
        self.current = np.zeros(len(sources))  # smooth weighted round-robin credit
        self.seq_len, self.rank, self.world_size, self.pad_id = seq_len, rank, world_size, pad_id
        self.sequences = 0  # sequences of the global stream consumed so far
        vocab = {s.manifest.vocab_size for s in self.sources}
        toks = {s.manifest.tokenizer_sha256 for s in self.sources}
        if len(toks) > 1:
            raise ShardError("the mixture's sources were tokenized with different tokenizers "
                             f"({', '.join(t[:12] for t in sorted(toks))}): re-shard them with one tokenizer")
        self.vocab_size = max(vocab)

    def _pick(self) -> int:
        self.current += self.weights
        i = int(np.argmax(self.current))  # ties -> lowest index: deterministic
        self.current[i] -= 1.0
        return i

    def next_batch(self, global_batch: int) -> LoaderBatch:
        """The next `global_batch` sequences of the global stream; this rank materialises its slice."""
        if global_batch % self.world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {self.world_size}")
        per_rank = global_batch // self.world_size
        mine = range(self.rank * per_rank, (self.rank + 1) * per_rank)
        rows = []
        for i in range(global_batch):
            src = self.sources[self._pick()]
            b = src.next_bin()  # every rank advances every stream: same state everywhere
            if i in mine:
                rows.append(build_sequence(b, src.tokens_of, self.seq_len, self.pad_id, loss_mask_of=src.mask_of
                                           if any(r.has_mask for r in src.readers) else None))
        self.sequences += global_batch
        stack = lambda name: torch.from_numpy(np.stack([getattr(r, name) for r in rows])).long()  # noqa: E731
        return LoaderBatch(stack("input_ids"), stack("labels"), stack("doc_ids"))

    def state_dict(self) -> dict[str, Any]:
        return {"sequences": self.sequences, "credit": self.current.tolist(),
                "sources": {s.name: s.state_dict() for s in self.sources}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {s.name for s in self.sources} - set(state["sources"])
        if missing:
            raise ValueError(f"loader state has no position for source(s) {sorted(missing)}: the mixture changed; "
                             "start a new run directory")
        self.sequences = state["sequences"]
        self.current = np.array(state["credit"], dtype=np.float64)
        for s in self.sources:
            s.load_state_dict(state["sources"][s.name])


def specs_from_config(items: list[dict[str, Any]], base: str | os.PathLike = ".") -> list[SourceSpec]:
    """`[{path: ..., weight: ...}, ...]` from a config file into SourceSpecs (relative paths from `base`)."""
    specs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) - {"path", "weight", "name"} or "path" not in item:
            raise ValueError(f"data.mixture[{i}] must be a mapping with path, weight and optional name; got {item!r}")
        path = Path(base, item["path"]) if not Path(item["path"]).is_absolute() else Path(item["path"])
        specs.append(SourceSpec(str(path), float(item.get("weight", 1.0)), item.get("name")))
    return specs
