"""swarm/robust.py's CenteredClip without the network: the weighted mean where it must be, the bound on what
one liar moves, bit-identical results whatever the order of the inputs, and the weights it refuses.
The reference is the plain (weighted) mean of the Δs, worked out here with torch."""

from __future__ import annotations

import itertools

import pytest
import torch

from swarm.robust import centered_clip

SIZE = 2000


def honest_deltas(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Δs of honest holders: one direction they share, each with its own noise (as in tests/swarm/test_attacks.py)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SIZE, generator=g)
    return [base + 0.5 * torch.randn(SIZE, generator=g) for _ in range(n)]


@pytest.mark.parametrize("n", [1, 2])
def test_fewer_than_three_contributions_are_the_weighted_mean(n):
    """Nothing to clip against (two holders cannot out-vote a liar): the ticket-weighted mean, τ 0, nobody clipped,
    however far apart the Δs are."""
    deltas = {"a": torch.arange(1.0, 6.0), "b": torch.arange(1.0, 6.0) * -200}
    weights = {"a": 1.0, "b": 3.0}
    picked = dict(list(deltas.items())[:n])
    agg = centered_clip(picked, weights)
    W = sum(weights[p] for p in picked)
    expected = sum(weights[p] * d for p, d in picked.items()) / W
    torch.testing.assert_close(agg.value, expected, rtol=0, atol=1e-4)
    assert agg.tau == 0.0 and agg.clipped == {}


def test_equal_weight_deltas_scattered_alike_are_exactly_their_mean():
    """Four Δs at the same distance from their centre (base ± a, base ± b, a ⟂ b, ‖a‖ = ‖b‖), in values that
    add exactly: the coordinate-wise median is the centre, τ is that distance, nobody is clipped, and the
    aggregate is their mean bit for bit."""
    g = torch.Generator().manual_seed(0)
    base = torch.round(torch.randn(SIZE, generator=g) * 256) / 256          # dyadic: sums below are exact
    signs = torch.randint(0, 2, (SIZE,), generator=g).float() * 2 - 1
    half = torch.arange(SIZE) < SIZE // 2
    a, b = 0.5 * signs * half, 0.5 * signs * ~half                          # disjoint supports: a ⟂ b
    deltas = {"p0": base + a, "p1": base - a, "p2": base + b, "p3": base - b}
    agg = centered_clip(deltas, dict.fromkeys(deltas, 2.0))
    mean = sum(deltas.values()) / 4
    assert torch.equal(mean, base)  # the reference itself is exact
    assert torch.equal(agg.value, mean)
    assert agg.clipped == {} and agg.tau == pytest.approx(float(a.norm()))


def test_a_radius_that_clips_nobody_gives_the_weighted_mean():
    """Four honest Δs of unequal weights and a clip_factor far above their spread: no Δ is clipped, so the first
    iteration lands on the weighted mean and the others stay there (the update is a weighted mean of the
    differences). With clip_factor 1 the farther half of honest Δs is clipped in the first iteration and,
    with unequal weights, the result stays between the coordinate-wise median and this mean."""
    deltas = dict(zip(["p0", "p1", "p2", "p3"], honest_deltas(4, seed=1), strict=True))
    weights = {"p0": 1.0, "p1": 2.0, "p2": 3.0, "p3": 4.0}
    agg = centered_clip(deltas, weights, clip_factor=100.0)
    expected = sum(weights[p] * d for p, d in deltas.items()) / sum(weights.values())
    assert agg.clipped == {}
    torch.testing.assert_close(agg.value, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("liar_weight", [1.0, 2.0])
@pytest.mark.parametrize("attack", ["reversed", "scaled", "huge"])
def test_one_liar_among_four_moves_the_result_at_most_its_share_of_the_radius(attack, liar_weight):
    """Three honest holders of weight 1 and a liar of weight w that sends −(honest mean) at an honest norm
    ("reversed"), 9x an honest Δ ("scaled") or 1e30 in every value ("huge"): each iteration moves the aggregate
    by at most (w / W) · τ on the liar's account, so it ends within clip_iters · (w / W) · τ of the honest mean,
    less than half as far as the plain weighted mean, and the liar is reported as clipped."""
    honest = honest_deltas(3)
    mean = sum(honest) / 3
    lie = {"reversed": -mean / mean.norm() * honest[0].norm(), "scaled": 9 * honest[0],
           "huge": torch.full((SIZE,), 1e30)}[attack]
    deltas = {"h0": honest[0], "h1": honest[1], "h2": honest[2], "liar": lie}
    weights = {"h0": 1.0, "h1": 1.0, "h2": 1.0, "liar": liar_weight}
    W = sum(weights.values())
    clip_factor, iters = 1.0, 3
    agg = centered_clip(deltas, weights, clip_factor, iters)
    plain = sum(weights[p] * d.double() for p, d in deltas.items()) / W
    err, plain_err = float((agg.value - mean).norm()), float((plain - mean.double()).norm())
    assert torch.isfinite(agg.value).all()
    assert err <= iters * (liar_weight / W) * agg.tau, (err, agg.tau)
    assert err < plain_err / 2, (err, plain_err)
    assert "liar" in agg.clipped


def test_the_result_does_not_depend_on_the_order_of_the_inputs():
    """Members build their dicts in the order Δs arrived; every order gives the same bits."""
    deltas = dict(zip(["12D3a", "12D3b", "12D3c", "12D3d"], honest_deltas(3, seed=2) + [9 * torch.ones(SIZE)],
                      strict=True))
    weights = {"12D3a": 1.0, "12D3b": 2.5, "12D3c": 1.0, "12D3d": 3.0}
    first = centered_clip(deltas, weights)
    for order in itertools.permutations(deltas):
        again = centered_clip({p: deltas[p] for p in order}, {p: weights[p] for p in reversed(order)})
        assert torch.equal(again.value, first.value) and again.tau == first.tau and again.clipped == first.clipped


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_a_weight_that_is_not_positive_is_refused(bad):
    deltas = {p: torch.ones(4) for p in ("a", "b", "c")}
    with pytest.raises(ValueError, match="weights must be > 0"):
        centered_clip(deltas, {"a": 1.0, "b": bad, "c": 1.0})
    with pytest.raises(ValueError, match="nothing to aggregate"):
        centered_clip({}, {})


def test_far_deltas_are_left_out_and_honest_ones_never():
    """exclude_factor 1.3: a reversed Δ of honest norm and a 9x one are left out (the aggregate is then the
    honest mean, exactly), two liars among five both, and honest Δs alone lose nobody."""
    honest = honest_deltas(5, seed=7)
    mean = sum(honest[:3]) / 3
    ids = [f"p{i}" for i in range(4)]
    for lie in (-mean / mean.norm() * honest[0].norm(), 9 * honest[0]):
        agg = centered_clip(dict(zip(ids, honest[:3] + [lie], strict=True)), dict.fromkeys(ids, 1.0),
                            exclude_factor=1.3)
        assert set(agg.excluded) == {"p3"} and agg.excluded["p3"] > 1.3
        torch.testing.assert_close(agg.value, mean, rtol=0, atol=1e-5)
    alone = centered_clip({f"h{i}": d for i, d in enumerate(honest)}, {f"h{i}": 1.0 for i in range(5)},
                          exclude_factor=1.3)
    assert alone.excluded == {}
    two = {f"h{i}": d for i, d in enumerate(honest[:3])} | {"x0": -honest[3], "x1": 9 * honest[4]}
    agg = centered_clip(two, dict.fromkeys(two, 1.0), exclude_factor=1.3)
    assert set(agg.excluded) == {"x0", "x1"}
    torch.testing.assert_close(agg.value, mean, rtol=0, atol=1e-5)


def test_a_zero_delta_is_not_left_out_it_dilutes_by_its_weight():
    """The residual risk the docstring names: a Δ of zeros is nearer the centre than honest Δs that agree little,
    so no distance rule leaves it out; it pulls the average towards no update by its weight's share."""
    g = torch.Generator().manual_seed(3)
    honest = [0.3 * torch.randn(SIZE, generator=g) + torch.randn(SIZE, generator=g) for _ in range(3)]
    ids = ["a", "b", "c", "z"]
    agg = centered_clip(dict(zip(ids, honest + [torch.zeros(SIZE)], strict=True)), dict.fromkeys(ids, 1.0),
                        exclude_factor=1.3)
    assert agg.excluded == {}
    mean = sum(honest) / 3
    assert float((agg.value - mean).norm()) <= 0.3 * float(mean.norm())   # about a quarter: its weight's share
