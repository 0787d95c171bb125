"""The shard file format: exact round trip, content-addressed names, and refusal of anything damaged."""

import hashlib

import numpy as np
import pytest

from data_shards.shards import HEADER, ShardError, ShardReader, write_shard


def _docs(seed=0, n=20, vocab=70000):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, 50))) for _ in range(n)]


@pytest.mark.parametrize("vocab", [1000, 70000])  # uint16 and uint32 token ids
def test_round_trip_and_name_is_sha256(tmp_path, vocab):
    docs = _docs(vocab=vocab)
    name, tokens, n = write_shard(tmp_path, docs, vocab)
    path = tmp_path / name
    assert name == hashlib.sha256(path.read_bytes()).hexdigest() + ".bin"
    r = ShardReader(path, verify=True)
    assert (r.num_documents, r.num_tokens) == (n, tokens) == (len(docs), sum(map(len, docs)))
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(r.document(i), d)
    np.testing.assert_array_equal(r.lengths(), [len(d) for d in docs])
    assert r.tokens.dtype.itemsize == (2 if vocab <= 65536 else 4)
    assert write_shard(tmp_path, docs, vocab)[0] == name  # same content, same name


def test_loss_masks_round_trip(tmp_path):
    docs = _docs(vocab=1000, n=5)
    masks = [np.arange(len(d)) % 2 for d in docs]
    r = ShardReader(tmp_path / write_shard(tmp_path, docs, 1000, masks)[0], verify=True)
    assert r.has_mask
    for i, m in enumerate(masks):
        np.testing.assert_array_equal(r.document_mask(i), m)


def test_truncated_corrupted_and_foreign_files_are_refused(tmp_path):
    name = write_shard(tmp_path, _docs(vocab=1000), 1000)[0]
    good = (tmp_path / name).read_bytes()

    (tmp_path / "cut.bin").write_bytes(good[:-3])
    with pytest.raises(ShardError, match="truncated or corrupted"):
        ShardReader(tmp_path / "cut.bin")

    flipped = bytearray(good)
    flipped[-1] ^= 0xFF  # a token changed: sizes still fine, only the hash can tell
    (tmp_path / name).write_bytes(bytes(flipped))
    ShardReader(tmp_path / name)  # without verification it opens...
    with pytest.raises(ShardError, match="SHA-256 .* does not match its file name"):
        ShardReader(tmp_path / name, verify=True)  # ...with verification it is refused
    with pytest.raises(ShardError, match="does not match its manifest"):
        ShardReader(tmp_path / name, expected_sha256=hashlib.sha256(good).hexdigest())

    (tmp_path / "x.bin").write_bytes(b"PK\x03\x04" + good[4:])
    with pytest.raises(ShardError, match="not a mujina shard"):
        ShardReader(tmp_path / "x.bin")
    (tmp_path / "tiny.bin").write_bytes(good[: HEADER.size - 1])
    with pytest.raises(ShardError, match="smaller than the header"):
        ShardReader(tmp_path / "tiny.bin")
    with pytest.raises(FileNotFoundError):
        ShardReader(tmp_path / "missing.bin")
