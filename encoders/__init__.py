"""Backbones: an encoder maps an image batch (B, C, H, W) to features (B, feature_dim).

Encoders hold no heads. They are built from plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` /
``nn.Linear`` modules (no parametrizations), each conv registered before its batch norm,
so a pruning engine can select weights by module type. Import as ``ntp_ssl.encoders``.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ntp_ssl.encoders.resnet import ResNetEncoder, resnet18, resnet50
from ntp_ssl.encoders.small_cnn import SmallCNN, small_cnn, small_cnn_wide
from ntp_ssl.encoders.vgg import VGGEncoder, vgg11_bn
from ntp_ssl.checks import check_image_size
from ntp_ssl.errors import ConfigError

DEFAULT_BACKBONE = "small_cnn"

#: name -> factory(*, in_channels, image_size) -> encoder with an int ``feature_dim``.
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": small_cnn,
    "small_cnn_wide": small_cnn_wide,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vgg11_bn": vgg11_bn,
}


def build_encoder(name: str, *, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build the backbone ``name`` (a key of :data:`BACKBONES`) with random weights."""
    if name not in BACKBONES:
        raise ConfigError(
            f"unknown backbone {name!r}; expected one of: {', '.join(sorted(BACKBONES))}"
        )
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"in_channels must be a positive integer (e.g. 1 or 3), got {in_channels!r}")
    check_image_size(image_size)
    encoder = BACKBONES[name](in_channels=in_channels, image_size=image_size)
    assert isinstance(getattr(encoder, "feature_dim", None), int)
    return encoder


__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "ResNetEncoder",
    "SmallCNN",
    "VGGEncoder",
    "build_encoder",
    "resnet18",
    "resnet50",
    "small_cnn",
    "small_cnn_wide",
    "vgg11_bn",
]
