"""The memory layout the encoders compute in.

On the CPU, oneDNN runs the convolutions, batch norms and max-pools of these networks faster
on channels-last (NHWC) tensors than on NCHW ones: on 2 cores a sweep fine-tune of the
default small CNN runs 1.37x faster, a pretraining step 1.27x, feature extraction 1.61x
(docs/BENCHMARKS.md, "The memory layout"). So every encoder moves its input batch to
channels-last on entry; its weights keep their usual layout (checkpoints are unchanged).
The features equal the NCHW ones up to float rounding (about 1e-6), which training then
carries into the last digits of every result: numbers made before the switch come back
with ``trainer.channels_last=false``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_channels_last = True


def set_channels_last(enabled: bool) -> None:
    """Process-wide, like torch's thread count: set once per stage from ``trainer.channels_last``."""
    global _channels_last
    _channels_last = bool(enabled)


def channels_last_enabled() -> bool:
    return _channels_last


def to_encoder_layout(images: Tensor) -> Tensor:
    """A 4-D image batch in channels-last layout when that is on (a no-op if it already is)."""
    if _channels_last and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images
