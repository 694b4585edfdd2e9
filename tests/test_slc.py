"""SLC grid, subset drawing, SLC-AUC and confidence intervals against hand-computed values."""

import math

import numpy as np
import pytest

from ntp_ssl.errors import ConfigError, DataError
from ntp_ssl.config import PAPER_GRID
from ntp_ssl.data.subsets import draw_subset, subset_order
from ntp_ssl.evaluate.slc import (
    learning_curve_auc,
    mean_ci95,
    samples_for_fraction,
    slc_auc,
    student_t_quantile,
    validate_grid,
)

LN2 = math.log(2.0)
GRID = (0.1, 0.2, 0.8)  # ln gaps: ln(0.2/0.1) = ln 2, ln(0.8/0.2) = ln 4 = 2 ln 2


# --------------------------------------------------------------------------- grid


def test_paper_grid_is_valid_and_sorted():
    assert validate_grid(PAPER_GRID) == PAPER_GRID
    assert len(PAPER_GRID) == 10


def test_validate_grid_sorts_and_deduplicates():
    assert validate_grid([0.5, 0.01, 1, 0.5, np.float32(0.25)]) == (0.01, 0.25, 0.5, 1.0)
    assert all(type(r) is float for r in validate_grid([1, np.float64(0.5)]))


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), "0.1", None, True])
def test_validate_grid_rejects_bad_fraction(bad):
    with pytest.raises(ConfigError) as info:
        validate_grid([0.1, bad])
    message = str(info.value)
    assert "\n" not in message and "(0, 1]" in message and repr(bad)[:3] in message


@pytest.mark.parametrize("bad", [[], (), "0.1"])
def test_validate_grid_rejects_empty_or_not_a_list(bad):
    with pytest.raises(ConfigError):
        validate_grid(bad)


def test_samples_for_fraction():
    assert samples_for_fraction(0.001, 5000, 10) == 10  # round(5) = 5 -> raised to C = 10
    assert samples_for_fraction(0.01, 5000, 10) == 50
    assert samples_for_fraction(0.5, 1797, 10) == 899  # 898.5 rounds half-up
    assert samples_for_fraction(0.005, 1797, 10) == 10  # 8.985 -> 9 -> raised to 10
    assert samples_for_fraction(1.0, 1797, 10) == 1797
    assert samples_for_fraction(0.5, 10, 10) == 10  # never above N
    for r in PAPER_GRID:
        assert 10 <= samples_for_fraction(r, 1797, 10) <= 1797


def test_samples_for_fraction_errors():
    with pytest.raises(ConfigError, match="target has 7 samples, fewer than its 10 classes"):
        samples_for_fraction(0.5, 7, 10)
    with pytest.raises(ConfigError, match="outside"):
        samples_for_fraction(0.0, 100, 10)
    with pytest.raises(ConfigError, match="positive integer"):
        samples_for_fraction(0.5, 100, 0)


# --------------------------------------------------------------------------- subsets


def _imbalanced_labels() -> np.ndarray:
    # 10 classes: class 9 has a single sample, class 0 has 100, the others 11 each.
    labels = np.concatenate([np.zeros(100, int), np.repeat(np.arange(1, 9), 11), [9]])
    return np.random.default_rng(123).permutation(labels)


def test_draw_subset_deterministic_sorted_int64():
    labels = _imbalanced_labels()
    a = draw_subset(labels, 30, seed=7, num_classes=10)
    b = draw_subset(labels.copy(), 30, seed=7, num_classes=10)
    assert a.dtype == np.int64 and np.array_equal(a, b)
    assert np.all(np.diff(a) > 0)  # sorted and unique
    assert a.size == 30


def test_draw_subset_covers_every_class():
    labels = _imbalanced_labels()
    for seed in range(50):
        subset = draw_subset(labels, 10, seed=seed, num_classes=10)
        assert sorted(labels[subset]) == list(range(10))


def test_draw_subset_covers_classes_present_when_one_is_missing():
    labels = np.repeat([0, 1, 2, 4], 5)  # class 3 absent, C = 5
    subset = draw_subset(labels, 5, seed=0, num_classes=5)
    assert set(labels[subset]) == {0, 1, 2, 4}


def test_draw_subset_is_nested_in_n():
    labels = _imbalanced_labels()
    for seed in (0, 1, 2):
        previous = set()
        for n in range(10, labels.size + 1):
            current = set(draw_subset(labels, n, seed=seed, num_classes=10).tolist())
            assert previous <= current and len(current) == n
            previous = current
        assert previous == set(range(labels.size))
    order = subset_order(labels, seed=0)
    assert sorted(order.tolist()) == list(range(labels.size))  # a permutation


def test_draw_subset_differs_across_seeds():
    labels = _imbalanced_labels()
    a = draw_subset(labels, 40, seed=0, num_classes=10)
    b = draw_subset(labels, 40, seed=1, num_classes=10)
    assert not np.array_equal(a, b)


def test_draw_subset_rest_is_roughly_uniform():
    # Balanced: 100 samples, 10 per class, n = 20 -> every index is drawn with probability 0.2.
    labels = np.repeat(np.arange(10), 10)
    counts = np.zeros(labels.size)
    seeds = 1000
    for seed in range(seeds):
        counts[draw_subset(labels, 20, seed=seed, num_classes=10)] += 1
    frequency = counts / seeds
    assert np.all(np.abs(frequency - 0.2) < 0.06)  # ~5 standard deviations of a binomial(1000, 0.2)


def test_draw_subset_rejects_bad_n_and_labels():
    labels = _imbalanced_labels()
    with pytest.raises(ConfigError, match="n=9"):
        draw_subset(labels, 9, seed=0, num_classes=10)
    with pytest.raises(ConfigError, match=f"n={labels.size + 1}"):
        draw_subset(labels, labels.size + 1, seed=0, num_classes=10)
    with pytest.raises(ConfigError):
        draw_subset(labels, 10.5, seed=0, num_classes=10)
    with pytest.raises(DataError, match="label 10"):
        draw_subset(np.array([0, 1, 10]), 3, seed=0, num_classes=3)
    with pytest.raises(DataError):
        draw_subset(np.zeros((3, 2), int), 3, seed=0, num_classes=1)


# --------------------------------------------------------------------------- AUC


def test_learning_curve_auc_by_hand_on_three_points():
    # (ln 0.2 - ln 0.1) * (0.3 + 0.5) / 2 + (ln 0.8 - ln 0.2) * (0.5 + 0.9) / 2
    #  = ln2 * 0.4 + 2 ln2 * 0.7 = 1.8 ln2 = 1.2476649...
    assert learning_curve_auc(GRID, [0.3, 0.5, 0.9]) == pytest.approx(1.8 * LN2, abs=1e-12)
    assert learning_curve_auc(GRID, [0.3, 0.5, 0.9]) == pytest.approx(1.2476649250079015, abs=1e-12)
    # Even decades: (ln 0.1 - ln 0.01) * (0.2+0.5)/2 + (ln 1 - ln 0.1) * (0.5+0.9)/2 = 1.05 ln 10
    assert learning_curve_auc([0.01, 0.1, 1.0], [0.2, 0.5, 0.9]) == pytest.approx(1.05 * math.log(10), abs=1e-12)


def test_learning_curve_auc_sorts_points_and_matches_a_slow_reference():
    rng = np.random.default_rng(0)
    fractions = list(PAPER_GRID)
    accuracies = rng.uniform(0, 1, len(fractions)).tolist()
    reference = 0.0
    for i in range(1, len(fractions)):
        reference += (math.log(fractions[i]) - math.log(fractions[i - 1])) * (accuracies[i] + accuracies[i - 1]) / 2
    assert learning_curve_auc(fractions, accuracies) == pytest.approx(reference, abs=1e-12)
    shuffled = rng.permutation(len(fractions))
    assert learning_curve_auc([fractions[i] for i in shuffled], [accuracies[i] for i in shuffled]) == pytest.approx(
        reference, abs=1e-12
    )


def test_learning_curve_auc_single_point_and_constant():
    assert learning_curve_auc([0.5], [0.9]) == 0.0
    # a constant curve a over [r_min, r_max] has area a * ln(r_max / r_min)
    assert learning_curve_auc(PAPER_GRID, [0.7] * 10) == pytest.approx(0.7 * math.log(1000), abs=1e-12)


def test_learning_curve_auc_rejects_bad_input():
    with pytest.raises(ConfigError, match="2 fractions but 3 accuracies"):
        learning_curve_auc([0.1, 0.2], [0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match="empty"):
        learning_curve_auc([], [])
    with pytest.raises(ConfigError, match="repeat"):
        learning_curve_auc([0.1, 0.1], [0.1, 0.2])
    with pytest.raises(ConfigError, match="outside"):
        learning_curve_auc([0.0, 0.1], [0.1, 0.2])
    with pytest.raises(ConfigError, match="not finite"):
        learning_curve_auc([0.1, 0.2], [0.1, float("nan")])


def test_slc_auc_by_hand_on_three_points():
    model = [0.3, 0.5, 0.9]  # AUC = 1.8 ln2 (above)
    scratch = [0.5, 0.6, 0.7]  # AUC = ln2 * (0.5+0.6)/2 + 2 ln2 * (0.6+0.7)/2 = 0.55 ln2 + 1.3 ln2 = 1.85 ln2
    raw = slc_auc(GRID, model, scratch)
    assert raw == pytest.approx(-0.05 * LN2, abs=1e-12)  # 1.8 ln2 - 1.85 ln2 = -0.0346574
    assert raw < 0  # the model curve is below scratch on average: non-transferable
    # normalised: divided by ln(0.8 / 0.1) = ln 8 = 3 ln2 -> -0.05 / 3
    assert slc_auc(GRID, model, scratch, normalize=True) == pytest.approx(-0.05 / 3, abs=1e-12)
    assert slc_auc(GRID, scratch, model) == pytest.approx(0.05 * LN2, abs=1e-12)


def test_slc_auc_equal_curves_is_exactly_zero():
    curve = [0.13, 0.37, 0.52, 0.61, 0.7, 0.81, 0.9, 0.93, 0.95, 0.97]
    assert slc_auc(PAPER_GRID, curve, list(curve)) == 0.0
    assert slc_auc(PAPER_GRID, curve, list(curve), normalize=True) == 0.0


def test_slc_auc_below_scratch_everywhere_is_negative_and_normalised_is_mean_gap():
    scratch = np.linspace(0.2, 0.95, 10)
    model = scratch - 0.1
    assert slc_auc(PAPER_GRID, model, scratch) == pytest.approx(-0.1 * math.log(1000), abs=1e-12)
    assert slc_auc(PAPER_GRID, model, scratch, normalize=True) == pytest.approx(-0.1, abs=1e-12)


def test_slc_auc_length_mismatch_and_single_point():
    with pytest.raises(ConfigError, match="one model and one scratch accuracy per fraction"):
        slc_auc(GRID, [0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ConfigError):
        slc_auc(GRID, [0.1, 0.2], [0.1, 0.2])
    assert slc_auc([1.0], [0.9], [0.5]) == 0.0
    assert slc_auc([1.0], [0.9], [0.5], normalize=True) == 0.0


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize(
    "df, expected",  # two-sided 95% critical values from printed t tables
    [(1, 12.7062047), (2, 4.3026527), (3, 3.1824463), (4, 2.7764451), (9, 2.2621572), (30, 2.0422725),
     (100, 1.9839715), (10_000, 1.9602012)],
)
def test_student_t_quantile_matches_tables(df, expected):
    assert student_t_quantile(0.975, df) == pytest.approx(expected, abs=1e-7)


def test_student_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 41):
        for p in (0.5, 0.9, 0.975, 0.995):
            assert student_t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), abs=1e-9)


def test_mean_ci95_known_values():
    mean, low, high = mean_ci95([1, 2, 3])
    # mean 2, s = 1, half-width t_{0.975,2} * s / sqrt(3) = 4.3026527 / 1.7320508 = 2.4841377
    assert mean == 2.0
    assert high - mean == pytest.approx(4.3026527 / math.sqrt(3), abs=1e-7)
    assert mean - low == pytest.approx(2.4841377, abs=1e-7)
    # two values 0 and 1: s = 1/sqrt(2), half = 12.7062047 * (1/sqrt 2) / sqrt 2 = 6.3531024
    assert mean_ci95([0.0, 1.0]) == pytest.approx((0.5, 0.5 - 6.3531024, 0.5 + 6.3531024), abs=1e-7)


def test_mean_ci95_single_value_constant_and_empty():
    assert mean_ci95([0.42]) == (0.42, None, None)  # one seed: no interval, not a zero-width one
    assert mean_ci95([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3, 0.3), abs=1e-15)
    with pytest.raises(ConfigError):
        mean_ci95([])
