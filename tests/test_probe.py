"""Converged linear probe against scikit-learn, autograd and a brute-force 1-NN; stratified split."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from ntp_ssl.errors import ConfigError
from ntp_ssl.evaluate.probe import (
    converged_linear_probe,
    fit_logistic_regression,
    logistic_accuracy,
    standardize,
    stratified_split,
)


def blobs(seed, per_class=50, dim=8, num_classes=4, spread=1.0, scale=1.5, centres=None):
    """Isotropic Gaussian blobs (equal covariances: the Bayes boundary is linear)."""
    g = torch.Generator().manual_seed(seed)
    if centres is None:
        centres = torch.randn(num_classes, dim, generator=g) * scale
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    points = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return points, labels, centres


def slow_objective(W, b, features, labels, l2):
    """mean_i [logsumexp(W x_i + b) - (W x_i + b)_{y_i}] + l2/2 sum W^2, one sample at a time."""
    total = 0.0
    for x, y in zip(features.double(), labels.tolist()):
        z = W @ x + b
        total = total + (torch.logsumexp(z, dim=0) - z[y])
    return total / len(labels) + 0.5 * l2 * (W * W).sum()


def one_nn_accuracy(train, train_labels, test, test_labels):
    """For each test point, the label of the nearest train point (Euclidean), by a loop."""
    train, test = train.numpy(), test.numpy()
    correct = 0
    for point, label in zip(test, test_labels.tolist()):
        distances = [float(np.sum((point - row) ** 2)) for row in train]
        correct += int(train_labels[int(np.argmin(distances))]) == label
    return correct / len(test)


# --------------------------------------------------------------------------- logistic regression


@pytest.mark.parametrize("C", [0.1, 1.0, 10.0])
def test_fit_reaches_the_sklearn_optimum(C):
    train, labels, centres = blobs(0, per_class=50)  # 200 x 8, 4 classes
    test, test_labels, _ = blobs(1, per_class=50, centres=centres)
    n = len(labels)
    l2 = 1.0 / (C * n)  # sklearn: C sum_i CE_i + ||W||^2 / 2  ==  C n (mean CE + l2/2 ||W||^2)
    W, b = fit_logistic_regression(train, labels, num_classes=4, l2=l2)
    assert W.dtype == b.dtype == torch.float64 and W.shape == (4, 8) and b.shape == (4,)

    # lbfgs with > 2 classes is multinomial: the only behaviour from sklearn 1.7 on (no
    # multi_class argument), and what multi_class="auto" picked before.
    reference = LogisticRegression(C=C, solver="lbfgs", max_iter=10000, tol=1e-10)
    reference.fit(train.double().numpy(), labels.numpy())
    W_ref, b_ref = torch.from_numpy(reference.coef_), torch.from_numpy(reference.intercept_)
    assert W_ref.shape == (4, 8)

    ours = float(slow_objective(W, b, train, labels, l2))
    theirs = float(slow_objective(W_ref, b_ref, train, labels, l2))
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert float((W - W_ref).norm() / W_ref.norm()) < 1e-3
    # The bias is unregularised and the loss is invariant to a common shift: compare centred.
    assert torch.allclose(b - b.mean(), b_ref - b_ref.mean(), atol=1e-3 * max(1.0, float(b_ref.abs().max())))

    ours_acc = logistic_accuracy(W, b, test, test_labels)
    theirs_acc = float(reference.score(test.double().numpy(), test_labels.numpy()))
    assert abs(ours_acc - theirs_acc) <= 0.005


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_gradient_vanishes_at_the_solution(l2):
    train, labels, _ = blobs(2, per_class=15, dim=5, num_classes=3, spread=1.5)
    W, b = fit_logistic_regression(train, labels, num_classes=3, l2=l2)
    W_, b_ = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    value = slow_objective(W_, b_, train, labels, l2)
    value.backward()
    assert float(W_.grad.abs().max()) < 1e-5 and float(b_.grad.abs().max()) < 1e-5
    # Convex, so a minimum: no random nearby point is lower.
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        dW = 1e-2 * torch.randn(W.shape, generator=g, dtype=torch.float64)
        db = 1e-2 * torch.randn(b.shape, generator=g, dtype=torch.float64)
        assert float(slow_objective(W + dW, b + db, train, labels, l2)) > float(value.detach())


def test_fit_is_deterministic():
    train, labels, _ = blobs(3, per_class=20)
    first = fit_logistic_regression(train, labels, num_classes=4, l2=1e-2)
    second = fit_logistic_regression(train, labels, num_classes=4, l2=1e-2)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_absent_class_gets_low_logits():
    train, labels, _ = blobs(4, per_class=20, num_classes=3)
    W, b = fit_logistic_regression(train, labels, num_classes=5, l2=1e-2)  # classes 3, 4 absent
    assert torch.isfinite(W).all() and torch.isfinite(b).all()
    assert float(b[3:].max()) < float(b[:3].min()) - 5
    assert not ((train.double() @ W.T + b).argmax(dim=1) >= 3).any()
    assert logistic_accuracy(W, b, train, labels) > 0.9


def test_logistic_accuracy_counts_argmax_hits():
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.zeros(2, dtype=torch.float64)
    features = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [1.0, 4.0]])
    assert logistic_accuracy(W, b, features, torch.tensor([0, 1, 1, 0])) == 0.5
    assert logistic_accuracy(W, b, features, torch.tensor([0, 1, 0, 1])) == 1.0


# --------------------------------------------------------------------------- standardize


def test_standardize_uses_train_statistics():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(50, 4, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0]) + 7
    other = torch.randn(20, 4, generator=g)
    train_std, other_std = standardize(train, other)
    assert torch.allclose(train_std.mean(dim=0), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(train_std.std(dim=0, correction=0), torch.ones(4, dtype=torch.float64), atol=1e-12)
    mean, std = train.double().mean(dim=0), train.double().std(dim=0, correction=0)
    assert torch.allclose(other_std, (other.double() - mean) / std)


def test_standardize_constant_features_do_not_give_nan():
    train = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    train_std, other_std = standardize(train, torch.tensor([[0.0, 5.0], [0.0, 6.0]]))
    assert torch.isfinite(train_std).all() and torch.isfinite(other_std).all()
    assert torch.equal(train_std[:, 1], torch.zeros(3, dtype=torch.float64))
    single, = standardize(torch.tensor([[1.0, 2.0]]))  # one sample: every feature is constant
    assert torch.equal(single, torch.zeros(1, 2, dtype=torch.float64))


# --------------------------------------------------------------------------- stratified split


LABELS = np.array([0] * 10 + [1] * 3 + [2] * 2 + [3] * 1 + [4] * 5)


def test_stratified_split_covers_each_class_on_both_sides():
    fit, val = stratified_split(LABELS, 0.2, seed=0)
    assert fit.dtype == val.dtype == np.int64
    assert np.all(np.diff(fit) > 0) and np.all(np.diff(val) > 0)  # sorted, no repeats
    assert not set(fit) & set(val) and sorted(set(fit) | set(val)) == list(range(len(LABELS)))
    val_counts = {c: int(np.sum(LABELS[val] == c)) for c in range(5)}
    # round half-up of 0.2 * count, clipped to [1, count - 1]; a lone sample stays in fit
    assert val_counts == {0: 2, 1: 1, 2: 1, 3: 0, 4: 1}
    for c in (0, 1, 2, 4):
        assert np.sum(LABELS[fit] == c) >= 1
    assert np.sum(LABELS[fit] == 3) == 1


def test_stratified_split_clips_to_keep_one_fit_sample():
    labels = np.array([7] * 5 + [9] * 2)
    fit, val = stratified_split(labels, 0.9, seed=1)
    assert np.sum(labels[val] == 7) == 4 and np.sum(labels[val] == 9) == 1
    fit, val = stratified_split(labels, 0.5, seed=1)  # 2.5 rounds half-up to 3
    assert np.sum(labels[val] == 7) == 3


def test_stratified_split_is_deterministic_per_seed():
    labels = np.repeat(np.arange(4), 25)
    first = stratified_split(labels, 0.3, seed=5)
    second = stratified_split(labels, 0.3, seed=5)
    other = stratified_split(labels, 0.3, seed=6)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert not np.array_equal(first[1], other[1])


def test_stratified_split_needs_a_class_with_two_samples():
    with pytest.raises(ConfigError, match="no validation sample"):
        stratified_split(np.array([0, 1, 2]), 0.2, seed=0)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.2, float("nan"), True, "0.2"])
def test_stratified_split_rejects_bad_fraction(bad):
    with pytest.raises(ConfigError) as info:
        stratified_split(LABELS, bad, seed=0)
    assert "\n" not in str(info.value) and "(0, 1)" in str(info.value)


# --------------------------------------------------------------------------- the probe


def probe_data(seed=0, per_class=30, test_per_class=20, spread=1.5):
    train, labels, centres = blobs(seed, per_class=per_class, dim=8, num_classes=4, spread=spread)
    test, test_labels, _ = blobs(seed + 100, per_class=test_per_class, centres=centres, spread=spread)
    return train, labels, test, test_labels


def test_probe_is_deterministic_and_searches():
    data = probe_data()
    first = converged_linear_probe(*data, num_classes=4)
    again = converged_linear_probe(*data, num_classes=4)
    assert {k: v for k, v in first.items() if k not in ("weight", "bias")} == {
        k: v for k, v in again.items() if k not in ("weight", "bias")}
    assert torch.equal(first["weight"], again["weight"]) and torch.equal(first["bias"], again["bias"])
    assert set(first) == {"accuracy", "l2", "val_accuracy", "searched", "weight", "bias"}
    assert first["searched"] is True and first["l2"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    assert 0.0 <= first["val_accuracy"] <= 1.0 and 0.0 <= first["accuracy"] <= 1.0


def test_probe_choices_do_not_read_the_test_split():
    train, labels, test, test_labels = probe_data(spread=2.0)
    base = converged_linear_probe(train, labels, test, test_labels, num_classes=4)
    g = torch.Generator().manual_seed(1)
    shuffled = test_labels[torch.randperm(len(test_labels), generator=g)]
    changed = torch.randn(len(test_labels) + 7, test.shape[1], generator=g) * 5
    changed_labels = torch.randint(0, 4, (len(changed),), generator=g)
    for test_x, test_y in [(test, shuffled), (changed, changed_labels)]:
        other = converged_linear_probe(train, labels, test_x, test_y, num_classes=4)
        assert (other["l2"], other["val_accuracy"], other["searched"]) == (
            base["l2"], base["val_accuracy"], base["searched"])
    assert other["accuracy"] != base["accuracy"]  # the test split does set the accuracy


def test_probe_picks_the_best_validation_l2_ties_to_the_larger():
    train, labels, test, test_labels = probe_data(spread=2.5)
    grid = (1e-3, 1.0, 1e-1)
    result = converged_linear_probe(train, labels, test, test_labels, num_classes=4, l2_grid=grid, seed=3)
    # Reference: the same steps spelled out.
    x_train, = standardize(train)
    fit, val = stratified_split(labels.numpy(), 0.2, seed=3)
    scores = {}
    for l2 in grid:
        W, b = fit_logistic_regression(x_train[fit], labels[fit], num_classes=4, l2=l2)
        scores[l2] = logistic_accuracy(W, b, x_train[val], labels[val])
    best = max(scores.values())
    assert result["val_accuracy"] == best
    assert result["l2"] == max(l2 for l2 in grid if scores[l2] == best)
    # Separated blobs: every l2 is perfect on validation, and the largest must win.
    easy = probe_data(spread=0.1)
    assert converged_linear_probe(*easy, num_classes=4, l2_grid=grid)["l2"] == 1.0


def test_probe_falls_back_without_a_split():
    train, labels, test, test_labels = probe_data()
    one_each = torch.tensor([0, 30, 60, 90])  # one training sample per class
    result = converged_linear_probe(train[one_each], labels[one_each], test, test_labels, num_classes=4,
                                    default_l2=0.5)
    assert result["searched"] is False and result["l2"] == 0.5 and result["val_accuracy"] is None
    single_class = labels == 2
    result = converged_linear_probe(train[single_class], labels[single_class], test, test_labels, num_classes=4)
    assert result["searched"] is False and result["l2"] == 1e-2
    assert result["accuracy"] == pytest.approx(0.25)  # predicts class 2 everywhere


@pytest.mark.parametrize("seed", [7, 8])
def test_probe_at_least_matches_one_nearest_neighbour(seed):
    train, labels, test, test_labels = probe_data(seed=seed, per_class=40, test_per_class=50, spread=1.5)
    knn = one_nn_accuracy(train, labels, test, test_labels)  # 0.84 on both seeds
    probe = converged_linear_probe(train, labels, test, test_labels, num_classes=4)["accuracy"]
    assert probe >= knn and probe > 0.85


@pytest.mark.parametrize(
    "change, fragment",
    [
        (dict(train_features=torch.zeros(0, 8), train_labels=torch.zeros(0, dtype=torch.long)), "0 samples"),
        (dict(train_labels=torch.zeros(5, dtype=torch.long)), "shape (120,)"),
        (dict(test_features=torch.zeros(80, 3)), "same feature dimension"),
        (dict(test_labels=torch.zeros(3, dtype=torch.long)), "shape (80,)"),
        (dict(train_labels=torch.full((120,), 4)), "[0, 3]"),
        (dict(l2_grid=(1e-2, -1.0)), "-1.0"),
        (dict(l2_grid=()), "non-empty"),
        (dict(default_l2=-0.1), "-0.1"),
        (dict(default_l2=float("nan")), "nan"),
        (dict(val_fraction=0.0), "(0, 1)"),
        (dict(val_fraction=1.0), "(0, 1)"),
        (dict(num_classes=0), "num_classes 0"),
    ],
)
def test_probe_rejects_bad_input(change, fragment):
    train, labels, test, test_labels = probe_data()
    args = dict(train_features=train, train_labels=labels, test_features=test, test_labels=test_labels,
                num_classes=4)
    args.update(change)
    with pytest.raises(ConfigError) as info:
        converged_linear_probe(**args)
    assert "\n" not in str(info.value) and fragment in str(info.value)


@pytest.mark.parametrize("change, fragment", [(dict(l2=-1e-3), "-0.001"), (dict(max_iter=0), "max_iter 0"),
                                              (dict(tol=0.0), "tol 0.0")])
def test_fit_rejects_bad_input(change, fragment):
    train, labels, _ = blobs(0, per_class=5)
    args = dict(num_classes=4, l2=1e-2)
    args.update(change)
    with pytest.raises(ConfigError) as info:
        fit_logistic_regression(train, labels, **args)
    assert "\n" not in str(info.value) and fragment in str(info.value)
