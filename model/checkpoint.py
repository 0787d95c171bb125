"""The project's checkpoint directory.

    DIR/config.json              model config + {"format": "mujina/1"}
    DIR/model.safetensors        weights, keys as in Transformer.state_dict()
    DIR/optimizer.safetensors    optional: optimizer tensors keyed "{param}.{slot}"
    DIR/trainer_state.json       optional: step, data position, optimizer hyper-parameters
    DIR/tokenizer/               optional: tokenizer files, copied verbatim on export

Everything is safetensors or JSON: a checkpoint from another machine can be read without
executing anything it contains. Files are written to a temporary name and renamed, so a
crash mid-write never leaves a half-written file under the real name.

    >>> save_checkpoint(DIR, net)             # net.cfg is the config
    >>> net = load_checkpoint(DIR)            # -> Transformer, on CPU, in the stored dtype
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelConfig
from .transformer import Transformer

FORMAT = "mujina/1"
CONFIG, WEIGHTS, OPTIMIZER, TRAINER_STATE, TOKENIZER = (
    "config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json", "tokenizer",
)


def atomic_write(path: Path, write: Any) -> None:
    """Call write(tmp_path), fsync, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def save_checkpoint(
    directory: str | os.PathLike,
    model: Transformer,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict[str, Any] | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write `model` (and optionally optimizer/trainer state, tokenizer files) to `directory`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        state.pop("output.weight", None)  # safetensors refuses shared storage; restored on load
    atomic_write(d / WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    if optimizer is not None:
        tensors, groups = optimizer_state_to_flat(optimizer, model)
        atomic_write(d / OPTIMIZER, lambda p: save_file(tensors, str(p)))
        trainer_state = {**(trainer_state or {}), "optimizer_param_groups": groups}
    if trainer_state is not None:
        write_json(d / TRAINER_STATE, trainer_state)
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != (d / TOKENIZER).resolve():
        shutil.copytree(tokenizer_dir, d / TOKENIZER, dirs_exist_ok=True)
    # config.json last: its presence marks a complete checkpoint.
    write_json(d / CONFIG, {"format": FORMAT, **model.cfg.to_dict()})
    return d


def load_config(directory: str | os.PathLike) -> ModelConfig:
    path = Path(directory) / CONFIG
    if not path.exists():
        raise FileNotFoundError(
            f"{directory} is not a mujina checkpoint (no {CONFIG}); create one with "
            "`mujina-model init`, `mujina-train` or `mujina-model import`"
        )
    data = json.loads(path.read_text())
    fmt = data.pop("format", None)
    if fmt != FORMAT:
        raise ValueError(f"{path}: format {fmt!r} is not {FORMAT!r}; is this a Hugging Face directory? "
                         "Convert it with `mujina-model import --hf DIR --out CKPT`")
    return ModelConfig.from_dict(data)


def load_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS
    try:
        return load_file(str(path))
    except (SafetensorError, FileNotFoundError, OSError) as e:
        raise ValueError(f"cannot read weights {path}: {e}") from e


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Transformer:
    """Rebuild the Transformer stored in `directory`; weights keep their stored dtype unless `dtype`."""
    cfg = load_config(directory)
    state = load_state_dict(directory)
    with torch.device("meta"):
        model = Transformer(cfg)
    if cfg.tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{directory}: weights do not match config.json (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); was the checkpoint written by a different model version?"
        )
    for k, v in state.items():
        if tuple(v.shape) != expected[k]:
            raise ValueError(f"{directory}: {k} has shape {tuple(v.shape)}, config.json implies {expected[k]}")
    model.load_state_dict(state, assign=True)
    if cfg.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device=device, dtype=dtype)


def optimizer_state_to_flat(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Optimizer state as named tensors + JSON-able param groups (no pickle anywhere)."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    for p, slots in optimizer.state.items():
        for slot, value in slots.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{names[id(p)]}.{slot}"] = t.detach().contiguous().cpu()
    groups = [
        {k: v for k, v in g.items() if k != "params"} | {"params": [names[id(p)] for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    return tensors, groups


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, directory: str | os.PathLike
) -> None:
    """Restore what `save_checkpoint(..., optimizer=...)` wrote, matching parameters by name."""
    d = Path(directory)
    flat = load_file(str(d / OPTIMIZER))
    groups = json.loads((d / TRAINER_STATE).read_text())["optimizer_param_groups"]
    params = dict(model.named_parameters())
    for group, saved in zip(optimizer.param_groups, groups, strict=True):
        for k, v in saved.items():
            if k != "params":
                group[k] = tuple(v) if isinstance(v, list) else v
    for name, p in params.items():
        slots = {key[len(name) + 1:]: t for key, t in flat.items() if key.rsplit(".", 1)[0] == name}
        if slots:
            optimizer.state[p] = {k: t.to(p.device) if k != "step" else t for k, t in slots.items()}
