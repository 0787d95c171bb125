"""LoRA checkpoints to Hugging Face artefacts: the merged model, the base, and a PEFT adapter directory.

    merge_lora_checkpoint("runs/dpo/checkpoints/step_000100", "runs/dpo/merged")   # a plain mujina checkpoint
    base_of_lora_checkpoint("runs/dpo/checkpoints/step_000100", "runs/dpo/base")   # the frozen base alone
    write_peft_adapter("runs/dpo/checkpoints/step_000100", "hf/adapter", base_name="hf/base")

The adapter directory is peft's format: `adapter_config.json` and `adapter_model.safetensors`, keys
`base_model.model.<Hugging Face module>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r), so that
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)` reproduces the LoRA
network. Experts are written as the legacy Mixtral modules (`block_sparse_moe.experts.{j}.w1`, one A and B
per expert, sliced from our stacked factors), the layout model/hf.py exports the base in; peft maps it onto
the fused experts of transformers >= 5 itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import TOKENIZER, WEIGHTS, atomic_write, load_config, save_checkpoint, write_json
from .finetune import load_lora_checkpoint, read_lora_spec
from .lora import merge_lora

_LINEAR = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
           "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
           "feed_forward.w2": "mlp.down_proj", "feed_forward.router": "block_sparse_moe.gate"}
_EXPERT = {"w1_A_ErD": ("w1", "lora_A"), "w1_B_EFr": ("w1", "lora_B"), "w3_A_ErD": ("w3", "lora_A"),
           "w3_B_EFr": ("w3", "lora_B"), "w2_A_ErF": ("w2", "lora_A"), "w2_B_EDr": ("w2", "lora_B")}
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _is_adapter_key(key: str) -> bool:
    return key.endswith((".lora_A", ".lora_B")) or ".feed_forward.lora." in key


def _lora_dir(directory: str | os.PathLike) -> Path:
    d = Path(directory)
    if read_lora_spec(d) is None:
        raise ValueError(f"{d} is not a LoRA checkpoint (no lora.json): give a resumable checkpoint of a "
                         "finetune.mode lora run, e.g. OUT/checkpoints/step_000100")
    return d


def merge_lora_checkpoint(directory: str | os.PathLike, out: str | os.PathLike) -> Path:
    """W + s B A for every adapter: a plain checkpoint (with the tokenizer) that every tool reads."""
    d = _lora_dir(directory)
    net = merge_lora(load_lora_checkpoint(d))
    tok = d / TOKENIZER
    return save_checkpoint(out, net, tokenizer_dir=tok if tok.is_dir() else None)


def base_of_lora_checkpoint(directory: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The frozen base the adapters were trained on, as a plain checkpoint."""
    d = _lora_dir(directory)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with safe_open(str(d / WEIGHTS), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if not _is_adapter_key(k)}  # noqa: SIM118
    atomic_write(out / WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": "mujina/1"}))
    cfg = load_config(d)
    if (d / TOKENIZER).is_dir():
        import shutil

        shutil.copytree(d / TOKENIZER, out / TOKENIZER, dirs_exist_ok=True)
    write_json(out / "config.json", {"format": "mujina/1", **cfg.to_dict()})
    return out


def peft_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapters of a LoRA checkpoint under peft's names for the exported Hugging Face model."""
    d = _lora_dir(directory)
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(d / WEIGHTS), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            if not _is_adapter_key(key):
                continue
            m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(lora_A|lora_B)", key)
            if m is not None:
                prefix = f"base_model.model.model.layers.{m.group(1)}."
                out[f"{prefix}{_LINEAR[m.group(2)]}.{m.group(3)}.weight"] = f.get_tensor(key).contiguous()
                continue
            m = re.fullmatch(r"layers\.(\d+)\.feed_forward\.lora\.(\w+)", key)
            if m is None or m.group(2) not in _EXPERT:
                raise ValueError(f"unexpected adapter tensor {key!r} in {d / WEIGHTS}")
            proj, part = _EXPERT[m.group(2)]
            stacked = f.get_tensor(key)  # (E, r, in) or (E, out, r)
            for j in range(stacked.shape[0]):
                name = f"base_model.model.model.layers.{m.group(1)}.block_sparse_moe.experts.{j}.{proj}.{part}.weight"
                out[name] = stacked[j].contiguous()
    return out


def write_peft_adapter(directory: str | os.PathLike, out: str | os.PathLike, base_name: str) -> Path:
    """adapter_config.json + adapter_model.safetensors for `PeftModel.from_pretrained(base, out)`."""
    d = _lora_dir(directory)
    spec = read_lora_spec(d)
    tensors = peft_tensors(d)
    modules = sorted({k.split(".")[-3] for k in tensors})  # q_proj, ..., w1, w2, w3, gate
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_json(out / ADAPTER_CONFIG, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_name),
        "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_rslora": spec.rslora,
        "target_modules": modules, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "use_dora": False,
    })
    return out
