"""The shard format: token ids + document offsets in one content-addressed file.

Every trainer (single process, torchrun, volunteer swarm) reads these, and volunteers download
them, so the format is exact and verifiable:

    offset  size            field
    0       8               magic b"MJSHARD1"
    8       4               format version (uint32, 1)
    12      4               bytes per token id (uint32: 2 for uint16, 4 for uint32)
    16      4               flags (uint32; bit 0: a per-token loss mask follows the tokens)
    20      4               reserved (0)
    24      8               documents n (uint64)
    32      8               tokens t (uint64)
    40      8 * (n + 1)     document offsets into the token array (uint64, first 0, last t)
    ...     w * t           token ids (uint16/uint32)
    ...     t               loss mask (uint8 0/1), only when flags bit 0 is set (chat records)

All integers are little-endian. The file is named `{sha256 of its bytes}.bin`, so a shard is its own
checksum: `ShardReader(path, verify=True)` recomputes the hash and refuses a corrupted download.
Reads are memory-mapped; a document is a zero-copy view.

A directory of shards is described by `manifest.json` (see `Manifest`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"MJSHARD1"
VERSION = 1
HEADER = struct.Struct("<8sIIIIQQ")  # magic, version, width, flags, reserved, n_docs, n_tokens
FLAG_MASK = 1
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "mujina-shards/1"
# What to do about a damaged shard or manifest: a rerun checks every shard it journaled and rebuilds the damaged
# ones (data_shards/build.py); a shard that was downloaded is fetched again by the worker.
REBUILD = "rerun `mujina-data shard` with the same arguments to rebuild it (a downloaded shard: fetch it again)"


class ShardError(ValueError):
    """A shard that cannot be trusted: truncated, corrupted, or from another tokenizer."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Builds one shard from documents added one at a time, in bounded memory.

    Tokens (and masks) stream to temporary files in the target directory; only the document
    offsets stay in memory. `close()` assembles header + offsets + tokens (+ mask) into the final
    file while hashing it, and renames it to `{sha256}.bin` (atomic: a crash leaves a `.tmp`).
    """

    def __init__(self, directory: str | os.PathLike, vocab_size: int, with_mask: bool = False):
        self.directory = Path(directory)
        self.dtype = token_dtype(vocab_size)
        self.with_mask = with_mask
        self.ends = array("Q")  # end offset of each document
        self.n_tokens = 0
        self._tokens = tempfile.TemporaryFile(dir=self.directory)
        self._mask = tempfile.TemporaryFile(dir=self.directory) if with_mask else None

    def add(self, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        self._tokens.write(np.asarray(ids).astype(self.dtype, copy=False).tobytes())
        if self._mask is not None:
            if mask is None or len(mask) != len(ids):
                raise ValueError("a shard with loss masks needs a mask of the same length for every document")
            self._mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self.n_tokens += len(ids)
        self.ends.append(self.n_tokens)

    def add_many(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents at once: their tokens one after another and (n,) their lengths (the same shard
        as n calls of `add`, with one write). Only for shards without loss masks."""
        if self._mask is not None:
            raise ValueError("add_many writes no loss masks: add the documents of a masked shard one by one")
        lengths = np.asarray(lengths, dtype=np.uint64)
        if int(lengths.sum()) != len(ids):
            raise ValueError(f"add_many: lengths sum to {int(lengths.sum())}, not to the {len(ids)} tokens given")
        self._tokens.write(np.asarray(ids).astype(self.dtype, copy=False).tobytes())
        self.ends.extend((np.cumsum(lengths) + np.uint64(self.n_tokens)).tolist())
        self.n_tokens += len(ids)

    def close(self) -> tuple[str, int, int]:
        """Write the shard; returns (file name, tokens, documents)."""
        offsets = np.zeros(len(self.ends) + 1, dtype="<u8")
        offsets[1:] = np.frombuffer(self.ends, dtype=np.uint64) if len(self.ends) else []
        head = HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, FLAG_MASK if self.with_mask else 0, 0,
                           len(self.ends), self.n_tokens) + offsets.tobytes()
        h = hashlib.sha256(head)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".shard.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(head)
                for part in (self._tokens, self._mask):
                    if part is None:
                        continue
                    part.seek(0)
                    for block in iter(lambda p=part: p.read(1 << 20), b""):
                        h.update(block)
                        out.write(block)
                out.flush()
                os.fsync(out.fileno())
            name = f"{h.hexdigest()}.bin"
            os.replace(tmp, self.directory / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            self._tokens.close()
            if self._mask is not None:
                self._mask.close()
        return name, self.n_tokens, len(self.ends)


def write_shard(directory: Path, docs: list[np.ndarray], vocab_size: int,
                masks: list[np.ndarray] | None = None) -> tuple[str, int, int]:
    """Write one shard of documents at once; returns (file name, tokens, documents)."""
    w = ShardWriter(directory, vocab_size, with_mask=masks is not None)
    for i, d in enumerate(docs):
        w.add(d, masks[i] if masks is not None else None)
    return w.close()


class ShardReader:
    """Memory-mapped read access to one shard.

        >>> r = ShardReader(path, verify=True)      # verify: recompute SHA-256 against the file name
        >>> r.num_documents, r.num_tokens, r.document(0)[:5]
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = False, expected_sha256: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"shard {self.path} is missing: {REBUILD}")
        size = self.path.stat().st_size
        if size < HEADER.size:
            raise ShardError(f"{self.path}: truncated ({size} bytes, smaller than the header)")
        with open(self.path, "rb") as f:
            magic, version, width, flags, _, n_docs, n_tokens = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise ShardError(f"{self.path}: not a mujina shard (bad magic {magic!r})")
        if version != VERSION or width not in (2, 4):
            raise ShardError(f"{self.path}: unsupported shard version {version} / token width {width}")
        self.has_mask = bool(flags & FLAG_MASK)
        want = HEADER.size + 8 * (n_docs + 1) + width * n_tokens + (n_tokens if self.has_mask else 0)
        if size != want:
            raise ShardError(f"{self.path}: {size} bytes but its header implies {want}: truncated or corrupted; "
                             f"{REBUILD}")
        if verify or expected_sha256:
            digest = file_sha256(self.path)
            name_hash = self.path.stem
            for label, want_hash in (("file name", name_hash if verify else None), ("manifest", expected_sha256)):
                if want_hash is not None and digest != want_hash:
                    raise ShardError(f"{self.path}: SHA-256 {digest[:12]}... does not match its {label} "
                                     f"({want_hash[:12]}...): the shard is corrupted; {REBUILD}")
        mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = HEADER.size
        self.offsets = mm[start: start + 8 * (n_docs + 1)].view("<u8")
        start += 8 * (n_docs + 1)
        self.tokens = mm[start: start + width * n_tokens].view("<u2" if width == 2 else "<u4")
        start += width * n_tokens
        self.mask = mm[start: start + n_tokens] if self.has_mask else None
        offsets_ok = self.offsets[0] == 0 and self.offsets[-1] == n_tokens and np.all(
            np.diff(self.offsets.astype(np.int64)) >= 0)
        if not offsets_ok:
            raise ShardError(f"{self.path}: document offsets are inconsistent: the shard is corrupted")
        self.num_documents, self.num_tokens = int(n_docs), int(n_tokens)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets.astype(np.int64))

    def document(self, i: int) -> np.ndarray:
        return self.tokens[int(self.offsets[i]): int(self.offsets[i + 1])]

    def document_mask(self, i: int) -> np.ndarray | None:
        return None if self.mask is None else self.mask[int(self.offsets[i]): int(self.offsets[i + 1])]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ShardInfo:
    file: str
    sha256: str
    tokens: int
    documents: int
    source: str
    language: str
    characters: int = 0  # of the normalised text (tokens per character = (tokens - 2 * documents) / characters)


@dataclass
class Manifest:
    """manifest.json of a shard directory."""

    tokenizer_sha256: str
    vocab_size: int
    shards: list[ShardInfo] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    def save(self, directory: str | os.PathLike) -> None:
        path = Path(directory) / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
        """The manifest of `directory`; ShardError (a ValueError) naming the file and the fix when it is not
        JSON, misses a field, or lists a shard twice."""
        path = Path(directory) / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{directory} has no {MANIFEST}: build shards with `mujina-data shard`")
        fix = "rerun `mujina-data shard` with the same arguments to rewrite it"
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ShardError(f"{path} is not UTF-8 text: {fix}") from None
        except json.JSONDecodeError as e:
            raise ShardError(f"{path} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno}): {fix}") from None
        if not isinstance(d, dict):
            raise ShardError(f"{path} must hold a JSON object, not {type(d).__name__}: {fix}")
        if d.get("format") != MANIFEST_FORMAT:
            raise ShardError(f"{path}: format {d.get('format')!r} is not {MANIFEST_FORMAT!r}")
        try:
            d["shards"] = [ShardInfo(**s) for s in d["shards"]]
            m = cls(**d)
        except (KeyError, TypeError) as e:
            raise ShardError(f"{path} is missing a field or has an unknown one ({e}): {fix}") from None
        if not isinstance(m.tokenizer_sha256, str) or not isinstance(m.vocab_size, int):
            raise ShardError(f"{path}: tokenizer_sha256 must be a string and vocab_size an integer: {fix}")
        # One entry per shard of a (source, language): the same bytes may stand for two sources (--no-dedup),
        # but one source listing a shard twice counts its documents twice (a rerun before issue 19 did that).
        seen: set[tuple[str, str, str]] = set()
        for s in m.shards:
            if not (isinstance(s.file, str) and s.file == Path(s.file).name and s.file not in ("", ".", "..")
                    and all(isinstance(getattr(s, k), int) for k in ("tokens", "documents", "characters"))):
                raise ShardError(f"{path}: shard entry {s.file!r} needs a plain file name and integer tokens, "
                                 f"documents and characters: {fix}")
            if (s.file, s.source, s.language) in seen:
                raise ShardError(f"{path} lists shard {s.file} twice (its documents would count twice): {fix}")
            seen.add((s.file, s.source, s.language))
        return m

    def check_tokenizer(self, tokenizer_sha256: str, where: str) -> None:
        if tokenizer_sha256 != self.tokenizer_sha256:
            raise ShardError(f"{where} was tokenized with tokenizer {self.tokenizer_sha256[:12]}... but this run uses "
                             f"{tokenizer_sha256[:12]}...: re-shard the data with this tokenizer, or use the one "
                             "the shards were made with")
