"""ADMM pruning: parameter selection, conv/BN coupling, and the pruner on problems with known answers."""

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from ntp_ssl.errors import CheckpointError, ConfigError
from ntp_ssl.protect.admm import ADMMPruner, find_conv_bn_pairs, select_prunable
from ntp_ssl.protect.projections import n_pruned, project, soft_threshold

F64 = torch.float64


# ------------------------------------------------------------------ sparse recovery


def sparse_problem(kind, seed=0, m=45):
    """Underdetermined y = A w*: w* has 10 of 40 entries in "a" (8x5) and 5 of 20 in "b".

    For kind "channel" the 10 nonzeros of "a" fill 2 whole rows (filters). m < n, so the
    least-squares solution is not w*; only the sparsity constraint pins it down.
    """
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, 60, generator=g, dtype=F64) / m**0.5

    def values(k):
        return torch.randn(k, generator=g, dtype=F64).sign() * (1 + torch.rand(k, generator=g, dtype=F64))

    a, b = torch.zeros(8, 5, dtype=F64), torch.zeros(20, dtype=F64)
    if kind == "channel":
        a[[1, 6]] = values(10).reshape(2, 5)
    else:
        idx = torch.randperm(40, generator=g)[:10]
        a.view(-1)[idx] = values(10)
    idx = torch.randperm(20, generator=g)[:5]
    b[idx] = values(5)
    w_star = {"a": a, "b": b}
    return A, A @ torch.cat([a.reshape(-1), b]), w_star


def ls_loss(A, y, params):
    return 0.5 * (A @ torch.cat([params["a"].reshape(-1), params["b"]]) - y).pow(2).sum()


def gd(params, loss_fn, lr, steps, opt=None):
    opt = opt or torch.optim.SGD(params.values(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


@pytest.mark.parametrize("kind", ["layer", "global", "channel"])
def test_admm_recovers_known_sparse_solution(kind):
    A, y, w_star = sparse_problem(kind)
    lip = torch.linalg.matrix_norm(A, 2).item() ** 2
    params = {"a": nn.Parameter(torch.zeros(8, 5, dtype=F64)), "b": nn.Parameter(torch.zeros(20, dtype=F64))}
    gd(params, lambda: ls_loss(A, y, params), 1 / lip, 300)  # dense "pretraining"

    # one-shot magnitude pruning of the dense solution misses the support: ADMM has work to do
    naive = project({k: v.detach() for k, v in params.items()}, kind, sparsity=0.75)
    assert not all(torch.equal(naive[k] != 0, w_star[k] != 0) for k in w_star)

    pruner = ADMMPruner(params, sparsity=0.75, projection=kind, rho=0.05, rho_growth=1.2, rho_max=5.0)
    opt = torch.optim.SGD(params.values(), lr=1.0)
    for _ in range(40):
        opt.param_groups[0]["lr"] = 1 / (lip + pruner.rho)
        gd(params, lambda: ls_loss(A, y, params) + pruner.penalty(), None, 50, opt)
        stats = pruner.update()
    assert stats["primal_total"] < 1e-3
    masks = pruner.masks()
    for k in w_star:
        assert torch.equal(masks[k], w_star[k] != 0), k
        assert torch.allclose(params[k].detach(), w_star[k], atol=2e-2)

    pruner.hard_prune()
    from ntp_ssl.shared.masking import MaskedOptimizer

    masked = MaskedOptimizer(torch.optim.SGD(params.values(), lr=1 / lip), params, masks)
    gd(params, lambda: ls_loss(A, y, params), None, 300, masked)  # masked retraining: exact restricted LS
    for k in w_star:
        assert torch.allclose(params[k].detach(), w_star[k], atol=1e-8)


def test_admm_soft_threshold_solves_the_lasso():
    """With soft threshold delta and fixed rho, ADMM solves min 1/2||Aw-y||^2 + rho*delta*||w||_1."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(45, 60, generator=g, dtype=F64) / 45**0.5
    w0 = torch.zeros(60, dtype=F64)
    w0[torch.randperm(60, generator=g)[:8]] = 2.0
    y = A @ w0 + 0.01 * torch.randn(45, generator=g, dtype=F64)
    lam, rho = 0.05, 1.0
    lip = torch.linalg.matrix_norm(A, 2).item() ** 2
    ref = torch.zeros(60, dtype=F64)  # slow reference: ISTA
    for _ in range(20000):
        v = ref - A.T @ (A @ ref - y) / lip
        ref = soft_threshold({"v": v}, lam / lip)["v"]

    params = {"w": nn.Parameter(torch.zeros(60, dtype=F64))}
    pruner = ADMMPruner(params, sparsity=0.0, projection="soft", rho=rho, soft_delta=lam / rho)
    system = A.T @ A + rho * torch.eye(60, dtype=F64)
    for _ in range(300):  # exact W-step: (A^T A + rho I) w = A^T y + rho (Z - U)
        with torch.no_grad():
            params["w"].copy_(torch.linalg.solve(system, A.T @ y + rho * (pruner.Z["w"] - pruner.U["w"])))
        pruner.update()
    assert torch.allclose(pruner.Z["w"], ref, atol=1e-9)
    assert torch.equal(pruner.masks()["w"], ref != 0)
    masks = pruner.hard_prune()
    assert torch.equal(masks["w"], ref != 0)
    assert int((params["w"] != 0).sum()) == int(masks["w"].sum())


# --------------------------------------------------------------- pruner mechanics


def random_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": nn.Parameter(torch.randn(6, 3, 3, 3, generator=g)),
        "fc.weight": nn.Parameter(torch.randn(5, 12, generator=g)),
    }


def test_init_z_is_projection_and_u_is_zero():
    params = random_params()
    pruner = ADMMPruner(params, sparsity=0.8, projection="layer")
    expected = project({k: v.detach() for k, v in params.items()}, "layer", sparsity=0.8)
    for k in params:
        assert torch.equal(pruner.Z[k], expected[k])
        assert torch.equal(pruner.U[k], torch.zeros_like(params[k]))
        assert int((~pruner.masks()[k]).sum()) == n_pruned(params[k].numel(), 0.8)
        assert not pruner.Z[k].requires_grad


def test_penalty_value_and_gradient():
    params = random_params()
    pruner = ADMMPruner(params, sparsity=0.5, rho=0.3)
    for k in params:  # make U nonzero
        pruner.U[k] = 0.1 * torch.ones_like(params[k])
    penalty = pruner.penalty()
    expected = 0.15 * sum(((params[k].detach() - pruner.Z[k] + pruner.U[k]) ** 2).sum() for k in params)
    assert torch.allclose(penalty, expected)
    penalty.backward()
    for k in params:
        assert torch.allclose(params[k].grad, 0.3 * (params[k].detach() - pruner.Z[k] + pruner.U[k]))


def test_update_matches_hand_computation_and_rho_schedule():
    params = random_params()
    pruner = ADMMPruner(params, sparsity=0.5, rho=0.1, rho_growth=3.0, rho_max=0.5)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05)  # pretend a W-step happened
    z_old = {k: v.clone() for k, v in pruner.Z.items()}
    w = {k: v.detach().clone() for k, v in params.items()}
    stats = pruner.update()
    z_new = project(w, "layer", sparsity=0.5)  # U was 0
    for k in params:
        assert torch.equal(pruner.Z[k], z_new[k])
        # U = (0 + W - Z) rescaled by rho_old / rho_new = 0.1 / 0.3
        assert torch.allclose(pruner.U[k], (w[k] - z_new[k]) / 3.0)
        assert stats[f"primal/{k}"] == pytest.approx(torch.linalg.vector_norm(w[k] - z_new[k]).item(), rel=1e-6)
        assert stats[f"dual/{k}"] == pytest.approx(0.1 * torch.linalg.vector_norm(z_new[k] - z_old[k]).item(), rel=1e-6)
    assert stats["primal_total"] == pytest.approx(sum(stats[f"primal/{k}"] ** 2 for k in params) ** 0.5)
    assert stats["dual_total"] == pytest.approx(sum(stats[f"dual/{k}"] ** 2 for k in params) ** 0.5)
    assert stats["rho_w_step"] == pytest.approx(0.1)  # the W-step's rho, which scaled the dual residual
    assert stats["rho"] == pytest.approx(0.3)  # the next W-step's
    second = pruner.update()
    assert (second["rho_w_step"], second["rho"]) == (pytest.approx(0.3), pytest.approx(0.5))  # capped
    assert pruner.update()["rho"] == pytest.approx(0.5)
    assert pruner.iterations == 3


def test_residual_balancing_follows_the_rule_within_its_bounds():
    """rho * tau when primal > mu * dual, rho / tau when dual > mu * primal, else unchanged;
    never below the initial rho nor above rho_max (Boyd et al. 2011, 3.4.1)."""
    pruner = ADMMPruner(random_params(), sparsity=0.5, rho=0.01, rho_max=0.05, rho_schedule="balanced",
                        balance_mu=10.0, balance_tau=2.0)
    expected_rho, rho = [], 0.01
    for primal, dual in ((5.0, 0.1), (5.0, 0.1), (5.0, 0.1), (5.0, 0.1), (1.0, 1.0), (0.1, 5.0), (0.1, 5.0),
                         (0.1, 5.0), (0.1, 5.0)):
        if primal > 10 * dual:
            rho = min(rho * 2, 0.05)
        elif dual > 10 * primal:
            rho = max(rho / 2, 0.01)
        expected_rho.append(rho)
        pruner.rho = pruner.next_rho(primal, dual)
        assert pruner.rho == pytest.approx(expected_rho[-1])
    assert max(expected_rho) == 0.05 and expected_rho[-1] == 0.01  # both bounds were reached
    geometric = ADMMPruner(random_params(), sparsity=0.5, rho=0.1, rho_growth=3.0, rho_max=0.5)
    assert geometric.next_rho(0.0, 99.0) == pytest.approx(0.3)  # the default ignores the residuals


def test_balanced_update_rescales_u_with_rho():
    params = random_params()
    pruner = ADMMPruner(params, sparsity=0.5, rho=0.1, rho_max=1.0, rho_schedule="balanced")
    # no W-step: Z = Proj(W) again (dual 0) while W - Z holds the pruned weights: rho doubles
    w = {k: v.detach().clone() for k, v in params.items()}
    stats = pruner.update()
    assert stats["rho"] == pytest.approx(0.2)
    for k in params:
        assert torch.allclose(pruner.U[k], (w[k] - pruner.Z[k]) / 2.0)


@pytest.mark.parametrize("kind", ["layer", "global", "channel", "soft"])
def test_hard_prune_leaves_exactly_the_mask(kind):
    params = random_params()
    pruner = ADMMPruner(params, sparsity=0.7, projection=kind, soft_delta=0.8)
    with torch.no_grad():
        for p in params.values():
            p.mul_(1.1)
    pruner.update()
    masks = pruner.hard_prune()
    for k, p in params.items():
        assert masks[k].dtype == torch.bool and masks[k].shape == p.shape
        assert torch.equal(p.detach() != 0, masks[k])
    if kind == "layer":
        for k, p in params.items():
            assert int((p == 0).sum()) == n_pruned(p.numel(), 0.7)
    if kind == "global":
        total = sum(p.numel() for p in params.values())
        assert sum(int((p == 0).sum()) for p in params.values()) == n_pruned(total, 0.7)


def test_soft_hard_prune_uses_support_of_soft_threshold_of_w_plus_u():
    params = random_params()
    pruner = ADMMPruner(params, sparsity=0.0, projection="soft", soft_delta=0.5)
    for k in params:
        pruner.U[k] = torch.full_like(params[k], 0.3)
    v = {k: p.detach() + 0.3 for k, p in params.items()}
    expected = {k: t != 0 for k, t in soft_threshold(v, 0.5).items()}
    masks = pruner.hard_prune()
    for k in params:
        assert torch.equal(masks[k], expected[k])


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )


def test_channel_hard_prune_zeroes_coupled_bn_and_bias():
    model = small_cnn()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # nonzero beta would make a "pruned" channel a constant
                m.bias.normal_()
    params = select_prunable(model)
    coupled = find_conv_bn_pairs(model)
    all_params = dict(model.named_parameters())
    pruner = ADMMPruner(params, sparsity=0.5, projection="channel", coupled=coupled, all_params=all_params)
    masks = pruner.hard_prune()
    assert set(masks) == {"0.weight", "3.weight", "8.weight", "1.weight", "1.bias", "4.weight", "4.bias", "3.bias", "8.bias"}
    for conv, names in (("0.weight", ["1.weight", "1.bias"]), ("3.weight", ["4.weight", "4.bias", "3.bias"])):
        dead = ~(all_params[conv] != 0).reshape(all_params[conv].shape[0], -1).any(dim=1)
        assert int(dead.sum()) == n_pruned(all_params[conv].shape[0], 0.5)
        for name in names:
            assert torch.equal(masks[name], ~dead)
            assert torch.equal(all_params[name].detach() != 0, ~dead)
    # the pruned channels are silent after batch norm, in training and eval mode
    x = torch.randn(4, 3, 8, 8)
    dead0 = ~masks["1.weight"]
    for train in (True, False):
        model.train(train)
        assert torch.equal(model[:2](x)[:, dead0], torch.zeros_like(model[:2](x)[:, dead0]))
    assert torch.equal(pruner.masks()["4.bias"], masks["4.bias"])


def test_state_dict_round_trip_through_safetensors(tmp_path):
    params = random_params()
    pruner = ADMMPruner(params, sparsity=0.6, rho=0.01, rho_growth=2.0)
    for step in range(3):
        with torch.no_grad():
            for p in params.values():
                p.add_(0.01 * (step + 1))
        pruner.update()
    state = pruner.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    floats = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    assert set(floats) == {"rho", "iterations"} and all(isinstance(v, float) for v in floats.values())
    save_file(tensors, str(tmp_path / "admm.safetensors"))

    other = ADMMPruner(params, sparsity=0.6, rho=0.01, rho_growth=2.0)
    other.load_state_dict({**load_file(str(tmp_path / "admm.safetensors")), **floats})
    assert other.rho == pruner.rho and other.iterations == 3
    for k in params:
        assert torch.equal(other.Z[k], pruner.Z[k]) and torch.equal(other.U[k], pruner.U[k])
        assert torch.equal(other.masks()[k], pruner.masks()[k])
    assert other.update() == pruner.update()


def test_load_state_dict_rejects_mismatches():
    params = random_params()
    pruner = ADMMPruner(params, sparsity=0.6)
    state = pruner.state_dict()
    with pytest.raises(CheckpointError, match="Z/conv.weight"):
        pruner.load_state_dict({**state, "Z/conv.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="U/fc.weight.*missing"):
        pruner.load_state_dict({k: v for k, v in state.items() if k != "U/fc.weight"})
    with pytest.raises(CheckpointError, match="rho"):
        pruner.load_state_dict({k: v for k, v in state.items() if k != "rho"})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": 0.5, "projection": "magnitude"}, "projection"),
        ({"sparsity": 0.5, "rho": 0.0}, "rho"),
        ({"sparsity": 0.5, "rho": 0.1, "rho_max": 0.01}, "rho_max"),
        ({"sparsity": 0.5, "rho_growth": -1.0}, "rho_growth"),
        ({"sparsity": 0.5, "projection": "soft"}, "soft_delta"),
        ({"sparsity": 0.5, "projection": "soft", "soft_delta": -0.1}, "delta"),
        ({"sparsity": 0.5, "projection": "channel", "coupled": {"conv.weight": ["bn.weight"]}}, "all_params"),
        ({"sparsity": 0.5, "rho_schedule": "adaptive"}, "rho_schedule"),
        ({"sparsity": 0.5, "rho_schedule": "balanced", "balance_mu": 1.0}, "balance_mu"),
    ],
)
def test_pruner_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ADMMPruner(random_params(), **kwargs)


def test_pruner_rejects_wrong_coupled_shapes_and_empty_params():
    params = random_params()
    with pytest.raises(ConfigError, match="expected 6"):
        ADMMPruner(params, sparsity=0.5, projection="channel", coupled={"conv.weight": ["x"]}, all_params={"x": nn.Parameter(torch.ones(4))})
    with pytest.raises(ConfigError, match="not in all_params"):
        ADMMPruner(params, sparsity=0.5, projection="channel", coupled={"conv.weight": ["y"]}, all_params={})
    with pytest.raises(ConfigError, match="at least one"):
        ADMMPruner({}, sparsity=0.5)


# ---------------------------------------------------------------- model plumbing


def test_select_prunable_defaults_and_options():
    model = small_cnn()
    order = [n for n, _ in model.named_parameters()]
    default = select_prunable(model)
    assert list(default) == ["0.weight", "3.weight", "8.weight"]
    assert all(default[n] is dict(model.named_parameters())[n] for n in default)
    with_bias = select_prunable(model, include_bias=True)
    assert list(with_bias) == ["0.weight", "3.weight", "3.bias", "8.weight", "8.bias"]
    with_bn = select_prunable(model, include_batchnorm=True)
    assert list(with_bn) == ["0.weight", "1.weight", "1.bias", "3.weight", "4.weight", "4.bias", "8.weight"]
    assert list(select_prunable(model, exclude_first_layer=True)) == ["3.weight", "8.weight"]
    everything = select_prunable(model, include_bias=True, include_batchnorm=True)
    assert list(everything) == order  # deterministic, model order


def test_find_conv_bn_pairs_sequential_and_vgg():
    assert find_conv_bn_pairs(small_cnn()) == {
        "0.weight": ["1.weight", "1.bias"],
        "3.weight": ["4.weight", "4.bias", "3.bias"],
        "8.weight": ["8.bias"],
    }
    features = torchvision.models.vgg.make_layers([8, "M", 16, "M"], batch_norm=True)
    assert find_conv_bn_pairs(features) == {
        "0.weight": ["1.weight", "1.bias", "0.bias"],
        "4.weight": ["5.weight", "5.bias", "4.bias"],
    }
    plain = torchvision.models.vgg.make_layers([8, "M"], batch_norm=False)
    assert find_conv_bn_pairs(plain) == {"0.weight": ["0.bias"]}


def test_find_conv_bn_pairs_resnet18():
    model = torchvision.models.resnet18(weights=None)
    pairs = find_conv_bn_pairs(model)
    assert pairs["conv1.weight"] == ["bn1.weight", "bn1.bias"]
    assert pairs["layer1.0.conv1.weight"] == ["layer1.0.bn1.weight", "layer1.0.bn1.bias"]
    assert pairs["layer1.1.conv2.weight"] == ["layer1.1.bn2.weight", "layer1.1.bn2.bias"]
    assert pairs["layer2.0.downsample.0.weight"] == ["layer2.0.downsample.1.weight", "layer2.0.downsample.1.bias"]
    assert pairs["fc.weight"] == ["fc.bias"]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20
    for conv in convs:  # every conv pairs with the BN of the same block and index
        bn = conv.replace("conv", "bn").replace("downsample.0", "downsample.1")
        assert pairs[f"{conv}.weight"] == [f"{bn}.weight", f"{bn}.bias"]
    # and the channel pruner accepts them
    pruner = ADMMPruner(
        select_prunable(model), sparsity=0.5, projection="channel", coupled=pairs, all_params=dict(model.named_parameters())
    )
    masks = pruner.masks()
    assert masks["layer4.1.bn2.bias"].shape == (512,)


def test_w_step_lr_decays_geometrically_from_lr_to_lr_final():
    from types import SimpleNamespace

    from ntp_ssl.protect.loop import w_step_lr

    admm = SimpleNamespace(lr=3e-3, lr_final=3e-4, iterations=5)
    rates = [w_step_lr(admm, i) for i in range(5)]
    ratio = (3e-4 / 3e-3) ** 0.25  # four equal ratios take lr to lr_final
    for i, rate in enumerate(rates):
        assert rate == pytest.approx(3e-3 * ratio**i)
    assert rates[0] == pytest.approx(3e-3) and rates[-1] == pytest.approx(3e-4)
    assert all(w_step_lr(SimpleNamespace(lr=1e-3, lr_final=None, iterations=5), i) == 1e-3 for i in range(5))
    assert w_step_lr(SimpleNamespace(lr=1e-3, lr_final=1e-5, iterations=1), 0) == 1e-3  # one iteration: lr


@pytest.mark.parametrize("kind", ["layer", "global", "random"])
def test_magnitude_reference_is_a_magnitude_mask_whatever_the_projection(kind):
    """The diagnostics' "overlap with a magnitude mask" must compare with a magnitude mask:
    for the random projection the pruner's own first mask is not one (it once reported 1.0)."""
    from ntp_ssl.protect.loop import magnitude_reference, mask_overlap

    torch.manual_seed(0)
    params = {"a": nn.Parameter(torch.randn(8, 16)), "b": nn.Parameter(torch.randn(40) * 3)}
    pruner = ADMMPruner(params, sparsity=0.75, projection=kind)
    reference = magnitude_reference(pruner)
    magnitudes = torch.cat([p.detach().abs().flatten() for p in params.values()])
    for name, p in params.items():
        kept = p.detach().abs()[reference[name]]
        if kind == "global":  # the 25% largest |w| over both tensors: the slow reference is a sort
            threshold = magnitudes.sort(descending=True).values[int(0.25 * magnitudes.numel()) - 1]
        else:  # the 25% largest |w| of each tensor
            threshold = p.detach().abs().flatten().sort(descending=True).values[int(0.25 * p.numel()) - 1]
        assert int(reference[name].sum()) == int(0.25 * p.numel()) or kind == "global"
        assert kept.min() >= threshold
    overlap = mask_overlap(reference, pruner.masks())
    if kind == "random":
        assert overlap < 0.6  # a random 25% shares about a quarter of a magnitude 25%
    else:
        assert overlap == 1.0


def test_the_pruner_draws_its_random_mask_from_random_seed_and_refuses_it_elsewhere():
    from ntp_ssl.protect.projections import random_masks_per_layer

    params = random_params()
    weights = {n: p.detach() for n, p in params.items()}
    pruner = ADMMPruner(params, sparsity=0.5, projection="random", random_seed=7)
    expected = random_masks_per_layer(weights, 0.5, 7)
    assert all(torch.equal(pruner.masks()[n], expected[n]) for n in params)
    with pytest.raises(ConfigError, match="random_seed=7 applies to projection 'random' only"):
        ADMMPruner(params, sparsity=0.5, projection="layer", random_seed=7)
