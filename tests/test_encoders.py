"""Backbones (ntp_ssl.encoders) and feature extraction (ntp_ssl.shared.features)."""

import numpy as np
import pytest
import torch
from torch import nn

from ntp_ssl.data import Domain, to_float_tensor
from ntp_ssl.encoders import BACKBONES, DEFAULT_BACKBONE, build_encoder
from ntp_ssl.errors import ConfigError
from ntp_ssl.shared.features import TrainFeatures, extract_features
from ntp_ssl.shared.knn import knn_on_train_splits

FEATURE_DIMS = {"small_cnn": 256, "small_cnn_wide": 512, "resnet18": 512, "resnet50": 2048, "vgg11_bn": 512}


def test_registry_holds_the_five_backbones():
    assert set(BACKBONES) == set(FEATURE_DIMS)
    assert DEFAULT_BACKBONE == "small_cnn"


@pytest.mark.parametrize("name", sorted(FEATURE_DIMS))
def test_output_shape_and_feature_dim(name):
    torch.manual_seed(0)
    encoder = build_encoder(name)
    assert encoder.feature_dim == FEATURE_DIMS[name]
    out = encoder(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, FEATURE_DIMS[name])
    assert out.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(FEATURE_DIMS))
def test_single_channel_and_28px_input(name):
    torch.manual_seed(0)
    encoder = build_encoder(name, in_channels=1, image_size=28)
    assert encoder(torch.randn(2, 1, 28, 28)).shape == (2, FEATURE_DIMS[name])


def test_small_cnn_on_tiny_images():
    encoder = build_encoder("small_cnn", in_channels=1, image_size=8)
    assert encoder(torch.randn(2, 1, 8, 8)).shape == (2, 256)


@pytest.mark.parametrize("name", sorted(FEATURE_DIMS))
def test_plain_modules_and_conv_bn_pairs(name):
    encoder = build_encoder(name)
    modules = list(encoder.modules())
    assert not any(hasattr(m, "parametrizations") for m in modules)
    assert not any(isinstance(m, nn.Linear) for m in modules)  # no heads inside
    first_conv = next(m for m in modules if isinstance(m, nn.Conv2d))
    assert first_conv.kernel_size == (3, 3) and first_conv.stride == (1, 1)  # CIFAR stem
    # Every conv is directly followed (in registration order) by a BatchNorm2d of its width,
    # except ResNet downsample convs, which are followed by their BN inside the Sequential.
    for index, module in enumerate(modules):
        if isinstance(module, nn.Conv2d):
            following = modules[index + 1]
            assert isinstance(following, nn.BatchNorm2d), (name, index, following)
            assert following.num_features == module.out_channels


def test_wide_small_cnn_doubles_every_stage():
    narrow = [m.out_channels for m in build_encoder("small_cnn").modules() if isinstance(m, nn.Conv2d)]
    wide = [m.out_channels for m in build_encoder("small_cnn_wide").modules() if isinstance(m, nn.Conv2d)]
    assert wide == [2 * c for c in narrow] == [64, 128, 256, 512]


@pytest.mark.parametrize("width", [0, 1.5, True])
def test_small_cnn_refuses_a_bad_width(width):
    from ntp_ssl.encoders import SmallCNN

    with pytest.raises(ValueError, match="width must be a positive integer"):
        SmallCNN(width=width)


def test_resnet_has_no_stem_max_pool():
    encoder = build_encoder("resnet18")
    assert not any(isinstance(m, nn.MaxPool2d) for m in encoder.modules())


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = build_encoder("small_cnn").state_dict()
    torch.manual_seed(3)
    b = build_encoder("small_cnn").state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_unknown_backbone_lists_valid_ones():
    with pytest.raises(ConfigError) as info:
        build_encoder("resnet19")
    message = str(info.value)
    assert "resnet19" in message and "\n" not in message
    assert all(name in message for name in BACKBONES)


@pytest.mark.parametrize("kwargs", [{"in_channels": 0}, {"in_channels": 2.0}, {"image_size": 2}])
def test_bad_sizes_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        build_encoder("small_cnn", **kwargs)


@pytest.mark.parametrize("start_training", [True, False])
def test_extract_features_matches_eval_forward_and_restores_mode(start_training):
    torch.manual_seed(0)
    encoder = build_encoder("small_cnn", image_size=16)
    encoder.train()
    encoder(torch.randn(16, 3, 16, 16))  # give batch norm non-trivial running statistics
    encoder.train(start_training)
    images = torch.randn(10, 3, 16, 16)
    features = extract_features(encoder, images, batch_size=4)
    assert encoder.training is start_training
    assert all(m.training is start_training for m in encoder.modules())
    encoder.eval()
    with torch.no_grad():
        expected = encoder(images)
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    assert features.shape == (10, 256)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)


def test_extract_features_does_not_change_running_stats():
    encoder = build_encoder("small_cnn", image_size=16).train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    extract_features(encoder, torch.randn(6, 3, 16, 16))
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_extract_features_of_no_images():
    encoder = build_encoder("small_cnn", image_size=16)
    assert extract_features(encoder, torch.zeros(0, 3, 16, 16)).shape == (0, 256)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "vgg11_bn"])
def test_channels_last_layout_gives_the_nchw_features_up_to_rounding(name):
    """The encoders compute on channels-last batches (faster on the CPU), the switch turns it
    off, the features agree up to float rounding, and the weights keep the NCHW layout
    (checkpoints are written from them) through a training step."""
    from ntp_ssl.encoders.layout import channels_last_enabled, set_channels_last

    assert channels_last_enabled()  # the default
    torch.manual_seed(0)
    encoder = build_encoder(name).eval()
    first_conv = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d))
    seen = []
    first_conv.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(4, 3, 32, 32)
    try:
        set_channels_last(False)
        nchw = encoder(x)
        set_channels_last(True)
        channels_last = encoder(x)
    finally:
        set_channels_last(True)
    assert seen == [False, True]
    torch.testing.assert_close(channels_last, nchw, rtol=1e-4, atol=1e-5)
    encoder.train()
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    encoder(x).square().mean().backward()
    optimizer.step()
    assert all(p.is_contiguous() for p in encoder.parameters())
    assert all(t.is_contiguous() for t in encoder.state_dict().values())


def test_layout_benchmark_smoke(tmp_path):
    """benchmarks/bench_layout.py --quick runs both layouts on every workload and records them."""
    import json

    from conftest import load_benchmark
    from ntp_ssl.encoders.layout import channels_last_enabled

    module = load_benchmark("bench_layout")
    out = tmp_path / "layout.json"
    assert module.main(["--quick", "--out", str(out)]) == 0
    results = {r["workload"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"fine-tune", "pretrain step", "features"}
    for result in results.values():
        assert all(len(t) == 2 and min(t) > 0 for t in result["times_s"].values())
    assert results["features"]["output_difference"] < 1e-4  # the same features, up to rounding
    assert channels_last_enabled()  # the benchmark leaves the process's layout as it found it


def _tiny_domain(name: str, seed: int) -> Domain:
    rng = np.random.default_rng(seed)
    return Domain(name=name, train_images=rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8),
                  train_labels=np.arange(40) % 4, test_images=rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8),
                  test_labels=np.arange(8) % 4, num_classes=4)


def test_train_features_memo_reuses_only_while_the_state_is_unchanged():
    torch.manual_seed(0)
    encoder = build_encoder("small_cnn", image_size=16)
    a, b = _tiny_domain("a", 0), _tiny_domain("b", 1)
    memo = TrainFeatures(encoder)

    def fresh(domain):
        return extract_features(encoder, to_float_tensor(domain.train_images))

    first = memo.of(a)
    assert torch.equal(first, fresh(a)) and memo.of(a) is first  # unchanged weights: the same tensor back
    assert torch.equal(memo.of(b), fresh(b)) and (memo.computed, memo.reused) == (2, 1)
    assert not torch.equal(memo.of(_tiny_domain("a", 2)), first)  # another domain object, though named alike
    # a train-mode forward moves the batch-norm statistics only: recomputed
    encoder.train()
    with torch.no_grad():
        encoder(torch.randn(8, 3, 16, 16))
    after_forward = memo.of(a)
    assert after_forward is not first and torch.equal(after_forward, fresh(a))
    # an optimiser step
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    encoder(torch.randn(8, 3, 16, 16)).sum().backward()
    optimizer.step()
    after_step = memo.of(a)
    assert not torch.equal(after_step, after_forward) and torch.equal(after_step, fresh(a))
    # a state loaded back: the old weights, recomputed (not the stale tensor), equal to the first
    torch.manual_seed(0)
    encoder.load_state_dict(build_encoder("small_cnn", image_size=16).state_dict())
    restored = memo.of(a)
    assert restored is not first and torch.equal(restored, first)


def test_knn_on_train_splits_with_the_memo_gives_the_same_scores():
    torch.manual_seed(0)
    encoder = build_encoder("small_cnn", image_size=16)
    domains = [_tiny_domain("a", 0), _tiny_domain("b", 1)]
    memo = TrainFeatures(encoder)
    plain = knn_on_train_splits(encoder, domains, device="cpu", k=5)
    assert knn_on_train_splits(encoder, domains, device="cpu", k=5, memo=memo) == plain
    assert knn_on_train_splits(encoder, domains, device="cpu", k=5, memo=memo) == plain
    assert (memo.computed, memo.reused) == (2, 2)
    with pytest.raises(ValueError, match="another encoder"):
        knn_on_train_splits(build_encoder("small_cnn", image_size=16), domains, device="cpu", memo=memo)
