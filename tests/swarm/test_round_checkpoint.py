"""Round checkpoints and merging a round's uploads (swarm/round_checkpoint.py)."""

from __future__ import annotations

import torch

from swarm.round_checkpoint import merge_uploads


def test_merge_ignores_uploads_with_wrong_sizes_or_non_finite_values():
    from safetensors.torch import save

    from tests.conftest import tiny_model

    full = tiny_model()
    before = full.tok_embeddings.weight.clone()
    bad = save({"trunk.theta": torch.full((3,), float("nan")), "l0e0.theta": torch.full((10,), 1.0)})
    assert merge_uploads(full, {}, [bad]) == (set(), {})
    assert torch.equal(full.tok_embeddings.weight, before)
