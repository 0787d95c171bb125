"""Preference objectives on the project's logits: DPO (SFT is next-token loss on masked labels: model/step.py).

    logps_B, n_B = completion_logps(logits_BTV, input_ids_BT, completion_mask_BT)
    loss, stats = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)

Conventions, as trl's DPOTrainer has them (so its numbers and ours compare one to one):
- `completion_mask_BT` is 1 on the tokens the model is judged on (the answer), 0 on the prompt and
  padding; the logit at t predicts token t+1, so token t+1 counts when mask[t+1] == 1.
- A sequence's log-probability is the *sum* over its completion tokens.
- DPO's sigmoid loss on Δ = (π_c − π_r) − (ref_c − ref_r): −log σ(βΔ); with `label_smoothing` ε the
  conservative form −(1−ε) log σ(βΔ) − ε log σ(−βΔ) (cDPO; trl's older `sigmoid` loss). With
  `nll_weight` > 0, the mean NLL of the chosen completions' tokens is added (trl's `sft` loss term,
  RPO's alpha): it keeps DPO from pushing the chosen answer's likelihood down along with the rejected.
- Rewards are β · (policy − reference) log-ratios, detached: `rewards/chosen`, `rewards/rejected`,
  `rewards/accuracies` (share of pairs with chosen > rejected), `rewards/margins`, `logps/chosen`,
  `logps/rejected` — trl's metric names.

Shape legend: B sequences, T positions, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_logps(logits_BTV: Tensor, input_ids_BT: Tensor) -> Tensor:
    """log p(token t+1 | ..t) for t < T−1: (B, T−1), in fp32 (log-softmax over a bf16 vocabulary loses the
    small differences DPO is made of)."""
    logp_BTV = logits_BTV[:, :-1].float().log_softmax(dim=-1)  # (B, T-1, V)
    return logp_BTV.gather(-1, input_ids_BT[:, 1:, None]).squeeze(-1)


def completion_logps(logits_BTV: Tensor, input_ids_BT: Tensor, completion_mask_BT: Tensor) -> tuple[Tensor, Tensor]:
    """(summed log-probability of each sequence's completion (B,), its number of completion tokens (B,))."""
    mask_BT = completion_mask_BT[:, 1:].to(torch.float32)  # shifted: the tokens being predicted
    return (token_logps(logits_BTV, input_ids_BT) * mask_BT).sum(-1), mask_BT.sum(-1)


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_nll: Tensor | None = None,
    nll_weight: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """DPO's sigmoid loss, mean over pairs, and trl's metrics. All log-probs are (B,) completion sums;
    `chosen_nll` is the chosen completions' mean token NLL (a scalar), needed when nll_weight > 0."""
    if beta <= 0:
        raise ValueError(f"finetune.beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"finetune.label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio_B = chosen_logps - ref_chosen_logps
    rejected_ratio_B = rejected_logps - ref_rejected_logps
    delta_B = chosen_ratio_B - rejected_ratio_B
    per_pair_B = -(1 - label_smoothing) * F.logsigmoid(beta * delta_B) - label_smoothing * F.logsigmoid(-beta * delta_B)
    loss = per_pair_B.mean()
    if nll_weight:
        if chosen_nll is None:
            raise ValueError("nll_weight > 0 needs chosen_nll (the chosen completions' mean token NLL)")
        loss = loss + nll_weight * chosen_nll
    chosen_rewards_B = beta * chosen_ratio_B.detach()
    rejected_rewards_B = beta * rejected_ratio_B.detach()
    stats = {
        "rewards/chosen": chosen_rewards_B.mean().item(),
        "rewards/rejected": rejected_rewards_B.mean().item(),
        "rewards/accuracies": (chosen_rewards_B > rejected_rewards_B).float().mean().item(),
        "rewards/margins": (chosen_rewards_B - rejected_rewards_B).mean().item(),
        "logps/chosen": chosen_logps.detach().mean().item(),
        "logps/rejected": rejected_logps.detach().mean().item(),
    }
    return loss, stats


def chosen_mean_nll(logits_BTV: Tensor, input_ids_BT: Tensor, completion_mask_BT: Tensor) -> Tensor:
    """Mean NLL over every completion token of the batch (trl's `sft` loss term): pass the chosen half only."""
    mask_BT = completion_mask_BT[:, 1:].bool()
    return -token_logps(logits_BTV, input_ids_BT)[mask_BT].mean()
