"""A small conv-BN-ReLU network that trains quickly on a CPU (the default backbone)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ntp_ssl.encoders.layout import to_encoder_layout

#: Output channels of the four conv-BN-ReLU stages; the last one is the feature size.
SMALL_CNN_CHANNELS = (32, 64, 128, 256)


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU stages (32-64-128-256 channels, each times ``width``), 2x2
    max-pooling after the first three while the map stays at least 2 px wide, then global
    average pooling.

    ``forward``: (B, C, H, W) -> (B, 256 * width).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, width: int = 1) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        stage_channels = tuple(channels * width for channels in SMALL_CNN_CHANNELS)
        layers: list[nn.Module] = []
        size = image_size
        previous = in_channels
        for stage, channels in enumerate(stage_channels):
            layers += _conv_bn_relu(previous, channels)
            if stage < len(stage_channels) - 1 and size // 2 >= 2:
                layers.append(nn.MaxPool2d(kernel_size=2))
                size //= 2
            previous = channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim: int = stage_channels[-1]

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.features(to_encoder_layout(x))), 1)


def small_cnn(*, in_channels: int = 3, image_size: int = 32) -> SmallCNN:
    """Build the default :class:`SmallCNN` backbone (256-d features)."""
    return SmallCNN(in_channels=in_channels, image_size=image_size)


def small_cnn_wide(*, in_channels: int = 3, image_size: int = 32) -> SmallCNN:
    """The :class:`SmallCNN` at twice the width (64-128-256-512 channels, 512-d features):
    about 4x the arithmetic of the default (2.1x its pretraining time on 2 cores). Measured
    as a default-encoder lever: no better a start against its own (wide) scratch than the
    default is against its own (docs/RESULTS.md, "Stronger default encoders")."""
    return SmallCNN(in_channels=in_channels, image_size=image_size, width=2)
