"""Masked retraining keeps pruned weights exactly zero; each of the three guards matters."""

import pytest
import torch
from torch import nn

from ntp_ssl.errors import ConfigError
from ntp_ssl.shared.masking import MaskedOptimizer, apply_masks_, mask_gradients_, zero_optimizer_state_

OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adam_amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
}


def setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    g = torch.Generator().manual_seed(seed + 1)
    masks = {n: torch.rand(p.shape, generator=g) > 0.7 for n, p in params.items()}
    x = torch.randn(64, 10, generator=g)
    y = torch.randint(0, 5, (64,), generator=g)
    return model, params, masks, x, y


def train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def pruned_values(params, masks):
    return torch.cat([params[n].detach()[~m] for n, m in masks.items()])


def warm_state(model, opt, x, y):
    """Optimizer state built before pruning, as when the ADMM optimizer carries on into retraining."""
    train(model, opt, x, y, 5)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_masked_optimizer_keeps_pruned_weights_exactly_zero(name):
    model, params, masks, x, y = setup()
    inner = OPTIMIZERS[name](model.parameters())
    warm_state(model, inner, x, y)
    apply_masks_(params, masks)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = MaskedOptimizer(inner, params, masks)
    for _ in range(100):
        train(model, opt, x, y, 1)
        values = pruned_values(params, masks)
        assert torch.equal(values, torch.zeros_like(values))
        assert not torch.signbit(values).any()
    for n, m in masks.items():
        assert not torch.equal(params[n].detach()[m], before[n][m])  # kept weights did train
        for key, value in inner.state[params[n]].items():
            if key != "step":
                assert torch.equal(value[~m], torch.zeros_like(value[~m])), key


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_without_masking_pruned_weights_drift(name):
    model, params, masks, x, y = setup()
    apply_masks_(params, masks)
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, x, y, 20)
    assert (pruned_values(params, masks) != 0).sum() > 0.5 * sum(int((~m).sum()) for m in masks.values())


@pytest.mark.parametrize("name", ["adam", "sgd_momentum_wd"])
def test_gradient_masking_alone_is_not_enough_with_stale_moments(name):
    model, params, masks, x, y = setup()
    opt = OPTIMIZERS[name](model.parameters())
    warm_state(model, opt, x, y)
    apply_masks_(params, masks)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        mask_gradients_(params, masks)
        opt.step()
    assert (pruned_values(params, masks) != 0).any()


def test_weight_masking_without_moment_zeroing_leaves_stale_state():
    model, params, masks, x, y = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    warm_state(model, opt, x, y)
    apply_masks_(params, masks)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    mask_gradients_(params, masks)
    opt.step()
    apply_masks_(params, masks)
    buf = opt.state[params["0.weight"]]["momentum_buffer"]
    assert (buf[~masks["0.weight"]] != 0).any()  # weights are zero, momentum is not
    zero_optimizer_state_(opt, params, masks)
    assert torch.equal(buf[~masks["0.weight"]], torch.zeros_like(buf[~masks["0.weight"]]))


@pytest.mark.parametrize("name", ["adam_amsgrad", "adamw", "sgd_momentum_wd"])
def test_zero_optimizer_state_zeroes_moments_only_at_pruned_positions(name):
    model, params, masks, x, y = setup()
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, x, y, 3)
    before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in params.items()}
    bias_state = {k: v.clone() for k, v in opt.state[model[0].bias].items()}
    zero_optimizer_state_(opt, params, masks)
    for n, p in params.items():
        m = masks[n]
        state = opt.state[p]
        keys = [k for k in state if k != "step"]
        assert keys, "optimizer kept no moments"
        for k in keys:
            assert (before[n][k][~m] != 0).any()
            assert torch.equal(state[k][~m], torch.zeros_like(state[k][~m]))
            assert torch.equal(state[k][m], before[n][k][m])
        if "step" in state:
            assert torch.equal(state["step"], before[n]["step"])
    for k, v in opt.state[model[0].bias].items():  # unmasked params untouched
        assert torch.equal(v, bias_state[k])


def test_apply_and_gradient_masks():
    w = torch.tensor([[1.0, -2.0], [3.0, -4.0]], requires_grad=True)
    m = torch.tensor([[True, False], [False, True]])
    (w * torch.tensor([[5.0, 6.0], [7.0, 8.0]])).sum().backward()
    mask_gradients_({"w": w}, {"w": m})
    assert w.grad.tolist() == [[5.0, 0.0], [0.0, 8.0]]
    apply_masks_({"w": w}, {"w": m})
    assert w.tolist() == [[1.0, 0.0], [0.0, -4.0]]
    assert not torch.signbit(w[0, 1]) and w.requires_grad


def test_closure_state_dict_and_pass_through():
    model, params, masks, x, y = setup()
    apply_masks_(params, masks)
    opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), params, masks)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(5):
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert torch.equal(pruned_values(params, masks), torch.zeros_like(pruned_values(params, masks)))

    opt.param_groups[0]["lr"] = 0.01
    assert opt.optimizer.param_groups[0]["lr"] == 0.01
    scheduler = torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=1, gamma=0.5)
    opt.step(closure)
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)

    state = opt.state_dict()
    model2, params2, _, _, _ = setup()
    model2.load_state_dict(model.state_dict())
    opt2 = MaskedOptimizer(torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9), params2, masks)
    opt2.load_state_dict(state)
    for n in params:
        assert torch.equal(opt2.state[params2[n]]["momentum_buffer"], opt.state[params[n]]["momentum_buffer"])
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_bad_masks_raise_config_error():
    model, params, masks, _, _ = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="'nope.weight'"):
        MaskedOptimizer(opt, params, {"nope.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ConfigError, match=r"shape \(3,\); expected \(20, 10\)"):
        apply_masks_(params, {"0.weight": torch.ones(3, dtype=torch.bool)})


def restricted_reference(name, steps):
    """Slow obvious version: the forward pass uses W * M, so autograd itself gives zero gradients at pruned positions."""
    model, params, masks, x, y = setup()
    apply_masks_(params, masks)
    opt = OPTIMIZERS_FRESH[name](model.parameters())
    weights = {n: p for n, p in params.items()}
    for _ in range(steps):
        opt.zero_grad()
        h = torch.relu(x @ (weights["0.weight"] * masks["0.weight"]).T + model[0].bias)
        out = h @ (weights["2.weight"] * masks["2.weight"]).T + model[2].bias
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
    return {n: p.detach() for n, p in params.items()}


OPTIMIZERS_FRESH = {
    **OPTIMIZERS,
    # Adafactor's factored second moment mixes a row's squared gradients: without gradient
    # masking, the pruned entries' gradients would change the kept weights' updates.
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
}


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd_momentum_wd", "adafactor"])
def test_masked_training_equals_training_the_restricted_model(name):
    model, params, masks, x, y = setup()
    apply_masks_(params, masks)
    opt = MaskedOptimizer(OPTIMIZERS_FRESH[name](model.parameters()), params, masks)
    train(model, opt, x, y, 30)
    ref = restricted_reference(name, 30)
    for n in params:
        assert torch.allclose(params[n].detach(), ref[n], atol=1e-6, rtol=0), n
