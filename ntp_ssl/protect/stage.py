"""``ntp-ssl protect``: Non-Transferable Pruning of an encoder, then (optionally) the SLC sweep.

The main job, stage by stage:

1. *encoder*: the checkpoint given, or the default SimCLR encoder pretrained on the source
   once and reused from the cache (``<cache>/encoders/...``);
2. *protect*: ADMM iterations (W-step on ``L_NT(W) + rho/2 sum ||W - Z + U||^2``, Z-step
   projection, U-step, rho schedule), hard prune to the support of Z, masked retraining,
   export of ``protected.safetensors`` (weights baked as ``W * M``, plus the mask);
3. *evaluate*: the SLC sweep of the protected and the unprotected encoder against
   training from scratch on every target; summary printed and written.

The run directory keeps ``protect_state.safetensors`` after every ADMM iteration, so a
rerun of the same command resumes where the last one stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ntp_ssl.shared.checkpoint import (
    MASK_PREFIX,
    load_checkpoint,
    load_encoder,
    load_training_state,
    save_checkpoint,
    save_training_state,
    sha256_file,
)
from ntp_ssl.config import validate_protect
from ntp_ssl.data import Domain, ImageArrayDataset, default_cache_dir, load_domains_for, to_float_tensor
from ntp_ssl.errors import ConfigError
from ntp_ssl.evaluate.stage import check_compatible, domain_spec, evaluate_models
from ntp_ssl.evaluate.sweep import ModelUnderTest, SweepSettings
from ntp_ssl.shared.features import extract_features
from ntp_ssl.io import atomic_write_json, atomic_write_text
from ntp_ssl.pretrain.methods import build_method, build_train_transform, export_state, load_exported_state
from ntp_ssl.pretrain.stage import evaluate_knn, run_pretrain
from ntp_ssl.protect.admm import ADMMPruner, find_conv_bn_pairs, select_prunable
from ntp_ssl.protect.losses import (
    kmeans_pseudo_labels,
    ntl_loss,
    representation_ntp_loss,
    supervised_ntp_loss,
)
from ntp_ssl.shared.masking import MaskedOptimizer, mask_gradients_
from ntp_ssl.protect.sparsity import format_sparsity_table, sparsity_report
from ntp_ssl.shared.runs import claim_run_dir, fingerprint
from ntp_ssl.shared.train import (
    build_optimizer,
    rng_state,
    set_rng_state,
    check_finite,
    classifier_accuracy,
    configure_threads,
    fit_classifier,
    resolve_device,
    seed_everything,
)

log = logging.getLogger("ntp_ssl.protect")


# ----------------------------------------------------------------------------- the encoder


def default_encoder(cfg: Any, cache_dir: Path) -> Path:
    """Pretrain the default encoder for this source once; later runs reuse it from the cache."""
    pcfg = copy.deepcopy(cfg.pretrain)
    pcfg.data = cfg.data
    pcfg.paths = cfg.paths
    pcfg.trainer = cfg.trainer
    digest = hashlib.sha256(json.dumps(fingerprint(pcfg), sort_keys=True).encode()).hexdigest()[:12]
    run_dir = cache_dir / "encoders" / f"{pcfg.run_name}-{digest}"
    log.info("[1/3 encoder] no checkpoint given: using the default %s encoder from %s", pcfg.method.name, run_dir)
    # Pretraining here draws from (and reseeds) the global RNGs, a cached encoder does not: restore
    # them so that protection starts from the same state either way (same seed, same numbers).
    state = rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    checkpoint = Path(run_pretrain(pcfg, run_dir)["checkpoint"])
    set_rng_state(state)
    if cuda_state is not None:
        torch.cuda.set_rng_state_all(cuda_state)
    return checkpoint


def load_method(path: Path, device) -> tuple[nn.Module, dict, dict[str, torch.Tensor]]:
    """The method module (encoder + its heads) of a checkpoint, its metadata, and its mask."""
    encoder, meta, masks, tensors = load_encoder(path)
    kwargs = {}
    config = meta.get("method_config") or {}
    if meta["method"] in ("simclr", "moco"):
        kwargs = {k: config[k] for k in ("hidden_dim", "projection_dim", "temperature") if k in config}
    method = build_method(meta["method"], encoder, num_classes=int(meta.get("num_classes", 10)), **kwargs)
    load_exported_state(method, {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)})
    return method.to(device), meta, masks


# ----------------------------------------------------------------------------- data


class _Indexed(Dataset):
    """(views, index): labels and pseudo-labels are looked up by index, so they can change."""

    def __init__(self, base: ImageArrayDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        return self.base[i][0], i


def _batches(dataset: Dataset, batch_size: int, seed: int, workers: int) -> Iterator:
    """Endless augmented batches; a fresh seeded loader per pass keeps runs reproducible."""
    epoch = 0
    while True:
        generator = torch.Generator().manual_seed(seed * 7919 + epoch)
        loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, drop_last=True,
                            generator=generator, num_workers=workers)
        yield from loader
        epoch += 1


# ----------------------------------------------------------------------------- the loss


class NonTransferableObjective:
    """``L_NT`` of the configured kind on a paired source/target batch, with each term reported.

    - ``ssl``: w_s SSL_S - w_t min(SSL_T, c_t) - w_mmd min(MMD, c_m) + w_fp FDR(f_T, k-means_T) + w_fl FDR(f_T, y_T)
      - w_fs min(FDR(f_S, k-means_S), c_fs)
    - ``supervised``: CE_S - alpha min(CE_T, c) + lambda FDR(f_T, y_T)   (the paper's)
    - ``ntl``: CE_S - alpha min(CE_T, c) min(MMD, c_m)
    - ``none``: the source term alone (plain pruning, the magnitude-pruning baseline)
    """

    def __init__(self, cfg: Any, method: nn.Module, source: Domain, targets: list[Domain], *, device):
        self.cfg = cfg.loss
        self.kind = cfg.loss.kind
        self.method = method
        self.device = device
        self.has_ssl_head = hasattr(method, "projection_head")
        self.source_labels = torch.tensor(source.train_labels, dtype=torch.long)
        self.target_labels = [torch.tensor(t.train_labels, dtype=torch.long) for t in targets]
        self.pseudo_labels: list[torch.Tensor] = [torch.zeros(len(t.train_labels), dtype=torch.long) for t in targets]
        self.source_pseudo_labels = torch.zeros(len(source.train_labels), dtype=torch.long)
        if self.kind == "ssl" and not self.has_ssl_head:
            raise ConfigError("loss.kind=ssl needs an encoder with an SSL projection head (simclr or moco); this "
                              "checkpoint is supervised: use loss.kind=supervised, ntl or none")
        feature_dim = method.encoder.feature_dim
        needs_heads = self.kind in ("supervised", "ntl") or not self.has_ssl_head
        # A supervised checkpoint brings its trained classifier as the source head; otherwise a fresh one is fitted.
        self.source_head_is_trained = hasattr(method, "classifier")
        self.source_head = method.classifier if self.source_head_is_trained else nn.Linear(feature_dim,
                                                                                           source.num_classes)
        self.target_heads = nn.ModuleList(nn.Linear(feature_dim, t.num_classes) for t in targets)
        self.source_head.to(device)
        self.target_heads.to(device)
        self.needs_heads = needs_heads

    def trainable_heads(self) -> list[nn.Parameter]:
        """The source head learns with the encoder (it is part of the source task); target heads stay fixed."""
        return list(self.source_head.parameters()) if self.needs_heads else []

    def fit_heads(self, source: Domain, targets: list[Domain], *, seed: int) -> dict[str, float]:
        """Fit the source head (unless the checkpoint has one) and the fixed target heads on frozen features."""
        if not self.needs_heads:
            return {}
        steps = max(1, self.cfg.head_epochs * 20)
        scores = {}
        pairs = [] if self.source_head_is_trained else [(self.source_head, source, "source")]
        pairs += [(head, t, t.name) for head, t in zip(self.target_heads, targets)]
        for head, domain, name in pairs:
            x = to_float_tensor(domain.train_images)
            y = torch.tensor(domain.train_labels, dtype=torch.long)
            features = extract_features(self.method.encoder, x, device=self.device)
            fit_classifier(nn.Identity(), head, features, y, steps=steps, batch_size=256, lr=1e-2,
                           train_encoder=False, seed=seed, device=self.device, stage="protect head fit")
            scores[f"head_train_accuracy/{name}"] = classifier_accuracy(nn.Identity(), head, features, y,
                                                                       device=self.device)
        for p in self.target_heads.parameters():
            p.requires_grad_(False)  # the paper's target head stays fixed during pruning
        return scores

    def refresh_pseudo_labels(self, source: Domain, targets: list[Domain], *, seed: int) -> None:
        """k-means pseudo-labels of the current encoder's features, for the Fisher terms that use them."""
        if self.kind != "ssl":
            return

        def cluster(domain: Domain) -> torch.Tensor:
            features = extract_features(self.method.encoder, to_float_tensor(domain.train_images), device=self.device)
            return kmeans_pseudo_labels(features, self.cfg.pseudo_clusters, seed=seed).cpu()

        if self.cfg.w_fisher_pseudo > 0:
            self.pseudo_labels = [cluster(domain) for domain in targets]
        if self.cfg.w_fisher_source > 0:
            self.source_pseudo_labels = cluster(source)

    def _ssl(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        head = self.method.projection_head
        criterion = getattr(self.method, "in_batch_criterion", None) or self.method.criterion
        return criterion(head(fa), head(fb))

    def __call__(self, source_batch, target_batch, target_index: int) -> tuple[torch.Tensor, dict[str, float]]:
        (sa, sb), s_idx = source_batch
        (ta, tb), t_idx = target_batch
        encoder = self.method.encoder
        dev = self.device
        sa, sb, ta, tb = sa.to(dev), sb.to(dev), ta.to(dev), tb.to(dev)
        c = self.cfg
        if self.kind in ("ssl", "none") and self.has_ssl_head:
            both = encoder(torch.cat([sa, sb]))
            fs_a, fs_b = both.chunk(2)
            source_ssl = self._ssl(fs_a, fs_b)
            if self.kind == "none":
                return source_ssl, {"source_ssl": source_ssl.item(), "total": source_ssl.item()}
            need_target_pair = c.w_target_ssl > 0
            ft_a = encoder(torch.cat([ta, tb])) if need_target_pair else encoder(ta)
            ft_a, ft_b = ft_a.chunk(2) if need_target_pair else (ft_a, None)
            target_ssl = self._ssl(ft_a, ft_b) if need_target_pair else None
            return representation_ntp_loss(
                source_ssl=source_ssl, target_ssl=target_ssl, source_features=fs_a, target_features=ft_a,
                pseudo_labels=self.pseudo_labels[target_index][t_idx].to(dev) if c.w_fisher_pseudo > 0 else None,
                target_labels=self.target_labels[target_index][t_idx].to(dev) if c.w_fisher_labels > 0 else None,
                w_source_ssl=c.w_source_ssl, w_target_ssl=c.w_target_ssl, target_ssl_clamp=c.target_ssl_clamp,
                w_mmd=c.w_mmd, mmd_clamp=c.mmd_clamp, w_fisher_pseudo=c.w_fisher_pseudo,
                w_fisher_labels=c.w_fisher_labels,
                source_pseudo_labels=self.source_pseudo_labels[s_idx].to(dev) if c.w_fisher_source > 0 else None,
                w_fisher_source=c.w_fisher_source, fisher_source_clamp=c.fisher_source_clamp)
        fs = encoder(sa)
        ys = self.source_labels[s_idx].to(dev)
        source_logits = self.source_head(fs)
        if self.kind == "none":  # a supervised checkpoint: its source task is classification
            ce = nn.functional.cross_entropy(source_logits, ys)
            return ce, {"ce_source": ce.item(), "total": ce.item()}
        ft = encoder(ta)
        yt = self.target_labels[target_index][t_idx].to(dev)
        target_logits = self.target_heads[target_index](ft)
        if self.kind == "supervised":
            return supervised_ntp_loss(source_logits, ys, target_logits, yt, ft, alpha=c.alpha, ce_clamp=c.ce_clamp,
                                       fisher_weight=c.fisher_weight)
        return ntl_loss(source_logits, ys, target_logits, yt, fs, ft, alpha=c.alpha, ce_clamp=c.ce_clamp,
                        mmd_clamp=c.ntl_mmd_clamp)


# ----------------------------------------------------------------------------- monitoring


def knn_scores(encoder: nn.Module, domains: list[Domain], *, device) -> dict[str, float]:
    """kNN top-1 (k=20) of each domain, its own train split as memory and its test split as queries."""
    return {domain.name: evaluate_knn(encoder, domain, domain, device=device, ks=(20,))["knn_top1_k20"]
            for domain in domains}


# ----------------------------------------------------------------------------- the stage


def _train_steps(objective: NonTransferableObjective, optimizer, source_iter, target_iters, steps: int, *,
                 penalty=None, start_step: int, desc: str, progress: bool, params: list[nn.Parameter]) -> dict:
    """``steps`` optimiser steps on L_NT (+ the ADMM penalty); returns the mean of each term."""
    sums: dict[str, float] = {}
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
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
        if isinstance(optimizer, MaskedOptimizer):  # pruned gradients must not count towards the clip norm
            mask_gradients_(optimizer.params, optimizer.masks)
        torch.nn.utils.clip_grad_norm_(params, 10.0)  # the negative terms can spike; keep steps bounded
        optimizer.step()
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return {key: value / max(1, steps) for key, value in sums.items()}


def protect_encoder(cfg: Any, method: nn.Module, source: Domain, targets: list[Domain], *, run_dir: Path,
                    device, writer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """ADMM + hard prune + masked retraining on ``method`` in place; returns (masks, metrics)."""
    seed = cfg.seed
    transform = build_train_transform("simclr", image_size=cfg.data.image_size, channels=cfg.data.channels)
    source_ds = _Indexed(ImageArrayDataset(source.train_images, source.train_labels, transform=transform))
    target_ds = [_Indexed(ImageArrayDataset(t.train_images, t.train_labels, transform=transform)) for t in targets]
    objective = NonTransferableObjective(cfg, method, source, targets, device=device)
    prunable = select_prunable(method.encoder, include_bias=cfg.prune.include_bias,
                               include_batchnorm=cfg.prune.include_batchnorm,
                               exclude_first_layer=cfg.prune.exclude_first_layer)
    soft_delta = cfg.prune.soft_delta
    if cfg.prune.projection == "soft" and soft_delta is None:
        # delta = the |w| quantile at the target sparsity, so the first soft threshold zeroes that share of weights
        magnitudes = torch.cat([p.detach().abs().flatten() for p in prunable.values()])
        soft_delta = float(torch.quantile(magnitudes.cpu().double(), cfg.prune.sparsity))
        log.info("prune.soft_delta not set: %.4g hits sparsity %.3f on the pretrained weights", soft_delta,
                 cfg.prune.sparsity)
    pruner = ADMMPruner(prunable, sparsity=cfg.prune.sparsity, projection=cfg.prune.projection, rho=cfg.admm.rho,
                        rho_growth=cfg.admm.rho_growth, rho_max=cfg.admm.rho_max, soft_delta=soft_delta,
                        coupled=find_conv_bn_pairs(method.encoder) if cfg.prune.projection == "channel" else None,
                        all_params=dict(method.encoder.named_parameters()))
    params = [p for p in method.encoder.parameters()] + (
        list(method.projection_head.parameters()) if hasattr(method, "projection_head") else [])
    state_path = run_dir / "protect_state.safetensors"
    start_iteration, phase, metrics = 0, "admm", {"iterations": []}

    def new_optimizer(lr_scale: float = 1.0):
        return build_optimizer(cfg.admm.optimizer, params + objective.trainable_heads(), lr=cfg.admm.lr * lr_scale,
                               weight_decay=cfg.admm.weight_decay)

    optimizer = new_optimizer()
    if cfg.resume and state_path.exists():
        state, _ = load_training_state(state_path)
        method.load_state_dict(state["method"])
        objective.source_head.load_state_dict(state["source_head"])
        objective.target_heads.load_state_dict(state["target_heads"])
        pruner.load_state_dict(state["pruner"])
        optimizer.load_state_dict(state["optimizer"])
        start_iteration, phase, metrics = int(state["iteration"]), state["phase"], state["metrics"]
        set_rng_state(state["rng"])
        log.info("resuming protection from %s at ADMM iteration %d (%s)", state_path, start_iteration, phase)
    else:
        metrics["heads"] = objective.fit_heads(source, targets, seed=seed)
        metrics["knn_before"] = knn_scores(method.encoder, [source, *targets], device=device)
        for name, acc in metrics["knn_before"].items():
            writer.add_scalar(f"protect/knn_top1/{name}", acc, 0)

    def save_state(iteration: int, phase_name: str) -> None:
        state = {"method": method.state_dict(), "source_head": objective.source_head.state_dict(),
                 "target_heads": objective.target_heads.state_dict(), "pruner": pruner.state_dict(),
                 "optimizer": optimizer.state_dict(), "iteration": iteration, "phase": phase_name,
                 "metrics": metrics, "rng": rng_state()}
        save_training_state(state_path, state, {"stage": "protect"})

    progress = cfg.trainer.progress
    iterations = cfg.admm.iterations
    bar = tqdm(range(start_iteration, iterations), desc="[2/3 protect] ADMM", initial=start_iteration,
               total=iterations, disable=not progress or phase != "admm", dynamic_ncols=True)
    for iteration in (bar if phase == "admm" else []):
        objective.refresh_pseudo_labels(source, targets, seed=seed + iteration)
        source_iter = _batches(source_ds, cfg.admm.batch_size, seed * 1000 + iteration, cfg.data.num_workers)
        target_iters = [_batches(ds, cfg.admm.batch_size, seed * 1000 + iteration + 17 * (i + 1), cfg.data.num_workers)
                        for i, ds in enumerate(target_ds)]
        terms = _train_steps(objective, optimizer, source_iter, target_iters, cfg.admm.steps_per_iteration,
                             penalty=pruner.penalty, start_step=iteration * cfg.admm.steps_per_iteration,
                             desc=f"W-step {iteration + 1}/{iterations}", progress=progress, params=params)
        residuals = pruner.update()
        knn = knn_scores(method.encoder, [source, *targets], device=device)
        step = iteration + 1
        for key, value in terms.items():
            writer.add_scalar(f"protect/loss/{key}", value, step)
        for key, value in residuals.items():
            writer.add_scalar(f"protect/admm/{key}", value, step)
        z_masks = pruner.masks()
        kept = sum(int(m.sum()) for m in z_masks.values())
        total = sum(m.numel() for m in z_masks.values())
        writer.add_scalar("protect/z_sparsity", 1 - kept / total, step)
        for name, acc in knn.items():
            writer.add_scalar(f"protect/knn_top1/{name}", acc, step)
        metrics["iterations"].append({"iteration": step, **terms, "rho": residuals.get("rho"),
                                      "primal_total": residuals.get("primal_total"),
                                      "dual_total": residuals.get("dual_total"), "knn": knn})
        bar.set_postfix({"src": f"{knn[source.name]:.2f}",
                         "tgt": f"{np.mean([knn[t.name] for t in targets]):.2f}",
                         "primal": f"{residuals.get('primal_total', 0):.3g}"})
        log.info("ADMM %d/%d: %s; kNN %s", step, iterations, ", ".join(f"{k}={v:.4g}" for k, v in terms.items()),
                 ", ".join(f"{k}={v:.3f}" for k, v in knn.items()))
        save_state(step, "admm")

    if phase == "admm":
        masks = pruner.hard_prune()
        optimizer = new_optimizer()
        phase = "retrain"
    else:
        masks = pruner.masks()
    named = dict(method.encoder.named_parameters())
    masked_opt = MaskedOptimizer(optimizer, {k: named[k] for k in masks}, masks)
    if cfg.admm.retrain_steps > 0 and phase == "retrain":
        log.info("[2/3 protect] masked retraining for %d steps", cfg.admm.retrain_steps)
        source_iter = _batches(source_ds, cfg.admm.batch_size, seed * 1000 + 999, cfg.data.num_workers)
        target_iters = [_batches(ds, cfg.admm.batch_size, seed * 1000 + 999 + 17 * (i + 1), cfg.data.num_workers)
                        for i, ds in enumerate(target_ds)]
        objective.refresh_pseudo_labels(source, targets, seed=seed + iterations)
        terms = _train_steps(objective, masked_opt, source_iter, target_iters, cfg.admm.retrain_steps,
                             start_step=0, desc="masked retraining", progress=progress, params=params)
        metrics["retrain"] = terms
    metrics["knn_after"] = knn_scores(method.encoder, [source, *targets], device=device)
    for name, acc in metrics["knn_after"].items():
        writer.add_scalar(f"protect/knn_top1/{name}", acc, iterations + 1)
    save_state(iterations, "done")
    return masks, metrics


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def write_sparsity_files(run_dir: Path, report: dict, *, writer, encoder: nn.Module,
                         masks: dict[str, torch.Tensor]) -> None:
    """sparsity.json, sparsity.txt, the printed table, and TensorBoard text and kept-weight histograms."""
    table = format_sparsity_table(report)
    atomic_write_json(run_dir / "sparsity.json", report)
    atomic_write_text(run_dir / "sparsity.txt", table + "\n")
    print(table)
    writer.add_text("sparsity", f"```\n{table}\n```", 0)
    for name, param in encoder.named_parameters():
        if name in masks:
            writer.add_histogram(f"weights/{name}", param.detach().cpu()[masks[name].cpu()], 0)
    writer.flush()


def run_protect(cfg: Any, run_dir: Path) -> dict[str, Any]:
    validate_protect(cfg)
    run_dir = Path(run_dir)
    claim_run_dir(run_dir, cfg)
    configure_threads(cfg.trainer.threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    cache_dir = Path(cfg.paths.cache_dir or default_cache_dir()).expanduser()
    started = time.perf_counter()

    checkpoint = Path(cfg.checkpoint).expanduser() if cfg.checkpoint else default_encoder(cfg, cache_dir)
    method, meta, old_masks = load_method(checkpoint, device)
    check_compatible(int(meta["image_size"]), int(meta["channels"]), cfg, f"checkpoint {str(checkpoint)!r}")
    if old_masks:
        raise ConfigError(f"checkpoint {str(checkpoint)!r} is already protected; protect an unprotected encoder")
    unprotected = copy.deepcopy(method.encoder).cpu()
    source = load_domains_for(cfg, [cfg.data.source])[0]
    targets = load_domains_for(cfg, list(cfg.data.targets))

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tb"))
    protected_path = run_dir / "protected.safetensors"
    if protected_path.exists() and protected_path.with_suffix(".json").exists():
        log.info("[2/3 protect] already done: %s", protected_path)
        protected_method, protected_meta, masks = load_method(protected_path, device)
        protected_encoder = protected_method.encoder
        report = protected_meta.get("sparsity", {})
        if not (run_dir / "sparsity.json").exists():  # killed between the export and the report files
            write_sparsity_files(run_dir, report, writer=writer, encoder=protected_encoder, masks=masks)
    else:
        log.info("[2/3 protect] %s loss, %s projection to sparsity %.3f, against %s", cfg.loss.kind,
                 cfg.prune.projection, cfg.prune.sparsity, ", ".join(t.name for t in targets))
        masks, metrics = protect_encoder(cfg, method, source, targets, run_dir=run_dir, device=device, writer=writer)
        named = dict(method.encoder.named_parameters())
        with torch.no_grad():  # bake W * M: the file holds exactly the mask's nonzeros
            for name, mask in masks.items():
                named[name].mul_(mask.to(named[name].dtype))
        tensors = export_state(method)
        for name, mask in masks.items():
            tensors[f"{MASK_PREFIX}{name}"] = mask.to(torch.uint8).cpu()
        dense_bytes = sum(p.numel() * p.element_size() for p in method.encoder.parameters())
        protected_encoder = method.encoder
        report = sparsity_report(protected_encoder, masks, dense_bytes=dense_bytes,
                                 saved_bytes=len(safetensors_bytes(tensors)))
        protected_meta = {
            **{k: v for k, v in meta.items() if k not in ("sha256", "history")},
            "kind": "protected_encoder",
            "name": "protected",
            "protected_from": {"path": str(checkpoint), "sha256": meta.get("sha256")},
            "protection": OmegaConf.to_container(OmegaConf.create({"prune": cfg.prune, "admm": cfg.admm,
                                                                    "loss": cfg.loss}), resolve=True),
            "source": cfg.data.source, "targets": list(cfg.data.targets), "seed": cfg.seed,
            "metrics": metrics,
            "sparsity": report,
        }
        save_checkpoint(protected_path, tensors, protected_meta)
        # Reload and verify what was written: exactly the mask's nonzeros, nothing dense besides.
        saved, _ = load_checkpoint(protected_path)
        for name, mask in masks.items():
            nonzeros = int((saved[f"encoder.{name}"] != 0).sum())
            if nonzeros > int(mask.sum()):
                raise RuntimeError(f"export bug: {name} has {nonzeros} nonzeros but its mask keeps {int(mask.sum())}")
        write_sparsity_files(run_dir, report, writer=writer, encoder=protected_encoder, masks=masks)
        log.info("[2/3 protect] wrote %s", protected_path)

    result: dict[str, Any] = {"checkpoint": str(protected_path), "sparsity": report.get("prunable"),
                              "unprotected_checkpoint": str(checkpoint)}
    if cfg.evaluate:
        if cfg.eval_targets is not None and list(cfg.eval_targets) != list(cfg.data.targets):
            targets = load_domains_for(cfg, list(cfg.eval_targets))
        log.info("[3/3 evaluate] SLC sweep of protected and unprotected encoders on %s",
                 ", ".join(t.name for t in targets))
        models = [ModelUnderTest("protected", protected_encoder.cpu(), meta["backbone"], masks=masks),
                  ModelUnderTest("unprotected", unprotected, meta["backbone"])]
        result.update(evaluate_models(models, source, targets, SweepSettings.from_config(cfg.sweep), run_dir=run_dir,
                                      cache_dir=cache_dir, device=device, progress=cfg.trainer.progress,
                                      spec=domain_spec(cfg), writer=writer))
    writer.close()
    minutes = (time.perf_counter() - started) / 60
    log.info("protect finished in %.1f min; outputs in %s", minutes, run_dir)
    return result
