"""Feature extraction with a frozen encoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ntp_ssl.errors import ConfigError


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images: Tensor,
    *,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Features f(x) of ``images`` (float NCHW, already normalised) as a float32 CPU
    tensor (N, D), computed in batches in eval mode; the encoder's previous train/eval
    mode is restored afterwards. The encoder must already be on ``device``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if images.dim() != 4:
        raise ConfigError(f"images must be a 4-d (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    was_training = encoder.training
    encoder.eval()
    try:
        chunks = [
            encoder(images[start : start + batch_size].to(device, dtype=torch.float32)).float().cpu()
            for start in range(0, images.shape[0], batch_size)
        ]
    finally:
        encoder.train(was_training)
    if not chunks:
        return torch.zeros(0, int(getattr(encoder, "feature_dim", 0)), dtype=torch.float32)
    return torch.cat(chunks)
