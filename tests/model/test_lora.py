"""LoRA on the project's models (model/lora.py): each path against a reference that materialises the
dense update W + s B A, which the fast path never does."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from model import ModelConfig
from model.lora import LoraSpec, adapter_state_dict, adapters_disabled, add_lora, lora_modules, merge_lora
from model.moe import _experts_grouped, _experts_loop, reference_moe
from model.transformer import Transformer

DENSE = {"preset": "debug", "num_kv_heads": 2, "rope_theta": 5000.0}
MOE = {**DENSE, "moe": {"num_experts": 4, "top_k": 2}}


def model(cfg: dict, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_dict(cfg)).eval()


def with_random_adapters(net: Transformer, spec: LoraSpec, seed: int = 1) -> Transformer:
    """`net` with adapters whose B is random too (a fresh B is zero, which would hide every bug)."""
    g = torch.Generator().manual_seed(seed)
    add_lora(net, spec, generator=g)
    with torch.no_grad():
        for m in lora_modules(net):
            for name, p in m.named_parameters():
                if name != "weight" and "B" in name:
                    p.normal_(0.0, 0.05, generator=g)
    return net


def ids(vocab: int, seed: int = 2, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def dense_reference(base: Transformer, adapted: Transformer) -> Transformer:
    """A plain copy of `base` whose weights are W + s B A, computed by hand from `adapted`'s factors."""
    ref = copy.deepcopy(base)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, m in adapted.named_modules():
            if hasattr(m, "lora_A"):
                params[f"{name}.weight"] += m.scaling * m.lora_B @ m.lora_A
            elif hasattr(m, "w1_A_ErD"):
                owner = name.rsplit(".", 1)[0]
                for w, (a, b) in zip(("w1_EFD", "w3_EFD", "w2_EDF"), m.factors(), strict=True):
                    params[f"{owner}.{w}"] += m.scaling * torch.bmm(b, a)
    return ref


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_a_fresh_adapter_leaves_the_output_unchanged_and_only_adapters_train(cfg):
    base, net = model(cfg), model(cfg)
    params = add_lora(net, LoraSpec(r=4, alpha=8))
    x = ids(net.cfg.vocab_size)
    assert torch.equal(net(x), base(x))  # B = 0 exactly, as peft initialises it
    assert {id(p) for p in net.parameters() if p.requires_grad} == {id(p) for p in params}
    net(x).sum().backward()
    assert all(p.grad is None for p in net.parameters() if not p.requires_grad)
    b = [p for m in lora_modules(net) for n, p in m.named_parameters() if "B" in n]
    assert b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in b)  # A's waits for B to move


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("rslora", [False, True])
def test_adapted_logits_equal_the_materialised_update_and_the_exact_merge(cfg, rslora):
    spec = LoraSpec(r=4, alpha=8, rslora=rslora)
    net = with_random_adapters(model(cfg), spec)
    x = ids(net.cfg.vocab_size)
    ref = dense_reference(model(cfg), net)
    out = net(x)
    assert not torch.allclose(out, model(cfg)(x), atol=1e-3)  # the adapters do something
    torch.testing.assert_close(out, ref(x), rtol=0, atol=1e-5)
    with adapters_disabled(net):
        assert torch.equal(net(x), model(cfg)(x))  # the base model, bit for bit: DPO's reference
    assert torch.equal(net(x), out)  # and back on afterwards
    merge_lora(net)
    assert not list(lora_modules(net)) and not adapter_state_dict(net)
    torch.testing.assert_close(net(x), out, rtol=0, atol=1e-5)
    assert sorted(net.state_dict()) == sorted(model(cfg).state_dict())  # a plain checkpoint again


def test_expert_lora_in_the_grouped_path_equals_the_loop_and_the_token_by_token_reference():
    net = with_random_adapters(model(MOE), LoraSpec(r=4, alpha=8, targets=("experts",)))
    moe = net.layers[0].feed_forward
    x_ND = torch.randn(40, net.cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    y_ND, _ = moe(x_ND)
    torch.testing.assert_close(y_ND, reference_moe(moe, x_ND), rtol=0, atol=1e-5)
    counts = torch.tensor([5, 0, 9, 6])
    x_SD = x_ND[:20]
    args = (x_SD, counts, moe.w1_EFD, moe.w3_EFD, moe.w2_EDF, moe.lora)
    torch.testing.assert_close(_experts_grouped(*args), _experts_loop(*args), rtol=0, atol=1e-5)


def test_targets_scaling_and_spec_errors():
    spec = LoraSpec(r=4, alpha=8, targets=("wq", "wv"))
    assert spec.scaling == 2.0 and LoraSpec(r=4, alpha=8, rslora=True).scaling == 4.0
    net = model(MOE)
    add_lora(net, spec)
    names = sorted(adapter_state_dict(net))
    assert names[:2] == ["layers.0.attention.wq.lora_A", "layers.0.attention.wq.lora_B"]
    assert all(".wq." in n or ".wv." in n for n in names)
    assert net.layers[0].feed_forward.router.weight.requires_grad is False  # the router stays off by default
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(net, spec)
    with pytest.raises(ValueError, match="unknown: wz"):
        LoraSpec(targets=("wq", "wz"))
    with pytest.raises(ValueError, match="finetune.r"):
        LoraSpec(r=0)
    with pytest.raises(ValueError, match="matched no layer"):
        add_lora(model(DENSE), LoraSpec(targets=("router",)))


def test_the_init_of_a_is_pefts_kaiming_uniform():
    """peft initialises A with nn.init.kaiming_uniform_(a=sqrt(5)): uniform in +-1/sqrt(in_features)."""
    net = model(DENSE)
    add_lora(net, LoraSpec(r=64, targets=("wq",)))
    a = net.layers[0].attention.wq.lora_A
    bound = 1 / math.sqrt(a.shape[1])
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.05 * bound


def test_a_step_moves_only_the_adapters_and_lowers_the_loss():
    net = model(MOE).train()
    frozen = {k: v.clone() for k, v in net.state_dict().items()}
    params = add_lora(net, LoraSpec(r=4, alpha=8, dropout=0.1))
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = ids(net.cfg.vocab_size, shape=(4, 32))
    losses = []
    for _ in range(20):
        logits = net(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    state = net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # the base did not move


def dense_updates(net: Transformer) -> torch.Tensor:
    """Every adapter's s B A, flattened: the update the adapters add to the base (dense, for tests only)."""
    parts = []
    for m in lora_modules(net):  # in float64, so the comparison measures the averaging, not the rounding
        pairs = [(m.lora_A, m.lora_B)] if hasattr(m, "lora_A") else m.factors()
        parts += [(m.scaling * (b.double() @ a.double())).flatten() for a, b in pairs]
    return torch.cat(parts)


@pytest.mark.parametrize("round_", [0, 1])
def test_collaborative_lora_averaging_is_exact_when_one_factor_trains(round_):
    """Three workers start a round from the same adapters, train on their own data, and the trained factor is
    averaged with weights: the merged adapters' s B A equals the weighted mean of the workers' s B_i A_i.
    The control trains both factors and averages them separately, which is not exact."""
    from model.lora import round_factor, train_only

    def workers(factor: str) -> tuple[list[Transformer], Transformer]:
        start = with_random_adapters(model(MOE), LoraSpec(r=4, alpha=8))
        trained = []
        for i in range(3):
            net = copy.deepcopy(start).train()
            opt = torch.optim.SGD(train_only(net, factor), lr=0.5)
            x = ids(net.cfg.vocab_size, seed=10 + i, shape=(2, 16))
            for _ in range(3):
                loss = torch.nn.functional.cross_entropy(net(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
            trained.append(net)
        return trained, start

    w = [1 / 8, 2 / 8, 5 / 8]

    def averaged(trained: list[Transformer], start: Transformer) -> Transformer:
        out = copy.deepcopy(start)
        names = [n for n in adapter_state_dict(out)]
        state = {n: sum(wi * dict(t.named_parameters())[n].detach() for wi, t in zip(w, trained, strict=True))
                 for n in names}
        out.load_state_dict(state, strict=False)
        return out

    factor = round_factor(round_)
    assert factor == ("B" if round_ == 0 else "A")  # B first: A's gradient is zero while B is
    trained, start = workers(factor)
    want = sum(wi * dense_updates(t) for wi, t in zip(w, trained, strict=True))
    got = dense_updates(averaged(trained, start))
    assert not torch.allclose(want, dense_updates(start))  # the workers moved
    assert ((got - want).norm() / want.norm()).item() <= 1e-6
    trained, start = workers("both")  # control: naive A/B averaging
    want = sum(wi * dense_updates(t) for wi, t in zip(w, trained, strict=True))
    got = dense_updates(averaged(trained, start))
    assert ((got - want).norm() / want.norm()).item() > 1e-3


def test_average_adapters_is_exact_with_both_factors_trained():
    """Both factors train; average_adapters folds s (Σ w_i B_i A_i - B̄ Ā) into the base, so every adapted weight
    (base + s B A, the full effective weight) is the weighted mean of the members' (relative error <= 1e-6)."""
    from model.lora import average_adapters, train_only

    start = with_random_adapters(model(MOE), LoraSpec(r=4, alpha=8))
    members = []
    for i in range(3):
        net = copy.deepcopy(start).train()
        opt = torch.optim.SGD(train_only(net, "both"), lr=0.5)
        x = ids(net.cfg.vocab_size, seed=20 + i, shape=(2, 16))
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(net(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        members.append(net)
    w = [0.5, 0.3, 0.2]

    def effective(net):  # every adapted weight as the network uses it, in float64
        out = []
        for name, m in net.named_modules():
            if hasattr(m, "lora_A"):
                out.append(m.weight.double() + m.scaling * (m.lora_B.double() @ m.lora_A.double()))
            elif hasattr(m, "w1_A_ErD"):
                moe = dict(net.named_modules())[name.rsplit(".", 1)[0]]
                for base, (a, b) in zip((moe.w1_EFD, moe.w3_EFD, moe.w2_EDF), m.factors(), strict=True):
                    out.append(base.double() + m.scaling * (b.double() @ a.double()))
        return torch.cat([t.flatten() for t in out])

    want = sum(wi * effective(m) for wi, m in zip(w, members, strict=True))
    merged = copy.deepcopy(start)
    average_adapters(merged, members, w)
    got = effective(merged)
    moved = want - effective(start)
    assert moved.norm() > 0
    assert ((got - want).norm() / moved.norm()).item() <= 1e-6  # relative to the round's update
    plain = model(MOE)  # the averaged base (written by average_adapters) in a plain network ...
    base = {k: v for k, v in merged.state_dict().items() if k in plain.state_dict()}
    plain.load_state_dict(base)
    x = ids(merged.cfg.vocab_size, seed=5)
    with torch.no_grad():  # ... plus s B̄ Ā by hand: the network computes with the averaged weights
        torch.testing.assert_close(merged(x), dense_reference(plain, merged)(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="summing to 1"):
        average_adapters(merged, members, [0.5, 0.5, 0.5])
