"""Module groups, the local model and the outer step, without the network."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.train import RunConfig, Trainer
from swarm.modules import check_assignment, held_modules, local_index
from swarm.outer import OuterState
from swarm.round import SwarmWorker
from swarm.settings import SwarmSettings
from swarm.tensors import (
    flatten,
    full_assignment,
    local_model,
    local_model_from_checkpoint,
    merge_into,
    module_tensors,
    unflatten_into,
)
from tests.swarm.conftest import inner, settings, tiny_model


def test_local_model_equals_full_model_with_masked_routing():
    """Holding experts {1, 3} is the full model with active_experts = {1, 3}: same logits, aux loss, counts."""
    full = tiny_model()
    ids = torch.randint(0, 64, (2, 16))
    mask = torch.tensor([False, True, False, True])
    logits_ref, aux_ref = full(ids, active_experts=mask, return_aux=True)
    local = local_model(full, {0: [1, 3]})
    logits, aux = local(ids, return_aux=True)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux.loss(local.cfg), aux_ref.loss(full.cfg), rtol=1e-5, atol=1e-6)
    assert aux.tokens_per_expert_LE[0].tolist() == aux_ref.tokens_per_expert_LE[0, [1, 3]].tolist()


def test_module_groups_cover_every_parameter_once_and_merge_back():
    full = tiny_model()
    a = full_assignment(full)
    modules = held_modules(a)
    assert modules == ["trunk", "l0e0", "l0e1", "l0e2", "l0e3"]
    total = sum(flatten(module_tensors(full, m)).numel() for m in modules)
    assert total == sum(p.numel() for p in full.parameters())
    # expert 2's group is its w1/w3/w2 slices and its router row
    ff = full.layers[0].feed_forward
    w = flatten(module_tensors(full, "l0e2"))
    assert torch.equal(w, torch.cat([ff.w1_EFD[2].flatten(), ff.w3_EFD[2].flatten(), ff.w2_EDF[2].flatten(),
                                     ff.router.weight[2]]))
    # a local model's expert (position 1 of {1, 3}) maps back to global expert 3
    local = local_model(full, {0: [1, 3]})
    flat = flatten(module_tensors(local, "l0e3", local_index({0: [1, 3]})))
    assert torch.equal(flat, flatten(module_tensors(full, "l0e3")))
    unflatten_into(torch.zeros_like(flat), module_tensors(local, "l0e3", local_index({0: [1, 3]})))
    other = tiny_model(seed=1)
    merge_into(other, local, {0: [1, 3]})
    assert torch.equal(other.layers[0].feed_forward.w1_EFD[3], torch.zeros(64, 32))
    assert torch.equal(other.layers[0].feed_forward.w1_EFD[1], full.layers[0].feed_forward.w1_EFD[1])
    assert torch.equal(other.tok_embeddings.weight, full.tok_embeddings.weight)


def test_bad_assignments_are_refused_with_the_fix():
    moe = tiny_model().cfg.moe
    with pytest.raises(ValueError, match="at least top_k"):
        check_assignment(moe, 1, {0: [1]})
    with pytest.raises(ValueError, match="every layer"):
        check_assignment(moe, 2, {0: [0, 1]})
    with pytest.raises(ValueError, match="distinct"):
        check_assignment(moe, 1, {0: [0, 7]})
    with pytest.raises(ValueError, match="dense"):
        check_assignment(None, 1, {0: [0, 1]})
    with pytest.raises(ValueError, match="compression"):
        settings(compression="int4")


@pytest.mark.parametrize("field, bad", [
    ("clip_factor", 0.0), ("clip_factor", -1.0), ("clip_factor", float("nan")),
    ("clip_iters", 0), ("clip_iters", 101), ("clip_iters", True),
    ("averaging_timeout", 0.0), ("averaging_timeout", -5.0), ("averaging_timeout", float("nan")),
])
def test_settings_out_of_range_are_refused_naming_the_field(field, bad):
    """CenteredClip needs a radius > 0 and 1 to 100 iterations (swarm/robust.py); a member waits > 0 s for the
    others' Δs. Each error names the field to fix."""
    with pytest.raises(ValueError, match=field):
        settings(**{field: bad})


def test_the_edges_of_the_valid_ranges_are_accepted():
    s = settings(clip_factor=1e-3, clip_iters=1, averaging_timeout=0.1)
    assert (s.clip_factor, s.clip_iters, s.averaging_timeout) == (1e-3, 1, 0.1)
    assert settings(clip_iters=100).clip_iters == 100
    assert (SwarmSettings(run="r").clip_factor, SwarmSettings(run="r").clip_iters) == (1.0, 3)  # the defaults


def test_outer_step_is_torch_nesterov_sgd():
    """Our outer step must agree with torch.optim.SGD(nesterov=True) fed Δ as the gradient, over 3 rounds."""
    model = tiny_model()
    state = OuterState(model, ["trunk"], {})
    ref = flatten(module_tensors(model, "trunk")).clone().requires_grad_(True)
    opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    for r in range(3):
        delta = torch.randn_like(ref) * 1e-3 * (r + 1)
        state.step("trunk", delta.clone(), lr=0.7, mu=0.9)
        ref.grad = delta.clone()
        opt.step()
        torch.testing.assert_close(state.theta["trunk"], ref.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(flatten(module_tensors(model, "trunk")), ref.detach(), rtol=0, atol=1e-6)


def test_one_worker_holding_everything_without_averaging_is_plain_local_training(tiny_checkpoint, tmp_path):
    """outer lr 1, momentum 0, averaging off: θ_start − Δ = θ_local, so one round of H inner steps must equal
    H steps of the reference trainer (model/train.py) on the same batches."""
    H = 4
    cfg = inner(inner_steps=H, total_steps=H, batch_size=4, micro_batch_size=2)
    cfg.optim = dataclasses.replace(cfg.optim, warmup_steps=2)
    w = SwarmWorker(tiny_checkpoint, {0: [0, 1, 2, 3]}, settings(averaging=False, outer_lr=1.0, outer_momentum=0.0),
                    cfg)
    metrics = w.run_round(0)
    run = RunConfig.from_dict({"init_from": str(tiny_checkpoint), "out": str(tmp_path / "ref"),
                               "data": {"source": "synthetic", "seq_len": 32},
                               "optim": dataclasses.asdict(cfg.optim),
                               "train": {"steps": H, "batch_size": 4, "micro_batch_size": 2, "seed": 0}})
    ref = Trainer(run)
    losses = [ref.train_step()["loss"] for _ in range(H)]
    assert metrics["loss_last"] == pytest.approx(losses[-1], rel=1e-5)
    assert metrics["modules_local"] == 5 and metrics["tokens"] == H * 4 * 32
    got, want = dict(w.model.named_parameters()), dict(ref.model.named_parameters())
    for name, p in want.items():
        torch.testing.assert_close(got[name], p, rtol=0, atol=1e-6, msg=name)


def test_a_worker_reads_only_its_slices_of_the_checkpoint(tiny_checkpoint):
    """local_model_from_checkpoint (safetensors slicing) builds exactly local_model(full checkpoint)."""
    from model.checkpoint import load_checkpoint

    a = {0: [3, 1]}
    want = local_model(load_checkpoint(tiny_checkpoint), a)
    got = local_model_from_checkpoint(tiny_checkpoint, a)
    for (n, p), (_, q) in zip(want.named_parameters(), got.named_parameters(), strict=True):
        assert torch.equal(p, q), n
