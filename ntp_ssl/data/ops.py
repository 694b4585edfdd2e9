"""Array helpers shared by the domain builders: seeded generators, splits, resizing, channels."""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
from PIL import Image

# ITU-R BT.601 luma weights in 16-bit fixed point, the same integer formula PIL uses for "L".
_LUMA_FIXED = np.array([19595, 38470, 7471], dtype=np.uint32)


def rng_for(seed: int, *keys: str) -> np.random.Generator:
    """A generator seeded by ``seed`` and named ``keys``: independent streams per purpose."""
    words = [int(seed)] + [zlib.crc32(key.encode("utf-8")) for key in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


def split_by_class(labels: np.ndarray, fraction: float, rng: np.random.Generator, *,
                   rounding=round) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per class, in ascending order, a seeded permutation of its indices cut in two: the first
    ``rounding(n_c * fraction)`` are held out, clipped so that a class with at least two
    samples keeps at least one on each side; a lone sample stays on the kept side (permuting
    one element draws nothing from ``rng``). Returns (kept parts, held-out parts), per class."""
    kept, held = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_held = min(max(int(rounding(len(idx) * fraction)), 1), len(idx) - 1) if len(idx) >= 2 else 0
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return kept, held


def stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices class by class: ``round(n_c * test_fraction)`` of each class go to test.

    A class with at least two samples keeps at least one on each side; a lone sample goes to
    train. Both index arrays come back in a random (seeded) order. (Python's rounding, half to
    even: every cached domain was split with it.)
    """
    train, test = split_by_class(labels, test_fraction, rng)
    train_idx = rng.permutation(np.concatenate(train)) if train else np.zeros(0, np.int64)
    test_idx = rng.permutation(np.concatenate(test)) if test else np.zeros(0, np.int64)
    return train_idx.astype(np.int64), test_idx.astype(np.int64)


def to_grey(images: np.ndarray) -> np.ndarray:
    """RGB (..., 3) uint8 -> (..., 1) uint8 by BT.601 luminance."""
    weighted = images.astype(np.uint32) @ _LUMA_FIXED
    return ((weighted + 0x8000) >> 16).astype(np.uint8)[..., None]


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize one HWC uint8 image to ``size`` x ``size``: shorter side to ``size``, then centre crop.

    Bilinear with PIL's antialiasing when shrinking; a square image is simply resized.
    """
    h, w, c = image.shape
    if h == size and w == size:
        return image
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    pil = pil.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    pil = pil.crop((left, top, left + size, top + size))
    out = np.asarray(pil, dtype=np.uint8)
    return out[..., None] if c == 1 else out


def conform(images: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, image_size, image_size, channels) uint8.

    Grey becomes RGB by replication, RGB becomes grey by luminance; converting to grey happens
    before resizing and replication after, so the resize always works on the fewest channels.
    """
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 3 and channels == 1:
        images = to_grey(images)
    n, h, w, c = images.shape
    if (h, w) != (image_size, image_size):
        out = np.empty((n, image_size, image_size, c), dtype=np.uint8)
        for i in range(n):
            out[i] = resize_image(images[i], image_size)
        images = out
    if c == 1 and channels == 3:
        images = np.repeat(images, 3, axis=-1)
    return np.ascontiguousarray(images, dtype=np.uint8)


def content_hash(*arrays: np.ndarray) -> str:
    """SHA-256 over the shapes, dtypes and bytes of ``arrays`` (detects any changed value)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.data)
    return digest.hexdigest()
