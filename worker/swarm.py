"""Swarm training: expert-sharded DiLoCo over hivemind.

A worker holds the shared *trunk* (embeddings, attention, norms, output head) and some experts of each
MoE layer. Every module group is averaged only among its holders, by its own hivemind
`DecentralizedAverager` with prefix `{run}/{module}`:

    trunk        every parameter outside the MoE blocks' experts and routers
    l{i}e{e}     expert e of layer i: its w1/w3/w2 slices and its router row

One round (DiLoCo, Douillard et al. 2023), per module m held:

    Δ_m       = θ_start_m − θ_local_m                 (after H inner AdamW steps, see executors/train.py)
    Δ̄_m       = Σ_p w_p Δ_m,p / Σ_p w_p             over the holders p; w_p = tokens module m processed on p
    mom_m     = μ · mom_m + Δ̄_m                       (outer Nesterov SGD, lr 0.7, μ 0.9 by default)
    θ_start_m = θ_start_m − lr · (Δ̄_m + μ · mom_m)    the next round's start, the same on every holder

Holders that start from the same θ and momentum and receive the same Δ̄ end the round with the same
parameters. hivemind returns each peer the *difference* between the average and its own Δ, compressed
(fp16 by default), so two holders' Δ̄ agree to the compression's rounding only, never bit for bit (not
even with compression "none": fp32 rounding); we do not paper over that with a second broadcast.

Overlap. Matchmaking runs while the inner steps do: after inner step 1 each worker starts every shared
module's hivemind step scheduled for when its inner steps should end (`SwarmAverager.begin`; hivemind's
`require_trigger`, as hivemind.Optimizer pre-schedules its own), so the group has usually formed when the
Δ is ready and `average` only starts the all-reduce. Finding a group used to cost ~0.8 s per round here,
after a Δ-norm exchange in the DHT of another ~0.25 s; both were on the critical path.

Agreement. hivemind 1.1.12 can finish an all-reduce with parts missing (a reducer that misses
`next_chunk_timeout`, a part that fails to deserialise): it logs "Averaging: received N% results", leaves
those parts at the local values, and `step()` reports success. Two checks keep such a Δ̄ out: (1) our
averager subclass reads how much of its result arrived (hivemind counts it but does not return it); (2)
after the all-reduce every member publishes a report per module in one DHT record (key
`{run}/check/{round}/{attempt}`, subkey = its peer id): its Δ norm, and `agreement_sketch` of its Δ̄ or
that its result was partial or failed; it reads the other members'. A reducer that dropped a slow sender
returns a complete but different average to the rest, which only (2) sees. A partial result or a sketch
outside the rounding bound makes the module's outcome "mismatch" on every member, which follows the
failure policy below with its local Δ, as a failed averaging does.

Bad updates. A Δ with NaN/Inf, or (with >= 3 reports) a norm above `outlier_factor` × the median of the
members' reported norms, is refused, and every member logs the peer id. A worker whose own Δ is
non-finite knows before the all-reduce: it sends zeros with weight 0, so the group's average stands. A
finite outlier is only seen in the reports, after its Δ went into the average: the other members then
average once more without it (attempt 1, fresh matchmaking), and its owner goes back to θ_start. This
keeps a faulty worker's Δ out; a malicious peer could lie about its norm, which only the coordinator's
validator (Δ norms are reported with each result) can catch.

Faults. `averaging_timeout` T is the most a peer dying mid-round delays the others, and the phases are
budgeted to fit in it: each all-reduce may take A = (T - matchmaking_time - stats_timeout) / 3
(`SwarmSettings.allreduce_timeout`; hivemind bans a sender that stalls for A / 3). A member that dies
after its group formed (the price of matchmaking early) stalls the others' all-reduce for at most A,
leaves their results partial and sends no report; they wait for the reports at most A + stats_timeout
(a living member's all-reduce ends within A of ours, plus slack for the DHT), then average once more
without it (matchmaking_time, then at most A): A + (A + stats_timeout) + (matchmaking_time + A) = T.
A shorter wait for the reports would not be safe: a live but slow member would decide on its own, and
holders would diverge. A group that has not formed A after its scheduled time (a holder died before it
formed, or is that late) fails; so does a holder that triggers its all-reduce more than A / 3 after the
others (they ban it as a sender): timeouts trade the delay a dead peer can cause against how late a live
one may be. A holder later still (past A / 3 + stats_timeout) is taken for dead: the others average again
without it while it keeps its θ_start, and that module differs on it from then on (nothing resyncs it
yet; before this budget the same happened past T / 3 + stats_timeout). The coordinator's plan should keep
holders' rounds about equally long. A group that does not form (or whose result does
not agree, above) follows `failure_policy`: "retry" keeps the module's reference θ_start and momentum,
identical on every holder, and its local progress, so the next round's Δ carries both rounds of work;
"local" applies the outer step with the local Δ alone (holders then differ until their next agreed
average). Either way a warning names the module.

The local model holds only the experts assigned to this worker (`local_model`): a MoE with k experts
whose router rows are the held rows of the full router. Softmax over the held logits equals softmax over
all logits with the others masked to -inf, so this is exactly the full model with `active_experts`
set to the held experts, at a fraction of the memory.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import signal
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from model.checkpoint import atomic_write
from model.config import MoEConfig
from model.transformer import Transformer

log = logging.getLogger(__name__)

# hivemind (imported lazily below) shares its futures' state through torch shared memory, by default with
# torch's "file_system" strategy: a torch_shm_manager process per process, started on first use. A worker
# daemon's main thread once hung inside that start (in C, so its SIGTERM handler never ran: the demo had to
# SIGKILL it; faulthandler's stacks showed torch.storage._share_filename_cpu_ under hivemind.DHT()). Every
# hivemind process here is fork()ed, which "file_descriptor" sharing handles without a manager process.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
T = TypeVar("T")
P = TypeVar("P")

TRUNK = "trunk"
OUTER_STATE = "outer_momentum.safetensors"   # next to model.safetensors in a swarm round checkpoint
Assignment = dict[int, list[int]]            # layer -> global expert indices held (sorted, same count per layer)


@dataclass
class SwarmSettings:
    """Per-run swarm settings; the coordinator's `swarm` section of project.yaml carries the same fields."""

    run: str
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    compression: str = "fp16"          # fp16 | 8bit | none
    averaging: bool = True             # False: every module takes the outer step with its local Δ alone
    matchmaking_time: float = 2.0      # seconds a group leader waits for peers
    request_timeout: float = 1.0       # must stay below matchmaking_time (hivemind)
    averaging_timeout: float = 30.0    # the most a dead peer delays the others (see "Faults")
    stats_timeout: float = 3.0         # slack for the members' reports, past the all-reduce timeout
    failure_policy: str = "retry"      # retry | local
    outlier_factor: float = 10.0       # refuse a Δ whose norm exceeds this × the group's median
    target_group_size: int = 64

    def __post_init__(self) -> None:
        if "." in self.run or "/" in self.run or not self.run:
            raise ValueError(f"swarm run name {self.run!r} must be non-empty without '.' or '/'")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"swarm compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        if self.failure_policy not in ("retry", "local"):
            raise ValueError(f"swarm failure_policy must be retry or local, got {self.failure_policy!r}")
        if not (self.outer_lr > 0 and 0 <= self.outer_momentum < 1):
            raise ValueError("swarm outer_lr must be > 0 and outer_momentum in [0, 1)")
        if self.request_timeout >= self.matchmaking_time:
            raise ValueError(f"swarm request_timeout ({self.request_timeout}) must be below matchmaking_time "
                             f"({self.matchmaking_time}), or hivemind's matchmaking can deadlock")
        if self.outlier_factor <= 1:
            raise ValueError("swarm outlier_factor must be > 1")
        if self.chunk_timeout < self.request_timeout:
            least = self.matchmaking_time + self.stats_timeout + 9 * self.request_timeout
            raise ValueError(
                f"swarm averaging_timeout ({self.averaging_timeout}) is too short for matchmaking_time "
                f"({self.matchmaking_time}) and stats_timeout ({self.stats_timeout}): a dead peer's delay (its "
                f"all-reduce's timeouts, the wait for reports, a second matchmaking) must fit in it with at least "
                f"request_timeout ({self.request_timeout}) per all-reduce chunk; use averaging_timeout >= {least:g}")

    @property
    def allreduce_timeout(self) -> float:
        """A: the most one all-reduce may take, a third of T - matchmaking_time - stats_timeout (see "Faults")."""
        return (self.averaging_timeout - self.matchmaking_time - self.stats_timeout) / 3

    @property
    def chunk_timeout(self) -> float:
        """hivemind's next_chunk_timeout: a sender that stalls this long is banned from the all-reduce."""
        return self.allreduce_timeout / 3


def _compressions():
    from hivemind.compression import Float16Compression, NoCompression

    return {"fp16": Float16Compression, "8bit": _uniform_8bit(), "none": NoCompression}


@cache
def _uniform_8bit():
    """hivemind 1.1.12's Uniform8BitQuantization, with a decoder that works under numpy 2: the original reads
    the codebook length with int() of a 1-element array, which numpy 2 refuses, so every 8-bit part a peer
    received was lost (and the average silently partial). Registered as hivemind's decoder for UNIFORM_8BIT,
    which is what a receiving peer looks up by the message's compression type."""
    import numpy as np
    import torch
    from hivemind.compression import serialization
    from hivemind.compression.quantization import Uniform8BitQuantization

    class Uniform8Bit(Uniform8BitQuantization):
        def extract(self, serialized_tensor):
            buf = serialized_tensor.buffer
            n = int(np.frombuffer(buf, count=1, dtype=np.int64)[0])
            codebook = np.frombuffer(buf, offset=8, count=n, dtype=self.codebook_dtype)
            quantized = np.frombuffer(buf, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
            indices = torch.from_numpy(quantized.astype(np.int64)).reshape(tuple(serialized_tensor.size))
            values = torch.from_numpy(codebook.copy()).to(dtype=getattr(torch, serialized_tensor.dtype))
            return values[indices].requires_grad_(serialized_tensor.requires_grad)

    serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = Uniform8Bit()
    return Uniform8Bit


COMPRESSIONS = ("fp16", "8bit", "none")
POLL_S = 0.02  # how often a peer looks in the DHT for the other members' reports
NO_TIMINGS = {"allreduce": 0.0, "reports": 0.0}   # SwarmAverager.timings before any wait
READY_TIMEOUT_S = 120.0  # an averager process starts in ~1 s; 120 s covers a heavily loaded machine
STOP_POLL_S = 0.25  # how often a round waiting for its all-reduce looks for a stop request


# ---- module groups -------------------------------------------------------------------------------

def expert_module(layer: int, expert: int) -> str:
    return f"l{layer}e{expert}"


def check_assignment(cfg_moe: MoEConfig | None, num_layers: int, assignment: Assignment) -> Assignment:
    """Validate and normalise an assignment: every layer, the same number >= top_k of distinct experts."""
    if cfg_moe is None:
        raise ValueError("swarm training needs a MoE checkpoint: upcycle the dense model first "
                         "(mujina-model upcycle)")
    assignment = {int(k): sorted(int(e) for e in v) for k, v in assignment.items()}
    if sorted(assignment) != list(range(num_layers)):
        raise ValueError(f"the expert assignment must name every layer 0..{num_layers - 1}, got {sorted(assignment)}")
    counts = {len(v) for v in assignment.values()}
    if len(counts) != 1:
        raise ValueError(f"hold the same number of experts in every layer, got {counts}")
    k = counts.pop()
    for layer, experts in assignment.items():
        if len(set(experts)) != len(experts) or not all(0 <= e < cfg_moe.num_experts for e in experts):
            raise ValueError(f"layer {layer}: experts {experts} must be distinct and in 0..{cfg_moe.num_experts - 1}")
    if k < cfg_moe.top_k:
        raise ValueError(f"hold at least top_k={cfg_moe.top_k} experts per layer (got {k})")
    return assignment


def full_assignment(model: Transformer) -> Assignment:
    return {i: list(range(model.cfg.moe.num_experts)) for i in range(model.cfg.num_layers)}


def is_expert_param(name: str) -> bool:
    return name.endswith(("feed_forward.w1_EFD", "feed_forward.w3_EFD", "feed_forward.w2_EDF",
                          "feed_forward.router.weight"))


def trunk_names(model: Transformer) -> list[str]:
    return [n for n, _ in model.named_parameters() if not is_expert_param(n)]


def module_tensors(model: Transformer, module: str, index: dict[str, int] | None = None) -> list[Tensor]:
    """Views of `module`'s parameters in `model`.

    For an expert module "l{i}e{e}", `index` maps it to the expert's position in the model's stacked
    tensors (the local model's position, which differs from e when the model holds a subset).
    """
    params = dict(model.named_parameters())
    if module == TRUNK:
        return [params[n].data for n in trunk_names(model)]
    layer, expert = (int(x) for x in module[1:].split("e"))
    j = expert if index is None else index[module]
    ff = model.layers[layer].feed_forward
    return [ff.w1_EFD.data[j], ff.w3_EFD.data[j], ff.w2_EDF.data[j], ff.router.weight.data[j]]


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1).float() for t in tensors])


def unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Copy a flat vector back into `tensors` (views of the model's parameters)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n
    assert offset == flat.numel(), "flat vector does not match the module's size"


# ---- the local model: trunk + held experts -------------------------------------------------------

@torch.no_grad()
def local_model(full: Transformer, assignment: Assignment) -> Transformer:
    """A MoE holding only the assigned experts (k per layer) with their router rows; trunk copied."""
    assignment = check_assignment(full.cfg.moe, full.cfg.num_layers, assignment)
    with torch.device("meta"):
        local = Transformer(_local_config(full.cfg, assignment))
    local.to_empty(device=next(full.parameters()).device)
    local = local.to(next(full.parameters()).dtype)
    src = dict(full.named_parameters())
    for name, p in local.named_parameters():
        if not is_expert_param(name):
            p.copy_(src[name])
    for i, experts in assignment.items():
        sf, df = full.layers[i].feed_forward, local.layers[i].feed_forward
        idx = torch.tensor(experts, device=sf.w1_EFD.device)
        for dst, s in _expert_tensors(df, sf):
            dst.copy_(s[idx])
    return local


def _expert_tensors(dst_ff, src_ff) -> list[tuple[Tensor, Tensor]]:
    """(destination, source) pairs of the per-expert tensors of two MoE feed-forwards: w1, w3, w2 and the
    router's rows, each indexed by expert along dim 0."""
    return [(dst_ff.w1_EFD, src_ff.w1_EFD), (dst_ff.w3_EFD, src_ff.w3_EFD), (dst_ff.w2_EDF, src_ff.w2_EDF),
            (dst_ff.router.weight, src_ff.router.weight)]


def _local_config(full_cfg, assignment: Assignment):
    k = len(assignment[0])
    return dataclasses.replace(full_cfg, moe=dataclasses.replace(full_cfg.moe, num_experts=k))


@torch.no_grad()
def local_model_from_checkpoint(directory: str | Path, assignment: Assignment) -> Transformer:
    """`local_model` straight from a checkpoint directory, reading only the trunk and the held experts'
    slices (safetensors slicing), so a worker never holds the full MoE in memory. Weights in fp32."""
    from safetensors import safe_open

    from model.checkpoint import WEIGHTS, load_config

    full_cfg = load_config(directory)
    assignment = check_assignment(full_cfg.moe, full_cfg.num_layers, assignment)
    with torch.device("meta"):
        local = Transformer(_local_config(full_cfg, assignment))
    local.to_empty(device="cpu")
    with safe_open(str(Path(directory) / WEIGHTS), framework="pt") as f:
        for name, p in local.named_parameters():
            if not is_expert_param(name):
                key = "tok_embeddings.weight" if name == "output.weight" and full_cfg.tie_word_embeddings else name
                p.copy_(f.get_tensor(key))
                continue
            layer = int(name.split(".")[1])
            sl = f.get_slice(name)
            for j, e in enumerate(assignment[layer]):
                p[j].copy_(sl[e:e + 1][0])
    if full_cfg.tie_word_embeddings:
        local.output.weight = local.tok_embeddings.weight
    return local


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
            layer, e = (int(x) for x in m[1:].split("e"))
            pre = f"layers.{layer}.feed_forward."
            out[m] = torch.cat([f.get_slice(pre + n)[e:e + 1][0].reshape(-1).float()
                                for n in ("w1_EFD", "w3_EFD", "w2_EDF", "router.weight")])
    return out


def read_round(directory: str | Path) -> int:
    """The round a swarm checkpoint starts (0 for a plain checkpoint, e.g. freshly upcycled)."""
    from safetensors import safe_open

    path = Path(directory) / OUTER_STATE
    if not path.exists():
        return 0
    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata().get("round", "0"))


@torch.no_grad()
def merge_into(full: Transformer, local: Transformer, assignment: Assignment) -> None:
    """Write the local model's trunk and held experts back into the full model."""
    src = dict(local.named_parameters())
    for name, p in full.named_parameters():
        if not is_expert_param(name):
            p.copy_(src[name])
    for i, experts in assignment.items():
        sf, df = local.layers[i].feed_forward, full.layers[i].feed_forward
        for j, e in enumerate(experts):
            for dst, s in _expert_tensors(df, sf):
                dst[e].copy_(s[j])


def held_modules(assignment: Assignment) -> list[str]:
    return [TRUNK] + [expert_module(i, e) for i, experts in sorted(assignment.items()) for e in experts]


def local_index(assignment: Assignment) -> dict[str, int]:
    return {expert_module(i, e): j for i, experts in assignment.items() for j, e in enumerate(experts)}


def tokens_per_module(tokens: int, tokens_per_expert_LE: Tensor, assignment: Assignment) -> dict[str, float]:
    """Averaging weights: the trunk saw every token; expert modules the token slots routed to them."""
    out = {TRUNK: float(tokens)}
    for i, experts in assignment.items():
        for j, e in enumerate(experts):
            out[expert_module(i, e)] = float(tokens_per_expert_LE[i, j])
    return out


# ---- outer state: momentum, saved with a round checkpoint ---------------------------------------

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
    from safetensors import safe_open

    path = Path(directory) / OUTER_STATE
    if not path.exists():
        return {}, 0
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, int(f.metadata().get("round", "0"))


def momentum_views(momentum_full: dict[str, Tensor], template: Transformer, module: str) -> list[Tensor]:
    """Views of one module's momentum inside full-layout momentum tensors (same naming as parameters)."""
    if module == TRUNK:
        return [momentum_full[n] for n in trunk_names(template)]
    layer, expert = (int(x) for x in module[1:].split("e"))
    pre = f"layers.{layer}.feed_forward."
    return [momentum_full[pre + "w1_EFD"][expert], momentum_full[pre + "w3_EFD"][expert],
            momentum_full[pre + "w2_EDF"][expert], momentum_full[pre + "router.weight"][expert]]


def momentum_into(momentum_full: dict[str, Tensor], full: Transformer, momentum: dict[str, Tensor]) -> None:
    """Write flat per-module momentum into full-layout tensors (created as zeros when missing)."""
    if not momentum_full:
        momentum_full.update({n: torch.zeros_like(p, dtype=torch.float32) for n, p in full.named_parameters()})
    for m, flat in momentum.items():
        unflatten_into(flat, momentum_views(momentum_full, full, m))


# ---- averaging -----------------------------------------------------------------------------------

@dataclass
class ModuleOutcome:
    module: str
    outcome: str                 # ok | failed | refused | mismatch (partial or disagreeing Δ̄) | local (averaging
                                 # off or sole holder)
    delta_norm: float
    group_size: int = 1
    bytes_sent: int = 0
    refused_peers: list[str] = field(default_factory=list)


@dataclass
class RoundReport:
    round: int
    modules: list[ModuleOutcome]
    seconds: float
    # of `seconds`: waiting for the all-reduces (the group's slowest member, then the transfer) and for the
    # members' reports in the DHT, both attempts together
    allreduce_seconds: float = 0.0
    reports_seconds: float = 0.0

    @property
    def bytes_sent(self) -> int:
        return sum(m.bytes_sent for m in self.modules)

    def count(self, outcome: str) -> int:
        return sum(m.outcome == outcome for m in self.modules)


def is_outlier(norms: dict[str, float], factor: float) -> set[str]:
    """Peers whose Δ is non-finite, or (with >= 3 finite reports) above factor × the median norm."""
    bad = {p for p, n in norms.items() if not math.isfinite(n)}
    finite = [n for p, n in norms.items() if p not in bad]
    if len(finite) >= 3:
        med = statistics.median(finite)
        bad |= {p for p, n in norms.items() if p not in bad and n > factor * max(med, 1e-12)}
    return bad


# ---- agreement of the holders' averages ---------------------------------------------------------

SKETCH_CHUNK = 1 << 16       # elements per chunk; every chunk is projected on the same sign vectors
SKETCH_PROJECTIONS = 4       # ±1 projections per block: a missing part escapes all four with tiny probability
SKETCH_MAX_BLOCKS = 32       # a module's sketch is at most 32 blocks × (4 projections + 1 bound) floats
SKETCH_SIGMAS = 10.0         # tolerance in units of the rounding bound's norm (sub-Gaussian tail: e^-50)
FP32_EPS = 2.0 ** -23


@lru_cache(maxsize=1)
def _signs() -> Tensor:
    """(SKETCH_PROJECTIONS, SKETCH_CHUNK) fp64 of ±1 from murmur3's integer finaliser: plain int64
    arithmetic, so every holder builds the same signs whatever its torch version or platform."""
    h = torch.arange(SKETCH_PROJECTIONS * SKETCH_CHUNK, dtype=torch.int64)
    mask = 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & mask
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & mask
    h = h ^ (h >> 16)
    return ((h & 1) * 2 - 1).double().view(SKETCH_PROJECTIONS, SKETCH_CHUNK)


def _rounding_bound(x: Tensor, compression: str) -> Tensor:
    """Per element, a bound on |x − decompress(compress(x))| for hivemind's compressions: fp16 rounds to
    11 significant bits (2^-25 in the subnormal range); Uniform8BitQuantization maps mean ± 3σ onto 256
    buckets (each decoded as its members' mean, so off by at most a bucket, 6σ/256) and clamps the rest
    into the edge buckets. For 8-bit this is an estimate: hivemind takes σ per part, we per chunk."""
    if compression == "none":
        return torch.zeros_like(x)
    if compression == "fp16":
        return x.abs() * 2.0 ** -11 + 2.0 ** -25
    mean, std = x.mean(), x.std() if x.numel() > 1 else x.new_zeros(())
    return 6 * std / 256 + ((x - mean).abs() - 3 * std).clamp_min(0)


@torch.no_grad()
def agreement_sketch(averaged: Tensor, local: Tensor, compression: str) -> dict[str, list[float]]:
    """A few numbers that tell whether two holders' averaged Δ̄ differ by more than rounding.

    hivemind gives each holder p the result r_p = Δ_p + C(avg − C(Δ_p)) (C: the compression), so the
    holders of one module differ by at most b_p + b_q element-wise, with b_p = the rounding of C(Δ_p) and of
    the returned difference d_p = r_p − Δ_p, plus fp32 rounding. Per block of the flat vector the sketch
    holds `proj`, the projections Σ g_i r_i on fixed pseudo-random signs g, and `tol`, ‖b‖₂. For signs
    independent of the data, Σ g_i (r_p − r_q)_i is sub-Gaussian with scale ≤ ‖b_p‖ + ‖b_q‖, so
    `sketches_agree` tolerates SKETCH_SIGMAS × (tol_p + tol_q). A part left at the local values moves the
    projections by about ‖d_part‖₂: detected once it exceeds the tolerance, for fp16 a part carrying more
    than ~1e-4 of its block's squared norm. Cost: one pass over the module in chunks of 64 Ki elements.
    """
    n = averaged.numel()
    chunks = max(1, math.ceil(n / SKETCH_CHUNK))
    blocks = min(SKETCH_MAX_BLOCKS, chunks)
    proj = torch.zeros(blocks, SKETCH_PROJECTIONS, dtype=torch.float64)
    tol2 = torch.zeros(blocks, dtype=torch.float64)
    signs = _signs()
    for c in range(chunks):
        lo, hi = c * SKETCH_CHUNK, min(n, (c + 1) * SKETCH_CHUNK)
        r, x = averaged[lo:hi].float().cpu(), local[lo:hi].float().cpu()
        d = r - x
        k = c * blocks // chunks
        proj[k] += signs[:, :hi - lo] @ r.double()
        b = _rounding_bound(x, compression) + _rounding_bound(d, compression) + 2 * FP32_EPS * (d.abs() + r.abs())
        tol2[k] += b.double().square().sum()
    return {"proj": proj.flatten().tolist(), "tol": tol2.sqrt().tolist()}


def sketches_agree(a: dict, b: dict) -> bool:
    """Whether two `agreement_sketch`es are within rounding of each other (False for malformed ones, NaN)."""
    try:
        pa, pb, ta, tb = (list(map(float, v)) for v in (a["proj"], b["proj"], a["tol"], b["tol"]))
    except (KeyError, TypeError, ValueError):
        return False
    if len(pa) != len(pb) or len(ta) != len(tb) or len(pa) != SKETCH_PROJECTIONS * len(ta):
        return False
    return all(abs(x - y) <= SKETCH_SIGMAS * (ta[i // SKETCH_PROJECTIONS] + tb[i // SKETCH_PROJECTIONS])
               for i, (x, y) in enumerate(zip(pa, pb, strict=True)))


def _report_mismatch(mine: dict, theirs: dict) -> str:
    """Why another member's report (a sketch, or partial / failed) disagrees with this peer's sketch; '' if not."""
    if "partial" in theirs:
        return f"received {100 * float(theirs['partial']):.1f}% of the average"
    if "failed" in theirs:
        return "its averaging failed"
    return "" if sketches_agree(mine, theirs) else "checksum differs"


def _norm(report: dict) -> float:
    """The Δ norm in another member's report; a malformed one counts as non-finite (refused)."""
    try:
        return float(report["norm"])
    except (KeyError, TypeError, ValueError):
        return math.inf


@dataclass
class _Attempt:
    """This peer's side of one all-reduce of a module: the group (empty if none formed) and its report."""

    members: set[str]
    report: dict            # norm, zeroed (sent as zeros with weight 0), and sketch keys | partial | failed
    bytes_sent: int = 0


@lru_cache(maxsize=1)
def _checked_averager_class():
    """hivemind's DecentralizedAverager whose `step()` result is (gathered, received): received is the
    fraction of this peer's averaged parts that arrived. hivemind counts the parts that did not
    (`TensorPartContainer.failed_size`, the "received N% results" warning) but does not return it."""
    import hivemind

    # Named as hivemind's class: hivemind names its RPC handlers after the class ("DecentralizedAverager.
    # rpc_join_group"), so another name could not average with peers that run hivemind's own class.
    class DecentralizedAverager(hivemind.averaging.DecentralizedAverager):
        def __init__(self, *args, **kwargs):
            self._received: dict[bytes, float] = {}   # group id -> fraction; lives in the averager's process
            super().__init__(*args, **kwargs)

        async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
            gid = group_info.group_id if group_id is None else group_id
            running = self._running_groups[gid]       # resolves to the AllReduceRunner that super() builds
            await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)
            parts = running.result().tensor_part_container
            self._received[gid] = 1.0 - parts.failed_size / max(parts.total_size, 1)

        async def _aggregate_with_group(self, group_info, min_vector_size, **kwargs):
            gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
            return gathered, self._received.pop(group_info.group_id, 0.0)

    return DecentralizedAverager


@contextmanager
def fork_safely() -> Iterator[None]:
    """Around the start of hivemind's DHT and averagers, which are fork()ed child processes.

    A forked child runs the garbage collector on its copy of the parent's objects; freeing some of them
    there (gRPC's channels and calls, held by the worker daemon and by test processes) is not safe after
    fork and crashed a DHT child with SIGSEGV in a full test run, leaving its parent waiting. So: collect
    the parent's garbage first, then freeze every object, so the child's collector never touches them
    (the recipe of the `gc.freeze` documentation); the parent unfreezes once its children exist."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# a child killed by one of these was asked to stop; any other signal is a crash
STOP_SIGNALS = {int(signal.SIGTERM), int(signal.SIGINT), int(signal.SIGKILL), int(signal.SIGHUP)}


class ChildDied(RuntimeError):
    """A hivemind process (DHT or averager) died; what the parent waited for from it will never come."""

    def __init__(self, what: str, exitcode: int | None):
        super().__init__(f"{what}: its hivemind process died (exit code {exitcode})")
        self.exitcode = exitcode

    @property
    def crashed(self) -> bool:
        """Killed by a fault (SIGSEGV, SIGBUS, SIGABRT, ...), not asked to stop (SIGTERM, SIGINT, SIGKILL)."""
        return self.exitcode is not None and self.exitcode < 0 and -self.exitcode not in STOP_SIGNALS


def child_result(wait: Callable[[float], T], process, what: str, timeout: float | None = None) -> T:
    """`wait(t)` (an MPFuture's result, a wait_until_ready) answered by hivemind's child `process`.

    hivemind's futures are resolved by the child through a pipe: when the child dies, they wait forever
    (its wait_until_ready and DHT calls have no deadline of their own). Poll instead, and raise ChildDied
    when the child is gone, TimeoutError after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return wait(1.0)
        except TimeoutError:
            if not process.is_alive():
                raise ChildDied(what, process.exitcode) from None
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{what}: no answer from its hivemind process within {timeout:.0f} s") from None


def start_children(makers: dict[str, Callable[[], P]], what: Callable[[str], str], attempts: int = 3) -> dict[str, P]:
    """Start hivemind processes (`makers[name]()` builds one unstarted) and wait until all are ready.

    All are fork()ed under one fork_safely (its full garbage collection is the slow part) and start in
    parallel. A child that crashes while starting (killed by a fault inherited from the parent's state,
    see fork_safely) is replaced, up to `attempts` times; one that was stopped (SIGTERM to the process
    group) or reported an error of its own is not. On failure, every child started here is stopped."""
    ready: dict[str, P] = {}
    pending = dict(makers)
    try:
        for attempt in range(1, attempts + 1):
            started = {name: make() for name, make in pending.items()}
            with fork_safely():
                for child in started.values():
                    child.start()
            ready.update(started)
            pending = {}
            for name, child in started.items():
                try:
                    child_result(child.wait_until_ready, child, what(name), READY_TIMEOUT_S)
                except ChildDied as e:
                    if not e.crashed or attempt == attempts:
                        raise
                    log.warning("%s (attempt %d of %d); starting it again", e, attempt, attempts)
                    pending[name] = makers[name]
            if not pending:
                return ready
        raise AssertionError("unreachable")
    except BaseException:
        for child in ready.values():
            if child.is_alive():
                child.shutdown()
        raise


def start_dht(**kwargs):
    """hivemind.DHT(**kwargs), started and ready; see start_children."""
    import hivemind

    return start_children({"dht": lambda: hivemind.DHT(start=False, **kwargs)}, lambda _: "the DHT")["dht"]


class SwarmAverager:
    """One worker's membership of the swarm: a DHT node and one `DecentralizedAverager` per held module.

    `modules` maps module name -> number of floats; `expected_holders` (module -> count, from the
    coordinator's assignment) sizes each module's group, so that it forms as soon as every holder joined.
    """

    def __init__(self, settings: SwarmSettings, modules: dict[str, int], *, initial_peers: Sequence[str] = (),
                 dht=None, client_mode: bool = False, host: str = "127.0.0.1",
                 expected_holders: dict[str, int] | None = None):
        self.settings = settings
        self.expected_holders = expected_holders or {}
        # a module's group is its holders, whatever their number: hivemind's advice to make target_group_size
        # a power of 2 (one warning per module and round) does not apply
        logging.getLogger("hivemind.averaging.key_manager").setLevel(logging.ERROR)
        self._own_dht = dht is None
        self.averagers = {}
        self._pending: tuple[int, dict] | None = None   # (round, module -> hivemind StepControl) from begin()
        self.timings = dict(NO_TIMINGS)   # seconds waited in the last average(), by phase
        self._last_scheduled = 0.0
        # Polled while average() waits for an all-reduce (every STOP_POLL_S): a stop request raises there, and
        # the round stops at once instead of after the all-reduce's timeout (SIGTERM, the coordinator's CANCEL).
        self.check_stop: Callable[[], None] | None = None
        if dht is None:
            dht = start_dht(initial_peers=list(initial_peers), client_mode=client_mode,
                            host_maddrs=[f"/ip4/{host}/tcp/0"])
        self.dht = dht
        try:
            asked = dht.run_coroutine(type(dht)._get_peer_id, return_future=True)  # dht.peer_id waits forever
            self.peer_id = str(child_result(asked.result, dht, "the DHT's peer id", READY_TIMEOUT_S))
            self.compression = _compressions()[settings.compression]()
            if settings.averaging:
                averager_class, s = _checked_averager_class(), settings
                # Not start=True: hivemind's run_in_background sets SIGINT to SIG_IGN in *this* process (the
                # daemon's handler would be lost) and raises outside the main thread, where the daemon runs
                # executors.
                self.averagers = start_children({name: lambda name=name, size=size: averager_class(
                    [torch.zeros(size)], self.dht, prefix=f"{s.run}/{name}", start=False,
                    # a group starts as soon as every expected holder joined, else after matchmaking_time
                    target_group_size=min(s.target_group_size, self.expected_holders.get(name, s.target_group_size)),
                    min_group_size=2,
                    min_matchmaking_time=s.matchmaking_time, request_timeout=s.request_timeout,
                    allreduce_timeout=s.allreduce_timeout, next_chunk_timeout=s.chunk_timeout,
                    compression=self.compression, client_mode=client_mode) for name, size in modules.items()},
                    lambda name: f"the averager of module {name}")
        except BaseException:
            self.shutdown()  # what started must not outlive a failed construction
            raise

    def visible_maddrs(self) -> list[str]:
        return [str(a) for a in self.dht.get_visible_maddrs()]

    def shutdown(self) -> None:
        for a in self.averagers.values():
            a.shutdown()
        if self._own_dht:
            self.dht.shutdown()

    # -- one round --

    def begin(self, round_: int, ready_in: float) -> None:
        """Look for every shared module's group now, while the inner steps run; this peer expects to be ready
        to average in about `ready_in` seconds. `average` then only starts the all-reduce (hivemind's scheduled
        step with a trigger, as hivemind.Optimizer pre-schedules its own)."""
        self.cancel()
        if self.averagers:
            self._pending = (round_, self._start_steps(round_, 0, self._shared(self.averagers), ready_in))

    def cancel(self) -> None:
        """Leave the groups `begin` looked for (a round stopped or failed before averaging)."""
        _, controls = self._pending or (None, {})
        self._pending = None
        for control in controls.values():
            control.cancel()

    def _shared(self, modules: Iterable[str]) -> list[str]:
        return [m for m in modules if self.expected_holders.get(m, 2) > 1]

    def _start_steps(self, round_: int, attempt: int, modules: Iterable[str], ready_in: float) -> dict:
        from hivemind.utils import get_dht_time

        s, now = self.settings, get_dht_time()
        # hivemind declares the averager in the DHT until the scheduled time, and the DHT keeps an entry's
        # latest expiration: a declaration that expires before the previous one would be dropped
        scheduled = max(now + max(ready_in, s.matchmaking_time), self._last_scheduled + 1e-3)
        self._last_scheduled = scheduled
        return {m: self.averagers[m].step(weight=1.0, gather={"round": round_, "attempt": attempt},
                                          scheduled_time=scheduled, timeout=scheduled - now + s.allreduce_timeout,
                                          allow_retries=True, require_trigger=True, wait=False)
                for m in modules}

    def average(self, round_: int, deltas: dict[str, Tensor], weights: dict[str, float]) -> dict[str, ModuleOutcome]:
        """Average each module's Δ among its holders, weighted; returns outcome per module and writes the
        averaged Δ into `deltas` in place (left untouched where averaging did not happen)."""
        s = self.settings
        self.timings = dict(NO_TIMINGS)
        norms = {m: float(d.norm()) for m, d in deltas.items()}
        out = {m: ModuleOutcome(m, "local", norms[m]) for m in deltas}
        pending_round, controls = self._pending or (None, {})
        self._pending = None
        shared = self._shared(deltas) if s.averaging else []
        if pending_round != round_ or set(controls) != set(shared):
            for control in controls.values():
                control.cancel()
            controls = self._start_steps(round_, 0, shared, 0.0) if shared else {}
        if not controls:
            return out
        if not self.dht.is_alive():  # every step below would wait for it
            for control in controls.values():
                control.cancel()
            raise ChildDied(f"round {round_}: the DHT", self.dht.exitcode)

        first = self._all_reduce(round_, 0, controls, deltas, weights, norms)
        seen = self._reports(round_, 0, first)
        redo: dict[str, set[str]] = {}
        for m, got in first.items():
            if not got.members:
                out[m] = ModuleOutcome(m, "failed", norms[m])
                continue
            reported = {self.peer_id: got.report["norm"]} | {p: _norm(v) for p, v in seen[m].items()}
            refused = is_outlier(reported, s.outlier_factor)
            finite = [v for v in reported.values() if math.isfinite(v)]
            for p in sorted(refused):
                log.warning("round %d, module %s: refusing the Δ of peer %s (norm %s, group median %s)", round_, m, p,
                            reported[p], statistics.median(finite or [0.0]))
            out[m] = ModuleOutcome(m, "ok", norms[m], group_size=len(got.members), bytes_sent=got.bytes_sent,
                                   refused_peers=sorted(refused))
            if self.peer_id in refused:
                out[m].outcome = "refused"
                continue
            silent = got.members - {self.peer_id} - seen[m].keys()
            # a refused peer that sent its Δ (a finite norm far above the median: only the group can tell)
            spoiled = {p for p in refused if not seen[m].get(p, {}).get("zeroed")}
            if silent or spoiled:
                # the group averaged with a Δ it refuses, or a member died or stalled after the group formed
                # (matchmaking ran during the inner steps): average once more without them
                log.warning("round %d, module %s: averaging again without %s", round_, m,
                            ", ".join([f"silent peer {p}" for p in sorted(silent)] +
                                      [f"refused peer {p}" for p in sorted(spoiled)]))
                redo[m] = got.members - silent - refused
                out[m].outcome = "failed"
                continue
            self._judge(round_, m, got, seen[m], refused, out[m])

        again = {m: r for m, r in redo.items() if len(r) >= 2}
        for m in redo.keys() - again.keys():
            log.warning("round %d, module %s: no other holder left to average with; policy %s", round_, m,
                        s.failure_policy)
        if again:
            second = self._all_reduce(round_, 1, self._start_steps(round_, 1, again, 0.0), deltas, weights, norms)
            seen2 = self._reports(round_, 1, second)
            for m, got in second.items():
                out[m].bytes_sent += got.bytes_sent
                if got.members and got.members != again[m]:
                    log.warning("round %d, module %s: the second group %s is not the holders left %s; policy %s",
                                round_, m, sorted(got.members), sorted(again[m]), s.failure_policy)
                elif got.members:
                    out[m].outcome, out[m].group_size = "ok", len(got.members)
                    self._judge(round_, m, got, seen2[m], set(), out[m])
        for m, o in out.items():
            if o.outcome == "ok":
                with self.averagers[m].get_tensors() as (t,):
                    deltas[m].copy_(t)
        return out

    def _all_reduce(self, round_: int, attempt: int, controls: dict, deltas: dict[str, Tensor],
                    weights: dict[str, float], norms: dict[str, float]) -> dict[str, _Attempt]:
        """Put each module's Δ in its averager, start the all-reduce of its (scheduled) step, wait for it.

        A non-finite Δ goes in as zeros with weight 0: the group averages without it whatever its members
        saw, and its owner refuses it (outcome "refused")."""
        from hivemind.utils import get_dht_time

        s = self.settings
        finite = {m: math.isfinite(norms[m]) for m in controls}
        sent = {m: deltas[m] if finite[m] else torch.zeros_like(deltas[m]) for m in controls}
        for m, control in controls.items():
            with self.averagers[m].get_tensors() as (t,):
                t.copy_(sent[m])
            control.weight = max(weights[m], 1e-6) if finite[m] else 0.0
            control.allow_allreduce()
        got, t0 = {}, time.perf_counter()
        for m, control in controls.items():
            report = {"norm": norms[m] if finite[m] else math.inf, "zeroed": not finite[m]}
            got[m] = _Attempt(set(), report | {"failed": 1.0})
            # matchmaking ends by the step's deadline, the all-reduce within allreduce_timeout of it
            result, e = self._wait(control, max(0.0, control.deadline - get_dht_time()) + s.allreduce_timeout
                                   + s.request_timeout, controls)
            if e is not None:  # hivemind raises AllreduceException, MatchmakingException, TimeoutError...
                control.cancel()
                log.warning("round %d, module %s: averaging failed (%s: %s); policy %s", round_, m,
                            type(e).__name__, e, s.failure_policy)
                continue
            if result is None:
                log.warning("round %d, module %s: no group formed; policy %s", round_, m, s.failure_policy)
                continue
            gathered, received = result
            members = {str(p) for p in gathered}
            strays = sorted(p for p, g in gathered.items() if g != {"round": round_, "attempt": attempt})
            if strays:
                log.warning("round %d, module %s: peer(s) %s averaged another round with this one; discarding the "
                            "average (policy %s)", round_, m, strays, s.failure_policy)
                continue
            got[m] = _Attempt(members, report, self._bytes_sent(deltas[m], len(members)))
            if received < 1.0:
                log.warning("round %d, module %s: this peer %s received only %.1f%% of the average (group %s); "
                            "policy %s", round_, m, self.peer_id, 100 * received, sorted(members), s.failure_policy)
                got[m].report["partial"] = received
            else:
                with self.averagers[m].get_tensors() as (t,):
                    got[m].report |= agreement_sketch(t, sent[m], s.compression)
        self.timings["allreduce"] += time.perf_counter() - t0
        return got

    def _wait(self, control, timeout: float, controls: dict) -> tuple[Any, Exception | None]:
        """(control.result(timeout), None), or (None, the exception the step ended with or TimeoutError). Calls
        check_stop every STOP_POLL_S meanwhile; if it raises, every step of `controls` is cancelled (this peer
        leaves its groups) and the exception propagates."""
        end = time.monotonic() + timeout
        while True:
            try:
                return control.result(timeout=max(0.0, min(STOP_POLL_S, end - time.monotonic()))), None
            except Exception as e:
                if control.done():  # the step's own outcome (perhaps reached just after the poll timed out)
                    try:
                        return control.result(timeout=0), None
                    except Exception as outcome:
                        return None, outcome
                if time.monotonic() >= end:
                    return None, e
            if self.check_stop is not None:
                try:
                    self.check_stop()
                except BaseException:
                    for c in controls.values():
                        c.cancel()
                    raise

    def _reports(self, round_: int, attempt: int, got: dict[str, _Attempt]) -> dict[str, dict[str, dict]]:
        """Publish this peer's report on every module (Δ norm, and a sketch of its average, or that it was
        partial or failed) in one DHT record, and gather the other members' reports: module -> peer -> report.

        Waits until every member of each group has reported, at most allreduce_timeout + stats_timeout: a
        living member's all-reduce ends within allreduce_timeout of ours (it cannot end before the last
        member's trigger, ours neither), so a member that has not reported by then has died or stalled."""
        from hivemind.utils import get_dht_time

        s, t0 = self.settings, time.perf_counter()
        key = f"{s.run}/check/{round_}/{attempt}"
        stored = self.dht.store(key, {m: a.report for m, a in got.items()},
                                get_dht_time() + max(60.0, 4 * s.averaging_timeout), subkey=self.peer_id,
                                return_future=True)
        seen: dict[str, dict[str, dict]] = {m: {} for m in got}
        pending = {m for m, a in got.items() if a.members - {self.peer_id}}
        deadline = time.monotonic() + s.allreduce_timeout + s.stats_timeout
        while pending:
            found = self._dht_result(self.dht.get(key, latest=True, return_future=True), "reading the DHT")
            entries = found.value if found is not None and isinstance(found.value, dict) else {}
            for peer, entry in entries.items():
                peer = str(peer)
                for m, r in (entry.value.items() if isinstance(entry.value, dict) else ()):
                    if m in pending and peer in got[m].members and peer != self.peer_id and isinstance(r, dict):
                        seen[m][peer] = r
            pending = {m for m in pending if not seen[m].keys() >= got[m].members - {self.peer_id}}
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        self._dht_result(stored, "storing this peer's reports")
        self.timings["reports"] += time.perf_counter() - t0
        return seen

    def _judge(self, round_: int, m: str, got: _Attempt, seen: dict[str, dict], refused: set[str],
               outcome: ModuleOutcome) -> None:
        """Outcome "mismatch" when this peer's average was partial or another member's differs (refused
        members' own results do not count), or a member never reported."""
        s = self.settings
        if "partial" in got.report:
            outcome.outcome = "mismatch"
            return
        why = {p: _report_mismatch(got.report, r) for p, r in seen.items() if p not in refused}
        why |= {p: "no report" for p in got.members - {self.peer_id} - seen.keys()}
        why = {p: w for p, w in why.items() if w}
        if why:
            log.warning("round %d, module %s: the group's averages disagree (%s); policy %s", round_, m,
                        "; ".join(f"peer {p}: {w}" for p, w in sorted(why.items())), s.failure_policy)
            outcome.outcome = "mismatch"

    def _dht_result(self, future, what: str):
        """A DHT call's result; its process dying (or never answering) is an error, not a wait forever."""
        return child_result(future.result, self.dht, what, self.settings.averaging_timeout)

    def _bytes_sent(self, delta: Tensor, group_size: int) -> int:
        """What this peer sends in one butterfly all-reduce of `delta` in a group of n: (n-1)/n of its Δ,
        compressed, to the other reducers, and (n-1)/n of its own share's averages back to them."""
        from hivemind.compression import CompressionInfo

        size = self.compression.compress(delta, CompressionInfo.from_tensor(delta)).ByteSize()
        return int(2 * size * (group_size - 1) / group_size)


# ---- the outer optimizer -------------------------------------------------------------------------

class OuterState:
    """θ_start and Nesterov momentum per module (flat fp32), and the outer step."""

    def __init__(self, model: Transformer, modules: list[str], index: dict[str, int],
                 momentum: dict[str, Tensor] | None = None):
        self.model, self.modules, self.index = model, modules, index
        self.theta = {m: flatten(module_tensors(model, m, index)).clone() for m in modules}
        self.momentum = momentum or {m: torch.zeros_like(self.theta[m]) for m in modules}

    def deltas(self) -> dict[str, Tensor]:
        return {m: self.theta[m] - flatten(module_tensors(self.model, m, self.index)) for m in self.modules}

    @torch.no_grad()
    def step(self, m: str, delta: Tensor, lr: float, mu: float) -> None:
        """Nesterov SGD on θ_start with the averaged pseudo-gradient; writes the result into the model."""
        buf = self.momentum[m].mul_(mu).add_(delta)
        self.theta[m] -= lr * (delta + mu * buf)
        unflatten_into(self.theta[m], module_tensors(self.model, m, self.index))

    @torch.no_grad()
    def revert(self, m: str) -> None:
        unflatten_into(self.theta[m], module_tensors(self.model, m, self.index))


def outer_round(averager: SwarmAverager | None, state: OuterState, settings: SwarmSettings, round_: int,
                weights: dict[str, float]) -> RoundReport:
    """Δ per module, averaging among holders, outer step (see the module docstring for the policies)."""
    t0 = time.perf_counter()
    deltas = state.deltas()
    if averager is None:
        outcomes = {m: ModuleOutcome(m, "local", float(d.norm())) for m, d in deltas.items()}
    else:
        outcomes = averager.average(round_, deltas, weights)
    for m, o in outcomes.items():
        failed = o.outcome in ("failed", "mismatch")  # deltas[m] is then this holder's own Δ
        if o.outcome in ("ok", "local") or (failed and settings.failure_policy == "local"):
            state.step(m, deltas[m], settings.outer_lr, settings.outer_momentum)
        elif o.outcome == "refused":
            state.revert(m)  # a bad Δ never reaches the weights; this holder resumes from θ_start
        # failed/mismatch + retry: keep θ_start and momentum (the same on every holder) as the reference and
        # the local progress; next round's Δ carries both rounds
    timings = averager.timings if averager is not None else NO_TIMINGS
    return RoundReport(round_, [outcomes[m] for m in state.modules], time.perf_counter() - t0,
                       allreduce_seconds=timings["allreduce"], reports_seconds=timings["reports"])


# ---- Prometheus (the daemon's registry) ----------------------------------------------------------

class NullSwarmMetrics:
    """What the executor records into when the daemon serves no metrics."""

    def record_round(self, report: RoundReport, inner_loss: float, inner_seconds: float, round_seconds: float, *,
                     run: str) -> None:
        ...


class SwarmMetrics(NullSwarmMetrics):
    """The agreed swarm metrics (dashboards depend on these names), registered in the daemon's registry."""

    def __init__(self, registry):
        from prometheus_client import Counter, Gauge

        kw = {"registry": registry}
        self.rounds = Counter("mujina_swarm_rounds", "swarm rounds by outcome", ["outcome"], **kw)
        self.averaging = Counter("mujina_swarm_averaging", "module averagings by group and outcome",
                                 ["group", "outcome"], **kw)
        self.bytes_sent = Counter("mujina_swarm_bytes_sent", "bytes sent in all-reduce (compressed)", **kw)
        # run and phase label the loss as on mujina_train_* and mujina_latest_loss (phase: the project's stage)
        self.inner_loss = Gauge("mujina_swarm_inner_loss", "mean inner loss of the last round", ["run", "phase"],
                                **kw)
        self.inner_seconds = Counter("mujina_swarm_inner_seconds", "time in inner steps", **kw)
        self.round_seconds = Counter("mujina_swarm_round_seconds", "wall time of rounds", **kw)
        # every labelled series exists from start-up at 0, so rates and alerts have a series before the first event
        for outcome in ("averaged", "local_only", "failed"):
            self.rounds.labels(outcome)
        for group in ("trunk", "expert"):
            for outcome in ("ok", "failed", "refused", "mismatch"):
                self.averaging.labels(group, outcome)

    def record_round(self, report: RoundReport, inner_loss: float, inner_seconds: float, round_seconds: float, *,
                     run: str) -> None:
        outcomes = {m.outcome for m in report.modules}
        # averaged: some module was averaged; local_only: nothing to average with (averaging off, sole
        # holders); failed: every averaging failed, was refused or disagreed (mismatch)
        label = "averaged" if "ok" in outcomes else "local_only" if outcomes == {"local"} else "failed"
        self.rounds.labels(label).inc()
        for m in report.modules:
            if m.outcome in ("ok", "failed", "refused", "mismatch"):
                self.averaging.labels("trunk" if m.module == TRUNK else "expert", m.outcome).inc()
        self.bytes_sent.inc(report.bytes_sent)
        self.inner_loss.labels(run, "swarm").set(inner_loss)
        self.inner_seconds.inc(inner_seconds)
        self.round_seconds.inc(round_seconds)
