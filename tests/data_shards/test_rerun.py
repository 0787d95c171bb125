"""`mujina-data shard` reruns never duplicate (issue 19, item 8): the journal and the manifest hold each
(bucket, index) once, a shard deleted or damaged in place is found by the next run and rebuilt, and
`stats --verify` refuses a manifest that lists a shard twice or whose document counts do not add up.

Reference: a clean build of the same input. Every case must end with that build's manifest (the same shard
files, documents and tokens), through the real `mujina-data` CLI."""

from __future__ import annotations

import json
import shutil

import pytest

from data_shards.shards import Manifest
from tests.data_shards.conftest import mujina_data

pytestmark = pytest.mark.slow  # several real `mujina-data shard` runs


@pytest.fixture
def build(tmp_path, corpus, tokenizer_dir):
    """shard(out) runs `mujina-data shard` on the bilingual corpus into `out`; the reference build is made once."""
    args = ["shard", "--input", *map(str, corpus["files"]), "--tokenizer", str(tokenizer_dir), "--shard-tokens",
            "5000", "--workers", "1"]

    def shard(out, check=True):
        return mujina_data(*args, "--out", str(out), check=check)

    shard(tmp_path / "ref")
    ref = Manifest.load(tmp_path / "ref")
    assert len(ref.shards) >= 4 and len({s.source for s in ref.shards}) == 2  # several shards in two buckets
    return shard, ref


def listing(m: Manifest) -> list[tuple]:
    return [(s.file, s.documents, s.tokens, s.source, s.language) for s in m.shards]


def test_deleting_a_shard_and_rerunning_twice_gives_the_clean_manifest(tmp_path, build):
    shard, ref = build
    out = tmp_path / "out"
    shard(out)
    journal = (out / ".journal.jsonl").read_bytes()
    shard(out)  # a rerun of a finished build changes nothing
    assert (out / ".journal.jsonl").read_bytes() == journal and listing(Manifest.load(out)) == listing(ref)
    victim = ref.shards[1]  # a shard of the first bucket with later shards in the same bucket
    (out / victim.file).unlink()
    r = mujina_data("stats", str(out), "--seq-len", "256", check=False)
    assert r.returncode == 2 and victim.file in r.stderr and "rerun `mujina-data shard`" in r.stderr, r.stderr
    for _ in range(2):
        shard(out)
        got = Manifest.load(out)
        assert listing(got) == listing(ref) and got.documents == ref.documents
    journal = [json.loads(x) for x in (out / ".journal.jsonl").read_text().splitlines()]
    keys = [(tuple(r["bucket"]), r["index"]) for r in journal]
    assert len(keys) == len(set(keys)) == len(ref.shards)
    mujina_data("stats", str(out), "--seq-len", "256", "--verify")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_shard_damaged_in_place_is_found_and_rebuilt(tmp_path, build, damage):
    shard, ref = build
    out = tmp_path / "out"
    shard(out)
    victim = out / ref.shards[2].file
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF  # same size: only the SHA-256 tells
    else:
        del data[-7:]
    victim.write_bytes(bytes(data))
    r = mujina_data("stats", str(out), "--seq-len", "256", "--verify", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert ref.shards[2].file in r.stderr and "rerun `mujina-data shard`" in r.stderr
    r = shard(out)
    assert "rebuilding it" in r.stderr
    assert listing(Manifest.load(out)) == listing(ref)
    assert victim.read_bytes() == (tmp_path / "ref" / ref.shards[2].file).read_bytes()
    mujina_data("stats", str(out), "--seq-len", "256", "--verify")


def test_a_journal_listing_shards_twice_is_read_once(tmp_path, build):
    """What the old bug left behind: journal lines repeated for the same (bucket, index)."""
    shard, ref = build
    out = tmp_path / "out"
    shard(out)
    lines = (out / ".journal.jsonl").read_text().splitlines()
    (out / ".journal.jsonl").write_text("\n".join(lines + lines[1:]) + "\n")
    shard(out)
    assert listing(Manifest.load(out)) == listing(ref)
    assert len((out / ".journal.jsonl").read_text().splitlines()) == len(ref.shards)


def test_stats_verify_refuses_a_shard_listed_twice_and_counts_that_do_not_add_up(tmp_path, build):
    _, ref = build
    path = tmp_path / "ref" / "manifest.json"
    good = json.loads(path.read_text())

    def stats_error(manifest: dict) -> str:
        path.write_text(json.dumps(manifest))
        r = mujina_data("stats", str(tmp_path / "ref"), "--seq-len", "256", "--verify", check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        return r.stderr

    err = stats_error({**good, "shards": good["shards"] + good["shards"][:1]})
    assert f"lists shard {ref.shards[0].file} twice" in err and "rerun `mujina-data shard`" in err
    kept = dict(good["report"]["documents_kept"])
    kept[next(iter(kept))] += 5
    err = stats_error({**good, "report": {**good["report"], "documents_kept": kept}})
    assert f"hold {ref.documents} documents but its report kept {ref.documents + 5}" in err
    shards = [dict(s) for s in good["shards"]]
    shards[0]["documents"] += 1
    err = stats_error({**good, "shards": shards})
    assert f"says shard {ref.shards[0].file} holds {ref.shards[0].documents + 1} documents" in err
    path.write_text(json.dumps(good))
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    mujina_data("stats", str(tmp_path / "ref"), "--seq-len", "256", "--verify")
