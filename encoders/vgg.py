"""VGG-11 with batch norm (torchvision layer recipe, random init), sized for small images."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ntp_ssl.encoders.layout import to_encoder_layout

#: The key of torchvision's VGG configuration for VGG-11 ("A": channel counts, "M" = 2x2 max-pool).
VGG11_CONFIG = "A"


class VGGEncoder(nn.Module):
    """torchvision's VGG-11-BN ``features`` followed by global average pooling -> 512-d.

    The layers come from ``torchvision.models.vgg.make_layers`` (the same modules as
    ``vgg11_bn(weights=None).features``, without building the 120M-parameter classifier)
    with torchvision's VGG initialisation. The first conv takes ``in_channels``. A max-pool
    is kept only while the map is still at least 1 px wide after it (all five at 32 px,
    four at 28 px); the others become ``nn.Identity`` so names (``features.<i>``) do not
    depend on the image size.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        from torchvision.models import vgg  # here, not at import: see resnet.py

        features = vgg.make_layers(vgg.cfgs[VGG11_CONFIG], batch_norm=True)
        first = features[0]
        assert isinstance(first, nn.Conv2d)
        if in_channels != first.in_channels:
            features[0] = nn.Conv2d(in_channels, first.out_channels, kernel_size=3, padding=1)
        size = image_size
        for index, module in enumerate(features):
            if isinstance(module, nn.MaxPool2d):
                if size // 2 >= 1:
                    size //= 2
                else:
                    features[index] = nn.Identity()
        for module in features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim: int = 512

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.features(to_encoder_layout(x))), 1)


def vgg11_bn(*, in_channels: int = 3, image_size: int = 32) -> VGGEncoder:
    """VGG-11-BN feature extractor (512-d features)."""
    return VGGEncoder(in_channels=in_channels, image_size=image_size)
