"""The attacker: the best a practitioner does with n labelled target samples.

A fine-tune attack (and the from-scratch baseline, which is the same attack on a random
initialisation) trains a fresh linear head on the encoder's features, the encoder with it:

- **budget**: ``sweep.steps`` > 0 is a fixed number of optimiser steps whatever n is (the
  authors' protocol, the ``sweep=paper`` preset); otherwise ``sweep.epochs`` passes over the
  samples it trains on, at least ``sweep.min_steps`` and at most ``sweep.max_steps`` steps;
  a cosine schedule either way;
- **augmentation**: random shifts of up to ``sweep.augment_shift`` pixels;
- **tuning on its own data**: when there are at least ``sweep.search_min_n`` samples and two
  of every class, a stratified ``sweep.val_fraction`` of them is held out; one model is
  trained per learning rate of ``sweep.lr_grid``, each keeps the weights of its best
  validation step (early stopping), and the learning rate with the best validation accuracy
  wins. The reported number is the test accuracy of that model. With fewer samples, the
  attack trains on all of them with ``sweep.lr_finetune`` and reports the last step.

The test split is read once, for the reported accuracy; no choice depends on it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ntp_ssl.evaluate.probe import stratified_split
from ntp_ssl.shared.masking import apply_masks_
from ntp_ssl.shared.train import classifier_accuracy, fit_classifier


@dataclass
class AttackResult:
    """One attack's reported accuracy and the choices that led to it (for the result files)."""

    accuracy: float
    choice: float | None = None  # the chosen learning rate (fine-tunes) or l2 (linear probe); None: preset
    val_accuracy: float | None = None  # the winner's validation accuracy; None without a validation split
    steps: int = 0  # optimiser steps of the fine-tune budget (0 for frozen attacks)
    best_step: int | None = None  # the early-stopping step whose weights were kept


def budget_steps(n_train: int, settings: Any) -> int:
    """Optimiser steps for ``n_train`` samples: ``steps`` if fixed, else ``epochs`` passes
    (``n // batch`` steps each, at least one) clamped to [``min_steps``, ``max_steps``]."""
    if settings.steps > 0:
        return int(settings.steps)
    per_epoch = max(1, n_train // max(1, min(settings.batch_size, n_train)))
    return int(min(max(settings.epochs * per_epoch, settings.min_steps), settings.max_steps))


def can_search(labels: np.ndarray, settings: Any, grid) -> bool:
    """A validation split is carved only with enough samples, two of every class present, and a grid."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    return len(grid) > 0 and len(labels) >= settings.search_min_n and counts[counts > 0].min() >= 2


def _train(encoder: nn.Module, masks, x, y, *, head: nn.Module | None, num_classes: int, lr: float, steps: int,
           settings: Any, seed: int, device, val=None) -> tuple[nn.Module, nn.Module, Any]:
    """A fresh copy of ``encoder`` (masked when ``masks``) and of ``head`` (or a new one), trained."""
    torch.manual_seed(seed)
    model = copy.deepcopy(encoder)
    head = copy.deepcopy(head) if head is not None else nn.Linear(model.feature_dim, num_classes)
    if masks:
        named = dict(model.named_parameters())
        apply_masks_({k: named[k] for k in masks}, masks)
    fit = fit_classifier(model, head, x, y, steps=steps, batch_size=settings.batch_size, lr=lr,
                         weight_decay=settings.weight_decay, train_encoder=True, masks=masks or None, seed=seed,
                         device=device, stage="evaluate fine-tune", augment_shift=settings.augment_shift, val=val,
                         eval_every=max(1, math.ceil(steps / 10)) if val is not None else 0)
    return model, head, fit


def fine_tune_attack(encoder: nn.Module, masks: dict[str, torch.Tensor] | None, x_train, y_train, x_test, y_test, *,
                     num_classes: int, settings: Any, seed: int, device, head: nn.Module | None = None) -> AttackResult:
    """Fine-tune ``encoder`` (with ``masks`` kept, if given) on (x_train, y_train) as the module doc says."""
    grid = [float(lr) for lr in settings.lr_grid]
    if not can_search(y_train.numpy(), settings, grid):
        steps = budget_steps(len(y_train), settings)
        model, fitted_head, _ = _train(encoder, masks, x_train, y_train, head=head, num_classes=num_classes,
                                       lr=settings.lr_finetune, steps=steps, settings=settings, seed=seed,
                                       device=device)
        return AttackResult(classifier_accuracy(model, fitted_head, x_test, y_test, device=device), steps=steps)
    fit_idx, val_idx = (torch.as_tensor(i) for i in stratified_split(y_train.numpy(), settings.val_fraction,
                                                                     seed=seed))
    steps = budget_steps(len(fit_idx), settings)
    best = None
    for lr in grid:
        model, fitted_head, fit = _train(encoder, masks, x_train[fit_idx], y_train[fit_idx], head=head,
                                         num_classes=num_classes, lr=lr, steps=steps, settings=settings, seed=seed,
                                         device=device, val=(x_train[val_idx], y_train[val_idx]))
        if best is None or fit.val_accuracy > best[3].val_accuracy:  # ties keep the earlier learning rate
            best = (lr, model, fitted_head, fit)
    lr, model, fitted_head, fit = best
    return AttackResult(classifier_accuracy(model, fitted_head, x_test, y_test, device=device), choice=lr,
                        val_accuracy=fit.val_accuracy, steps=steps, best_step=fit.best_step)
