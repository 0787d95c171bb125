"""DPO (model/objectives.py) against hand-computed values and a token-by-token reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.objectives import chosen_mean_nll, completion_logps, dpo_loss


def test_completion_logps_sum_the_completion_tokens_token_by_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    ids = torch.randint(0, 11, (3, 7), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1]])
    logps, n = completion_logps(logits, ids, mask)
    for b in range(3):
        want = sum(torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]].item() for t in range(1, 7) if mask[b, t])
        assert logps[b].item() == pytest.approx(want, abs=1e-5)
    assert n.tolist() == [3.0, 6.0, 1.0]
    want = -sum(torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]].item()
                for b in range(3) for t in range(1, 7) if mask[b, t]) / 10
    assert chosen_mean_nll(logits, ids, mask).item() == pytest.approx(want, abs=1e-5)


def test_dpo_at_the_reference_is_ln2_and_matches_the_hand_computed_loss_and_metrics():
    lp = torch.tensor([-5.0, -7.5], dtype=torch.float64)
    loss, stats = dpo_loss(lp, lp - 1.0, lp, lp - 1.0, beta=0.1)
    assert abs(loss.item() - math.log(2)) < 1e-12  # policy == reference: Δ = 0
    assert stats["rewards/margins"] == 0.0 and stats["rewards/accuracies"] == 0.0
    # hand-computed: Δ = (c - rc) - (r - rr) per pair, loss = mean(-log σ(βΔ))
    c, r = torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -7.0])
    rc, rr = torch.tensor([-5.0, -8.0]), torch.tensor([-5.5, -7.5])
    beta = 0.5
    d = [(-4 + 5) - (-6 + 5.5), (-9 + 8) - (-7 + 7.5)]  # [1.5, -1.5]
    want = sum(math.log1p(math.exp(-beta * x)) for x in d) / 2
    loss, stats = dpo_loss(c, r, rc, rr, beta=beta)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert stats["rewards/chosen"] == pytest.approx(beta * (1.0 + -1.0) / 2)
    assert stats["rewards/rejected"] == pytest.approx(beta * (-0.5 + 0.5) / 2)
    assert stats["rewards/accuracies"] == 0.5 and stats["rewards/margins"] == pytest.approx(0.0)
    assert stats["logps/chosen"] == pytest.approx(-6.5) and stats["logps/rejected"] == pytest.approx(-6.5)
    # conservative DPO and the NLL term
    eps = 0.1
    want_cdpo = sum((1 - eps) * math.log1p(math.exp(-beta * x)) + eps * math.log1p(math.exp(beta * x)) for x in d) / 2
    assert dpo_loss(c, r, rc, rr, beta, label_smoothing=eps)[0].item() == pytest.approx(want_cdpo, abs=1e-6)
    nll = torch.tensor(2.0)
    assert dpo_loss(c, r, rc, rr, beta, chosen_nll=nll, nll_weight=0.5)[0].item() == pytest.approx(want + 1.0, abs=1e-6)


def test_dpo_gradients_raise_chosen_and_lower_rejected():
    c = torch.tensor([-5.0], requires_grad=True)
    r = torch.tensor([-5.0], requires_grad=True)
    loss, _ = dpo_loss(c, r, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1)
    loss.backward()
    assert c.grad.item() == pytest.approx(-0.05) and r.grad.item() == pytest.approx(0.05)  # -β σ(0), +β σ(0)
    assert F.logsigmoid(torch.tensor(0.0)).item() == pytest.approx(-math.log(2))


def test_bad_settings_name_the_field():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="finetune.beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="finetune.label_smoothing"):
        dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo_loss(x, x, x, x, beta=0.1, nll_weight=1.0)
