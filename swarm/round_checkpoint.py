"""Round checkpoints: what a newcomer starts a round from, and how a round's uploads become the next one.

A round checkpoint is the project checkpoint format (model/checkpoint.py: config.json +
model.safetensors) plus `outer_momentum.safetensors`: the outer Nesterov momentum in the full model's
parameter layout (same names and shapes), with the round number in its metadata. The coordinator keeps
the full copy; a worker reads only the slices it holds (`local_model_from_checkpoint`,
`local_momentum_from_checkpoint`). After each round every holder uploads its modules' θ and momentum
(flat fp32, safetensors) and the coordinator merges them (`merge_uploads`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from model.checkpoint import atomic_write
from model.transformer import Transformer

from .modules import TRUNK, parse_module
from .tensors import EXPERT_TENSORS, flatten, module_tensors, momentum_into, momentum_views, trunk_names, unflatten_into

log = logging.getLogger(__name__)

OUTER_STATE = "outer_momentum.safetensors"   # next to model.safetensors in a swarm round checkpoint


def save_outer_state(directory: str | Path, momentum_full: dict[str, Tensor], round_: int) -> None:
    """Momentum in the full model's parameter layout (same names and shapes), plus the round number."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in momentum_full.items()}
    atomic_write(Path(directory) / OUTER_STATE,
                 lambda p: save_file(tensors, str(p), metadata={"round": str(round_)}))


def save_round_checkpoint(directory: str | Path, full: Transformer, momentum_full: dict[str, Tensor],
                          round_: int) -> Path:
    """The project checkpoint format plus the outer momentum: what a newcomer starts round `round_` from."""
    from model.checkpoint import save_checkpoint

    Path(directory).mkdir(parents=True, exist_ok=True)
    save_outer_state(directory, momentum_full, round_)  # before config.json, which marks a complete checkpoint
    return save_checkpoint(directory, full, trainer_state={"swarm_round": round_})


def load_outer_state(directory: str | Path) -> tuple[dict[str, Tensor], int]:
    """(full-layout momentum, round) of a round checkpoint; ({}, 0) for a plain checkpoint."""
    from safetensors import safe_open

    path = Path(directory) / OUTER_STATE
    if not path.exists():
        return {}, 0
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, int(f.metadata().get("round", "0"))


def read_round(directory: str | Path) -> int:
    """The round a swarm checkpoint starts (0 for a plain checkpoint, e.g. freshly upcycled)."""
    from safetensors import safe_open

    path = Path(directory) / OUTER_STATE
    if not path.exists():
        return 0
    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata().get("round", "0"))


def local_momentum_from_checkpoint(directory: str | Path, modules: Iterable[str], template: Transformer,
                                   index: dict[str, int]) -> dict[str, Tensor]:
    """Flat per-module outer momentum read from a round checkpoint (zeros where it has none: round 0)."""
    from safetensors import safe_open

    path = Path(directory) / OUTER_STATE
    zeros = {m: torch.zeros_like(flatten(module_tensors(template, m, index))) for m in modules}
    if not path.exists():
        return zeros
    out = {}
    with safe_open(str(path), framework="pt") as f:
        if not set(f.keys()):
            return zeros
        for m in modules:
            if m == TRUNK:
                out[m] = torch.cat([f.get_tensor(n).reshape(-1).float() for n in trunk_names(template)])
                continue
            layer, e = parse_module(m)
            pre = f"layers.{layer}.feed_forward."
            out[m] = torch.cat([f.get_slice(pre + n)[e:e + 1][0].reshape(-1).float() for n in EXPERT_TENSORS])
    return out


def merge_uploads(full: Transformer, momentum_full: dict, uploads: list[bytes]) -> set[str]:
    """Write uploaded modules into the full copy (later uploads win for modules several workers hold; they
    agree to the compression's rounding). Returns the modules updated; the others stay as they were."""
    from safetensors.torch import load

    if not momentum_full:
        momentum_into(momentum_full, full, {})
    done = set()
    for data in uploads:
        tensors = load(data)  # safetensors: no code runs while reading
        for key, flat in tensors.items():
            module, _, what = key.rpartition(".")
            target = module_tensors(full, module) if what == "theta" else momentum_views(momentum_full, full, module)
            if flat.numel() != sum(t.numel() for t in target) or not bool(flat.isfinite().all()):
                log.warning("upload for module %s has the wrong size or non-finite values; ignored", module)
                continue
            unflatten_into(flat, target)
            done.add(module)
    return done
