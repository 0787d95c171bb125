"""Post-training in the one trainer: the `finetune:` config section, LoRA checkpoints, and DPO's step.

    train:    {objective: dpo}          # pretrain (default) | sft | dpo
    finetune: {mode: lora, r: 8, alpha: 16, beta: 0.1, init_from: runs/sft/final}
    data:     {source: dpo, path: state/synthetic/dpo.jsonl, tokenizer: runs/sft/final/tokenizer}

SFT is the pretraining step on chat shards: `mujina-data shard` writes a loss mask on assistant turns, the
loader turns it into labels (model/data.py), so the loss is on the answers only and the objective needs no
code of its own beyond checking that the shards carry masks. DPO runs `dpo_step` (below) on
model/preference.py's pairs with model/objectives.py's loss.

The DPO reference is the model the run starts from: with LoRA the same network with its adapters disabled
(no second copy in memory), with QLoRA likewise, so its reference is the same NF4-quantised base (model/qlora.py);
in full mode a frozen copy. Tanuki's order: SFT, merge (the final checkpoint of a
LoRA run is merged), then DPO with a fresh adapter, so the reference is the SFT model.

A LoRA run's resumable checkpoints hold the base and the adapters in model.safetensors plus `lora.json`
(the LoraSpec); `load_lora_checkpoint` rebuilds that network, `mujina-model merge` folds it into a plain
checkpoint, and the run's `final/` is already merged. A QLoRA run writes the same: its base dequantised to fp32
(what it trained on); on resume it re-quantises init_from (deterministic) and takes the adapters alone.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import load_config, load_state_dict, write_json
from .config import help_field
from .lora import DEFAULT_TARGETS, LoraSpec, adapters_disabled, add_lora
from .objectives import completion_logps, dpo_loss, token_logps
from .preference import PairBatch
from .step import clip_gradients, step_if_finite
from .transformer import Transformer

log = logging.getLogger(__name__)

LORA_FILE = "lora.json"
OBJECTIVES = ("pretrain", "sft", "dpo")


@dataclass
class FinetuneConfig:
    mode: str = help_field("full (every weight trains), lora (adapters on a frozen base) or qlora (adapters on a "
                           "4-bit NF4 base with bitsandbytes: one process, CUDA or CPU).", default="full")
    init_from: str | None = help_field("The checkpoint post-training starts from (the SFT model for DPO); the "
                                       "same as the top-level init_from.", default=None)
    r: int = help_field("LoRA rank.", default=8)
    alpha: float = help_field("LoRA scale numerator: the update is (alpha / r) B A.", default=16.0)
    dropout: float = help_field("Dropout on each adapter's input.", default=0.0)
    targets: list[str] = help_field("Layers that get adapters: wq wk wv wo (attention), w1 w2 w3 (dense FFN), "
                                    "experts (stacked MoE experts), router.",
                                    default_factory=lambda: list(DEFAULT_TARGETS))
    rslora: bool = help_field("Rank-stabilised LoRA: scale alpha / sqrt(r).", default=False)
    beta: float = help_field("DPO's beta: how far the policy may move from the reference (Tanuki: 0.01 full, "
                             "0.1 LoRA).", default=0.1)
    label_smoothing: float = help_field("DPO: the share of pairs assumed mislabelled (conservative DPO), "
                                        "in [0, 0.5).", default=0.0)
    nll_weight: float = help_field("DPO: weight of the chosen answers' NLL added to the loss (RPO).", default=0.0)

    def __post_init__(self) -> None:
        if self.mode not in ("full", "lora", "qlora"):
            raise ValueError(f"finetune.mode must be full, lora or qlora, got {self.mode!r}")
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5 or self.nll_weight < 0:
            raise ValueError("finetune.beta must be > 0, finetune.label_smoothing in [0, 0.5) and "
                             "finetune.nll_weight >= 0")
        if self.mode != "full":
            self.spec()  # validates r, dropout and targets now

    def spec(self) -> LoraSpec:
        return LoraSpec(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=tuple(self.targets),
                        rslora=self.rslora)


def check_qlora(device: torch.device, *, distributed: bool = False, compile: bool = False) -> None:
    """Refuse, before any work, a QLoRA run this version cannot do; say on CPU what the run will be.

    QLoRA (model/qlora.py) runs on one process, on CUDA (bf16 autocast by default) or on CPU, where
    bitsandbytes 0.50's CPU backend quantises and dequantises (fp32 compute, or bf16 with train.dtype bf16)."""
    if distributed:
        raise ValueError("finetune.mode qlora runs on one process: FSDP does not shard bitsandbytes' NF4 weights "
                         "here. Run it without torchrun, or use finetune.mode lora under torchrun")
    if compile:
        raise ValueError("finetune.mode qlora does not compile (its layers dequantise inside autograd's saved-tensor "
                         "hooks): set train.compile: false")
    try:
        from .qlora import bitsandbytes

        bitsandbytes()
    except ImportError:
        raise ValueError("finetune.mode qlora needs bitsandbytes: pip install bitsandbytes") from None
    if device.type == "cpu":
        log.info("finetune.mode qlora on CPU: bitsandbytes' CPU backend stores the base in NF4 (about 1/7 of its fp32 "
                 "bytes) and dequantises it layer by layer; steps run slower than LoRA's and the library and the "
                 "fp32 load cost resident memory (benchmarks/qlora_memory.py): check a QLoRA config here, train "
                 "large bases on CUDA")
    elif device.type != "cuda":
        raise ValueError(f"finetune.mode qlora runs on CUDA or CPU (bitsandbytes' NF4 kernels); this run's device is "
                         f"{device.type}: use finetune.mode lora")


# ---- LoRA checkpoints -----------------------------------------------------------------------------

def write_lora_spec(directory: Path, spec: LoraSpec) -> None:
    write_json(Path(directory) / LORA_FILE, {**asdict(spec), "targets": list(spec.targets)})


def read_lora_spec(directory: str | Path) -> LoraSpec | None:
    path = Path(directory) / LORA_FILE
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        return LoraSpec(**{**d, "targets": tuple(d["targets"])})
    except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError; LoraSpec checks values
        raise ValueError(f"{path} is not a LoRA spec ({e}): rewrite it from the run's finetune section, e.g. "
                         '{"r": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["wq", "wv"], "rslora": false}') from None


def load_lora_checkpoint(directory: str | Path) -> Transformer:
    """A LoRA run's checkpoint (base + adapters + lora.json) as a network with its adapters, on CPU."""
    spec = read_lora_spec(directory)
    if spec is None:
        raise ValueError(f"{directory} has no {LORA_FILE}: it is not a LoRA checkpoint (load it with load_checkpoint)")
    net = Transformer(load_config(directory))
    add_lora(net, spec)
    state = load_state_dict(directory)
    if net.cfg.tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not match config.json and {LORA_FILE} (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return net


# ---- DPO ------------------------------------------------------------------------------------------

def frozen_copy(net: torch.nn.Module) -> torch.nn.Module:
    """Full-mode DPO's reference: a copy that never trains (eval mode: no dropout)."""
    ref = copy.deepcopy(net).eval()
    ref.requires_grad_(False)
    return ref


@dataclass
class DPOStepResult:
    loss: float
    aux_loss: float
    grad_norm: float
    lr: float
    stats: dict[str, float] = field(default_factory=dict)


def _forward(model, b: PairBatch, device, autocast_dtype):
    ids = b.input_ids.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        return model(ids, return_aux=True)  # (2B, T, V), MoEAux | None


def pair_terms(model, reference, b: PairBatch, device, autocast_dtype):
    """(policy logps (2B,), reference logps (2B,), chosen NLL sum, the policy's MoE aux, chosen token count).
    One fp32 log-softmax of the policy's logits serves both the log-probs and the NLL."""
    comp, ids = b.completion.to(device), b.input_ids.to(device)
    logits, aux = _forward(model, b, device, autocast_dtype)
    mask = comp[:, 1:].to(torch.float32)  # the predicted tokens that are the answer's
    per_token = token_logps(logits, ids) * mask  # (2B, T-1)
    logps = per_token.sum(-1)
    with torch.no_grad():
        if reference is None:  # LoRA: the same network with its adapters off
            with adapters_disabled(model):
                ref_logits, _ = _forward(model, b, device, autocast_dtype)
        else:
            ref_logits, _ = _forward(reference, b, device, autocast_dtype)
        ref_logps, _ = completion_logps(ref_logits, ids, comp)
    B = b.pairs
    return logps, ref_logps, -per_token[:B].sum(), aux, int(mask[:B].sum())


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def dpo_step(model, reference, optimizer, batches: Sequence[PairBatch], *, cfg: FinetuneConfig, lr: float,
             n_pairs: int, n_chosen_tokens: int, grad_clip: float, device, autocast_dtype=None, world: int = 1,
             all_sum: Callable[..., list[float]] = lambda *v: list(v)) -> DPOStepResult:
    """One DPO step on this process's micro-batches; `n_pairs` and `n_chosen_tokens` count the whole step over
    every process, so the loss is the mean over the global batch however it is split (as model/step.py)."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    accum = len(batches)
    total = aux_total = 0.0
    sums = dict.fromkeys(METRICS, 0.0)
    for b in batches:
        logps, ref_logps, nll_sum, aux, _ = pair_terms(model, reference, b, device, autocast_dtype)
        B = b.pairs
        chosen_nll = nll_sum / max(n_chosen_tokens, 1) * (n_pairs / B)  # so that (B / n_pairs) x it is the share
        loss, stats = dpo_loss(logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], cfg.beta, cfg.label_smoothing,
                               chosen_nll=chosen_nll, nll_weight=cfg.nll_weight)
        loss = loss * (B / n_pairs)
        total += loss.item()
        for k in METRICS:
            sums[k] += stats[k] * B
        loss = loss * world  # FSDP averages gradients over processes
        if aux is not None:
            aux_loss = aux.loss(model.cfg)
            loss = loss + aux_loss / accum
            aux_total += aux_loss.item() / accum
        loss.backward()
    grad_norm = clip_gradients(model, grad_clip)
    loss_all, aux_all, *metric_sums = all_sum(total, aux_total / world, *(sums[k] for k in METRICS))
    gn = grad_norm.item()
    step_if_finite(optimizer, loss_all, gn)
    return DPOStepResult(loss_all, aux_all, gn, lr, {k: s / n_pairs for k, s in zip(METRICS, metric_sums, strict=True)})


@torch.no_grad()
def dpo_evaluate(model, reference, batches: Sequence[PairBatch], cfg: FinetuneConfig, device, autocast_dtype,
                 all_sum) -> dict[str, float]:
    """Held-out DPO loss and rewards (the same pairs at every evaluation), over every process."""
    n = loss_sum = 0.0
    sums = dict.fromkeys(METRICS, 0.0)
    for b in batches:
        logps, ref_logps, _, _, _ = pair_terms(model, reference, b, device, autocast_dtype)
        B = b.pairs
        loss, stats = dpo_loss(logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], cfg.beta, cfg.label_smoothing)
        loss_sum += loss.item() * B
        n += B
        for k in METRICS:
            sums[k] += stats[k] * B
    n, loss_sum, *metric_sums = all_sum(n, loss_sum, *(sums[k] for k in METRICS))
    return {"eval_loss": loss_sum / n, **{f"eval_{k}": s / n for k, s in zip(METRICS, metric_sums, strict=True)}}
