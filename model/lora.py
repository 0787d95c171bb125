"""LoRA adapters on the project's models: attention and FFN linears, and the stacked experts.

    spec = LoraSpec(r=8, alpha=16, targets=("wq", "wk", "wv", "wo", "experts"))
    adapters = add_lora(net, spec)          # freezes the base; returns the adapter parameters
    opt = torch.optim.AdamW(adapters, lr=2e-6)
    with adapters_disabled(net):            # the base model: DPO's reference without a frozen copy
        ref_logits = net(ids)
    merge_lora(net)                         # W += (alpha/r) B A, adapters removed: a plain model again

A linear `W x` becomes `W x + s * B (A dropout(x))` with A (r, in) and B (out, r), s = alpha / r
(alpha / sqrt(r) with rsLoRA), initialised as peft does (A: kaiming-uniform with a = sqrt(5), as
nn.Linear; B: zeros), so a fresh adapter leaves the model's output unchanged.

The stacked experts carry per-expert factors: for the gate/up projections A (E, r, D) and
B (E, F, r), for the down projection A (E, r, F) and B (E, D, r). They are applied inside the
grouped expert computation, on each expert's own token slots (model/moe.py), so the (E, F, D)
update B A is never materialised. The router is left alone unless "router" is a target: a
trainable router would move tokens between experts that swarm volunteers hold separately.

Base weights keep their names (`layers.0.attention.wq.weight`), so a LoRA model's base loads from
an ordinary checkpoint; adapter tensors are `...wq.lora_A` / `...wq.lora_B` and
`...feed_forward.lora.w1_A_ErD` (see `adapter_state_dict`).

Shape legend: D hidden, F (expert) intermediate, E experts, r rank, S routed token slots.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .moe import MoE
from .transformer import Transformer

LINEAR_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "router")
TARGETS = (*LINEAR_TARGETS, "experts")
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "experts")


@dataclass(frozen=True)
class LoraSpec:
    """Which linears get adapters, and how big."""

    r: int = 8
    """rank of each adapter"""
    alpha: float = 16.0
    """scale numerator: the update is (alpha / r) B A, or (alpha / sqrt(r)) B A with rslora"""
    dropout: float = 0.0
    """dropout on the adapter's input (training only)"""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """wq wk wv wo (attention), w1 w2 w3 (dense SwiGLU), experts (stacked MoE experts), router"""
    rslora: bool = False
    """rank-stabilised scaling alpha / sqrt(r)"""

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"finetune.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"finetune.dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"finetune.targets {list(self.targets)}: each must be one of {', '.join(TARGETS)}"
                             + (f" (unknown: {', '.join(unknown)})" if unknown else " (none given)"))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoraLinear(nn.Module):
    """A bias-free nn.Linear (the project's linears have no bias) plus a low-rank update."""

    def __init__(self, base: nn.Linear, spec: LoraSpec, generator: torch.Generator | None = None):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRA here supports the project's bias-free linears only")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: the base keeps its checkpoint name
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(spec.r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, spec.r, device=w.device, dtype=w.dtype))
        _kaiming_like_linear(self.lora_A, generator)
        self.scaling = spec.scaling
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        if not self.enabled:
            return y
        return y + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def delta(self) -> Tensor:
        """The dense update s * B A (out, in); for merging and tests, never in the forward pass."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def merged(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=False, device=self.weight.device,
                        dtype=self.weight.dtype)
        with torch.no_grad():  # in fp32, then rounded once to the base's dtype
            d = self.scaling * (self.lora_B.float() @ self.lora_A.float())
            lin.weight.copy_((self.weight.float() + d).to(self.weight.dtype))
        lin.weight.requires_grad_(self.weight.requires_grad)
        return lin


class ExpertLora(nn.Module):
    """Per-expert factors for the stacked SwiGLU experts of one MoE layer (see the module docstring)."""

    def __init__(self, moe: MoE, spec: LoraSpec, generator: torch.Generator | None = None):
        super().__init__()
        E, F_, D = moe.w1_EFD.shape
        r, kw = spec.r, dict(device=moe.w1_EFD.device, dtype=moe.w1_EFD.dtype)
        self.w1_A_ErD = nn.Parameter(torch.empty(E, r, D, **kw))
        self.w1_B_EFr = nn.Parameter(torch.zeros(E, F_, r, **kw))
        self.w3_A_ErD = nn.Parameter(torch.empty(E, r, D, **kw))
        self.w3_B_EFr = nn.Parameter(torch.zeros(E, F_, r, **kw))
        self.w2_A_ErF = nn.Parameter(torch.empty(E, r, F_, **kw))
        self.w2_B_EDr = nn.Parameter(torch.zeros(E, D, r, **kw))
        for a in (self.w1_A_ErD, self.w3_A_ErD, self.w2_A_ErF):
            for e in range(E):  # each expert's A as peft initialises one linear's
                _kaiming_like_linear(a[e], generator)
        self.scaling = spec.scaling
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        self.enabled = True

    def factors(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """((A, B) for w1, w3, w2), as model/moe.py's expert computation takes them."""
        return (self.w1_A_ErD, self.w1_B_EFr), (self.w3_A_ErD, self.w3_B_EFr), (self.w2_A_ErF, self.w2_B_EDr)

    def deltas(self) -> tuple[Tensor, Tensor, Tensor]:
        """The dense updates (E, F, D), (E, F, D), (E, D, F): for merging and tests only."""
        return tuple(self.scaling * torch.bmm(b, a) for a, b in self.factors())


@torch.no_grad()
def _kaiming_like_linear(a: Tensor, generator: torch.Generator | None) -> None:
    """nn.init.kaiming_uniform_(a, a=sqrt(5)) (nn.Linear's and peft's init of A), with an optional generator."""
    fan_in = a.shape[-1]
    bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))  # gain sqrt(2 / (1 + a^2)), a = sqrt(5): bound = 1/sqrt(fan_in)
    a.uniform_(-bound, bound, generator=generator)


def add_lora(net: Transformer, spec: LoraSpec, generator: torch.Generator | None = None) -> list[nn.Parameter]:
    """Freeze `net` and add adapters on `spec.targets` in place; returns the adapter parameters (trainable)."""
    if any(True for _ in lora_modules(net)):
        raise ValueError("this model already has LoRA adapters: merge_lora() them first")
    if "experts" in spec.targets and not net.cfg.is_moe:
        spec = LoraSpec(**{**spec.__dict__, "targets": tuple(t for t in spec.targets if t != "experts")})
    net.requires_grad_(False)
    for block in net.layers:
        attn = block.attention
        for name in ("wq", "wk", "wv", "wo"):
            if name in spec.targets:
                setattr(attn, name, LoraLinear(getattr(attn, name), spec, generator))
        ff = block.feed_forward
        if isinstance(ff, MoE):
            if "experts" in spec.targets:
                ff.lora = ExpertLora(ff, spec, generator)
            if "router" in spec.targets:
                ff.router = LoraLinear(ff.router, spec, generator)
        else:
            for name in ("w1", "w2", "w3"):
                if name in spec.targets:
                    setattr(ff, name, LoraLinear(getattr(ff, name), spec, generator))
    params = [p for m in lora_modules(net) for n, p in m.named_parameters() if n != "weight"]
    if not params:
        raise ValueError(f"finetune.targets {list(spec.targets)} matched no layer of this "
                         f"{'MoE' if net.cfg.is_moe else 'dense'} model")
    for p in params:
        p.requires_grad_(True)
    return params


def round_factor(round_: int) -> str:
    """The factor a collaborative LoRA round trains when the base must stay as it is (QLoRA's NF4 base): B in
    even rounds, A in odd ones (B first: A's gradient is zero while B is, so an A-first round 0 is wasted).

    Averaging A and B separately is not averaging B A: mean_i(B_i A_i) != mean(B_i) mean(A_i). With one
    factor frozen at the round's shared value, each worker's update is linear in the factor it trains
    (ΔW_i = s B (A_i - A), or s (B_i - B) A), so the weighted mean of the trained factors gives exactly the
    weighted mean of the workers' ΔW. Alternating halves the useful steps (benchmarks/posttrain.py);
    `average_adapters` trains both factors and stays exact by folding the rest into the base."""
    return "B" if round_ % 2 == 0 else "A"


def train_only(net: nn.Module, factor: str) -> list[nn.Parameter]:
    """Make only the adapters' `factor` ("A", "B" or "both") trainable; returns those parameters."""
    if factor not in ("A", "B", "both"):
        raise ValueError(f"factor must be A, B or both, got {factor!r}")
    out = []
    for m in lora_modules(net):
        for name, p in m.named_parameters():
            if name == "weight":
                continue
            is_a = name == "lora_A" or "_A_" in name
            on = factor == "both" or (factor == "A") == is_a
            p.requires_grad_(on)
            if on:
                out.append(p)
    return out


@torch.no_grad()
def average_adapters(net: nn.Module, members: Sequence[nn.Module], weights: Sequence[float]) -> None:
    """Make `net` exactly the weighted mean of `members`: copies of `net` that trained both factors of their
    adapters from `net`'s (the bases equal and frozen; weights summing to 1).

    Each adapter becomes the weighted means (Ā, B̄), and its base absorbs the rest, s (Σ w_i B_i A_i - B̄ Ā),
    computed in fp32: W + s B̄ Ā + s (Σ w_i B_i A_i - B̄ Ā) = Σ w_i (W + s B_i A_i), so every adapted weight is
    the weighted mean of the members' (DiLoCo's average with outer learning rate 1), however both factors
    moved. The base is written: not for QLoRA's NF4 base (use `round_factor` there)."""
    mods = {name: m for name, m in net.named_modules() if isinstance(m, LoraLinear | ExpertLora)}
    others = [dict(m.named_modules()) for m in members]
    if abs(sum(weights) - 1.0) > 1e-6 or len(weights) != len(members) or not members:
        raise ValueError(f"one weight per member, summing to 1 (got {list(weights)} for {len(members)} members)")
    for name, m in mods.items():
        theirs = [o[name] for o in others]
        if isinstance(m, LoraLinear):
            pairs = [((m.lora_A, m.lora_B), [(t.lora_A, t.lora_B) for t in theirs], m.weight)]
        else:
            owner = dict(net.named_modules())[name.rsplit(".", 1)[0]]
            bases = (owner.w1_EFD, owner.w3_EFD, owner.w2_EDF)
            pairs = [(mine, [t.factors()[i] for t in theirs], bases[i]) for i, mine in enumerate(m.factors())]
        for (a, b), member_ab, base in pairs:
            a_mean = sum(w * ta.float() for w, (ta, _) in zip(weights, member_ab, strict=True))
            b_mean = sum(w * tb.float() for w, (_, tb) in zip(weights, member_ab, strict=True))
            products = sum(w * (tb.float() @ ta.float()) for w, (ta, tb) in zip(weights, member_ab, strict=True))
            base.copy_((base.float() + m.scaling * (products - b_mean @ a_mean)).to(base.dtype))
            a.copy_(a_mean.to(a.dtype))
            b.copy_(b_mean.to(b.dtype))


def lora_modules(net: nn.Module) -> Iterator[LoraLinear | ExpertLora]:
    return (m for m in net.modules() if isinstance(m, LoraLinear | ExpertLora))


@contextmanager
def adapters_disabled(net: nn.Module):
    """Run the base model: every adapter off inside the block (DPO's reference), back on after."""
    mods = list(lora_modules(net))
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield net
    finally:
        for m, on in zip(mods, before, strict=True):
            m.enabled = on


def adapter_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors alone, by their names in `net` (what a LoRA checkpoint saves)."""
    names = {id(p) for m in lora_modules(net) for n, p in m.named_parameters() if n != "weight"}
    return {k: v.detach() for k, v in net.named_parameters() if id(v) in names}


@torch.no_grad()
def merge_lora(net: Transformer) -> Transformer:
    """Fold every adapter into its base weight (W += s B A, computed in fp32) and remove it, in place."""
    for block in net.layers:
        for owner in (block.attention, block.feed_forward):
            for name, child in list(owner.named_children()):
                if isinstance(child, LoraLinear):
                    setattr(owner, name, child.merged())
        ff = block.feed_forward
        if isinstance(ff, MoE) and ff.lora is not None:
            for w, d in zip((ff.w1_EFD, ff.w3_EFD, ff.w2_EDF), _fp32_deltas(ff.lora), strict=True):
                w.copy_((w.float() + d).to(w.dtype))
            ff.lora = None
    return net


def _fp32_deltas(lora: ExpertLora) -> tuple[Tensor, ...]:
    return tuple(lora.scaling * torch.bmm(b.float(), a.float()) for a, b in lora.factors())
