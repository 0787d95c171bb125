"""A garbage `tokenizer.model` and a broken `manifest.json` end in one line naming the file and the fix, exit 2,
never a traceback (issue 19, item 9): for every `mujina-data` subcommand that reads them, and, as a ValueError
naming the file, for the loader and the tokenizer that training uses."""

from __future__ import annotations

import json
import shutil

import pytest

from data_shards.loader import ShardSource, SourceSpec
from data_shards.tokenizer import Tokenizer
from tests.data_shards.conftest import mujina_data


def one_line_error(r, command: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"mujina-data {command}: error: "), r.stderr
    return errors[0]


@pytest.fixture
def garbage_tokenizer(tmp_path, tokenizer_dir):
    bad = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, bad)
    (bad / "tokenizer.model").write_bytes(b"this is not a sentencepiece model\n" * 10)
    return bad


def test_shard_with_a_garbage_tokenizer_model_exits_2_naming_it(tmp_path, corpus, garbage_tokenizer):
    r = mujina_data("shard", "--input", str(corpus["files"][0]), "--tokenizer", str(garbage_tokenizer),
                    "--out", str(tmp_path / "out"), check=False)
    line = one_line_error(r, "shard")
    assert str(garbage_tokenizer / "tokenizer.model") in line and "mujina-data tokenizer train" in line
    with pytest.raises(ValueError, match="tokenizer.model is not a SentencePiece model"):
        Tokenizer(garbage_tokenizer)  # what training and the preference data use


@pytest.mark.parametrize("content", [b"{\"format\": \"mujina-shards/1\", \"shards\": [", b"\xff\xfe\x00garbage",
                                     b"[1, 2]", b'{"format": "mujina-shards/1", "vocab_size": 1200}',
                                     b'{"format": "mujina-shards/1", "vocab_size": 1200, "tokenizer_sha256": "x", '
                                     b'"shards": [{"file": "../../etc/passwd", "sha256": "x", "tokens": 1, '
                                     b'"documents": 1, "source": "s", "language": "ja"}]}'],
                         ids=["torn", "binary", "not-an-object", "missing-field", "path-as-file-name"])
def test_a_broken_manifest_is_named_by_stats_and_the_loader(tmp_path, shard_dirs, content):
    d = tmp_path / "ja"
    shutil.copytree(shard_dirs["ja"], d)
    (d / "manifest.json").write_bytes(content)
    for extra in ([], ["--verify"], ["--json"]):
        r = mujina_data("stats", str(d), "--seq-len", "256", *extra, check=False)
        line = one_line_error(r, "stats")
        assert str(d / "manifest.json") in line and "rerun `mujina-data shard`" in line
    with pytest.raises(ValueError, match="manifest.json"):
        ShardSource(SourceSpec(str(d), 1.0), seq_len=256, seed=0)


def test_a_missing_manifest_says_how_to_build_one(tmp_path):
    r = mujina_data("stats", str(tmp_path), "--seq-len", "256", check=False)
    assert "has no manifest.json: build shards with `mujina-data shard`" in one_line_error(r, "stats")


def test_the_shipped_manifest_still_loads(shard_dirs):
    """The checks refuse only what is broken: a clean build passes stats --verify and loads."""
    r = mujina_data("stats", str(shard_dirs["en"]), "--seq-len", "256", "--verify", "--json")
    assert json.loads(r.stdout)["documents"] > 0
    assert ShardSource(SourceSpec(str(shard_dirs["en"]), 1.0), seq_len=256, seed=0).num_documents > 0
