"""LoRA checkpoints as Hugging Face artefacts (model/peft_io.py): the exported base with the PEFT adapter,
loaded by peft itself, against our LoRA network; the merged export against the unmerged network."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.finetune import load_lora_checkpoint, write_lora_spec
from model.hf import export_hf
from model.lora import LoraSpec
from model.peft_io import base_of_lora_checkpoint, merge_lora_checkpoint, write_peft_adapter
from model.transformer import Transformer
from tests.model.test_lora import with_random_adapters

SHAPES = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6, num_kv_heads=2,
              max_seq_len=64, rope_theta=12345.0)


def lora_checkpoint(path, moe, targets, rslora=False):
    """What a finetune.mode lora run saves: base + adapters (B random, so the adapters matter) + lora.json."""
    torch.manual_seed(0)
    net = Transformer(ModelConfig.from_dict({**SHAPES, "moe": moe}))
    spec = LoraSpec(r=4, alpha=8, targets=targets, rslora=rslora)
    with_random_adapters(net, spec)
    save_checkpoint(path, net)
    write_lora_spec(path, spec)
    return path


@pytest.mark.parametrize("moe, targets", [
    (None, ("wq", "wk", "wv", "wo", "w1", "w2", "w3")),
    ({"num_experts": 4, "top_k": 2}, ("wq", "wv", "experts")),
    ({"num_experts": 4, "top_k": 2}, ("wo", "experts", "router")),
], ids=["llama", "mixtral", "mixtral-router"])
def test_the_peft_adapter_on_the_exported_base_gives_our_logits(tmp_path, moe, targets):
    ckpt = lora_checkpoint(tmp_path / "lora", moe, targets, rslora=moe is None)
    export_hf(base_of_lora_checkpoint(ckpt, tmp_path / "base"), tmp_path / "hf_base")
    write_peft_adapter(ckpt, tmp_path / "adapter", base_name=str(tmp_path / "hf_base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    ours = load_lora_checkpoint(ckpt).eval()
    x = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base").eval()
    with torch.no_grad():
        plain = base(x).logits.clone()
        theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        want = ours(x)
        got = theirs(x).logits
    assert (want - plain).abs().max() > 1e-3  # the adapters change the output: the comparison means something
    assert (got - want).abs().max() <= 1e-4
    # the merged export is the same network
    export_hf(merge_lora_checkpoint(ckpt, tmp_path / "merged"), tmp_path / "hf_merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_merged").eval()
    with torch.no_grad():
        assert (merged(x).logits - want).abs().max() <= 1e-5


def test_a_plain_checkpoint_is_not_a_lora_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "plain", Transformer(ModelConfig.from_dict(SHAPES)))
    with pytest.raises(ValueError, match="not a LoRA checkpoint"):
        write_peft_adapter(tmp_path / "plain", tmp_path / "adapter", base_name="x")


@pytest.mark.parametrize("text", ["not json", '{"r": 4}', '{"r": 4, "alpha": 8, "targets": ["wq"], "bias": 1}',
                                  '{"r": 0, "alpha": 8, "targets": ["wq"]}'])
def test_a_broken_lora_json_is_a_clear_error_through_the_cli(tmp_path, text):
    from tests.conftest import mujina_model

    ckpt = lora_checkpoint(tmp_path / "lora", None, ("wq",))
    (ckpt / "lora.json").write_text(text)
    r = mujina_model("merge", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m"), check=False)
    assert r.returncode == 2 and "is not a LoRA spec" in r.stderr and "Traceback" not in r.stderr, r.stderr
