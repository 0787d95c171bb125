"""QLoRA: LoRA adapters on a frozen base stored in 4-bit NF4 with bitsandbytes (Dettmers et al., 2023).

    add_lora(net, spec)              # model/lora.py: frozen base, trainable adapters
    quantize_base(net)               # the base's linears and experts to NF4, in place
    with adapters_disabled(net):     # DPO's reference: the same quantised base, adapters off
        ...
    state = dequantized_state_dict(net)   # an ordinary LoRA network's weights (fp32), for checkpoints

What is quantised: every frozen base weight of a linear that a token passes through: attention wq wk wv wo,
the dense FFN's w1 w2 w3 and the stacked MoE experts (per expert: expert e's (F, D) matrix is its own NF4
tensor, as a swarm volunteer holds experts separately). What is not, as in the QLoRA paper: the token
embeddings, the norms and the output head (peft's prepare_model_for_kbit_training keeps them too), and the
router (E x D, a fraction of a percent of the weights, whose rounding would move tokens between experts).
The adapters keep the dtype of the network they were added to (fp32; bf16 autocast on CUDA computes them
in bf16) and are the only trainable parameters.

NF4 storage: blocks of 64 weights share an absmax, and the absmaxes are quantised again to 8 bits in blocks
of 256 (double quantisation): 4.127 bits a weight, against 16 in bf16 and 32 in fp32.

Compute: a layer dequantises its weights when it runs, in the dtype the matmul runs in (bf16 under CUDA
autocast, fp32 on a CPU run without autocast), and autograd keeps the NF4 storage instead of the dense
copy: backward dequantises again (as bitsandbytes' MatMul4Bit does). So a dense copy lives only while its
layer runs forward or backward, never between layers or steps. The forward is exactly the forward of an
unquantised network whose weights are the dequantised NF4 weights (tests/model/test_qlora.py).

Where it runs: CUDA (bitsandbytes' kernels) and CPU (bitsandbytes 0.50's CPU backend quantises and
dequantises; measured in the README). On an AVX512-BF16 CPU bitsandbytes tries, when imported, to fetch an
optional fused inference kernel from the Hugging Face Hub through the `kernels` package; `bitsandbytes()`
below imports it with that lookup switched off (no network at run time). That kernel serves only
single-token inference (gemv_4bit), which this training path never calls.
"""

from __future__ import annotations

import copy
import importlib
import logging
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lora import LoraLinear, adapter_state_dict
from .moe import MoE
from .transformer import Transformer

log = logging.getLogger(__name__)

BLOCKSIZE = 64  # QLoRA's: weights per absmax
EXPERT_WEIGHTS = ("w1_EFD", "w3_EFD", "w2_EDF")


def bitsandbytes():
    """`import bitsandbytes`, without its import-time attempt to download a CPU kernel from the Hub.

    bitsandbytes/backends/cpu/ops.py runs `from kernels import get_kernel` and `get_kernel(...)` (a Hub call)
    inside a try block when the CPU has AVX512-BF16; a None in sys.modules makes that import fail at once,
    so bitsandbytes logs that it falls back to its own CPU code and no request leaves the machine."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    had, kernels = "kernels" in sys.modules, sys.modules.get("kernels")
    sys.modules["kernels"] = None  # type: ignore[assignment]
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the fallback's warning asks to pip install kernels: not wanted here
    try:
        return importlib.import_module("bitsandbytes")
    finally:
        quiet.setLevel(level)
        if had:
            sys.modules["kernels"] = kernels
        else:
            del sys.modules["kernels"]


def nf4(weight: Tensor) -> nn.Parameter:
    """`weight` (any shape, floating point) as a frozen bitsandbytes Params4bit on the same device: NF4 in
    blocks of 64, absmaxes double-quantised. Deterministic: the same weight gives the same bytes."""
    bnb = bitsandbytes()
    packed, state = bnb.functional.quantize_4bit(weight.detach().float().contiguous(), blocksize=BLOCKSIZE,
                                                 compress_statistics=True, quant_type="nf4")
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE,
                             compress_statistics=True, quant_type="nf4", bnb_quantized=True)


def dequantize(p: nn.Parameter, dtype: torch.dtype = torch.float32) -> Tensor:
    """An NF4 parameter's weights, dense, in `dtype` (a fresh tensor)."""
    state = p.quant_state
    if state.dtype != dtype:
        state = copy.copy(state)  # the stored state says fp32; ask the kernel for `dtype` directly
        state.dtype = dtype
    return bitsandbytes().functional.dequantize_4bit(p.data, state)


def _matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype the base matmul on `x` runs in: autocast's when enabled, else the activations' (as
    model/moe.py's expert computation and F.linear under autocast decide)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


@dataclass
class _Remake:
    """What autograd keeps instead of a view of a dense dequantised weight."""

    remake: Callable[[], Tensor]
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


@dataclass
class _Outer:
    """A tensor packed by the saved-tensor hooks active around the module (activation checkpointing's)."""

    packed: object
    unpack: Callable[[object], Tensor]


class _DenseWhileRunning:
    """Dense weights that exist only while one module runs.

    Inside `active()`, tensors made by `dequantize(make)` are kept alive until the block ends (so their memory
    cannot be reused by a tensor that autograd then mistakes for them), and autograd saves any view of them
    as the recipe to remake it (the NF4 parameter and the dtype), which backward runs again. Every other
    tensor goes to the hooks that were active outside (activation checkpointing's, which then recomputes
    it), or is saved as usual."""

    def __init__(self):
        self.dense: list[tuple[Tensor, Callable[[], Tensor]]] = []
        self.on = False
        self.outer = None

    def dequantize(self, make: Callable[[], Tensor]) -> Tensor:
        w = make()
        if self.on:  # outside active() (reference_moe, a test) the tensor is an ordinary one
            self.dense.append((w, make))
        return w

    def _pack(self, t: Tensor):
        ptr = t.untyped_storage().data_ptr()
        for w, make in self.dense:
            if ptr == w.untyped_storage().data_ptr():  # w itself or a view of it (a transpose, an expert's slice)
                return _Remake(make, t.size(), t.stride(), t.storage_offset())
        if self.outer is not None:
            pack, unpack = self.outer
            return _Outer(pack(t), unpack)
        return t

    @staticmethod
    def _unpack(saved):
        if isinstance(saved, _Remake):
            return saved.remake().as_strided(saved.size, saved.stride, saved.offset)
        if isinstance(saved, _Outer):
            return saved.unpack(saved.packed)
        return saved

    @contextmanager
    def active(self):
        # Hooks nest with the innermost alone applying, so this one hands on what it does not keep itself. The
        # outer pair is read through a private torch function (there is no public one); without it, tensors
        # are saved as usual, which is correct but keeps them under activation checkpointing.
        top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        self.outer = top(False) if top is not None else None
        self.on = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield self
        finally:
            self.on, self.outer = False, None
            self.dense.clear()


class NF4Linear(nn.Module):
    """A frozen bias-free linear (out, in) stored in NF4: a base linear that has no adapter."""

    def __init__(self, base: nn.Linear, device: torch.device | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nf4(base.weight.to(device or base.weight.device))
        self._running = _DenseWhileRunning()

    def forward(self, x: Tensor) -> Tensor:
        return _nf4_linear(self, x)


class NF4LoraLinear(LoraLinear):
    """model/lora.py's LoraLinear with its base weight in NF4 (made by `quantize_base`, not constructed)."""

    def forward(self, x: Tensor) -> Tensor:
        y = _nf4_linear(self, x)
        if not self.enabled:
            return y
        return y + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def merged(self) -> nn.Linear:
        raise ValueError("merge a QLoRA network's dequantised copy: load dequantized_state_dict(net) into a LoRA "
                         "network, then merge_lora it")


def _nf4_linear(m: NF4Linear | NF4LoraLinear, x: Tensor) -> Tensor:
    dtype = _matmul_dtype(x)
    with m._running.active() as dense:
        return F.linear(x, dense.dequantize(lambda: dequantize(m.weight, dtype)))


class NF4MoE(MoE):
    """model/moe.py's MoE with its stacked experts in NF4, one Params4bit per expert and projection
    (`w1_nf4[e]`...). `w1_EFD`, `w3_EFD`, `w2_EDF` read as the dense stacks, dequantised on each read, so
    MoE.forward, its grouped expert computation and reference_moe run unchanged; forward runs them with
    autograd keeping the NF4 storage instead (see _DenseWhileRunning)."""

    @property
    def w1_EFD(self) -> Tensor:
        return self._stack("w1")

    @property
    def w3_EFD(self) -> Tensor:
        return self._stack("w3")

    @property
    def w2_EDF(self) -> Tensor:
        return self._stack("w2")

    def _stack(self, name: str) -> Tensor:
        experts, dtype = getattr(self, f"{name}_nf4"), self._dtype

        def make() -> Tensor:  # (E, F, D) or (E, D, F), written expert by expert: no second copy
            out = torch.empty(len(experts), *experts[0].quant_state.shape, dtype=dtype, device=experts[0].device)
            for e, p in enumerate(experts):
                out[e] = dequantize(p, dtype)
            return out

        return self._running.dequantize(make)

    def forward(self, x_ND: Tensor, active_E: Tensor | None = None):
        self._dtype = _matmul_dtype(x_ND)
        with self._running.active():
            return super().forward(x_ND, active_E)


@torch.no_grad()
def quantize_base(net: Transformer, device: torch.device | str | None = None) -> Transformer:
    """Store the frozen base of a LoRA network (after model/lora.py's add_lora) in NF4, in place, and move the
    network to `device` (default: where it is). Returns `net`. Embeddings, norms, the output head, the router
    and the adapters are kept as they are. Each weight moves to `device` alone and is quantised there, so a
    network built on CPU reaches the GPU at 4 bits without ever being there whole in its own dtype."""
    device = torch.device(device) if device is not None else net.tok_embeddings.weight.device
    if any(p.requires_grad for n, p in net.named_parameters() if "lora" not in n):
        raise ValueError("quantize_base takes a LoRA network (add_lora freezes the base first)")
    if any(isinstance(m, NF4Linear | NF4LoraLinear | NF4MoE) for m in net.modules()):
        raise ValueError("this network's base is quantised already")
    for block in net.layers:
        attn, ff = block.attention, block.feed_forward
        owners = [(attn, ("wq", "wk", "wv", "wo"))] + ([] if isinstance(ff, MoE) else [(ff, ("w1", "w2", "w3"))])
        for owner, names in owners:
            for name in names:
                setattr(owner, name, _quantized_linear(getattr(owner, name), device))
        if isinstance(ff, MoE):
            for name in EXPERT_WEIGHTS:
                stacked = ff._parameters.pop(name)  # the dense (E, out, in) stack: freed once the loop ends
                setattr(ff, f"{name[:2]}_nf4", nn.ParameterList(nf4(w.to(device)) for w in stacked.unbind(0)))
            ff._running, ff._dtype = _DenseWhileRunning(), torch.float32
            ff.__class__ = NF4MoE  # the same module, its expert stacks now read through NF4MoE's properties
    return _move_unquantised(net, device)


def _quantized_linear(m: nn.Module, device: torch.device) -> nn.Module:
    if isinstance(m, LoraLinear):
        m.weight = nf4(m._parameters.pop("weight").to(device))
        m._running = _DenseWhileRunning()
        m.__class__ = NF4LoraLinear
        return m
    return NF4Linear(m, device)


def _move_unquantised(net: nn.Module, device: torch.device) -> nn.Module:
    """Move every parameter and buffer but the NF4 ones (Module.to would rebuild those) to `device`, keeping
    tied parameters tied (the output head may be the embeddings)."""
    moved: dict[int, nn.Parameter] = {}
    for m in net.modules():
        for name, p in m._parameters.items():
            if p is None or hasattr(p, "quant_state") or p.device == device:
                continue
            if id(p) not in moved:
                moved[id(p)] = nn.Parameter(p.data.to(device), requires_grad=p.requires_grad)
            m._parameters[name] = moved[id(p)]
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = b.to(device)
    return net


@torch.no_grad()
def dequantized_state_dict(net: Transformer) -> dict[str, Tensor]:
    """`net`'s weights as an unquantised LoRA network (model/lora.py) names and holds them: each NF4 weight
    dequantised to fp32 under its original name, the rest as they are. What a QLoRA checkpoint saves: it
    loads with finetune.load_lora_checkpoint, merges and exports like any LoRA checkpoint."""
    out = {}
    for k, v in net.state_dict().items():
        if not any(f".{n[:2]}_nf4." in k for n in EXPERT_WEIGHTS):
            out[k] = v
    for name, m in net.named_modules():
        if isinstance(m, NF4Linear | NF4LoraLinear):
            out[f"{name}.weight"] = dequantize(m.weight)
        elif isinstance(m, NF4MoE):
            for w in EXPERT_WEIGHTS:
                out[f"{name}.{w}"] = torch.stack([dequantize(p) for p in getattr(m, f"{w[:2]}_nf4")])
    return out


@torch.no_grad()
def load_adapters(net: Transformer, state: dict[str, Tensor], source: object) -> None:
    """Resume a quantised network from `state` (a checkpoint of dequantized_state_dict): copy its adapters in.
    Its base must be this network's dequantised base, bit for bit (NF4 rounding is deterministic: the same
    init_from gives the same base), else a ValueError names the first weight that differs."""
    adapters = adapter_state_dict(net)
    for k, mine in dequantized_state_dict(net).items():
        if k not in state:
            if k == "output.weight" and net.cfg.tie_word_embeddings:
                continue  # not saved: the embeddings hold it
            raise ValueError(f"{source}: {k} is missing: not a checkpoint of this QLoRA run")
        if k in adapters:
            adapters[k].copy_(state[k])
        elif not torch.equal(mine.cpu(), state[k].cpu()):
            raise ValueError(f"{source}: {k} differs from this run's quantised base: the checkpoint was trained "
                             "from another init_from; restore it or use another --out")


def base_bytes(cfg) -> float:
    """Bytes of a quantised base (model/config.py's ModelConfig): NF4 with double quantisation for the quantised
    weights (4 bits + an 8-bit absmax per 64 + an fp32 absmax per 256 x 64), fp32 for the embeddings and the
    output head; norms and router counted as NF4 (under 1% of the weights). For the trainer's memory check."""
    kept = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    per_weight = 0.5 + 1 / BLOCKSIZE + 4 / (256 * BLOCKSIZE)
    return (cfg.num_params() - kept) * per_weight + kept * 4.0


def nf4_bytes(net: nn.Module) -> int:
    """Bytes the NF4 storage takes (packed weights, 8-bit absmaxes and their fp32 second-level absmaxes)."""
    total = 0
    for p in net.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += p.numel() * p.element_size() + state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total
