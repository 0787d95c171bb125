"""The one training step (model/step.py) and activation checkpointing applied from outside the model."""

from __future__ import annotations

import torch

from model.parallel import apply_activation_checkpointing
from tests.conftest import tiny_model


def test_activation_checkpointing_gives_the_same_gradients():
    plain, ckpt = tiny_model(), tiny_model()
    apply_activation_checkpointing(ckpt)
    ids = torch.randint(0, 64, (2, 16))
    for net in (plain, ckpt):
        logits, aux = net(ids, return_aux=True)
        (logits.square().mean() + aux.loss(net.cfg)).backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)
