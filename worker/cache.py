"""A content-addressed cache of shards and checkpoint files fetched from the coordinator.

    cache = FileCache(cache_dir / "files", max_bytes=50 << 30, client=client)
    path = cache.fetch("shard", "ja/3f9a....bin")      # downloaded once, then served from disk

Layout: `objects/SHA256` holds each file once, whatever its name; `index.json` maps (what, name) to
the object and remembers when it was last used; `partial/` holds interrupted downloads, which the
next fetch resumes (CoordinatorClient.fetch continues from the bytes already on disk and checks the
SHA-256 the server announces, deleting a corrupt file). Checkpoint names are mutable on the coordinator
(a run rewrites its checkpoint directory; config.json and model.safetensors are fetched one by one), so
with a client a cached checkpoint file is reused only while the coordinator announces the same
SHA-256 (one chunk read); otherwise it is fetched again. Shard files are named by their content's hash,
so a cached shard is used without asking. After each download the least recently
used objects are evicted until the cache fits `max_bytes`; a single file larger than the cap is
refused with a message naming --max-disk. One process uses a cache directory at a time.
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

log = logging.getLogger(__name__)

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
                self.client.fetch(what, name, part)  # resumes from part's bytes; checks the announced SHA-256
            except grpc.RpcError as err:
                if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    raise FileNotFoundError(f"the coordinator has no {what} {name!r}: {err.details()}") from None
                raise
            sha = _sha256(part)
            size = part.stat().st_size
            if size > self.max_bytes:
                part.unlink()
                raise OSError(f"{what} {name} is {size / 2**30:.2f} GiB, more than the cache's cap of "
                              f"{self.max_bytes / 2**30:.2f} GiB: raise --max-disk")
            os.replace(part, self.objects / sha)
            self._index[key] = {"sha256": sha, "size": size, "used": time.time()}
            self._evict(keep=sha)
            self._save()
            return self.objects / sha

    def _remote_sha256(self, what: str, name: str) -> str:
        try:
            return self.client.remote_sha256(what, name)
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise FileNotFoundError(f"the coordinator has no {what} {name!r}: {err.details()}") from None
            raise

    def _evict(self, keep: str) -> None:
        """Remove least recently used objects until the cache fits max_bytes (never `keep`)."""
        sizes = {p.name: p.stat().st_size for p in self.objects.iterdir()}
        total = sum(sizes.values())
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
