"""The protect stage: an encoder checkpoint in, ``protected.safetensors`` out.

It loads the encoder with its heads, runs the protection loop (:mod:`ntp_ssl.protect.loop`)
and exports the result (:mod:`ntp_ssl.protect.export`). A run directory that already holds
a finished export is read back instead of protecting again. Choosing the encoder (the
default one, pretrained and cached) and evaluating the result are the pipeline's work
(:mod:`ntp_ssl.pipeline`), not this stage's.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ntp_ssl.checks import domain_key
from ntp_ssl.data import Domain, load_domains_for
from ntp_ssl.errors import ConfigError
from ntp_ssl.pretrain.methods import load_method
from ntp_ssl.protect.export import export_protected, write_admm_diagnostics, write_sparsity_files
from ntp_ssl.protect.loop import protect_encoder
from ntp_ssl.shared.checkpoint import check_compatible, verified_or_set_aside
from ntp_ssl.shared.stage import StageContext

log = logging.getLogger("ntp_ssl.protect")


@dataclass
class Protected:
    """What the protect stage hands on: the file, the protected and the unprotected encoder, the
    mask, and the domains it loaded (source, targets)."""

    path: Path
    encoder: nn.Module
    unprotected: nn.Module
    masks: dict[str, torch.Tensor]
    meta: dict
    report: dict
    source: Domain
    targets: list[Domain]


def run_protect(cfg: Any, checkpoint: Path, ctx: StageContext) -> Protected:
    """Protect the encoder of ``checkpoint`` as ``cfg`` says, in ``ctx.run_dir`` (resumable)."""
    method, meta, old_masks = load_method(checkpoint, ctx.device)
    check_compatible(meta, cfg.data.image_size, cfg.data.channels, f"checkpoint {str(checkpoint)!r}")
    if old_masks:
        raise ConfigError(f"checkpoint {str(checkpoint)!r} is already protected; protect an unprotected encoder")
    pretrained_on = meta.get("source")
    if pretrained_on and domain_key(pretrained_on) != domain_key(cfg.data.source):
        # Legitimate (the licensed domain need not be the pretraining one), but easy to do by mistake.
        log.warning("the encoder was pretrained on %r; it is protected for data.source=%r, which the source-side "
                    "numbers measure", pretrained_on, cfg.data.source)
    unprotected = copy.deepcopy(method.encoder).cpu()
    source = load_domains_for(cfg, [cfg.data.source])[0]
    targets = load_domains_for(cfg, list(cfg.data.targets))
    path = ctx.run_dir / "protected.safetensors"
    if path.exists() and path.with_suffix(".json").exists() and verified_or_set_aside(path) is not None:
        log.info("[2/3 protect] already done: %s", path)
        protected_method, protected_meta, masks = load_method(path, ctx.device)
        encoder, report = protected_method.encoder, protected_meta.get("sparsity", {})
        if not (ctx.run_dir / "sparsity.json").exists():  # killed between the export and the report files
            write_sparsity_files(ctx.run_dir, report, writer=ctx.writer, encoder=encoder, masks=masks)
            write_admm_diagnostics(ctx.run_dir, protected_meta.get("metrics", {}))
    else:
        log.info("[2/3 protect] loss=%s, %s projection to sparsity %.3f, against %s", cfg.loss.kind,
                 cfg.prune.projection, cfg.prune.sparsity, ", ".join(t.name for t in targets))
        masks, metrics = protect_encoder(cfg, method, source, targets, run_dir=ctx.run_dir, device=ctx.device,
                                         writer=ctx.writer, method_config=meta.get("method_config"))
        report = export_protected(path, method, masks, cfg=cfg, checkpoint=checkpoint, meta=meta, metrics=metrics)
        encoder = method.encoder
        write_sparsity_files(ctx.run_dir, report, writer=ctx.writer, encoder=encoder, masks=masks)
        write_admm_diagnostics(ctx.run_dir, metrics)
        log.info("[2/3 protect] wrote %s", path)
    return Protected(path=path, encoder=encoder, unprotected=unprotected, masks=masks, meta=meta, report=report,
                     source=source, targets=targets)
