"""The SLC sweep: attack each model with growing amounts of target data.

For every target domain, seed and fraction r of the grid, ``n = max(round(r N), C)``
samples are drawn (nested across n for one seed) and every selected attack starts from a
fresh copy of the model under test and a fresh linear head:

- ``linear``: a converged linear probe on frozen, standardised features (multinomial
  logistic regression, L-BFGS; its l2 chosen on the attacker's validation split;
  ntp_ssl/evaluate/probe.py); features are extracted once per model and domain;
- ``knn``: weighted kNN (faiss) on the same frozen features;
- ``finetune_masked``: full fine-tune with the pruning mask kept (the paper's attacker);
- ``finetune_dense``: full fine-tune with no mask (pruned weights may regrow);
- ``lpft_masked`` / ``lpft_dense``: LP-FT, the fine-tune started from the converged linear
  probe's head instead of a fresh one (a standard transfer recipe that often beats plain
  fine-tuning), mask kept or not; that head is fitted on the fine-tune's fit samples alone
  (before 2026-12-07 on all n, so the validation samples choosing LP-FT's rate and stopping
  step had been seen by its head: a weaker LP-FT, docs/RESULTS.md);
- ``finetune_refill`` (opt-in): a dense fine-tune from scratch's own initialisation with the
  model's kept weights pasted in, i.e. its pruned (zero) weights refilled with fresh random
  values. An attacker who sees the zeros can do this; it asks whether a dense protection
  lives in the zeros themselves (a start with 90% of a layer at exactly 0 trains differently
  from a random one). A model without a mask: the same as ``finetune_dense``.

Fine-tunes follow the attacker's protocol of ntp_ssl/evaluate/attack.py (budget,
augmentation, learning rate chosen on the attacker's own validation split). The
from-scratch baseline is the same attack on a random initialisation; its results are
cached on disk by everything they depend on, so they are computed once across models and
runs. Every row reports the test accuracy on the whole target test split, with the choice
behind it (``choice``: learning rate or l2; ``val_accuracy``; ``steps``; ``best_step``).

Where the time goes: the full fine-tunes (masked, dense, scratch) are ``steps`` forward
and backward passes per learning rate; linear probes and kNN run on cached features.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ntp_ssl.config import REFERENCE_EVAL_BATCH, REFERENCE_PRECISION, SweepConfig
from ntp_ssl.data import Domain, to_float_tensor
from ntp_ssl.encoders import build_encoder
from ntp_ssl.encoders.layout import channels_last_enabled
from ntp_ssl.errors import ConfigError, NtpSslError
from ntp_ssl.data.subsets import draw_subset
from ntp_ssl.evaluate.attack import AttackResult, attack_precision, attacker_split, fine_tune_attack
from ntp_ssl.evaluate.probe import converged_linear_probe
from ntp_ssl.evaluate.results import normalize_row, row_key
from ntp_ssl.evaluate.slc import samples_for_fraction, validate_grid
from ntp_ssl.shared.features import extract_features
from ntp_ssl.io import atomic_write_json
from ntp_ssl.shared.knn import knn_top1
from ntp_ssl.shared.masking import apply_masks_
from ntp_ssl.shared.progress import progress_bar
from ntp_ssl.shared.train import precision_warning

log = logging.getLogger("ntp_ssl.evaluate")

SCRATCH = "scratch"
SCRATCH_CACHE_VERSION = 3  # 3: keyed on the domain's content; entries carry their key and a checksum
#: every sweep setting a fine-tune's result depends on (the scratch cache key holds them all)
PROTOCOL_KEYS = ("steps", "epochs", "min_steps", "max_steps", "augment_shift", "lr_finetune", "lr_grid",
                 "val_fraction", "search_min_n", "batch_size", "weight_decay")
#: the speed features: in the key only when on (0 is the protocol without them, so entries
#: cached before they existed stay valid)
SPEED_KEYS = ("halving", "patience")


def _plain(value):
    return [float(v) for v in value] if not isinstance(value, (int, float, str)) else value


@dataclass
class ModelUnderTest:
    name: str
    encoder: nn.Module
    backbone: str
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    attacks: tuple[str, ...] | None = None  # this model's attacks among the sweep's; None: all of them


#: scratch's random initialisation for sweep seed s is drawn from seed SCRATCH_INIT_OFFSET + s
#: (the same for every model and run; the refill attack starts from it too)
SCRATCH_INIT_OFFSET = 10_000
#: a model's sparse-scratch control (its mask on a random initialisation) is drawn from seed
#: SPARSE_SCRATCH_INIT_OFFSET + the run's seed and named "<model>" + SPARSE_SCRATCH_SUFFIX
SPARSE_SCRATCH_INIT_OFFSET = 20_000
SPARSE_SCRATCH_SUFFIX = "-sparse_scratch"


def _fresh_encoder(backbone: str, *, in_channels: int, image_size: int, seed: int) -> nn.Module:
    """A randomly initialised encoder drawn from ``seed``, the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_encoder(backbone, in_channels=in_channels, image_size=image_size)


def sparse_scratch_model(model: ModelUnderTest, *, in_channels: int, image_size: int, seed: int,
                         name: str = "sparse_scratch") -> ModelUnderTest:
    """The sparse-scratch control of a masked ``model``: its mask on a random initialisation
    (drawn from ``seed``, the global RNG untouched), attacked by the mask-kept fine-tune only.
    A protected encoder whose mask-kept SLC-AUC is not below this one's protects no more than
    its sparsity pattern does."""
    if not model.masks:
        raise ConfigError(f"model {model.name!r} has no pruning mask; accepted for sparse scratch: a masked "
                          "(protected or pruned) checkpoint")
    encoder = _fresh_encoder(model.backbone, in_channels=in_channels, image_size=image_size, seed=seed)
    apply_masks_(dict(encoder.named_parameters()), model.masks)
    return ModelUnderTest(name, encoder, model.backbone, masks=model.masks, attacks=("finetune_masked",))


def refilled_encoder(model: ModelUnderTest, *, in_channels: int, image_size: int, seed: int) -> nn.Module:
    """A copy of ``model.encoder`` whose pruned entries (mask False) hold the values of a fresh
    initialisation drawn from ``seed`` (the global RNG untouched); kept entries and every
    unmasked tensor (biases, batch norm) are the model's. ``W' = M * W + (1 - M) * W_init``."""
    fresh = dict(_fresh_encoder(model.backbone, in_channels=in_channels, image_size=image_size,
                                seed=seed).named_parameters())
    encoder = copy.deepcopy(model.encoder)
    named = dict(encoder.named_parameters())
    with torch.no_grad():
        for name, mask in model.masks.items():
            if name not in named or name not in fresh or fresh[name].shape != named[name].shape:
                raise ConfigError(f"model {model.name!r}: mask {name!r} does not match a tensor of a fresh "
                                  f"{model.backbone} encoder; accepted: masks saved with this backbone")
            keep = mask.to(device=named[name].device, dtype=torch.bool)
            named[name].copy_(torch.where(keep, named[name], fresh[name].to(named[name].device)))
    return encoder


@dataclass
class SweepWork:
    """Counts of the sweep's expensive work, for benchmarks and logs: pass one to :func:`run_sweep`."""

    fine_tunes: int = 0  # fine-tune attacks run (masked, dense, LP-FT, scratch); each trains once per lr searched
    scratch_trained: int = 0  # scratch baselines trained (cache misses)
    scratch_cached: int = 0  # scratch baselines read from the cache
    feature_extractions: int = 0
    images_extracted: int = 0


def _tensors(domain: Domain) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (to_float_tensor(domain.train_images), torch.tensor(domain.train_labels, dtype=torch.long),
            to_float_tensor(domain.test_images), torch.tensor(domain.test_labels, dtype=torch.long))


def linear_probe(train_features, y_train, test_features, y_test, *, num_classes: int, settings: SweepConfig,
                 seed: int) -> tuple[AttackResult, nn.Linear]:
    """The converged linear probe on frozen features, its l2 chosen on the attacker's validation
    split; with it, the probe as a linear layer on raw features (where LP-FT starts)."""
    probe = converged_linear_probe(train_features, y_train, test_features, y_test, num_classes=num_classes,
                                   l2_grid=tuple(settings.probe_l2_grid), val_fraction=settings.val_fraction,
                                   seed=seed, default_l2=settings.probe_l2)
    head = nn.Linear(probe["weight"].shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(probe["weight"])
        head.bias.copy_(probe["bias"])
    result = AttackResult(probe["accuracy"], choice=probe["l2"] if probe["searched"] else None,
                          val_accuracy=probe["val_accuracy"])
    return result, head


def scratch_key(backbone: str, domain: Domain, domain_spec: dict, *, fraction: float, n: int, seed: int,
                settings: SweepConfig, precision: str = REFERENCE_PRECISION, device_type: str = "cpu") -> str:
    """Hash of everything the from-scratch accuracy depends on: the domain's content (not only
    its name: a file replaced under the same name must miss), the draw, the protocol and the
    kind of device (a GPU's kernels round otherwise; a cache shared by a CPU and a GPU run must
    not pair one's scratch with the other's models)."""
    key = {
        "version": SCRATCH_CACHE_VERSION, "backbone": backbone, "domain": domain.name, "spec": domain_spec,
        "content": domain.content_digest(),
        "image_size": domain.image_size, "channels": domain.channels, "n_train": int(len(domain.train_labels)),
        "fraction": fraction, "n": n, "seed": seed, "protocol": {k: _plain(getattr(settings, k)) for k in PROTOCOL_KEYS},
        **{k: int(getattr(settings, k)) for k in SPEED_KEYS if getattr(settings, k, 0)},
        # in the key only when on: the entries cached before it existed were made in NCHW
        **({"channels_last": True} if channels_last_enabled() else {}),
        # the attacker's resolved arithmetic, in the key only off the reference attacker's (as above)
        **({"precision": precision} if precision != REFERENCE_PRECISION else {}),
        **({"eval_batch_size": int(settings.eval_batch_size)}
           if int(getattr(settings, "eval_batch_size", REFERENCE_EVAL_BATCH)) != REFERENCE_EVAL_BATCH else {}),
        # in the key only off the CPU, where every entry before it was made
        **({"device_type": device_type} if device_type != "cpu" else {}),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def train_scratch(backbone: str, domain: Domain, tensors, idx: np.ndarray, *, seed: int, settings: SweepConfig,
                  device) -> AttackResult:
    """Accuracy of the architecture trained from random initialisation on the samples ``idx``."""
    x_train, y_train, x_test, y_test = tensors
    torch.manual_seed(SCRATCH_INIT_OFFSET + seed)  # the same random initialisation for every model and run
    encoder = build_encoder(backbone, in_channels=domain.channels, image_size=domain.image_size)
    return fine_tune_attack(encoder, None, x_train[idx], y_train[idx], x_test, y_test,
                            num_classes=domain.num_classes, settings=settings, seed=seed, device=device)


def scratch_accuracy(backbone: str, domain: Domain, domain_spec: dict, tensors, idx: np.ndarray, *, fraction: float,
                     seed: int, settings: SweepConfig, cache_dir: Path | None, device) -> tuple[AttackResult, bool]:
    """:func:`train_scratch`, cached under ``cache_dir/scratch`` (None: no cache); (result, was_cached).

    An entry is trusted only when it is well formed, stored under this key and matches its
    own checksum; anything else is retrained (with a warning) and overwritten."""
    key = scratch_key(backbone, domain, domain_spec, fraction=fraction, n=len(idx), seed=seed, settings=settings,
                      precision=attack_precision(settings, device), device_type=torch.device(device).type)
    path = (cache_dir / "scratch" / f"{key}.json") if cache_dir is not None else None
    if path is not None and path.exists():
        cached, problem = read_scratch_entry(path, key)
        if cached is not None:
            return cached, True
        log.warning("scratch cache entry %s is not trusted (%s); training scratch again", path, problem)
    result = train_scratch(backbone, domain, tensors, idx, seed=seed, settings=settings, device=device)
    if path is not None:
        stored = {"key": key, "result": dataclasses.asdict(result)}
        try:
            atomic_write_json(path, {**stored, "checksum": _entry_checksum(stored), "backbone": backbone,
                                     "domain": domain.name, "n": len(idx), "fraction": fraction, "seed": seed})
        except OSError as exc:  # an unwritable cache costs time later, never this run
            log.warning("could not write the scratch cache entry %s (%s)", path, exc.strerror)
    return result, False


def _entry_checksum(stored: dict) -> str:
    return hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()


def read_scratch_entry(path: Path, key: str) -> tuple[AttackResult | None, str]:
    """(result, "") for a trustworthy entry, else (None, what is wrong with it)."""
    try:
        entry = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"unreadable: {type(exc).__name__}"
    if not isinstance(entry, dict) or not isinstance(entry.get("result"), dict):
        return None, "not an object with a result"
    if entry.get("key") != key:
        return None, "stored under another key"
    if entry.get("checksum") != _entry_checksum({"key": key, "result": entry["result"]}):
        return None, "its checksum does not match its content"
    result = entry["result"]
    fields = {f.name for f in dataclasses.fields(AttackResult)}

    def number(value, low: float, high: float) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high

    if set(result) != fields or not number(result["accuracy"], 0.0, 1.0):
        return None, "fields or accuracy out of range"
    if not (result["choice"] is None or number(result["choice"], 1e-12, 1e6)):
        return None, "bad learning rate"
    if not (result["val_accuracy"] is None or number(result["val_accuracy"], 0.0, 1.0)):
        return None, "bad validation accuracy"
    if not all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
               for v in (result["steps"], result["best_step"])):
        return None, "bad step counts"
    return AttackResult(**result), ""


def _row(model: str, domain: str, attack: str, seed: int, fraction: float, n: int, result: AttackResult) -> dict:
    return {"model": model, "domain": domain, "attack": attack, "seed": seed, "fraction": fraction, "n": n,
            "accuracy": float(result.accuracy), "choice": result.choice, "val_accuracy": result.val_accuracy,
            "steps": result.steps, "best_step": result.best_step}


class _Progress:
    """The rows so far, which grid points they cover, and the file that lets a rerun resume."""

    def __init__(self, path: Path | None, on_row: Callable[[dict], None] | None):
        self.path, self.on_row, self.rows = path, on_row, []
        if path is not None and path.exists():
            try:
                rows = json.loads(path.read_bytes().decode("utf-8"))
                if not isinstance(rows, list):
                    raise ValueError("not a list of rows")
                for i, row in enumerate(rows):
                    normalize_row(row, i)  # raises on a row that is not a result row
                self.rows = rows
                log.info("resuming the sweep: %d finished rows in %s", len(self.rows), path)
            except (ValueError, KeyError, TypeError, AttributeError, NtpSslError) as exc:
                # written atomically: only a disk or a hand did this
                log.warning("ignoring the sweep progress file %s (%s); the sweep starts over", path, exc)
        self.done = {row_key(r) for r in self.rows}

    def has(self, model: str, domain: str, attack: str, seed: int, fraction: float) -> bool:
        return (model, domain, attack, seed, fraction) in self.done

    def record(self, new_rows: Iterable[dict]) -> None:
        for row in new_rows:
            self.rows.append(row)
            self.done.add(row_key(row))
            if self.on_row is not None:
                self.on_row(row)
        if self.path is not None:
            atomic_write_json(self.path, self.rows)


@dataclass
class _Target:
    """One target domain as the sweep uses it: tensors, frozen features per model, results per n."""

    domain: Domain
    tensors: tuple
    features: dict = field(default_factory=dict)
    memo: dict = field(default_factory=dict)  # (model, attack, seed, n) -> AttackResult: equal n, equal draw

    def features_of(self, model: ModelUnderTest, device, work: SweepWork):
        if model.name not in self.features:  # extracted once per model and domain
            x_train, _, x_test, _ = self.tensors
            self.features[model.name] = (extract_features(model.encoder, x_train, device=device),
                                         extract_features(model.encoder, x_test, device=device))
            work.feature_extractions += 2
            work.images_extracted += int(x_train.shape[0] + x_test.shape[0])
        return self.features[model.name]


def _attack(model: ModelUnderTest, target: _Target, todo: list[str], idx_t: torch.Tensor, *, seed: int,
            settings: SweepConfig, device, work: SweepWork) -> dict[str, AttackResult]:
    """The accuracy of each attack in ``todo`` on the samples ``idx_t``."""
    x_train, y_train, x_test, y_test = target.tensors
    num_classes = target.domain.num_classes
    results: dict[str, AttackResult] = {}
    head = None
    if {"linear", "knn", "lpft_masked", "lpft_dense"} & set(todo):
        f_train, f_test = target.features_of(model, device, work)
        wants_lpft = bool({"lpft_masked", "lpft_dense"} & set(todo))
        split = attacker_split(y_train[idx_t].numpy(), settings, seed) if wants_lpft else None
        if "linear" in todo or (wants_lpft and split is None):
            # the reported probe, on all n; LP-FT starts from it when it cannot search (no
            # validation samples to keep apart)
            results["linear"], head = linear_probe(f_train[idx_t], y_train[idx_t], f_test, y_test,
                                                   num_classes=num_classes, settings=settings, seed=seed)
        if split is not None:
            # LP-FT's head on the fine-tune's fit samples only: the reported probe was refitted
            # on all n, the validation samples that choose LP-FT's rate and stop included
            fit_t = idx_t[torch.as_tensor(split[0])]
            _, head = linear_probe(f_train[fit_t], y_train[fit_t], f_test, y_test, num_classes=num_classes,
                                   settings=settings, seed=seed)
        if "knn" in todo:
            results["knn"] = AttackResult(knn_top1(f_train[idx_t], y_train[idx_t], f_test, y_test,
                                                   num_classes=num_classes, k=settings.knn_k))
    # A model without a mask: its mask-kept fine-tunes are the dense ones, trained once.
    for attack, masks, init, twin in (("finetune_dense", None, None, "finetune_masked"),
                                      ("finetune_masked", model.masks, None, "finetune_dense"),
                                      ("lpft_dense", None, head, "lpft_masked"),
                                      ("lpft_masked", model.masks, head, "lpft_dense")):
        if attack not in todo or attack in results:
            continue
        results[attack] = fine_tune_attack(model.encoder, masks, x_train[idx_t], y_train[idx_t], x_test, y_test,
                                           num_classes=num_classes, settings=settings, seed=seed, device=device,
                                           head=init)
        work.fine_tunes += 1
        if not model.masks and twin in todo:
            results[twin] = results[attack]
    if "finetune_refill" in todo:
        if not model.masks and "finetune_dense" in results:  # nothing to refill: the dense fine-tune itself
            results["finetune_refill"] = results["finetune_dense"]
        else:
            # scratch's initialisation for this seed (train_scratch), the model's kept weights pasted in
            encoder = (refilled_encoder(model, in_channels=target.domain.channels, image_size=target.domain.image_size,
                                        seed=SCRATCH_INIT_OFFSET + seed) if model.masks else model.encoder)
            results["finetune_refill"] = fine_tune_attack(encoder, None, x_train[idx_t], y_train[idx_t], x_test,
                                                          y_test, num_classes=num_classes, settings=settings,
                                                          seed=seed, device=device)
            work.fine_tunes += 1
    return {attack: result for attack, result in results.items() if attack in todo}


def _check_one_backbone(models: Sequence[ModelUnderTest], settings: SweepConfig) -> None:
    backbones = {m.backbone for m in models}
    if settings.scratch and len(backbones) > 1:
        raise ConfigError(f"checkpoints mix backbones {sorted(backbones)}; evaluate one architecture per run so one "
                          "scratch baseline serves all")
    for model in models:
        if "finetune_masked" in settings.attacks and not model.masks:
            log.info("%s has no pruning mask: its finetune_masked attack is the same as finetune_dense "
                     "and is reported as such", model.name)


def run_sweep(models: Sequence[ModelUnderTest], targets: Sequence[Domain], settings: SweepConfig, *,
              domain_specs: dict[str, dict] | None = None, cache_dir: Path | None = None, device="cpu",
              progress_path: Path | None = None, progress: bool = True,
              on_row: Callable[[dict], None] | None = None, work: SweepWork | None = None) -> list[dict]:
    """Run the sweep and return tidy rows; resumable through ``progress_path`` (a JSON list of rows).

    ``work``, when given, counts the fine-tunes, scratch trainings and feature extractions."""
    _check_one_backbone(models, settings)
    fractions, work = validate_grid(list(settings.fractions)), work if work is not None else SweepWork()
    precision = attack_precision(settings, device)
    log.info("sweep: the fine-tunes compute in %s (sweep.precision=%s)", precision,
             getattr(settings, "precision", REFERENCE_PRECISION))
    warning = precision_warning(precision, device)
    if warning:
        log.warning("sweep.%s", warning)
    state = _Progress(progress_path, on_row)
    for model in models:  # features are extracted where the attacks run
        model.encoder.to(device)
    total_points = len(targets) * len(settings.seeds) * len(fractions)
    bar = progress_bar(total=total_points, desc="evaluate", enabled=progress)
    point, started = 0, time.perf_counter()
    for domain in targets:
        target = _Target(domain, _tensors(domain))
        for seed in settings.seeds:
            for fraction in fractions:
                point, point_started, rows_before = point + 1, time.perf_counter(), len(state.rows)
                n = samples_for_fraction(fraction, len(domain.train_labels), domain.num_classes)
                idx = draw_subset(domain.train_labels, n, seed=seed, num_classes=domain.num_classes)
                bar.set_postfix_str(f"{domain.name} seed={seed} n={n}")
                if settings.scratch and not state.has(SCRATCH, domain.name, SCRATCH, seed, fraction):
                    acc = target.memo.get((SCRATCH, SCRATCH, seed, n))
                    if acc is None:
                        acc, cached = scratch_accuracy(models[0].backbone, domain, (domain_specs or {}).get(
                            domain.name, {}), target.tensors, idx, fraction=fraction, seed=seed, settings=settings,
                            cache_dir=cache_dir, device=device)
                        work.scratch_cached += int(cached)
                        work.scratch_trained += int(not cached)
                        work.fine_tunes += int(not cached)
                    target.memo[(SCRATCH, SCRATCH, seed, n)] = acc
                    state.record([_row(SCRATCH, domain.name, SCRATCH, seed, fraction, n, acc)])
                for model in models:
                    todo = [a for a in settings.attacks if (model.attacks is None or a in model.attacks)
                            and not state.has(model.name, domain.name, a, seed, fraction)]
                    results = {a: target.memo[(model.name, a, seed, n)] for a in todo
                               if (model.name, a, seed, n) in target.memo}
                    results.update(_attack(model, target, [a for a in todo if a not in results],
                                           torch.as_tensor(idx, dtype=torch.long), seed=seed, settings=settings,
                                           device=device, work=work))
                    target.memo.update({(model.name, a, seed, n): acc for a, acc in results.items()})
                    state.record([_row(model.name, domain.name, a, seed, fraction, n, results[a])
                                  for a in settings.attacks if a in results])
                bar.update(1)
                if len(state.rows) > rows_before:  # a log file's progress: the bar is shown on a terminal only
                    log.info("sweep point %d/%d: %s seed %d n=%d in %.1f s (%.1f min so far)", point, total_points,
                             domain.name, seed, n, time.perf_counter() - point_started,
                             (time.perf_counter() - started) / 60)
    bar.close()
    log.info("sweep work: %s", work)
    return state.rows


def source_accuracy(models: Sequence[ModelUnderTest], source: Domain, settings: SweepConfig, *,
                    device="cpu") -> dict[str, dict[str, float]]:
    """Source accuracy each model keeps under the frozen-encoder attacks (linear probe, kNN) on all source data."""
    x_train, y_train, x_test, y_test = _tensors(source)
    result: dict[str, dict[str, float]] = {}
    for model in models:
        model.encoder.to(device)
        f_train = extract_features(model.encoder, x_train, device=device)
        f_test = extract_features(model.encoder, x_test, device=device)
        result[model.name] = {
            "linear": linear_probe(f_train, y_train, f_test, y_test, num_classes=source.num_classes,
                                   settings=settings, seed=0)[0].accuracy,
            "knn": knn_top1(f_train, y_train, f_test, y_test, num_classes=source.num_classes, k=settings.knn_k),
        }
    return result
