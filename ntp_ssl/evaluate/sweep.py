"""The SLC sweep: attack each model with growing amounts of target data.

For every target domain, seed and fraction r of the grid, ``n = max(round(r N), C)``
samples are drawn (nested across n for one seed) and every selected attack starts from a
fresh copy of the model under test and a fresh linear head:

- ``linear``: linear probe on frozen features (features extracted once per model and domain);
- ``knn``: weighted kNN (faiss) on the same frozen features;
- ``finetune_masked``: full fine-tune with the pruning mask kept (the paper's attacker);
- ``finetune_dense``: full fine-tune with no mask (pruned weights may regrow).

The from-scratch baseline trains the same architecture from random initialisation with
the full fine-tune protocol and the same budget; its accuracies are cached on disk by
everything they depend on, so they are computed once across models and runs. Every row
reports the final-step test accuracy on the whole target test split.

Where the time goes: the full fine-tunes (masked, dense, scratch) are ``steps`` forward
and backward passes each; linear probes and kNN run on cached features and cost little.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ntp_ssl.data import Domain, to_float_tensor
from ntp_ssl.encoders import build_encoder
from ntp_ssl.evaluate.slc import draw_subset, samples_for_fraction, validate_grid
from ntp_ssl.shared.features import extract_features
from ntp_ssl.io import atomic_write_json
from ntp_ssl.shared.knn import knn_accuracy
from ntp_ssl.shared.train import classifier_accuracy, fit_classifier

log = logging.getLogger("ntp_ssl.evaluate")

SCRATCH = "scratch"
SCRATCH_CACHE_VERSION = 1


@dataclass
class ModelUnderTest:
    name: str
    encoder: nn.Module
    backbone: str
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepSettings:
    fractions: tuple[float, ...]
    seeds: tuple[int, ...]
    attacks: tuple[str, ...]
    steps: int
    linear_steps: int
    batch_size: int
    lr_linear: float
    lr_finetune: float
    weight_decay: float
    knn_k: int
    scratch: bool = True
    # Switches for the naive-way benchmark only: re-extract features at every grid point,
    # and recompute the scratch baseline instead of reading the cache.
    reuse_features: bool = True
    cache_scratch: bool = True
    reuse_results: bool = True  # equal n -> same result; no mask -> mask-kept is the dense fine-tune

    @classmethod
    def from_config(cls, sweep: Any, **overrides) -> "SweepSettings":
        values = dict(
            fractions=validate_grid(list(sweep.fractions)), seeds=tuple(int(s) for s in sweep.seeds),
            attacks=tuple(sweep.attacks), steps=int(sweep.steps), linear_steps=int(sweep.linear_steps),
            batch_size=int(sweep.batch_size),
            lr_linear=float(sweep.lr_linear), lr_finetune=float(sweep.lr_finetune),
            weight_decay=float(sweep.weight_decay), knn_k=int(sweep.knn_k), scratch=bool(sweep.scratch),
        )
        values.update(overrides)
        return cls(**values)


def _tensors(domain: Domain) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (to_float_tensor(domain.train_images), torch.tensor(domain.train_labels, dtype=torch.long),
            to_float_tensor(domain.test_images), torch.tensor(domain.test_labels, dtype=torch.long))


def fine_tune_accuracy(encoder: nn.Module, masks: dict[str, torch.Tensor] | None, x_train, y_train, x_test, y_test,
                       *, num_classes: int, settings: SweepSettings, seed: int, device) -> float:
    """Full fine-tune of a fresh copy of ``encoder`` plus a fresh head; final test accuracy."""
    torch.manual_seed(seed)
    model = copy.deepcopy(encoder)
    head = nn.Linear(model.feature_dim, num_classes)
    if masks:
        from ntp_ssl.shared.masking import apply_masks_

        named = dict(model.named_parameters())
        apply_masks_({k: named[k] for k in masks}, masks)
    fit_classifier(model, head, x_train, y_train, steps=settings.steps, batch_size=settings.batch_size,
                   lr=settings.lr_finetune, weight_decay=settings.weight_decay, train_encoder=True,
                   masks=masks or None, seed=seed, device=device, stage="evaluate fine-tune")
    return classifier_accuracy(model, head, x_test, y_test, device=device)


def linear_probe_accuracy(train_features, y_train, test_features, y_test, *, num_classes: int,
                          settings: SweepSettings, seed: int, device) -> float:
    torch.manual_seed(seed)
    head = nn.Linear(train_features.shape[1], num_classes)
    identity = nn.Identity()
    fit_classifier(identity, head, train_features, y_train, steps=settings.linear_steps,
                   batch_size=settings.batch_size, lr=settings.lr_linear, weight_decay=settings.weight_decay,
                   train_encoder=False, seed=seed, device=device, stage="evaluate linear probe")
    return classifier_accuracy(identity, head, test_features, y_test, device=device)


def knn_probe_accuracy(train_features, y_train, test_features, y_test, *, num_classes: int, k: int) -> float:
    k = max(1, min(k, len(y_train)))
    result = knn_accuracy(train_features, y_train, test_features, y_test, num_classes=num_classes, ks=(k,),
                          temperature=0.07)
    return float(next(iter(result.values())))


def scratch_key(backbone: str, domain: Domain, domain_spec: dict, *, fraction: float, n: int, seed: int,
                settings: SweepSettings) -> str:
    """Hash of everything the from-scratch accuracy depends on."""
    key = {
        "version": SCRATCH_CACHE_VERSION, "backbone": backbone, "domain": domain.name, "spec": domain_spec,
        "image_size": domain.image_size, "channels": domain.channels, "n_train": int(len(domain.train_labels)),
        "fraction": fraction, "n": n, "seed": seed, "steps": settings.steps, "batch_size": settings.batch_size,
        "lr": settings.lr_finetune, "weight_decay": settings.weight_decay,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def scratch_accuracy(backbone: str, domain: Domain, domain_spec: dict, tensors, idx: np.ndarray, *, fraction: float,
                     seed: int, settings: SweepSettings, cache_dir: Path | None, device) -> tuple[float, bool]:
    """Accuracy of the architecture trained from scratch; (accuracy, was_cached)."""
    x_train, y_train, x_test, y_test = tensors
    key = scratch_key(backbone, domain, domain_spec, fraction=fraction, n=len(idx), seed=seed, settings=settings)
    path = (cache_dir / "scratch" / f"{key}.json") if cache_dir is not None else None
    if settings.cache_scratch and path is not None and path.exists():
        try:
            return float(json.loads(path.read_text())["accuracy"]), True
        except (json.JSONDecodeError, KeyError):
            log.warning("ignoring unreadable scratch cache entry %s", path)
    torch.manual_seed(10_000 + seed)  # the same random initialisation for every model and run
    encoder = build_encoder(backbone, in_channels=domain.channels, image_size=domain.image_size)
    acc = fine_tune_accuracy(encoder, None, x_train[idx], y_train[idx], x_test, y_test,
                             num_classes=domain.num_classes, settings=settings, seed=seed, device=device)
    if path is not None and settings.cache_scratch:
        atomic_write_json(path, {"accuracy": acc, "backbone": backbone, "domain": domain.name, "n": len(idx),
                                 "fraction": fraction, "seed": seed})
    return acc, False


def _row(model: str, domain: str, attack: str, seed: int, fraction: float, n: int, accuracy: float) -> dict:
    return {"model": model, "domain": domain, "attack": attack, "seed": seed, "fraction": fraction, "n": n,
            "accuracy": float(accuracy)}


def _row_key(row: dict) -> tuple:
    return (row["model"], row["domain"], row["attack"], int(row["seed"]), float(row["fraction"]))


def run_sweep(models: Sequence[ModelUnderTest], targets: Sequence[Domain], settings: SweepSettings, *,
              domain_specs: dict[str, dict] | None = None, cache_dir: Path | None = None, device="cpu",
              progress_path: Path | None = None, progress: bool = True,
              on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Run the sweep and return tidy rows; resumable through ``progress_path`` (a JSON list of rows)."""
    backbones = {m.backbone for m in models}
    if settings.scratch and len(backbones) > 1:
        from ntp_ssl.errors import ConfigError

        raise ConfigError(f"checkpoints mix backbones {sorted(backbones)}; evaluate one architecture per run so one "
                          "scratch baseline serves all")
    rows: list[dict] = []
    if progress_path is not None and progress_path.exists():
        try:
            rows = json.loads(progress_path.read_text())
            log.info("resuming the sweep: %d finished rows in %s", len(rows), progress_path)
        except (json.JSONDecodeError, UnicodeDecodeError):  # written atomically, so only a disk or a hand did this
            log.warning("ignoring the unreadable sweep progress file %s; the sweep starts over", progress_path)
            rows = []
    done = {_row_key(r) for r in rows}
    domain_specs = domain_specs or {}

    for model in models:
        if "finetune_masked" in settings.attacks and not model.masks:
            log.info("%s has no pruning mask: its finetune_masked attack is the same as finetune_dense "
                     "and is reported as such", model.name)

    def record(new_rows: Iterable[dict]) -> None:
        for row in new_rows:
            rows.append(row)
            done.add(_row_key(row))
            if on_row is not None:
                on_row(row)
        if progress_path is not None:
            atomic_write_json(progress_path, rows)

    for model in models:  # features are extracted where the attacks run
        model.encoder.to(device)
    total = len(targets) * len(settings.seeds) * len(settings.fractions)
    bar = tqdm(total=total, desc="evaluate", disable=not progress, dynamic_ncols=True)
    for domain in targets:
        tensors = _tensors(domain)
        x_train, y_train, x_test, y_test = tensors
        feature_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # Nested draws: fractions that round to the same n train on the same samples, so
        # their result is computed once (the paper's grid gives n = C for several r).
        memo: dict[tuple, float] = {}

        def features_of(model: ModelUnderTest):
            if not settings.reuse_features or model.name not in feature_cache:
                feature_cache[model.name] = (extract_features(model.encoder, x_train, device=device),
                                             extract_features(model.encoder, x_test, device=device))
            return feature_cache[model.name]

        for seed in settings.seeds:
            for fraction in settings.fractions:
                n = samples_for_fraction(fraction, len(y_train), domain.num_classes)
                idx = draw_subset(domain.train_labels, n, seed=seed, num_classes=domain.num_classes)
                idx_t = torch.as_tensor(idx, dtype=torch.long)
                bar.set_postfix_str(f"{domain.name} seed={seed} n={n}")
                if settings.scratch and (SCRATCH, domain.name, SCRATCH, seed, fraction) not in done:
                    acc = memo.get((SCRATCH, SCRATCH, seed, n)) if settings.reuse_results else None
                    if acc is None:
                        acc, _ = scratch_accuracy(models[0].backbone, domain, domain_specs.get(domain.name, {}),
                                                  tensors, idx, fraction=fraction, seed=seed, settings=settings,
                                                  cache_dir=cache_dir, device=device)
                    memo[(SCRATCH, SCRATCH, seed, n)] = acc
                    record([_row(SCRATCH, domain.name, SCRATCH, seed, fraction, n, acc)])
                for model in models:
                    todo = [a for a in settings.attacks if (model.name, domain.name, a, seed, fraction) not in done]
                    results = {a: memo[(model.name, a, seed, n)] for a in todo
                               if settings.reuse_results and (model.name, a, seed, n) in memo}
                    todo = [a for a in todo if a not in results]
                    if "linear" in todo or "knn" in todo:
                        f_train, f_test = features_of(model)
                        if "linear" in todo:
                            results["linear"] = linear_probe_accuracy(
                                f_train[idx_t], y_train[idx_t], f_test, y_test, num_classes=domain.num_classes,
                                settings=settings, seed=seed, device=device)
                        if "knn" in todo:
                            results["knn"] = knn_probe_accuracy(f_train[idx_t], y_train[idx_t], f_test, y_test,
                                                                num_classes=domain.num_classes, k=settings.knn_k)
                    reuse_dense = not model.masks and settings.reuse_results
                    if "finetune_dense" in todo or ("finetune_masked" in todo and reuse_dense):
                        dense_acc = fine_tune_accuracy(model.encoder, None, x_train[idx_t], y_train[idx_t], x_test,
                                                       y_test, num_classes=domain.num_classes, settings=settings,
                                                       seed=seed, device=device)
                        results["finetune_dense"] = dense_acc
                        if reuse_dense and "finetune_masked" in todo:
                            results["finetune_masked"] = dense_acc
                    if "finetune_masked" in todo and not reuse_dense:
                        results["finetune_masked"] = fine_tune_accuracy(
                            model.encoder, model.masks, x_train[idx_t], y_train[idx_t], x_test, y_test,
                            num_classes=domain.num_classes, settings=settings, seed=seed, device=device)
                    new = []
                    for attack in settings.attacks:
                        if attack in results and (model.name, domain.name, attack, seed, fraction) not in done:
                            memo[(model.name, attack, seed, n)] = results[attack]
                            new.append(_row(model.name, domain.name, attack, seed, fraction, n, results[attack]))
                    if new:
                        record(new)
                bar.update(1)
    bar.close()
    return rows


def source_accuracy(models: Sequence[ModelUnderTest], source: Domain, settings: SweepSettings, *,
                    device="cpu") -> dict[str, dict[str, float]]:
    """Source accuracy each model keeps under the frozen-encoder attacks (linear probe, kNN) on all source data."""
    x_train, y_train, x_test, y_test = _tensors(source)
    result: dict[str, dict[str, float]] = {}
    for model in models:
        model.encoder.to(device)
        f_train = extract_features(model.encoder, x_train, device=device)
        f_test = extract_features(model.encoder, x_test, device=device)
        result[model.name] = {
            "linear": linear_probe_accuracy(f_train, y_train, f_test, y_test, num_classes=source.num_classes,
                                            settings=settings, seed=0, device=device),
            "knn": knn_probe_accuracy(f_train, y_train, f_test, y_test, num_classes=source.num_classes,
                                      k=settings.knn_k),
        }
    return result
