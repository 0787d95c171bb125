"""`mujina-worker doctor` (devices, why no GPU, coordinator and token check, exit code) and the cache's
resume, checksum and least-recently-used eviction against a real coordinator's FetchShard, and its
re-fetch of checkpoint files the coordinator rewrote (FetchCheckpoint)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.coordinator.conftest import TOKEN


def test_doctor_reports_devices_kinds_and_checks_the_token(coord, tmp_path):
    p = run_cli("worker.cli", "doctor", "--json", "--no-benchmark", "--cache-dir", str(tmp_path),
                "--coordinator", coord.target, "--token", TOKEN)
    report = json.loads(p.stdout)
    assert p.returncode == 0 and report["ok"] and report["coordinator"]["ok"]
    assert report["devices"][-1]["kind"] == "cpu" and report["kinds"]["eval"] == ""
    import torch

    if not torch.cuda.is_available():
        assert report["why_no_gpu"]  # e.g. "this torch ... is a CPU-only build"
    bad = run_cli("worker.cli", "doctor", "--no-benchmark", "--cache-dir", str(tmp_path), "--coordinator",
                  coord.target, "--token", "mj_wrong", check=False)
    assert bad.returncode == 1 and "refuses the token" in bad.stdout
    missing = run_cli("worker.cli", "doctor", "--devices", "cuda:7", "--no-benchmark", check=False)
    assert missing.returncode == 1 and "no such device" in missing.stdout


def test_cache_resumes_verifies_and_evicts_least_recently_used(coord, tmp_path):
    from worker.cache import FileCache

    shards = coord.cfg.state_dir / "shards"
    shards.mkdir(parents=True)
    blobs = {f"s{i}.bin": bytes([i]) * 400_000 for i in range(3)}
    for name, blob in blobs.items():
        (shards / name).write_bytes(blob)
    cache = FileCache(tmp_path / "c", max_bytes=900_000, client=coord.client())
    assert cache.fetch("shard", "s0.bin").read_bytes() == blobs["s0.bin"]
    cache.fetch("shard", "s1.bin")
    cache.fetch("shard", "s0.bin")  # s0 is now more recent than s1
    cache.fetch("shard", "s2.bin")  # over the cap: s1 (least recently used) goes
    assert {p.read_bytes()[:1] for p in (tmp_path / "c" / "objects").iterdir()} == {b"\x00", b"\x02"}
    assert cache.used_bytes() <= 900_000
    with pytest.raises(FileNotFoundError, match="has no shard"):
        cache.fetch("shard", "missing.bin")
    small = FileCache(tmp_path / "small", max_bytes=1000, client=coord.client())
    with pytest.raises(OSError, match="raise --max-disk"):
        small.fetch("shard", "s0.bin")
    # a reopened cache finds what it holds without the coordinator
    again = FileCache(tmp_path / "c", max_bytes=900_000, client=None)
    assert again.fetch("shard", "s2.bin").read_bytes() == blobs["s2.bin"]


def test_cache_refetches_a_checkpoint_file_the_coordinator_rewrote(coord, tmp_path):
    import hashlib

    from worker.cache import FileCache

    ckpt = coord.cfg.state_dir / "checkpoints" / "run1"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_bytes(b'{"v": 1}')
    client = coord.client()
    assert client.remote_sha256("checkpoint", "run1/config.json") == hashlib.sha256(b'{"v": 1}').hexdigest()
    cache = FileCache(tmp_path / "c", max_bytes=1 << 20, client=client)
    assert cache.fetch("checkpoint", "run1/config.json").read_bytes() == b'{"v": 1}'
    (ckpt / "config.json").write_bytes(b'{"v": 22}')
    assert cache.fetch("checkpoint", "run1/config.json").read_bytes() == b'{"v": 22}'
    # gone from the coordinator: an error naming it, never the stale copy
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no checkpoint 'run1/config.json'"):
        cache.fetch("checkpoint", "run1/config.json")
    # offline (no client), the cache serves what it holds
    assert FileCache(tmp_path / "c", max_bytes=1 << 20).fetch("checkpoint", "run1/config.json").read_bytes() \
        == b'{"v": 22}'
