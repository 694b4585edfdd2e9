"""``ntp-ssl pretrain``: train an encoder with SimCLR, MoCo v2 or supervised learning.

``train_one_epoch``, the kNN monitoring (:func:`ntp_ssl.shared.knn.domain_knn`) and
``run_pretrain`` are kept apart, as in the torchvision references. The run directory holds
``last.safetensors`` (the resumable state, rewritten every ``trainer.checkpoint_every``
epochs) and, at the end, ``encoder.safetensors`` with its ``encoder.json``. Distributed data parallel runs under
torchrun (``torchrun --nproc_per_node N -m ntp_ssl.cli pretrain ...``): gloo on CPU, nccl
on CUDA, contrastive negatives gathered across processes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ntp_ssl.checks import domain_key
from ntp_ssl.config import to_plain, validate_pretrain
from ntp_ssl.data import Domain, ImageArrayDataset, load_domains_for, to_float_tensor
from ntp_ssl.encoders import build_encoder
from ntp_ssl.errors import CheckpointError, ConfigError
from ntp_ssl.pretrain.methods import MoCoV2, build_train_transform, export_state, method_from_config, view_options
from ntp_ssl.shared.checkpoint import (
    load_training_state,
    resuming,
    save_checkpoint,
    save_training_state,
    verified_or_set_aside,
)
from ntp_ssl.shared.features import extract_features
from ntp_ssl.shared.knn import domain_knn
from ntp_ssl.shared.progress import progress_bar
from ntp_ssl.shared.runs import first_difference, release_run_dir
from ntp_ssl.shared.stage import StageContext, input_digests, start_stage
from ntp_ssl.shared.train import (
    autocast_context,
    build_optimizer,
    check_finite,
    classifier_accuracy,
    precision_warning,
    rng_state,
    seed_everything,
    seeded_loader,
    set_rng_state,
    warmup_cosine,
    world_info,
)

log = logging.getLogger("ntp_ssl.pretrain")

# Under DDP, process r's loader seed is process 0's plus r * RANK_SEED_STRIDE (apart from any
# (seed, epoch) pair's), and a process resumed without its own saved stream reseeds at
# seed + rank + RESUME_RESEED_OFFSET * epoch
RANK_SEED_STRIDE = 1_000_000_007
RESUME_RESEED_OFFSET = 7_919


def build_model(cfg: Any, num_classes: int) -> nn.Module:
    encoder = build_encoder(cfg.encoder.backbone, in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    return method_from_config(cfg.method.name, encoder, num_classes=num_classes, options=cfg.method,
                              gather_distributed=world_info()[2] > 1)


class _LossModule(nn.Module):
    """DDP synchronises gradients through ``forward``; this forward is the method's loss."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, views, labels):
        return self.method.training_loss(views, labels)


def _resume_path(cfg: Any, last_path: Path) -> Path | None:
    """The training state to continue from: ``resume_from`` if given, else this run's own last checkpoint."""
    if cfg.resume_from:
        path = Path(cfg.resume_from).expanduser()
        path = path / "last.safetensors" if path.is_dir() else path
        if not path.exists():
            raise CheckpointError(f"resume_from={cfg.resume_from!r} does not exist; give a last.safetensors "
                                  "or the run directory that holds one")
        return path
    return last_path if cfg.resume and last_path.exists() else None


def _nonpersistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers missing from state_dict, such as lightly's MoCo memory bank, which a resume must restore too."""
    persistent = module.state_dict().keys()
    return {name: buf for name, buf in module.named_buffers() if name not in persistent}


def train_one_epoch(loss_module: nn.Module, method: nn.Module, loader: DataLoader, optimizer, scheduler, *,
                    epoch: int, global_step: int, total_steps: int, device, precision: str, scaler,
                    writer, progress: bool) -> tuple[int, float, float]:
    """One pass over the loader; returns (global_step, mean loss, images per second)."""
    method.train()
    losses: list[float] = []
    images = 0
    start = time.perf_counter()
    bar = progress_bar(loader, desc=f"pretrain epoch {epoch + 1}", leave=False, enabled=progress)
    for views, labels in bar:
        views = [v.to(device, non_blocking=True) for v in views] if isinstance(views, (list, tuple)) else [views.to(device)]
        labels = labels.to(device, non_blocking=True)
        if isinstance(method, MoCoV2):
            method.set_progress(global_step, total_steps)
        with autocast_context(device, precision):
            loss = loss_module(views, labels)
        check_finite(loss, stage="pretrain", step=global_step, term=f"{type(method).__name__} loss")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        global_step += 1
        images += labels.shape[0] * len(views)
        losses.append(loss.item())
        if writer is not None:
            writer.add_scalar("pretrain/loss", losses[-1], global_step)
            writer.add_scalar("pretrain/lr", optimizer.param_groups[0]["lr"], global_step)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    elapsed = time.perf_counter() - start
    return global_step, float(np.mean(losses)), images / max(elapsed, 1e-9)


def _log_augmentations(writer, dataset: ImageArrayDataset, count: int = 16) -> None:
    views = [dataset[i][0] for i in range(min(count, len(dataset)))]
    for v_index in range(len(views[0]) if isinstance(views[0], (list, tuple)) else 1):
        batch = torch.stack([v[v_index] if isinstance(v, (list, tuple)) else v for v in views])
        writer.add_images(f"augmentations/view{v_index}", (batch * 0.5 + 0.5).clamp(0, 1), 0)


def _log_projector(writer, encoder: nn.Module, domains: list[Domain], *, samples: int, device, step: int) -> None:
    feats, labels, images = [], [], []
    for domain in domains:
        idx = np.random.default_rng(0).permutation(len(domain.test_labels))[:samples]
        x = to_float_tensor(domain.test_images[idx])
        feats.append(extract_features(encoder, x, device=device))
        labels += [[domain.name, str(int(y))] for y in domain.test_labels[idx]]
        images.append((x * 0.5 + 0.5).clamp(0, 1))
    writer.add_embedding(torch.cat(feats), metadata=labels, metadata_header=["domain", "label"],
                         label_img=torch.cat(images), global_step=step, tag="test_features")


@dataclass
class PretrainRun:
    """What one pretraining run holds while it runs."""

    cfg: Any
    ctx: StageContext
    rank: int
    world: int
    source: Domain
    train_names: list[str]
    method: nn.Module
    dataset: ImageArrayDataset
    sampler: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    steps_per_epoch: int
    on_event: Callable[[str], None]
    epoch: int = 0
    global_step: int = 0
    history: list = field(default_factory=list)


def _init_distributed(device: torch.device, local_rank: int, world: int) -> torch.device:
    if world == 1:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _build_run(cfg: Any, ctx: StageContext, on_event) -> PretrainRun:
    """Data, model, optimiser and schedule, as the config says (``ctx.device`` already chosen)."""
    rank, _, world = world_info()
    train_names = list(cfg.domains) if cfg.domains else [cfg.data.source]
    train_domains = load_domains_for(cfg, train_names)
    source = train_domains[0] if domain_key(train_names[0]) == domain_key(cfg.data.source) else load_domains_for(cfg, [cfg.data.source])[0]
    images = np.concatenate([d.train_images for d in train_domains])
    labels = np.concatenate([d.train_labels for d in train_domains])
    if cfg.optim.batch_size // world < 2 or cfg.optim.batch_size > len(labels):
        raise ConfigError(
            f"optim.batch_size={cfg.optim.batch_size} does not fit the {len(labels)} training images of "
            f"{'+'.join(train_names)} over {world} process(es); use 2*processes <= batch_size <= {len(labels)}"
        )
    if cfg.optim.batch_size % world:
        # each process takes batch_size // world images a step: a remainder would shrink the
        # global batch and lengthen the epoch past the schedule's total_steps
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} does not split evenly over {world} processes; "
                          f"use a multiple of {world}")
    method = build_model(cfg, source.num_classes).to(ctx.device)
    transform = build_train_transform(cfg.method.name, image_size=cfg.data.image_size, channels=cfg.data.channels,
                                      **view_options(cfg.method))
    dataset = ImageArrayDataset(images, labels, transform=transform)
    sampler = None
    if world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=True, seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(dataset) // cfg.optim.batch_size
    total_steps = steps_per_epoch * cfg.optim.epochs
    trainable = [p for p in method.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optim.name, trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                momentum=cfg.optim.momentum)
    warmup = cfg.optim.warmup_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup))
    scaler = (torch.amp.GradScaler("cuda") if ctx.device.type == "cuda" and cfg.trainer.precision == "16-mixed"
              else None)
    return PretrainRun(cfg=cfg, ctx=ctx, rank=rank, world=world, source=source, train_names=train_names,
                       method=method, dataset=dataset, sampler=sampler, optimizer=optimizer, scheduler=scheduler,
                       scaler=scaler, steps_per_epoch=steps_per_epoch, on_event=on_event)


def _resume(run: PretrainRun, resume_path: Path) -> None:
    cfg = run.cfg
    try:
        state, state_meta = load_training_state(resume_path)
    except CheckpointError as exc:
        raise CheckpointError(f"cannot resume from {resume_path}: {exc}; remove it to start over") from None
    built = (state_meta.get("backbone"), state_meta.get("method"))
    if built != (cfg.encoder.backbone, cfg.method.name):
        raise CheckpointError(
            f"cannot resume from {resume_path}: it holds a {built[0]}/{built[1]} run, not "
            f"{cfg.encoder.backbone}/{cfg.method.name}; set encoder.backbone and method.name to match")
    with resuming(f"from {resume_path}"):
        _check_same_optimiser(run, state, state_meta, resume_path)
        run.method.load_state_dict(state["model"])
        for name, buf in _nonpersistent_buffers(run.method).items():
            buf.copy_(state["extra_buffers"][name])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        epoch, global_step, history = int(state["epoch"]), int(state["global_step"]), list(state["history"])
        if not (0 <= epoch <= cfg.optim.epochs and 0 <= global_step):
            raise ValueError(f"epoch {epoch} of {cfg.optim.epochs}, step {global_step}")
        if run.scaler is not None and "scaler" in state:  # the loss scale the saved run had reached
            run.scaler.load_state_dict(state["scaler"])
        _restore_rng(run, state, epoch)
    run.epoch, run.global_step, run.history = epoch, global_step, history
    log.info("resuming from %s at epoch %d (step %d)", resume_path, run.epoch, run.global_step)


def _restore_rng(run: PretrainRun, state: dict, epoch: int) -> None:
    """Each process continues its own random stream (its augmentations): under DDP the state
    holds one per process (``rng_of_ranks``). A state saved by another number of processes, or
    before they were recorded, holds process 0's alone: the others then draw from a stream of
    their own seeded from (seed, rank, epoch), not process 0's (which would repeat its draws)."""
    streams = state.get("rng_of_ranks")
    if run.world == 1 or run.rank == 0:
        set_rng_state(state["rng"])
    elif streams is not None and len(streams) == run.world:
        set_rng_state(streams[run.rank])
    else:
        log.warning("process %d: the resume state holds no random stream of its own (%s); its augmentations go on "
                    "from a fresh seed, so this run will not end where an uninterrupted one would", run.rank,
                    "saved before they were recorded" if streams is None else f"saved by {len(streams)} processes")
        seed_everything(run.cfg.seed + run.rank + RESUME_RESEED_OFFSET * (epoch + 1))


def _rng_of_ranks(world: int) -> list[dict] | None:
    """Every process's RNG state, gathered (a collective: all processes call it together)."""
    if world == 1:
        return None
    import torch.distributed as dist

    streams: list = [None] * world
    dist.all_gather_object(streams, rng_state())
    return streams


def _check_same_optimiser(run: PretrainRun, state: dict, state_meta: dict, resume_path: Path) -> None:
    """A resume continues the run that was saved: loading another optimiser's state would keep
    the old learning rate while run_config.json records the new one (or crash on a missing
    moment), so different settings are refused."""
    saved = state_meta.get("optim")  # states saved before it was recorded: the optimiser's own keys only
    diff = first_difference(saved, to_plain(run.cfg.optim), "optim.") if saved is not None else None
    groups, current = state["optimizer"]["param_groups"], run.optimizer.state_dict()["param_groups"]
    if diff is None and (len(groups) != len(current) or any(set(a) != set(b) for a, b in zip(groups, current))):
        diff = "another optimiser"
    if diff:
        raise CheckpointError(f"cannot resume from {resume_path}: it was trained with other optimiser settings "
                              f"({diff}); resume with the same optim.* or start a new run")


def _run_epoch(run: PretrainRun, loss_module: nn.Module, epoch: int) -> dict[str, float]:
    """One epoch, then (on rank 0) kNN every ``trainer.eval_every`` epochs and the resumable checkpoint."""
    cfg, writer = run.cfg, run.ctx.writer if run.rank == 0 else None
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    # the loader's generator seeds its workers' augmentations: the rank is folded in so that
    # processes do not draw the same crops (process 0's seed is the single-process one)
    loader = seeded_loader(run.dataset, cfg.optim.batch_size // run.world,
                           seed=cfg.seed * 100_003 + epoch + run.rank * RANK_SEED_STRIDE,
                           workers=cfg.data.num_workers, sampler=run.sampler,
                           pin_memory=run.ctx.device.type == "cuda")
    run.on_event("epoch_start")
    run.global_step, mean_loss, throughput = train_one_epoch(
        loss_module, run.method, loader, run.optimizer, run.scheduler, epoch=epoch, global_step=run.global_step,
        total_steps=run.steps_per_epoch * cfg.optim.epochs, device=run.ctx.device, precision=cfg.trainer.precision,
        scaler=run.scaler, writer=writer, progress=cfg.trainer.progress and run.rank == 0)
    record = {"epoch": epoch + 1, "loss": mean_loss, "images_per_s": throughput * run.world}
    last_epoch = epoch + 1 == cfg.optim.epochs
    if run.rank == 0 and ((epoch + 1) % cfg.trainer.eval_every == 0 or last_epoch):
        run.on_event("knn_start")
        knn = domain_knn(run.method.encoder, run.source, run.source, device=run.ctx.device)
        run.on_event("knn_end")
        record.update(knn)
        for key, value in knn.items():
            writer.add_scalar(f"pretrain/{key}", value, run.global_step)
    if writer is not None:
        writer.add_scalar("pretrain/epoch_loss", mean_loss, run.global_step)
        writer.add_scalar("pretrain/images_per_s", record["images_per_s"], run.global_step)
    run.history.append(record)
    log.info("epoch %d/%d: %s", epoch + 1, cfg.optim.epochs,
             ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
    saving = (epoch + 1) % cfg.trainer.checkpoint_every == 0 or last_epoch
    streams = _rng_of_ranks(run.world) if saving else None  # every process, before process 0 saves
    if run.rank == 0 and saving:
        state = {"model": run.method.state_dict(), "extra_buffers": _nonpersistent_buffers(run.method),
                 "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "rng": rng_state(), "epoch": epoch + 1, "global_step": run.global_step, "history": run.history}
        if streams is not None:
            state["rng_of_ranks"] = streams
        if run.scaler is not None:
            state["scaler"] = run.scaler.state_dict()
        save_training_state(run.ctx.run_dir / "last.safetensors", state,
                            {"stage": "pretrain", "backbone": cfg.encoder.backbone, "method": cfg.method.name,
                             "optim": to_plain(cfg.optim)})
        run.on_event("checkpoint_end")
    return record


def _finish(run: PretrainRun) -> dict[str, Any]:
    """Final metrics (source kNN, other domains' kNN, supervised accuracy), the projector, the encoder file."""
    cfg, method, device, writer = run.cfg, run.method, run.ctx.device, run.ctx.writer
    metrics: dict[str, float] = {}
    if run.history and "knn_top1_k20" in run.history[-1]:
        metrics.update({k: run.history[-1][k] for k in run.history[-1] if k.startswith("knn")})
    if cfg.method.name == "supervised":
        metrics["source_test_accuracy"] = classifier_accuracy(
            method.encoder, method.classifier, to_float_tensor(run.source.test_images),
            torch.tensor(run.source.test_labels), device=device)
    other_names = [name for name in cfg.data.targets if domain_key(name) != domain_key(cfg.data.source)]
    others = load_domains_for(cfg, other_names) if other_names else []
    for domain in others:
        knn = domain_knn(method.encoder, domain, domain, device=device)
        metrics.update({f"{domain.name}/{k}": v for k, v in knn.items()})
        for key, value in knn.items():
            writer.add_scalar(f"pretrain_targets/{domain.name}/{key}", value, run.global_step)
    if cfg.trainer.projector:
        _log_projector(writer, method.encoder, [run.source, *others], samples=cfg.trainer.projector_samples,
                       device=device, step=run.global_step)
    run.ctx.close()
    final_path = run.ctx.run_dir / "encoder.safetensors"
    save_checkpoint(final_path, export_state(method), checkpoint_meta(cfg, run.train_names, run.source, metrics,
                                                                       run.history))
    log.info("pretrain done: %s -> %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), final_path)
    release_run_dir(run.ctx.run_dir)
    return {"checkpoint": str(final_path), "metrics": metrics}


def run_pretrain(cfg: Any, run_dir: Path, *, on_event: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Pretrain (or resume, or return the finished result) in ``run_dir``.

    ``on_event`` (for benchmarks) is called with "epoch_start", "knn_start", "knn_end" and
    "checkpoint_end" as they happen."""
    validate_pretrain(cfg)
    rank, local_rank, world = world_info()
    domains = [cfg.data.source, *cfg.data.targets, *(cfg.domains or [])]
    ctx = start_stage(cfg, run_dir, rank=rank, inputs=input_digests([], domains) if rank == 0 else None)
    final_path = ctx.run_dir / "encoder.safetensors"
    finished = final_path.exists() and final_path.with_suffix(".json").exists()
    meta = verified_or_set_aside(final_path, set_aside=rank == 0) if finished else None
    if meta is not None:
        log.info("pretrain already finished in %s; nothing to do", ctx.run_dir)
        release_run_dir(ctx.run_dir)
        return {"checkpoint": str(final_path), "metrics": meta.get("metrics", {})}
    ctx.device = _init_distributed(ctx.device, local_rank, world)
    run = _build_run(cfg, ctx, on_event or (lambda event: None))
    resume_path = _resume_path(cfg, ctx.run_dir / "last.safetensors")
    if resume_path is not None:
        _resume(run, resume_path)
    loss_module: nn.Module = _LossModule(run.method)
    if world > 1:
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if rank == 0:
        ctx.purge_step = run.global_step or None
        if run.epoch == 0:
            _log_augmentations(ctx.writer, run.dataset)
            ctx.writer.add_text("config", f"```\n{_yaml(cfg)}\n```", 0)
    log.info("pretrain %s/%s on %s: %d images, %d epochs x %d steps, device %s, %d process(es)", cfg.method.name,
             cfg.encoder.backbone, "+".join(run.train_names), len(run.dataset), cfg.optim.epochs,
             run.steps_per_epoch, ctx.device, world)
    warning = precision_warning(cfg.trainer.precision, ctx.device)
    if warning and rank == 0:
        log.warning("trainer.%s", warning)
    epochs_bar = progress_bar(range(run.epoch, cfg.optim.epochs), desc="pretrain", initial=run.epoch,
                              total=cfg.optim.epochs, enabled=cfg.trainer.progress and rank == 0)
    for epoch in epochs_bar:
        record = _run_epoch(run, loss_module, epoch)
        epochs_bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k.startswith(("loss", "knn_top1_k20"))})
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank != 0:
        return {"checkpoint": str(final_path), "metrics": {}}
    return _finish(run)


def checkpoint_meta(cfg: Any, train_names: list[str], source: Domain, metrics: dict, history: list) -> dict:
    return {
        "kind": "encoder",
        "backbone": cfg.encoder.backbone,
        "method": cfg.method.name,
        "method_config": to_plain(cfg.method),
        "image_size": cfg.data.image_size,
        "channels": cfg.data.channels,
        "num_classes": source.num_classes,
        "domains": train_names,
        "source": cfg.data.source,
        "seed": cfg.seed,
        "metrics": metrics,
        "history": history,
    }


def _yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(cfg, resolve=True) if OmegaConf.is_config(cfg) else str(cfg)
