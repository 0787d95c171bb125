"""The mixture loader: proportions by weight, exact resumption from state_dict, rank splits that add up to
the single-process batch, and refusal of mismatched or corrupted shards. The trainer reads it too."""

import json
import shutil

import numpy as np
import pytest
import torch

from data_shards.loader import MixtureLoader, SourceSpec
from data_shards.shards import Manifest, ShardError
from data_shards.tokenizer import Tokenizer
from tests.conftest import REPO, mujina_train


def _loader(shard_dirs, **kw):
    specs = [SourceSpec(str(shard_dirs["ja"]), 0.75), SourceSpec(str(shard_dirs["en"]), 0.25)]
    return MixtureLoader(specs, seq_len=128, seed=0, block_docs=16, **kw)


def test_weights_set_the_mixture_exactly(shard_dirs, tokenizer_dir):
    loader = _loader(shard_dirs)
    picks = [loader._pick() for _ in range(400)]
    assert picks.count(0) == 300 and picks.count(1) == 100  # smooth weighted round-robin: exact shares
    tok = Tokenizer(tokenizer_dir)
    b = _loader(shard_dirs).next_batch(8)
    assert b.input_ids.shape == (8, 128) and b.labels.shape == (8, 128)
    assert (b.input_ids == tok.bos_id).any()


def test_state_dict_resumes_exactly_across_epochs(shard_dirs):
    a = _loader(shard_dirs)
    for _ in range(2000):  # until a source wraps into its second epoch
        a.next_batch(8)
        if any(s.epoch > 0 for s in a.sources):
            break
    assert any(s.epoch > 0 for s in a.sources)
    state = json.loads(json.dumps(a.state_dict()))  # travels as JSON in trainer_state.json
    b = _loader(shard_dirs)
    b.load_state_dict(state)
    for _ in range(5):
        x, y = a.next_batch(8), b.next_batch(8)
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.doc_ids, y.doc_ids)


def test_ranks_split_the_single_process_batch(shard_dirs):
    whole = _loader(shard_dirs)
    ranks = [_loader(shard_dirs, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        w = whole.next_batch(8)
        parts = [r.next_batch(8) for r in ranks]
        assert torch.equal(torch.cat([p.input_ids for p in parts]), w.input_ids)
        assert torch.equal(torch.cat([p.labels for p in parts]), w.labels)
    with pytest.raises(ValueError, match="not divisible by world size"):
        ranks[0].next_batch(7)


def test_every_document_appears_once_per_epoch(shard_dirs):
    # One source, one epoch: the packed sequences hold every token of every document exactly once.
    src = MixtureLoader([SourceSpec(str(shard_dirs["en"]), 1.0)], seq_len=64, seed=3, block_docs=7).sources[0]
    seen = {}
    while src.epoch == 0:
        for c in src.next_bin():
            seen.setdefault(c.doc, []).append((c.start, c.end))
    assert sorted(seen) == list(range(src.num_documents))
    for doc, spans in seen.items():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == src.lengths[doc]
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_mismatched_tokenizer_and_corrupted_shards_are_refused(shard_dirs, tmp_path):
    with pytest.raises(ShardError, match="re-shard the data"):
        _loader(shard_dirs, tokenizer_sha256="0" * 64)
    bad = tmp_path / "en"
    shutil.copytree(shard_dirs["en"], bad)
    victim = bad / Manifest.load(bad).shards[0].file
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="corrupted"):
        MixtureLoader([SourceSpec(str(bad), 1.0)], seq_len=64, seed=0, verify=True)


@pytest.mark.slow  # two training runs
def test_trainer_on_shards_resumes_exactly(shard_dirs, tokenizer_dir, tmp_path):
    mix = json.dumps([{"path": str(shard_dirs["ja"]), "weight": 0.6}, {"path": str(shard_dirs["en"]), "weight": 0.4}])
    args = ["--config", str(REPO / "configs" / "debug.yaml"), "--set", "data.source=shards", "--set",
            f"data.mixture={mix}", "--set", f"data.eval_mixture={mix}", "--set", "model.vocab_size=1200",
            "--set", "data.seq_len=64", "--set", "train.steps=12", "--set", "train.save_every=3",
            "--set", "train.keep_checkpoints=10", "--set", "train.log_every=1", "--set", "train.eval_every=12",
            "--set", "train.batch_size=8", "--set", "train.micro_batch_size=4"]
    mujina_train(*args, "--out", str(tmp_path / "full"))
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert full[-1]["loss"] < full[0]["loss"] and "eval_loss" in full[-1]
    assert (tmp_path / "full" / "final" / "tokenizer" / "tokenizer.model").exists()  # exportable with its tokenizer

    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_000006", tmp_path / "cut" / "checkpoints" / "step_000006")
    mujina_train(*args, "--out", str(tmp_path / "cut"))
    cut = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines())}
    for r in full[6:]:
        assert cut[r["step"]] == pytest.approx(r["loss"], rel=0, abs=1e-6)
    assert np.isfinite(list(cut.values())).all()


def test_trainer_refuses_shards_from_another_tokenizer(shard_dirs, corpus, tmp_path):
    # A checkpoint that carries tokenizer B, continued on shards made with tokenizer A: refused before training.
    from tests.conftest import mujina_model
    from tests.data_shards.conftest import mujina_data

    mujina_data("tokenizer", "train", "--input", *map(str, corpus["files"]), "--vocab-size", "1100",
                "--out", str(tmp_path / "other-tok"))
    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps({"preset": "debug", "vocab_size": 1200}))
    mujina_model("init", "--preset", str(cfg), "--out", str(tmp_path / "ckpt"))
    shutil.copytree(tmp_path / "other-tok", tmp_path / "ckpt" / "tokenizer")
    mix = json.dumps([{"path": str(shard_dirs["ja"]), "weight": 1.0}])
    r = mujina_train("--config", str(REPO / "configs" / "debug.yaml"), "--set", "model=null", "--set",
                     f"init_from={tmp_path / 'ckpt'}", "--set", "data.source=shards", "--set", f"data.mixture={mix}",
                     "--set", "train.eval_every=0", "--set", "data.seq_len=64", "--out", str(tmp_path / "run"),
                     check=False)
    assert r.returncode == 2 and "re-shard the data with this tokenizer" in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
