"""Training plumbing shared by every stage: seeding, devices, optimisers, schedules, the
one classifier fit loop and its accuracy.

The fit loop (:func:`fit_classifier`) serves every supervised fit in the project: the
heads fitted before protection, the linear-probe and full fine-tune attacks of the SLC
sweep, and the from-scratch baseline. A linear probe is the same loop run on frozen
features with ``encoder = nn.Identity()``.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ntp_ssl.errors import ConfigError, NumericalError
from ntp_ssl.shared.masking import MaskedOptimizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global RNG states (torch, numpy, random) as checkpoint-friendly values."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": np_state[1], "numpy_pos": np_state[2],
            "python": list(random.getstate()[1])}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.asarray(state["numpy"], dtype=np.uint32), int(state["numpy_pos"]), 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"]), None))


def configure_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r} but no CUDA device is available; use trainer.device=cpu or auto")
    return torch.device(name)


def use_deterministic_cuda() -> None:
    """Same seed, same config, same GPU: the same numbers. cuDNN's autotuner picks kernels by
    timing them, and atomic-add kernels sum in whatever order threads arrive; ask for the
    deterministic ones (a warning, not an error, for an op that has none). cuBLAS reads its
    workspace setting when it starts, so it is set before any GPU work."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def autocast_context(device: torch.device | str, precision: str):
    """Mixed precision for the forward pass: ``bf16-mixed`` on CUDA and on the CPU (oneDNN's
    bfloat16 kernels; the weights, their gradients and the optimiser stay float32), ``16-mixed``
    on CUDA only (float16 has no fast CPU kernels; on the CPU it runs in float32); ``32``:
    full float32 everywhere."""
    device = torch.device(device)
    if precision == "bf16-mixed" and device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "16-mixed" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto``: ``bf16-mixed`` where the device computes in bfloat16 natively (a CUDA GPU that
    supports it; a CPU with AMX or AVX-512 bfloat16 instructions, where it runs the small CNN's
    fine-tune steps about 1.6x faster: docs/BENCHMARKS.md), else ``32``; any other value as is."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32"
    from ntp_ssl.shared.machine import native_bf16

    return "bf16-mixed" if device.type == "cpu" and native_bf16() else "32"


def precision_warning(precision: str, device: torch.device | str) -> str | None:
    """Why ``precision`` on ``device`` will not do what it asks (None when it will): bfloat16 on
    a CPU without bfloat16 instructions is emulated by oneDNN and runs slower than float32;
    ``16-mixed`` has no CPU path and runs in float32 there."""
    device = torch.device(device)
    if device.type != "cpu":
        return None
    if precision == "16-mixed":
        return "precision 16-mixed has no CPU kernels: this run computes in float32, as with 32"
    if precision == "bf16-mixed":
        from ntp_ssl.shared.machine import native_bf16

        if not native_bf16():
            return ("precision bf16-mixed on a CPU without bfloat16 instructions (AMX or AVX-512 BF16): emulated, "
                    "about 11x slower than 32 per fine-tune step on an AVX2 CPU (docs/BENCHMARKS.md)")
    return None


def build_optimizer(name: str, params, *, lr: float, weight_decay: float = 0.0, momentum: float = 0.9):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer {name!r} is not one of: sgd, adam, adamw")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier: linear warm-up to 1, then 0.5 * (1 + cos(pi * progress)) down to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def check_finite(value: torch.Tensor, *, stage: str, step: int, term: str = "loss") -> None:
    """Stop with a clear message when a loss is NaN or infinite."""
    if not torch.isfinite(value).all():
        raise NumericalError(
            f"{stage}: the {term} became {value.item()} at step {step}; the last good checkpoint is kept. "
            "Usual fixes: a lower learning rate, a lower weight on that loss term, or trainer.precision=32"
        )


def batch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` batches of indices into range(n): shuffled epochs, batches of min(batch_size, n)."""
    batch_size = min(batch_size, n)
    order = torch.randperm(n, generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > n:
            order = torch.randperm(n, generator=generator)
            position = 0
        yield order[position : position + batch_size]
        position += batch_size


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to ``max_shift`` pixels along each axis, edges replicated: the
    light augmentation a practitioner uses on digits. ``max_shift=0`` returns ``images``."""
    if max_shift <= 0:
        return images
    n, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, None, :, None]
    cols = (dx + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


@dataclass
class FitResult:
    """What a fit ended with: the mean loss of its last 10 steps and, with a validation set,
    the best validation accuracy seen and the step whose weights were kept."""

    loss: float
    val_accuracy: float | None = None
    best_step: int | None = None


class _BestOnValidation:
    """Keeps the weights of the step with the best validation accuracy (ties: the earlier step)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, val, device, precision: str = "32",
                 batch_size: int = 512) -> None:
        self.encoder, self.head, self.val, self.device, self.precision = encoder, head, val, device, precision
        self.batch_size = batch_size
        self.accuracy, self.step, self.state = -1.0, None, None

    def check(self, step: int) -> None:
        accuracy = classifier_accuracy(self.encoder, self.head, self.val[0], self.val[1], device=self.device,
                                       precision=self.precision, batch_size=self.batch_size)
        if accuracy > self.accuracy:
            self.accuracy, self.step = accuracy, step
            self.state = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in (self.encoder, self.head)]

    def restore(self) -> None:
        self.encoder.load_state_dict(self.state[0])
        self.head.load_state_dict(self.state[1])


def _fit_optimizer(encoder: nn.Module, head: nn.Module, *, optimizer: str, lr: float, weight_decay: float,
                   train_encoder: bool, masks, steps: int):
    """The optimiser (masked when ``masks`` are given) and its cosine schedule over ``steps``."""
    params = list(head.parameters())
    if train_encoder:
        params += [p for p in encoder.parameters() if p.requires_grad]
        encoder.train()
    else:
        encoder.eval()
        for p in encoder.parameters():
            p.requires_grad_(False)
    head.train()
    opt = build_optimizer(optimizer, params, lr=lr, weight_decay=weight_decay)
    if masks and train_encoder:
        named = dict(encoder.named_parameters())
        opt = MaskedOptimizer(opt, {name: named[name] for name in masks}, dict(masks))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt if not isinstance(opt, MaskedOptimizer) else opt.optimizer, lambda s: warmup_cosine(s, steps, 0)
    )
    return opt, schedule


class ClassifierFit:
    """:func:`fit_classifier` in pieces: ``advance(to_step)`` runs the scheduled optimiser
    steps up to ``to_step`` (of ``steps``), ``finish()`` restores the best validation weights
    and returns the :class:`FitResult`. Several fits can advance in turns (successive halving
    over learning rates) and give the numbers each would give alone: each holds its own
    batch order, shifts, optimiser and schedule, and the loop reads no global RNG.

    With ``patience`` > 0 (and ``val``), a fit whose validation accuracy has not improved for
    that many consecutive checks stops (``stopped``): its remaining steps are skipped.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
                 steps: int, batch_size: int, lr: float, weight_decay: float = 0.0, optimizer: str = "adam",
                 train_encoder: bool = True, masks: Mapping[str, torch.Tensor] | None = None, seed: int = 0,
                 device: torch.device | str = "cpu", stage: str = "fit", augment_shift: int = 0,
                 val: tuple[torch.Tensor, torch.Tensor] | None = None, eval_every: int = 0, patience: int = 0,
                 precision: str = "32", eval_batch_size: int = 512):
        self.device = torch.device(device)
        self.precision, self.eval_batch_size = precision, eval_batch_size
        self.encoder, self.head = encoder.to(self.device), head.to(self.device)
        self.inputs, self.labels, self.steps, self.train_encoder = inputs, labels, steps, train_encoder
        self.stage, self.augment_shift, self.eval_every, self.patience = stage, augment_shift, eval_every, patience
        generator = torch.Generator().manual_seed(seed)
        self.shifts = torch.Generator().manual_seed(seed + 7777)  # its own stream: the batch order does not depend on it
        self.batches = batch_indices(len(labels), batch_size, steps, generator)
        self.opt, self.schedule = _fit_optimizer(encoder, head, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                                                 train_encoder=train_encoder, masks=masks, steps=steps)
        self.best = (_BestOnValidation(encoder, head, val, self.device, precision, eval_batch_size)
                     if val is not None else None)
        self.loss_fn = nn.CrossEntropyLoss()
        self.recent: list[float] = []
        self.step = 0  # optimiser steps taken
        self.stopped = False  # early stop: no validation improvement in `patience` checks
        self._checks_without_gain = 0

    @property
    def done(self) -> bool:
        return self.stopped or self.step >= self.steps

    @property
    def val_accuracy(self) -> float | None:
        """The best validation accuracy seen so far (None without ``val``)."""
        return self.best.accuracy if self.best is not None else None

    def advance(self, to_step: int) -> "ClassifierFit":
        """Take the scheduled steps up to ``to_step`` (or until an early stop)."""
        encoder, head = self.encoder, self.head  # in the modes _fit_optimizer set (checks restore them)
        while self.step < min(to_step, self.steps) and not self.stopped:
            idx = next(self.batches)
            x = random_shift(self.inputs[idx], self.augment_shift, self.shifts).to(self.device, non_blocking=True)
            y = self.labels[idx].to(self.device, non_blocking=True)
            with autocast_context(self.device, self.precision):
                if self.train_encoder:
                    features = encoder(x)
                else:
                    with torch.no_grad():
                        features = encoder(x)
                logits = head(features)
            loss = self.loss_fn(logits.float(), y)
            check_finite(loss, stage=self.stage, step=self.step, term="cross-entropy")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.schedule.step()
            self.recent = (self.recent + [loss.item()])[-10:]
            self.step += 1
            best = self.best
            if best is not None and ((self.eval_every > 0 and self.step % self.eval_every == 0)
                                     or self.step == self.steps):
                before = best.accuracy
                best.check(self.step)  # measured in eval mode; the modes are restored after it
                self._checks_without_gain = 0 if best.accuracy > before else self._checks_without_gain + 1
                self.stopped = self.patience > 0 and self._checks_without_gain >= self.patience
        return self

    def finish(self) -> FitResult:
        if not self.train_encoder:
            for p in self.encoder.parameters():
                p.requires_grad_(True)
        if self.best is not None:
            self.best.restore()
        return FitResult(float(np.mean(self.recent)) if self.recent else float("nan"),
                         self.best.accuracy if self.best else None, self.best.step if self.best else None)


def fit_classifier(
    encoder: nn.Module,
    head: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    train_encoder: bool = True,
    masks: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    stage: str = "fit",
    augment_shift: int = 0,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    eval_every: int = 0,
    patience: int = 0,
    precision: str = "32",
) -> FitResult:
    """Fit ``head(encoder(x))`` to ``labels`` with cross-entropy for ``steps`` optimiser steps.

    ``masks`` (encoder parameter name -> bool mask) keeps pruned encoder weights exactly
    zero: the gradient is masked before the step, the weight after it, and the optimizer's
    moments at pruned positions are zeroed. With ``train_encoder=False`` the encoder is
    frozen (eval mode, no gradients). ``augment_shift`` moves each training image by up to
    that many pixels (:func:`random_shift`). With ``val`` (inputs, labels), the validation
    accuracy is measured every ``eval_every`` steps and after the last one, and the weights
    of the best step are restored at the end (early stopping on validation data); with
    ``patience`` > 0 training also stops after that many checks without improvement.
    ``precision`` is :func:`autocast_context`'s, for the forward passes of training and validation.
    """
    fit = ClassifierFit(encoder, head, inputs, labels, steps=steps, batch_size=batch_size, lr=lr,
                        weight_decay=weight_decay, optimizer=optimizer, train_encoder=train_encoder, masks=masks,
                        seed=seed, device=device, stage=stage, augment_shift=augment_shift, val=val,
                        eval_every=eval_every, patience=patience, precision=precision)
    return fit.advance(steps).finish()


@torch.no_grad()
def classifier_accuracy(
    encoder: nn.Module, head: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
    batch_size: int = 512, device: torch.device | str = "cpu", precision: str = "32",
) -> float:
    """Top-1 accuracy of ``head(encoder(x))`` in eval mode (forward under ``precision``'s autocast)."""
    device = torch.device(device)
    was_training = (encoder.training, head.training)
    encoder.eval()
    head.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = inputs[start : start + batch_size].to(device)
        with autocast_context(device, precision):
            logits = head(encoder(x))
        pred = logits.float().argmax(dim=1).cpu()
        correct += int((pred == labels[start : start + batch_size]).sum())
    encoder.train(was_training[0])
    head.train(was_training[1])
    return correct / max(1, len(labels))


def world_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) when not distributed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def seeded_loader(dataset, batch_size: int, *, seed: int, workers: int = 0, sampler=None,
                  pin_memory: bool = False) -> DataLoader:
    """One shuffled pass over ``dataset`` in full batches, its order fixed by ``seed``
    (or by ``sampler``, under DDP), so that a run and its resumed twin see the same batches."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
                      generator=torch.Generator().manual_seed(seed), num_workers=workers, pin_memory=pin_memory)


def endless_batches(dataset, batch_size: int, *, seed: int, workers: int = 0) -> Iterator:
    """Batches without end: pass e of ``dataset`` is :func:`seeded_loader` with seed ``seed * 7919 + e``."""
    epoch = 0
    while True:
        yield from seeded_loader(dataset, min(batch_size, len(dataset)), seed=seed * 7919 + epoch, workers=workers)
        epoch += 1
