"""Sample-wise learning curves (SLC) and SLC-AUC, as pure functions.

An SLC sweep trains an attacker on ``n = r * N`` target samples for each fraction ``r``
of a grid and records the test accuracy ``a(r)``. The area under that curve over
natural-log fractions, minus the same area for a model trained from scratch, is the
SLC-AUC of the NTP paper (Ding et al., ECCV 2024): below zero, the released encoder is a
worse start than no encoder at all.

Nothing here trains anything; the sweep runner feeds these functions its numbers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import numpy as np

from ntp_ssl.data.subsets import check_count
from ntp_ssl.errors import ConfigError

# --------------------------------------------------------------------------- grid and n


def _check_fraction(value: object) -> float:
    """``value`` as a float in (0, 1], or ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"SLC fraction {value!r} is not a number; accepted: numbers in (0, 1]")
    r = float(value)
    if not (0.0 < r <= 1.0):  # also False for NaN
        raise ConfigError(f"SLC fraction {r!r} is outside (0, 1]; accepted: numbers in (0, 1]")
    return r


def validate_grid(fractions: Sequence[float]) -> tuple[float, ...]:
    """The grid as sorted, de-duplicated floats; every fraction must lie in (0, 1]."""
    if isinstance(fractions, (str, bytes, dict)) or not isinstance(fractions, Iterable):
        raise ConfigError(f"SLC grid {fractions!r} is not a list; accepted: a list of numbers in (0, 1]")
    grid = sorted({_check_fraction(r) for r in fractions})
    if not grid:
        raise ConfigError("SLC grid [] is empty; accepted: a non-empty list of numbers in (0, 1]")
    return tuple(grid)


def samples_for_fraction(fraction: float, n_total: int, num_classes: int) -> int:
    """Number of target samples for fraction r: ``n = min(max(round(r * N), C), N)``.

    ``round`` is half-up (``floor(r * N + 0.5)``), not Python's half-to-even, so that
    ``r * N = 2.5`` gives 3. At least one sample per class; ``N < C`` is a ConfigError.
    """
    r = _check_fraction(fraction)
    n_total = check_count("target sample count N", n_total)
    num_classes = check_count("number of classes C", num_classes)
    if n_total < num_classes:
        raise ConfigError(
            f"target has {n_total} samples, fewer than its {num_classes} classes; "
            "accepted: at least one sample per class"
        )
    n = math.floor(r * n_total + 0.5)
    return min(max(n, num_classes), n_total)


# --------------------------------------------------------------------------- areas


def _curve(fractions: Sequence[float], accuracies: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Fractions and accuracies as float arrays sorted by fraction, validated."""
    rs = [_check_fraction(r) for r in fractions]
    accs = [float(a) for a in accuracies]
    if len(rs) != len(accs):
        raise ConfigError(f"{len(rs)} fractions but {len(accs)} accuracies; accepted: one accuracy per fraction")
    if not rs:
        raise ConfigError("learning curve is empty; accepted: at least one (fraction, accuracy) point")
    if len(set(rs)) != len(rs):
        raise ConfigError(f"fractions {rs} repeat a value; accepted: each fraction once")
    for a in accs:
        if not math.isfinite(a):
            raise ConfigError(f"accuracy {a!r} is not finite; accepted: finite numbers")
    order = np.argsort(rs, kind="stable")
    return np.asarray(rs)[order], np.asarray(accs)[order]


def learning_curve_auc(fractions: Sequence[float], accuracies: Sequence[float]) -> float:
    """Trapezoid area over natural-log fractions.

    ``AUC = sum_{i>=1} (ln r_i - ln r_{i-1}) * (a_i + a_{i-1}) / 2`` with points sorted by
    r; a single point has area 0.
    """
    r, a = _curve(fractions, accuracies)
    if r.size == 1:
        return 0.0
    widths = np.diff(np.log(r))
    heights = (a[1:] + a[:-1]) / 2.0
    return float(np.sum(widths * heights))


def slc_auc(
    fractions: Sequence[float],
    model_accuracies: Sequence[float],
    scratch_accuracies: Sequence[float],
    *,
    normalize: bool = False,
) -> float:
    """SLC-AUC = AUC(model) - AUC(scratch) on one grid; below 0 means non-transferable.

    ``normalize`` divides by ``ln(r_max / r_min)``, the width of the grid, so the value
    is a mean accuracy gap; a one-point grid has width 0 and gives 0.0.
    """
    if len(model_accuracies) != len(scratch_accuracies) or len(fractions) != len(model_accuracies):
        raise ConfigError(
            f"{len(fractions)} fractions, {len(model_accuracies)} model and {len(scratch_accuracies)} "
            "scratch accuracies; accepted: one model and one scratch accuracy per fraction"
        )
    area = learning_curve_auc(fractions, model_accuracies) - learning_curve_auc(fractions, scratch_accuracies)
    if not normalize:
        return area
    width = math.log(max(fractions) / min(fractions))
    return area / width if width > 0 else 0.0


# --------------------------------------------------------------------------- statistics


def student_t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t for p in [0.5, 1), without scipy.

    With ``t = sqrt(df) * tan(theta)`` the CDF becomes
    ``F(t) = 1/2 + c * integral_0^theta cos(phi)^(df-1) dphi``,
    ``c = Gamma((df+1)/2) / (sqrt(pi) * Gamma(df/2))``, a smooth bounded integrand that
    Simpson's rule integrates closely; theta is found by bisection.
    """
    if not (0.5 <= p < 1.0) or not (df > 0):
        raise ConfigError(f"t quantile needs p in [0.5, 1) and df > 0, got p={p!r}, df={df!r}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(math.pi)
    steps = 2000  # even, for Simpson's rule
    weights = np.ones(steps + 1)
    weights[1:-1:2] = 4.0
    weights[2:-1:2] = 2.0

    def cdf_minus_p(theta: float) -> float:
        phi = np.linspace(0.0, theta, steps + 1)
        integral = theta / (3 * steps) * float(np.dot(weights, np.cos(phi) ** (df - 1)))
        return 0.5 + math.exp(log_c) * integral - p

    lo, hi = 0.0, math.pi / 2
    for _ in range(80):  # interval shrinks to pi/2 * 2^-80, far below float spacing of t
        mid = (lo + hi) / 2
        if cdf_minus_p(mid) < 0:
            lo = mid
        else:
            hi = mid
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def mean_ci95(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """Mean and Student-t 95% interval: ``mean -/+ t_{0.975, n-1} * s / sqrt(n)``.

    ``s`` is the sample standard deviation (ddof=1). Returns ``(mean, low, high)``; one
    value gives ``(v, None, None)``: with one seed there is no spread to estimate, and a
    zero-width interval would read as certainty.
    """
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0:
        raise ConfigError("mean_ci95 got no values; accepted: at least one number")
    mean = float(np.mean(x))
    if x.size == 1:
        return mean, None, None
    half = student_t_quantile(0.975, x.size - 1) * float(np.std(x, ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half
