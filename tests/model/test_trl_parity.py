"""mujina's DPO loss and metrics against trl's DPOTrainer (the reference implementation) on the exported Hugging Face
models and the same batch of the coordinator's pairs: |diff| <= 1e-5. trl is a test-only dependency."""

from __future__ import annotations

import json
import random

import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.hf import export_hf
from model.lora import LoraSpec, add_lora, lora_modules, merge_lora
from model.objectives import completion_logps, dpo_loss
from model.preference import PreferenceData
from model.transformer import Transformer
from tests.data_shards.corpus import english_documents


@pytest.mark.parametrize("moe", [None, {"num_experts": 4, "top_k": 2}], ids=["llama", "mixtral"])
def test_dpo_loss_and_rewards_equal_trls(tmp_path, moe):
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    from data_shards.tokenizer import Tokenizer as Ours
    from data_shards.tokenizer import TokenizerTrainConfig, train_tokenizer

    docs = english_documents(40, seed=3)
    train_tokenizer(docs, tmp_path / "tok", TokenizerTrainConfig(vocab_size=400, mecab=False, threads=1))
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"preset": "debug", "vocab_size": Ours(tmp_path / "tok").vocab_size, "num_layers": 2,
                                 "hidden_size": 48, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 96,
                                 "max_seq_len": 128, "moe": moe})
    save_checkpoint(tmp_path / "ref", Transformer(cfg))
    policy = load_checkpoint(tmp_path / "ref")  # the reference moved by a random low-rank update
    g = torch.Generator().manual_seed(1)
    add_lora(policy, LoraSpec(r=4, alpha=8), generator=g)
    with torch.no_grad():
        for m in lora_modules(policy):
            for name, p in m.named_parameters():
                if "B" in name:
                    p.normal_(0.0, 0.05, generator=g)
    save_checkpoint(tmp_path / "policy", merge_lora(policy))
    sentences = [s for d in docs for s in d.replace("\n", " ").split(". ") if 20 < len(s) < 70]
    r = random.Random(0)
    with open(tmp_path / "dpo.jsonl", "w") as f:
        for _ in range(6):
            q, a, b = r.sample(sentences, 3)
            f.write(json.dumps({"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": b}) + "\n")
    batch = PreferenceData(tmp_path / "dpo.jsonl", tmp_path / "tok", 120, 0, 0.0, cfg.vocab_size) \
        .micro_batches("train", 0, 1, 6)[0]
    beta, B = 0.1, batch.pairs

    ours_policy, ours_ref = load_checkpoint(tmp_path / "policy").eval(), load_checkpoint(tmp_path / "ref").eval()
    with torch.no_grad():
        lp, _ = completion_logps(ours_policy(batch.input_ids), batch.input_ids, batch.completion)
        rp, _ = completion_logps(ours_ref(batch.input_ids), batch.input_ids, batch.completion)
    loss, stats = dpo_loss(lp[:B], lp[B:], rp[:B], rp[B:], beta)

    for name in ("policy", "ref"):
        export_hf(tmp_path / name, tmp_path / f"hf_{name}")
    hf_policy = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_policy", dtype=torch.float32).eval()
    hf_ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_ref", dtype=torch.float32).eval()
    # trl needs a tokenizer and a dataset to construct; the batch itself is ours, given to its loss directly
    words = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "</s>": 2, "a": 3}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tk = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, report_to=[], use_cpu=True, bf16=False,
                     router_aux_loss_coef=0.0)  # the MoE aux term is each trainer's own: compare the DPO term
    trainer = DPOTrainer(model=hf_policy, ref_model=hf_ref, args=args, processing_class=tk,
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "a", "rejected": "a"}] * 2))
    attention = torch.zeros_like(batch.input_ids)
    for i, row in enumerate(batch.input_ids):
        attention[i, : int(row.nonzero().max()) + 1] = 1
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, {"input_ids": batch.input_ids, "attention_mask": attention,
                                                       "completion_mask": batch.completion}, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    assert abs(loss.item() - theirs.item()) <= 1e-5
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert abs(stats[key] - metrics[key]) <= 1e-5 * max(1.0, abs(metrics[key])), (key, stats[key], metrics[key])
    assert stats["rewards/margins"] != 0.0  # the policy is not its reference: the comparison means something
