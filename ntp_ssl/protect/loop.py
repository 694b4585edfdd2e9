"""The protection loop: ADMM iterations, the hard prune, masked retraining; resumable.

One ADMM iteration: the W-step is ``admm.steps_per_iteration`` optimiser steps on
``L_NT(W) + rho/2 sum_l ||W_l - Z_l + U_l||^2`` over paired source/target batches (the
targets take turns, one per step); then :meth:`ADMMPruner.update` does the Z-step
(projection onto the sparsity set), the U-step and the rho schedule. After the last
iteration W is pruned to the support of Z and retrained under the mask on ``L_NT`` alone.
``protect_state.safetensors`` in the run directory is rewritten after every iteration, so a
rerun resumes where the last one stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ntp_ssl.data import Domain, ImageArrayDataset
from ntp_ssl.pretrain.methods import build_train_transform, view_options
from ntp_ssl.protect.admm import ADMMPruner, find_conv_bn_pairs, select_prunable
from ntp_ssl.protect.objective import IndexedViews, NonTransferableObjective
from ntp_ssl.protect.projections import MASKS
from ntp_ssl.shared.checkpoint import load_training_state, resuming, save_training_state
from ntp_ssl.shared.knn import knn_on_train_splits
from ntp_ssl.shared.masking import MaskedOptimizer, mask_gradients_
from ntp_ssl.shared.progress import progress_bar
from ntp_ssl.shared.train import build_optimizer, check_finite, endless_batches, rng_state, set_rng_state

log = logging.getLogger("ntp_ssl.protect")


def train_steps(objective: NonTransferableObjective, optimizer, source_iter, target_iters, steps: int, *,
                penalty=None, start_step: int, desc: str, progress: bool, params: list[nn.Parameter],
                masks=None) -> dict:
    """``steps`` optimiser steps on L_NT (+ the ADMM penalty, + the simulated attacker's
    gradient under ``masks()`` when the loss has one); returns the mean of each term."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    bar = progress_bar(range(steps), desc=desc, leave=False, enabled=progress)
    objective.method.train()
    for step in bar:
        t = (start_step + step) % len(target_iters)  # targets take turns, one per step
        loss, terms = objective(next(source_iter), next(target_iters[t]), t)
        check_finite(loss, stage="protect", step=start_step + step, term=f"non-transferable loss ({terms})")
        if penalty is not None:
            admm_term = penalty()
            terms = {**terms, "admm_penalty": admm_term.item()}
            loss = loss + admm_term
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if objective.w_sim > 0 and masks is not None:
            terms = {**terms, **objective.simulated_attack_(masks(), step=start_step + step)}
        if isinstance(optimizer, MaskedOptimizer):  # pruned gradients must not count towards the clip norm
            mask_gradients_(optimizer.params, optimizer.masks)
        torch.nn.utils.clip_grad_norm_(params, 10.0)  # the negative terms can spike; keep steps bounded
        optimizer.step()
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return {key: value / counts[key] for key, value in sums.items()}  # each over the steps that had it


def _norm(params) -> float:
    return float(torch.sqrt(sum(p.detach().double().pow(2).sum() for p in params.values())))


def mask_overlap(reference: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> float:
    """Share of the entries ``masks`` keeps that ``reference`` keeps too (over ``reference``'s tensors)."""
    kept = sum(int(masks[name].sum()) for name in reference)
    both = sum(int((masks[name] & reference[name].to(masks[name].device)).sum()) for name in reference)
    return both / max(1, kept)


def magnitude_reference(pruner: ADMMPruner) -> dict[str, torch.Tensor]:
    """The plain magnitude mask of the weights as they are now (the unprotected ones) at the
    pruner's sparsity: global top-|w| for the global and soft projections, per layer otherwise.
    Not ``pruner.masks()``: with the random or channel projection that is no magnitude mask."""
    weights = {name: p.detach() for name, p in pruner.params.items()}
    kind = "global" if pruner.projection in ("global", "soft") else "layer"
    return MASKS[kind](weights, pruner.sparsity)


def build_pruner(cfg: Any, encoder: nn.Module) -> ADMMPruner:
    """The ADMM pruner over the encoder's prunable weights, as ``cfg.prune`` and ``cfg.admm`` say."""
    prune = cfg.prune
    prunable = select_prunable(encoder, include_bias=prune.include_bias, include_batchnorm=prune.include_batchnorm,
                               exclude_first_layer=prune.exclude_first_layer)
    soft_delta = prune.soft_delta
    if prune.projection == "soft" and soft_delta is None:
        # delta = the |w| quantile at the target sparsity, so the first soft threshold zeroes that share of weights
        magnitudes = torch.cat([p.detach().abs().flatten() for p in prunable.values()])
        soft_delta = float(torch.quantile(magnitudes.cpu().double(), prune.sparsity))
        log.info("prune.soft_delta not set: %.4g hits sparsity %.3f on the pretrained weights", soft_delta,
                 prune.sparsity)
    return ADMMPruner(prunable, sparsity=prune.sparsity, projection=prune.projection, rho=cfg.admm.rho,
                      rho_growth=cfg.admm.rho_growth, rho_max=cfg.admm.rho_max,
                      rho_schedule=cfg.admm.rho_schedule, balance_mu=cfg.admm.rho_balance_mu,
                      balance_tau=cfg.admm.rho_balance_tau, soft_delta=soft_delta,
                      random_seed=getattr(prune, "random_seed", None),
                      coupled=find_conv_bn_pairs(encoder) if prune.projection == "channel" else None,
                      all_params=dict(encoder.named_parameters()))


@dataclass
class ProtectionRun:
    """What one protection run holds while it runs (and what its state file saves)."""

    cfg: Any
    method: nn.Module
    objective: NonTransferableObjective
    pruner: ADMMPruner
    source: Domain
    targets: list[Domain]
    source_views: IndexedViews
    target_views: list[IndexedViews]
    params: list[nn.Parameter]
    state_path: Path
    device: Any
    writer: Any
    optimizer: Any = None
    magnitude_masks: dict = field(default_factory=dict)  # magnitude_reference of the unprotected weights
    iteration: int = 0
    phase: str = "admm"
    metrics: dict = field(default_factory=lambda: {"iterations": []})

    def new_optimizer(self):
        admm = self.cfg.admm
        return build_optimizer(admm.optimizer, self.params + self.objective.trainable_heads(), lr=admm.lr,
                               weight_decay=admm.weight_decay)

    def batches(self, seed: int) -> tuple:
        """Endless source batches and one endless stream per target, seeded from ``seed``."""
        size, workers = self.cfg.admm.batch_size, self.cfg.data.num_workers
        return (endless_batches(self.source_views, size, seed=seed, workers=workers),
                [endless_batches(ds, size, seed=seed + 17 * (i + 1), workers=workers)
                 for i, ds in enumerate(self.target_views)])

    def knn(self) -> dict[str, float]:
        # monitoring reads train splits only: nothing at protect time sees a test split
        return knn_on_train_splits(self.method.encoder, [self.source, *self.targets], device=self.device,
                                   memo=self.objective.train_features)

    def save(self) -> None:
        state = {"method": self.method.state_dict(), "source_head": self.objective.source_head.state_dict(),
                 "target_heads": self.objective.target_heads.state_dict(), "pruner": self.pruner.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "iteration": self.iteration, "phase": self.phase,
                 "metrics": self.metrics, "rng": rng_state()}
        save_training_state(self.state_path, state, {"stage": "protect"})

    def resume(self) -> None:
        state, _ = load_training_state(self.state_path)
        with resuming(f"protection from {self.state_path}"):
            self.method.load_state_dict(state["method"])
            self.objective.source_head.load_state_dict(state["source_head"])
            self.objective.target_heads.load_state_dict(state["target_heads"])
            self.pruner.load_state_dict(state["pruner"])
            self.optimizer.load_state_dict(state["optimizer"])
            iteration, phase, metrics = int(state["iteration"]), state["phase"], state["metrics"]
            if not (0 <= iteration <= self.cfg.admm.iterations and phase in ("admm", "retrain", "done")
                    and isinstance(metrics, dict)):
                raise ValueError(f"iteration {iteration!r}, phase {phase!r}")
            set_rng_state(state["rng"])
        self.iteration, self.phase, self.metrics = iteration, phase, metrics
        log.info("resuming protection from %s at ADMM iteration %d (%s)", self.state_path, self.iteration, self.phase)


def protection_view_transform(cfg: Any, method_config: Mapping[str, Any] | None = None) -> Any:
    """The two-view transform of the SSL terms during protection: the views the encoder was
    pretrained on (its checkpoint's ``method_config``: smallest crop scale, inversion), so that
    the source term keeps the encoder on the task it learned; the built-in views when the
    checkpoint recorded none (every encoder pretrained before those options existed)."""
    return build_train_transform("simclr", image_size=cfg.data.image_size, channels=cfg.data.channels,
                                 **view_options(method_config))


def start_protection(cfg: Any, method: nn.Module, source: Domain, targets: list[Domain], *, run_dir: Path,
                     device, writer, method_config: Mapping[str, Any] | None = None) -> ProtectionRun:
    """Heads, pruner and optimiser for ``method``; resumed from the run directory's state when there is one."""
    transform = protection_view_transform(cfg, method_config)

    def views(domain: Domain) -> IndexedViews:
        return IndexedViews(ImageArrayDataset(domain.train_images, domain.train_labels, transform=transform))

    objective = NonTransferableObjective(cfg.loss, method, source, targets, device=device)
    pruner = build_pruner(cfg, method.encoder)
    params = list(method.encoder.parameters()) + (
        list(method.projection_head.parameters()) if hasattr(method, "projection_head") else [])
    run = ProtectionRun(cfg=cfg, method=method, objective=objective, pruner=pruner, source=source, targets=targets,
                        source_views=views(source), target_views=[views(t) for t in targets], params=params,
                        state_path=run_dir / "protect_state.safetensors", device=device, writer=writer)
    run.optimizer = run.new_optimizer()
    run.magnitude_masks = magnitude_reference(pruner)
    if cfg.resume and run.state_path.exists():
        run.resume()
    else:
        run.metrics["heads"] = objective.fit_heads(source, targets, seed=cfg.seed)
        run.metrics["knn_before"] = run.knn()
        for name, acc in run.metrics["knn_before"].items():
            writer.add_scalar(f"protect/knn_top1/{name}", acc, 0)
    return run


def w_step_lr(admm: Any, iteration: int) -> float:
    """The W-step learning rate of ``iteration`` (0-based): ``lr`` throughout, or from ``lr`` down
    to ``lr_final`` geometrically, lr * (lr_final / lr) ** (iteration / (iterations - 1))."""
    lr, final = float(admm.lr), getattr(admm, "lr_final", None)
    if final is None or admm.iterations <= 1:
        return lr
    return lr * (float(final) / lr) ** (iteration / (admm.iterations - 1))


def admm_iteration(run: ProtectionRun, iteration: int) -> dict[str, float]:
    """One W-step, Z-step and U-step; logs and records the iteration; returns the kNN scores after it."""
    cfg, seed = run.cfg, run.cfg.seed
    steps, iterations = cfg.admm.steps_per_iteration, cfg.admm.iterations
    run.objective.refresh_pseudo_labels(run.source, run.targets, seed=seed + iteration)
    source_iter, target_iters = run.batches(seed * 1000 + iteration)
    lr = w_step_lr(cfg.admm, iteration)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    terms = train_steps(run.objective, run.optimizer, source_iter, target_iters, steps, penalty=run.pruner.penalty,
                        start_step=iteration * steps, desc=f"W-step {iteration + 1}/{iterations}",
                        progress=cfg.trainer.progress, params=run.params, masks=run.pruner.masks)
    previous_support = run.pruner.masks()
    residuals = run.pruner.update()
    residuals["primal_relative"] = residuals["primal_total"] / _norm(run.pruner.params)  # ||W - Z|| / ||W||
    residuals["support_overlap"] = mask_overlap(previous_support, run.pruner.masks())
    knn = run.knn()
    step = iteration + 1
    for group, values in (("loss", terms), ("admm", residuals), ("knn_top1", knn)):
        for key, value in values.items():
            run.writer.add_scalar(f"protect/{group}/{key}", value, step)
    z_masks = run.pruner.masks()
    kept = sum(int(m.sum()) for m in z_masks.values())
    run.writer.add_scalar("protect/z_sparsity", 1 - kept / sum(m.numel() for m in z_masks.values()), step)
    run.metrics["iterations"].append({"iteration": step, **terms, "knn": knn, **{
        key: residuals[key] for key in ("rho_w_step", "rho", "primal_total", "dual_total", "primal_relative",
                                        "support_overlap")},
        "lr": lr})
    log.info("ADMM %d/%d: %s; kNN %s", step, iterations, ", ".join(f"{k}={v:.4g}" for k, v in terms.items()),
             ", ".join(f"{k}={v:.3f}" for k, v in knn.items()))
    run.iteration = step
    run.save()
    return {**knn, "primal": residuals.get("primal_total", 0)}


def prune_and_retrain(run: ProtectionRun) -> dict[str, torch.Tensor]:
    """Hard prune to the support of Z (unless a resumed run already did), then masked retraining."""
    cfg = run.cfg
    source_only = getattr(cfg.admm, "retrain_loss", None) == "source"
    pseudo_ready = False  # pseudo-labels for retraining already clustered
    if run.phase == "admm":
        knn_before = run.knn()
        if not source_only and getattr(cfg.admm, "retrain_pseudo_from", "pruned") == "unpruned":
            run.objective.refresh_pseudo_labels(run.source, run.targets, seed=cfg.seed + cfg.admm.iterations)
            pseudo_ready = True
        masks = run.pruner.hard_prune()
        run.metrics["hard_prune"] = {"knn_before": knn_before, "knn_after": run.knn(),
                                     "magnitude_overlap": mask_overlap(run.magnitude_masks, masks)}
        run.optimizer = run.new_optimizer()
        run.phase = "retrain"
    else:
        masks = run.pruner.masks()
    named = dict(run.method.encoder.named_parameters())
    masked_opt = MaskedOptimizer(run.optimizer, {k: named[k] for k in masks}, masks)
    if cfg.admm.retrain_steps > 0 and run.phase == "retrain":
        log.info("[2/3 protect] masked retraining for %d steps", cfg.admm.retrain_steps)
        source_iter, target_iters = run.batches(cfg.seed * 1000 + 999)
        steps = cfg.admm.retrain_steps
        every = getattr(cfg.admm, "retrain_refresh_every", 0) or steps  # steps between pseudo-label refreshes
        run.objective.source_only = source_only
        chunks = []
        try:
            for start in range(0, steps, every):
                if not source_only and not (start == 0 and pseudo_ready):
                    run.objective.refresh_pseudo_labels(run.source, run.targets,
                                                        seed=cfg.seed + cfg.admm.iterations + start)
                n = min(every, steps - start)
                chunks.append((n, train_steps(run.objective, masked_opt, source_iter, target_iters, n,
                                              start_step=start, desc=f"masked retraining {start + n}/{steps}",
                                              progress=cfg.trainer.progress, params=run.params,
                                              masks=lambda: masks)))
        finally:
            run.objective.source_only = False
        run.metrics["retrain"] = chunks[0][1] if len(chunks) == 1 else _weighted_means(chunks)
    run.metrics["knn_after"] = run.knn()
    for name, acc in run.metrics["knn_after"].items():
        run.writer.add_scalar(f"protect/knn_top1/{name}", acc, cfg.admm.iterations + 1)
    run.iteration, run.phase = cfg.admm.iterations, "done"
    run.save()
    return masks


def _weighted_means(chunks: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Each term's mean over the chunks (steps, means) that had it, weighted by their steps."""
    keys = dict.fromkeys(key for _, terms in chunks for key in terms)
    return {key: sum(n * terms[key] for n, terms in chunks if key in terms)
            / sum(n for n, terms in chunks if key in terms) for key in keys}


def protect_encoder(cfg: Any, method: nn.Module, source: Domain, targets: list[Domain], *, run_dir: Path,
                    device, writer, method_config: Mapping[str, Any] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """ADMM + hard prune + masked retraining on ``method`` in place; returns (masks, metrics).
    ``method_config``: the checkpoint's pretraining options (its SSL views)."""
    run = start_protection(cfg, method, source, targets, run_dir=run_dir, device=device, writer=writer,
                           method_config=method_config)
    iterations = cfg.admm.iterations
    todo = range(run.iteration, iterations) if run.phase == "admm" else range(0)
    bar = progress_bar(todo, desc="[2/3 protect] ADMM", initial=run.iteration, total=iterations,
                       enabled=cfg.trainer.progress and run.phase == "admm")
    for iteration in bar:
        scores = admm_iteration(run, iteration)
        bar.set_postfix({"src": f"{scores[source.name]:.2f}",
                         "tgt": f"{np.mean([scores[t.name] for t in targets]):.2f}",
                         "primal": f"{scores['primal']:.3g}"})
    masks = prune_and_retrain(run)
    memo = run.objective.train_features
    log.info("train-split features (per domain): %d extracted, %d reused", memo.computed, memo.reused)
    return masks, run.metrics
