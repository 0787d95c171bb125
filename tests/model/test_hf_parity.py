"""Parity with Hugging Face transformers, through the real conversion commands, both directions:
export ours and load as LlamaForCausalLM / MixtralForCausalLM; build theirs and import. The
reference is transformers' own forward pass (fp32, max abs diff <= 1e-5)."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

from model import load_checkpoint
from tests.conftest import mujina_model

TOL = 1e-5
SHAPES = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6,
              num_kv_heads=2, max_seq_len=64, rope_theta=12345.0)  # GQA (3 q heads per kv) + odd theta


def _ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def _ours_vs_hf(ckpt, hf_dir):
    ours = load_checkpoint(ckpt).eval()
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    x = _ids(ours.cfg.vocab_size)
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    return diff, ours, theirs


@pytest.mark.parametrize("moe, arch", [(None, "LlamaForCausalLM"),
                                       ({"num_experts": 4, "top_k": 2}, "MixtralForCausalLM")])
def test_export_loads_in_transformers_with_same_logits(tmp_path, moe, arch):
    cfg_file = tmp_path / "m.json"
    cfg_file.write_text(json.dumps({**SHAPES, "moe": moe}))
    mujina_model("init", "--preset", str(cfg_file), "--seed", "3", "--out", str(tmp_path / "ckpt"))
    mujina_model("export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"))
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["architectures"] == [arch]
    assert hf_cfg["rope_theta"] == 12345.0  # written explicitly, never left to the reader's default
    diff, _, theirs = _ours_vs_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert type(theirs).__name__ == arch
    assert diff <= TOL
    if moe:
        from safetensors import safe_open

        with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys  # legacy Mixtral names


def _hf_llama(tie=False):
    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=2500.0, tie_word_embeddings=tie))


def _hf_mixtral():
    torch.manual_seed(2)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, max_position_embeddings=64, rope_theta=777.0, num_local_experts=4,
        num_experts_per_tok=2))


@pytest.mark.parametrize("make", [_hf_llama, _hf_mixtral,
                                  pytest.param(lambda: _hf_llama(tie=True), marks=pytest.mark.slow)],
                         ids=["llama", "mixtral", "llama-tied"])
def test_import_from_transformers_gives_same_logits(tmp_path, make):
    hf = make()
    hf.save_pretrained(tmp_path / "hf")
    mujina_model("import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"))
    diff, ours, _ = _ours_vs_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert diff <= TOL
    assert ours.cfg.rope_theta == hf.config.rope_parameters["rope_theta"]
    # and back again: export of the import loads with the same logits too
    mujina_model("export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf2"))
    assert _ours_vs_hf(tmp_path / "ckpt", tmp_path / "hf2")[0] <= TOL


def test_import_reads_fused_expert_layout(tmp_path):
    # transformers >= 5 holds Mixtral experts fused in memory (gate_up_proj [E, 2F, D]); a directory
    # written straight from that state dict must import like the legacy one.
    hf = _hf_mixtral()
    hf.save_pretrained(tmp_path / "legacy")
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((tmp_path / "legacy" / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any("gate_up_proj" in k for k in state)
    save_file(state, str(fused / "model.safetensors"))
    mujina_model("import", "--hf", str(fused), "--out", str(tmp_path / "ckpt"))
    assert _ours_vs_hf(tmp_path / "ckpt", tmp_path / "legacy")[0] <= TOL


@pytest.mark.slow
def test_sharded_and_bf16_export(tmp_path):
    mujina_model("init", "--preset", "debug", "--out", str(tmp_path / "ckpt"))
    mujina_model("export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"),
                 "--max-shard-size", "100KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "hf" / s).exists() for s in shards)
    assert shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    assert _ours_vs_hf(tmp_path / "ckpt", tmp_path / "hf")[0] <= TOL

    mujina_model("export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "bf"),
                 "--dtype", "bfloat16")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "bf", dtype="auto")
    assert theirs.dtype == torch.bfloat16
    # the import of a bf16 export stays bf16
    mujina_model("import", "--hf", str(tmp_path / "bf"), "--out", str(tmp_path / "bf-ckpt"))
    assert load_checkpoint(tmp_path / "bf-ckpt").tok_embeddings.weight.dtype == torch.bfloat16


@pytest.mark.slow
def test_tokenizer_travels_with_export_and_sampling_decodes_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(40)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    mujina_model("init", "--preset", "debug", "--out", str(tmp_path / "ckpt"))
    fast.save_pretrained(tmp_path / "ckpt" / "tokenizer")
    mujina_model("export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"))
    loaded = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert loaded("w3 w7").input_ids == fast("w3 w7").input_ids
    out = json.loads(mujina_model("sample", "--hf", str(tmp_path / "hf"), "--prompt", "w1 w2",
                                  "--max-new-tokens", "4").stdout)
    assert len(out["generated_ids"]) == 4 and isinstance(out["text"], str)
    # import brings the tokenizer back into the checkpoint
    mujina_model("import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))
    assert (tmp_path / "back" / "tokenizer" / "tokenizer.json").exists()


def test_import_refuses_what_it_cannot_represent(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    r = mujina_model("import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "x"), check=False)
    assert r.returncode == 2 and "gpt2" in r.stderr and "llama and mixtral" in r.stderr
    r = mujina_model("import", "--hf", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), check=False)
    assert r.returncode == 2 and "config.json" in r.stderr
    r = mujina_model("export", "--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "y"), check=False)
    assert r.returncode == 2 and "is this a Hugging Face directory" in r.stderr
