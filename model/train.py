"""The one training program: `python -m model.train --config FILE` (also `mujina-train`), and
the same program under `torchrun --nproc_per_node N -m model.train --config FILE`.

On one process this is the reference loop every distributed mode is compared against:
AdamW, linear warmup + cosine decay, gradient clipping, gradient accumulation, bf16
autocast on CUDA, MoE auxiliary losses, periodic eval, checkpoints with exact resumption,
a progress line with tokens/s and a JSON-lines metrics log (OUT/metrics.jsonl).

Under torchrun (WORLD_SIZE > 1) the model is sharded with FSDP2 by `model.parallel.parallelize`
(bf16 parameters, fp32 gradient reductions on CUDA), each process reads its contiguous slice of
every global batch, checkpoints are torch.distributed.checkpoint directories (resumable on any
number of processes), and rank 0 logs, writes metrics.jsonl, reports MFU and serves Prometheus
gauges (train.metrics_port). A run killed on N processes resumes on M.

Output directory layout:
    OUT/config.yaml                       the resolved config of the run
    OUT/metrics.jsonl                     one object per logged step
    OUT/checkpoints/step_000100/          model + optimizer + trainer state (exact resume)
    OUT/final/                            the trained model (model/checkpoint.py format)

Running the same command again resumes from the newest checkpoint in OUT (or does nothing
if the run is complete): a killed run is continued by simply starting it again.

Loss normalisation: each step's loss is the mean over every target token of the global
batch (summed per micro-batch, divided by the step's total over all processes), so the
result does not depend on how the batch is split into micro-batches or over processes.
FSDP averages gradients over processes, so each process scales its loss by the world size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from .checkpoint import (
    TRAINER_STATE,
    is_distributed_checkpoint,
    load_checkpoint,
    load_config,
    load_distributed,
    load_full_into_sharded,
    load_optimizer_state,
    save_checkpoint,
    save_distributed,
)
from .config import ModelConfig, checked_fields, help_field, read_config_file
from .data import Batch, ShardData, StatelessData, SyntheticSource, TokenFileSource
from .finetune import (
    OBJECTIVES,
    FinetuneConfig,
    check_qlora,
    dpo_evaluate,
    dpo_step,
    frozen_copy,
    read_lora_spec,
    write_lora_spec,
)
from .lora import add_lora, merge_lora
from .optim import OptimConfig, lr_at
from .parallel import (
    Dist,
    device_memory,
    flops_per_token,
    init_distributed,
    memory_estimate,
    parallelize,
    peak_flops,
    shutdown_distributed,
)
from .step import NonFiniteStep, build_optimizer, forward_loss, train_step
from .transformer import Transformer

log = logging.getLogger("model.train")


# ---- configuration -------------------------------------------------------------------------------

@dataclass
class DataConfig:
    source: str = help_field("synthetic (built-in arithmetic progressions), tokens (a flat token file), shards "
                        "(data_shards directories mixed by weight, see data.mixture) or dpo (preference pairs: "
                        "data.path, the coordinator's synthetic/dpo.jsonl).", default="synthetic")
    mixture: list[dict[str, Any]] | None = help_field("source=shards: [{path: DIR, weight: W, name: optional}, ...] "
                                                 "shard directories and their sampling weights.", default=None)
    eval_mixture: list[dict[str, Any]] | None = help_field("source=shards: held-out shard directories for eval, "
                                                      "same form as mixture.", default=None)
    verify: bool = help_field("source=shards: check every shard's SHA-256 when opening it.", default=False)
    path: str | None = help_field("Token file for source=tokens (little-endian ids, see data.dtype); JSON-lines "
                                  "preference pairs for source=dpo.", default=None)
    tokenizer: str | None = help_field("source=dpo: the tokenizer directory (default: init_from's tokenizer/).",
                                       default=None)
    dtype: str = help_field("Integer type of the token file: uint16 or uint32.", default="uint16")
    seq_len: int = help_field("Tokens per training sequence.", default=128)
    eval_fraction: float = help_field("Share of the token file held out for eval (source=tokens).",
                                 default=0.01)
    doc_sep_id: int | None = help_field("Token that ends a document in the token file; attention and "
                                   "positions restart after it. null: no boundaries.", default=None)

    def __post_init__(self) -> None:
        if self.source not in ("synthetic", "tokens", "shards", "dpo"):
            raise ValueError(f"data.source must be synthetic, tokens, shards or dpo, got {self.source!r}")
        if self.source == "tokens" and not self.path:
            raise ValueError("data.source is tokens but data.path is not set: point it at a token file")
        if self.source == "dpo" and not self.path:
            raise ValueError("data.source is dpo but data.path is not set: point it at the coordinator's "
                             "STATE_DIR/synthetic/dpo.jsonl")
        if self.source == "shards" and not self.mixture:
            raise ValueError("data.source is shards but data.mixture is empty: list shard directories with weights, "
                             "e.g. mixture: [{path: shards/ja, weight: 0.6}, {path: shards/en, weight: 0.4}]")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")


@dataclass
class TrainConfig:
    objective: str = help_field("pretrain (next-token loss), sft (next-token loss on the assistant turns of chat "
                                "shards) or dpo (preference pairs, see the finetune section).", default="pretrain")
    steps: int = help_field("Optimizer steps in the run.", default=300)
    batch_size: int = help_field("Sequences per optimizer step (global batch, over all processes); pairs "
                                 "for dpo.", default=16)
    micro_batch_size: int = help_field("Sequences per forward/backward and process; batch_size / "
                                  "(micro_batch_size x processes) steps are accumulated.", default=16)
    seed: int = help_field("Seed for initialisation and data order.", default=0)
    device: str = help_field("auto (cuda if available, else cpu), cpu, cuda or cuda:N.", default="auto")
    dtype: str = help_field("auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32.", default="auto")
    log_every: int = help_field("Log a progress line and a metrics record every N steps.", default=10)
    eval_every: int = help_field("Evaluate every N steps (and at the end); 0 disables.", default=100)
    eval_batches: int = help_field("Micro-batches per evaluation.", default=4)
    save_every: int = help_field("Write a resumable checkpoint every N steps (and at the end); 0: only at "
                            "the end.", default=100)
    keep_checkpoints: int = help_field("Resumable checkpoints to keep (oldest deleted).", default=2)
    activation_checkpointing: bool = help_field("Recompute each block's activations in backward (less memory, "
                                           "about a third more compute).", default=False)
    compile: bool = help_field("torch.compile each transformer block.", default=False)
    metrics_port: int = help_field("Serve Prometheus gauges (mujina_train_*) on this port from rank 0; 0: off.",
                              default=0)
    phase: str = help_field("The project phase this run belongs to (pretrain, moe, sft...): the `phase` label "
                            "of the Prometheus gauges, beside `run`.", default="pretrain")
    peak_tflops: float = help_field("Peak TFLOP/s of one device for MFU; 0: from the built-in table (CUDA "
                               "devices; CPU has no entry, so no MFU).", default=0.0)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "micro_batch_size", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by "
                             f"train.micro_batch_size={self.micro_batch_size}: make it a multiple")
        if self.metrics_port < 0 or self.peak_tflops < 0:
            raise ValueError("train.metrics_port and train.peak_tflops must be >= 0")
        if not isinstance(self.phase, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,32}", self.phase):
            raise ValueError(f"train.phase must be 1-32 letters, digits or ._- (e.g. pretrain), got {self.phase!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train.dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"train.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")


@dataclass
class RunConfig:
    """The whole config file: model, data, optim and train sections plus where to write."""

    model: dict[str, Any] | None = help_field("Model config: `preset: NAME` plus overrides, or every "
                                         "field (see `mujina-model info`).", default=None)
    init_from: str | None = help_field("Start from this checkpoint's weights (e.g. an upcycled MoE); "
                                  "its config is the model config.", default=None)
    out: str = help_field("Output directory (relative paths resolve against the current directory).",
                     default="runs/default")
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        ft, objective = self.finetune, self.train.objective
        if ft.init_from is not None:
            if self.init_from is not None and self.init_from != ft.init_from:
                raise ValueError(f"init_from={self.init_from} and finetune.init_from={ft.init_from} differ: give one")
            self.init_from = ft.init_from
        if objective in ("sft", "dpo") and self.init_from is None:
            raise ValueError(f"train.objective {objective} starts from a trained model: set finetune.init_from "
                             "(e.g. the swarm's exported checkpoint, or the SFT run's OUT/final for DPO)")
        if (objective == "dpo") != (self.data.source == "dpo"):
            raise ValueError("train.objective dpo and data.source dpo go together: DPO reads preference pairs, "
                             "the other objectives read token sequences")
        if objective == "sft" and self.data.source != "shards":
            raise ValueError("train.objective sft reads chat shards: set data.source: shards and list the shards "
                             "`mujina-data shard` made from chat records in data.mixture")
        if self.model is None and self.init_from is None:
            raise ValueError("the config needs a `model:` section (e.g. `preset: debug`) or `init_from:`")
        if self.model is not None and self.init_from is None:
            ModelConfig.from_dict(self.model)  # validate now, before any output is written

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(checked_fields(cls, d, "the config's top level"))
        sections = {"data": DataConfig, "optim": OptimConfig, "train": TrainConfig, "finetune": FinetuneConfig}
        for name, sec in sections.items():
            d[name] = sec(**checked_fields(sec, d.get(name) or {}, name))
        return cls(**d)

    def model_config(self) -> ModelConfig:
        if self.init_from is not None:
            cfg = load_config(self.init_from)
            if self.model is not None and ModelConfig.from_dict(self.model) != cfg:
                raise ValueError(f"model section differs from the config of init_from={self.init_from}; "
                                 "remove the model section to use the checkpoint's")
            return cfg
        return ModelConfig.from_dict(self.model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`train.steps=10` style overrides; values are parsed as YAML (numbers, null, true...)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=10")
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(value)
    return d


# ---- the loop ------------------------------------------------------------------------------------

class Trainer:
    """The trainer, on one process or under torchrun. `run()` trains to cfg.train.steps, resuming from OUT."""

    def __init__(self, cfg: RunConfig, dist: Dist | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out).resolve()
        self.mcfg = cfg.model_config()
        t = cfg.train
        self.dist = dist or init_distributed(t.device)
        self.device = self.dist.device
        world = self.dist.world_size
        use_bf16 = t.dtype == "bf16" or (t.dtype == "auto" and self.device.type == "cuda")
        self.bf16 = use_bf16
        # One process: autocast. FSDP: bf16 parameters by the mixed-precision policy (parallelize).
        self.autocast_dtype = torch.bfloat16 if use_bf16 and not self.dist.distributed else None
        if t.batch_size % (t.micro_batch_size * world):
            raise ValueError(f"train.batch_size={t.batch_size} is not divisible by train.micro_batch_size="
                             f"{t.micro_batch_size} x {world} processes: make it a multiple of "
                             f"{t.micro_batch_size * world}")
        if t.eval_every and t.eval_batches % world:
            raise ValueError(f"train.eval_batches={t.eval_batches} is not divisible by the {world} processes: "
                             "every process evaluates the same number of micro-batches")
        self.accum = t.batch_size // t.micro_batch_size  # micro-batches per step, over all processes
        d = cfg.data
        if d.seq_len > self.mcfg.max_seq_len:
            raise ValueError(f"data.seq_len={d.seq_len} exceeds the model's max_seq_len={self.mcfg.max_seq_len}")
        self._check_fits(use_bf16)
        rank = self.dist.rank
        ft = cfg.finetune
        if ft.mode == "qlora":
            check_qlora(self.device, distributed=self.dist.distributed, compile=t.compile)
        if d.source == "synthetic":
            self.data = StatelessData(SyntheticSource(self.mcfg.vocab_size, d.seq_len, t.seed), rank, world)
        elif d.source == "dpo":
            from .preference import PreferenceData

            tok = d.tokenizer or str(Path(cfg.init_from) / "tokenizer")
            self.data = PreferenceData(d.path, tok, d.seq_len, t.seed, d.eval_fraction if t.eval_every else 0.0,
                                       self.mcfg.vocab_size, rank, world)
        elif d.source == "tokens":
            self.data = StatelessData(TokenFileSource(d.path, d.dtype, d.seq_len, t.seed, d.eval_fraction,
                                                      d.doc_sep_id, self.mcfg.vocab_size), rank, world)
        else:
            self.data = ShardData(d.mixture, d.eval_mixture, d.seq_len, t.seed, self.mcfg.vocab_size, d.verify,
                                  Path(cfg.init_from) / "tokenizer" if cfg.init_from else None, rank, world)
        if cfg.train.eval_every and d.source == "tokens" and d.eval_fraction == 0:
            raise ValueError("train.eval_every > 0 but data.eval_fraction is 0: hold out data or disable eval")
        if cfg.train.eval_every and d.source == "shards" and not d.eval_mixture:
            raise ValueError("train.eval_every > 0 but data.eval_mixture is not set: list held-out shard "
                             "directories, or set train.eval_every: 0")
        if t.objective == "sft":
            unmasked = [s.spec.path for s in self.data.train.sources if not all(r.has_mask for r in s.readers)]
            if unmasked:
                raise ValueError(f"train.objective sft needs chat shards (with a loss mask on assistant turns), but "
                                 f"{', '.join(map(str, unmasked))} holds plain text: shard chat records with "
                                 "`mujina-data shard`")

        torch.manual_seed(t.seed)  # the same initial weights on every process, and as on one process
        # QLoRA builds on CPU and quantises weight by weight onto the device: the dense base never sits there whole.
        self.qlora = ft.mode == "qlora"
        home = torch.device("cpu") if self.qlora else self.device
        if cfg.init_from:
            model = load_checkpoint(cfg.init_from, device=home, dtype=torch.float32)
        else:
            model = Transformer(self.mcfg).to(home)
        # LoRA: a frozen base and fresh adapters (seeded: the same on every process, as on one process).
        self.lora = ft.spec() if ft.mode != "full" else None
        if self.lora is not None:
            add_lora(model, self.lora, generator=torch.Generator(device=home).manual_seed(t.seed))
        if self.qlora:  # the frozen base to NF4 (deterministic: a resume rebuilds the same base from init_from)
            from .qlora import quantize_base

            quantize_base(model, self.device)
        # DPO's reference: the starting model. LoRA: the adapters switched off; full: a frozen copy.
        self.reference = None
        if t.objective == "dpo" and self.lora is None:
            self.reference = parallelize(frozen_copy(model), self.dist, bf16=use_bf16,
                                         activation_checkpointing=False, compile=t.compile)
        self.model = parallelize(model, self.dist, bf16=use_bf16, activation_checkpointing=t.activation_checkpointing,
                                 compile=t.compile)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.step = 0
        self.tokens_seen = 0
        self._eval_batches: list[Batch] | None = None  # the same held-out batches at every evaluation
        self.flops_per_token = flops_per_token(self.mcfg, d.seq_len)
        self.peak_flops = peak_flops(self.device, t.peak_tflops)

    def _check_fits(self, bf16: bool) -> None:
        """Refuse, before allocating anything, a run whose training state alone exceeds the memory."""
        t = self.cfg.train
        on_cpu = self.device.type == "cpu"
        per_host = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if on_cpu else 1  # CPU ranks share the host
        need = memory_estimate(self.mcfg, world_size=self.dist.world_size, micro_batch=t.micro_batch_size,
                               seq_len=self.cfg.data.seq_len, bf16=bf16,
                               activation_checkpointing=t.activation_checkpointing, processes_per_device=per_host)
        if self.cfg.finetune.mode == "qlora":  # a frozen NF4 base instead of fp32 weights, gradients and AdamW moments
            from .qlora import base_bytes

            need["total"] += (base_bytes(self.mcfg) - need["state"]) * per_host
            need["state"] = base_bytes(self.mcfg)
        have = device_memory(self.device)
        if have and need["total"] > have:
            gib = 1 << 30
            raise ValueError(
                f"this run cannot fit: it needs at least {need['total'] / gib:.1f} GiB per "
                f"{'host' if on_cpu else 'device'} (weights, gradients and AdamW state {need['state'] / gib:.1f} GiB "
                f"per process, activations {need['activations'] / gib:.1f} GiB) but {have / gib:.1f} GiB "
                f"{'is available' if on_cpu else 'exist'}. Use more processes (FSDP shards the state), a smaller "
                "train.micro_batch_size or data.seq_len, or train.activation_checkpointing: true")

    # -- checkpoints --

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p for p in self.ckpt_root.glob("step_*") if (p / TRAINER_STATE).exists()
                      and (p / "config.json").exists())
        return done[-1] if done else None

    def save(self) -> Path:
        """One process: the safetensors checkpoint. torchrun: a DCP directory (every process writes its shards).
        Either way it is written under a temporary name and renamed: it appears whole or not at all."""
        final = self.ckpt_root / f"step_{self.step:06d}"
        tmp = self.ckpt_root / f".tmp_step_{self.step:06d}"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.dist.barrier()
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "run_config": self.cfg.to_dict(),
                 "data_state": self.data.state_dict(), "world_size": self.dist.world_size}
        if self.dist.distributed:
            save_distributed(tmp, self.model, self.optimizer, state, is_main=self.dist.is_main)
            self.dist.barrier()
        else:  # QLoRA: the base dequantised to fp32, so the checkpoint is an ordinary LoRA one
            save_checkpoint(tmp, self.model, optimizer=self.optimizer, trainer_state=state,
                            state_dict=self._dequantized_state() if self.qlora else None,
                            tokenizer_dir=self.data.tokenizer_dir)  # a LoRA step_N exports as it is
        if self.dist.is_main:
            if self.lora is not None:
                write_lora_spec(tmp, self.lora)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(self.ckpt_root.glob("step_*"))[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return final

    def _dequantized_state(self) -> dict[str, torch.Tensor]:
        from .qlora import dequantized_state_dict

        return dequantized_state_dict(self.model)

    def resume(self, ckpt: Path) -> None:
        state = json.loads((ckpt / TRAINER_STATE).read_text())
        if load_config(ckpt) != self.mcfg:
            raise ValueError(f"{ckpt} holds a different model than this config: use another --out "
                             "or restore the original model section")
        if is_distributed_checkpoint(ckpt):
            load_distributed(ckpt, self.model, self.optimizer)
        elif self.dist.distributed:
            load_full_into_sharded(ckpt, self.model, self.optimizer)
        elif self.lora is not None:  # base + adapters under their names in this network
            if read_lora_spec(ckpt) != self.lora:
                raise ValueError(f"{ckpt} holds other LoRA adapters than this config's finetune section: use another "
                                 "--out or restore the original r, alpha and targets")
            from .checkpoint import load_state_dict

            if self.qlora:  # the NF4 base was rebuilt from init_from: the adapters alone come from ckpt
                from .qlora import load_adapters

                load_adapters(self.model, load_state_dict(ckpt), ckpt)
            else:
                self.model.load_state_dict(load_state_dict(ckpt), strict=True)
            load_optimizer_state(self.optimizer, self.model, ckpt)
        else:
            self.model.load_state_dict(load_checkpoint(ckpt).state_dict())
            load_optimizer_state(self.optimizer, self.model, ckpt)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.data.load_state_dict(state.get("data_state", {}))
        saved_world = state.get("world_size", 1)
        if saved_world != self.dist.world_size:
            log.info("the checkpoint was written by %d process(es); continuing on %d", saved_world,
                     self.dist.world_size)

    # -- steps --

    def _micro_batches(self, split: str, step: int, count: int) -> list[Batch]:
        return self.data.micro_batches(split, step, count, self.cfg.train.micro_batch_size)

    def train_step(self) -> dict[str, float]:
        if self.cfg.train.objective == "dpo":
            return self._dpo_step()
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.steps)
        world = self.dist.world_size
        batches = self._micro_batches("train", self.step, self.accum)  # this process's share
        (n_targets,) = self.dist.all_sum(sum(b.num_targets for b in batches))
        try:
            out = train_step(self.model, self.optimizer, batches, lr=lr, n_targets=n_targets,
                             grad_clip=self.cfg.optim.grad_clip, device=self.device,
                             autocast_dtype=self.autocast_dtype, world=world, all_sum=self.dist.all_sum)
        except NonFiniteStep as e:
            last = self.latest_checkpoint()
            raise FloatingPointError(
                f"non-finite {e.what} at step {self.step} (loss={e.loss}, grad_norm={e.grad_norm}); weights were not "
                f"updated. Lower optim.lr or raise optim.warmup_steps, then rerun to resume from {last or 'the start'}"
            ) from None
        self.step += 1
        self.tokens_seen += sum(b.input_ids.numel() for b in batches) * world
        return {"loss": out.loss, "aux_loss": out.aux_loss, "grad_norm": out.grad_norm, "lr": lr}

    def _dpo_step(self) -> dict[str, float]:
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.steps)
        batches = self._micro_batches("train", self.step, self.accum)
        (n_chosen,) = self.dist.all_sum(sum(int(b.completion[:b.pairs, 1:].sum()) for b in batches))
        try:
            out = dpo_step(self.model, self.reference, self.optimizer, batches, cfg=self.cfg.finetune, lr=lr,
                           n_pairs=self.cfg.train.batch_size, n_chosen_tokens=n_chosen,
                           grad_clip=self.cfg.optim.grad_clip, device=self.device, autocast_dtype=self.autocast_dtype,
                           world=self.dist.world_size, all_sum=self.dist.all_sum)
        except NonFiniteStep as e:
            raise FloatingPointError(f"non-finite {e.what} at step {self.step} (loss={e.loss}); weights were not "
                                     "updated. Lower optim.lr or finetune.beta, then rerun to resume") from None
        self.step += 1
        (tokens,) = self.dist.all_sum(sum(b.tokens for b in batches))  # unpadded: padding depends on the split
        self.tokens_seen += int(tokens)
        return {"loss": out.loss, "aux_loss": out.aux_loss, "grad_norm": out.grad_norm, "lr": lr, **out.stats}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The held-out loss (`eval_loss`), and for DPO the held-out rewards (`eval_rewards/...`)."""
        if self.cfg.train.objective == "dpo":
            if self._eval_batches is None:
                self._eval_batches = self._micro_batches("eval", 0, self.cfg.train.eval_batches)
            self.model.eval()
            out = dpo_evaluate(self.model, self.reference, self._eval_batches, self.cfg.finetune, self.device,
                               self.autocast_dtype, self.dist.all_sum)
            self.model.train()
            return out
        return {"eval_loss": self._lm_eval()}

    @torch.no_grad()
    def _lm_eval(self) -> float:
        self.model.eval()
        if self._eval_batches is None:
            self._eval_batches = self._micro_batches("eval", 0, self.cfg.train.eval_batches)
        batches = self._eval_batches
        local = sum(forward_loss(self.model, b, self.device, self.autocast_dtype)[0].item() for b in batches)
        self.model.train()
        total, targets = self.dist.all_sum(local, sum(b.num_targets for b in batches))
        return total / targets

    # -- the run --

    def run(self) -> Path:
        t = self.cfg.train
        main = self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        self.dist.barrier()
        ckpt = self.latest_checkpoint()
        if ckpt is not None:
            self.resume(ckpt)
            log.info("resumed from %s at step %d", ckpt, self.step)
        metrics_path = self.out / "metrics.jsonl"
        if main:
            _truncate_metrics(metrics_path, self.step)
        n = self.mcfg.num_params()
        log.info("model: %s parameters (%s active), %s on %s%s%s; %d steps of %d x %d tokens",
                 f"{n:,}", f"{self.mcfg.num_active_params():,}", "MoE" if self.mcfg.is_moe else "dense",
                 f"{self.dist.world_size} processes (FSDP2), " if self.dist.distributed else "", self.device,
                 " (bf16)" if self.bf16 else "",
                 t.steps, t.batch_size, self.cfg.data.seq_len)
        if self.lora is not None:
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            log.info("%s r=%d alpha=%g on %s: %s trainable parameters (%.2f%% of the model), objective %s",
                     self.cfg.finetune.mode, self.lora.r, self.lora.alpha, ",".join(self.lora.targets),
                     f"{trainable:,}", 100 * trainable / n, t.objective)
        exporter = None
        if main and t.metrics_port:
            from .exporter import TrainExporter

            exporter = TrainExporter(self.out.name, t.metrics_port, phase=t.phase)
            log.info("Prometheus gauges on :%d/metrics", exporter.port)
        self.model.train()
        t_last, tok_last, t_start, step_start = time.perf_counter(), self.tokens_seen, time.perf_counter(), self.step
        mf = metrics_path.open("a") if main else None
        try:
            while self.step < t.steps:
                m = self.train_step()
                last = self.step == t.steps
                do_eval = t.eval_every and (self.step % t.eval_every == 0 or last)
                if self.step % t.log_every == 0 or last or do_eval:
                    now = time.perf_counter()
                    m["tokens_per_s"] = (self.tokens_seen - tok_last) / max(now - t_last, 1e-9)
                    if self.peak_flops:
                        per_device = m["tokens_per_s"] / self.dist.world_size
                        m["mfu"] = per_device * self.flops_per_token / self.peak_flops
                    t_last, tok_last = now, self.tokens_seen
                    if do_eval:
                        m.update(self.evaluate())
                    if mf is not None:
                        record = {"step": self.step, "tokens": self.tokens_seen, **m}
                        mf.write(json.dumps(record) + "\n")
                        mf.flush()
                    if exporter is not None:
                        exporter.update(step=self.step, tokens_total=self.tokens_seen, **m,
                                        tokens_per_second=m["tokens_per_s"])
                    eta = (now - t_start) / (self.step - step_start) * (t.steps - self.step)
                    log.info("step %d/%d | loss %.4f%s%s | lr %.2e | grad %.3f | %.0f tok/s%s | eta %s",
                             self.step, t.steps, m["loss"],
                             f" | eval {m['eval_loss']:.4f}" if do_eval else "",
                             f" | aux {m['aux_loss']:.4f}" if self.mcfg.is_moe else "",
                             m["lr"], m["grad_norm"], m["tokens_per_s"],
                             f" | MFU {100 * m['mfu']:.1f}%" if "mfu" in m else "", _fmt_eta(eta))
                if (t.save_every and self.step % t.save_every == 0) or last:
                    self.save()
            final = self.save_final()
        finally:
            if mf is not None:
                mf.close()
            if exporter is not None:
                exporter.close()
        log.info("done: %d steps, %s tokens; model in %s", self.step, f"{self.tokens_seen:,}", final)
        return final

    def save_final(self) -> Path:
        """The trained model in the project format (safetensors, full weights), written by rank 0. A LoRA run's
        is merged (W + s B A): a plain checkpoint every other tool reads; its adapters stay in the last
        resumable checkpoint (OUT/checkpoints/step_N, for `mujina-model export --adapter-out`)."""
        final = self.out / "final"
        if not self.dist.distributed and self.lora is None:
            return save_checkpoint(final, self.model, tokenizer_dir=self.data.tokenizer_dir)
        if self.dist.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:  # QLoRA: merged into the dequantised base, in fp32
            state = self._dequantized_state() if self.qlora else self.model.state_dict()
            full = {k: v.detach().cpu() for k, v in state.items()}
        if self.dist.is_main:
            net = self.model
            if self.lora is not None:
                net = Transformer(self.mcfg)
                add_lora(net, self.lora)
                net.load_state_dict(full)
                full = merge_lora(net).state_dict()
            save_checkpoint(final, net, tokenizer_dir=self.data.tokenizer_dir, state_dict=full)
        self.dist.barrier()
        return final


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint, so each step appears once."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _fmt_eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---- command line --------------------------------------------------------------------------------

def _config_help() -> str:
    lines = ["config file sections and fields (override any with --set SECTION.FIELD=VALUE):"]
    for f in fields(RunConfig):
        if f.name in ("data", "optim", "train", "finetune"):
            continue
        lines.append(f"  {f.name:28s} {f.metadata.get('help', '')}")
    for name, sec in (("data", DataConfig), ("optim", OptimConfig), ("train", TrainConfig),
                      ("finetune", FinetuneConfig)):
        for f in fields(sec):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"  {name + '.' + f.name:28s} {f.metadata['help']} [default: {default}]")
    return "\n".join(lines)


def load_run_config(path: str | None, overrides: list[str], out: str | None) -> RunConfig:
    d = read_config_file(Path(path)) if path else {}
    d = apply_overrides(d, overrides)
    if out is not None:
        d["out"] = out
    return RunConfig.from_dict(d)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mujina-train",
        description="Train a mujina model: on one process (the reference trainer), or under torchrun with "
                    "FSDP2 (`torchrun --nproc_per_node N -m model.train --config FILE`; multi-node: add --nnodes, "
                    "--rdzv-backend c10d --rdzv-endpoint HOST:PORT; --max-restarts K restarts from the last "
                    "checkpoint). Running the same command again resumes from the newest checkpoint in the "
                    "output directory, on any number of processes.",
        epilog=_config_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML/JSON run config (see configs/debug.yaml)")
    p.add_argument("--out", help="output directory; overrides `out:` in the config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set train.steps=50 (repeatable)")
    args = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    # Under torchrun rank 0 tells the story; the others speak only for warnings and errors.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {f'[rank {rank}] ' if world > 1 else ''}%(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_run_config(args.config, args.overrides, args.out)
        Trainer(cfg).run()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # ShardError is a ValueError
        log.error("error: %s", e)
        return 2
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
