"""Nested, class-covering subsets of a labelled split.

The SLC sweep draws its n target samples with :func:`draw_subset`, and quick runs shrink a
domain with the same draw (``data.train_limit``): one sample per class first, the rest
uniform, and nested in n for one seed.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ntp_ssl.data.ops import split_by_class
from ntp_ssl.errors import ConfigError, DataError


def check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name} {value!r} is not a positive integer")
    return int(value)


def subset_order(labels: np.ndarray, *, seed: int) -> np.ndarray:
    """The fixed order in which a seed draws samples; a subset of size n is its first n.

    Two permutations come from ``numpy.random.default_rng(seed)``. The first picks one
    representative per class present (the class's earliest index in it); these form the
    prefix, by ascending class. The second orders everything else (uniform without
    replacement over the non-representatives). Because every n takes a prefix of the same
    order, the subset for a smaller n is contained in the subset for a larger n.
    """
    labels = _check_labels(labels)
    rng = np.random.default_rng(seed)
    pick_perm = rng.permutation(labels.size)
    rest_perm = rng.permutation(labels.size)
    # First occurrence of each class along pick_perm; np.unique returns classes ascending.
    _, first = np.unique(labels[pick_perm], return_index=True)
    representatives = pick_perm[first]
    is_rep = np.zeros(labels.size, dtype=bool)
    is_rep[representatives] = True
    rest = rest_perm[~is_rep[rest_perm]]
    return np.concatenate([representatives, rest]).astype(np.int64)


def draw_subset(labels: np.ndarray, n: int, *, seed: int, num_classes: int) -> np.ndarray:
    """Sorted int64 indices of n samples: one per class present, the rest uniform.

    Deterministic for (labels, n, seed) and nested in n for one seed: it is the first n
    entries of :func:`subset_order`. Requires ``C <= n <= len(labels)``.
    """
    labels = _check_labels(labels)
    num_classes = check_count("number of classes C", num_classes)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ConfigError(f"subset size n {n!r} is not an integer")
    if n < num_classes or n > labels.size:
        raise ConfigError(
            f"subset size n={n} is outside [{num_classes}, {labels.size}]; accepted: "
            f"at least one per class (C={num_classes}) and at most the {labels.size} samples"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise DataError(f"label {int(bad)} is outside 0..{num_classes - 1} (C={num_classes} classes)")
    return np.sort(subset_order(labels, seed=seed)[: int(n)])


def _check_labels(labels: np.ndarray) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise DataError(f"labels of shape {array.shape} and dtype {array.dtype} are not a 1-D integer array")
    return array.astype(np.int64, copy=False)


def check_val_fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"val_fraction {value!r} is not a number; accepted: a number in (0, 1)")
    fraction = float(value)
    if not (0.0 < fraction < 1.0):  # also False for NaN
        raise ConfigError(f"val_fraction {fraction!r} is outside (0, 1); accepted: a number in (0, 1)")
    return fraction


def check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"seed {seed!r} is not accepted; accepted: an integer >= 0")
    return int(seed)


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


def stratified_split(labels: np.ndarray, val_fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted int64 index arrays ``(fit, val)`` with every class present on both sides.

    Per class with ``count >= 2`` samples, ``clip(round(val_fraction * count), 1, count - 1)``
    samples chosen uniformly go to val (``round`` is half-up, as in the SLC grid); a class
    with a single sample stays in fit (:func:`ntp_ssl.data.ops.split_by_class`, one
    permutation per class from ``numpy.random.default_rng(seed)``). ConfigError when no class
    has two samples, so no validation sample can be drawn.
    """
    fraction, seed = check_val_fraction(val_fraction), check_seed(seed)
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ConfigError(f"labels must be a non-empty 1-d array, got shape {labels.shape}")
    fit_parts, val_parts = split_by_class(labels, fraction, np.random.default_rng(seed), rounding=_half_up)
    if not any(len(part) for part in val_parts):
        raise ConfigError(
            f"no class among {len(labels)} labels has 2 or more samples, so no validation sample can be drawn; "
            "accepted: at least one class with 2 samples"
        )
    return np.sort(np.concatenate(fit_parts)).astype(np.int64), np.sort(np.concatenate(val_parts)).astype(np.int64)
