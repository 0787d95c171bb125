"""Upcycling through `mujina-model upcycle`: exact without noise (reference: the dense model's own
logits), and Drop-Upcycling re-initialises exactly the requested share of each expert's neurons."""

import json

import pytest
import torch

from model import load_checkpoint
from tests.conftest import mujina_model


@pytest.fixture
def dense(tmp_path):
    cfg = tmp_path / "dense.json"  # GQA and a non-default rope base, so nothing passes by accident
    cfg.write_text(json.dumps({"preset": "debug", "num_heads": 8, "num_kv_heads": 2, "rope_theta": 3000.0}))
    mujina_model("init", "--preset", str(cfg), "--seed", "7", "--out", str(tmp_path / "dense"))
    return tmp_path / "dense"


def _logits(ckpt, seed=0):
    net = load_checkpoint(ckpt).eval()
    x = torch.randint(0, net.cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return net(x)


# the fast lane upcycles one shape; the other two are the same path
@pytest.mark.parametrize("experts, top_k", [(4, 2), pytest.param(8, 2, marks=pytest.mark.slow),
                                            pytest.param(3, 1, marks=pytest.mark.slow)])
def test_upcycled_logits_equal_dense(tmp_path, dense, experts, top_k):
    (dense / "tokenizer").mkdir()
    (dense / "tokenizer" / "tokenizer_config.json").write_text("{}")
    out = mujina_model("upcycle", "--checkpoint", str(dense), "--experts", str(experts), "--top-k", str(top_k),
                       "--out", str(tmp_path / "moe"))
    assert "logits equal" in out.stdout
    moe = load_checkpoint(tmp_path / "moe")
    assert (moe.cfg.moe.num_experts, moe.cfg.moe.top_k) == (experts, top_k)
    assert (_logits(tmp_path / "moe") - _logits(dense)).abs().max().item() <= 1e-5
    assert (tmp_path / "moe" / "tokenizer" / "tokenizer_config.json").exists()  # the tokenizer comes along


def test_drop_upcycling_reinitialises_the_requested_share(tmp_path, dense):
    mujina_model("upcycle", "--checkpoint", str(dense), "--experts", "4", "--top-k", "2",
                 "--drop-ratio", "0.25", "--seed", "1", "--out", str(tmp_path / "moe"))
    d, m = load_checkpoint(dense), load_checkpoint(tmp_path / "moe")
    F_ = d.cfg.intermediate_size
    for layer_d, layer_m in zip(d.layers, m.layers, strict=True):
        w1, w2 = layer_d.feed_forward.w1.weight, layer_d.feed_forward.w2.weight
        dropped_sets = []
        for e in range(4):
            changed_rows = (layer_m.feed_forward.w1_EFD[e] != w1).any(dim=1)
            changed_cols = (layer_m.feed_forward.w2_EDF[e] != w2).any(dim=0)
            assert int(changed_rows.sum()) == round(0.25 * F_)
            assert torch.equal(changed_rows, changed_cols)  # a neuron is dropped whole: w1/w3 row + w2 column
            dropped_sets.append(changed_rows)
        assert not all(torch.equal(dropped_sets[0], s) for s in dropped_sets[1:])  # experts now differ
    assert (_logits(tmp_path / "moe") - _logits(dense)).abs().max().item() > 1e-3


def test_noise_breaks_symmetry(tmp_path, dense):
    mujina_model("upcycle", "--checkpoint", str(dense), "--experts", "2", "--top-k", "1",
                 "--noise-std", "0.01", "--out", str(tmp_path / "moe"))
    d, m = load_checkpoint(dense), load_checkpoint(tmp_path / "moe")
    delta = m.layers[0].feed_forward.w1_EFD - d.layers[0].feed_forward.w1.weight
    assert 0.008 < delta.std().item() < 0.012
    assert not torch.equal(m.layers[0].feed_forward.w1_EFD[0], m.layers[0].feed_forward.w1_EFD[1])


@pytest.mark.slow
def test_upcycling_a_moe_is_refused(tmp_path, dense):
    mujina_model("upcycle", "--checkpoint", str(dense), "--experts", "2", "--top-k", "1", "--out", str(tmp_path / "m"))
    r = mujina_model("upcycle", "--checkpoint", str(tmp_path / "m"), "--experts", "2", "--top-k", "1",
                     "--out", str(tmp_path / "m2"), check=False)
    assert r.returncode == 2 and "already a Mixture-of-Experts" in r.stderr
    r = mujina_model("upcycle", "--checkpoint", str(dense), "--experts", "2", "--top-k", "3",
                     "--out", str(tmp_path / "m3"), check=False)
    assert r.returncode == 2 and "top_k=3" in r.stderr
