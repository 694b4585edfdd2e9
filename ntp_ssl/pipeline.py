"""The main job, ``ntp-ssl protect``: the conductor above the stages.

Three stages, run as siblings, each from the same config:

1. *encoder*: the checkpoint given, or the default encoder: ``ntp-ssl pretrain`` on
   ``data.source`` with the recipe in ``cfg.pretrain`` (run once, then found in
   ``<cache>/encoders/...``);
2. *protect*: :func:`ntp_ssl.protect.stage.run_protect` (ADMM, hard prune, masked
   retraining, export of ``protected.safetensors``);
3. *evaluate*: :func:`ntp_ssl.evaluate.stage.evaluate_models`, the SLC sweep of the
   protected and the unprotected encoder against training from scratch.

Protection seeds every RNG when it starts, so it computes the same numbers whether the
default encoder was pretrained in this run or found in the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ntp_ssl.config import PretrainConfig, input_checkpoints, to_plain, validate_protect
from ntp_ssl.data import domain_spec, load_domains_for
from ntp_ssl.evaluate.stage import evaluate_models
from ntp_ssl.evaluate.sweep import SPARSE_SCRATCH_INIT_OFFSET, ModelUnderTest, sparse_scratch_model
from ntp_ssl.pretrain.methods import VIEW_OPTIONS
from ntp_ssl.pretrain.stage import run_pretrain
from ntp_ssl.protect.stage import Protected, run_protect
from ntp_ssl.shared.runs import fingerprint, lock_run_dir, release_run_dir, without_legacy_values
from ntp_ssl.shared.stage import StageContext, input_digests, start_stage
from ntp_ssl.shared.train import seed_everything

log = logging.getLogger("ntp_ssl.pipeline")


def default_encoder_config(cfg: Any) -> Any:
    """The pretrain config of the default encoder: ``cfg.pretrain``'s recipe on the run's data,
    paths and trainer settings."""
    node = OmegaConf.structured(PretrainConfig)
    # The encoder being protected is the same whichever split is measured: it is pretrained on
    # the whole source train split (data.split=validation holds out images from protection and
    # attacks, not from the owner's pretraining)
    data = {**to_plain(cfg.data), "split": None}
    return OmegaConf.merge(node, {**to_plain(cfg.pretrain), "data": data, "paths": to_plain(cfg.paths),
                                  "trainer": to_plain(cfg.trainer)})


def default_encoder_key(pretrain_cfg: Any) -> str:
    """The default encoder's cache key: a digest of its pretraining config. Options added after
    caches existed are left out while null, so those caches keep their key."""
    tree = fingerprint(pretrain_cfg)
    del tree["data"]["split"]  # always null here
    for key in VIEW_OPTIONS:  # the view options came after those caches; null: the built-in views
        if key in tree["method"] and tree["method"][key] is None:
            del tree["method"][key]
    without_legacy_values(tree)  # trainer.channels_last=false: the NCHW encoder cached before it
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]


def default_encoder(cfg: Any, cache_dir: Path) -> Path:
    """Pretrain the default encoder for this source once; later runs reuse it from the cache."""
    pretrain_cfg = default_encoder_config(cfg)
    run_dir = cache_dir / "encoders" / f"{pretrain_cfg.run_name}-{default_encoder_key(pretrain_cfg)}"
    log.info("[1/3 encoder] no checkpoint given: using the default %s encoder from %s", pretrain_cfg.method.name,
             run_dir)
    lock_run_dir(run_dir, wait=True)  # a concurrent main job pretraining the same encoder: wait for it
    return Path(run_pretrain(pretrain_cfg, run_dir)["checkpoint"])


def evaluate_protected(cfg: Any, protected: Protected, ctx: StageContext) -> dict[str, Any]:
    """The SLC sweep of the protected and the unprotected encoder (and the sparse-scratch control)
    on the evaluation targets and the source."""
    targets = protected.targets
    if cfg.eval_targets is not None and list(cfg.eval_targets) != list(cfg.data.targets):
        targets = load_domains_for(cfg, list(cfg.eval_targets))
    log.info("[3/3 evaluate] SLC sweep of protected and unprotected encoders on %s",
             ", ".join(t.name for t in targets))
    backbone = protected.meta["backbone"]
    models = [ModelUnderTest("protected", protected.encoder.cpu(), backbone, masks=protected.masks),
              ModelUnderTest("unprotected", protected.unprotected, backbone)]
    if cfg.sparse_scratch:
        models.append(sparse_scratch_model(models[0], in_channels=cfg.data.channels, image_size=cfg.data.image_size,
                                           seed=SPARSE_SCRATCH_INIT_OFFSET + cfg.seed))
    return evaluate_models(models, protected.source, targets, cfg.sweep, run_dir=ctx.run_dir,
                           cache_dir=ctx.cache_dir, device=ctx.device, progress=cfg.trainer.progress,
                           spec=domain_spec(cfg.data), writer=ctx.writer)


def run_main_job(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """``ntp-ssl protect``: encoder -> protect -> evaluate, all in ``run_dir``."""
    validate_protect(cfg)
    started = time.perf_counter()
    domains = [cfg.data.source, *cfg.data.targets, *(cfg.eval_targets or [])]
    ctx = start_stage(cfg, run_dir, inputs=input_digests(input_checkpoints("protect", cfg), domains))
    checkpoint = Path(cfg.checkpoint).expanduser() if cfg.checkpoint else default_encoder(cfg, ctx.cache_dir)
    seed_everything(cfg.seed)  # protection starts from its own seed, wherever the encoder came from
    protected = run_protect(cfg, checkpoint, ctx)
    result: dict[str, Any] = {"checkpoint": str(protected.path), "sparsity": protected.report.get("prunable"),
                              "unprotected_checkpoint": str(checkpoint)}
    if cfg.evaluate:
        result.update(evaluate_protected(cfg, protected, ctx))
    ctx.close()
    release_run_dir(ctx.run_dir)
    log.info("protect finished in %.1f min; outputs in %s", (time.perf_counter() - started) / 60, ctx.run_dir)
    return result
