"""The network's own invariants: MoE fast path vs a token-by-token reference, expert masks,
packed sequences equal separate documents, and causality."""

import pytest
import torch

from model import ModelConfig, Transformer
from model.moe import reference_moe


def test_moe_matches_token_by_token_reference(tiny_moe_cfg):
    torch.manual_seed(0)
    moe = Transformer(tiny_moe_cfg).layers[0].feed_forward
    x = torch.randn(37, tiny_moe_cfg.hidden_size)
    y, stats = moe(x)
    torch.testing.assert_close(y, reference_moe(moe, x), rtol=0, atol=1e-6)
    assert int(stats.tokens_per_expert_E.sum()) == 37 * 2


def test_active_experts_restrict_routing_and_gradients(tiny_moe_cfg):
    torch.manual_seed(0)
    net = Transformer(tiny_moe_cfg)
    ids = torch.randint(0, tiny_moe_cfg.vocab_size, (2, 16))
    active = torch.tensor([True, False, True, False])
    logits, aux = net(ids, active_experts=active, return_aux=True)
    assert aux.tokens_per_expert_LE[:, ~active].sum() == 0
    assert (aux.tokens_per_expert_LE[:, active].sum(-1) == 2 * 16 * 2).all()
    logits.sum().backward()
    for layer in net.layers:
        g = layer.feed_forward.w1_EFD.grad
        assert g[~active].abs().sum() == 0 and g[active].abs().sum() > 0
    moe = net.layers[0].feed_forward
    x = torch.randn(9, tiny_moe_cfg.hidden_size)
    torch.testing.assert_close(moe(x, active)[0], reference_moe(moe, x, active), rtol=0, atol=1e-6)


def test_active_experts_per_layer_and_validation(tiny_moe_cfg):
    net = Transformer(tiny_moe_cfg)
    ids = torch.randint(0, tiny_moe_cfg.vocab_size, (1, 8))
    per_layer = torch.tensor([[True, True, False, False], [False, False, True, True]])
    _, aux = net(ids, active_experts=per_layer, return_aux=True)
    assert aux.tokens_per_expert_LE[0, 2:].sum() == 0 and aux.tokens_per_expert_LE[1, :2].sum() == 0
    with pytest.raises(ValueError, match="top_k=2"):
        net(ids, active_experts=torch.tensor([True, False, False, False]))
    with pytest.raises(ValueError, match="shape"):
        net(ids, active_experts=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="dense"):
        Transformer(ModelConfig.from_preset("debug"))(ids, active_experts=torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("moe", [None, {"num_experts": 4, "top_k": 2}])
def test_packed_documents_equal_separate_documents(moe):
    # Reference: each document run on its own. Packed, with doc_ids, the logits must be the same:
    # attention never crosses a boundary and positions restart at every document.
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"preset": "debug", "moe": moe})
    net = Transformer(cfg).eval()
    lengths = [5, 11, 1, 7]
    docs = [torch.randint(0, cfg.vocab_size, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        together = net(packed, doc_ids=doc_ids)
        apart = torch.cat([net(d) for d in docs], dim=1)
    torch.testing.assert_close(together, apart, rtol=0, atol=2e-5)


def test_causal_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug")
    net = Transformer(cfg).eval()
    a = torch.randint(0, cfg.vocab_size, (1, 20))
    b = a.clone()
    b[0, 12:] = (b[0, 12:] + 1) % cfg.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(net(a)[:, :12], net(b)[:, :12], rtol=0, atol=0)


def test_sequence_longer_than_max_seq_len_is_refused():
    cfg = ModelConfig.from_dict({"preset": "debug", "max_seq_len": 8})
    with pytest.raises(ValueError, match="max_seq_len=8"):
        Transformer(cfg)(torch.zeros(1, 9, dtype=torch.long))


def test_meta_device_init_gives_a_working_model():
    cfg = ModelConfig.from_preset("debug")
    with torch.device("meta"):
        net = Transformer(cfg)
    net.to_empty(device="cpu")
    net.init_weights(torch.Generator().manual_seed(0))
    out = net(torch.randint(0, cfg.vocab_size, (1, 4)))
    assert torch.isfinite(out).all()


def test_grouped_gemm_and_loop_experts_agree_in_forward_and_backward():
    # Two implementations of the expert computation (grouped GEMM where torch has it, a loop otherwise):
    # outputs and all gradients must agree, including experts that receive no token.
    from model.moe import _experts_grouped, _experts_loop

    torch.manual_seed(0)
    E, F_, D = 5, 24, 16
    counts = torch.tensor([7, 0, 3, 11, 1])
    results = []
    for fn in (_experts_grouped, _experts_loop):
        torch.manual_seed(1)
        x = torch.randn(int(counts.sum()), D, requires_grad=True)
        ws = [torch.randn(E, F_, D, requires_grad=True), torch.randn(E, F_, D, requires_grad=True),
              torch.randn(E, D, F_, requires_grad=True)]
        y = fn(x, counts, *ws)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y.detach(), x.grad, *(w.grad for w in ws)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert results[0][2][1].abs().sum() == 0  # the expert with no tokens gets a zero gradient
