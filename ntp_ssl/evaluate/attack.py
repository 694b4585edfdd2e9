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
  wins. The reported number is the test accuracy of that model. A learning rate whose loss
  turns NaN or infinite drops out of the search with a warning (a practitioner drops a
  diverged run); only when every one does is it an error. With fewer samples, the attack
  trains on all of them with ``sweep.lr_finetune`` and reports the last step;
- **precision**: ``sweep.precision`` = ``bf16-mixed`` runs the fine-tunes' forward passes in
  bfloat16 autocast (weights, gradients and Adam stay float32); ``auto`` does so where the
  device has native bfloat16 kernels; ``sweep.eval_batch_size`` is the batch of the validation
  and test forwards (smaller batches stay in the CPU's caches; the batch changes the float
  rounding, not what is computed). The same for every model and for scratch;
- **speed features** (off by default): ``sweep.halving`` = eta >= 2 is successive halving
  over the grid: every learning rate trains to a first rung of the budget, the best
  1/eta of them (by validation accuracy so far; at least one) go on to the next rung, and so
  on up to the full budget; the rungs fall on validation checks, so a learning rate that
  survives gives exactly the numbers it gives without halving. ``sweep.patience`` = p > 0
  stops a fit after p validation checks (a tenth of the budget apart) without improvement.

The test split is read once, for the reported accuracy; no choice depends on it.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ntp_ssl.config import REFERENCE_EVAL_BATCH, REFERENCE_PRECISION
from ntp_ssl.errors import NumericalError
from ntp_ssl.evaluate.probe import stratified_split
from ntp_ssl.shared.masking import apply_masks_
from ntp_ssl.shared.train import ClassifierFit, classifier_accuracy, resolve_precision

log = logging.getLogger("ntp_ssl.evaluate")


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


def attacker_split(labels: np.ndarray, settings: Any, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The (fit, val) indices a fine-tune carves from its n samples (stratified, seeded), or
    None when it cannot search (:func:`can_search`) and trains on all n. LP-FT fits its
    starting head on the fit part alone with these very indices, so the validation samples
    that choose its learning rate and stopping step are unseen by the head too."""
    if not can_search(labels, settings, [float(lr) for lr in settings.lr_grid]):
        return None
    return stratified_split(np.asarray(labels), settings.val_fraction, seed=seed)


def halving_rungs(steps: int, eval_every: int, candidates: int, eta: int) -> list[int]:
    """The steps at which successive halving compares the ``candidates`` (the last is
    ``steps``): ``steps / eta**k`` for k = R..0 with R = ceil(log_eta(candidates)), each
    rounded up to a multiple of ``eval_every`` (a validation check falls on it) and kept
    only if below the next. ``eta`` < 2 or a single candidate: ``[steps]``."""
    if eta < 2 or candidates < 2:
        return [steps]
    rounds = math.ceil(math.log(candidates) / math.log(eta) - 1e-9)
    rungs = []
    for k in range(rounds, 0, -1):
        rung = min(steps, eval_every * math.ceil(steps / eta**k / eval_every))
        if rung < steps and (not rungs or rung > rungs[-1]):
            rungs.append(rung)
    return [*rungs, steps]


def _start(encoder: nn.Module, masks, x, y, *, head: nn.Module | None, num_classes: int, lr: float, steps: int,
           settings: Any, seed: int, device, val=None) -> tuple[nn.Module, nn.Module, ClassifierFit]:
    """A fresh copy of ``encoder`` (masked when ``masks``) and of ``head`` (or a new one), ready to train."""
    torch.manual_seed(seed)
    model = copy.deepcopy(encoder)
    head = copy.deepcopy(head) if head is not None else nn.Linear(model.feature_dim, num_classes)
    if masks:
        named = dict(model.named_parameters())
        apply_masks_({k: named[k] for k in masks}, masks)
    fit = ClassifierFit(model, head, x, y, steps=steps, batch_size=settings.batch_size, lr=lr,
                        weight_decay=settings.weight_decay, train_encoder=True, masks=masks or None, seed=seed,
                        device=device, stage="evaluate fine-tune", augment_shift=settings.augment_shift, val=val,
                        eval_every=_eval_every(steps) if val is not None else 0,
                        patience=int(getattr(settings, "patience", 0)) if val is not None else 0,
                        precision=attack_precision(settings, device),
                        eval_batch_size=int(getattr(settings, "eval_batch_size", REFERENCE_EVAL_BATCH)))
    return model, head, fit


def attack_precision(settings: Any, device) -> str:
    """``sweep.precision`` resolved for ``device`` (``auto`` -> ``bf16-mixed`` or ``32``)."""
    return resolve_precision(str(getattr(settings, "precision", REFERENCE_PRECISION)), device)


def _eval_every(steps: int) -> int:
    return max(1, math.ceil(steps / 10))  # ten validation checks per fit


def fine_tune_attack(encoder: nn.Module, masks: dict[str, torch.Tensor] | None, x_train, y_train, x_test, y_test, *,
                     num_classes: int, settings: Any, seed: int, device, head: nn.Module | None = None) -> AttackResult:
    """Fine-tune ``encoder`` (with ``masks`` kept, if given) on (x_train, y_train) as the module doc says."""
    grid = [float(lr) for lr in settings.lr_grid]
    split = attacker_split(y_train.numpy(), settings, seed)
    if split is None:
        steps = budget_steps(len(y_train), settings)
        model, fitted_head, fit = _start(encoder, masks, x_train, y_train, head=head, num_classes=num_classes,
                                         lr=settings.lr_finetune, steps=steps, settings=settings, seed=seed,
                                         device=device)
        fit.advance(steps).finish()
        return AttackResult(classifier_accuracy(model, fitted_head, x_test, y_test, device=device,
                                                precision=fit.precision, batch_size=fit.eval_batch_size),
                            steps=steps)
    fit_idx, val_idx = (torch.as_tensor(i) for i in split)
    steps = budget_steps(len(fit_idx), settings)
    val = (x_train[val_idx], y_train[val_idx])
    eta = int(getattr(settings, "halving", 0))
    rungs = halving_rungs(steps, _eval_every(steps), len(grid), eta)

    def start(lr: float):
        return _start(encoder, masks, x_train[fit_idx], y_train[fit_idx], head=head, num_classes=num_classes, lr=lr,
                      steps=steps, settings=settings, seed=seed, device=device, val=val)

    diverged: list[str] = []

    def advanced(candidate, to_step: int) -> bool:
        """Train ``candidate`` on to ``to_step``; False when its loss turned NaN or infinite:
        that learning rate drops out of the search, as a practitioner drops a diverged run."""
        try:
            candidate[3].advance(to_step)
            return True
        except NumericalError as error:
            diverged.append(f"{candidate[0]:g} ({error})")
            log.warning("evaluate fine-tune: learning rate %g diverged and drops out of the search: %s",
                        candidate[0], error)
            return False

    if len(rungs) == 1:  # every learning rate to the full budget, one at a time (one model in memory)
        best = None
        for lr in grid:
            candidate = (lr, *start(lr))
            if not advanced(candidate, steps):
                continue
            if best is None or candidate[3].val_accuracy > best[3].val_accuracy:  # ties keep the earlier rate
                best = candidate
    else:  # successive halving: all candidates to each rung, the best 1/eta of them on
        alive = [(lr, *start(lr)) for lr in grid]
        for rung in rungs:
            alive = [candidate for candidate in alive if advanced(candidate, rung)]
            if not alive:
                break
            # ties keep the earlier learning rate of the grid, as without halving (a sort on
            # the score alone would keep the previous rung's order instead)
            alive = sorted(alive, key=lambda c: (-c[3].val_accuracy, grid.index(c[0])))
            if rung < steps:
                alive = alive[:max(1, len(alive) // eta)]
        best = alive[0] if alive else None
    if best is None:
        raise NumericalError("evaluate fine-tune: every learning rate of sweep.lr_grid diverged: "
                             + "; ".join(diverged))
    lr, model, fitted_head, fit = best
    result = fit.finish()
    return AttackResult(classifier_accuracy(model, fitted_head, x_test, y_test, device=device,
                                            precision=fit.precision, batch_size=fit.eval_batch_size), choice=lr,
                        val_accuracy=result.val_accuracy, steps=steps, best_step=result.best_step)
