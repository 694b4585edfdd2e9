"""Domains from outside the package: torchvision datasets, image folders and ``.npz`` files.

Each loader returns a :class:`Domain` already resized to ``image_size`` with ``channels``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ntp_ssl.data.domain import Domain
from ntp_ssl.data.ops import conform, resize_image, rng_for, stratified_split
from ntp_ssl.errors import DataError

TEST_FRACTION = 0.2
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- torchvision


def _tv_split(name: str, root: str, train: bool, download: bool):
    """Instantiate the torchvision dataset of ``name`` for one split."""
    from torchvision import datasets

    if name == "tv-mnist":
        return datasets.MNIST(root, train=train, download=download)
    if name == "usps":
        return datasets.USPS(root, train=train, download=download)
    if name == "svhn":
        return datasets.SVHN(root, split="train" if train else "test", download=download)
    if name == "cifar10":
        return datasets.CIFAR10(root, train=train, download=download)
    if name == "stl10":
        return datasets.STL10(root, split="train" if train else "test", download=download)
    raise AssertionError(name)


def _tv_arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC images, int64 labels) from a torchvision dataset's in-memory arrays."""
    data = dataset.data
    data = data.numpy() if hasattr(data, "numpy") else np.asarray(data)
    if data.ndim == 4 and data.shape[1] == 3 and data.shape[3] != 3:  # SVHN and STL-10 store NCHW
        data = data.transpose(0, 2, 3, 1)
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = dataset.labels
    labels = labels.numpy() if hasattr(labels, "numpy") else np.asarray(labels)
    return np.ascontiguousarray(data, dtype=np.uint8), labels.astype(np.int64)


def load_torchvision(name: str, root: str | Path, download: bool, image_size: int, channels: int) -> Domain:
    """A torchvision dataset with its own train/test splits, read from ``root`` (downloaded there if asked)."""
    root = str(Path(root).expanduser())
    splits = {}
    for split in ("train", "test"):
        try:
            dataset = _tv_split(name, root, split == "train", download)
        except Exception as exc:  # torchvision raises RuntimeError, OSError, URLError, ... for a missing dataset
            if download:
                raise DataError(f"could not download {name} into data.root={root!r}: {_one_line(exc)}") from exc
            raise DataError(
                f"{name} not found under data.root={root!r} ({_one_line(exc)}); "
                f"pass data.root=<folder holding it> or data.download=true"
            ) from exc
        images, labels = _tv_arrays(dataset)
        splits[split] = (conform(images, image_size, channels), labels)
    classes = tuple(getattr(dataset, "classes", None) or ())
    num_classes = len(classes) if classes else int(max(splits["train"][1].max(), splits["test"][1].max()) + 1)
    if name == "svhn":  # torchvision maps SVHN's "10" to 0, so the classes are the digits
        classes, num_classes = tuple(str(d) for d in range(10)), 10
    return Domain(
        name=name,
        train_images=splits["train"][0],
        train_labels=splits["train"][1],
        test_images=splits["test"][0],
        test_labels=splits["test"][1],
        num_classes=num_classes,
        class_names=classes if len(classes) == num_classes else (),
    )


# --------------------------------------------------------------------------- image folder


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = (f for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        files += [Path(dirpath, f) for f in names]
    return files


MAX_IMAGE_PIXELS = 4096 * 4096  # decoded at full size before resizing: a bigger file costs gigabytes


def _read_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    try:
        with Image.open(path) as pil:  # reads the header only
            if pil.width * pil.height > MAX_IMAGE_PIXELS:
                raise DataError(f"image {str(path)!r} is {pil.width}x{pil.height}; accepted: up to "
                                f"{MAX_IMAGE_PIXELS} pixels (e.g. 4096x4096)")
            pil = pil.convert("L" if channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {str(path)!r}: {_one_line(exc)}") from exc
    array = np.asarray(pil, dtype=np.uint8)
    return resize_image(array[..., None] if array.ndim == 2 else array, image_size)


def _read_classes(folder: Path, classes: list[str], image_size: int, channels: int, require_all: bool):
    images, labels = [], []
    for label, cls in enumerate(classes):
        files = _image_files(folder / cls) if (folder / cls).is_dir() else []
        if not files and require_all:
            raise DataError(
                f"class folder {str(folder / cls)!r} has no images (accepted extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )
        images += [_read_image(f, image_size, channels) for f in files]
        labels += [label] * len(files)
    shape = (0, image_size, image_size, channels)
    return (np.stack(images) if images else np.zeros(shape, np.uint8)), np.asarray(labels, dtype=np.int64)


def load_folder(path: str | Path, image_size: int, channels: int, seed: int, name: str) -> Domain:
    """Class sub-folders of images; ``train/`` and ``test/`` sub-folders, when both exist, are the splits.

    Without them, a stratified split (20% test) drawn from ``seed``.
    """
    folder = Path(path).expanduser()
    shown = repr(str(folder))
    if not folder.is_dir():
        raise DataError(f"image folder {shown} does not exist; expected folder:/path/with/a/sub-folder/per/class")
    has_train, has_test = (folder / "train").is_dir(), (folder / "test").is_dir()
    if has_train != has_test:  # else "train" (or "test") would become a class of its own
        raise DataError(f"{str(folder)!r} has a {'train' if has_train else 'test'}/ folder but no "
                        f"{'test' if has_train else 'train'}/; accepted: both split folders, or class folders only")
    if has_train and has_test:
        classes = [p.name for p in _class_dirs(folder / "train")]
        extra = sorted(set(p.name for p in _class_dirs(folder / "test")) - set(classes))
        if extra:
            raise DataError(f"test classes {extra} of {shown} are missing from train/ (train classes: {classes})")
        if not classes:
            raise DataError(f"{str(folder / 'train')!r} has no class sub-folders")
        train_x, train_y = _read_classes(folder / "train", classes, image_size, channels, require_all=True)
        test_x, test_y = _read_classes(folder / "test", classes, image_size, channels, require_all=False)
    else:
        classes = [p.name for p in _class_dirs(folder)]
        if not classes:
            raise DataError(f"image folder {shown} has no class sub-folders (expected one folder of images per class)")
        images, labels = _read_classes(folder, classes, image_size, channels, require_all=True)
        train, test = stratified_split(labels, TEST_FRACTION, rng_for(seed, "folder", "split"))
        train_x, train_y, test_x, test_y = images[train], labels[train], images[test], labels[test]
    return Domain(name, train_x, train_y, test_x, test_y, num_classes=len(classes), class_names=tuple(classes))


# --------------------------------------------------------------------------- npz file


def _npz_images(array: np.ndarray, key: str, path: Path) -> np.ndarray:
    if array.dtype != np.uint8:
        raise DataError(f"{str(path)!r}: {key!r} must be uint8 pixels 0..255, got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[3] not in (1, 3):
        raise DataError(f"{str(path)!r}: {key!r} must have shape (N, H, W) or (N, H, W, 1|3), got {array.shape}")
    if len(array) and min(array.shape[1:3]) < 1:
        raise DataError(f"{str(path)!r}: {key!r} has empty images of shape {array.shape}")
    return array


MAX_CLASSES = 100_000


def _npz_labels(array: np.ndarray, key: str, path: Path, n: int, images_key: str) -> np.ndarray:
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{str(path)!r}: {key!r} must be 1-D integer labels, got {array.dtype} {array.shape}")
    if len(array) != n:
        raise DataError(f"{str(path)!r}: {key!r} has {len(array)} labels but {images_key!r} has {n} images")
    if n and array.min() < 0:
        raise DataError(f"{str(path)!r}: {key!r} has negative label {array.min()}; labels must be 0..num_classes-1")
    if n and array.max() >= MAX_CLASSES:  # the class count is max + 1: 1e12 would allocate terabytes later
        raise DataError(f"{str(path)!r}: {key!r} has label {array.max()}; accepted: labels 0..{MAX_CLASSES - 1}")
    return array.astype(np.int64)


def load_npz(path: str | Path, image_size: int, channels: int, seed: int, name: str) -> Domain:
    """``x`` (N, H, W[, C]) uint8 and ``y`` (N,) ints; ``x_test``/``y_test`` if present, else a seeded 80/20 split."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"npz file {str(file)!r} does not exist; expected npz:/path/to/file.npz with arrays x and y")
    try:
        with open(file, "rb") as handle, np.load(handle, allow_pickle=False) as npz:  # own handle: closed on any error
            arrays = {key: npz[key] for key in npz.files}
    except Exception as exc:  # not a zip, truncated, object arrays, ...
        if isinstance(exc, ValueError) and "Object arrays" in str(exc):  # numpy's words for an object array
            # object arrays are pickles, which are never loaded (they can run code): say what to save instead
            raise DataError(f"{str(file)!r} holds object arrays (pickled Python objects), which are never loaded; "
                            "save x (N, H, W[, C]) uint8 and y (N,) integers as plain arrays") from exc
        raise DataError(f"cannot read {str(file)!r} as an .npz of arrays: {_one_line(exc)}") from exc
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"{str(file)!r} lacks {missing}; it has {sorted(arrays)}; needs x, y (optionally x_test, y_test)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{str(file)!r} has only one of x_test / y_test; give both or neither")
    x = _npz_images(arrays["x"], "x", file)
    y = _npz_labels(arrays["y"], "y", file, len(x), "x")
    if len(x) == 0:
        raise DataError(f"{str(file)!r}: 'x' holds no images")
    if "x_test" in arrays:
        x_test = _npz_images(arrays["x_test"], "x_test", file)
        y_test = _npz_labels(arrays["y_test"], "y_test", file, len(x_test), "x_test")
        train_x, train_y, test_x, test_y = x, y, x_test, y_test
    else:
        train, test = stratified_split(y, TEST_FRACTION, rng_for(seed, "npz", "split"))
        train_x, train_y, test_x, test_y = x[train], y[train], x[test], y[test]
    num_classes = int(max(train_y.max(initial=0), test_y.max(initial=0)) + 1)
    return Domain(
        name,
        conform(train_x, image_size, channels),
        train_y,
        conform(test_x, image_size, channels),
        test_y,
        num_classes=num_classes,
    )
