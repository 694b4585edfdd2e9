"""Weighted kNN (faiss) against a slow brute-force reference."""

import math

import pytest
import torch

from ntp_ssl.errors import ConfigError
from ntp_ssl.shared.knn import knn_accuracy, knn_predict


def brute_force_knn(train, labels, queries, num_classes, k, temperature):
    """One query at a time: cosine to every train row, k largest, exp(s/T) votes."""
    train = train / train.norm(dim=1, keepdim=True)
    predictions = []
    for query in queries:
        query = query / query.norm()
        similarities = [float(torch.dot(query, row)) for row in train]
        order = sorted(range(len(train)), key=lambda i: -similarities[i])[: min(k, len(train))]
        scores = [0.0] * num_classes
        for i in order:
            scores[int(labels[i])] += math.exp(similarities[i] / temperature)
        predictions.append(max(range(num_classes), key=lambda c: (scores[c], -c)))
    return torch.tensor(predictions)


def random_data(seed, n_train=300, n_query=80, dim=16, num_classes=5):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n_train, dim, generator=g),
        torch.randint(0, num_classes, (n_train,), generator=g),
        torch.randn(n_query, dim, generator=g),
    )


def clustered_data(seed, per_class=40, dim=16, num_classes=4, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 2
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    points = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return points, labels, centres


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [1, 5, 20, 200, 1000])  # 1000 > 300 train samples
def test_matches_brute_force_on_random_data(seed, k):
    train, labels, queries = random_data(seed)
    expected = brute_force_knn(train, labels, queries, 5, k, 0.07)
    got = knn_predict(train, labels, queries, num_classes=5, k=k, temperature=0.07)
    assert got.dtype == torch.long and got.shape == (80,)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("k,temperature", [(20, 0.07), (200, 0.07), (500, 0.5)])
def test_matches_brute_force_on_clustered_data(k, temperature):
    train, labels, _ = clustered_data(0, spread=1.5)  # overlapping clusters: votes matter
    queries, _, _ = clustered_data(1, per_class=15, spread=1.5)
    expected = brute_force_knn(train, labels, queries, 4, k, temperature)
    got = knn_predict(train, labels, queries, num_classes=4, k=k, temperature=temperature)
    assert torch.equal(got, expected)


def test_accuracy_is_one_on_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(10, 32) * 10
    train_labels = torch.arange(10).repeat_interleave(30)
    test_labels = torch.arange(10).repeat_interleave(5)
    train = centres[train_labels] + torch.randn(300, 32, generator=g)
    test = centres[test_labels] + torch.randn(50, 32, generator=g)
    result = knn_accuracy(train, train_labels, test, test_labels, num_classes=10)
    assert result == {"knn_top1_k20": 1.0, "knn_top1_k200": 1.0}


def test_accuracy_agrees_with_predict():
    train, labels, queries = random_data(2)
    truth = torch.randint(0, 5, (80,), generator=torch.Generator().manual_seed(9))
    result = knn_accuracy(train, labels, queries, truth, num_classes=5, ks=(1, 20, 200))
    assert set(result) == {"knn_top1_k1", "knn_top1_k20", "knn_top1_k200"}
    for k in (1, 20, 200):
        predicted = knn_predict(train, labels, queries, num_classes=5, k=k)
        # exactly correct / total, as a decimal reads it (a float32 mean is off in the 8th digit)
        assert result[f"knn_top1_k{k}"] == int((predicted == truth).sum()) / 80
        assert 0.0 <= result[f"knn_top1_k{k}"] <= 1.0


def test_small_temperature_does_not_overflow():
    train, labels, queries = random_data(4)
    expected = brute_force_knn(train.double(), labels, queries.double(), 5, 20, 0.5)
    # With T = 1e-4 only the nearest neighbour counts (exp(1/T) would overflow unshifted).
    nearest = knn_predict(train, labels, queries, num_classes=5, k=1)
    assert torch.equal(knn_predict(train, labels, queries, num_classes=5, k=20, temperature=1e-4), nearest)
    assert torch.equal(knn_predict(train, labels, queries, num_classes=5, k=20, temperature=0.5), expected)


def test_scale_of_features_does_not_matter():
    train, labels, queries = random_data(3)
    a = knn_predict(train, labels, queries, num_classes=5, k=20)
    b = knn_predict(train * 7.0, labels, queries * 0.1, num_classes=5, k=20)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"k": 0}, "k must"), ({"temperature": 0.0}, "temperature"), ({"num_classes": 3}, "labels")],
)
def test_bad_inputs_are_config_errors(kwargs, match):
    train, labels, queries = random_data(0)
    options = {"num_classes": 5, **kwargs}
    with pytest.raises(ConfigError, match=match):
        knn_predict(train, labels, queries, **options)


def test_mismatched_dimensions_are_config_errors():
    train, labels, queries = random_data(0)
    with pytest.raises(ConfigError, match="dimension"):
        knn_predict(train, labels, queries[:, :8], num_classes=5)


@pytest.mark.parametrize("side,value", [("train", math.nan), ("query", math.nan), ("query", math.inf)])
def test_non_finite_features_are_numerical_errors_not_votes(side, value):
    """faiss answers a NaN row with neighbour index -1 (the last training label, by Python
    indexing): a NaN query would be 'predicted' silently. Such features stop with an error."""
    from ntp_ssl.errors import NumericalError

    train, labels, queries = random_data(0)
    target = train if side == "train" else queries
    target[3, 0] = value
    with pytest.raises(NumericalError, match=f"1 of {target.shape[0]} {side} feature rows are NaN or infinite"):
        knn_predict(train, labels, queries, num_classes=5)
    with pytest.raises(NumericalError, match="not finite"):
        knn_accuracy(train, labels, queries, torch.zeros(len(queries), dtype=torch.long), num_classes=5)
