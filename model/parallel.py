"""How the one training program runs on many processes: process group, FSDP2, and the figures
cluster operators compare (FLOPs per token, MFU, memory per process).

The model code knows nothing of this. `parallelize` takes a plain `Transformer` and applies, from
outside, what torchtitan applies: activation checkpointing per block, `torch.compile` per block,
and FSDP2 `fully_shard` per block and at the root, with bf16 parameters and fp32 gradient
reductions on CUDA. Under `python -m model.train` (one process, no process group) it applies only
the first two, so both launchers run the same blocks.

    dist = init_distributed("auto")          # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    model = parallelize(Transformer(cfg).to(dist.device), dist, bf16=True, activation_checkpointing=False)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from .config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. world_size 1 without a process group is the reference run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, *values: float) -> list[float]:
        """Sum floats over every process (one collective for all of them)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            torch_dist.barrier()


def init_distributed(device: str) -> Dist:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU); else one process.

    `device` is the config's train.device: auto, cpu, cuda or cuda:N. Under torchrun each process
    takes cuda:LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"train.device={device} but CUDA is not available: use auto or cpu")
    if world <= 1:
        dev = torch.device(device if device != "auto" else ("cuda" if use_cuda else "cpu"))
        return Dist(0, 1, 0, dev)
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s): "
                             "lower --nproc_per_node")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not torch_dist.is_initialized():
        # torchrun's agent keeps one TCPStore across restarts (--max-restarts): without a per-attempt
        # prefix, a restarted process can read the address a killed peer published in the previous
        # attempt and fail to connect (seen with gloo on torch 2.13).
        store, _, _ = next(torch_dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        torch_dist.init_process_group("nccl" if use_cuda else "gloo", store=torch_dist.PrefixStore(
            f"mujina/attempt_{attempt}", store), rank=rank, world_size=world, device_id=dev if use_cuda else None)
    return Dist(rank, world, local, dev)


def shutdown_distributed() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in backward instead of storing them (activation memory falls from
    O(L) blocks to about one, for about a third more compute). In place, from outside the model: the
    wrapper strips its own prefix from state-dict and parameter names, and forwards attribute access
    (`model.layers[i].feed_forward`), so checkpoints and the swarm's module views are unchanged."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    return model


def parallelize(model: nn.Module, dist: Dist, *, bf16: bool, activation_checkpointing: bool = False,
                compile: bool = False) -> nn.Module:
    """Apply activation checkpointing, compilation and (when distributed) FSDP2 to a Transformer in place.

    bf16 (distributed only): parameters are all-gathered and computed in bf16, gradients reduced in
    fp32, master weights and optimizer state stay fp32 and sharded. The single-process path uses
    autocast instead (model/train.py), which rounds the same matmuls."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        for block in model.layers:
            block.compile()  # per block, in place: parameter names keep no _orig_mod prefix
    if dist.distributed:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kw = {"mp_policy": mp} if mp is not None else {}
        for i, block in enumerate(model.layers):
            # The last block's parameters are needed again at once by backward: keep them gathered.
            fully_shard(block, reshard_after_forward=i < len(model.layers) - 1, **kw)
        fully_shard(model, **kw)  # embeddings, final norm and output head
    return model


# ---- figures ---------------------------------------------------------------------------------------

def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·d·S (the PaLM / torchtitan convention).

    N counts the parameters a token passes through, so for a MoE only the top-k experts' (the
    config's active count), and not the input embedding table, which is a lookup, not a matmul. The
    second term is attention's score and value matmuls, forward and backward, over S positions."""
    n = cfg.num_active_params()
    if not cfg.tie_word_embeddings:
        n -= cfg.vocab_size * cfg.hidden_size
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


# Dense bf16 tensor-core peak per device (no sparsity), FLOP/s, from the vendors' data sheets.
# Matched against torch.cuda.get_device_name() in order: the first key contained in the name wins.
PEAK_BF16_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("A6000", 155e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12),
    ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12), ("MI300X", 1307e12), ("MI250X", 383e12),
]


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override when given, else the table; None when unknown (CPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    log.warning("no peak-FLOPS entry for %r: MFU is not reported; set train.peak_tflops", name)
    return None


def device_memory(device: torch.device) -> int:
    """Bytes one process may use: the GPU's total memory, or the host's available memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_estimate(cfg: ModelConfig, *, world_size: int, micro_batch: int, seq_len: int, bf16: bool,
                    activation_checkpointing: bool, processes_per_device: int = 1) -> dict[str, float]:
    """Bytes per process of the training state, a lower bound used to refuse runs that cannot fit.

    fp32 weights, gradients and two AdamW moments: 16 bytes per parameter, sharded over the world
    (FSDP); plus one block's gathered parameters; activations from Korthikanti et al. (2022),
    34·S·b·d bytes per layer at 16-bit, doubled in fp32: their formula without the 5·a·S²·b term of
    the stored attention scores, which the fused SDPA kernels never materialise (with it, a 1.2B model
    at 8 x 2048 tokens was refused on an 80 GB H100 for 57 GiB of activations it does not use); only
    each block's input with activation checkpointing; and the logits with their gradient in fp32."""
    n = cfg.num_params()
    state = 16.0 * n / world_size
    block = (n - 2 * cfg.vocab_size * cfg.hidden_size) / max(cfg.num_layers, 1) * (2 if bf16 else 4)
    tokens = micro_batch * seq_len
    act_bytes = 1.0 if bf16 else 2.0
    if activation_checkpointing:
        acts = cfg.num_layers * tokens * cfg.hidden_size * 2 * act_bytes
    else:
        acts = cfg.num_layers * tokens * cfg.hidden_size * 34 * act_bytes
    logits = 3 * tokens * cfg.vocab_size * 4.0
    total = (state + block + acts + logits) * processes_per_device
    return {"state": state, "activations": acts, "logits": logits, "total": total}
