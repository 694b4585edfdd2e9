"""A converged linear probe: L2-regularised multinomial logistic regression, solved to optimality.

Features are first z-scored with the statistics of the training samples only:

    x' = (x - mu) / max(sigma, 1e-6),   mu, sigma = per-feature mean and (population) std of train

The probe then minimises the strictly convex (for l2 > 0) objective

    J(W, b) = (1/n) sum_i CE(W x_i + b, y_i) + (l2 / 2) ||W||_F^2,
    CE(z, y) = logsumexp(z) - z_y,

with W of shape (C, D) and an unregularised bias b of shape (C,). It is solved full-batch in
float64 with L-BFGS (strong-Wolfe line search) from W = 0, b = 0 until max |grad J| < tol or
max_iter iterations. This is scikit-learn's ``LogisticRegression`` objective (multinomial,
lbfgs) with ``l2 = 1 / (C_sklearn * n)``.

:func:`converged_linear_probe` picks l2 from a grid by accuracy on a stratified validation
split carved out of the training samples (ties go to the larger l2, the simpler model), refits
on all training samples, and reads the test split only for the final accuracy.

Everything here is a pure, deterministic function: no random initialisation, no global state;
the validation split comes from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ntp_ssl.data.subsets import check_seed, check_val_fraction, stratified_split
from ntp_ssl.errors import ConfigError

STD_FLOOR = 1e-6  # constant features: divide by this instead of 0 (they become 0 on train)
DEFAULT_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


# --------------------------------------------------------------------------- input checks


def _check_matrix(name: str, features: object, *, allow_empty: bool = False) -> Tensor:
    if not isinstance(features, Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor of shape (N, D), got {type(features).__name__}")
    if features.dim() != 2:
        raise ConfigError(f"{name} must be 2-d (N, D), got shape {tuple(features.shape)}")
    if features.is_complex():
        raise ConfigError(f"{name} must be real-valued, got dtype {features.dtype}")
    if not allow_empty and features.shape[0] == 0:
        raise ConfigError(f"{name} has 0 samples; accepted: at least one sample")
    return features


def _check_labels(name: str, labels: object, n: int, num_classes: int) -> Tensor:
    if not isinstance(labels, Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor of shape ({n},), got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ConfigError(f"{name} must hold integer class indices, got dtype {labels.dtype}")
    if tuple(labels.shape) != (n,):
        raise ConfigError(f"{name} must have shape ({n},) to match its features, got {tuple(labels.shape)}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ConfigError(
            f"{name} range [{int(labels.min())}, {int(labels.max())}] is outside the accepted [0, {num_classes - 1}]"
        )
    return labels


def _check_num_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ConfigError(f"num_classes {num_classes!r} is not accepted; accepted: a positive integer")
    return int(num_classes)


def _check_l2(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} {value!r} is not a number; accepted: a finite number >= 0")
    l2 = float(value)
    if not (0.0 <= l2 < math.inf):  # also False for NaN
        raise ConfigError(f"{name} {l2!r} is not accepted; accepted: a finite number >= 0")
    return l2


# --------------------------------------------------------------------------- standardisation


def standardize(train: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """``(train_std, *others_std)``: every tensor z-scored with train's per-feature mean and std.

    The std is the population std (divisor n, so a single sample is fine) floored at 1e-6, so
    a constant feature maps to 0 on train instead of NaN. Results are float64, the precision
    the probe solves in. Only ``train`` is read for the statistics.
    """
    train = _check_matrix("train features", train)
    x = train.detach().to(torch.float64)
    mean = x.mean(dim=0)
    std = x.std(dim=0, correction=0).clamp_min(STD_FLOOR)
    result = [(x - mean) / std]
    for position, other in enumerate(others):
        other = _check_matrix(f"features #{position + 1} to standardize", other, allow_empty=True)
        if other.shape[1] != train.shape[1]:
            raise ConfigError(
                f"features #{position + 1} have {other.shape[1]} features, train has {train.shape[1]}; "
                "accepted: the same feature dimension"
            )
        result.append((other.detach().to(device=x.device, dtype=torch.float64) - mean) / std)
    return tuple(result)


# --------------------------------------------------------------------------- logistic regression


def _objective(W: Tensor, b: Tensor, x: Tensor, y: Tensor, l2: float) -> Tensor:
    return F.cross_entropy(x @ W.T + b, y) + 0.5 * l2 * W.pow(2).sum()


def fit_logistic_regression(
    features: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    l2: float,
    max_iter: int = 500,
    tol: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """``(W, b)``, float64, minimising mean CE + l2/2 ||W||_F^2 (bias unregularised).

    Full-batch L-BFGS with a strong-Wolfe line search from W = 0, b = 0 (no randomness), until
    the gradient's max-abs entry is below ``tol`` or after ``max_iter`` iterations; with
    ``l2 = 0`` on separable data there is no minimum and ``max_iter`` ends it. A class absent
    from ``labels`` only pushes its bias down (its logits go low), so it is never predicted.
    """
    num_classes = _check_num_classes(num_classes)
    features = _check_matrix("features", features)
    labels = _check_labels("labels", labels, features.shape[0], num_classes)
    l2 = _check_l2("l2", l2)
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ConfigError(f"max_iter {max_iter!r} is not accepted; accepted: a positive integer")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (0.0 < float(tol) < math.inf):
        raise ConfigError(f"tol {tol!r} is not accepted; accepted: a finite number > 0")

    x = features.detach().to(torch.float64)
    y = labels.detach().to(device=x.device, dtype=torch.long)
    W = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [W, b],
        lr=1.0,
        max_iter=int(max_iter),
        max_eval=2 * int(max_iter),  # let max_iter, not the evaluation budget, be the limit
        tolerance_grad=float(tol),
        # Stop on a change in loss or step only at float64 round-off: the gradient test is the
        # real criterion, and torch's default (1e-9) can stop short of it.
        tolerance_change=1e-15,
        history_size=100,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = _objective(W, b, x, y, l2)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)  # one step() runs the whole L-BFGS loop, up to max_iter
    return W.detach(), b.detach()


def logistic_accuracy(W: Tensor, b: Tensor, features: Tensor, labels: Tensor) -> float:
    """Fraction of ``features`` whose argmax logit ``W x + b`` equals the label."""
    if not isinstance(W, Tensor) or W.dim() != 2:
        raise ConfigError(f"W must be a 2-d tensor (C, D), got {getattr(W, 'shape', type(W).__name__)}")
    if not isinstance(b, Tensor) or tuple(b.shape) != (W.shape[0],):
        raise ConfigError(f"b must have shape ({W.shape[0]},), got {getattr(b, 'shape', type(b).__name__)}")
    features = _check_matrix("features", features)
    if features.shape[1] != W.shape[1]:
        raise ConfigError(f"features have {features.shape[1]} features, W expects {W.shape[1]}")
    labels = _check_labels("labels", labels, features.shape[0], W.shape[0])
    logits = features.detach().to(device=W.device, dtype=W.dtype) @ W.T + b
    predicted = logits.argmax(dim=1)
    return float((predicted == labels.to(W.device)).double().mean())


# --------------------------------------------------------------------------- validation split


# --------------------------------------------------------------------------- the probe


def converged_linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    val_fraction: float = 0.2,
    seed: int = 0,
    default_l2: float = 1e-2,
) -> dict:
    """Test accuracy of a converged logistic-regression probe, l2 chosen on a validation split.

    Returns ``{"accuracy", "l2", "val_accuracy", "searched", "weight", "bias"}`` (the last two:
    the refitted probe on raw features, :func:`raw_feature_head`). The search runs only when
    every class present has at least 2 training samples and at least 2 classes are present;
    otherwise ``default_l2`` is used, ``val_accuracy`` is None and ``searched`` is False.
    The test split is read for the final accuracy only, never for a choice.
    """
    num_classes = _check_num_classes(num_classes)
    train_features = _check_matrix("train features", train_features)
    train_labels = _check_labels("train labels", train_labels, train_features.shape[0], num_classes)
    test_features = _check_matrix("test features", test_features)
    test_labels = _check_labels("test labels", test_labels, test_features.shape[0], num_classes)
    if test_features.shape[1] != train_features.shape[1]:
        raise ConfigError(
            f"test features have {test_features.shape[1]} features, train features {train_features.shape[1]}; "
            "accepted: the same feature dimension"
        )
    if isinstance(l2_grid, (str, bytes)) or not isinstance(l2_grid, Sequence) or len(l2_grid) == 0:
        raise ConfigError(f"l2_grid {l2_grid!r} is not accepted; accepted: a non-empty list of numbers >= 0")
    grid = [_check_l2("l2_grid value", value) for value in l2_grid]
    fraction = check_val_fraction(val_fraction)
    seed = check_seed(seed)
    default_l2 = _check_l2("default_l2", default_l2)

    # The attacker's n samples fix the scaling; the test split is only transformed by it.
    x_train, x_test = standardize(train_features, test_features)
    y_train = train_labels.detach().to(device=x_train.device, dtype=torch.long)
    y_test = test_labels.detach().to(device=x_train.device, dtype=torch.long)

    counts = torch.bincount(y_train, minlength=num_classes)
    present = counts[counts > 0]
    searchable = len(present) >= 2 and int(present.min()) >= 2

    best_val: float | None = None
    if searchable:
        fit_idx, val_idx = stratified_split(y_train.cpu().numpy(), fraction, seed=seed)
        fit_idx_t = torch.from_numpy(fit_idx).to(x_train.device)
        val_idx_t = torch.from_numpy(val_idx).to(x_train.device)
        scores: list[tuple[float, float]] = []
        for l2 in grid:
            W, b = fit_logistic_regression(x_train[fit_idx_t], y_train[fit_idx_t], num_classes=num_classes, l2=l2)
            scores.append((logistic_accuracy(W, b, x_train[val_idx_t], y_train[val_idx_t]), l2))
        # Best validation accuracy; on a tie the larger l2 (the simpler model) wins.
        best_val, chosen = max(scores)
    else:
        chosen = default_l2

    W, b = fit_logistic_regression(x_train, y_train, num_classes=num_classes, l2=chosen)
    weight, bias = raw_feature_head(W, b, train_features)
    return {
        "accuracy": logistic_accuracy(W, b, x_test, y_test),
        "l2": float(chosen),
        "val_accuracy": best_val,
        "searched": searchable,
        "weight": weight,
        "bias": bias,
    }


def raw_feature_head(W: Tensor, b: Tensor, train_features: Tensor) -> tuple[Tensor, Tensor]:
    """The probe as a linear layer on raw (unstandardised) features, float32: with mean m and
    std s of ``train_features``, ``W ((f - m) / s) + b = (W / s) f + (b - (W / s) m)``. LP-FT
    starts its fine-tune from this head."""
    x = train_features.detach().to(torch.float64)
    mean, std = x.mean(dim=0), x.std(dim=0, correction=0).clamp_min(STD_FLOOR)
    weight = W / std.to(W.device)
    return weight.float().cpu(), (b - weight @ mean.to(W.device)).float().cpu()
