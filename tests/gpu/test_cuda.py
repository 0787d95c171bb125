"""The CUDA paths: bitsandbytes' 8-bit AdamW as the swarm's inner optimizer, the memory model against
`max_memory_allocated`, and the teacher's 4-bit and 8-bit loading. CI has no GPU, so these skip there;
on a GPU machine: `python -m pytest tests/gpu` (benchmarks/RESULTS.md records the runs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.transformer import Transformer
from swarm.memory import estimate_round_memory
from swarm.round import SwarmWorker
from swarm.settings import InnerConfig, SwarmSettings
from tests.conftest import REPO
from tests.model.test_posttrain import world  # noqa: F401 (the fixture of the QLoRA test)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none")

SMALL = dict(preset="debug", num_layers=2, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2,
             vocab_size=512, max_seq_len=128, moe=dict(num_experts=4, top_k=2))


def checkpoint(tmp_path, spec: dict):
    with torch.device("meta"):
        net = Transformer(ModelConfig.from_dict(spec))
    net.to_empty(device="cpu")
    torch.manual_seed(0)
    net.init_weights()
    return save_checkpoint(tmp_path / "moe", net)


def test_8bit_adamw_trains_swarm_rounds_like_adamw(tmp_path):
    pytest.importorskip("bitsandbytes", reason="the 8-bit path needs bitsandbytes")
    ckpt = checkpoint(tmp_path, SMALL)
    losses = {}
    for opt in ("adamw", "adamw8bit"):
        w = SwarmWorker(ckpt, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, SwarmSettings(run="g", averaging=False),
                        InnerConfig(inner_steps=15, total_steps=60, batch_size=8, micro_batch_size=4, seq_len=64,
                                    optimizer=opt, device="cuda"))
        losses[opt] = [w.run_round(r)["loss"] for r in range(3)]
        assert all(p.is_cuda for p in w.model.parameters())
        if opt == "adamw8bit":
            states = [s for s in w.optimizer.state.values() if "state1" in s]
            assert states and any(s["state1"].dtype == torch.uint8 for s in states), "no 8-bit optimizer state"
        else:
            assert all(g.get("fused") for g in w.optimizer.param_groups), "AdamW on CUDA is the fused kernel"
    for opt, curve in losses.items():
        assert curve[2] < curve[1] < curve[0], (opt, curve)
    # 8-bit states change the trajectory a little, not the outcome
    assert abs(losses["adamw8bit"][2] - losses["adamw"][2]) <= 0.1 * losses["adamw"][2], losses


MEDIUM = dict(preset="debug", num_layers=4, hidden_size=512, intermediate_size=2048, num_heads=8, num_kv_heads=4,
              vocab_size=8000, max_seq_len=512, moe=dict(num_experts=8, top_k=2))


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_memory_model_predicts_max_memory_allocated_within_15_percent(tmp_path, optimizer):
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes", reason="the 8-bit path needs bitsandbytes")
    ckpt = checkpoint(tmp_path, MEDIUM)
    cfg = ModelConfig.from_dict(MEDIUM)
    measured, predicted = {}, {}
    for k in (2, 8):
        kw = dict(checkpoint=str(ckpt), k=k, optimizer=optimizer, ac=False, micro=4, seq_len=512, accum=2)
        out = subprocess.run([sys.executable, "benchmarks/gpu_memory.py", "--probe", json.dumps(kw)], cwd=REPO,
                             check=True, capture_output=True, text=True)
        measured[k] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
        predicted[k] = estimate_round_memory(cfg, k, micro_batch_size=4, seq_len=512, optimizer=optimizer,
                                             device="cuda").total
        assert abs(predicted[k] - measured[k]) <= 0.15 * measured[k], (k, predicted[k], measured[k])
    grow_m, grow_p = measured[8] - measured[2], predicted[8] - predicted[2]
    assert abs(grow_p - grow_m) <= 0.15 * grow_m, (grow_p, grow_m)


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_teacher_loads_quantized_with_bitsandbytes_and_generates(tmp_path, quantize):
    pytest.importorskip("bitsandbytes", reason="quantized teachers need bitsandbytes")
    from tests.worker.teacher import build_teacher
    from worker.executors.teacher import HFEngine

    texts = ["吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"] * 4
    path = build_teacher(tmp_path / "teacher", texts, num_layers=2, intermediate_size=256)
    conv = [[{"role": "user", "content": "猫"}], [{"role": "user", "content": "名前"}]]
    sampling = {"temperature": 0.0, "max_new_tokens": 24}
    full = HFEngine(path, "cuda", "none")
    want = full.generate(conv, sampling, seed=0)
    q = HFEngine(path, "cuda", quantize)
    kinds = {type(m).__name__ for m in q.model.modules()}
    assert ("Linear4bit" if quantize == "4bit" else "Linear8bitLt") in kinds, kinds
    assert q.model.get_memory_footprint() < full.model.get_memory_footprint()
    got = q.generate(conv, sampling, seed=0)
    assert all(n_out > 0 and text for text, _, n_out in got), got
    # the bigram teacher's text lives in lm_head and the embeddings, which bitsandbytes leaves unquantized
    assert [t for t, _, _ in got] == [t for t, _, _ in want]


def test_qlora_dpo_starts_at_ln2_and_peaks_under_0_4x_the_bf16_lora_memory(world, tmp_path):  # noqa: F811
    """QLoRA DPO on CUDA (model/qlora.py): the same run as bf16 LoRA (the trainer's: fp32 base, bf16 autocast),
    with the base in NF4. Step 0 is ln 2 (the reference is the same quantised base, adapters off); the peak of
    torch.cuda.max_memory_allocated over building and 3 steps is at most 0.4x LoRA's (printed: the ratio)."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    import math

    import yaml

    from data_shards.tokenizer import Tokenizer
    from model.train import RunConfig, Trainer
    from tests.model.test_posttrain import dpo_config, records

    root = tmp_path
    shutil.copytree(world / "tok", root / "tok")  # the post-training tests' tokenizer and preference pairs
    shutil.copy(world / "dpo.jsonl", root / "dpo.jsonl")
    spec = dict(preset="debug", num_layers=4, hidden_size=1024, intermediate_size=2048, num_heads=8, num_kv_heads=4,
                vocab_size=Tokenizer(root / "tok").vocab_size, max_seq_len=128, moe=dict(num_experts=8, top_k=2))
    with torch.device("meta"):
        net = Transformer(ModelConfig.from_dict(spec))
    net.to_empty(device="cpu")
    torch.manual_seed(0)
    net.init_weights()
    save_checkpoint(root / "big", net, tokenizer_dir=root / "tok")
    del net
    peaks, first = {}, {}
    for mode in ("lora", "qlora"):
        cfg = yaml.safe_load(dpo_config(root, root / f"{mode}.yaml", "lora", steps=3, eval_every=0, save_every=0,
                                        dtype="bf16", device="cuda").read_text())
        cfg["finetune"].update(mode=mode, init_from=str(root / "big"))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        trainer = Trainer(RunConfig.from_dict({**cfg, "out": str(root / mode)}))
        trainer.run()
        peaks[mode] = torch.cuda.max_memory_allocated() - before
        del trainer
        first[mode] = records(root / mode)[1]["loss"]
    print(f"peak memory: bf16 LoRA {peaks['lora'] / 2**20:.0f} MiB, QLoRA {peaks['qlora'] / 2**20:.0f} MiB, "
          f"ratio {peaks['qlora'] / peaks['lora']:.3f}")
    # the policy is its reference at step 0 (bf16 autocast: 1e-3, against 1e-6 for fp32 on CPU in tests/model)
    assert all(abs(loss - math.log(2)) <= 1e-3 for loss in first.values()), first
    assert peaks["qlora"] <= 0.4 * peaks["lora"], peaks
