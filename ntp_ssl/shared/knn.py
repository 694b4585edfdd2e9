"""Weighted k-nearest-neighbour classification on frozen features (InstDisc-style).

Features are L2-normalised; the k most cosine-similar training samples (exact search with
a faiss ``IndexFlatIP``) each vote for their class with weight exp(s / T):

    score_c(q) = sum_{i in top-k(q), y_i = c} exp(cos(q, x_i) / T),   y_hat(q) = argmax_c score_c(q)
"""

from __future__ import annotations

from typing import Iterable

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ntp_ssl.data import Domain, to_float_tensor
from ntp_ssl.data.subsets import stratified_split
from ntp_ssl.errors import ConfigError, NumericalError
from ntp_ssl.shared.features import TrainFeatures, extract_features


def _as_float32_numpy(features: Tensor) -> np.ndarray:
    normalised = F.normalize(features.detach().to("cpu", torch.float32), dim=1)
    return np.ascontiguousarray(normalised.numpy())


def _check_inputs(train_features: Tensor, train_labels: Tensor, query_features: Tensor, num_classes: int, temperature: float) -> None:
    if train_features.dim() != 2 or query_features.dim() != 2:
        raise ConfigError(
            f"features must be 2-d (N, D), got train {tuple(train_features.shape)} and query {tuple(query_features.shape)}"
        )
    if train_features.shape[1] != query_features.shape[1]:
        raise ConfigError(
            f"train and query features differ in dimension: {train_features.shape[1]} vs {query_features.shape[1]}"
        )
    if train_features.shape[0] == 0:
        raise ConfigError("kNN needs at least one training sample, got 0")
    if train_labels.shape != (train_features.shape[0],):
        raise ConfigError(
            f"train_labels must have shape ({train_features.shape[0]},), got {tuple(train_labels.shape)}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes:
        raise ConfigError(
            f"train labels must lie in [0, {num_classes - 1}], got range "
            f"[{int(train_labels.min())}, {int(train_labels.max())}]"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ConfigError(f"temperature must be a positive number, got {temperature!r}")
    # faiss answers a NaN row with index -1, which would vote for the last training label
    for side, features in (("train", train_features), ("query", query_features)):
        bad_rows = int((~torch.isfinite(features.detach())).any(dim=1).sum())
        if bad_rows:
            raise NumericalError(
                f"kNN: {bad_rows} of {features.shape[0]} {side} feature rows are NaN or infinite; "
                "the encoder's output is not finite (a diverged or damaged model), so no accuracy can be measured"
            )


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer (e.g. 20 or 200), got {k!r}")


def _nearest(train_features: Tensor, query_features: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Cosine similarities (Q, k) and train indices (Q, k) of the k nearest neighbours,
    most similar first; k is clamped to the number of training samples."""
    train = _as_float32_numpy(train_features)
    k = min(k, train.shape[0])
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    similarities, indices = index.search(_as_float32_numpy(query_features), k)
    return torch.from_numpy(similarities), torch.from_numpy(indices).long()


def _vote(similarities: Tensor, indices: Tensor, train_labels: Tensor, num_classes: int, temperature: float) -> Tensor:
    """argmax_c sum_{i, y_i = c} exp((s_i - s_max) / T): the shift by each query's largest
    similarity scales all its scores alike, and float64 keeps small T from overflowing."""
    labels = train_labels.detach().to("cpu", torch.long)[indices]
    similarities = similarities.double()
    weights = ((similarities - similarities[:, :1]) / temperature).exp()
    scores = torch.zeros(indices.shape[0], num_classes, dtype=torch.float64)
    scores.scatter_add_(1, labels, weights)
    return scores.argmax(dim=1)


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
) -> Tensor:
    """Predicted class (Q,) of each query row by temperature-weighted kNN voting."""
    _check_k(k)
    _check_inputs(train_features, train_labels, query_features, num_classes, temperature)
    similarities, indices = _nearest(train_features, query_features, k)
    return _vote(similarities, indices, train_labels, num_classes, temperature)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    ks: Iterable[int] = (20, 200),
    temperature: float = 0.07,
) -> dict[str, float]:
    """Top-1 accuracy in [0, 1] of weighted kNN for each k: ``{"knn_top1_k<k>": acc}``.

    One search with the largest k serves all of them (the neighbours come sorted)."""
    ks = list(ks)
    if not ks:
        raise ConfigError("ks must hold at least one k, e.g. (20, 200)")
    for k in ks:
        _check_k(k)
    _check_inputs(train_features, train_labels, test_features, num_classes, temperature)
    if test_labels.shape != (test_features.shape[0],):
        raise ConfigError(f"test_labels must have shape ({test_features.shape[0]},), got {tuple(test_labels.shape)}")
    if test_features.shape[0] == 0:
        raise ConfigError("kNN accuracy needs at least one test sample, got 0")
    similarities, indices = _nearest(train_features, test_features, max(ks))
    truth = test_labels.detach().to("cpu", torch.long)
    result = {}
    for k in ks:
        predictions = _vote(similarities[:, :k], indices[:, :k], train_labels, num_classes, temperature)
        # correct / total in Python: 588 / 1000 is 0.588, where a float32 mean gave 0.5879999995
        result[f"knn_top1_k{k}"] = int((predictions == truth).sum()) / len(truth)
    return result


def knn_top1(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor, *,
             num_classes: int, k: int, temperature: float = 0.07) -> float:
    """Top-1 accuracy of weighted kNN with ``k`` clipped to the number of training samples."""
    k = max(1, min(k, len(train_labels)))
    return knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes=num_classes, ks=(k,),
                        temperature=temperature)[f"knn_top1_k{k}"]


# ----------------------------------------------------------------------------- on an encoder and domains


def domain_knn(encoder: torch.nn.Module, bank: Domain, query: Domain, *, device, ks=(20, 200)) -> dict[str, float]:
    """Weighted kNN top-1 of ``encoder``'s features: ``bank``'s train split as memory, ``query``'s test split."""
    train = extract_features(encoder, to_float_tensor(bank.train_images), device=device)
    test = extract_features(encoder, to_float_tensor(query.test_images), device=device)
    return knn_accuracy(train, torch.tensor(bank.train_labels), test, torch.tensor(query.test_labels),
                        num_classes=bank.num_classes, ks=ks, temperature=0.07)


def knn_on_train_splits(encoder: torch.nn.Module, domains: Iterable[Domain], *, device, k: int = 20,
                        holdout: float = 0.2, memo: TrainFeatures | None = None) -> dict[str, float]:
    """kNN top-1 of each domain from its train split alone: a stratified ``holdout`` of it as
    queries, the rest as memory. For monitoring while something is chosen (protection): the
    test splits stay unread until the final report. ``memo``: the encoder's train features,
    reused where they are still current."""
    if memo is None:
        memo = TrainFeatures(encoder, device=device)
    elif memo.encoder is not encoder:
        raise ValueError("knn_on_train_splits: the feature memo belongs to another encoder")
    scores = {}
    for domain in domains:
        bank_idx, query_idx = stratified_split(domain.train_labels, holdout, seed=0)
        features = memo.of(domain)
        labels = torch.tensor(domain.train_labels)
        scores[domain.name] = knn_top1(features[bank_idx], labels[bank_idx], features[query_idx], labels[query_idx],
                                       num_classes=domain.num_classes, k=k)
    return scores
