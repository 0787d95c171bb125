"""Reading raw text: JSON lines, plain text and parquet, optionally gzip-compressed, as a stream of `Document`s.

Every record read is either yielded or counted in a `DropCounter` under a reason, never lost silently
(issue 3, "Bad input"):

    reason               what happened
    empty_file           the file holds no record at all (0 bytes, or only blank lines, or a parquet file with no rows)
    invalid_utf8         a line (JSON lines) or a document (plain text, binary parquet column) is not UTF-8
    invalid_json         a line is not valid JSON
    not_an_object        a line is valid JSON but not an object ({...})
    missing_text_field   the object / parquet row has no text field (or it is null)
    invalid_text         the text field is not a string
    invalid_messages     a chat record's "messages" is not a list of {"role": str, "content": str}

Errors that concern the whole run rather than one record are raised before anything is read: an unknown
extension (`ValueError`, listing the supported ones) and a missing file (`FileNotFoundError`).

Decoding is per line (per document for plain text), so one bad byte costs one record, not the file. Parquet
is read in row batches of `PARQUET_BATCH_ROWS`, so memory does not grow with the file. Order is deterministic:
files in the order given, records in file order.

Example:
    drops = DropCounter()
    for doc in read_documents(["web.jsonl.gz", "books.parquet"], drops=drops):
        ...
    print(drops.as_dict())      # {"invalid_json": 2, "missing_text_field": 1}
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

# Longest suffix first: ".jsonl.gz" must win over ".gz".
SUPPORTED_SUFFIXES = (".jsonl.gz", ".json.gz", ".txt.gz", ".jsonl", ".json", ".txt", ".parquet")
PARQUET_BATCH_ROWS = 4096
"""Rows per parquet read: bounds memory to one batch of the text column (a few MB for web text)."""


@dataclass(frozen=True)
class Document:
    """One input document. `text` is raw (not yet normalised); chat records have text "" and meta["messages"]."""

    text: str
    source: str
    """--source NAME, or the file name without its extensions ("web" for web.jsonl.gz)."""
    origin: str
    """"path:line" (JSON lines, plain text: the 1-based line the record starts on) or "path:row" (parquet, 0-based)."""
    meta: dict = field(default_factory=dict)
    """Other fields of the record (JSON lines), e.g. "messages" for chat records; empty for text and parquet."""


class DropCounter:
    """Counts dropped documents by reason. Shared by ingest, filters and dedup so that one report says where
    every input record went.

        drops.add("too_short"); drops.add("invalid_json", 3)
        drops.as_dict()   # {"invalid_json": 3, "too_short": 1}  (sorted by reason)
    """

    def __init__(self, counts: dict[str, int] | None = None):
        self._counts: Counter[str] = Counter(counts or {})

    def add(self, reason: str, n: int = 1) -> None:
        if n < 0:
            raise ValueError(f"DropCounter.add({reason!r}, n={n}): n must be >= 0")
        if n:
            self._counts[reason] += n

    def merge(self, other: DropCounter | dict[str, int]) -> DropCounter:
        """Adds another counter's counts (e.g. from a worker process) into this one; returns self."""
        items = other.as_dict() if isinstance(other, DropCounter) else other
        for reason, n in items.items():
            self.add(reason, n)
        return self

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self._counts.items()))

    def total(self) -> int:
        return sum(self._counts.values())

    def __getitem__(self, reason: str) -> int:
        return self._counts[reason]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DropCounter) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"DropCounter({self.as_dict()})"


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUPPORTED_SUFFIXES if name.endswith(s)), None)


def _stem(path: Path, suffix: str) -> str:
    return path.name[: -len(suffix)]


def read_documents(paths: Sequence[str | Path], text_field: str = "text", source: str | None = None, *,
                   drops: DropCounter, raw_json: bool = False) -> Iterator[Document | RawLine]:
    """Streams the documents of `paths` in order. Checks every path first, so a typo in the last file name fails
    before any work is done: unknown extension -> ValueError, missing file -> FileNotFoundError.

    text_field: the JSON key / parquet column holding the text.
    source: the `Document.source` of every document; default: each file's stem.
    drops: receives a count for every record that is not yielded (reasons in the module docstring).
    raw_json: yield each non-blank JSON line as a RawLine, unparsed, for a caller that parses it elsewhere with
        parse_json_line and counts its drops itself (build's worker processes); other formats yield Documents.
    """
    checked: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        suffix = _suffix(p)
        if suffix is None:
            raise ValueError(f"{p}: unsupported file type; supported: {', '.join(SUPPORTED_SUFFIXES)} "
                             f"(rename the file or convert it to JSON lines)")
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file" + (" (it is a directory)" if p.is_dir() else ""))
        checked.append((p, suffix))
    return _read_all(checked, text_field, source, drops, raw_json)


def _read_all(checked: list[tuple[Path, str]], text_field: str, source: str | None,
              drops: DropCounter, raw_json: bool) -> Iterator[Document | RawLine]:
    for path, suffix in checked:
        src = source or _stem(path, suffix)
        if suffix == ".parquet":
            yield from _read_parquet(path, text_field, src, drops)
            continue
        try:
            with (gzip.open(path, "rb") if suffix.endswith(".gz") else open(path, "rb")) as f:
                if suffix.startswith(".txt"):
                    yield from _read_text_file(f, path, text_field, src, drops)
                elif raw_json:
                    yield from _raw_lines(f, src, drops)
                else:
                    yield from _read_jsonl(f, path, text_field, src, drops)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            # Raised, not counted: the records after the damage are unknown, so they cannot be counted.
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({e}); re-download or re-compress it") from e


def _read_jsonl(lines: Iterable[bytes], path: Path, text_field: str, source: str,
                drops: DropCounter) -> Iterator[Document]:
    for raw, _, lineno in _raw_lines(lines, source, drops):
        parsed = parse_json_line(raw, text_field)
        if isinstance(parsed, str):
            drops.add(parsed)
        else:
            text, record = parsed
            yield Document(text, source, f"{path}:{lineno}", record)


class RawLine(NamedTuple):
    """A non-blank JSON line, not parsed yet (read_documents(raw_json=True)), the source of its file and its
    1-based line number."""

    raw: bytes
    source: str
    lineno: int


def _raw_lines(lines: Iterable[bytes], source: str, drops: DropCounter) -> Iterator[RawLine]:
    """The non-blank lines (blank lines separate nothing in JSON lines; they are not records); a file with none
    is counted as empty_file."""
    records = 0
    for lineno, raw in enumerate(lines, 1):
        if raw and not raw.isspace():  # raw.strip(), without copying the line
            records += 1
            yield RawLine(raw, source, lineno)
    if records == 0:
        drops.add("empty_file")


def parse_json_line(raw: bytes, text_field: str = "text") -> tuple[str, dict] | str:
    """A non-blank JSON line -> (text, the record's other fields), ("", record) for a chat record ({"messages":
    [...]}), or the reason it is dropped (invalid_utf8, invalid_json, not_an_object, invalid_messages,
    missing_text_field, invalid_text)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return "invalid_json"
    if not isinstance(record, dict):
        return "not_an_object"
    if "messages" in record:
        return ("", record) if _valid_messages(record["messages"]) else "invalid_messages"
    if record.get(text_field) is None:
        return "missing_text_field"
    text = record.pop(text_field)
    if not isinstance(text, str):
        return "invalid_text"
    return text, record


def _valid_messages(messages: object) -> bool:
    return isinstance(messages, list) and len(messages) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)


def _read_text_file(lines: Iterable[bytes], path: Path, text_field: str, source: str,
                    drops: DropCounter) -> Iterator[Document]:
    """Documents are separated by one or more blank lines; each document is decoded on its own."""
    records = 0
    block: list[bytes] = []
    start = 0
    for lineno, raw in enumerate(lines, 1):
        if raw.strip():
            if not block:
                start = lineno
            block.append(raw)
            continue
        if block:
            records += 1
            yield from _text_block(block, f"{path}:{start}", source, drops)
            block = []
    if block:
        records += 1
        yield from _text_block(block, f"{path}:{start}", source, drops)
    if records == 0:
        drops.add("empty_file")


def _text_block(block: list[bytes], origin: str, source: str, drops: DropCounter) -> Iterator[Document]:
    try:
        text = b"".join(block).decode("utf-8")
    except UnicodeDecodeError:
        drops.add("invalid_utf8")
        return
    yield Document(text.rstrip("\r\n"), source, origin, {})


def _read_parquet(path: Path, text_field: str, source: str, drops: DropCounter) -> Iterator[Document]:
    import pyarrow as pa  # imported here: only parquet inputs need pyarrow
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        drops.add("empty_file")
        return
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e}); check that it was fully written") from e
    rows = pf.metadata.num_rows
    if rows == 0:
        drops.add("empty_file")
        return
    if text_field not in pf.schema_arrow.names:
        # The column is absent from every row: count them all rather than fail the run.
        drops.add("missing_text_field", rows)
        return
    kind = pf.schema_arrow.field(text_field).type
    is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    is_binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            origin = f"{path}:{row}"
            row += 1
            if value is None:
                drops.add("missing_text_field")
            elif is_text:
                yield Document(value, source, origin, {})
            elif is_binary:
                try:
                    yield Document(value.decode("utf-8"), source, origin, {})
                except UnicodeDecodeError:
                    drops.add("invalid_utf8")
            else:
                drops.add("invalid_text")
