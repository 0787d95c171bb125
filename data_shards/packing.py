"""Best-fit-decreasing packing of documents into fixed-length training sequences.

Why not concatenate-and-chunk? Streaming every document end to end and cutting every L tokens
splits almost every document that straddles a cut, so the model often sees a document's middle
without its beginning. Best-fit packing ("Fewer Truncations Improve Language Modeling", Ding et
al. 2024; Tanuki used best-fit packing too) cuts only documents longer than L and otherwise
keeps each document whole, at a fill rate close to concatenation's 100%.

Algorithm (best-fit decreasing, BFD):
    1. `split_long`: every document becomes chunks of at most L tokens (a document of n > L
       tokens is cut every L tokens; the last chunk holds the remainder).
    2. `best_fit_decreasing`: take the chunks longest first; put each into the open sequence
       ("bin") whose remaining space is the smallest that still fits, or open a new bin.
Ties are broken deterministically: items by (length desc, doc, start), bins by lowest index.
Finding the best bin is a search over *remaining capacities* (integers 0..L), never over bins:
a bitmask of the capacities some open bin has gives the smallest one >= need, and a heap per
capacity its lowest-index bin (see _assign_bins), so the cost does not grow with the number of
bins as an O(n * bins) scan would. pack() takes about 2 s per million documents at L = 2048.

`build_sequence` turns one bin into model inputs for the packed-sequence support of
model.transformer: `doc_ids` keep attention inside each chunk, `position_ids` restart at 0.

    >>> bins = pack([5, 3, 9, 2], seq_len=8)     # document lengths in tokens
    >>> [[(c.doc, c.start, c.end) for c in b] for b in bins]
    [[(2, 0, 8)], [(0, 0, 5), (1, 0, 3)], [(3, 0, 2), (2, 8, 9)]]
"""

from __future__ import annotations

import contextlib
import gc
import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

IGNORE = -100  # label for "no loss here"; the same value as model.data.IGNORE and torch's cross_entropy default


@dataclass(frozen=True, slots=True)
class Chunk:
    """Tokens [start, end) of document `doc` (an index into the lengths given to split_long)."""

    doc: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int | np.integer) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer (tokens per sequence), got {seq_len!r}")


def _lengths_array(lengths: Sequence[int]) -> np.ndarray:
    """Document lengths as (n,) int64, rejecting negative ones."""
    arr = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if arr.size and arr.min() < 0:
        bad = int(np.argmin(arr))
        raise ValueError(f"document {bad} has negative length {int(arr[bad])}: lengths are token counts >= 0")
    return arr


def _split_arrays(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc, start, end), each (n_chunks,) int64, in document order. Empty documents give no chunk."""
    per_doc = -(-lengths // seq_len)  # ceil(n / L) chunks per document; 0 for an empty one
    docs = np.repeat(np.arange(len(lengths), dtype=np.int64), per_doc)
    first = np.cumsum(per_doc) - per_doc  # index of each document's first chunk
    starts = (np.arange(len(docs), dtype=np.int64) - np.repeat(first, per_doc)) * seq_len
    ends = np.minimum(starts + seq_len, lengths[docs])
    return docs, starts, ends


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector while building many small acyclic objects.

    Allocating a million Chunks otherwise triggers repeated full collections that walk every live
    object: about 40% of pack()'s time for 10^6 documents. Reference counting still frees memory.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def split_long(lengths: Sequence[int], seq_len: int) -> list[Chunk]:
    """Every document as chunks of at most seq_len tokens, in document order.

    lengths: tokens per document (document i is `lengths[i]`). A document longer than seq_len
    is cut every seq_len tokens; an empty document yields no chunk (it has nothing to lose).
    """
    _check_seq_len(seq_len)
    docs, starts, ends = _split_arrays(_lengths_array(lengths), seq_len)
    with _gc_paused():
        return [Chunk(*c) for c in zip(docs.tolist(), starts.tolist(), ends.tolist(), strict=True)]


def _assign_bins(needs: list[int], seq_len: int) -> tuple[np.ndarray, int]:
    """Best fit for items already in packing order: (bin index per item (n,) int64, number of bins).

    The open bins are indexed by remaining capacity, never scanned: bit c of `free` is set while
    some bin has exactly c tokens of room, and `bins_with[c]` is a min-heap of those bins' indices.
    The smallest capacity >= need is the lowest set bit of `free >> need`: a few big-integer
    operations on L + 1 bits, done in C over L/64 machine words (32 at L = 2048) whatever the
    number of bins, so the loop costs O(n (log n + L/64)). A 64-ary tree of bit words would make
    that O(n log L), but its Python-level climbing measured 2.7x slower at L = 2048 and only wins
    beyond L of about 32k.
    """
    free = 0
    bins_with: list[list[int]] = [[] for _ in range(seq_len + 1)]
    pop, push = heapq.heappop, heapq.heappush  # local names: this loop runs once per chunk
    bin_of: list[int] = []
    n_bins = 0
    for need in needs:
        fits = free >> need  # bit k set: some bin has need + k tokens of room
        if fits:
            cap = need + (fits & -fits).bit_length() - 1  # fits & -fits isolates the lowest set bit
            heap = bins_with[cap]
            b = pop(heap)  # lowest index among the bins with exactly this much room
            if not heap:
                free ^= 1 << cap
        else:  # no open bin fits: open a new one
            b, cap = n_bins, seq_len
            n_bins += 1
        left = cap - need
        if left:  # a full bin can never take another item, so it is not tracked
            heap = bins_with[left]
            if not heap:
                free |= 1 << left
            push(heap, b)
        bin_of.append(b)
    return np.array(bin_of, dtype=np.int64), n_bins


def _packing_order(docs: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Permutation putting items in (length desc, doc, start) order."""
    return np.lexsort((starts, docs, -lengths))


def _best_fit(docs: np.ndarray, starts: np.ndarray, ends: np.ndarray, seq_len: int) -> tuple[np.ndarray, list[int]]:
    """BFD on chunks given as (n,) arrays.

    Returns (members, bounds): `members` (n,) lists the chunk indices bin by bin (bins in creation
    order, chunks in insertion order); bin b is members[bounds[b-1]:bounds[b]] (bounds[-1] = 0).
    """
    if not len(docs):
        return np.empty(0, dtype=np.int64), []
    order = _packing_order(docs, starts, ends - starts)
    bin_of, n_bins = _assign_bins((ends - starts)[order].tolist(), seq_len)
    members = order[np.argsort(bin_of, kind="stable")]  # stable: insertion order inside each bin
    return members, np.cumsum(np.bincount(bin_of, minlength=n_bins)).tolist()


def _group(items: list, bounds: list[int]) -> list[list]:
    """Cut a flat list into consecutive bins ending at `bounds`."""
    return [items[lo:hi] for lo, hi in zip([0, *bounds][:-1], bounds, strict=True)]


def best_fit_decreasing(chunks: Sequence[Chunk], seq_len: int) -> list[list[Chunk]]:
    """Best-fit-decreasing bin packing of chunks into bins of capacity seq_len tokens.

    Items are placed in (length desc, doc, start) order, each into the bin with the least room
    that still fits it (lowest bin index among equals), else into a new bin. Returns the bins in
    creation order, each bin's chunks in insertion order. Every chunk must be 1..seq_len long.
    """
    _check_seq_len(seq_len)
    n = len(chunks)
    docs = np.fromiter((c.doc for c in chunks), dtype=np.int64, count=n)
    starts = np.fromiter((c.start for c in chunks), dtype=np.int64, count=n)
    ends = np.fromiter((c.end for c in chunks), dtype=np.int64, count=n)
    lengths = ends - starts
    if n and (lengths.min() < 1 or lengths.max() > seq_len):
        bad = int(np.argmin(lengths)) if lengths.min() < 1 else int(np.argmax(lengths))
        raise ValueError(f"chunk {chunks[bad]} has length {int(lengths[bad])}; chunks must hold 1..{seq_len} "
                         "tokens: cut documents with split_long first")
    members, bounds = _best_fit(docs, starts, ends, seq_len)
    return _group([chunks[i] for i in members.tolist()], bounds)


def pack(lengths: Sequence[int], seq_len: int) -> list[list[Chunk]]:
    """split_long then best_fit_decreasing: document lengths (tokens) -> bins of chunks.

    The same result as `best_fit_decreasing(split_long(lengths, seq_len), seq_len)`, but each Chunk
    is built once, straight into its bin (Chunk objects dominate the cost for millions of documents).
    """
    _check_seq_len(seq_len)
    docs, starts, ends = _split_arrays(_lengths_array(lengths), seq_len)
    members, bounds = _best_fit(docs, starts, ends, seq_len)
    with _gc_paused():
        cols = (docs[members].tolist(), starts[members].tolist(), ends[members].tolist())
        flat = [Chunk(*c) for c in zip(*cols, strict=True)]
        return _group(flat, bounds)


@dataclass
class PackedSequence:
    """One training sequence, every field (seq_len,) int64. See build_sequence."""

    input_ids: np.ndarray  # token ids, pad_id after the last chunk
    labels: np.ndarray  # next token of the same document; IGNORE at its last token, padding, masked targets
    position_ids: np.ndarray  # 0, 1, 2, ... restarting at every chunk (and for the padding)
    doc_ids: np.ndarray  # 0, 1, 2, ... per chunk; padding gets len(bin), so it never attends to real tokens


def build_sequence(
    bin: Sequence[Chunk],
    tokens_of: Callable[[int], np.ndarray],
    seq_len: int,
    pad_id: int = 0,
    loss_mask_of: Callable[[int], np.ndarray] | None = None,
) -> PackedSequence:
    """Materialise one bin as model inputs.

    tokens_of(doc): that document's full token array (not just the chunk: a chunk cut from a long
    document still predicts the document's next token at its last position, as a window would).
    loss_mask_of(doc): optional 0/1 array of the same length; target token t gets a label only where
    mask[t] == 1 (chat: assistant turns only). Feed the model `input_ids`, `doc_ids` and
    `position_ids`, each with a leading batch dimension.
    """
    _check_seq_len(seq_len)
    used = sum(c.length for c in bin)
    if used > seq_len:
        raise ValueError(f"bin holds {used} tokens but seq_len is {seq_len}: pack with the same seq_len")
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    position_ids = np.empty(seq_len, dtype=np.int64)
    doc_ids = np.empty(seq_len, dtype=np.int64)
    pos = 0
    for k, c in enumerate(bin):
        toks = np.asarray(tokens_of(c.doc))
        if not 0 <= c.start < c.end <= len(toks):
            raise ValueError(f"{c} does not fit document {c.doc} of {len(toks)} tokens: "
                             "tokens_of must return the documents whose lengths were packed")
        n = c.length
        input_ids[pos: pos + n] = toks[c.start: c.end]
        targets = toks[c.start + 1: c.end + 1].astype(np.int64)  # n targets, n - 1 at the document's end
        if loss_mask_of is not None:
            mask = np.asarray(loss_mask_of(c.doc))
            if mask.shape != toks.shape or not np.isin(mask, (0, 1)).all():
                raise ValueError(f"loss mask of document {c.doc} (shape {mask.shape}) is not one 0/1 value per token "
                                 f"(tokens {toks.shape}): fix loss_mask_of")
            targets[mask[c.start + 1: c.end + 1] != 1] = IGNORE
        labels[pos: pos + len(targets)] = targets
        position_ids[pos: pos + n] = np.arange(n)
        doc_ids[pos: pos + n] = k
        pos += n
    position_ids[pos:] = np.arange(seq_len - pos)
    doc_ids[pos:] = len(bin)
    return PackedSequence(input_ids, labels, position_ids, doc_ids)


def concat_chunk(lengths: Sequence[int], seq_len: int) -> int:
    """How many documents naive concatenate-and-chunk splits across two or more sequences.

    Documents are streamed end to end in the given order and the stream is cut every seq_len tokens.
    """
    _check_seq_len(seq_len)
    arr = _lengths_array(lengths)
    ends = np.cumsum(arr)  # exclusive end offset of each document in the stream
    starts = ends - arr
    real = arr > 0
    return int(np.count_nonzero(real & (starts // seq_len != (ends - 1) // seq_len)))


def packing_stats(lengths: Sequence[int], seq_len: int) -> dict:
    """Packing quality of a corpus with best fit, next to concatenate-and-chunk.

    Returns {"documents", "tokens", "sequences", "fill_rate" (real tokens / (sequences * seq_len),
    0.0 for an empty corpus), "split_documents" (documents best fit cuts: those longer than seq_len),
    "concat_split_documents" (see concat_chunk)}.
    """
    _check_seq_len(seq_len)
    arr = _lengths_array(lengths)
    docs, starts, ends = _split_arrays(arr, seq_len)
    n_bins = len(_best_fit(docs, starts, ends, seq_len)[1])  # only the count is needed: no Chunk objects
    tokens = int(arr.sum())
    return {
        "documents": len(arr),
        "tokens": tokens,
        "sequences": n_bins,
        "fill_rate": tokens / (n_bins * seq_len) if n_bins else 0.0,
        "split_documents": int(np.count_nonzero(arr > seq_len)),
        "concat_split_documents": concat_chunk(arr, seq_len),
    }
