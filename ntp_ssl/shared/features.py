"""Feature extraction with a frozen encoder, and a memo of it for an encoder between steps."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ntp_ssl.data import to_float_tensor
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


class TrainFeatures:
    """Features of each domain's train images under one encoder, reused while the encoder's
    state (parameters and batch-norm buffers) is what it was when they were computed.

    Protection reads the same features twice in a row: the kNN monitor at the end of an
    ADMM iteration and the k-means pseudo-labels at the start of the next, with no step in
    between. Keeping a copy of the state and comparing every tensor for exact equality
    makes any change (an optimiser step, a prune, a resumed state, even a forward pass in
    train mode, which moves the batch-norm statistics) a recomputation, so a reused feature
    is bit for bit the one :func:`extract_features` would give now.
    """

    def __init__(self, encoder: nn.Module, *, device: str | torch.device = "cpu") -> None:
        self.encoder, self.device = encoder, device
        self._state: dict[str, Tensor] | None = None
        self._features: dict[int, tuple[object, Tensor]] = {}  # id(domain) -> (domain, its features)
        self.computed = 0  # extractions done (for tests and logs)
        self.reused = 0

    def _unchanged(self, state: dict[str, Tensor]) -> bool:
        held = self._state
        return (held is not None and held.keys() == state.keys()
                and all(held[k].shape == v.shape and held[k].dtype == v.dtype and torch.equal(held[k], v)
                        for k, v in state.items()))

    def of(self, domain) -> Tensor:
        """``extract_features(encoder, to_float_tensor(domain.train_images))``, reused when it can be
        (then the same tensor as before: callers must not change it in place)."""
        state = self.encoder.state_dict()
        if not self._unchanged(state):
            self._state = {k: v.detach().clone() for k, v in state.items()}
            self._features.clear()
        held = self._features.get(id(domain))
        if held is not None and held[0] is domain:
            self.reused += 1
            return held[1]
        features = extract_features(self.encoder, to_float_tensor(domain.train_images), device=self.device)
        self._features[id(domain)] = (domain, features)
        self.computed += 1
        return features
