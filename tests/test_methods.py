"""SimCLR, MoCo v2 and supervised pretraining modules, transforms and exported state."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from ntp_ssl.encoders import build_encoder
from ntp_ssl.errors import CheckpointError, ConfigError
from ntp_ssl.pretrain.methods import (
    METHODS,
    MoCoV2,
    SimCLR,
    Supervised,
    build_method,
    build_train_transform,
    export_state,
    load_exported_state,
)

SMALL = dict(hidden_dim=64, projection_dim=32)


def _method(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    encoder = build_encoder("small_cnn", image_size=16)
    if name != "supervised":
        kwargs = {**SMALL, **kwargs}
    return build_method(name, encoder, **kwargs)


def _two_views(batches, batch_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        x = torch.randn(batch_size, 3, 16, 16, generator=generator)
        noise = [0.1 * torch.randn(x.shape, generator=generator) for _ in range(2)]
        out.append((x + noise[0], x + noise[1]))
    return out


def _train(method, batches, labels=None, epochs=5, lr=1e-3):
    optimiser = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=lr)
    history = []
    for _ in range(epochs):
        total = 0.0
        for index, views in enumerate(batches):
            loss = method.training_loss(views, None if labels is None else labels[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item()
        history.append(total / len(batches))
    return history


def test_registry_and_types():
    assert set(METHODS) == {"simclr", "moco", "supervised"}
    assert isinstance(_method("simclr"), SimCLR)
    assert isinstance(_method("moco"), MoCoV2)
    supervised = _method("supervised", num_classes=7)
    assert isinstance(supervised, Supervised) and supervised.classifier.out_features == 7


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ConfigError) as info:
        build_method("byol", build_encoder("small_cnn"))
    message = str(info.value)
    assert "byol" in message and "\n" not in message
    assert all(name in message for name in METHODS)


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match="memory_bank_size"):
        build_method("simclr", build_encoder("small_cnn"), memory_bank_size=10)


@pytest.mark.parametrize(
    "kwargs", [{"temperature": 0.0}, {"momentum_base": 1.5}, {"memory_bank_size": -1}]
)
def test_bad_moco_values(kwargs):
    with pytest.raises(ConfigError):
        build_method("moco", build_encoder("small_cnn"), **kwargs)


def test_simclr_loss_decreases_and_is_seeded():
    batches = _two_views(1, 16)
    history = _train(_method("simclr"), batches, epochs=6)
    assert history[-1] < 0.7 * history[0]
    assert _train(_method("simclr"), batches, epochs=6) == history  # same seed, same numbers


def test_simclr_ssl_loss_is_the_training_loss():
    method = _method("simclr").eval()
    (a, b), = _two_views(1, 8)
    assert torch.equal(method.ssl_loss(a, b), method.training_loss([a, b]))


@pytest.mark.parametrize("symmetric", [False, True])
def test_moco_loss_decreases(symmetric):
    # Four distinct batches and a bank of two batches: the bank never holds keys of the
    # batch being scored (a fixed single batch would fill the bank with its own positives).
    method = _method("moco", memory_bank_size=32, symmetric=symmetric)
    history = _train(method, _two_views(4, 8), epochs=5)
    assert history[-1] < 0.8 * history[1]  # epoch 0 still sees the random initial bank


def test_moco_momentum_update_is_exact():
    method = _method("moco")
    with torch.no_grad():  # make query and key differ
        for p in list(method.encoder.parameters()) + list(method.projection_head.parameters()):
            p.add_(torch.randn_like(p))
    method.set_progress(3, 11)  # m = 1 - (1 - 0.99) * (cos(pi * 3 / 10) + 1) / 2
    m = 1 - (1 - 0.99) * (np.cos(np.pi * 3 / 10) + 1) / 2
    assert method.momentum == pytest.approx(m, abs=1e-12)
    pairs = [(method.encoder, method.key_encoder), (method.projection_head, method.key_projection_head)]
    queries = [[p.detach().clone() for p in q.parameters()] for q, _ in pairs]
    keys_old = [[p.detach().clone() for p in k.parameters()] for _, k in pairs]
    method.update_key_encoder()
    for (_, key), query, key_old in zip(pairs, queries, keys_old):
        for new, q, old in zip(key.parameters(), query, key_old):
            torch.testing.assert_close(new, m * old + (1 - m) * q, rtol=1e-6, atol=1e-7)
            assert not torch.equal(new, old)
    assert all(torch.equal(q, p) for q, p in zip(queries[0], method.encoder.parameters()))


def test_moco_momentum_schedule_ends_at_one():
    method = _method("moco", momentum_base=0.9)
    method.set_progress(0, 100)
    assert method.momentum == pytest.approx(0.9)
    method.set_progress(99, 100)
    assert method.momentum == 1.0


def test_moco_key_branch_gets_no_gradients():
    method = _method("moco").train()
    (a, b), = _two_views(1, 8)
    method.training_loss([a, b]).backward()
    for module in (method.key_encoder, method.key_projection_head):
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    assert all(p.grad is not None for p in method.encoder.parameters())


def test_moco_training_loss_fills_the_bank_and_ssl_loss_has_no_side_effects():
    method = _method("moco", memory_bank_size=32).train()
    bank = method.criterion.memory_bank
    (a, b), = _two_views(1, 8)
    keys_before = [p.clone() for p in method.key_encoder.parameters()]
    bank_before = bank.bank.clone()
    method.ssl_loss(a, b).backward()
    assert torch.equal(bank.bank, bank_before) and int(bank.bank_ptr) == 0
    assert all(torch.equal(x, y) for x, y in zip(keys_before, method.key_encoder.parameters()))
    method.training_loss([a, b]).backward()
    assert int(bank.bank_ptr) == 8 and not torch.equal(bank.bank, bank_before)


def test_moco_guards_against_mismatched_key_branch():
    method = _method("moco")
    method.key_projection_head = nn.Sequential(nn.Linear(256, 32))
    with pytest.raises(RuntimeError, match="key branch"):
        method.update_key_encoder()


def test_supervised_loss_decreases():
    torch.manual_seed(1)
    batches = [(torch.randn(16, 3, 16, 16),)]
    labels = [torch.arange(16) % 10]
    history = _train(_method("supervised"), batches, labels, epochs=6)
    assert history[-1] < 0.5 * history[0]


def test_supervised_needs_labels():
    with pytest.raises(ConfigError, match="labels"):
        _method("supervised").training_loss([torch.randn(4, 3, 16, 16)], None)


def _image(mode):
    rng = np.random.default_rng(0)
    shape = (32, 32) if mode == "L" else (32, 32, 3)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode)


@pytest.mark.parametrize("method,count", [("simclr", 2), ("moco", 2), ("supervised", 1)])
@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("L", 1), ("RGB", 1)])
def test_train_transform_views(method, count, mode, channels):
    transform = build_train_transform(method, image_size=32, channels=channels)
    torch.manual_seed(0)
    np.random.seed(0)
    views = transform(_image(mode))
    assert isinstance(views, tuple) and len(views) == count
    for view in views:
        assert view.shape == (channels, 32, 32) and view.dtype == torch.float32
        assert view.min() >= -1.0 - 1e-6 and view.max() <= 1.0 + 1e-6
    torch.manual_seed(0)
    np.random.seed(0)
    assert all(torch.equal(x, y) for x, y in zip(views, transform(_image(mode))))


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_ssl_transform_never_flips(method):
    for view in build_train_transform(method, image_size=32).views:
        flips = [t for t in view.transform.transforms if "Flip" in type(t).__name__]
        assert flips and all(t.p == 0 for t in flips)


def test_train_transform_bad_values():
    with pytest.raises(ConfigError, match="byol"):
        build_train_transform("byol", image_size=32)
    with pytest.raises(ConfigError, match="channels"):
        build_train_transform("simclr", image_size=32, channels=2)


@pytest.mark.parametrize(
    "name,heads", [("simclr", {"encoder", "projection_head"}), ("moco", {"encoder", "projection_head"}), ("supervised", {"encoder", "classifier"})]
)
def test_export_round_trip(name, heads):
    source = _method(name, seed=0).train()
    if name != "supervised":
        _train(source, _two_views(1, 8), epochs=1)
    state = export_state(source)
    assert {key.split(".")[0] for key in state} == heads
    state = load_safetensors(save_safetensors(state))  # a released checkpoint holds exactly this
    target = _method(name, seed=1)
    load_exported_state(target, state)
    exported = export_state(target)
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[key], state[key]) for key in state)
    if name == "moco":  # the key branch restarts as a copy of the loaded query branch
        assert all(torch.equal(q, k) for q, k in zip(target.encoder.parameters(), target.key_encoder.parameters()))


def test_load_exported_state_is_strict():
    method = _method("simclr")
    state = export_state(method)
    with pytest.raises(CheckpointError) as info:
        load_exported_state(method, {k: v for k, v in state.items() if not k.startswith("projection_head.")})
    assert "missing" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_exported_state(method, {**state, "classifier.weight": torch.zeros(10, 256)})
    with pytest.raises(CheckpointError, match="shape"):
        load_exported_state(method, {**state, "projection_head.layers.0.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError):
        load_exported_state(_method("supervised"), state)


def test_ssl_augmentation_options_shape_the_views():
    from ntp_ssl.pretrain.methods import build_train_transform as build

    def crop_scales(transform):
        return {t.scale for view in transform.views for t in _walk(view) if "ResizedCrop" in type(t).__name__}

    assert crop_scales(build("simclr", image_size=32)) == {(0.25, 1.0)}  # the built-in value
    assert crop_scales(build("simclr", image_size=32, min_scale=0.08)) == {(0.08, 1.0)}
    black = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8), "RGB")
    torch.manual_seed(0)
    plain = build("simclr", image_size=32)(black)
    inverted = build("simclr", image_size=32, invert_prob=1.0)(black)
    assert all(v.max() <= -1.0 + 1e-6 for v in plain)  # black stays black through crops and jitter
    assert all(v.mean() > 0 for v in inverted)  # every view inverted first: white, then jittered
    for probability, inverts in ((None, 0), (0.0, 0), (0.3, 2)):
        views = build("moco", image_size=32, invert_prob=probability).views
        found = [t for view in views for t in _walk(view) if type(t).__name__ == "RandomInvert"]
        assert len(found) == inverts and all(t.p == probability for t in found)


def _walk(transform):
    """Every transform inside ``transform`` (torchvision Compose and lightly view wrappers)."""
    yield transform
    for child in getattr(transform, "transforms", None) or getattr(getattr(transform, "transform", None),
                                                                    "transforms", None) or []:
        yield from _walk(child)
