"""What a worker uploads after a round, and the coordinator's check of it before it is accepted or credited.

An upload is safetensors with two flat fp32 tensors per held module: `{module}.theta` (the module's
parameters after the outer step) and `{module}.momentum` (its outer momentum). `check_upload` refuses,
with the reason, an upload that does not parse, whose key set is not exactly the slot's modules, whose
tensors have another shape or dtype, hold NaN/Inf, or lie beyond what one honest round can reach from the
round's start (`reach`). Torch-free (numpy reads safetensors), so the coordinator checks without torch.

The reach is a bound, not a model: it stops garbage (an upload of 1e30, a module of another run) from
ever reaching the full copy; what a liar can do within it is for the merge to judge (the holders' median,
swarm/round_checkpoint.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .modules import EXPERT_TENSORS, held_modules, is_expert_param, parse_module
from .settings import InnerConfig, SwarmSettings, TrainPayload

CARRY_ROUNDS = 4   # rounds of local progress a module may carry after failed averagings (failure_policy retry)


class UploadError(ValueError):
    """An upload refused, with the reason."""


@dataclass(frozen=True)
class ModuleStart:
    """What the check needs of a module at the round's start: its size and the largest |θ| and |momentum|."""

    size: int
    theta_max: float
    momentum_max: float


def adam_step_ratio(beta1: float, beta2: float) -> float:
    """A bound on |m̂ / (√v̂ + ε)|, AdamW's step in units of lr, twice over for slack. By Cauchy-Schwarz,
    |m_t| ≤ (1 − β1)/√(1 − β2) · (Σ_j (β1²/β2)^j)^½ · √v_t; bias correction does not raise it (1.17 for
    β 0.9/0.95). Where β1² ≥ β2 the sum diverges and 10 stands in."""
    if beta1 ** 2 >= beta2:
        return 10.0
    return 2 * max(1.0, (1 - beta1) / math.sqrt(1 - beta2) / math.sqrt(1 - beta1 ** 2 / beta2))


def reach(start: ModuleStart, inner: InnerConfig, settings: SwarmSettings) -> tuple[float, float]:
    """(largest |θ|, largest |momentum|) an honest upload of the module can hold after the round.

    Per inner step AdamW moves a parameter by at most lr · (step ratio + weight_decay · |θ|); a round's Δ is
    at most H such steps, and a module may carry CARRY_ROUNDS rounds of them. The outer step then moves θ by
    outer_lr · (Δ̄ + μ · momentum'), momentum' = μ · momentum + Δ̄."""
    o = inner.optim
    scale = start.theta_max + 1.0
    delta = CARRY_ROUNDS * inner.inner_steps * o.lr * (adam_step_ratio(o.beta1, o.beta2) + o.weight_decay * scale)
    mu = settings.outer_momentum
    momentum = mu * start.momentum_max + delta
    theta = start.theta_max + settings.outer_lr * (delta + mu * momentum)
    slack = 1.01  # fp32 and compression rounding
    return theta * slack + 1e-6, momentum * slack + 1e-6


MODULE_STARTS = "module_starts.json"   # beside model.safetensors: every module's ModuleStart, for the validator


def read_starts(checkpoint: str | Path, modules: list[str] | None = None) -> dict[str, ModuleStart]:
    """Each module's size and largest |θ| and |momentum| in a round checkpoint (model.safetensors and
    outer_momentum.safetensors, read with numpy); every module of the model when `modules` is None."""
    from safetensors import safe_open

    directory = Path(checkpoint)
    out: dict[str, ModuleStart] = {}
    with safe_open(str(directory / "model.safetensors"), framework="numpy") as f:
        keys = list(f.keys())
        trunk = [k for k in keys if not is_expert_param(k)]
        if modules is None:
            layers = sorted(int(k.split(".")[1]) for k in keys if k.endswith("feed_forward.w1_EFD"))
            experts = {i: f.get_slice(f"layers.{i}.feed_forward.w1_EFD").get_shape()[0] for i in layers}
            modules = held_modules({i: list(range(n)) for i, n in experts.items()})
        momentum = _momentum_reader(directory)
        for m in modules:
            where = parse_module(m)
            if where is None:
                arrays = [f.get_tensor(k) for k in trunk]
                moms = [momentum(k, None) for k in trunk]
            else:
                layer, e = where
                names = [f"layers.{layer}.feed_forward.{t}" for t in EXPERT_TENSORS]
                for n in names:
                    if n not in keys:
                        raise UploadError(f"module {m} is not in the round's checkpoint")
                arrays = [f.get_slice(n)[e:e + 1] for n in names]
                moms = [momentum(n, e) for n in names]
            out[m] = ModuleStart(sum(a.size for a in arrays), max(float(np.abs(a).max(initial=0)) for a in arrays),
                                 max(moms, default=0.0))
    return out


def write_module_starts(checkpoint: str | Path) -> None:
    """Record every module's start in the checkpoint (the round driver does, after writing it), so that
    checking an upload reads a small file, not the model."""
    import json
    import os

    path = Path(checkpoint) / MODULE_STARTS
    tmp = path.with_name(f".{MODULE_STARTS}.tmp")
    tmp.write_text(json.dumps({m: [s.size, s.theta_max, s.momentum_max] for m, s in read_starts(checkpoint).items()}))
    os.replace(tmp, path)


def module_starts(checkpoint: str | Path, modules: list[str]) -> dict[str, ModuleStart]:
    """The starts of `modules`: from the checkpoint's MODULE_STARTS, else read from its tensors."""
    import json

    path = Path(checkpoint) / MODULE_STARTS
    if path.is_file():
        recorded = json.loads(path.read_text())
        if all(m in recorded for m in modules):
            return {m: ModuleStart(int(recorded[m][0]), float(recorded[m][1]), float(recorded[m][2])) for m in modules}
    return read_starts(checkpoint, modules)


def _momentum_reader(directory: Path):
    """(tensor name, expert or None) -> largest |momentum| there; 0 where the checkpoint has none (round 0)."""
    from safetensors import safe_open

    path = directory / "outer_momentum.safetensors"
    if not path.exists():
        return lambda name, expert: 0.0
    f = safe_open(str(path), framework="numpy")
    keys = set(f.keys())

    def read(name: str, expert: int | None) -> float:
        if name not in keys:
            return 0.0
        a = f.get_tensor(name) if expert is None else f.get_slice(name)[expert:expert + 1]
        return float(np.abs(a).max(initial=0))
    return read


def read_upload(data: bytes) -> dict[str, np.ndarray]:
    """The upload's tensors; UploadError for bytes that are not safetensors."""
    from safetensors.numpy import load

    if not data:
        raise UploadError("the upload is empty: a train result carries its modules' θ and momentum")
    try:
        return load(data)  # parses the header and copies the buffers; no code runs
    except Exception as e:  # safetensors raises its own SafetensorError (and others) for any malformed input
        raise UploadError(f"the upload is not safetensors: {e}") from None


def check_upload(data: bytes, payload: TrainPayload, starts: dict[str, ModuleStart]) -> dict[str, np.ndarray]:
    """The upload's tensors if it is what this slot's round can honestly produce; UploadError naming the
    first thing that is not. `starts`: read_starts of the round's checkpoint for the slot's modules."""
    tensors = read_upload(data)
    modules = held_modules(payload.assignment)
    want = {f"{m}.{part}" for m in modules for part in ("theta", "momentum")}
    if set(tensors) != want:
        extra, missing = sorted(set(tensors) - want), sorted(want - set(tensors))
        raise UploadError(f"the upload's modules are not this slot's: unexpected {extra[:4]}, missing {missing[:4]}")
    for m in modules:
        start = starts[m]
        theta_max, momentum_max = reach(start, payload.inner, payload.settings)
        for part, bound in (("theta", theta_max), ("momentum", momentum_max)):
            a = tensors[f"{m}.{part}"]
            if a.dtype != np.float32 or a.shape != (start.size,):
                raise UploadError(f"{m}.{part} is {a.dtype} {a.shape}; the slot's module is float32 ({start.size},)")
            if not np.isfinite(a).all():
                raise UploadError(f"{m}.{part} holds NaN or Inf")
            peak = float(np.abs(a).max(initial=0))
            if peak > bound:
                raise UploadError(f"{m}.{part} reaches |x| = {peak:.4g}, beyond the {bound:.4g} one round can reach "
                                  "from the round's start")
    return tensors

