"""Training data for the reference trainer until data_shards' loader takes over.

Two sources, both *stateless*: sequence `i` of step `s` is a pure function of
(seed, split, s, i). That makes resumption exact (the loader's state is the step number)
and lets a distributed run give rank r the global indices it owns and still see exactly
the batch a single process would.

* `synthetic`: packed documents of arithmetic progressions, `BOS, a, a+d, a+2d, ...`
  (mod the vocabulary). A model can only predict them by inferring d from context, so the
  loss falls visibly within a few hundred steps and a trained model continues a prompt
  like `BOS 10 13 16` with `19 22 25`: a built-in check that training works end to end.
* `tokens`: a flat little-endian uint16/uint32 file of token ids (e.g. `np.tofile`),
  sampled in random windows; the last `eval_fraction` of the file is held out. With
  `doc_sep_id`, attention and positions restart after each separator token.

* `shards`: packed sequences from data_shards' mixture loader (`ShardData` below): stateful,
  with its position saved in every checkpoint.

A batch is (input_ids, labels, doc_ids), each (B, T) int64. labels are -100 where no loss
is taken: at the last position of each document (the next token belongs to another one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_shards.loader import seeded_rng

IGNORE = -100
BOS, FIRST_CONTENT = 1, 2  # token 0 is left for padding


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, IGNORE where no loss
    doc_ids: torch.Tensor  # (B, T) int64, document index inside each row

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE).sum())


def _to_batch(rows: list[np.ndarray], docs: list[np.ndarray]) -> Batch:
    """rows: token arrays of length T+1; docs: document id per token (T+1)."""
    x = torch.from_numpy(np.stack(rows)).long()  # (B, T+1)
    d = torch.from_numpy(np.stack(docs)).long()  # (B, T+1)
    labels = x[:, 1:].clone()
    labels[d[:, 1:] != d[:, :-1]] = IGNORE  # never predict across a document boundary
    return Batch(x[:, :-1].contiguous(), labels, d[:, :-1].contiguous())


class SyntheticSource:
    def __init__(self, vocab_size: int, seq_len: int, seed: int, min_doc: int = 8, max_doc: int = 64):
        if vocab_size < 16:
            raise ValueError(f"the synthetic source needs vocab_size >= 16, got {vocab_size}")
        self.vocab, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.min_doc, self.max_doc = min_doc, max_doc
        self.modulus = vocab_size - FIRST_CONTENT

    def progression(self, start: int, step: int, length: int) -> list[int]:
        """BOS followed by `length` terms of start, start+step, ... (mod the content vocabulary)."""
        return [BOS] + [FIRST_CONTENT + (start + k * step) % self.modulus for k in range(length)]

    def _row(self, split: str, step: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = seeded_rng(self.seed, "synthetic", split, step, index)
        toks: list[int] = []
        docs: list[int] = []
        doc = 0
        while len(toks) < self.seq_len + 1:
            n = int(rng.integers(self.min_doc, self.max_doc + 1))
            terms = self.progression(int(rng.integers(0, self.modulus)), int(rng.integers(1, 8)), n)
            toks += terms
            docs += [doc] * len(terms)
            doc += 1
        return np.array(toks[: self.seq_len + 1]), np.array(docs[: self.seq_len + 1])

    def batch(self, split: str, step: int, indices: range) -> Batch:
        rows, docs = zip(*(self._row(split, step, i) for i in indices), strict=True)
        return _to_batch(list(rows), list(docs))


class TokenFileSource:
    def __init__(self, path: str | Path, dtype: str, seq_len: int, seed: int,
                 eval_fraction: float, doc_sep_id: int | None, vocab_size: int):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"data.path {path} does not exist: write token ids with "
                                    "numpy's tofile() or use data.source: synthetic")
        if dtype not in ("uint16", "uint32"):
            raise ValueError(f"data.dtype must be uint16 or uint32, got {dtype!r}")
        self.tokens = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
        n = len(self.tokens)
        n_eval = int(n * eval_fraction)
        if n - n_eval < seq_len + 1 or (eval_fraction > 0 and n_eval < seq_len + 1):
            raise ValueError(f"{path} holds {n} tokens: too few for seq_len={seq_len} with "
                             f"eval_fraction={eval_fraction}; add data or shorten data.seq_len")
        top = int(self.tokens.max())  # one pass over the file, once, to catch a wrong dtype early
        if top >= vocab_size:
            raise ValueError(f"{path} contains token id {top} >= model vocab_size {vocab_size}: "
                             "wrong data.dtype, or a tokenizer that does not match the model")
        self.ranges = {"train": (0, n - n_eval), "eval": (n - n_eval, n)}
        self.seq_len, self.seed, self.sep = seq_len, seed, doc_sep_id

    def batch(self, split: str, step: int, indices: range) -> Batch:
        lo, hi = self.ranges[split]
        rows, docs = [], []
        for i in indices:
            start = int(seeded_rng(self.seed, "tokens", split, step, i).integers(lo, hi - self.seq_len))
            row = np.asarray(self.tokens[start: start + self.seq_len + 1], dtype=np.int64)
            rows.append(row)
            if self.sep is None:
                docs.append(np.zeros_like(row))
            else:  # a new document begins after each separator
                docs.append(np.concatenate([[0], np.cumsum(row[:-1] == self.sep)]))
        return _to_batch(rows, docs)


def rank_share(count: int, rank: int, world: int) -> range:
    """The contiguous block of `count` global micro-batches that process `rank` of `world` computes."""
    per = count // world
    return range(rank * per, (rank + 1) * per)


class StatelessData:
    """synthetic / tokens sources: the batch of a step is a function of the step number.

    Under torchrun, process `rank` builds only its contiguous share of each step's global
    micro-batches, so N processes see exactly the sequences one process would."""

    def __init__(self, source: SyntheticSource | TokenFileSource, rank: int = 0, world: int = 1):
        self.source, self.rank, self.world = source, rank, world

    def micro_batches(self, split: str, step: int, count: int, micro: int) -> list[Batch]:
        """This process's share of the step's `count` global micro-batches of `micro` sequences."""
        return [self.source.batch(split, step, range(i * micro, (i + 1) * micro))
                for i in rank_share(count, self.rank, self.world)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @property
    def tokenizer_dir(self) -> Path | None:
        return None


class ShardData:
    """data_shards' MixtureLoader behind the trainer's interface; eval reads a fixed set of batches."""

    def __init__(self, mixture: list[dict], eval_mixture: list[dict] | None, seq_len: int, seed: int,
                 vocab_size: int, verify: bool, model_tokenizer: Path | None = None, rank: int = 0, world: int = 1):
        """model_tokenizer: the tokenizer directory of the checkpoint training starts from, if it has one;
        shards made with any other tokenizer are refused. rank/world: every process walks the same
        global stream and materialises its contiguous slice of each batch (MixtureLoader)."""
        from data_shards.loader import MixtureLoader, specs_from_config
        from data_shards.tokenizer import file_sha256

        self.specs = specs_from_config(mixture)
        self.eval_specs = specs_from_config(eval_mixture) if eval_mixture else None
        self.seq_len, self.seed, self.verify, self.rank, self.world = seq_len, seed, verify, rank, world
        self.tokenizer_sha256 = None
        if model_tokenizer is not None and (model_tokenizer / "tokenizer.model").exists():
            self.tokenizer_sha256 = file_sha256(model_tokenizer / "tokenizer.model")
        self.train = MixtureLoader(self.specs, seq_len, seed, verify=verify, tokenizer_sha256=self.tokenizer_sha256,
                                   rank=rank, world_size=world)
        if self.train.vocab_size > vocab_size:
            raise ValueError(f"the shards use a {self.train.vocab_size}-piece tokenizer but the model's vocab_size is "
                             f"{vocab_size}: set model.vocab_size >= {self.train.vocab_size}")

    def micro_batches(self, split: str, step: int, count: int, micro: int) -> list[Batch]:
        from data_shards.loader import MixtureLoader

        if split == "train":
            loader = self.train
        else:  # a fresh loader each time: every evaluation sees the same sequences
            if self.eval_specs is None:
                raise ValueError("evaluation needs data.eval_mixture (held-out shard directories) "
                                 "or train.eval_every: 0")
            same_tokenizer = self.tokenizer_sha256 or self.train.sources[0].manifest.tokenizer_sha256
            loader = MixtureLoader(self.eval_specs, self.seq_len, self.seed, verify=self.verify,
                                   tokenizer_sha256=same_tokenizer, rank=self.rank, world_size=self.world)
        b = loader.next_batch(count * micro)  # this process's slice: count / world micro-batches
        return [Batch(b.input_ids[i * micro:(i + 1) * micro], b.labels[i * micro:(i + 1) * micro],
                      b.doc_ids[i * micro:(i + 1) * micro]) for i in range(count // self.world)]

    def state_dict(self) -> dict:
        return self.train.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.train.load_state_dict(state)

    @property
    def tokenizer_dir(self) -> Path | None:
        tok = Path(self.specs[0].path) / "tokenizer"
        return tok if tok.is_dir() else None
