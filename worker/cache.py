"""A content-addressed cache of shards and checkpoint files fetched from the coordinator.

    cache = FileCache(cache_dir / "files", max_bytes=50 << 30, client=client)
    path = cache.fetch("shard", "ja/3f9a....bin")      # downloaded once, then served from disk

Layout: `objects/SHA256` holds each file once, whatever its name; `index.json` maps (what, name) to
the object and remembers when it was last used; `partial/` holds interrupted downloads, which the
next fetch resumes (from the bytes already on disk; the SHA-256 the server announces is checked at the end,
and a corrupt file deleted). Checkpoint names are mutable on the coordinator
(a run rewrites its checkpoint directory; config.json and model.safetensors are fetched one by one), so
with a client a cached checkpoint file is reused only while the coordinator announces the same
SHA-256 (one chunk read); otherwise it is fetched again. Shard files are named by their content's hash,
so a cached shard is used without asking. After each download the least recently
used objects are evicted until the cache fits `max_bytes`; a single file larger than the cap is
refused with a message naming --max-disk. One process uses a cache directory at a time.

The coordinator is not trusted with the volunteer's disk: a download stops (DownloadRefused, the partial file
deleted) as soon as a chunk would write past the size the coordinator announced, or past the cache's cap,
before those bytes are written; room for the announced size is made (least recently used objects evicted)
before the first byte lands.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import grpc

from coordinator.api import mujina_pb2 as pb
from coordinator.api.client import retryable

log = logging.getLogger(__name__)


class DownloadRefused(OSError):
    """The coordinator's file cannot be taken: larger than the cache's cap (--max-disk), or its stream broke
    what it announced (more bytes than its size, a changed size or digest, a digest that does not match)."""

WHATS = ("shard", "checkpoint")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FileCache:
    def __init__(self, root: str | os.PathLike, max_bytes: int, client=None):
        self.root = Path(root)
        self.objects, self.partial = self.root / "objects", self.root / "partial"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.client = max_bytes, client
        self._lock = threading.Lock()
        self._index_path = self.root / "index.json"
        try:
            self._index: dict[str, dict] = json.loads(self._index_path.read_text())
        except (OSError, ValueError):
            self._index = {}
        # drop entries whose object vanished (deleted by hand, or a crash before the index was written)
        self._index = {k: v for k, v in self._index.items() if (self.objects / v["sha256"]).is_file()}

    def _save(self) -> None:
        tmp = self._index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._index, indent=1))
        os.replace(tmp, self._index_path)

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.objects.iterdir())

    def fetch(self, what: str, name: str) -> Path:
        """The local path of shards/NAME or checkpoints/NAME, downloading it if needed."""
        if what not in WHATS:
            raise ValueError(f"cache: what must be one of {WHATS}, got {what!r}")
        key = f"{what}:{name}"
        with self._lock:
            entry = self._index.get(key)
            part = self.partial / hashlib.sha256(key.encode()).hexdigest()
            if entry is not None and what == "checkpoint" and self.client is not None \
                    and self._remote_sha256(what, name) != entry["sha256"]:
                log.info("cache: %s %s changed on the coordinator; fetching it again", what, name)
                part.unlink(missing_ok=True)  # an interrupted download of the old version, if any
                entry = None
            if entry is not None and (self.objects / entry["sha256"]).is_file():
                entry["used"] = time.time()
                self._save()
                return self.objects / entry["sha256"]
            if self.client is None:
                raise FileNotFoundError(f"{what} {name!r} is not cached and this cache has no coordinator client")
            try:
                announced = self._download(what, name, part)  # resumes from part's bytes
            except grpc.RpcError as err:
                if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    raise FileNotFoundError(f"the coordinator has no {what} {name!r}: {err.details()}") from None
                raise
            except DownloadRefused:
                part.unlink(missing_ok=True)
                raise
            sha = _sha256(part)
            size = part.stat().st_size
            if sha != announced:
                part.unlink()
                raise DownloadRefused(f"{what} {name}: the received bytes hash to {sha[:16]}, not the announced "
                                      f"{announced[:16]}; deleted, it is fetched afresh next time")
            os.replace(part, self.objects / sha)
            self._index[key] = {"sha256": sha, "size": size, "used": time.time()}
            self._evict(keep=sha)
            self._save()
            return self.objects / sha

    def _download(self, what: str, name: str, part: Path) -> str:
        """Stream shards/NAME or checkpoints/NAME into `part`, resuming from its bytes and retrying while the
        coordinator is unavailable (up to the client's retry_for seconds). Returns the announced SHA-256."""
        give_up, delay = time.monotonic() + self.client.retry_for, 0.05
        while True:
            try:
                return self._stream(what, name, part)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.OUT_OF_RANGE and part.exists():  # the file shrank: start afresh
                    part.unlink()
                    continue
                if not retryable(err) or time.monotonic() + delay > give_up:
                    raise
                log.info("cache: fetching %s %s: coordinator unavailable (%s); resuming in %.2f s", what, name,
                         err.details(), delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _stream(self, what: str, name: str, part: Path) -> str:
        """One FetchShard/FetchCheckpoint call appended to `part`; every chunk checked before it is written."""
        stub = self.client.stub
        rpc = {"shard": stub.FetchShard, "checkpoint": stub.FetchCheckpoint}[what]
        total = sha = None
        with open(part, "ab") as f:
            offset = f.tell()
            call = rpc(pb.FetchRequest(name=name, offset=offset), metadata=self.client.metadata,
                       timeout=self.client.timeout)
            try:
                for chunk in call:
                    if total is None:
                        total, sha = chunk.total_size, chunk.sha256
                        if total > self.max_bytes:
                            raise DownloadRefused(
                                f"{what} {name} is {total / 2**30:.3f} GiB, more than the cache's cap of "
                                f"{self.max_bytes / 2**30:.3f} GiB: raise --max-disk")
                        self._evict(keep="", need=total)
                    elif (chunk.total_size, chunk.sha256) != (total, sha):
                        raise DownloadRefused(f"{what} {name}: the coordinator changed the file's announced size or "
                                              f"digest during the download ({total} -> {chunk.total_size} bytes)")
                    if chunk.offset != f.tell():
                        raise DownloadRefused(f"{what} {name}: chunk at offset {chunk.offset}, expected {f.tell()}")
                    if chunk.offset + len(chunk.data) > total:
                        raise DownloadRefused(f"{what} {name}: the coordinator sent more than the {total} bytes it "
                                              "announced; stopped before writing past them")
                    f.write(chunk.data)
            finally:
                call.cancel()  # a refused stream is not read to its end
            if total is None:
                raise DownloadRefused(f"{what} {name}: the coordinator's answer held no chunk")
            if f.tell() != total:
                raise DownloadRefused(f"{what} {name}: the stream ended at {f.tell()} of the {total} bytes announced")
        return sha

    def _remote_sha256(self, what: str, name: str) -> str:
        try:
            return self.client.remote_sha256(what, name)
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise FileNotFoundError(f"the coordinator has no {what} {name!r}: {err.details()}") from None
            raise

    def _evict(self, keep: str, need: int = 0) -> None:
        """Remove least recently used objects until the cache fits max_bytes with `need` bytes more (never `keep`)."""
        sizes = {p.name: p.stat().st_size for p in self.objects.iterdir()}
        total = sum(sizes.values()) + need
        last_used: dict[str, float] = {}
        for v in self._index.values():
            last_used[v["sha256"]] = max(last_used.get(v["sha256"], 0.0), v["used"])
        for sha in sorted(sizes, key=lambda s: last_used.get(s, 0.0)):
            if total <= self.max_bytes:
                break
            if sha == keep:
                continue
            (self.objects / sha).unlink(missing_ok=True)
            total -= sizes[sha]
            self._index = {k: v for k, v in self._index.items() if v["sha256"] != sha}
            log.info("cache: evicted %s (%d bytes) to stay under %d bytes", sha[:12], sizes[sha], self.max_bytes)
