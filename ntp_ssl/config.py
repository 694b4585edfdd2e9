"""The one config schema of every stage, as dataclasses registered with Hydra.

Each stage's YAML in ``configs/`` starts from its schema (``pretrain_schema``,
``protect_schema``, ...), so a misspelt key or a value of the wrong type is rejected by
Hydra before anything runs. Values that a type cannot check (ranges, names, paths) are
checked by the ``validate_*`` functions at start-up, each failure a one-line
:class:`~ntp_ssl.errors.ConfigError`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore

from ntp_ssl.errors import ConfigError

PAPER_FRACTIONS = [0.001, 0.002, 0.005, 0.008, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0]
ATTACKS = ("linear", "finetune_masked", "finetune_dense", "knn")
OPTIMIZERS = ("sgd", "adam", "adamw")
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
LOSS_KINDS = ("ssl", "supervised", "ntl", "none")


@dataclass
class PathsConfig:
    root: str = "runs"  # every run directory goes below this folder
    cache_dir: Optional[str] = None  # domains and shared models; None: $NTP_SSL_CACHE_DIR or ~/.cache/ntp-ssl


@dataclass
class DataConfig:
    source: str = "mnist"
    targets: List[str] = field(default_factory=lambda: ["optdigits", "syndigits", "mnistm"])
    image_size: int = 32
    channels: int = 3
    seed: int = 0  # seed of domain generation and train/test splits
    root: Optional[str] = None  # local root of torchvision datasets
    download: bool = False  # let torchvision download into root (needs internet)
    num_workers: int = 0  # DataLoader workers for augmented training
    train_limit: int = 0  # keep at most this many train samples per domain (class-covering); 0 keeps all
    test_limit: int = 0  # likewise for test splits (quick runs and tests)


@dataclass
class EncoderConfig:
    backbone: str = "small_cnn"


@dataclass
class MethodConfig:
    name: str = "simclr"
    hidden_dim: int = 512
    projection_dim: int = 128
    temperature: float = 0.2
    memory_bank_size: int = 4096  # MoCo only
    momentum_base: float = 0.99  # MoCo only: key-encoder momentum at step 0, cosine to 1


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    epochs: int = 12
    warmup_epochs: int = 1


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "32"  # 32 | bf16-mixed | 16-mixed (mixed precision on CUDA only)
    eval_every: int = 4  # epochs between kNN evaluations (and the last epoch always)
    progress: bool = True
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    projector: bool = True  # TensorBoard embedding projector of final source/target features
    projector_samples: int = 300  # per domain
    checkpoint_every: int = 1  # epochs between resumable last-checkpoints


@dataclass
class PretrainConfig:
    stage: str = "pretrain"
    # relative interpolations (leading dot) so the node also resolves when nested in protect's config
    run_name: str = "${.data.source}-${.method.name}-${.encoder.backbone}-seed${.seed}"
    seed: int = 0
    domains: Optional[List[str]] = None  # train on these domains (default: [data.source])
    resume: bool = True  # continue from the run directory's last checkpoint when there is one
    resume_from: Optional[str] = None  # or from this last.safetensors (or run directory) of an earlier run
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class PruneConfig:
    sparsity: float = 0.9
    projection: str = "layer"  # layer | global | channel | soft
    soft_delta: Optional[float] = None  # soft threshold; None: chosen to hit `sparsity` at the start
    include_bias: bool = False
    include_batchnorm: bool = False
    exclude_first_layer: bool = False


@dataclass
class AdmmConfig:
    iterations: int = 5
    steps_per_iteration: int = 30  # W-step optimiser steps per ADMM iteration
    rho: float = 5e-3
    rho_growth: float = 1.5  # rho <- min(rho * growth, rho_max) after each iteration
    rho_max: float = 1.0
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    retrain_steps: int = 60  # masked retraining after the hard prune


@dataclass
class LossConfig:
    kind: str = "ssl"  # ssl (label-free) | supervised (the paper's) | ntl (MMD variant) | none (source only)
    # representation-level, label-free
    w_source_ssl: float = 1.0
    w_target_ssl: float = 1.0
    target_ssl_clamp: float = 5.0
    w_mmd: float = 1.0
    mmd_clamp: float = 1.0
    # The two Fisher terms on the encoder's features dominate on purpose (the paper's lambda is
    # 1e3): Adam is invariant to the loss's scale, so these weights set the terms' share of
    # each step; the SSL and MMD terms are the tie-breakers (docs/RESULTS.md, the sweeps of them).
    w_fisher_pseudo: float = 1000.0  # + w_fp FDR(f_T, k-means pseudo-labels): the target loses its clusters
    w_fisher_labels: float = 0.0  # > 0 uses target labels
    w_fisher_source: float = 1000.0  # - w_fs min(FDR(f_S, k-means), c_fs): the source keeps its clusters
    fisher_source_clamp: float = 1.0
    pseudo_clusters: int = 10  # k of the k-means pseudo-labels (target, and source when w_fisher_source > 0)
    # supervised NTP and NTL
    alpha: float = 0.1
    ce_clamp: float = 10.0
    fisher_weight: float = 1e3
    ntl_mmd_clamp: float = 1.0
    head_epochs: int = 5  # epochs to fit the source/target heads on the frozen encoder


@dataclass
class SweepConfig:
    fractions: List[float] = field(default_factory=lambda: list(PAPER_FRACTIONS))
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    attacks: List[str] = field(default_factory=lambda: list(ATTACKS))
    steps: int = 150  # fine-tune optimiser steps per grid point, the same for every model and scratch
    linear_steps: int = 300  # linear-probe steps on cached features (cheap), also for the source accuracy kept
    batch_size: int = 64
    lr_linear: float = 1e-2
    lr_finetune: float = 1e-3
    weight_decay: float = 5e-4
    knn_k: int = 20
    scratch: bool = True  # train the from-scratch baseline (cached)
    source_accuracy: bool = True  # also measure the source accuracy each model keeps


@dataclass
class EvaluateConfig:
    stage: str = "evaluate"
    run_name: str = "evaluate-${data.source}-seed${seed}"
    seed: int = 0
    checkpoints: List[str] = field(default_factory=list)  # encoder checkpoints (.safetensors) or run dirs
    names: Optional[List[str]] = None  # display names of the checkpoints
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class ProtectConfig:
    stage: str = "protect"
    run_name: str = "protect-${data.source}-${loss.kind}-${prune.projection}${prune.sparsity}-seed${seed}"
    seed: int = 0
    checkpoint: Optional[str] = None  # encoder to protect; None: pretrain the default one (cached)
    evaluate: bool = True  # run the SLC sweep on the protected and unprotected encoders at the end
    # domains the sweep attacks (default: data.targets); others than those protected against
    # measure target-free generalisation
    eval_targets: Optional[List[str]] = None
    resume: bool = True
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    admm: AdmmConfig = field(default_factory=AdmmConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # used when checkpoint is None
    sweep: SweepConfig = field(default_factory=SweepConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class DomainsConfig:
    stage: str = "domains"
    run_name: str = "domains"
    names: List[str] = field(default_factory=lambda: ["mnist", "optdigits", "syndigits", "mnistm"])
    per_class: int = 2
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class ReportConfig:
    stage: str = "report"
    run_name: str = "report"
    runs: List[str] = field(default_factory=list)  # evaluate/protect run directories to gather
    paths: PathsConfig = field(default_factory=PathsConfig)


SCHEMAS = {
    "pretrain": PretrainConfig,
    "protect": ProtectConfig,
    "evaluate": EvaluateConfig,
    "report": ReportConfig,
    "domains": DomainsConfig,
}


def register_schemas() -> None:
    store = ConfigStore.instance()
    for stage, schema in SCHEMAS.items():
        store.store(name=f"{stage}_schema", node=schema)


# ----------------------------------------------------------------------------- validation


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_choice(key: str, value: Any, choices) -> None:
    _check(value in choices, f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")


def _check_positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    _check(ok and math.isfinite(value), f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def validate_data(data: Any) -> None:
    _check(data.image_size >= 8, f"data.image_size={data.image_size!r} must be an integer >= 8")
    _check_choice("data.channels", data.channels, (1, 3))
    _check_positive("data.num_workers", data.num_workers, allow_zero=True)
    _check_positive("data.train_limit", data.train_limit, allow_zero=True)
    _check_positive("data.test_limit", data.test_limit, allow_zero=True)


def unknown_keys(cfg: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys of ``cfg`` that ``schema`` does not have, dotted; ``+key=value`` overrides add such
    keys without an error from Hydra, and nothing would ever read them."""
    import dataclasses
    import typing

    if not hasattr(cfg, "keys"):
        return []
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    found = []
    for key in cfg.keys():
        if key not in names:
            found.append(f"{prefix}{key}")
            continue
        hint = hints.get(key)
        if dataclasses.is_dataclass(hint) and hasattr(cfg[key], "keys"):
            found += unknown_keys(cfg[key], hint, f"{prefix}{key}.")
    return found


def _check_known_keys(cfg: Any, schema: type, stage: str) -> None:
    extra = unknown_keys(cfg, schema)
    _check(not extra, f"unknown config key(s) {', '.join(extra)}: nothing reads them (a '+KEY=VALUE' override adds "
                      f"a key); see `ntp-ssl {stage} --help` for the keys")


def _check_seed(key: str, value: Any) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
           f"{key}={value!r} must be a non-negative integer")


def validate_trainer(trainer: Any) -> None:
    _check_choice("trainer.precision", trainer.precision, PRECISIONS)
    _check(
        re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", str(trainer.device)) is not None,
        f"trainer.device={trainer.device!r} is not one of: auto, cpu, cuda, cuda:N",
    )
    _check_positive("trainer.eval_every", trainer.eval_every)
    _check_positive("trainer.threads", trainer.threads, allow_zero=True)
    _check_positive("trainer.checkpoint_every", trainer.checkpoint_every)
    if getattr(trainer, "projector", False):
        _check_positive("trainer.projector_samples", trainer.projector_samples)


def validate_pretrain(cfg: Any) -> None:
    _check_known_keys(cfg, PretrainConfig, "pretrain")
    validate_data(cfg.data)
    validate_trainer(cfg.trainer)
    _check_seed("seed", cfg.seed)
    _check_choice("optim.name", cfg.optim.name, OPTIMIZERS)
    _check_positive("optim.lr", cfg.optim.lr)
    _check(0 <= cfg.optim.momentum < 1, f"optim.momentum={cfg.optim.momentum!r} must be in [0, 1)")
    _check_positive("optim.weight_decay", cfg.optim.weight_decay, allow_zero=True)
    _check_positive("optim.batch_size", cfg.optim.batch_size)
    _check_positive("optim.epochs", cfg.optim.epochs)
    _check_positive("optim.warmup_epochs", cfg.optim.warmup_epochs, allow_zero=True)
    _check_positive("method.hidden_dim", cfg.method.hidden_dim)
    _check_positive("method.projection_dim", cfg.method.projection_dim)
    _check_positive("method.temperature", cfg.method.temperature)
    _check_positive("method.memory_bank_size", cfg.method.memory_bank_size)
    _check(0 <= cfg.method.momentum_base <= 1, f"method.momentum_base={cfg.method.momentum_base!r} must be in [0, 1]")


def validate_sweep(sweep: Any) -> None:
    _check(len(sweep.fractions) > 0, "sweep.fractions=[] is empty; give at least one fraction in (0, 1]")
    for r in sweep.fractions:
        _check(0 < r <= 1, f"sweep.fractions contains {r!r}; every fraction must be in (0, 1]")
    _check(len(sweep.seeds) > 0, "sweep.seeds=[] is empty; give at least one seed")
    for seed in sweep.seeds:
        _check(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0,
               f"sweep.seeds contains {seed!r}; every seed must be a non-negative integer")
    _check(len(sweep.attacks) > 0, f"sweep.attacks=[] is empty; choose from: {', '.join(ATTACKS)}")
    for attack in sweep.attacks:
        _check_choice("sweep.attacks", attack, ATTACKS)
    _check_positive("sweep.steps", sweep.steps)
    _check_positive("sweep.linear_steps", sweep.linear_steps)
    _check_positive("sweep.batch_size", sweep.batch_size)
    _check_positive("sweep.lr_linear", sweep.lr_linear)
    _check_positive("sweep.lr_finetune", sweep.lr_finetune)
    _check_positive("sweep.weight_decay", sweep.weight_decay, allow_zero=True)
    _check_positive("sweep.knn_k", sweep.knn_k)


def validate_protect(cfg: Any) -> None:
    _check_known_keys(cfg, ProtectConfig, "protect")
    validate_data(cfg.data)
    validate_trainer(cfg.trainer)
    _check_seed("seed", cfg.seed)
    if cfg.checkpoint is None:
        validate_pretrain(cfg.pretrain)
    _check(0 <= cfg.prune.sparsity < 1, f"prune.sparsity={cfg.prune.sparsity!r} must be in [0, 1)")
    _check_choice("prune.projection", cfg.prune.projection, ("layer", "global", "channel", "soft"))
    if cfg.prune.soft_delta is not None:
        _check_positive("prune.soft_delta", cfg.prune.soft_delta)
    _check_choice("loss.kind", cfg.loss.kind, LOSS_KINDS)
    _check_choice("admm.optimizer", cfg.admm.optimizer, OPTIMIZERS)
    _check_positive("admm.iterations", cfg.admm.iterations, allow_zero=True)
    _check_positive("admm.steps_per_iteration", cfg.admm.steps_per_iteration)
    _check_positive("admm.rho", cfg.admm.rho)
    _check_positive("admm.rho_growth", cfg.admm.rho_growth)
    _check(math.isfinite(cfg.admm.rho_max) and cfg.admm.rho_max >= cfg.admm.rho,
           f"admm.rho_max={cfg.admm.rho_max!r} must be >= admm.rho={cfg.admm.rho!r}")
    _check_positive("admm.lr", cfg.admm.lr)
    _check_positive("admm.weight_decay", cfg.admm.weight_decay, allow_zero=True)
    _check_positive("admm.batch_size", cfg.admm.batch_size)
    _check_positive("admm.retrain_steps", cfg.admm.retrain_steps, allow_zero=True)
    _check(len(cfg.data.targets) > 0, "data.targets=[] is empty; protect needs at least one unauthorized target domain")
    _check(cfg.data.source not in cfg.data.targets, f"data.source={cfg.data.source!r} is also in data.targets; a domain cannot be both")
    for key in ("w_source_ssl", "w_target_ssl", "target_ssl_clamp", "w_mmd", "mmd_clamp", "w_fisher_pseudo",
                "w_fisher_labels", "w_fisher_source", "fisher_source_clamp", "alpha", "ce_clamp", "fisher_weight", "ntl_mmd_clamp"):
        _check_positive(f"loss.{key}", getattr(cfg.loss, key), allow_zero=True)
    _check(cfg.loss.pseudo_clusters >= 2, f"loss.pseudo_clusters={cfg.loss.pseudo_clusters!r} must be >= 2")
    _check_positive("loss.head_epochs", cfg.loss.head_epochs, allow_zero=True)
    if cfg.evaluate:
        validate_sweep(cfg.sweep)
        _check(cfg.eval_targets is None or len(cfg.eval_targets) > 0,
               "eval_targets=[] is empty; leave it unset (null) to evaluate on data.targets")


def validate_evaluate(cfg: Any) -> None:
    _check_known_keys(cfg, EvaluateConfig, "evaluate")
    validate_data(cfg.data)
    validate_trainer(cfg.trainer)
    validate_sweep(cfg.sweep)
    _check_seed("seed", cfg.seed)
    _check(len(cfg.checkpoints) > 0, "checkpoints=[] is empty; pass checkpoints=[path/to/encoder.safetensors,...]")
    if cfg.names is not None:
        _check(len(cfg.names) == len(cfg.checkpoints),
               f"names has {len(cfg.names)} entries but checkpoints has {len(cfg.checkpoints)}; give one name per checkpoint")
    _check(len(cfg.data.targets) > 0, "data.targets=[] is empty; give at least one target domain")
