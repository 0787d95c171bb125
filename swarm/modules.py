"""What a module is, and who holds it. Torch-free: the coordinator plans with it without loading torch.

A swarm averages a MoE in *modules*, each among the workers that hold it:

    trunk        every parameter outside the MoE blocks' experts and routers (embeddings, attention,
                 norms, output head); every worker holds it
    l{i}e{e}     expert e of layer i: its w1/w3/w2 slices and its router row

An *assignment* says which experts of each layer a worker holds: {layer: [experts]}, the same count
(>= top_k) in every layer. `swarm/tensors.py` maps modules to tensors of a model.

    expert_module(3, 5)                  # "l3e5"
    parse_module("l3e5")                 # (3, 5); parse_module("trunk") is None
    count_holders([{0: [0, 1]}, {0: [1, 2]}])   # {"trunk": 2, "l0e0": 1, "l0e1": 2, "l0e2": 1}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

TRUNK = "trunk"
Assignment = dict[int, list[int]]            # layer -> global expert indices held (sorted, same count per layer)

_EXPERT = re.compile(r"l(\d+)e(\d+)")


def expert_module(layer: int, expert: int) -> str:
    return f"l{layer}e{expert}"


def parse_module(name: str) -> tuple[int, int] | None:
    """(layer, expert) of an expert module's name, None for the trunk; ValueError for any other name."""
    if name == TRUNK:
        return None
    m = _EXPERT.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"{name!r} is not a swarm module: expected {TRUNK!r} or l{{layer}}e{{expert}}, e.g. l0e3")
    return int(m.group(1)), int(m.group(2))


EXPERT_TENSORS = ("w1_EFD", "w3_EFD", "w2_EDF", "router.weight")  # per-expert tensors of a MoE block, in order
_EXPERT_SUFFIXES = tuple(f"feed_forward.{t}" for t in EXPERT_TENSORS)


def is_expert_param(name: str) -> bool:
    """Whether a Transformer parameter name is per-expert (stacked expert weights or the router)."""
    return name.endswith(_EXPERT_SUFFIXES)


def check_assignment(cfg_moe, num_layers: int, assignment: Mapping) -> Assignment:
    """Validate and normalise an assignment (keys may be strings, as in JSON): every layer 0..L-1, the same
    number >= top_k of distinct experts in each. `cfg_moe` is the model's MoEConfig (None: a dense model)."""
    if cfg_moe is None:
        raise ValueError("swarm training needs a MoE checkpoint: upcycle the dense model first "
                         "(mujina-model upcycle)")
    try:
        assignment = {int(k): sorted(int(e) for e in v) for k, v in assignment.items()}
    except (TypeError, ValueError, AttributeError):
        raise ValueError("the expert assignment must map layers to lists of expert indices") from None
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


def uniform_assignment(experts: Iterable[int], num_layers: int) -> Assignment:
    """The same experts in every layer (how the coordinator assigns them)."""
    held = sorted(experts)
    return {layer: list(held) for layer in range(num_layers)}


def held_modules(assignment: Assignment) -> list[str]:
    """The modules a worker with `assignment` holds: the trunk first, then experts by layer."""
    return [TRUNK] + [expert_module(i, e) for i, experts in sorted(assignment.items()) for e in experts]


def local_index(assignment: Assignment) -> dict[str, int]:
    """Expert module -> its position in the local model's stacked tensors (which hold only the held experts)."""
    return {expert_module(i, e): j for i, experts in assignment.items() for j, e in enumerate(experts)}


def count_holders(assignments: Iterable[Assignment]) -> dict[str, int]:
    """Module -> how many of `assignments` hold it (the size of its averaging group)."""
    out: dict[str, int] = {}
    for a in assignments:
        out[TRUNK] = out.get(TRUNK, 0) + 1
        for layer, experts in sorted(a.items()):
            for e in experts:
                out[expert_module(layer, e)] = out.get(expert_module(layer, e), 0) + 1
    return out


def tokens_per_module(tokens: int, tokens_per_expert_LE, assignment: Assignment) -> dict[str, float]:
    """Averaging weights: the trunk saw every token; expert modules the token slots routed to them.
    `tokens_per_expert_LE` (layers, held experts) is indexed by the local model's positions."""
    out = {TRUNK: float(tokens)}
    for i, experts in assignment.items():
        for j, e in enumerate(experts):
            out[expert_module(i, e)] = float(tokens_per_expert_LE[i, j])
    return out
