"""Projections onto sparsity sets, checked against slow obvious references."""

import math

import pytest
import torch

from ntp_ssl.errors import ConfigError
from ntp_ssl.protect.projections import (
    PROJECTIONS,
    channel_masks,
    n_pruned,
    project,
    project_channels,
    project_topk_global,
    project_topk_per_layer,
    project_with_masks,
    soft_threshold,
    topk_masks_per_layer,
)

SPARSITIES = [0.0, 0.3, 0.5, 0.9, 0.95]


def make_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "fc.weight": 0.1 * torch.randn(10, 16, generator=g),  # a smaller scale than conv
        "fc.bias": torch.randn(10, generator=g, dtype=torch.float64),
    }


# ----------------------------------------------------------------- slow references


def ref_prune_smallest(values, k):
    """Indices of the k smallest values; ties broken by earlier index first."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    return set(order[:k])


def ref_per_layer(weights, s):
    out = {}
    for name, w in weights.items():
        flat = w.reshape(-1).tolist()
        drop = ref_prune_smallest([abs(v) for v in flat], n_pruned(len(flat), s))
        out[name] = torch.tensor([0.0 if i in drop else v for i, v in enumerate(flat)], dtype=w.dtype).reshape(w.shape)
    return out


def ref_global(weights, s):
    entries = [(name, i, abs(v)) for name, w in weights.items() for i, v in enumerate(w.reshape(-1).tolist())]
    drop = ref_prune_smallest([e[2] for e in entries], n_pruned(len(entries), s))
    dropped = {(entries[j][0], entries[j][1]) for j in drop}
    out = {}
    for name, w in weights.items():
        flat = w.reshape(-1).tolist()
        out[name] = torch.tensor([0.0 if (name, i) in dropped else v for i, v in enumerate(flat)], dtype=w.dtype).reshape(w.shape)
    return out


def ref_channels(weights, s):
    out = {}
    for name, w in weights.items():
        norms = [math.sqrt(sum(v * v for v in w[c].reshape(-1).tolist())) for c in range(w.shape[0])]
        drop = ref_prune_smallest(norms, n_pruned(w.shape[0], s))
        out[name] = torch.stack([torch.zeros_like(w[c]) if c in drop else w[c] for c in range(w.shape[0])])
    return out


# ------------------------------------------------------------------------- n_pruned


def test_n_pruned_rounds_half_up_and_keeps_one():
    assert n_pruned(10, 0.25) == 3  # 2.5 -> 3
    assert n_pruned(10, 0.24) == 2
    assert n_pruned(100, 0.95) == 95
    assert n_pruned(20, 0.95) == 19
    assert n_pruned(7, 0.0) == 0
    assert n_pruned(0, 0.5) == 0
    assert n_pruned(1, 0.9) == 0  # never the whole tensor
    assert n_pruned(3, 0.99) == 2


# ----------------------------------------------------------------- exact projections


@pytest.mark.parametrize("s", SPARSITIES)
def test_per_layer_matches_reference_and_exact_count(s):
    w = make_weights()
    out = project_topk_per_layer(w, s)
    ref = ref_per_layer(w, s)
    for name in w:
        assert out[name].shape == w[name].shape and out[name].dtype == w[name].dtype
        assert torch.equal(out[name], ref[name])
        assert int((out[name] == 0).sum()) == n_pruned(w[name].numel(), s)


@pytest.mark.parametrize("s", SPARSITIES)
def test_global_matches_reference_and_exact_total(s):
    w = make_weights()
    out = project_topk_global(w, s)
    ref = ref_global(w, s)
    total = sum(t.numel() for t in w.values())
    assert sum(int((t == 0).sum()) for t in out.values()) == n_pruned(total, s)
    for name in w:
        assert out[name].dtype == w[name].dtype
        assert torch.equal(out[name], ref[name])


def test_global_uses_one_threshold_across_tensors():
    w = make_weights()
    out = project_topk_global(w, 0.5)
    kept = torch.cat([w[n].abs().reshape(-1).double()[out[n].reshape(-1) != 0] for n in w])
    dropped = torch.cat([w[n].abs().reshape(-1).double()[out[n].reshape(-1) == 0] for n in w])
    assert kept.min() >= dropped.max()
    # the small-scale layer loses more than half, the large-scale conv less than half
    assert (out["fc.weight"] == 0).float().mean() > 0.5 > (out["conv.weight"] == 0).float().mean()


@pytest.mark.parametrize("s", SPARSITIES)
def test_channels_prune_whole_filters_exact_count(s):
    w = make_weights()
    out = project_channels(w, s)
    ref = ref_channels(w, s)
    for name in w:
        assert torch.equal(out[name], ref[name])
        rows = out[name].reshape(w[name].shape[0], -1)
        zero_rows = ~(rows != 0).any(dim=1)
        assert int(zero_rows.sum()) == n_pruned(w[name].shape[0], s)
        # surviving filters are untouched
        assert torch.equal(rows[~zero_rows], w[name].reshape(w[name].shape[0], -1)[~zero_rows])


@pytest.mark.parametrize("kind", ["layer", "global", "channel"])
@pytest.mark.parametrize("s", [0.3, 0.9])
def test_exact_projections_idempotent(kind, s):
    w = make_weights(1)
    once = project(w, kind, sparsity=s)
    twice = project(once, kind, sparsity=s)
    for name in w:
        assert torch.equal(once[name], twice[name])


def test_projection_does_not_modify_input_and_pruned_are_positive_zero():
    w = make_weights()
    copy = {n: t.clone() for n, t in w.items()}
    out = project_topk_per_layer(w, 0.5)
    for n in w:
        assert torch.equal(w[n], copy[n])
        zeros = out[n][out[n] == 0]
        assert not torch.signbit(zeros).any()


def test_ties_are_deterministic_and_exact():
    w = {"a": torch.ones(10), "b": torch.ones(4, 5)}
    out = project_topk_per_layer(w, 0.5)
    assert int((out["a"] == 0).sum()) == 5 and int((out["b"] == 0).sum()) == 10
    # earlier entries are pruned first on ties
    assert torch.equal(out["a"], torch.tensor([0.0] * 5 + [1.0] * 5))
    g = project_topk_global(w, 0.5)
    assert sum(int((t == 0).sum()) for t in g.values()) == 15
    assert torch.equal(g["a"], torch.zeros(10)) and int((g["b"] == 0).sum()) == 5
    c = project_channels({"w": torch.ones(6, 2)}, 0.5)
    assert torch.equal(c["w"][:3], torch.zeros(3, 2)) and torch.equal(c["w"][3:], torch.ones(3, 2))


def test_masks_exact_even_when_kept_values_are_zero():
    w = {"a": torch.tensor([0.0, 0.0, 0.0, 3.0, -2.0, 1.0, 0.5, 0.1])}
    masks = topk_masks_per_layer(w, 0.25)
    assert int(masks["a"].sum()) == 6  # two dropped even though more than two values are zero
    proj, m2 = project_with_masks(w, "layer", sparsity=0.25)
    assert torch.equal(m2["a"], masks["a"])
    assert torch.equal(proj["a"], w["a"])


def test_channel_masks_on_vectors_and_linear():
    m = channel_masks({"v": torch.tensor([3.0, -1.0, 2.0, 0.5])}, 0.5)["v"]
    assert m.tolist() == [True, False, True, False]
    lin = torch.tensor([[1.0, 1.0], [0.1, 0.1], [-3.0, 0.0]])
    out = project_channels({"fc": lin}, 0.34)["fc"]  # round(1.02) = 1 row
    assert torch.equal(out, torch.tensor([[1.0, 1.0], [0.0, 0.0], [-3.0, 0.0]]))


# ------------------------------------------------------------------------------ soft


def test_soft_threshold_equals_formula_elementwise():
    w = make_weights()
    delta = 0.7
    out = soft_threshold(w, delta)
    for name, t in w.items():
        expected = [math.copysign(max(abs(v) - delta, 0.0), v) if abs(v) > delta else 0.0 for v in t.reshape(-1).tolist()]
        assert out[name].dtype == t.dtype
        assert torch.allclose(out[name].reshape(-1), torch.tensor(expected, dtype=t.dtype), atol=1e-6, rtol=0)
    assert torch.equal(project(w, "soft", sparsity=0.5, delta=delta)["conv.weight"], out["conv.weight"])
    _, masks = project_with_masks(w, "soft", sparsity=0.5, delta=delta)
    for name in w:
        assert torch.equal(masks[name], out[name] != 0)


def test_soft_threshold_keeps_autograd():
    v = torch.tensor([-2.0, 0.3, 1.5], requires_grad=True)
    soft_threshold({"v": v}, 0.5)["v"].sum().backward()
    assert v.grad.tolist() == [1.0, 0.0, 1.0]


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True, None])
def test_bad_sparsity_raises_config_error(bad):
    w = make_weights()
    with pytest.raises(ConfigError, match="sparsity"):
        project(w, "layer", sparsity=bad)
    for fn in (project_topk_per_layer, project_topk_global, project_channels):
        with pytest.raises(ConfigError):
            fn(w, bad)


def test_bad_kind_and_delta_raise_config_error():
    w = make_weights()
    with pytest.raises(ConfigError, match="'topk'.*channel, global, layer, random, soft"):
        project(w, "topk", sparsity=0.5)
    with pytest.raises(ConfigError, match="delta"):
        project(w, "soft", sparsity=0.5)
    with pytest.raises(ConfigError, match="delta"):
        soft_threshold(w, -1.0)
    assert set(PROJECTIONS) == {"layer", "global", "channel", "soft", "random"}


def test_error_messages_are_one_line():
    with pytest.raises(ConfigError) as info:
        project({}, "bogus", sparsity=0.5)
    assert "\n" not in str(info.value)


def test_the_random_mask_control_keeps_the_exact_count_whatever_the_values():
    from ntp_ssl.protect.projections import project_random, random_masks_per_layer

    w = make_weights()
    masks = random_masks_per_layer(w, 0.7)
    for name, t in w.items():
        assert int((~masks[name]).sum()) == n_pruned(t.numel(), 0.7)
    # independent of the values: scaling or permuting them does not move the mask
    assert all(torch.equal(masks[k], m) for k, m in random_masks_per_layer({k: -3 * t for k, t in w.items()}, 0.7).items())
    assert all(torch.equal(masks[k], m) for k, m in random_masks_per_layer(w, 0.7).items())  # same name, same mask
    magnitude = topk_masks_per_layer(w, 0.7)
    assert any(not torch.equal(masks[k], magnitude[k]) for k in w)
    projected = project_random(w, 0.7)
    assert all(torch.equal(projected[k], w[k] * masks[k]) for k in w)


def test_a_random_seed_draws_an_independent_random_mask_with_the_same_count():
    from ntp_ssl.protect.projections import project_with_masks, random_masks_per_layer

    w = make_weights()
    by_name = random_masks_per_layer(w, 0.7)
    seeded = {seed: random_masks_per_layer(w, 0.7, seed) for seed in (0, 1)}
    for name, t in w.items():
        for masks in seeded.values():
            assert int((~masks[name]).sum()) == n_pruned(t.numel(), 0.7)
    # a seed gives another draw than the name alone and than another seed, and the same draw twice
    big = [k for k, t in w.items() if t.numel() >= 20]
    assert big
    for k in big:
        assert not torch.equal(seeded[0][k], by_name[k])
        assert not torch.equal(seeded[0][k], seeded[1][k])
        assert torch.equal(seeded[1][k], random_masks_per_layer(w, 0.7, 1)[k])
    projected, masks = project_with_masks(w, "random", sparsity=0.7, random_seed=1)
    assert all(torch.equal(masks[k], seeded[1][k]) and torch.equal(projected[k], w[k] * masks[k]) for k in w)


def test_project_takes_the_random_seed_as_project_with_masks_does():
    from ntp_ssl.protect.projections import project, project_with_masks

    w = make_weights()
    for seed in (None, 1):
        projected = project(w, "random", sparsity=0.7, random_seed=seed)
        expected, _ = project_with_masks(w, "random", sparsity=0.7, random_seed=seed)
        assert all(torch.equal(projected[k], expected[k]) for k in w)
    assert any(not torch.equal(project(w, "random", sparsity=0.7, random_seed=1)[k],
                               project(w, "random", sparsity=0.7)[k]) for k in w)
