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

from .modules import EXPERT_TENSORS, TRUNK, parse_module
from .tensors import flatten, module_tensors, momentum_into, momentum_views, trunk_names, unflatten_into

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

    from .uploads import write_module_starts

    Path(directory).mkdir(parents=True, exist_ok=True)
    save_outer_state(directory, momentum_full, round_)  # before config.json, which marks a complete checkpoint
    out = save_checkpoint(directory, full, trainer_state={"swarm_round": round_})
    write_module_starts(directory)  # what the train validator bounds uploads with
    return out


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


def _targets(full: Transformer, momentum_full: dict, module: str, what: str) -> list[Tensor]:
    return module_tensors(full, module) if what == "theta" else momentum_views(momentum_full, full, module)


def median(stacked: Tensor) -> Tensor:
    """Element-wise median over dim 0; the mean of the two middle values for an even count (torch.median
    takes the lower one, which would let one of two holders decide alone)."""
    n = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def merge_uploads(full: Transformer, momentum_full: dict,
                  uploads: list[bytes]) -> tuple[set[str], dict[str, list[int]]]:
    """Merge a round's uploads into the full copy, module by module: θ and momentum are the element-wise
    median of the module's holders' uploads (the mean of two), never one holder's word alone. Uploads
    reach here checked (coordinator/validate_train.py); a tensor of the wrong size or with non-finite values
    is still skipped.

    Returns (modules updated, module -> indices into `uploads` of the holders out-voted on it: their θ is far
    from the merged one, more than half of the module's move this round away, which holders that took the
    same averaged step never are, and they are a minority of three or more holders; two holders that
    disagree cannot tell who is right, and are only logged). The others stay as they were."""
    from safetensors.torch import load

    if not momentum_full:
        momentum_into(momentum_full, full, {})
    found: dict[str, dict[str, list[tuple[int, Tensor]]]] = {}
    for i, data in enumerate(uploads):
        for key, flat in load(data).items():  # safetensors: no code runs while reading
            module, _, what = key.rpartition(".")
            if what not in ("theta", "momentum"):
                log.warning("upload %d: key %s is neither a module's theta nor its momentum; ignored", i, key)
                continue
            try:
                target = _targets(full, momentum_full, module, what)
            except (ValueError, KeyError, IndexError):
                log.warning("upload %d: %s is not a module of this model; ignored", i, module)
                continue
            if flat.numel() != sum(t.numel() for t in target) or not bool(flat.isfinite().all()):
                log.warning("upload %d: module %s has the wrong size or non-finite values; ignored", i, module)
                continue
            found.setdefault(module, {}).setdefault(what, []).append((i, flat.float()))
    done, disagree = set(), {}
    for module, parts in found.items():
        start = flatten(module_tensors(full, module))
        for what, got in parts.items():
            merged = median(torch.stack([t for _, t in got]))
            if what == "theta":
                move = float((merged - start).abs().max())
                far = [i for i, t in got if float((t - merged).abs().max()) > 0.5 * move + 1e-6]
                if far and 2 * len(far) < len(got):
                    disagree[module] = far   # out-voted: a minority of three or more holders
                elif far:
                    log.warning("module %s: its %d holders' uploads disagree and are too few to tell who is right "
                                "(uploads %s); merged as their median", module, len(got), [i for i, _ in got])
            unflatten_into(merged, _targets(full, momentum_full, module, what))
        done.add(module)
    return done, disagree
