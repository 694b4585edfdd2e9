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
from typing import Iterator, Mapping

import numpy as np
import torch
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


def autocast_context(device: torch.device, precision: str):
    """Mixed precision on CUDA only; on CPU full float32 (the numbers stay reproducible)."""
    if device.type != "cuda" or precision == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


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
) -> float:
    """Fit ``head(encoder(x))`` to ``labels`` with cross-entropy for ``steps`` optimiser steps.

    ``masks`` (encoder parameter name -> bool mask) keeps pruned encoder weights exactly
    zero: the gradient is masked before the step, the weight after it, and the optimizer's
    moments at pruned positions are zeroed. With ``train_encoder=False`` the encoder is
    frozen (eval mode, no gradients). Returns the mean loss of the last 10 steps.
    """
    device = torch.device(device)
    encoder.to(device)
    head.to(device)
    generator = torch.Generator().manual_seed(seed)
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
    loss_fn = nn.CrossEntropyLoss()
    recent: list[float] = []
    for step, idx in enumerate(batch_indices(len(labels), batch_size, steps, generator)):
        x = inputs[idx].to(device, non_blocking=True)
        y = labels[idx].to(device, non_blocking=True)
        if train_encoder:
            features = encoder(x)
        else:
            with torch.no_grad():
                features = encoder(x)
        loss = loss_fn(head(features), y)
        check_finite(loss, stage=stage, step=step, term="cross-entropy")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        recent = (recent + [loss.item()])[-10:]
    if not train_encoder:
        for p in encoder.parameters():
            p.requires_grad_(True)
    return float(np.mean(recent)) if recent else float("nan")


@torch.no_grad()
def classifier_accuracy(
    encoder: nn.Module, head: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
    batch_size: int = 512, device: torch.device | str = "cpu",
) -> float:
    """Top-1 accuracy of ``head(encoder(x))`` in eval mode."""
    device = torch.device(device)
    was_training = (encoder.training, head.training)
    encoder.eval()
    head.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = inputs[start : start + batch_size].to(device)
        pred = head(encoder(x)).argmax(dim=1).cpu()
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
