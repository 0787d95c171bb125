"""The daemon's spool of finished results, against a malicious coordinator and a damaged disk: ids from the
network never name a path outside it, and an entry that does not read back is set aside, not a crash."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest

from worker.daemon import Spool, check_id

GOOD = "0123456789abcdef0123456789abcdef"


def header(lease: str) -> dict:
    return {"task_id": "t" * 32, "lease_id": lease, "kind": "eval", "metrics": {}, "metadata": {}, "seconds": 1.0}


@pytest.mark.parametrize("lease", ["../../x", "/etc/passwd", "a/b", "..", "", "x" * 65, "a b"])
def test_a_lease_id_that_could_name_another_path_is_refused(tmp_path, lease):
    spool = Spool(tmp_path / "spool")
    with pytest.raises(ValueError, match="malformed lease id"):
        spool.put(header(lease), b"data")
    with pytest.raises(ValueError, match="malformed lease id"):
        spool.remove(lease)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["spool"]   # nothing written anywhere
    with pytest.raises(ValueError, match="malformed task id"):
        check_id("task id", lease)


def test_corrupt_entries_are_set_aside_and_the_good_ones_kept(tmp_path, caplog):
    spool = Spool(tmp_path / "spool")
    spool.put(header(GOOD), b"result")
    (spool.root / "garbage.json").write_text("{not json")
    (spool.root / ("b" * 32 + ".json")).write_text(json.dumps(header("c" * 32)))  # names another entry
    (spool.root / ("d" * 32 + ".json")).write_text(json.dumps(header("d" * 32)))  # its .bin is missing
    with caplog.at_level(logging.WARNING, logger="worker"):
        entries = spool.entries()
    assert entries == [({**header(GOOD), "sha256": hashlib.sha256(b"result").hexdigest()}, b"result")]
    assert sorted(p.name for p in (spool.root / "corrupt").iterdir()) == sorted(
        ["garbage.json", "b" * 32 + ".json", "d" * 32 + ".json"])
    assert len(spool) == 1 and sum("moved to" in r.getMessage() for r in caplog.records) == 3
    spool.remove(GOOD)
    assert len(spool) == 0 and spool.entries() == []


def test_an_entry_whose_data_does_not_match_its_header_digest_is_set_aside(tmp_path, caplog):
    """The header carries the data's SHA-256: a .bin damaged after it was spooled (a disk error, a bit flip) is
    never uploaded as this lease's result; it goes to corrupt/ and the daemon starts anyway."""
    spool = Spool(tmp_path / "spool")
    spool.put(header(GOOD), b"result")
    bad = "e" * 32
    spool.put(header(bad), b"other result")
    assert json.loads((spool.root / f"{bad}.json").read_text())["sha256"] == hashlib.sha256(b"other result").hexdigest()
    (spool.root / f"{bad}.bin").write_bytes(b"other resulT")
    legacy = "f" * 32  # spooled by a version whose headers had no digest: uploaded unchecked
    (spool.root / f"{legacy}.bin").write_bytes(b"old")
    (spool.root / f"{legacy}.json").write_text(json.dumps(header(legacy)))
    with caplog.at_level(logging.WARNING, logger="worker"):
        entries = spool.entries()
    assert sorted(h["lease_id"] for h, _ in entries) == [GOOD, legacy]
    assert sorted(p.name for p in (spool.root / "corrupt").iterdir()) == [f"{bad}.bin", f"{bad}.json"]
    assert any("does not hash to its header's SHA-256" in r.getMessage() for r in caplog.records)
