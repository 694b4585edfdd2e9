"""ResNet-18 / ResNet-50 (torchvision, random init) with a CIFAR stem and no classifier."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from ntp_ssl.encoders.layout import to_encoder_layout

if TYPE_CHECKING:
    from torchvision import models


class ResNetEncoder(nn.Module):
    """A torchvision ResNet with the CIFAR stem: a 3x3 stride-1 first conv and no max-pool.

    The final ``fc`` is dropped; ``forward``: (B, C, H, W) -> (B, feature_dim) after global
    average pooling (512 for ResNet-18, 2048 for ResNet-50). Modules keep torchvision's
    names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so conv -> BN pairs are in order.
    """

    def __init__(self, resnet: models.ResNet, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim: int = resnet.fc.in_features

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(to_encoder_layout(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def _resnet(name: str, in_channels: int) -> ResNetEncoder:
    # imported here: torchvision costs about 1.7 s of every command's start on 2 cores, and the
    # default small CNN does not need it
    from torchvision import models

    factory: Callable[..., models.ResNet] = getattr(models, name)
    return ResNetEncoder(factory(weights=None), in_channels=in_channels)


def resnet18(*, in_channels: int = 3, image_size: int = 32) -> ResNetEncoder:
    """ResNet-18 with a CIFAR stem (512-d features). ``image_size`` is accepted for a
    uniform signature; the network is fully convolutional up to the global pool."""
    del image_size
    return _resnet("resnet18", in_channels)


def resnet50(*, in_channels: int = 3, image_size: int = 32) -> ResNetEncoder:
    """ResNet-50 with a CIFAR stem (2048-d features)."""
    del image_size
    return _resnet("resnet50", in_channels)
