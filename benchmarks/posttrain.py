"""Post-training on CPU in one run: mujina's LoRA SFT and DPO against trl + peft, the memory LoRA saves, and
collaborative LoRA against one process.

    python benchmarks/posttrain.py              # about 3 minutes on 2 quiet cores
    python benchmarks/posttrain.py --quick      # about a minute: MoE only, fewer timed steps, rounds and cases
    python benchmarks/posttrain.py --threads 1  # steadier CPU-time ratios on a busy machine

1. Throughput (tokens/s). A MoE (4 experts, top-2) and a dense model of the same active size, with the same
   weights on both sides: mujina's checkpoint is exported with model/hf.py's export_hf and loaded by
   transformers (MixtralForCausalLM / LlamaForCausalLM). Both get a fresh LoRA of the same rank and alpha on the
   same layers: mujina's add_lora (wq wk wv wo, w1 w2 w3 or the stacked experts) and peft's LoraConfig
   (q_proj k_proj v_proj o_proj, gate_proj up_proj down_proj, or target_parameters on Mixtral's fused experts
   gate_up_proj and down_proj, how peft adapts the experts of transformers >= 5; there gate and up share one A
   per expert, so peft trains slightly fewer parameters: the table gives both counts). Same batch, fp32.
   - SFT step: forward, loss on the answer tokens, backward, gradient clipping, AdamW step. mujina:
     model/step.py's train_step. trl + peft: the same loss in a plain torch loop on the peft model (what trl's
     SFTTrainer's loss is without its logging metrics), clip_grad_norm_, torch AdamW.
   - DPO step: policy forward and backward, reference forward, AdamW step. mujina: model/finetune.py's
     dpo_step, reference = adapters disabled. trl: DPOTrainer._compute_loss on its peft model (built from
     peft_config, so its reference is also the adapters disabled), backward, clip_grad_norm_, torch AdamW.
   The two alternate step by step after untimed warm-up steps (noise hits both); tokens/s is the positions
   computed per step (rows x padded length) over the median step time. ratio = mujina / trl (goal >= 1.0);
   best-step ratio compares the fastest steps, CPU-time ratio the median CPU seconds (trl's / mujina's).
   Neither side gets an attention mask: rows are right-padded and causal attention never looks forward. The
   MoE aux loss: mujina adds its balance and z-losses, trl's Mixtral runs without router logits (its default),
   so mujina does slightly more work.
2. Peak memory of full vs LoRA fine-tuning in mujina, each case in its own subprocess, on a larger MoE (26M
   parameters, 8 experts) whose weights are not dwarfed by a micro-batch's activations: the peak resident set
   during 2 training steps minus the resident set after building the model (Linux /proc peak, reset after
   the build; ru_maxrss elsewhere), or torch.cuda.max_memory_allocated on CUDA (weights in bf16 there, the
   issue's "bf16 LoRA"). Full keeps gradients and two AdamW moments (3x the weights) and, for DPO, a frozen
   reference copy (model/finetune.py's frozen_copy); LoRA DPO uses the adapters-off network. The rest is
   activations, which grow with --memory-batch while the weights do not. ratio = LoRA / full. A QLoRA row needs
   CUDA and bitsandbytes (on CPU it says skipped: benchmarks/qlora_memory.py measures QLoRA there).
3. Collaborative LoRA vs one process, at equal steps and equal pairs. K simulated workers (in this process:
   the arithmetic of a swarm round, without the swarm machinery) each train H local DPO steps per round on their
   own shard of the pairs, both factors, with their own AdamW state; model/lora.py's average_adapters then makes
   the shared network exactly the token-weighted mean of theirs (adapters averaged, the rest s(Σ w B A - B̄ Ā)
   folded into the base). One process trains both factors for the same number of steps on batches K times
   larger drawn from all the pairs. ratio = held-out DPO loss collaborative / one process (goal <= 1.03).
   Without --quick two more runs show the alternative that leaves the base untouched (QLoRA's NF4 base cannot
   absorb the rest): round_factor's alternating factor (B in even rounds), averaged exactly, by the K workers
   and by one process (K = 1, the big batch), which separates what alternation costs from what averaging
   costs. The held-out loss after every round and the step at which the one process reaches each loss are
   printed too.

Data: a tokenizer trained on the fly on tests/data_shards/corpus.py's English documents and a constructed
preference (the same answer, chosen "Sure! ..." vs rejected "No way. ..."). Nothing is downloaded. The base
models are randomly initialised (DPO's log-ratios and the step costs do not need a pretrained base).

Timing on a shared 2-core machine is noisy: the throughput table also gives the ratio of CPU seconds
(trl's / mujina's), which other load disturbs less, and `--threads 1` makes it steadier still.
The JSON file (--json) holds the rows, every step time, the curves, the settings and the library versions.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package
from model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.data import IGNORE, Batch  # noqa: E402
from model.finetune import FinetuneConfig, check_qlora, dpo_evaluate, dpo_step, frozen_copy  # noqa: E402
from model.lora import LoraSpec, add_lora, average_adapters, round_factor, train_only  # noqa: E402
from model.optim import OptimConfig  # noqa: E402
from model.preference import PairBatch, PreferenceData  # noqa: E402
from model.step import build_optimizer, train_step  # noqa: E402
from model.transformer import Transformer  # noqa: E402

SEED = 0
VOCAB = 1000  # the most pieces the test corpus's vocabulary supports
R, ALPHA, BETA = 8, 16.0, 0.1
SHAPES = {  # the MoE's 2 active experts of 256 match the dense model's 512
    "moe": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256,
            "moe": {"num_experts": 4, "top_k": 2}},
    "dense": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 512},
}
# the memory cases: a MoE big enough that full training's extra state (gradients and two AdamW moments, 3x the
# 26M parameters' 100 MiB in fp32) is not lost beside a micro-batch's activations (about 300 MiB for 4 pairs)
MEMORY_SHAPE = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 1024,
                "moe": {"num_experts": 8, "top_k": 2}}
PEFT_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def model_config(kind: str, vocab: int) -> ModelConfig:
    shape = MEMORY_SHAPE if kind == "memory" else SHAPES[kind]
    return ModelConfig.from_dict({"preset": "debug", "vocab_size": vocab, "max_seq_len": 256, **shape})


def base_checkpoint(kind: str, world: dict, root: Path) -> Path:
    """The randomly initialised base model every part starts from (saved once per run)."""
    ckpt = root / f"{kind}_base"
    if not ckpt.exists():
        torch.manual_seed(SEED)
        save_checkpoint(ckpt, Transformer(model_config(kind, world["vocab"])))
    return ckpt


# ---- data -----------------------------------------------------------------------------------------

def make_world(root: Path, pairs_long: int, pairs_short: int) -> dict[str, Any]:
    """A tokenizer and two preference files: long pairs (about 110 tokens a side) for the throughput and
    memory batches, short ones (one sentence a side, as tests/model/test_posttrain.py) for the training runs."""
    from data_shards.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
    from tests.data_shards.corpus import english_documents

    docs = english_documents(200, seed=7)
    train_tokenizer(docs, root / "tok", TokenizerTrainConfig(vocab_size=VOCAB, mecab=False, threads=1))
    sentences = [s for d in docs for s in d.replace("\n", " ").split(". ") if 20 < len(s) < 80]
    r = random.Random(SEED)

    def write(path: Path, n: int, sentences_per_side: int) -> Path:
        with open(path, "w") as f:
            for _ in range(n):
                q = ". ".join(r.sample(sentences, sentences_per_side)) + "?"
                a = ". ".join(r.sample(sentences, sentences_per_side)) + "."
                f.write(json.dumps({"prompt": [{"role": "user", "content": q}], "chosen": "Sure! " + a,
                                    "rejected": "No way. " + a}) + "\n")
        return path

    return {"tok": root / "tok", "vocab": Tokenizer(root / "tok").vocab_size,
            "long": write(root / "long.jsonl", pairs_long, 2), "short": write(root / "short.jsonl", pairs_short, 1)}


def sft_batch(pairs: PairBatch) -> Batch:
    """The chosen rows as SFT's batch: labels are the next token where it is part of the answer."""
    ids = pairs.input_ids[: pairs.pairs]
    comp = pairs.completion[: pairs.pairs]
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = torch.where(comp[:, 1:].bool(), ids[:, 1:], IGNORE)
    return Batch(ids, labels, torch.zeros_like(ids))


def hf_loss(model, b: Batch) -> torch.Tensor:
    """The SFT loss of model/step.py's forward_loss (mean over answer tokens), on a transformers model."""
    logits = model(input_ids=b.input_ids, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), b.labels.flatten(), ignore_index=IGNORE,
                           reduction="sum") / b.num_targets


# ---- 1. throughput --------------------------------------------------------------------------------

def lora_spec() -> LoraSpec:
    return LoraSpec(r=R, alpha=ALPHA)


def trl_trainer(hf_model, moe: bool, out: Path):
    """trl's DPOTrainer around `hf_model` with a fresh peft LoRA matching lora_spec() (its model is the peft one)."""
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    peft_config = LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=PEFT_ATTENTION + ([] if moe else ["gate_proj", "up_proj", "down_proj"]),
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if moe else None)
    # trl needs a tokenizer and a dataset to construct; the batches are ours, given to its loss directly
    words = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "</s>": 2, "a": 3}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tk = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    args = DPOConfig(output_dir=str(out), beta=BETA, report_to=[], use_cpu=True, bf16=False, max_grad_norm=1.0)
    return DPOTrainer(model=hf_model, ref_model=None, args=args, processing_class=tk, peft_config=peft_config,
                      train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "a", "rejected": "a"}] * 2))


def time_interleaved(steps: dict[str, Callable[[], None]], warmup: int,
                     repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall seconds, CPU seconds of this process) per call of each step function, the functions alternating
    within every repeat. CPU seconds are what other load on the machine disturbs least."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            c0, t0 = time.process_time(), time.perf_counter()  # CPU execution is synchronous: no device sync
            step()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def build_steps(kind: str, world: dict, root: Path, batch_pairs: int) -> dict[str, Any]:
    """The exported model on both sides with fresh adapters, the batch, and the four step functions."""
    from transformers import AutoModelForCausalLM

    from model.hf import export_hf

    cfg = model_config(kind, world["vocab"])
    ckpt = base_checkpoint(kind, world, root)
    hf_dir = export_hf(ckpt, root / f"{kind}_hf")
    pairs = PreferenceData(world["long"], world["tok"], 128, SEED, 0.0, cfg.vocab_size) \
        .micro_batches("train", 0, 1, batch_pairs)[0]
    sft = sft_batch(pairs)

    net = load_checkpoint(ckpt).train()
    ours_params = add_lora(net, lora_spec(), generator=torch.Generator().manual_seed(SEED))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    trainer = trl_trainer(hf, cfg.is_moe, root / f"{kind}_trl")
    peft_model = trainer.model.train()
    theirs_params = [p for p in peft_model.parameters() if p.requires_grad]
    with torch.no_grad():  # fresh adapters (B = 0) leave both the exported base: the same function
        diff = (net(pairs.input_ids) - peft_model(input_ids=pairs.input_ids, use_cache=False).logits).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"mujina and transformers+peft logits differ by {diff:.2e}: the timing would compare "
                           "different models; check model/hf.py's export against this transformers version")

    lr, device = 1e-4, torch.device("cpu")
    ours_sft_opt = build_optimizer(net, OptimConfig(lr=lr, min_lr=0.0))
    ours_dpo_opt = build_optimizer(net, OptimConfig(lr=lr, min_lr=0.0))
    theirs_sft_opt = torch.optim.AdamW(theirs_params, lr=lr, weight_decay=0.0)
    theirs_dpo_opt = torch.optim.AdamW(theirs_params, lr=lr, weight_decay=0.0)
    ft = FinetuneConfig(mode="lora", r=R, alpha=ALPHA, beta=BETA)
    n_chosen = int(pairs.completion[: pairs.pairs, 1:].sum())
    # an attention mask of ones: trl counts tokens with it; the rows are right-padded, so causal attention over
    # every position gives the answer tokens' logits that a padding mask would (mujina's forward takes none)
    dpo_inputs = {"input_ids": pairs.input_ids, "attention_mask": torch.ones_like(pairs.input_ids),
                  "completion_mask": pairs.completion}

    def ours_sft():
        train_step(net, ours_sft_opt, [sft], lr=lr, n_targets=sft.num_targets, grad_clip=1.0, device=device)

    def theirs_sft():
        hf_loss(peft_model, sft).backward()
        torch.nn.utils.clip_grad_norm_(theirs_params, 1.0)
        theirs_sft_opt.step()
        theirs_sft_opt.zero_grad(set_to_none=True)

    def ours_dpo():
        dpo_step(net, None, ours_dpo_opt, [pairs], cfg=ft, lr=lr, n_pairs=pairs.pairs, n_chosen_tokens=n_chosen,
                 grad_clip=1.0, device=device)

    def theirs_dpo():
        trainer._compute_loss(peft_model, dpo_inputs, return_outputs=False).backward()
        torch.nn.utils.clip_grad_norm_(theirs_params, 1.0)
        theirs_dpo_opt.step()
        theirs_dpo_opt.zero_grad(set_to_none=True)

    return {"cfg": cfg, "pairs": pairs, "diff": diff, "ours_params": ours_params, "theirs_params": theirs_params,
            "SFT": (ours_sft, theirs_sft, pairs.pairs), "DPO": (ours_dpo, theirs_dpo, 2 * pairs.pairs)}


def throughput(kind: str, world: dict, root: Path, batch_pairs: int, warmup: int, steps: int) -> list[dict]:
    built = build_steps(kind, world, root, batch_pairs)
    cfg, pairs, diff = built["cfg"], built["pairs"], built["diff"]
    ours_params, theirs_params = built["ours_params"], built["theirs_params"]
    rows = []
    for objective in ("SFT", "DPO"):
        ours, theirs, batch_rows = built[objective]
        load = os.getloadavg()[0]
        seconds, cpu = time_interleaved({"mujina": ours, "trl": theirs}, warmup, steps)
        tokens = batch_rows * pairs.input_ids.shape[1]
        tok_s = {name: tokens / statistics.median(s) for name, s in seconds.items()}
        cpu_ratio = statistics.median(cpu["trl"]) / statistics.median(cpu["mujina"])
        best_ratio = min(seconds["trl"]) / min(seconds["mujina"])  # the steps least disturbed by other load
        rows.append({
            "model": kind, "objective": objective, "batch": f"{batch_rows} x {pairs.input_ids.shape[1]}",
            "tokens_per_step": tokens, "params": cfg.num_params(), "active_params": cfg.num_active_params(),
            "mujina_trainable": sum(p.numel() for p in ours_params),
            "trl_trainable": sum(p.numel() for p in theirs_params),
            "mujina_tok_s": tok_s["mujina"], "trl_tok_s": tok_s["trl"], "ratio": tok_s["mujina"] / tok_s["trl"],
            "best_ratio": best_ratio, "cpu_ratio": cpu_ratio,
            "logits_max_abs_diff": diff, "load_avg_1m": [load, os.getloadavg()[0]],
            "mujina_step_s": seconds["mujina"], "trl_step_s": seconds["trl"],
            "mujina_step_cpu_s": cpu["mujina"], "trl_step_cpu_s": cpu["trl"],
        })
    return rows


# ---- 2. memory ------------------------------------------------------------------------------------

def _rss_now() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _reset_peak() -> Callable[[], int]:
    """A function giving the peak resident bytes since now: /proc's VmHWM after a reset (Linux >= 4.0), else
    ru_maxrss (the process's whole peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

        def peak() -> int:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        return peak
    except OSError:
        scale = 1 if sys.platform == "darwin" else 1024
        return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def memory_worker(spec_path: str) -> None:
    """One memory case in this process (it is a subprocess of the benchmark): prints one JSON line."""
    from safetensors.torch import load_file

    spec = json.loads(Path(spec_path).read_text())
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    t = load_file(spec["batch"])
    pairs = PairBatch(t["input_ids"], t["completion"], int(t["input_ids"].numel()))
    net = load_checkpoint(spec["ckpt"]).to(device, torch.bfloat16 if cuda else torch.float32).train()
    if spec["mode"] == "qlora":
        try:
            check_qlora(device)
        except ValueError as e:
            print(json.dumps({"refused": str(e)}), flush=True)
            return
    if spec["mode"] != "full":
        add_lora(net, lora_spec(), generator=torch.Generator().manual_seed(SEED))
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_now()
        peak = _reset_peak()
    reference = frozen_copy(net) if spec["objective"] == "dpo" and spec["mode"] == "full" else None
    opt = build_optimizer(net, OptimConfig(lr=1e-5, min_lr=0.0))
    ft = FinetuneConfig(mode="full" if spec["mode"] == "full" else "lora", beta=BETA)
    for _ in range(spec["steps"]):
        if spec["objective"] == "sft":
            b = sft_batch(pairs)
            train_step(net, opt, [b], lr=1e-5, n_targets=b.num_targets, grad_clip=1.0, device=device)
        else:
            dpo_step(net, reference, opt, [pairs], cfg=ft, lr=1e-5, n_pairs=pairs.pairs,
                     n_chosen_tokens=int(pairs.completion[: pairs.pairs, 1:].sum()), grad_clip=1.0, device=device)
    top = torch.cuda.max_memory_allocated() if cuda else peak()
    print(json.dumps({"base_bytes": base, "peak_bytes": top, "delta_bytes": top - base,
                      "measure": "cuda max_memory_allocated" if cuda else "peak RSS"}), flush=True)


def memory(world: dict, root: Path, batch_pairs: int, objectives: list[str], steps: int,
           threads: int | None) -> list[dict]:
    from safetensors.torch import save_file

    kind = "memory"
    ckpt = base_checkpoint(kind, world, root)
    pairs = PreferenceData(world["long"], world["tok"], 128, SEED, 0.0, world["vocab"]) \
        .micro_batches("train", 0, 1, batch_pairs)[0]
    save_file({"input_ids": pairs.input_ids, "completion": pairs.completion}, str(root / "memory_batch.safetensors"))
    rows = []
    for objective in objectives:
        got = {}
        for mode in ("full", "lora", "qlora"):
            if mode == "qlora" and not torch.cuda.is_available():
                got[mode] = {"skipped": "needs CUDA"}
                continue
            spec = root / f"memory_{kind}_{objective}_{mode}.json"
            spec.write_text(json.dumps({"ckpt": str(ckpt), "batch": str(root / "memory_batch.safetensors"),
                                        "mode": mode, "objective": objective, "steps": steps}))
            r = subprocess.run([sys.executable, __file__, "--memory-worker", str(spec),
                                *(["--threads", str(threads)] if threads else [])], capture_output=True, text=True,
                               cwd=REPO)
            lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
            if r.returncode != 0 or not lines:
                raise RuntimeError(f"memory case {kind} {objective} {mode} failed:\n{r.stderr[-3000:]}")
            got[mode] = json.loads(lines[-1])
        cfg = model_config(kind, world["vocab"])
        row = {"model": f"MoE {cfg.num_params() / 1e6:.0f}M", "params": cfg.num_params(),
               "objective": objective.upper(), "batch": f"{batch_pairs} pairs", **{
            f"{mode}_{k}": v for mode, d in got.items() for k, v in d.items()}}
        row["ratio"] = got["lora"]["delta_bytes"] / got["full"]["delta_bytes"]
        if "delta_bytes" in got["qlora"]:
            row["qlora_ratio_vs_lora"] = got["qlora"]["delta_bytes"] / got["lora"]["delta_bytes"]
        rows.append(row)
    return rows


# ---- 3. collaborative LoRA ------------------------------------------------------------------------

def collaborative(kind: str, world: dict, root: Path, workers: int, rounds: int, local_steps: int, micro: int,
                  lr: float, eval_pairs: int, b_first: bool) -> dict:
    """Held-out DPO loss after `rounds` x `local_steps` steps: K simulated workers vs one process (and, with
    `b_first`, the same workers with the factors' order shifted by one round: B, the zero-initialised factor,
    first)."""
    lines = world["short"].read_text().splitlines()
    random.Random(SEED).shuffle(lines)
    files = {"eval": lines[:eval_pairs], "all": lines[eval_pairs:]}
    train = files["all"]
    for k in range(workers):  # contiguous shards of the training pairs
        files[f"shard{k}"] = train[k * len(train) // workers:(k + 1) * len(train) // workers]
    data = {}
    for name, rows in files.items():
        (root / f"collab_{name}.jsonl").write_text("\n".join(rows) + "\n")
        data[name] = PreferenceData(root / f"collab_{name}.jsonl", world["tok"], 128, SEED, 0.0, world["vocab"])
    ckpt = base_checkpoint(kind, world, root)
    device, ft = torch.device("cpu"), FinetuneConfig(mode="lora", r=R, alpha=ALPHA, beta=BETA)
    eval_batches = data["eval"].micro_batches("train", 0, 1, eval_pairs)  # every held-out pair, one batch

    def fresh() -> Transformer:
        net = load_checkpoint(ckpt).train()
        add_lora(net, lora_spec(), generator=torch.Generator().manual_seed(SEED))  # the same start on both sides
        return net

    def evaluate(net) -> float:
        return dpo_evaluate(net.eval(), None, eval_batches, ft, device, None, lambda *v: list(v))["eval_loss"]

    def step(net, opt, batches, s):
        n_chosen = sum(int(b.completion[: b.pairs, 1:].sum()) for b in batches)
        return dpo_step(net.train(), None, opt, batches, cfg=ft, lr=lr * min(1.0, (s + 1) / 2),
                        n_pairs=sum(b.pairs for b in batches), n_chosen_tokens=n_chosen, grad_clip=1.0, device=device)

    total = rounds * local_steps
    t0 = time.perf_counter()
    single = fresh()
    start_loss = evaluate(single)
    opt = build_optimizer(single, OptimConfig(lr=lr, min_lr=0.0, weight_decay=0.0))  # as the workers' AdamW
    single_curve = []
    for s in range(total):
        step(single, opt, data["all"].micro_batches("train", s, 1, workers * micro), s)
        if (s + 1) % local_steps == 0:  # at the same steps as the collaborative rounds end
            single_curve.append({"step": s + 1, "eval_loss": evaluate(single)})
    single_loss, single_s = single_curve[-1]["eval_loss"], time.perf_counter() - t0
    out = {"model": kind, "workers": workers, "rounds": rounds, "local_steps": local_steps, "steps": total,
           "pairs_per_worker_step": micro, "pairs_per_single_step": workers * micro, "lr": lr,
           "train_pairs": len(train), "eval_pairs": eval_pairs, "start_eval_loss": start_loss,
           "single_eval_loss": single_loss, "single_s": single_s, "single_curve": single_curve}
    shards = [data[f"shard{k}"] for k in range(workers)]
    variants = [("collab", shards, micro, "products")]
    if b_first:  # the alternating scheme (QLoRA's), and one process alternating: what alternation alone costs
        variants += [("collab_alternating", shards, micro, "alternating"),
                     ("alternating_one_process", [data["all"]], workers * micro, "alternating")]
    for name, sources, pairs_per_step, mode in variants:
        t0 = time.perf_counter()
        curve = run_collaborative(fresh, evaluate, step, sources, rounds, local_steps, pairs_per_step, lr, mode)
        loss = curve[-1]["eval_loss"]
        reached = next((c["step"] for c in single_curve if c["eval_loss"] <= loss), None)
        out.update({f"{name}_eval_loss": loss, f"{name}_ratio": loss / single_loss,
                    f"{name}_s": time.perf_counter() - t0, f"{name}_curve": curve,
                    f"{name}_single_steps_to_same_loss": reached})
    out["ratio"] = out["collab_ratio"]
    return out


def run_collaborative(fresh, evaluate, step, sources, rounds, local_steps, micro, lr, mode) -> list[dict]:
    """The rounds of one simulated worker per source of pairs; returns the shared network's held-out loss after
    each round. mode "products": both factors train and model/lora.py's average_adapters makes the shared
    network the exact weighted mean (the rest folded into the base); "alternating": round_factor's factor
    trains and its weighted mean is taken (exact, the base untouched)."""
    shared = fresh()
    nets = [copy.deepcopy(shared) for _ in sources]
    factors = ("both",) if mode == "products" else ("A", "B")
    opts = [{f: torch.optim.AdamW(train_only(n, f), lr=lr, weight_decay=0.0) for f in factors} for n in nets]
    history = []
    for r in range(rounds):
        factor = "both" if mode == "products" else round_factor(r)
        start = {k: v.detach().clone() for k, v in shared.named_parameters()}
        tokens = []
        for k, (net, opt_k) in enumerate(zip(nets, opts, strict=True)):
            with torch.no_grad():  # every worker starts the round from the shared network (adapters and base)
                for name, p in net.named_parameters():
                    p.copy_(start[name])
            train_only(net, factor)
            n = 0
            for h in range(local_steps):
                batches = sources[k].micro_batches("train", r * local_steps + h, 1, micro)
                step(net, opt_k[factor], batches, r * local_steps + h)
                n += sum(b.tokens for b in batches)
            tokens.append(n)
        weights = [n / sum(tokens) for n in tokens]
        if mode == "products":
            average_adapters(shared, nets, weights)
        else:
            trained = [dict(net.named_parameters()) for net in nets]
            with torch.no_grad():  # the weighted mean of the trained factor: exact for s B A (model/lora.py)
                for name, p in shared.named_parameters():
                    if trained[0][name].requires_grad:
                        p.copy_(sum(w * t[name].detach() for w, t in zip(weights, trained, strict=True)))
        history.append({"round": r, "step": (r + 1) * local_steps, "factor": factor, "eval_loss": evaluate(shared)})
    return history


# ---- reporting ------------------------------------------------------------------------------------

def table(header: tuple[str, ...], lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(col)) for col in column) for column in zip(header, *lines, strict=True)]
    fmt = lambda cells: " | ".join(  # text left, numbers right
        c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join([fmt(header), "-+-".join("-" * w for w in widths), *(fmt(line) for line in lines)])


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def memory_cell(row: dict, mode: str) -> str:
    if f"{mode}_delta_bytes" in row:
        return mib(row[f"{mode}_delta_bytes"])
    if f"{mode}_refused" in row:
        return "refused: " + row[f"{mode}_refused"]
    return "skipped: " + row.get(f"{mode}_skipped", "?")


def machine_info() -> dict[str, Any]:
    import peft
    import transformers
    import trl

    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "trl": trl.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(), "dtype": "float32"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="about a minute: MoE only, fewer steps and rounds")
    p.add_argument("--models", default=None, help="comma-separated: moe,dense (default: both; --quick: moe)")
    p.add_argument("--steps", type=int, help="timed steps per implementation (default 5, --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per implementation (default 2, --quick 1)")
    p.add_argument("--batch", type=int, default=8, help="pairs per DPO step (SFT: their chosen rows; default 8)")
    p.add_argument("--memory-batch", type=int, default=4, help="pairs per step of the memory cases (default 4)")
    p.add_argument("--workers", type=int, default=4, help="collaborative LoRA: simulated workers (default 4)")
    p.add_argument("--rounds", type=int, help="collaborative LoRA: rounds (default 6, --quick 4)")
    p.add_argument("--local-steps", type=int, help="collaborative LoRA: steps per worker per round (default 5, "
                   "--quick 3)")
    p.add_argument("--lr", type=float, default=5e-4, help="collaborative LoRA: learning rate (default 5e-4)")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: throughput,memory,collab")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "posttrain.json",
                   help="where to write the results (default: benchmarks/results/posttrain.json)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice); with 1 the CPU-time ratio "
                   "is least disturbed by other load on the machine")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        return memory_worker(args.memory_worker)
    models = [m.strip() for m in (args.models or ("moe" if args.quick else "moe,dense")).split(",") if m.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if not models or set(models) - set(SHAPES):
        p.error(f"--models: choose from {', '.join(SHAPES)}")
    if skip - {"throughput", "memory", "collab"}:
        p.error("--skip: choose from throughput, memory, collab")
    steps = args.steps or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    rounds = args.rounds or (4 if args.quick else 6)
    local_steps = args.local_steps or (3 if args.quick else 5)
    for flag, v in (("steps", steps), ("batch", args.batch), ("memory-batch", args.memory_batch),
                    ("workers", args.workers), ("rounds", rounds),
                    ("local-steps", local_steps)):
        if v < 1:
            p.error(f"--{flag} must be at least 1")

    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_all = time.perf_counter()
    result: dict[str, Any] = {"machine": machine_info(), "settings": {
        "quick": args.quick, "models": models, "steps": steps, "warmup": warmup, "batch_pairs": args.batch,
        "lora": {"r": R, "alpha": ALPHA}, "beta": BETA, "shapes": SHAPES, "vocab": VOCAB}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = make_world(root, pairs_long=4 * args.batch, pairs_short=400)
        if "throughput" not in skip:
            result["throughput"] = [r for m in models for r in throughput(m, world, root, args.batch, warmup, steps)]
            print("\nthroughput: one step of LoRA training, fp32 on CPU, the same batch and exported model "
                  f"(median of {steps} after {warmup} warm-up; ratio = mujina / trl+peft, goal >= 1.0)")
            print(table(("model", "objective", "batch", "trainable (mujina / peft)", "mujina tok/s", "trl+peft tok/s",
                         "ratio", "best-step ratio", "CPU-time ratio"), [
                (r["model"], r["objective"], r["batch"], f"{r['mujina_trainable']:,} / {r['trl_trainable']:,}",
                 f"{r['mujina_tok_s']:,.0f}", f"{r['trl_tok_s']:,.0f}", f"{r['ratio']:.2f}",
                 f"{r['best_ratio']:.2f}", f"{r['cpu_ratio']:.2f}")
                for r in result["throughput"]]))
            busy = max(max(r["load_avg_1m"]) for r in result["throughput"])
            if busy > torch.get_num_threads() + 0.5:
                print(f"warning: the 1-minute load average reached {busy:.1f} on {os.cpu_count()} cores while timing: "
                      "other processes competed for the CPU; read the best-step and CPU-time ratios, or re-run "
                      "(--threads 1 is steadiest)")
        if "memory" not in skip:
            objectives = ["dpo"] if args.quick else ["sft", "dpo"]
            result["memory"] = memory(world, root, args.memory_batch, objectives, 2, args.threads)
            measure = result["memory"][0]["full_measure"]
            print(f"\npeak memory of 2 training steps above the built model ({measure}, MiB), each case in its own "
                  "process; ratio = LoRA / full")
            print(table(("model", "objective", "batch", "full", "LoRA", "ratio", "QLoRA"), [
                (r["model"], r["objective"], r["batch"], memory_cell(r, "full"), memory_cell(r, "lora"),
                 f"{r['ratio']:.2f}", memory_cell(r, "qlora")) for r in result["memory"]]))
        if "collab" not in skip:
            c = collaborative(models[0], world, root, args.workers, rounds, local_steps, micro=4, lr=args.lr,
                              eval_pairs=40, b_first=not args.quick)
            result["collab"] = c
            print(f"\ncollaborative LoRA DPO: {c['workers']} workers simulated in one process (no swarm "
                  f"machinery), {c['rounds']} rounds x {c['local_steps']} local steps of {c['pairs_per_worker_step']} "
                  "pairs, both factors averaged exactly (average_adapters), weighted by tokens; one process: "
                  f"{c['steps']} steps of {c['pairs_per_single_step']} pairs, both factors. {c['model']} model, "
                  f"{c['train_pairs']} training pairs, {c['eval_pairs']} held out; held-out DPO loss at the start "
                  f"{c['start_eval_loss']:.4f}")
            runs = [("collaborative", "collab", "A and B, exact mean"),
                    *((("collaborative, alternating", "collab_alternating", "alternating B/A"),
                       ("one process, alternating", "alternating_one_process", "alternating B/A"))
                      if "collab_alternating_ratio" in c else ())]
            print(table(("run", "factors", "held-out DPO loss", "ratio", "one process reaches it at step", "seconds"), [
                ("one process", "A and B", f"{c['single_eval_loss']:.4f}", "1.000", str(c["steps"]),
                 f"{c['single_s']:.1f}"),
                *((label, factors, f"{c[key + '_eval_loss']:.4f}", f"{c[key + '_ratio']:.3f}",
                   str(c[key + "_single_steps_to_same_loss"] or f"> {c['steps']}"), f"{c[key + '_s']:.1f}")
                  for label, key, factors in runs)]))
            curves = [("one process", c["single_curve"]), *((label, c[key + "_curve"]) for label, key, _ in runs)]
            print("held-out DPO loss every " + str(c["local_steps"]) + " steps: " + "; ".join(
                f"{label}: " + " ".join(f"{p['eval_loss']:.3f}" for p in curve) for label, curve in curves))
            print(f"ratio = collaborative (model/lora.py's average_adapters) / one process: {c['ratio']:.3f}"
                  "   goal <= 1.03")
    result["seconds"] = time.perf_counter() - t_all
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['seconds']:.0f} s; wrote {args.json}")


if __name__ == "__main__":
    main()
