"""The project's checkpoint directory.

    DIR/config.json              model config + {"format": "mujina/1"}
    DIR/model.safetensors        weights, keys as in Transformer.state_dict()
    DIR/optimizer.safetensors    optional: optimizer tensors keyed "{param}.{slot}"
    DIR/trainer_state.json       optional: step, data position, optimizer hyper-parameters
    DIR/tokenizer/               optional: tokenizer files, copied verbatim on export

A checkpoint written by several processes (torchrun) is a torch.distributed.checkpoint (DCP)
directory instead of the two safetensors files: DIR/.metadata + DIR/__R_0.distcp, with the same
config.json and trainer_state.json beside them. DCP reshards on load, so it resumes on any number of
processes (one included); `convert_distributed` (`mujina-model convert --dcp`) turns one into the
safetensors form that `upcycle`, `export` and `load_checkpoint` read.

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
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` (and optionally optimizer/trainer state, tokenizer files) to `directory`.

    state_dict: the weights to write instead of model.state_dict(), e.g. gathered from FSDP shards."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
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


# ---- distributed checkpoints (torchrun) --------------------------------------------------------------

DCP_METADATA = ".metadata"


def is_distributed_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / DCP_METADATA).exists()


def save_distributed(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                     trainer_state: dict[str, Any], *, is_main: bool) -> None:
    """Every process writes its shards of model and optimizer (a collective); rank 0 adds the JSON files."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(d))
    if is_main:
        write_json(d / TRAINER_STATE, trainer_state)
        write_json(d / CONFIG, {"format": FORMAT, **model.cfg.to_dict()})


def load_distributed(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a DCP checkpoint into `model` and `optimizer`, whatever the number of processes that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    try:
        dcp.load(state, checkpoint_id=str(directory))
    except Exception as e:  # DCP raises CheckpointException listing every rank's error
        raise ValueError(f"cannot load the distributed checkpoint {directory}: {e}") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full_into_sharded(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a single-process (safetensors) checkpoint into an FSDP-sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    d = Path(directory)
    weights = load_state_dict(d)
    if model.cfg.tie_word_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    flat = load_file(str(d / OPTIMIZER))
    groups = json.loads((d / TRAINER_STATE).read_text())["optimizer_param_groups"]
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        name, slot = key.rsplit(".", 1)
        state.setdefault(name, {})[slot] = t
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()} for g in groups]
    set_state_dict(model, optimizer, model_state_dict=weights,
                   optim_state_dict={"state": state, "param_groups": groups},
                   options=StateDictOptions(full_state_dict=True))


def convert_distributed(directory: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Turn a DCP checkpoint (any number of writers) into the project's safetensors checkpoint."""
    import torch.distributed.checkpoint as dcp

    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} does not exist: give a checkpoint directory written under torchrun, "
                                "e.g. OUT/checkpoints/step_000100")
    if not is_distributed_checkpoint(d):
        hint = " (it is already a safetensors checkpoint)" if (d / WEIGHTS).exists() else ""
        raise ValueError(f"{d} is not a distributed checkpoint: {DCP_METADATA} is missing{hint}")
    cfg = load_config(d)
    model = Transformer(cfg)
    weights = model.state_dict()
    try:
        dcp.load({"model": weights}, checkpoint_id=str(d), no_dist=True)
    except Exception as e:
        raise ValueError(f"{d}: the distributed checkpoint does not match its config.json: {e}") from e
    model.load_state_dict(weights)
    tokenizer = d / TOKENIZER
    return save_checkpoint(out, model, tokenizer_dir=tokenizer if tokenizer.is_dir() else None)
