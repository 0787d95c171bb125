"""`mujina-data shard` and `stats` end to end: what is kept decodes back to the normalised input, what is
dropped is counted by reason, the output is byte-identical for the same input, and an interrupted run resumes
without rewriting finished shards."""

import json
import logging
import os
import shutil
import threading

import numpy as np
import pytest

from data_shards.build import ShardConfig, build_shards
from data_shards.filters import normalize
from data_shards.shards import Manifest, ShardReader
from data_shards.tokenizer import Tokenizer
from tests.data_shards import corpus as C
from tests.data_shards.conftest import mujina_data


def _all_docs(directory):
    m = Manifest.load(directory)
    out = []
    for s in m.shards:
        r = ShardReader(directory / s.file, expected_sha256=s.sha256)
        out += [np.asarray(r.document(i)).tolist() for i in range(r.num_documents)]
    return m, out


def test_kept_documents_decode_back_and_drops_are_counted(tmp_path, corpus, tokenizer_dir):
    good_ja, good_en = corpus["ja"][:30], corpus["en"][:30]
    bad = {
        "too_short": [C.too_short_document("ja"), C.too_short_document("en")],
        "duplicate_lines": [C.repeated_lines_document("ja")],
        "exact_duplicate": [C.exact_duplicate(good_ja[0]), C.exact_duplicate(good_en[3])],
        "near_duplicate": [C.near_duplicate(good_ja[5]), C.near_duplicate(good_en[7])],
        "language": C.korean_documents(2) + C.russian_documents(1),
    }
    docs = good_ja + good_en + [d for ds in bad.values() for d in ds]
    C.write_jsonl(tmp_path / "in.jsonl", docs)
    with open(tmp_path / "in.jsonl", "ab") as f:  # bad input in the same file: neither fatal nor silent
        f.write(b'{"text": "\xff\xfe broken bytes"}\n{"title": "no text field"}\nnot json\n')
    (tmp_path / "empty.txt").write_text("")
    mujina_data("shard", "--input", str(tmp_path / "in.jsonl"), str(tmp_path / "empty.txt"),
                "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "out"), "--source", "web")
    m, ids = _all_docs(tmp_path / "out")
    tok = Tokenizer(tokenizer_dir)
    assert m.tokenizer_sha256 == tok.sha256
    assert {s.language for s in m.shards} == {"ja", "en"} and {s.source for s in m.shards} == {"web"}
    assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in ids)
    decoded = sorted(tok.decode(d[1:-1]) for d in ids)
    assert decoded == sorted(normalize(t) for t in good_ja + good_en)  # every kept document exactly once
    dropped = m.report["dropped"]
    for reason, ds in bad.items():
        assert dropped.get(reason, 0) >= len(ds), (reason, dropped)
    for reason in ("invalid_utf8", "missing_text_field", "invalid_json", "empty_file"):
        assert dropped.get(reason) == 1, (reason, dropped)
    read = m.report["documents_read"]
    assert read == len(docs)  # the three broken lines and the empty file were counted while reading
    assert read == len(ids) + sum(v for k, v in dropped.items()
                                  if k not in ("invalid_utf8", "missing_text_field", "invalid_json", "empty_file"))


def test_same_input_gives_byte_identical_shards(tmp_path, corpus, tokenizer_dir):
    for out, workers in (("a", "2"), ("b", "1")):  # whatever the number of worker processes
        mujina_data("shard", "--input", *map(str, corpus["files"]), "--tokenizer", str(tokenizer_dir),
                    "--out", str(tmp_path / out), "--shard-tokens", "5000", "--workers", workers)
    a, b = Manifest.load(tmp_path / "a"), Manifest.load(tmp_path / "b")
    assert [s.file for s in a.shards] == [s.file for s in b.shards] and len(a.shards) > 4
    for s in a.shards:
        assert (tmp_path / "a" / s.file).read_bytes() == (tmp_path / "b" / s.file).read_bytes()


def test_forked_and_spawned_workers_give_the_same_shards(tmp_path, corpus, tokenizer_dir, caplog):
    """Workers are forked when the caller runs no other thread (the CLI) and spawned when it does: the same bytes."""
    r = mujina_data("shard", "--input", *map(str, corpus["files"]), "--tokenizer", str(tokenizer_dir),
                    "--out", str(tmp_path / "fork"), "--shard-tokens", "5000", "--workers", "2")
    assert "2 worker processes (fork)" in r.stderr
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with caplog.at_level(logging.INFO, logger="data_shards.build"):
            spawned = build_shards(corpus["files"], tokenizer_dir, tmp_path / "spawn",
                                   ShardConfig(shard_tokens=5000, workers=2))
    finally:
        stop.set()
        other.join()
    assert "2 worker processes (spawn)" in caplog.text
    assert [s.file for s in spawned.shards] == [s.file for s in Manifest.load(tmp_path / "fork").shards]


def test_interrupted_run_resumes_without_rewriting_finished_shards(tmp_path, corpus, tokenizer_dir):
    args = ["shard", "--input", *map(str, corpus["files"]), "--tokenizer", str(tokenizer_dir),
            "--shard-tokens", "5000"]
    mujina_data(*args, "--out", str(tmp_path / "ref"))
    ref = Manifest.load(tmp_path / "ref")

    # What a run killed after its first few shards leaves behind: those shards and their journal lines.
    out = tmp_path / "cut"
    out.mkdir()
    journal = (tmp_path / "ref" / ".journal.jsonl").read_text().splitlines()
    kept = journal[:3]
    (out / ".journal.jsonl").write_text("\n".join(kept) + "\n" + journal[3][: len(journal[3]) // 2])  # torn line
    for line in kept:
        shutil.copy2(tmp_path / "ref" / json.loads(line)["shard"]["file"], out)
    before = {p.name: os.stat(p).st_mtime_ns for p in out.glob("*.bin")}
    r = mujina_data(*args, "--out", str(out))
    assert "resuming: 3 shards already written" in r.stderr
    got = Manifest.load(out)
    assert [s.file for s in got.shards] == [s.file for s in ref.shards]
    assert {p: os.stat(out / p).st_mtime_ns for p in before} == before  # finished shards untouched


# Runs build_shards with 2 forked workers, 16 documents a batch, in a fresh interpreter, after making the workers'
# _prepare misbehave on the batch whose first document's text is argv[4]: "kill" (SIGKILL itself) or "raise".
_MISBEHAVING_WORKER = """
import json, os, signal, sys
import data_shards.build as b
inputs, tok, out, marker, how = sys.argv[1].split(","), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
prepare = b._prepare
def misbehaving(job):
    if json.loads(job[0][0][0])["text"] == marker:  # JSON lines reach the workers unparsed
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError("this batch is cursed")
    return prepare(job)
b._prepare = misbehaving
try:
    b.build_shards(inputs, tok, out, b.ShardConfig(workers=2, batch_docs=16, shard_tokens=3000))
except Exception as e:
    print(f"{type(e).__name__}: {e} (cause: {type(e.__cause__).__name__})")
    sys.exit(1)
"""


@pytest.mark.parametrize("how", ["kill", "raise"])
def test_a_failing_worker_stops_the_run_which_then_resumes(tmp_path, corpus, tokenizer_dir, how):
    """A worker killed mid-batch (or raising) stops the run with a clear error, never a hang or a partial
    manifest; rerunning the command resumes and ends with the shards of an undisturbed run."""
    import subprocess
    import sys
    files = ",".join(map(str, corpus["files"]))
    marker = corpus["ja"][16 * 7]  # the first document of the 8th batch
    r = subprocess.run([sys.executable, "-c", _MISBEHAVING_WORKER, files, str(tokenizer_dir), str(tmp_path / "out"),
                        marker, how], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    if how == "kill":
        assert "RuntimeError: shard worker" in r.stdout and "died (exit code -9)" in r.stdout, r.stdout
    else:
        assert "ValueError: this batch is cursed (cause: _WorkerTraceback)" in r.stdout, r.stdout
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert (tmp_path / "out" / ".journal.jsonl").read_text().count("\n") >= 1  # shards finished before it
    args = ["shard", "--input", *map(str, corpus["files"]), "--tokenizer", str(tokenizer_dir), "--shard-tokens", "3000"]
    resumed = mujina_data(*args, "--out", str(tmp_path / "out"))
    assert "resuming:" in resumed.stderr
    mujina_data(*args, "--out", str(tmp_path / "ref"))
    assert Manifest.load(tmp_path / "out").shards == Manifest.load(tmp_path / "ref").shards


def test_input_damaged_midway_stops_the_run_with_its_error(tmp_path, corpus, tokenizer_dir):
    """A gzip file cut short, met by the reading thread while the workers are busy with the earlier input:
    the CLI stops with the reader's own error (exit 2), not a hang and not a manifest."""
    import gzip
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(corpus["files"][1].read_bytes())[:5000])
    r = mujina_data("shard", "--input", str(corpus["files"][0]), str(cut), "--tokenizer", str(tokenizer_dir),
                    "--out", str(tmp_path / "out"), "--workers", "2", check=False)
    assert r.returncode == 2 and "cut.jsonl.gz: corrupt or truncated gzip" in r.stderr, r.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_chat_records_get_assistant_only_loss_masks(tmp_path, tokenizer_dir):
    rec = {"messages": [{"role": "user", "content": "日本の首都はどこですか？"},
                        {"role": "assistant", "content": "日本の首都は東京です。"}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(rec, ensure_ascii=False) + "\n")
    mujina_data("shard", "--input", str(tmp_path / "chat.jsonl"), "--tokenizer", str(tokenizer_dir),
                "--out", str(tmp_path / "out"), "--no-dedup")
    m = Manifest.load(tmp_path / "out")
    (shard,) = m.shards
    assert shard.source.endswith(":chat")
    r = ShardReader(tmp_path / "out" / shard.file, verify=True)
    tok = Tokenizer(tokenizer_dir)
    ids, mask = np.asarray(r.document(0)).tolist(), np.asarray(r.document_mask(0))
    learned = [i for i, keep in zip(ids, mask, strict=True) if keep]
    assert tok.decode(learned) == "日本の首都は東京です。<|end|>"


def test_unknown_file_type_fails_before_any_work(tmp_path, tokenizer_dir):
    (tmp_path / "data.xml").write_text("<doc/>")
    r = mujina_data("shard", "--input", str(tmp_path / "data.xml"), "--tokenizer", str(tokenizer_dir),
                    "--out", str(tmp_path / "out"), check=False)
    assert r.returncode == 2 and "data.xml" in r.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_stats_reports_languages_and_packing(shard_dirs):
    st = json.loads(mujina_data("stats", str(shard_dirs["ja"]), "--seq-len", "256", "--json", "--verify").stdout)
    assert set(st["languages"]) == {"ja"} and st["documents"] > 0
    assert 0 < st["languages"]["ja"]["tokens_per_character"] < 2
    assert 0.9 < st["fill_rate"] <= 1.0
    assert st["split_documents"] <= st["concat_split_documents"]


@pytest.mark.parametrize("flag", ["--lang=xx"])
def test_bad_arguments_are_refused(tmp_path, corpus, tokenizer_dir, flag):
    r = mujina_data("shard", "--input", str(corpus["files"][0]), "--tokenizer", str(tokenizer_dir),
                    "--out", str(tmp_path / "o"), flag, check=False)
    assert r.returncode == 2
