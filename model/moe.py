"""Mixture-of-Experts feed-forward block: router, stacked SwiGLU experts, auxiliary losses.

Shape legend (suffixes on tensor names):
    N  tokens in the batch (B*T flattened)      D  hidden size
    E  experts                                   F  expert intermediate size
    K  experts per token (top_k)                 S  routed token slots, N*K

Routing is softmax -> top-k -> renormalise the k weights to sum to one (the Mixtral
order). With that order, k identical experts reproduce the dense FFN exactly, which is
what makes upcycling lossless (model/upcycle.py).

`lora` (model/lora.py's ExpertLora, or None) adds per-expert low-rank updates inside the expert
computation: two thin grouped GEMMs per projection, never the (E, F, D) product.

`active_E` (bool, E) restricts routing to the experts a swarm worker holds: the others
get a router logit of -inf, so they are never chosen and receive no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


@dataclass
class RouterStats:
    """What one MoE layer reports besides its output. Losses are differentiable scalars."""

    balance_loss: Tensor  # load-balancing loss, 1.0 when routing is perfectly uniform
    z_loss: Tensor  # mean squared log-sum-exp of the router logits
    tokens_per_expert_E: Tensor  # token slots routed to each expert (detached, int64)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.moe is not None
        E, F_, D = cfg.moe.num_experts, cfg.intermediate_size, cfg.hidden_size
        self.num_experts, self.top_k = E, cfg.moe.top_k
        self.router = nn.Linear(D, E, bias=False)  # weight (E, D): row e belongs to expert e
        # Experts as stacked tensors: one parameter per projection, sliced per expert. The names
        # follow the legacy Mixtral keys (w1 gate, w3 up, w2 down), so export is a renaming.
        self.w1_EFD = nn.Parameter(torch.empty(E, F_, D))
        self.w3_EFD = nn.Parameter(torch.empty(E, F_, D))
        self.w2_EDF = nn.Parameter(torch.empty(E, D, F_))
        self.lora = None  # model/lora.py's ExpertLora once add_lora targets "experts"

    def route(self, x_ND: Tensor, active_E: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return (weights_NK, experts_NK, logits_NE, probs_NE). Softmax runs in fp32 as in Mixtral."""
        logits_NE = self.router(x_ND)
        if active_E is not None:
            logits_NE = logits_NE.masked_fill(~active_E, float("-inf"))
        probs_NE = logits_NE.float().softmax(dim=-1)
        weights_NK, experts_NK = probs_NE.topk(self.top_k, dim=-1)
        weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        return weights_NK, experts_NK, logits_NE, probs_NE

    def forward(self, x_ND: Tensor, active_E: Tensor | None = None) -> tuple[Tensor, RouterStats]:
        N, D = x_ND.shape
        E, K = self.num_experts, self.top_k
        weights_NK, experts_NK, logits_NE, probs_NE = self.route(x_ND, active_E)

        # Group the N*K token slots by expert so each expert runs one dense matmul on its tokens.
        experts_S = experts_NK.reshape(-1)
        order_S = experts_S.argsort(stable=True)  # slots sorted by expert
        token_S = order_S // K  # which token each sorted slot came from
        tokens_per_expert_E = torch.bincount(experts_S, minlength=E)
        x_SD = x_ND[token_S]
        lora = self.lora if self.lora is not None and self.lora.enabled else None
        y_SD = _experts(x_SD, tokens_per_expert_E, self.w1_EFD, self.w3_EFD, self.w2_EDF, lora)
        y_SD = y_SD * weights_NK.reshape(-1)[order_S, None].to(y_SD.dtype)
        y_ND = torch.zeros_like(x_ND).index_add_(0, token_S, y_SD.to(x_ND.dtype))

        # Auxiliary losses in fp32. Balance (Switch / Mixtral): E_active * sum_e f_e * P_e, where f_e is
        # the share of slots routed to e and P_e its mean router probability; 1.0 when uniform.
        n_active = E if active_E is None else active_E.sum()
        f_E = tokens_per_expert_E.float() / (N * K)
        balance = n_active * (f_E * probs_NE.mean(dim=0)).sum()
        z = torch.logsumexp(logits_NE.float(), dim=-1).pow(2).mean()
        return y_ND, RouterStats(balance, z, tokens_per_expert_E.detach())


def _experts_grouped(x_SD: Tensor, counts_E: Tensor, w1_EFD: Tensor, w3_EFD: Tensor, w2_EDF: Tensor,
                     lora=None) -> Tensor:
    """All experts in three grouped GEMMs (plus two thin ones per projection with LoRA): no per-expert
    Python loop and no host sync."""
    offs_E = counts_E.cumsum(0, dtype=torch.int32)  # end row of each expert's slots
    # grouped_mm is not autocast-aware: cast by hand to autocast's dtype, else run in the activations'. The
    # residual stream stays fp32 under autocast, so x_SD alone would run the experts in fp32: measured on an
    # H100, that doubled the experts' saved activations (benchmarks/gpu_memory.py).
    dev = x_SD.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x_SD.dtype
    x_SD = x_SD.to(dtype)
    w1, w3, w2 = (w.to(dtype).transpose(1, 2) for w in (w1_EFD, w3_EFD, w2_EDF))  # (E, in, out) views

    def project(x, w, i):
        y = F.grouped_mm(x, w, offs=offs_E)
        if lora is None:
            return y
        a_ErI, b_EOr = lora.factors()[i]
        # s * B_e (A_e x) on each expert's slots: (S, in) -> (S, r) -> (S, out)
        xa_Sr = F.grouped_mm(lora.dropout(x), a_ErI.to(dtype).transpose(1, 2), offs=offs_E)
        return y + lora.scaling * F.grouped_mm(xa_Sr, b_EOr.to(dtype).transpose(1, 2), offs=offs_E)

    h_SF = F.silu(project(x_SD, w1, 0)) * project(x_SD, w3, 1)
    return project(h_SF, w2, 2)


def _experts_loop(x_SD: Tensor, counts_E: Tensor, w1_EFD: Tensor, w3_EFD: Tensor, w2_EDF: Tensor,
                  lora=None) -> Tensor:
    """One matmul per expert: the fallback where grouped_mm is missing."""
    counts = counts_E.tolist()  # host sync: split sizes must be Python ints
    # unbind, not w[e]: autograd then stacks the E expert gradients once, instead of materialising a
    # full (E, F, D) zero gradient per expert (E^2 F D memory traffic; measured 1.9x slower backward).
    w1, w3, w2 = w1_EFD.unbind(0), w3_EFD.unbind(0), w2_EDF.unbind(0)
    ab = [tuple(t.unbind(0) for t in pair) for pair in lora.factors()] if lora is not None else None

    def project(x, w, i, e):
        y = x @ w[e].T
        if ab is None:
            return y
        a, b = ab[i]
        return y + lora.scaling * ((lora.dropout(x) @ a[e].T) @ b[e].T)

    outs = [x_SD.new_zeros(0, w2_EDF.shape[1])]
    for e, x_eD in enumerate(torch.split(x_SD, counts)):
        if counts[e]:
            outs.append(project(F.silu(project(x_eD, w1, 0, e)) * project(x_eD, w3, 1, e), w2, 2, e))
    return torch.cat(outs)


# Chosen once: torch >= 2.10 has grouped GEMM (CPU and CUDA); older versions loop over experts.
_experts = _experts_grouped if hasattr(F, "grouped_mm") else _experts_loop


def reference_moe(moe: MoE, x_ND: Tensor, active_E: Tensor | None = None) -> Tensor:
    """Token-by-token loop with no grouping tricks: the reference the fast path is tested against. An
    enabled LoRA enters as its dense update (E, F, D), computed here and nowhere in the fast path."""
    weights_NK, experts_NK, _, _ = moe.route(x_ND, active_E)
    w1, w3, w2 = moe.w1_EFD, moe.w3_EFD, moe.w2_EDF
    if moe.lora is not None and moe.lora.enabled:
        d1, d3, d2 = moe.lora.deltas()
        w1, w3, w2 = w1 + d1, w3 + d3, w2 + d2
    rows = []
    for n in range(x_ND.shape[0]):
        y = torch.zeros_like(x_ND[n])
        for w, e in zip(weights_NK[n].tolist(), experts_NK[n].tolist(), strict=True):
            h = F.silu(w1[e] @ x_ND[n]) * (w3[e] @ x_ND[n])
            y = y + w * (w2[e] @ h)
        rows.append(y)
    return torch.stack(rows)
