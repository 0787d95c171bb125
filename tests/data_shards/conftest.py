"""Fixtures shared by the data_shards tests: a small bilingual corpus (written by tests/data_shards/corpus.py,
no downloads), a tokenizer trained on it and shards built from it, all through the real `mujina-data`."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from tests.data_shards.corpus import english_documents, japanese_documents, write_jsonl

VOCAB = 1200


def mujina_data(*args: str, **kw):
    return run_cli("data_shards.cli", *args, **kw)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    ja, en = japanese_documents(200, seed=0), english_documents(200, seed=1)
    write_jsonl(d / "ja.jsonl", ja)
    write_jsonl(d / "en.jsonl", en)
    return {"dir": d, "ja": ja, "en": en, "files": [d / "ja.jsonl", d / "en.jsonl"]}


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok"
    mujina_data("tokenizer", "train", "--input", *map(str, corpus["files"]), "--vocab-size", str(VOCAB),
                "--out", str(out))
    return out


@pytest.fixture(scope="session")
def shard_dirs(corpus, tokenizer_dir, tmp_path_factory):
    """One shard directory per language, small shards so that there are several."""
    root = tmp_path_factory.mktemp("shards")
    for lang in ("ja", "en"):
        mujina_data("shard", "--input", str(corpus["dir"] / f"{lang}.jsonl"), "--tokenizer", str(tokenizer_dir),
                    "--out", str(root / lang), "--shard-tokens", "8000")
    return {"ja": root / "ja", "en": root / "en"}


@pytest.fixture(params=["c", "numpy"])
def loops(request, monkeypatch):
    """Runs a test with the C loops (data_shards/_native.c) and again with their numpy fallback."""
    from data_shards import filters

    if request.param == "numpy":
        monkeypatch.setattr(filters, "_native", None)
    elif filters._native is None:
        pytest.fail("data_shards._native is not built: `pip install -e .` needs a C compiler and Python's headers")
    return request.param
