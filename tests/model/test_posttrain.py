"""Post-training through `mujina-train` (model/finetune.py): DPO and SFT, full and LoRA, on a tiny MoE with a
real SentencePiece tokenizer and the coordinator's dpo.jsonl format. Each test names its reference: ln 2 at
the start of DPO, the uninterrupted run for resumption, the unmerged network for the merged final."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import mujina_train, run_cli
from tests.data_shards.corpus import english_documents


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer, a base MoE checkpoint that carries it, preference pairs and chat records."""
    from data_shards.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig
    from model.transformer import Transformer

    root = tmp_path_factory.mktemp("posttrain")
    docs = english_documents(80, seed=7)
    train_tokenizer(docs, root / "tok", TokenizerTrainConfig(vocab_size=600, mecab=False, threads=1))
    vocab = Tokenizer(root / "tok").vocab_size
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"preset": "debug", "vocab_size": vocab, "num_layers": 2, "hidden_size": 64,
                                 "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128, "max_seq_len": 128,
                                 "moe": {"num_experts": 4, "top_k": 2}})
    save_checkpoint(root / "base", Transformer(cfg), tokenizer_dir=root / "tok")
    sentences = [s for d in docs for s in d.replace("\n", " ").split(". ") if 20 < len(s) < 80]
    r = random.Random(0)
    with open(root / "dpo.jsonl", "w") as f:  # a constructed preference: the same answer, politely or not
        for _ in range(120):
            q, a = r.sample(sentences, 2)
            f.write(json.dumps({"prompt": [{"role": "user", "content": q}], "chosen": "Sure! " + a,
                                "rejected": "No way. " + a, "scores": {"chosen": 9, "rejected": 2}}) + "\n")
    return root


def dpo_config(world: Path, path: Path, mode: str = "lora", **train) -> Path:
    cfg = {"finetune": {"mode": mode, "init_from": str(world / "base"), "r": 8, "alpha": 16, "beta": 0.1},
           "data": {"source": "dpo", "path": str(world / "dpo.jsonl"), "seq_len": 96, "eval_fraction": 0.2},
           "optim": {"lr": 3.0e-3 if mode == "lora" else 1.0e-3, "warmup_steps": 2},
           "train": {"objective": "dpo", "steps": 30, "batch_size": 8, "micro_batch_size": 4, "log_every": 1,
                     "eval_every": 30, "eval_batches": 4, "dtype": "fp32", "save_every": 10, **train}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_dpo_starts_at_ln2_and_logs_trls_metrics(world, tmp_path, mode):
    config = dpo_config(world, tmp_path / "dpo.yaml", mode, steps=2, eval_every=0)
    mujina_train("--config", str(config), "--out", str(tmp_path / "run"))
    first = records(tmp_path / "run")[1]
    assert abs(first["loss"] - math.log(2)) <= 1e-6  # the policy is its reference before the first update
    assert first["rewards/margins"] == 0.0 and first["rewards/accuracies"] == 0.0
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(first)
    assert first["logps/chosen"] < 0 and first["aux_loss"] > 0  # summed completion log-probs; the MoE aux loss


@pytest.mark.slow  # two 30-step runs and a resumed one (about 15 s)
def test_lora_dpo_learns_the_preference_resumes_exactly_and_merges(world, tmp_path):
    from model.checkpoint import load_checkpoint
    from model.finetune import load_lora_checkpoint
    from model.objectives import completion_logps
    from model.preference import PreferenceData

    config = dpo_config(world, tmp_path / "dpo.yaml")
    mujina_train("--config", str(config), "--out", str(tmp_path / "straight"))
    last = records(tmp_path / "straight")[30]
    assert last["eval_rewards/accuracies"] >= 0.9  # held-out pairs
    # the chosen answers did not collapse: their held-out log-probability under the final model vs the base
    data = PreferenceData(world / "dpo.jsonl", world / "tok", 96, 0, 0.2, 600)
    pairs = data.micro_batches("eval", 0, 1, len(data.split["eval"]))[0]

    def chosen_logps(net):
        with torch.no_grad():
            lp, _ = completion_logps(net(pairs.input_ids), pairs.input_ids, pairs.completion)
        return lp[:pairs.pairs].sum().item()

    base, final = load_checkpoint(world / "base"), load_checkpoint(tmp_path / "straight" / "final")
    assert chosen_logps(final) >= 1.2 * chosen_logps(base)  # log-probs are negative: at most a 20% fall
    # final/ is the merged LoRA network of the last checkpoint
    lora = load_lora_checkpoint(tmp_path / "straight" / "checkpoints" / "step_000030").eval()
    with torch.no_grad():
        torch.testing.assert_close(final.eval()(pairs.input_ids), lora(pairs.input_ids), rtol=0, atol=1e-5)
    # a run that lost everything after its step-20 checkpoint, started again, gives the uninterrupted curve
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    for gone in ("checkpoints/step_000030", "final"):
        shutil.rmtree(tmp_path / "resumed" / gone)
    r = mujina_train("--config", str(config), "--out", str(tmp_path / "resumed"))
    assert "resumed from" in r.stderr
    got, want = records(tmp_path / "resumed"), records(tmp_path / "straight")
    assert sorted(got) == sorted(want)
    for step in want:
        for key in ("loss", "grad_norm", "rewards/margins", "eval_loss"):
            if key in want[step]:
                assert abs(got[step][key] - want[step][key]) <= 1e-6, (step, key)


@pytest.fixture(scope="module")
def chat_shards(world, tmp_path_factory) -> dict[str, Path]:
    """Chat records (an answer that restates the question's first words) sharded by the real `mujina-data`."""
    tmp = tmp_path_factory.mktemp("chat")
    r = random.Random(1)
    sentences = [s for d in english_documents(120, seed=9) for s in d.replace("\n", " ").split(". ") if 30 < len(s)]
    out = {}
    for split, n in (("train", 300), ("eval", 40)):
        path = tmp / f"chat_{split}.jsonl"
        with open(path, "w") as f:
            for _ in range(n):
                q = r.choice(sentences)
                words = q.split()
                answer = f"You asked about {' '.join(words[:4])}. The answer is: {' '.join(words[4:9])}."
                f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": answer}]}) + "\n")
        run_cli("data_shards.cli", "shard", "--input", str(path), "--tokenizer", str(world / "tok"),
                "--out", str(tmp / f"shards_{split}"), "--no-dedup", "--workers", "1")
        out[split] = tmp / f"shards_{split}"
    return out


def pretrained_base(world: Path, tmp: Path) -> Path:
    """The base after 200 steps of full pretraining on plain text: LoRA adapts a trained model, and a random
    model's frozen output layer cannot make a peaked distribution whatever the adapters do."""
    import numpy as np

    from data_shards.tokenizer import Tokenizer

    tok = Tokenizer(world / "tok")
    ids = [i for d in english_documents(120, seed=11) for i in [tok.bos_id, *tok.encode(d), tok.eos_id]]
    np.array(ids, dtype=np.uint16).tofile(tmp / "text.bin")
    cfg = {"init_from": str(world / "base"), "data": {"source": "tokens", "path": str(tmp / "text.bin"), "seq_len": 96},
           "optim": {"lr": 3.0e-3, "warmup_steps": 4},
           "train": {"steps": 200, "batch_size": 8, "micro_batch_size": 8, "eval_every": 0, "dtype": "fp32",
                     "save_every": 0, "log_every": 200}}
    (tmp / "pretrain.yaml").write_text(yaml.safe_dump(cfg))
    mujina_train("--config", str(tmp / "pretrain.yaml"), "--out", str(tmp / "pretrain"))
    return tmp / "pretrain" / "final"


@pytest.mark.slow  # shards chat records and trains 100 steps (about 10 s; LoRA pretrains its base first)
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sft_lowers_the_held_out_assistant_loss(world, chat_shards, tmp_path, mode):
    from model.train import RunConfig, Trainer

    shards = chat_shards
    base = world / "base" if mode == "full" else pretrained_base(world, tmp_path)
    cfg = {"finetune": {"mode": mode, "init_from": str(base), "r": 16, "alpha": 32},
           "data": {"source": "shards", "mixture": [{"path": str(shards["train"]), "weight": 1.0}],
                    "eval_mixture": [{"path": str(shards["eval"]), "weight": 1.0}], "seq_len": 96},
           "optim": {"lr": 3.0e-3 if mode == "full" else 2.0e-2, "warmup_steps": 4},
           "train": {"objective": "sft", "steps": 100, "batch_size": 8, "micro_batch_size": 8, "log_every": 10,
                     "eval_every": 100, "eval_batches": 4, "dtype": "fp32", "save_every": 0}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(cfg))
    before = Trainer(RunConfig.from_dict({**cfg, "out": str(tmp_path / "probe")})).evaluate()["eval_loss"]
    mujina_train("--config", str(tmp_path / "sft.yaml"), "--out", str(tmp_path / "sft"))
    after = records(tmp_path / "sft")[100]["eval_loss"]
    assert after <= 0.7 * before, (before, after)  # the loss is on the assistant turns only (chat shards' masks)


@pytest.mark.parametrize("change, message", [
    ({"train": {"objective": "dpo"}, "data": {"source": "synthetic"}}, "objective dpo and data.source dpo go together"),
    ({"train": {"objective": "sft"}, "data": {"source": "synthetic"}}, "objective sft reads chat shards"),
    ({"finetune": {"init_from": None}}, "starts from a trained model"),
    ({"finetune": {"mode": "qlora"}, "train": {"compile": True}}, "qlora does not compile"),
    ({"finetune": {"targets": ["wq", "attn"]}}, "unknown: attn"),
    ({"finetune": {"beta": 0}}, "finetune.beta must be > 0"),
    ({"data": {"path": "/nonexistent/dpo.jsonl"}}, "data.path /nonexistent/dpo.jsonl does not exist"),
])
def test_bad_post_training_configs_exit_2_with_the_fix(world, tmp_path, change, message):
    config = yaml.safe_load(dpo_config(world, tmp_path / "c.yaml").read_text())
    for section, values in change.items():
        config[section].update(values)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    r = mujina_train("--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), check=False)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_broken_pair_names_its_line(world, tmp_path):
    bad = tmp_path / "dpo.jsonl"
    bad.write_text((world / "dpo.jsonl").read_text() + '{"prompt": "not a list", "chosen": "a", "rejected": "b"}\n')
    config = yaml.safe_load(dpo_config(world, tmp_path / "c.yaml").read_text())
    config["data"]["path"] = str(bad)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    r = mujina_train("--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), check=False)
    assert r.returncode == 2 and f"{bad}:121: not a preference pair" in r.stderr, r.stderr


@pytest.mark.slow  # torchrun: 2 training processes, three times (about 30 s)
@pytest.mark.parametrize("objective, mode", [("dpo", "full"), ("dpo", "lora"), ("sft", "lora")])
def test_two_processes_give_the_post_training_losses_of_one(world, chat_shards, tmp_path, objective, mode):
    from tests.model.test_cluster import torchrun

    config = yaml.safe_load(dpo_config(world, tmp_path / "c.yaml", mode, steps=4, eval_every=4).read_text())
    if objective == "sft":
        config["data"] = {"source": "shards", "mixture": [{"path": str(chat_shards["train"]), "weight": 1.0}],
                          "eval_mixture": [{"path": str(chat_shards["eval"]), "weight": 1.0}], "seq_len": 96}
        config["train"]["objective"] = "sft"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    mujina_train("--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "one"))
    r = torchrun(tmp_path / "c.yaml", tmp_path / "two")
    assert "2 processes (FSDP2)" in r.stderr
    got, want = records(tmp_path / "two"), records(tmp_path / "one")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        assert got[step]["tokens"] == want[step]["tokens"]
        for key in ("loss", "grad_norm", "eval_loss", "rewards/margins"):
            if key in want[step]:
                assert abs(got[step][key] - want[step][key]) <= 1e-5, (step, key, got[step][key], want[step][key])


def test_export_merge_and_chat_of_a_lora_run(world, tmp_path):
    """`mujina-model export --adapter-out --base-out`, `merge` and `chat` on a LoRA DPO run's checkpoint."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from model.checkpoint import load_checkpoint
    from tests.conftest import mujina_model

    config = dpo_config(world, tmp_path / "dpo.yaml", steps=3, eval_every=0)
    mujina_train("--config", str(config), "--out", str(tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "step_000003"
    r = mujina_model("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"),
                     "--adapter-out", str(tmp_path / "adapter"), "--base-out", str(tmp_path / "base"))
    assert "(LoRA, merged)" in r.stdout and "chat template" in r.stdout
    mujina_model("merge", "--checkpoint", str(ckpt), "--out", str(tmp_path / "merged"))
    x = torch.randint(4, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        final = load_checkpoint(tmp_path / "run" / "final").eval()(x)
        merged = load_checkpoint(tmp_path / "merged").eval()(x)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(x).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
        peft = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(x).logits
    assert torch.equal(merged, final)  # merge of the last checkpoint is the run's final/
    assert (hf - final).abs().max() <= 1e-5 and (peft - final).abs().max() <= 1e-4
    out = json.loads(mujina_model("chat", "--hf", str(tmp_path / "hf"), "--user", "Where is the station?",
                                  "--max-new-tokens", "8").stdout)
    assert isinstance(out["reply"], str) and 1 <= len(out["generated_ids"]) <= 8
    r = mujina_model("export", "--checkpoint", str(tmp_path / "merged"), "--out", str(tmp_path / "x"),
                     "--adapter-out", str(tmp_path / "y"), check=False)
    assert r.returncode == 2 and "no lora.json" in r.stderr


def test_the_nll_term_adds_the_chosen_answers_mean_token_nll(world, tmp_path):
    """finetune.nll_weight: step 1's loss is ln 2 + weight x the mean NLL of the step's chosen answer tokens,
    computed here from the logged summed log-probs and the step's pairs (the same stateless order)."""
    from model.preference import PreferenceData

    config = dpo_config(world, tmp_path / "dpo.yaml", steps=1, eval_every=0)
    cfg = yaml.safe_load(config.read_text())
    cfg["finetune"]["nll_weight"] = 0.5
    config.write_text(yaml.safe_dump(cfg))
    mujina_train("--config", str(config), "--out", str(tmp_path / "run"))
    first = records(tmp_path / "run")[1]
    data = PreferenceData(world / "dpo.jsonl", world / "tok", 96, 0, 0.0, 600)  # eval off: nothing held out
    batches = data.micro_batches("train", 0, 2, 4)
    tokens = sum(int(b.completion[:b.pairs, 1:].sum()) for b in batches)
    nll = -first["logps/chosen"] * 8 / tokens  # logps/chosen: the mean over the step's 8 pairs of summed log-probs
    assert abs(first["loss"] - (math.log(2) + 0.5 * nll)) <= 1e-5
