"""Exact and near-duplicate removal across all inputs, keeping the first occurrence in input order.

Exact: SHA-256 of the normalised text (its first 8 bytes as the key, confirmed by an equal MinHash signature).
Near: MinHash over character 5-gram shingles (characters, not words, because Japanese has no spaces; 5
characters is about two Japanese words or one English word), LSH banding to find candidates, and a check of
the estimated Jaccard similarity >= `threshold` before anything is dropped.

Why one-permutation hashing. The textbook signature takes, for each of 128 hash functions, the minimum of
(a*h + b) mod p over all shingles: 128 x 2,000 multiplications for a 2 KB English document, 6 ms with numpy's
64-bit arithmetic here, 3x short of the 2,000 documents/s target. One-permutation hashing (Li, Owen & Zhang
2012) hashes every shingle once with a 64-bit hash, splits the hash range into `num_perm` bins and keeps the
smallest hash of each bin: one sort per document. Two documents agree on a bin with probability equal to their
Jaccard similarity, as for classic MinHash. Empty bins (documents with fewer shingles than about 3x
`num_perm`) are filled by optimal densification (Shrivastava 2017): bin i copies the first non-empty bin of a
fixed pseudo-random sequence of bins, the same sequence for every document.

Memory per kept document, independent of its length: the signature (num_perm uint32 = 512 bytes) plus one
slot per band and one for the exact key in numpy open-addressing tables (12 bytes a slot, kept at most half
full): about 1.1 KB with the defaults, against ~2 KB with Python dicts. Texts are never stored. A band key
maps to the first document that had it only; a later document sharing that band with a different earlier one
is still found through its other bands.

Example:
    dedup = Deduplicator()
    kept = [t for t in texts if dedup.check(t) is None]   # reasons: "exact_duplicate", "near_duplicate"

Batches (the same results, a fixed number of numpy calls per batch): fingerprints in worker processes, the
decisions in one process, in input order:
    fps = dedup.fingerprints(batch, normalized=True)      # [(exact key, signature)], as fingerprint()
    reasons = dedup.check_fingerprints(fps)               # as check_fingerprint() called in order
    keys, sigs = dedup.fingerprint_arrays(batch)          # the same, as two arrays (what build's workers send)
    reasons = dedup.check_arrays(keys, sigs)
"""

from __future__ import annotations

import hashlib
import itertools

import numpy as np

from data_shards import filters
from data_shards.filters import normalize

SHINGLE_CHARS = 5
_DENSIFY_TRIES = 32
_MASK32 = np.uint64(0xFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 that spreads every input bit over the output."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class _Index:
    """uint64 key -> int32 value, open addressing with linear probing in two numpy arrays. Key 0 marks an empty
    slot, so callers pass odd keys. Grows (doubling, vectorised rehash) to stay at most half full."""

    def __init__(self, capacity: int = 1 << 12):
        self.keys = np.zeros(capacity, dtype=np.uint64)  # (capacity,) power of two
        self.vals = np.zeros(capacity, dtype=np.int32)
        self.size = 0

    def get(self, key: int) -> int:
        """The value stored for `key`, or -1."""
        keys, mask = self.keys, len(self.keys) - 1
        i = (key >> 1) & mask  # bit 0 is always 1
        while True:
            k = int(keys[i])
            if k == key:
                return int(self.vals[i])
            if k == 0:
                return -1
            i = (i + 1) & mask

    def get_many(self, keys: np.ndarray) -> np.ndarray:
        """(N,) int32: `get` of each of the (N,) uint64 keys, probing for all of them at once."""
        if filters._native is not None:
            out = np.empty(len(keys), dtype=np.int32)
            filters._native.index_get(self.keys, self.vals, np.ascontiguousarray(keys, dtype=np.uint64), out)
            return out
        mask = np.uint64(len(self.keys) - 1)
        slot = (keys >> np.uint64(1)) & mask
        out = np.full(len(keys), -1, dtype=np.int32)
        todo = np.arange(len(keys))
        while len(todo):
            k = self.keys[slot]
            hit = k == keys[todo]
            out[todo[hit]] = self.vals[slot[hit]]
            more = ~hit & (k != 0)
            todo, slot = todo[more], (slot[more] + np.uint64(1)) & mask
        return out

    def setdefault(self, key: int, value: int) -> None:
        """Stores `value` under `key` unless the key is already there (the first value wins)."""
        if 2 * (self.size + 1) > len(self.keys):
            self._grow()
        keys, mask = self.keys, len(self.keys) - 1
        i = (key >> 1) & mask  # bit 0 is always 1
        while True:
            k = int(keys[i])
            if k == key:
                return
            if k == 0:
                keys[i] = key
                self.vals[i] = value
                self.size += 1
                return
            i = (i + 1) & mask

    def setdefault_many(self, keys: np.ndarray, values: np.ndarray, found: np.ndarray | None = None) -> None:
        """`setdefault(k, v)` for each of the (N,) keys and values in order, vectorised: the same keys -> values,
        size and capacity afterwards (slots may differ: a probe run can be filled in another order).
        found: get_many(keys) >= 0, if the caller already knows it."""
        if not len(keys):
            return
        absent = np.flatnonzero(~found if found is not None else self.get_many(keys) < 0)
        _, first = np.unique(keys[absent], return_index=True)  # the first call for each new key wins
        new = absent[first]
        # setdefault grows before each call while 2 * (size + 1) > capacity; the size before the last call is
        # the largest, so that call alone sets the final capacity.
        size_before_last = self.size + len(new) - int(new.max() == len(keys) - 1 if len(new) else 0)
        while 2 * (size_before_last + 1) > len(self.keys):
            self._grow()
        self._place(keys[new], values[new])
        self.size += len(new)

    def _grow(self) -> None:
        used = self.keys != 0
        keys, vals = self.keys[used], self.vals[used]
        self.keys = np.zeros(2 * len(self.keys), dtype=np.uint64)
        self.vals = np.zeros(len(self.keys), dtype=np.int32)
        self._place(keys, vals)

    def _place(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Puts distinct keys, none of them in the table yet, into free slots (vectorised linear probing)."""
        if filters._native is not None:  # one at a time, in order
            filters._native.index_place(self.keys, self.vals, np.ascontiguousarray(keys, dtype=np.uint64),
                                        np.ascontiguousarray(vals, dtype=np.int32))
            return
        mask = np.uint64(len(self.keys) - 1)
        slot = (keys >> np.uint64(1)) & mask
        while len(keys):
            # Scatter every key whose slot is free into it: where several want one slot, one write lands
            # (numpy keeps one of them), the others see another key there and probe on (keys are distinct).
            free = self.keys[slot] == 0
            self.keys[slot[free]] = keys[free]
            won = free & (self.keys[slot] == keys)
            self.vals[slot[won]] = vals[won]
            rest = ~won
            keys, vals, slot = keys[rest], vals[rest], (slot[rest] + np.uint64(1)) & mask

    def nbytes(self) -> int:
        return self.keys.nbytes + self.vals.nbytes


class Deduplicator:
    """Remembers the documents it has kept; `check` says whether a new one duplicates any of them.

    num_perm: signature length (bins); bands: LSH bands, must divide num_perm (rows per band = num_perm/bands).
    With 128/16 (8 rows) a pair with Jaccard 0.8 becomes a candidate with probability 1-(1-0.8^8)^16 = 0.95,
    at 0.9 with 0.9999, at 0.5 with 0.06 (then rejected by the Jaccard check).
    threshold: estimated Jaccard similarity of shingle sets at or above which a candidate is a near duplicate.
    seed: fixes the hash functions; the same seed gives the same decisions in every process.
    """

    def __init__(self, num_perm: int = 128, bands: int = 16, threshold: float = 0.8, seed: int = 0):
        if num_perm < 2 or bands < 1 or num_perm % bands:
            raise ValueError(f"Deduplicator: bands ({bands}) must divide num_perm ({num_perm}), e.g. 128 and 16")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"Deduplicator: threshold must be in (0, 1], got {threshold}")
        self.num_perm, self.bands, self.rows, self.threshold = num_perm, bands, num_perm // bands, threshold
        rng = np.random.default_rng(seed)
        # Odd multipliers of the rolling shingle hash and of the band hash; a salt per band so that equal rows
        # in different bands give different keys.
        self._shingle_mult = rng.integers(1, 2**63, SHINGLE_CHARS, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._seed_salt = rng.integers(0, 2**63, dtype=np.uint64)
        self._row_mult = rng.integers(1, 2**63, self.rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._band_salt = rng.integers(0, 2**63, bands, dtype=np.uint64)
        self._densify = rng.integers(0, num_perm, (num_perm, _DENSIFY_TRIES))  # (K, T) candidate source bins
        # Bin b holds hashes h with floor((h >> 32) * K / 2^32) == b: bins are contiguous ranges of h, so after a
        # sort the first element at or above a bin's lower bound is that bin's minimum.
        lower = (np.arange(num_perm, dtype=np.uint64) * np.uint64(2**32) + np.uint64(num_perm - 1)) // np.uint64(
            num_perm)
        self._bin_lower = lower << np.uint64(32)  # (K,)
        self._sigs = np.zeros((1024, num_perm), dtype=np.uint32)  # (capacity, K), grows by doubling
        self._kept = 0
        self._exact = _Index()  # first 8 bytes of SHA-256 -> document
        self._band_index = _Index()  # band key -> first document with that band

    def __len__(self) -> int:
        """Documents kept so far."""
        return self._kept

    def signature(self, text: str) -> np.ndarray:
        """(num_perm,) uint32 MinHash signature of the normalised text's character 5-gram shingles."""
        compact = " ".join(text.split())  # whitespace runs count as one space
        cps = np.frombuffer(compact.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)  # (n,) code points
        with np.errstate(over="ignore"):
            if len(cps) < SHINGLE_CHARS:
                h = np.array([(cps * self._shingle_mult[: len(cps)]).sum()], dtype=np.uint64)
            else:
                m = len(cps) - SHINGLE_CHARS + 1
                h = cps[:m] * self._shingle_mult[0]
                for j in range(1, SHINGLE_CHARS):
                    h += cps[j: j + m] * self._shingle_mult[j]  # (m,) one hash per shingle
            h = np.sort(_mix64(h ^ self._seed_salt))
        start = np.searchsorted(h, self._bin_lower)  # (K,) index of each bin's smallest hash
        end = np.append(start[1:], len(h))
        filled = start < end
        sig = np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint32)
        sig[filled] = (h[start[filled]] & _MASK32).astype(np.uint32)
        empty = np.flatnonzero(~filled)
        if len(empty) and filled.any():
            cand = self._densify[empty]  # (E, T)
            ok = filled[cand]
            src = cand[np.arange(len(empty)), ok.argmax(axis=1)]
            missed = ~ok.any(axis=1)
            if missed.any():  # rare: fall back to the next filled bin to the right
                nxt = np.flatnonzero(filled)
                src[missed] = nxt[np.searchsorted(nxt, empty[missed]) % len(nxt)]
            sig[empty] = sig[src]
        return sig

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32: `signature` of each normalised text, bit for bit, for a whole batch with
        a fixed number of numpy calls (shingle hashes of all texts at once, each (text, bin) minimum by one
        np.minimum.at). Texts under SHINGLE_CHARS characters go through `signature` itself."""
        if filters._native is not None:
            return self._signatures_native(texts)
        K = self.num_perm
        compacts = [" ".join(t.split()) for t in texts]
        lengths = np.fromiter(map(len, compacts), dtype=np.int64, count=len(texts))  # (D,)
        sigs = np.empty((len(texts), K), dtype=np.uint32)  # (D, K)
        for d in np.flatnonzero(lengths < SHINGLE_CHARS).tolist():
            sigs[d] = self.signature(compacts[d])
        long = lengths >= SHINGLE_CHARS
        if not long.any():
            return sigs
        cps = np.frombuffer("".join(compacts).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)  # (C,)
        span = len(cps) - SHINGLE_CHARS + 1  # shingles of the concatenation, including those across two texts
        with np.errstate(over="ignore"):
            h = cps[:span] * self._shingle_mult[0]  # (span,)
            tmp = np.empty_like(h)
            for j in range(1, SHINGLE_CHARS):
                h += np.multiply(cps[j: j + span], self._shingle_mult[j], out=tmp)  # the sums of `signature`
            h ^= self._seed_salt
            for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, None)):  # _mix64, in place
                h ^= np.right_shift(h, np.uint64(shift), out=tmp)
                if mult is not None:
                    h *= np.uint64(mult)
        # Bin of h: floor((h >> 32) * K / 2^32), the bins of _bin_lower (their bounds have 32 zero low bits).
        if K & (K - 1) == 0:
            bins = h >> np.uint64(64 - K.bit_length() + 1)
        else:
            bins = ((h >> np.uint64(32)) * np.uint64(K)) >> np.uint64(32)
        key = np.repeat(np.arange(len(texts)) * K, lengths)[:span] + bins.view(np.int64)  # (span,) text, bin
        # Shingles that start in a text's last SHINGLE_CHARS-1 characters (or in a short text) cross into the next
        # text: into a spare slot, D*K.
        ends = np.cumsum(lengths)
        cross = (ends[long][:, None] - np.arange(1, SHINGLE_CHARS)).ravel()  # (4 per long text,)
        if not long.all():
            cross = np.concatenate([cross, np.flatnonzero(np.repeat(~long, lengths))])
        key[cross[cross < span]] = len(texts) * K
        smallest = np.full(len(texts) * K + 1, np.iinfo(np.uint64).max, dtype=np.uint64)
        np.minimum.at(smallest, key, h)  # (D*K + 1,) each bin's smallest hash
        smallest = smallest[:-1]
        filled = np.bincount(key, minlength=len(texts) * K + 1)[:-1].reshape(-1, K) > 0  # (D, K)
        sigs[long] = self._densified(smallest.reshape(-1, K), filled, long)[long]
        return sigs

    def _signatures_native(self, texts: list[str]) -> np.ndarray:
        """`signatures` with the C loop (filters._native.minhash_bins: whitespace collapsing, shingle hashes and
        each bin's minimum in one pass over each text's characters), bit for bit the same."""
        D, K = len(texts), self.num_perm
        smallest = np.empty((D, K), dtype=np.uint64)
        filled = np.zeros((D, K), dtype=bool)
        lengths = np.empty(D, dtype=np.int64)  # characters after collapsing whitespace
        filters._native.minhash_bins(texts, filters._CLASSES, self._shingle_mult, int(self._seed_salt), K, smallest,
                                     filled, lengths)
        sigs = np.empty((D, K), dtype=np.uint32)
        long = lengths >= SHINGLE_CHARS
        for d in np.flatnonzero(~long).tolist():  # untouched by minhash_bins: hashed whole
            sigs[d] = self.signature(texts[d])
        if long.any():
            sigs[long] = self._densified(smallest, filled, long)[long]
        return sigs

    def _densified(self, smallest: np.ndarray, filled: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(D, K) uint32 signatures from each (text, bin)'s smallest hash, (D, K) whether the bin has one, for the
        texts where rows (D,) is True. Densification as in `signature`: an empty bin copies the first filled bin
        of its fixed sequence."""
        flat = np.where(filled, (smallest & _MASK32).astype(np.uint32), np.uint32(0xFFFFFFFF))
        ed, eb = np.nonzero(~filled & rows[:, None])  # (E,) text and bin of every empty bin
        if len(ed):
            cand = self._densify[eb]  # (E, T)
            ok = filled[ed[:, None], cand]
            src = cand[np.arange(len(eb)), ok.argmax(axis=1)]
            for e in np.flatnonzero(~ok.any(axis=1)).tolist():  # rare: the next filled bin to the right
                nxt = np.flatnonzero(filled[ed[e]])
                src[e] = nxt[np.searchsorted(nxt, eb[e]) % len(nxt)]
            flat[ed, eb] = flat[ed, src]
        return flat

    def fingerprints(self, texts: list[str], normalized: bool = False) -> list[tuple[int, np.ndarray]]:
        """[self.fingerprint(t) for t in texts]: the same keys and signatures, about 2x faster on a batch of a few
        hundred texts (build._prepare's 256). normalized=True skips normalize() for texts that already went
        through it (normalize is idempotent, so the result is the same; it only saves the second pass)."""
        if not normalized:
            texts = [normalize(t) for t in texts]
        keys = [int.from_bytes(hashlib.sha256(t.encode("utf-8")).digest()[:8], "little") | 1 for t in texts]
        return list(zip(keys, self.signatures(texts), strict=True))

    def fingerprint_arrays(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """`fingerprints(texts, normalized=True)` as two arrays, (D,) uint64 exact keys and (D, num_perm) uint32
        signatures: what a worker process sends back for a batch (two arrays pickle faster than D tuples)."""
        keys = np.fromiter((int.from_bytes(hashlib.sha256(t.encode("utf-8")).digest()[:8], "little") | 1
                            for t in texts), dtype=np.uint64, count=len(texts))
        return keys, self.signatures(texts)

    def _band_keys(self, sig: np.ndarray) -> list[int]:
        rows = sig.astype(np.uint64).reshape(self.bands, self.rows)  # (bands, rows)
        with np.errstate(over="ignore"):
            keys = _mix64((rows * self._row_mult).sum(axis=1, dtype=np.uint64) + self._band_salt)  # (bands,)
        return (keys | np.uint64(1)).tolist()  # odd: 0 marks an empty slot of _Index

    def fingerprint(self, text: str) -> tuple[int, np.ndarray]:
        """(exact key, MinHash signature) of `text`: pure, so worker processes can compute it in parallel
        (with a Deduplicator built with the same parameters) and hand it to `check_fingerprint`."""
        text = normalize(text)
        exact_key = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") | 1
        return exact_key, self.signature(text)

    def check(self, text: str) -> str | None:
        """None if `text` is new (it is then remembered), else "exact_duplicate" or "near_duplicate".

        The text is normalised here (idempotent, so passing normalize()d text is fine); decisions depend only on
        the order of calls, never on timing or process.
        """
        return self.check_fingerprint(*self.fingerprint(text))

    def check_fingerprint(self, exact_key: int, sig: np.ndarray, remember: bool = True,
                          ignore: frozenset[int] | set[int] = frozenset()) -> str | None:
        """`check` for a precomputed `fingerprint`: the order-dependent half, cheap, in one process.
        remember=False only asks (a new document is not kept), e.g. before a result is committed.
        ignore: kept documents (numbers 0, 1, ... in the order they were kept, see `len`) that do not count as
        earlier copies, e.g. the records a re-upload of the same task stored before a crash."""
        first = self._exact.get(exact_key)
        if first >= 0 and first not in ignore and np.array_equal(self._sigs[first], sig):
            return "exact_duplicate"
        keys = self._band_keys(sig)
        cands = {c for c in map(self._band_index.get, keys) if c >= 0 and c not in ignore}
        if cands:
            same = (self._sigs[np.fromiter(cands, dtype=np.int64, count=len(cands))] == sig).mean(axis=1)
            if same.max() >= self.threshold:
                return "near_duplicate"
        if remember:
            self._remember(exact_key, sig, keys)
        return None

    def check_fingerprints(self, fingerprints: list[tuple[int, np.ndarray]]) -> list[str | None]:
        """[self.check_fingerprint(k, sig) for k, sig in fingerprints]: the same decisions, in order (a document
        may duplicate an earlier one of the same batch), and the same state afterwards, for a fraction of the
        cost (see `check_arrays`)."""
        if not fingerprints:
            return []
        return self.check_arrays(np.array([k for k, _ in fingerprints], dtype=np.uint64),
                                 np.stack([sig for _, sig in fingerprints]))

    def check_arrays(self, exact: np.ndarray, sigs: np.ndarray) -> list[str | None]:
        """`check_fingerprints` for the arrays of `fingerprint_arrays`: (D,) exact keys and (D, num_perm) sigs.

        Band keys, the lookups of what was kept before the batch and the index writes are vectorised. A document
        none of whose keys was kept before nor occurs in an earlier document of the batch (most of them) is kept
        with no Python work of its own; the others are decided one by one as `check_fingerprint` does, with the
        keys that occur in more than one document of the batch looked up in dicts."""
        n = len(exact)
        if not n:
            return []
        rows = sigs.astype(np.uint64).reshape(n, self.bands, self.rows)  # (D, bands, rows)
        with np.errstate(over="ignore"):
            bands = _mix64((rows * self._row_mult).sum(axis=2, dtype=np.uint64) + self._band_salt) | np.uint64(1)
        old_exact = self._exact.get_many(exact)  # (D,) kept before this batch, or -1
        old_bands = self._band_index.get_many(bands.ravel()).reshape(bands.shape)  # (D, bands)
        # Keys met in more than one document of this batch, and whether an earlier document had them.
        _, first, inverse, count = np.unique(exact, return_index=True, return_inverse=True, return_counts=True)
        exact_shared, exact_earlier = count[inverse] > 1, first[inverse] < np.arange(n)
        _, first, inverse, count = np.unique(bands.ravel(), return_index=True, return_inverse=True,
                                             return_counts=True)
        band_shared = (count[inverse] > 1).reshape(bands.shape)  # (D, bands)
        band_earlier = (first[inverse] // self.bands < np.repeat(np.arange(n), self.bands)).reshape(bands.shape)
        simple = (old_exact < 0) & ~exact_earlier & (old_bands < 0).all(axis=1) & ~band_earlier.any(axis=1)
        any_shared = band_shared.any(axis=1)
        # Only documents that are not simple, or hold a key a later document of the batch may look up, are visited
        # one by one; the others are kept as they are. Keys of this batch map to its rows, not to document numbers.
        new_exact: dict[int, int] = {}  # keys met more than once in this batch, first kept -> row
        new_bands: dict[int, int] = {}
        keep = np.ones(n, dtype=bool)
        out: list[str | None] = [None] * n
        for d in np.flatnonzero(~simple | exact_shared | any_shared).tolist():
            sig, exact_key = sigs[d], int(exact[d])
            if not simple[d]:
                before = int(old_exact[d])
                row = new_exact.get(exact_key, -1) if before < 0 else -1
                if ((before >= 0 and np.array_equal(self._sigs[before], sig))
                        or (row >= 0 and np.array_equal(sigs[row], sig))):
                    out[d] = "exact_duplicate"
                    keep[d] = False
                    continue
                # Candidates kept before this batch (documents) and in it (rows); a repeat does not change the max.
                olds = old_bands[d][old_bands[d] >= 0]
                mates = [r for r in map(new_bands.get, bands[d][old_bands[d] < 0].tolist(), itertools.repeat(-1))
                         if r >= 0]
                same = [(self._sigs[olds] == sig).mean(axis=1).max()] if len(olds) else []
                if mates:
                    same.append((sigs[mates] == sig).mean(axis=1).max())
                if same and max(same) >= self.threshold:
                    out[d] = "near_duplicate"
                    keep[d] = False
                    continue
            if exact_shared[d]:
                new_exact.setdefault(exact_key, d)
            if any_shared[d]:
                for k in bands[d][band_shared[d]].tolist():
                    new_bands.setdefault(k, d)
        kept = np.flatnonzero(keep)
        if len(kept):  # the writes _remember makes, in the same order, vectorised
            docs = np.arange(self._kept, self._kept + len(kept), dtype=np.int32)
            while len(self._sigs) < self._kept + len(kept):  # doubling, as _remember grows it
                self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
            self._sigs[docs] = sigs[kept]
            self._kept += len(kept)
            # (what the lookups before the loop found is still there: the index changes only here)
            self._exact.setdefault_many(exact[kept], docs, old_exact[kept] >= 0)
            self._band_index.setdefault_many(bands[kept].ravel(), np.repeat(docs, self.bands),
                                             old_bands[kept].ravel() >= 0)
        return out

    def _remember(self, exact_key: int, sig: np.ndarray, keys: list[int]) -> None:
        doc = self._kept
        if doc == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
        self._sigs[doc] = sig
        self._kept += 1
        self._exact.setdefault(exact_key, doc)
        for k in keys:
            self._band_index.setdefault(k, doc)

    def nbytes(self) -> int:
        """Bytes held for the kept documents (signatures and both indexes, including spare capacity)."""
        return self._sigs.nbytes + self._exact.nbytes() + self._band_index.nbytes()

    @staticmethod
    def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
        """Fraction of equal signature entries: an unbiased estimate of the shingle sets' Jaccard similarity."""
        return float(np.mean(sig_a == sig_b))
