"""The Domain type, the normalisation every model input shares, and a torch Dataset over arrays."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ntp_ssl.errors import ConfigError, DataError


@dataclass(frozen=True, eq=False)
class Domain:
    """A labelled image dataset with a train and a test split, in one common format.

    Images are uint8 ``(N, H, W, C)`` with ``H == W == image_size`` and ``C`` in {1, 3};
    labels are int64 ``(N,)`` in ``[0, num_classes)``. The arrays are read-only views.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 1:
            raise DataError(f"domain {self.name!r}: num_classes must be a positive int, got {self.num_classes!r}")
        object.__setattr__(self, "num_classes", int(self.num_classes))
        if self.class_names and len(self.class_names) != self.num_classes:
            raise DataError(
                f"domain {self.name!r}: {len(self.class_names)} class names for {self.num_classes} classes"
            )
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        shape = None
        for split in ("train", "test"):
            images = np.asarray(getattr(self, f"{split}_images"))
            labels = np.asarray(getattr(self, f"{split}_labels"))
            square = images.ndim == 4 and images.shape[1] == images.shape[2] and images.shape[3] in (1, 3)
            if images.dtype != np.uint8 or not square:
                raise DataError(
                    f"domain {self.name!r}: {split} images must be uint8 (N, S, S, 1 or 3), "
                    f"got {images.dtype} {images.shape}"
                )
            if shape is not None and images.shape[1:] != shape:
                raise DataError(f"domain {self.name!r}: train images are {shape}, test images {images.shape[1:]}")
            shape = images.shape[1:]
            if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
                raise DataError(
                    f"domain {self.name!r}: {split} labels must be integers of shape ({len(images)},), "
                    f"got {labels.dtype} {labels.shape}"
                )
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise DataError(
                    f"domain {self.name!r}: {split} labels span [{labels.min()}, {labels.max()}], "
                    f"expected [0, {self.num_classes - 1}]"
                )
            object.__setattr__(self, f"{split}_images", _read_only(images))
            object.__setattr__(self, f"{split}_labels", _read_only(labels.astype(np.int64, copy=False)))
        if len(self.train_images) == 0:
            raise DataError(f"domain {self.name!r} has no training images")

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[3])

    def check_measurable(self) -> None:
        """A domain accuracy can be measured on: test images, and two classes or more in its train
        split (an empty test split would score 0.0, a single class scores 1.0, both silently)."""
        if len(self.test_labels) == 0:
            raise DataError(f"domain {self.name!r} has no test images; accepted: a test split with at least one "
                            "image (or no test split at all in a folder:/npz: domain, to have one drawn)")
        present = np.unique(self.train_labels)
        if len(present) < 2:
            raise DataError(f"domain {self.name!r} has a single class ({int(present[0])}) in its train split; "
                            "accepted: two classes or more")

    def content_digest(self) -> str:
        """SHA-256 of the pixels, labels and class count of both splits (computed once): what a
        cache keyed on this domain must match, whatever the domain is called."""
        cached = self.__dict__.get("_content_digest")
        if cached is None:
            digest = hashlib.sha256(f"classes={self.num_classes}".encode())
            for array in (self.train_images, self.train_labels, self.test_images, self.test_labels):
                digest.update(f"{array.dtype}{array.shape}".encode())
                digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
            cached = digest.hexdigest()
            object.__setattr__(self, "_content_digest", cached)
        return cached

    def describe(self) -> dict[str, Any]:
        """Name, sizes and per-class counts, as plain JSON-ready values."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "image_size": self.image_size,
            "channels": self.channels,
            "train_size": int(len(self.train_labels)),
            "test_size": int(len(self.test_labels)),
            "train_per_class": np.bincount(self.train_labels, minlength=self.num_classes).tolist(),
            "test_per_class": np.bincount(self.test_labels, minlength=self.num_classes).tolist(),
        }

    def __repr__(self) -> str:
        return (
            f"Domain({self.name!r}, train={len(self.train_labels)}, test={len(self.test_labels)}, "
            f"classes={self.num_classes}, {self.image_size}px x {self.channels}ch)"
        )


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def normalize_stats(channels: int) -> dict[str, list[float]]:
    """Per-channel mean and std that map [0, 1] pixels to [-1, 1]: ``x_norm = (x - mean) / std``."""
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
    return {"mean": [0.5] * channels, "std": [0.5] * channels}


def to_float_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` (or one ``(H, W, C)``) -> float32 ``(N, C, H, W)`` (or ``(C, H, W)``).

    Normalised with :func:`normalize_stats`: ``(x / 255 - mean) / std``, so pixels land in [-1, 1].
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(f"expected uint8 images of shape (N, H, W, C) or (H, W, C), got {images.dtype} {images.shape}")
    stats = normalize_stats(images.shape[-1])
    tensor = torch.tensor(images).movedim(-1, -3).float().div_(255.0)  # torch.tensor copies: inputs may be read-only
    shape = (-1, 1, 1)
    mean = torch.tensor(stats["mean"]).view(shape)
    std = torch.tensor(stats["std"]).view(shape)
    return tensor.sub_(mean).div_(std).contiguous()


class ImageArrayDataset(torch.utils.data.Dataset):
    """Dataset over uint8 NHWC images and integer labels.

    ``__getitem__`` returns ``(transform(PIL image), label)`` when a transform is given (mode
    "L" for one channel, "RGB" for three), else ``(normalised CHW float tensor, label)``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None) -> None:
        images, labels = np.asarray(images), np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
            raise DataError(f"images must be uint8 (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"labels must have shape ({len(images)},), got {labels.shape}")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        label = int(self.labels[index])
        if self.transform is None:
            return to_float_tensor(image), label
        pil = Image.fromarray(np.ascontiguousarray(image[..., 0] if image.shape[2] == 1 else image))
        return self.transform(pil), label
