"""DPO's data: preference pairs from the coordinator's `STATE_DIR/synthetic/dpo.jsonl`, as padded batches.

    data = PreferenceData("state/synthetic/dpo.jsonl", "tok/", seq_len=512, seed=0, eval_fraction=0.05)
    pairs = data.micro_batches("train", step=0, count=4, micro=2)   # this process's share of the step
    pairs[0].input_ids      # (2B, T): the B chosen sequences, then the B rejected ones
    pairs[0].completion     # (2B, T): 1 on the final answer's tokens (and its <|end|>), 0 elsewhere

A record is `{"prompt": [messages...], "chosen": str, "rejected": str, ...}` (data_shards.synthetic.dpo_record).
Each side renders as the chat `prompt + [{"role": "assistant", "content": answer}]` with data_shards/chat.py,
so the ids are exactly those SFT trained on; only the final answer is the completion (an earlier assistant
turn of a multi-turn prompt is context). Rows are right-padded with id 0 (the model never attends forward,
so padding changes no earlier logit) and a pad position is never a completion token.

The order is stateless, as the trainer's other sources: step s of epoch e reads the pairs at positions
[s·B mod n ...] of a permutation seeded by (seed, e), so resuming needs no data state and N processes
read exactly what one process reads. The held-out split is a fixed share chosen by each pair's index.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_shards.chat import render_chat
from data_shards.loader import seeded_rng

from .data import rank_share

log = logging.getLogger(__name__)
PAD = 0


@dataclass
class PairBatch:
    input_ids: torch.Tensor   # (2B, T) int64: chosen rows, then rejected rows
    completion: torch.Tensor  # (2B, T) int64: 1 on the answer's tokens
    tokens: int               # real (unpadded) tokens in the batch

    @property
    def pairs(self) -> int:
        return self.input_ids.shape[0] // 2


def render_pair(record: dict, tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(chosen ids, chosen completion mask, rejected ids, rejected mask), or None when a side exceeds seq_len.
    Raises ValueError for a record that is not a preference pair."""
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("chosen", "rejected")) \
            or not isinstance(record.get("prompt"), list):
        raise ValueError('expected {"prompt": [{"role": "user", "content": ...}], "chosen": str, "rejected": str}')
    out = []
    for side in ("chosen", "rejected"):
        messages = [*record["prompt"], {"role": "assistant", "content": record[side]}]
        ids, mask = render_chat({"messages": messages}, tokenizer.encode, tokenizer.marker_ids,
                                tokenizer.bos_id if tokenizer.bos_id >= 0 else None,
                                tokenizer.eos_id if tokenizer.eos_id >= 0 else None)
        if len(ids) > seq_len:
            return None
        last = int(np.flatnonzero(ids == tokenizer.marker_ids["assistant"])[-1])
        mask = mask.astype(np.int64)
        mask[:last] = 0  # earlier assistant turns are the prompt's
        out += [ids, mask]
    return tuple(out)


class PreferenceData:
    """Preference pairs behind the trainer's data interface (micro_batches, state_dict, tokenizer_dir)."""

    def __init__(self, path: str | Path, tokenizer_dir: str | Path, seq_len: int, seed: int, eval_fraction: float,
                 vocab_size: int, rank: int = 0, world: int = 1):
        from data_shards.tokenizer import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data.path {path} does not exist: point it at the coordinator's "
                                    "STATE_DIR/synthetic/dpo.jsonl (pairs the judge chose)")
        self.tok = Tokenizer(tokenizer_dir)
        if self.tok.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer in {tokenizer_dir} has {self.tok.vocab_size} pieces but the model's "
                             f"vocab_size is {vocab_size}: use the tokenizer the model was trained with")
        self.pairs: list[tuple[np.ndarray, ...]] = []
        too_long = 0
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    pair = render_pair(json.loads(line), self.tok, seq_len)
                except ValueError as e:  # json.JSONDecodeError is a ValueError
                    raise ValueError(f"{path}:{n}: not a preference pair: {e}") from None
                if pair is None:
                    too_long += 1
                else:
                    self.pairs.append(pair)
        if too_long:
            log.warning("%d of %d pairs are longer than data.seq_len=%d and were left out", too_long,
                        too_long + len(self.pairs), seq_len)
        n_eval = int(len(self.pairs) * eval_fraction)
        held = set(np.random.default_rng(seed).permutation(len(self.pairs))[:n_eval].tolist())
        self.split = {"eval": [i for i in range(len(self.pairs)) if i in held],
                      "train": [i for i in range(len(self.pairs)) if i not in held]}
        if not self.split["train"] or (eval_fraction > 0 and not self.split["eval"]):
            raise ValueError(f"{path} holds {len(self.pairs)} usable pairs: too few for eval_fraction={eval_fraction}"
                             f"{f' (and {too_long} too long for data.seq_len={seq_len})' if too_long else ''}")
        self.seed, self.rank, self.world, self.directory = seed, rank, world, Path(tokenizer_dir)

    def _order(self, split: str, epoch: int) -> list[int]:
        idx = self.split[split]
        return [idx[i] for i in seeded_rng(self.seed, "dpo", split, epoch).permutation(len(idx))]

    def _batch(self, split: str, positions: range) -> PairBatch:
        idx, rows = self.split[split], []
        for pos in positions:
            epoch, k = divmod(pos, len(idx))
            rows.append(self.pairs[self._order(split, epoch)[k]])
        T = max(len(r[0]) for r in rows) if rows else 1
        T = max(T, max(len(r[2]) for r in rows))
        ids = torch.full((2 * len(rows), T), PAD, dtype=torch.int64)
        comp = torch.zeros((2 * len(rows), T), dtype=torch.int64)
        for i, (c_ids, c_mask, r_ids, r_mask) in enumerate(rows):
            for row, (x, m) in ((i, (c_ids, c_mask)), (len(rows) + i, (r_ids, r_mask))):
                ids[row, :len(x)] = torch.from_numpy(x)
                comp[row, :len(m)] = torch.from_numpy(m)
        return PairBatch(ids, comp, sum(len(r[0]) + len(r[2]) for r in rows))

    def micro_batches(self, split: str, step: int, count: int, micro: int) -> list[PairBatch]:
        """This process's share of step `step`'s `count` global micro-batches of `micro` pairs each
        (eval: the same pairs at every step)."""
        base = step * count * micro if split == "train" else 0
        return [self._batch(split, range(base + i * micro, base + (i + 1) * micro))
                for i in rank_share(count, self.rank, self.world)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @property
    def tokenizer_dir(self) -> Path:
        return self.directory
