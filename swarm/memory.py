"""How much memory a swarm round needs for a given expert assignment, and how many experts fit a budget.

The coordinator sizes each worker's assignment with `experts_that_fit`; the worker checks its budget with
`estimate_round_memory` before it starts. What a round keeps, per parameter held (trunk + k experts per
layer, each with its router row), in bytes:

    weights 4 (fp32 master weights)        grads 4 (freed after each inner step)
    AdamW   8 (exp_avg, exp_avg_sq)        8-bit AdamW (bitsandbytes, CUDA): 2
    outer   8 (θ_start and momentum)       Δ 8 during the outer step only (the flat Δ and θ_local)
    averaging 4 per other holder of the module (the Δs received, decoded, swarm/exchange.py), 4 for this
            worker's own encoded Δ, and 12 per parameter of the largest module (CenteredClip's centre, next
            centre and one temporary, swarm/robust.py)

plus scratch: two temporaries the size of the largest held tensor (a layer's stacked expert weight,
k·F·D, or the embedding): AdamW's step and the stacked weights' backward each hold one at a time.

The peak is the larger of the inner step (weights + grads + optimizer + scratch + outer + averaging +
activations) and the outer step (weights + optimizer + outer + averaging + Δ), plus the process's
baseline: on CPU the RSS of the process once it has imported everything and run one tiny training step
(`warm_baseline_rss`: the kernels' code pages count as resident), 0 for CUDA's max_memory_allocated.

On CPU that holds only with the allocator pinned (`pin_allocator`, which the worker daemon calls): glibc's
default raises its mmap threshold as large blocks are freed, after which freed temporaries stay resident
in the heap, by an amount that differs between machines. The same k=8 round of tests/swarm/test_memory.py
peaked 461 MB above its baseline on one machine and 353 MB on another; pinned, 336 MB on the first.

Activations, per micro-batch of N = micro_batch_size · seq_len tokens, in fp32 floats: per layer about
16·D (norms, attention projections, residuals) + K·(2·D + 4·F) for the routed slots (gathered inputs,
w1/w3 outputs, SiLU, product, expert outputs), and 4·V for the logits, their fp32 copy and the
cross-entropy's softmax and gradient. Activation checkpointing keeps one layer's worth plus the D-wide
input of every layer. tests/swarm/test_memory.py measures two assignment sizes against the prediction.

On CUDA (`device="cuda"`, the worker's bf16 autocast) the same terms count device memory, except that
the averaging buffers are in host memory, matmul activations are 2 bytes wide (the logits' fp32
copy, softmax and gradient stay 4), and autocast keeps a bf16 copy of every weight it casts until the
backward pass (only the output head's under activation checkpointing, which recomputes the others per
block). benchmarks/gpu_memory.py and tests/gpu measured it on an H100 within 6.3% of max_memory_allocated.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from model.config import ModelConfig

FP32, BF16 = 4, 2


@dataclass
class MemoryEstimate:
    base: int
    weights: int
    grads: int
    optimizer: int
    outer: int
    averaging: int
    delta: int
    activations: int
    scratch: int = 0
    casts: int = 0

    @property
    def inner_peak(self) -> int:
        return (self.weights + self.grads + self.optimizer + self.scratch + self.outer + self.averaging
                + self.casts + self.activations)

    @property
    def outer_peak(self) -> int:
        return self.weights + self.optimizer + self.outer + self.averaging + self.delta

    @property
    def total(self) -> int:
        return self.base + max(self.inner_peak, self.outer_peak)


def held_params(cfg: ModelConfig, experts_per_layer: int) -> tuple[int, int]:
    """(trunk, expert) parameters a worker holds: k experts per layer, each with its router row."""
    if cfg.moe is None:
        raise ValueError("memory estimates are for MoE swarm workers: upcycle the dense model first")
    D, F = cfg.hidden_size, cfg.intermediate_size
    experts_all = cfg.num_layers * cfg.moe.num_experts * (3 * D * F + D)
    return cfg.num_params() - experts_all, cfg.num_layers * experts_per_layer * (3 * D * F + D)


def largest_tensor(cfg: ModelConfig, experts_per_layer: int) -> int:
    """Elements of the largest parameter tensor a worker holds: a layer's stacked w1/w2/w3 or the embedding."""
    return max(experts_per_layer * cfg.intermediate_size * cfg.hidden_size, cfg.vocab_size * cfg.hidden_size)


def activation_bytes(cfg: ModelConfig, experts_per_layer: int, tokens: int, checkpointing: bool,
                     device: str = "cpu") -> int:
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    K = min(cfg.moe.top_k, experts_per_layer)
    per_layer = 16 * D + K * (2 * D + 4 * F)
    layers = (cfg.num_layers * D + per_layer) if checkpointing else cfg.num_layers * per_layer
    if device == "cuda":  # bf16 autocast: matmul outputs in bf16; the logits' fp32 copy, softmax and grad in fp32
        return tokens * (layers * BF16 + V * (BF16 + 3 * FP32))
    return tokens * (layers + 4 * V) * FP32


def estimate_round_memory(cfg: ModelConfig, experts_per_layer: int, *, micro_batch_size: int, seq_len: int,
                          optimizer: str = "adamw", averaging: bool = True, activation_checkpointing: bool = False,
                          base_bytes: int = 0, device: str = "cpu", holders: tuple[int, int] = (2, 2)
                          ) -> MemoryEstimate:
    """Peak memory of one round on a worker holding `experts_per_layer` experts in every layer: host memory
    on `device="cpu"`, device memory on `"cuda"` (bf16 autocast; the averaging buffers are then in host
    memory). `holders`: how many workers hold the trunk and each expert (the exchange keeps a copy of every
    other holder's Δ; a Δ may arrive during this worker's inner steps)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if cfg.moe is None:
        raise ValueError("memory estimates are for MoE swarm workers: upcycle the dense model first")
    if not cfg.moe.top_k <= experts_per_layer <= cfg.moe.num_experts:
        raise ValueError(f"experts_per_layer must be in [top_k={cfg.moe.top_k}, {cfg.moe.num_experts}], "
                         f"got {experts_per_layer}")
    trunk, experts = held_params(cfg, experts_per_layer)
    P = trunk + experts
    opt_bytes = {"adamw": 2 * FP32, "adamw8bit": 2}[optimizer]
    cuda = device == "cuda"
    return MemoryEstimate(
        base=base_bytes, weights=P * FP32, grads=P * FP32, optimizer=P * opt_bytes, outer=2 * P * FP32,
        scratch=2 * largest_tensor(cfg, experts_per_layer) * FP32,
        averaging=averaging_bytes(cfg, trunk, experts, holders) if averaging and not cuda else 0, delta=2 * P * FP32,
        casts=(cfg.vocab_size * cfg.hidden_size if activation_checkpointing else P - cfg.vocab_size * cfg.hidden_size)
        * BF16 if cuda else 0,
        activations=activation_bytes(cfg, experts_per_layer, micro_batch_size * seq_len, activation_checkpointing,
                                     device))


def averaging_bytes(cfg: ModelConfig, trunk: int, experts: int, holders: tuple[int, int]) -> int:
    """The exchange's host memory: the other holders' Δs of every module (fp32, decoded), this worker's own
    encoded Δ, and CenteredClip's three module-sized buffers for the largest module."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    largest = max(trunk, 3 * D * F + D if experts else 0)
    return ((max(holders[0], 1) - 1) * trunk + (max(holders[1], 1) - 1) * experts + trunk + experts
            + 3 * largest) * FP32


def experts_that_fit(cfg: ModelConfig, budget_bytes: int, **kw) -> int:
    """The most experts per layer whose round fits in `budget_bytes` (0 if not even top_k fit)."""
    best = 0
    for k in range(cfg.moe.top_k, cfg.moe.num_experts + 1):
        if estimate_round_memory(cfg, k, **kw).total <= budget_bytes:
            best = k
    return best


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def pin_allocator(threshold: int = 64 * 1024) -> bool:
    """Fix glibc's mmap threshold so that every block from `threshold` bytes up is mmap()ed and returned to
    the OS when freed: a CPU process's RSS then follows its live tensors, which the memory model predicts,
    instead of the heap high-water mark. Process-wide; False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def warm_baseline_rss() -> int:
    """RSS after one training step of a tiny MoE through the swarm code path: what a worker's process
    occupies before its own model (interpreter, libraries, the kernels' code pages)."""
    import torch
    import torch.nn.functional as F

    from model.optim import OptimConfig
    from model.step import build_optimizer
    from model.transformer import Transformer

    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, max_seq_len=16, moe={"num_experts": 2, "top_k": 2})
    net = Transformer(cfg)
    opt = build_optimizer(net, OptimConfig())
    ids = torch.randint(0, 32, (2, 16))
    logits, aux = net(ids, doc_ids=torch.zeros_like(ids), return_aux=True)
    (F.cross_entropy(logits.flatten(0, 1), ids.flatten()) + aux.loss(cfg)).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    return current_rss_bytes()


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM of /proc/self/status on Linux.

    Not ru_maxrss there: Linux carries the high-water mark of the process image an exec replaced into
    ru_maxrss, so a worker started by a large parent (a test runner, a notebook) would report the
    parent's size. Elsewhere ru_maxrss (KiB on Linux, bytes on macOS; only Linux runs the tests)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
