"""The one config schema of every stage, as dataclasses registered with Hydra.

Each stage's YAML in ``configs/`` starts from its schema (``pretrain_schema``,
``protect_schema``, ...), so a misspelt key or a value of the wrong type is rejected by
Hydra before anything runs. Values that a type cannot check (ranges, names, paths) are
checked by the ``validate_*`` functions at start-up, each failure a one-line
:class:`~ntp_ssl.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ntp_ssl.checks import (
    check_channels,
    check_domain_spec,
    check_image_size,
    check_run_name,
    check_source_and_targets,
    checkpoint_key,
    is_int,
    resolve_results_path,
)
from ntp_ssl.errors import ConfigError

PAPER_GRID: tuple[float, ...] = (0.001, 0.002, 0.005, 0.008, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0)  # the paper's fractions
ATTACKS = ("linear", "finetune_masked", "finetune_dense", "lpft_masked", "lpft_dense", "knn")  # the default set
#: accepted by sweep.attacks; finetune_refill (a dense fine-tune after refilling the pruned
#: weights with a fresh initialisation) is opt-in until it is measured as a stronger attacker
ALL_ATTACKS = (*ATTACKS, "finetune_refill")
OPTIMIZERS = ("sgd", "adam", "adamw")
# The registries' names (ntp_ssl.encoders.BACKBONES, ntp_ssl.pretrain.methods.METHODS, which
# import torch), so that the command line refuses a mistyped one first; a test keeps them equal.
BACKBONE_NAMES = ("small_cnn", "small_cnn_wide", "resnet18", "resnet50", "vgg11_bn")
METHOD_NAMES = ("simclr", "moco", "supervised")
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
#: the attacker's arithmetic (sweep.precision): auto is bf16-mixed where the device has native
#: bfloat16 kernels, else 32 (ntp_ssl/shared/train.resolve_precision)
SWEEP_PRECISIONS = ("32", "bf16-mixed", "auto")
#: The reference attacker's arithmetic, the one every result before 2026-12-06 was measured
#: with: float32 fine-tunes, validation and test forwards of 512 images. Off these values the
#: scratch cache key names the value, and a run directory made before the options existed is
#: read as made with these (shared/runs.LEGACY_VALUES).
REFERENCE_PRECISION = "32"
REFERENCE_EVAL_BATCH = 512
RHO_SCHEDULES = ("geometric", "balanced")


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
    # keep at most this many train samples per domain, one per class at least (class-covering); 0 keeps all
    train_limit: int = 0
    test_limit: int = 0  # likewise for test splits (quick runs and tests)
    # None or "test": every domain's own test split is measured. "validation": the tuning split:
    # a stratified 20% of each train split (seed VALIDATION_SEED) is held out and measured
    # instead, and neither protection nor the attacks train on it, so settings are chosen
    # without the test split. The default encoder is pretrained on the whole source train split
    # either way (pipeline.default_encoder_config), so its pretraining saw the source's held-out
    # images, and the digits that mnistm's held-out images are blended from, without labels
    split: Optional[str] = None


@dataclass
class EncoderConfig:
    backbone: str = "small_cnn"


@dataclass
class MethodConfig:
    """The pretraining method and its heads (``METHOD_OPTIONS`` in pretrain/methods.py says which keys each takes)."""

    name: str = "simclr"  # simclr | moco | supervised
    hidden_dim: int = 512
    projection_dim: int = 128
    temperature: float = 0.2
    memory_bank_size: int = 4096  # MoCo only
    momentum_base: float = 0.99  # MoCo only: key-encoder momentum at step 0, cosine to 1
    # SSL views' augmentation (pretrain/methods.py: build_train_transform); null keeps the
    # built-in value and the default encoder's cache key: the smallest random-resized-crop
    # scale (null: 0.25), and the probability of inverting a view (null: 0; digits come as
    # light-on-dark and dark-on-light, and an encoder blind to that transfers further)
    min_scale: Optional[float] = None
    invert_prob: Optional[float] = None


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # 32, not 256: the same 12 epochs (5-15% more wall time on 2 cores) in 8x the optimiser
    # steps made the SimCLR encoder a better start on every target of the validation split
    # (issue 12; docs/RESULTS.md, "Stronger default encoders within the main job's budget")
    batch_size: int = 32
    epochs: int = 12
    warmup_epochs: int = 1


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "32"  # 32 | bf16-mixed (CUDA and CPU) | 16-mixed (CUDA only; float32 on the CPU)
    eval_every: int = 4  # epochs between kNN evaluations (and the last epoch always)
    progress: bool = True
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    # encoders compute on channels-last (NHWC) batches: 1.3-1.6x faster steps on the CPU;
    # false: NCHW, the layout of every result made before 2026-12-01 (float rounding differs)
    channels_last: bool = True
    projector: bool = True  # TensorBoard embedding projector of final source/target features
    projector_samples: int = 300  # per domain
    checkpoint_every: int = 1  # epochs between resumable last-checkpoints


@dataclass
class StageConfig:
    """What every training stage has: its name, its run's name, a seed, paths, data and trainer."""

    stage: str = ""
    run_name: str = ""
    seed: int = 0
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class PretrainConfig(StageConfig):
    stage: str = "pretrain"
    # relative interpolations (leading dot), so that the name also resolves in a node of its own
    run_name: str = "${folder_name:${.data.source}}-${.method.name}-${.encoder.backbone}-seed${.seed}"
    domains: Optional[List[str]] = None  # train on these domains (default: [data.source])
    resume: bool = True  # continue from the run directory's last checkpoint when there is one
    resume_from: Optional[str] = None  # or from this last.safetensors (or run directory) of an earlier run
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class DefaultEncoderConfig:
    """How the main job pretrains its default encoder when no checkpoint is given: on
    data.source, with the run's own data, paths and trainer settings (cached)."""

    seed: int = 0
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class PruneConfig:
    sparsity: float = 0.9
    projection: str = "layer"  # layer | global | channel | soft | random (the random-mask control)
    soft_delta: Optional[float] = None  # soft threshold; None: chosen to hit `sparsity` at the start
    # The random projection's draw. None: fixed by each tensor's name, one mask whatever the
    # run's seed (how every random-mask table up to issue 13's last rounds was measured); an
    # integer: mixed with the name, so each value draws an independent mask. `${seed}` ties
    # the mask to the protection seed, so intervals over seeds cover the mask's draw too.
    random_seed: Optional[int] = None
    include_bias: bool = False
    # Batch-norm scale and shift pruned too (as the authors do): at 90% it silences 90% of the
    # channels and breaks the source as much as the targets (docs/RESULTS.md); left off.
    include_batchnorm: bool = False
    exclude_first_layer: bool = False


@dataclass
class AdmmConfig:
    # Converged by default (issue 13, chosen on data.split=validation with seed 0): rho tripled
    # every iteration from 0.1 to 1e5 (reached at the 14th) brings ||W - Z|| / ||W|| to
    # 0.010-0.013 after 15 iterations on every report seed, consecutive supports agree at the
    # end, and the hard prune moves the kNN monitors by 0.08 at most. 14 iterations (the default until
    # 2026-12-01) ended at 0.011-0.021, as protective (docs/RESULTS.md). The earlier 5 iterations
    # from rho 5e-3 ended near 0.9, supports sharing 4% from one iteration to the next.
    iterations: int = 15
    steps_per_iteration: int = 30  # W-step optimiser steps per ADMM iteration
    rho: float = 0.1
    rho_growth: float = 3.0  # rho <- min(rho * growth, rho_max) after each iteration
    rho_max: float = 1e5
    # geometric: the growth above every iteration; balanced: residual balancing (Boyd et al.
    # 2011, 3.4.1): rho *= tau when ||W - Z|| > mu * rho ||Z - Z_prev||, rho /= tau in the
    # opposite case, within [rho, rho_max]
    rho_schedule: str = "geometric"
    rho_balance_mu: float = 10.0
    rho_balance_tau: float = 2.0
    optimizer: str = "adam"
    lr: float = 3e-3  # the first W-step's; masked retraining uses it too
    # The W-step learning rate of iteration i is lr * (lr_final / lr) ** (i / (iterations - 1));
    # None: lr throughout. Adam moves each weight by about lr per step, so ||W - Z|| cannot
    # settle below that noise floor unless the rate comes down as rho goes up.
    lr_final: Optional[float] = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    retrain_steps: int = 60  # masked retraining after the hard prune
    # What masked retraining minimises: None, L_NT itself; "source", the source terms alone
    # (source SSL or cross-entropy, plus either distillation whose weight is > 0), so the
    # kept weights serve the source again without any push on the targets (issue 13, item 2).
    # Measured on today's encoder (docs/RESULTS.md, "The tuning seed's pick on the report
    # seeds"): 600 steps keep the source whole (kNN 0.931, as unprotected) for targets at
    # -0.03 mask-kept / +0.13 dense (the default -0.20 / +0.04); left off, the team's choice.
    retrain_loss: Optional[str] = None
    # The k-means pseudo-labels masked retraining's target Fisher term separates: clustered
    # from the encoder right after the hard prune ("pruned"), or right before it ("unpruned":
    # with admm.iterations=0 the unprotected encoder, whose clusters are the target's classes,
    # while a random mask leaves the pruned encoder at chance and its clusters near random);
    # and clustered again every `retrain_refresh_every` steps from the retrained encoder (0: once).
    retrain_pseudo_from: str = "pruned"
    retrain_refresh_every: int = 0


@dataclass
class ProtectionTerms:
    """Issue 13's terms, shared by ``loss=ssl`` and ``loss=supervised``; 0 is off, the default:
    on the validation split (seed 0, docs/RESULTS.md) no form or weight measured made label-free
    NTP a worse start (feature distillation at 300 and 3000, relational at 3000 and 30000, the
    simulated attacker at two strengths with either penalty), and those that kept more of the
    source gave up protection as fast."""

    # + w_sd mean(1 - cos(f_S, teacher(x_S))): source features stay where the frozen unprotected
    # encoder put them
    w_source_distill: float = 0.0
    # + w_sr mean_{i != j} (cos(f_i, f_j) - cos(t_i, t_j))^2 on source batches: only the source's
    # pairwise geometry (who is near whom) held to the teacher's, not the features themselves
    w_source_relational: float = 0.0
    # A simulated attacker: every sim_every steps, sim_inner_steps of SGD on a fresh linear head
    # plus the encoder on half a target batch (k-means pseudo-labels, or labels for
    # loss=supervised), under the current mask and/or dense (sim_modes); its first-order
    # gradient of the adapted model's cross-entropy to the uniform distribution on the other
    # half is added with weight w_sim_attack (the adapted model should learn nothing)
    w_sim_attack: float = 0.0
    sim_every: int = 5
    sim_inner_steps: int = 5
    sim_inner_lr: float = 0.01
    sim_modes: List[str] = field(default_factory=lambda: ["masked", "dense"])
    # what the adapted model is penalised by: "uniform", its cross-entropy to the uniform
    # distribution minus ln C (its head should predict nothing), or "fisher", the Fisher ratio of
    # its features under the inner labels (its features should not separate them, whatever head)
    sim_penalty: str = "uniform"


@dataclass
class LabelFreeLossConfig(ProtectionTerms):
    """``loss=ssl``, this project's representation-level loss (no labels needed):
    w_s SSL_S - w_t min(SSL_T, c_t) - w_mmd min(MMD, c_m) + w_fp FDR(f_T, k-means_T)
    + w_fl FDR(f_T, y_T) - w_fs min(FDR(f_S, k-means_S), c_fs)."""

    kind: str = "ssl"  # set by the option; choose the loss with loss=ssl|supervised|ntl|none
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


@dataclass
class SupervisedLossConfig(ProtectionTerms):
    """``loss=supervised``, the paper's loss with labels on both sides:
    CE_S - alpha min(CE_T, c) + w_fl FDR(f_T, y_T)."""

    kind: str = "supervised"
    alpha: float = 0.1
    ce_clamp: float = 10.0  # c = 10 in the authors' code
    w_fisher_labels: float = 1e3  # the paper's lambda
    head_steps: int = 100  # optimiser steps fitting the source/target heads on the frozen encoder


@dataclass
class NtlLossConfig:
    """``loss=ntl``, the NTL-style variant: CE_S - alpha min(CE_T, c) min(MMD(f_S, f_T), c_m)."""

    kind: str = "ntl"
    alpha: float = 0.1
    ce_clamp: float = 10.0
    mmd_clamp: float = 1.0
    head_steps: int = 100


@dataclass
class SourceOnlyLossConfig:
    """``loss=none``: the source term alone (the encoder's SSL loss, or cross-entropy for a
    supervised checkpoint); with admm.iterations=0 this is plain magnitude pruning."""

    kind: str = "none"


#: loss option (the ``loss=`` choice and each node's ``kind``) -> its schema
LOSSES: dict[str, type] = {"ssl": LabelFreeLossConfig, "supervised": SupervisedLossConfig, "ntl": NtlLossConfig,
                           "none": SourceOnlyLossConfig}


@dataclass
class SweepConfig:
    """The SLC sweep: the grid of target fractions, the seeds, the attacks, and the attacker's
    protocol (ntp_ssl/evaluate/attack.py). ``sweep=converged`` (the default) trains to
    convergence and tunes the learning rate on the attacker's own validation split;
    ``sweep=main_job`` is the same on the main job's budget; ``sweep=paper`` is the authors'
    fixed-step budget, kept for comparison."""

    fractions: List[float] = field(default_factory=lambda: list(PAPER_GRID))
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    attacks: List[str] = field(default_factory=lambda: list(ATTACKS))
    # Fine-tune budget: steps > 0 is that many optimiser steps whatever n is (the authors'
    # protocol); 0 trains `epochs` passes over the samples, within [min_steps, max_steps].
    steps: int = 0
    epochs: int = 30
    min_steps: int = 100
    max_steps: int = 600
    augment_shift: int = 2  # random shifts of up to this many pixels while fine-tuning (0: none)
    lr_finetune: float = 1e-3  # the learning rate when no validation split can be carved
    # chosen on validation; [] = none. Up to 3e-2 because a sparse (mask-kept) network wants
    # larger steps: with a top of 3e-3 the mask-kept fine-tune chose that top at 86 of 96
    # points, and its SLC-AUC was a third too protective (docs/RESULTS.md, "The attacker's
    # learning-rate grid is too narrow under the mask"); with 3e-2 the choice peaks inside.
    lr_grid: List[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    val_fraction: float = 0.2  # of the attacker's n samples, stratified, held out to choose lr / l2 and stop
    search_min_n: int = 50  # fewer samples (or a class with one sample): no split, lr_finetune, last step
    # speed features (attack.py): successive halving over lr_grid with this reduction factor
    # (0: off, else >= 2), and early stopping after this many validation checks without
    # improvement (0: off; checks are a tenth of the budget apart). Off by default: 1.6-2x
    # faster, but in every measured run they made the attacks slightly weaker (fine-tune
    # SLC-AUC -0.007 to -0.024, LP-FT about -0.035; docs/BENCHMARKS.md), i.e. in the
    # protection's favour, and the default attacker must be the strongest one.
    halving: int = 0
    patience: int = 0
    # the fine-tunes' forward passes (training, validation, test accuracy): 32 | bf16-mixed |
    # auto (bf16-mixed where the device has native bfloat16 kernels); frozen features and the
    # linear probe stay float32. Part of the protocol: scratch is cached per precision.
    precision: str = REFERENCE_PRECISION
    # the batch of the fine-tunes' validation and test forwards: 128 runs 1.7-2.2x faster per
    # image than 512 on 2 cores (docs/BENCHMARKS.md); it changes only the float rounding, but
    # every result before 2026-12-06 used 512, so 512 stays the reference attacker's
    eval_batch_size: int = REFERENCE_EVAL_BATCH
    probe_l2_grid: List[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0])  # linear probe
    probe_l2: float = 1e-2  # the linear probe's l2 when no validation split can be carved
    batch_size: int = 64
    weight_decay: float = 5e-4
    knn_k: int = 20
    scratch: bool = True  # train the from-scratch baseline (cached)
    source_accuracy: bool = True  # also measure the source accuracy each model keeps (linear probe, kNN)
    source_curve: bool = True  # also sweep the source domain: the source-domain SLC-AUC of each model


#: ``sweep=`` presets: the converged, tuned attacker (the default of ``ntp-ssl evaluate``); the
#: same attacker on the main job's budget (one seed, three fractions, 15 epochs within 50 to 250
#: steps, no LP-FT: the default of ``ntp-ssl protect``) with three learning rates, because each
#: end is some model's choice: scratch picks 1e-3 within 250 steps and the mask-kept fine-tune
#: 1e-2; dropping either end starves one side (docs/BENCHMARKS.md, "The main job"), its
#: fine-tunes in bfloat16 where the CPU has bfloat16 instructions and its validation forwards in
#: batches of 128 (a 1.8x faster sweep, 15.2 minutes for the job on 2 cores against 23.6 in
#: float32 the same day; the same SLC-AUCs within the float noise of one run:
#: docs/BENCHMARKS.md, "The attacker in bfloat16"); and the authors' fixed-step protocol
#: without any search.
SWEEP_PRESETS: dict[str, dict] = {
    "converged": {},
    "main_job": {"fractions": [0.01, 0.1, 1.0], "seeds": [0], "epochs": 15, "min_steps": 50, "max_steps": 250,
                 "lr_grid": [1e-3, 3e-3, 1e-2], "attacks": ["linear", "finetune_masked", "finetune_dense", "knn"],
                 "precision": "auto", "eval_batch_size": 128},
    "paper": {"steps": 150, "augment_shift": 0, "lr_grid": []},
}


@dataclass
class EvaluateConfig(StageConfig):
    stage: str = "evaluate"
    run_name: str = "evaluate-${folder_name:${data.source}}-seed${seed}"
    checkpoints: List[str] = field(default_factory=list)  # encoder checkpoints (.safetensors) or run dirs
    names: Optional[List[str]] = None  # display names of the checkpoints
    # names of masked checkpoints whose mask is also evaluated on a random initialisation
    # ("<name>-sparse_scratch", mask-kept fine-tune only): the control that tells protection from sparsity
    sparse_scratch: List[str] = field(default_factory=list)
    sweep: SweepConfig = MISSING  # a preset of the sweep group: sweep=converged (default) | paper


@dataclass
class ProtectConfig(StageConfig):
    stage: str = "protect"
    run_name: str = "protect-${folder_name:${data.source}}-${loss.kind}-${prune.projection}${prune.sparsity}-seed${seed}"
    checkpoint: Optional[str] = None  # encoder to protect; None: pretrain the default one (cached)
    evaluate: bool = True  # run the SLC sweep on the protected and unprotected encoders at the end
    # domains the sweep attacks (default: data.targets); others than those protected against
    # measure target-free generalisation
    eval_targets: Optional[List[str]] = None
    resume: bool = True
    prune: PruneConfig = field(default_factory=PruneConfig)
    admm: AdmmConfig = field(default_factory=AdmmConfig)
    loss: Any = MISSING  # a node of the loss group: loss=ssl (default) | supervised | ntl | none
    pretrain: DefaultEncoderConfig = field(default_factory=DefaultEncoderConfig)  # used when checkpoint is None
    # also evaluate the protected mask on a random initialisation, fine-tuned under the mask:
    # the control that tells protection from sparsity (its finetune_masked against the protected one's)
    sparse_scratch: bool = True
    sweep: SweepConfig = MISSING  # a preset of the sweep group: sweep=converged (default) | paper


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


def folder_name(text: Any) -> str:
    """``text`` as one folder name, for run names built from a domain spec such as
    ``npz:/data/x.npz``: every run of characters other than letters, digits, ``.``, ``_`` and
    ``-`` becomes ``_`` (``npz_data_x.npz``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "unnamed"


# At import, so that every composed or structured config can resolve its run_name.
OmegaConf.register_new_resolver("folder_name", folder_name, replace=True)


def register_schemas() -> None:
    store = ConfigStore.instance()
    for stage, schema in SCHEMAS.items():
        store.store(name=f"{stage}_schema", node=schema)
    for name, schema in LOSSES.items():
        store.store(group="loss", name=name, node=schema)
    for name, values in SWEEP_PRESETS.items():
        store.store(group="sweep", name=name, node=SweepConfig(**values))


def to_plain(cfg: Any) -> dict:
    """A config node (or a mapping) as plain, resolved Python containers."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


# ----------------------------------------------------------------------------- validation


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_choice(key: str, value: Any, choices) -> None:
    _check(value in choices, f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")


def _check_positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    _check(ok and math.isfinite(value), f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


DATA_SPLITS = (None, "test", "validation")


def validate_data(data: Any) -> None:
    check_image_size(data.image_size, "data.image_size")
    check_channels(data.channels, "data.channels")
    _check_seed("data.seed", data.seed)
    _check_positive("data.num_workers", data.num_workers, allow_zero=True)
    _check_positive("data.train_limit", data.train_limit, allow_zero=True)
    _check_positive("data.test_limit", data.test_limit, allow_zero=True)
    split = getattr(data, "split", None)
    _check(split in DATA_SPLITS, f"data.split={split!r} is not one of: test, validation (or null: test)")
    check_domain_spec(data.source, "data.source")
    for target in data.targets:
        check_domain_spec(target, "data.targets")


def unknown_keys(cfg: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys of ``cfg`` that ``schema`` does not have, dotted; ``+key=value`` overrides add such
    keys without an error from Hydra, and nothing would ever read them."""
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


def _check_stage(cfg: Any, schema: type, stage: str) -> None:
    """What every stage's config must satisfy: a safe run name (a multirun reaches the stage
    without the command line's precheck) and no key that nothing reads."""
    check_run_name(cfg.run_name)
    extra = unknown_keys(cfg, schema)
    _check(not extra, f"unknown config key(s) {', '.join(extra)}: nothing reads them (a '+KEY=VALUE' override adds "
                      f"a key); see `ntp-ssl {stage} --help` for the keys")


MAX_SEED = 2**31 - 1  # seeds are combined (seed * 100003 + epoch, 20000 + seed, ...) into 64-bit RNG seeds


def _is_seed(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SEED


def _check_seed(key: str, value: Any) -> None:
    _check(_is_seed(value), f"{key}={value!r} must be an integer from 0 to {MAX_SEED}")


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


def validate_encoder_and_method(encoder: Any, method: Any, prefix: str = "") -> None:
    """The backbone's and the method's names (under ``prefix``: ``pretrain.`` in protect)."""
    _check_choice(f"{prefix}encoder.backbone", encoder.backbone, BACKBONE_NAMES)
    _check_choice(f"{prefix}method.name", method.name, METHOD_NAMES)


def validate_optim_and_method(optim: Any, method: Any) -> None:
    _check_choice("optim.name", optim.name, OPTIMIZERS)
    _check(0 <= optim.momentum < 1, f"optim.momentum={optim.momentum!r} must be in [0, 1)")
    for key in ("lr", "batch_size", "epochs"):
        _check_positive(f"optim.{key}", optim[key])
    for key in ("weight_decay", "warmup_epochs"):
        _check_positive(f"optim.{key}", optim[key], allow_zero=True)
    for key in ("hidden_dim", "projection_dim", "temperature", "memory_bank_size"):
        _check_positive(f"method.{key}", method[key])
    _check(0 <= method.momentum_base <= 1, f"method.momentum_base={method.momentum_base!r} must be in [0, 1]")
    min_scale, invert_prob = method.get("min_scale"), method.get("invert_prob")
    _check(min_scale is None or 0 < min_scale <= 1, f"method.min_scale={min_scale!r} must be in (0, 1] or null")
    _check(invert_prob is None or 0 <= invert_prob <= 1,
           f"method.invert_prob={invert_prob!r} must be in [0, 1] or null")
    _check(method.name != "supervised" or (min_scale is None and invert_prob is None),
           f"method.min_scale={min_scale!r} / method.invert_prob={invert_prob!r} set with method.name=supervised; "
           "accepted: null (they shape the SSL methods' views only)")


def validate_pretrain(cfg: Any) -> None:
    _check_stage(cfg, PretrainConfig, "pretrain")
    validate_data(cfg.data)
    validate_trainer(cfg.trainer)
    _check_seed("seed", cfg.seed)
    validate_encoder_and_method(cfg.encoder, cfg.method)
    validate_optim_and_method(cfg.optim, cfg.method)
    for name in cfg.domains or []:
        check_domain_spec(name, "domains")


def validate_sweep(sweep: Any) -> None:
    _check(len(sweep.fractions) > 0, "sweep.fractions=[] is empty; give at least one fraction in (0, 1]")
    for r in sweep.fractions:
        _check(0 < r <= 1, f"sweep.fractions contains {r!r}; every fraction must be in (0, 1]")
    _check(len(sweep.seeds) > 0, "sweep.seeds=[] is empty; give at least one seed")
    for seed in sweep.seeds:
        _check(_is_seed(seed), f"sweep.seeds contains {seed!r}; every seed must be an integer from 0 to {MAX_SEED}")
    _check(sweep.scratch is True, f"sweep.scratch={sweep.scratch!r}: every SLC-AUC is measured against the "
           "from-scratch baseline (cached after its first run); accepted: true")
    _check(len(sweep.attacks) > 0, f"sweep.attacks=[] is empty; choose from: {', '.join(ALL_ATTACKS)}")
    for attack in sweep.attacks:
        _check_choice("sweep.attacks", attack, ALL_ATTACKS)
    _check_choice("sweep.precision", str(getattr(sweep, "precision", "32")), SWEEP_PRECISIONS)
    for key in ("epochs", "min_steps", "batch_size", "eval_batch_size", "lr_finetune", "probe_l2", "knn_k"):
        _check_positive(f"sweep.{key}", sweep[key])
    for key in ("steps", "augment_shift", "weight_decay", "search_min_n", "patience"):
        _check_positive(f"sweep.{key}", sweep[key], allow_zero=True)
    _check(isinstance(sweep.halving, int) and (sweep.halving == 0 or sweep.halving >= 2),
           f"sweep.halving={sweep.halving!r}: accepted 0 (off) or a reduction factor, an integer >= 2")
    _check(sweep.max_steps >= sweep.min_steps,
           f"sweep.max_steps={sweep.max_steps!r} must be >= sweep.min_steps={sweep.min_steps!r}")
    _check(0 < sweep.val_fraction < 1, f"sweep.val_fraction={sweep.val_fraction!r} must be in (0, 1)")
    for key in ("lr_grid", "probe_l2_grid"):
        for value in sweep[key]:
            _check(value > 0 and math.isfinite(value), f"sweep.{key} contains {value!r}; every value must be > 0")


def validate_prune(prune: Any) -> None:
    _check(0 <= prune.sparsity < 1, f"prune.sparsity={prune.sparsity!r} must be in [0, 1)")
    _check_choice("prune.projection", prune.projection, ("layer", "global", "channel", "soft", "random"))
    if prune.soft_delta is not None:
        _check_positive("prune.soft_delta", prune.soft_delta)
    random_seed = getattr(prune, "random_seed", None)
    if random_seed is not None:
        _check_seed("prune.random_seed", random_seed)
        _check(prune.projection == "random", f"prune.random_seed={random_seed!r} applies to "
               f"prune.projection=random only, got prune.projection={prune.projection!r}; accepted: null")


def validate_admm(admm: Any) -> None:
    _check_choice("admm.optimizer", admm.optimizer, OPTIMIZERS)
    for key in ("iterations", "retrain_steps", "weight_decay"):
        _check_positive(f"admm.{key}", admm[key], allow_zero=True)
    for key in ("steps_per_iteration", "rho", "rho_growth", "lr", "batch_size"):
        _check_positive(f"admm.{key}", admm[key])
    # batch norm in training mode needs two samples per batch
    _check(admm.batch_size >= 2, f"admm.batch_size={admm.batch_size!r} must be >= 2 (batch norm needs two samples)")
    if getattr(admm, "lr_final", None) is not None:
        _check_positive("admm.lr_final", admm.lr_final)
    _check(math.isfinite(admm.rho_max) and admm.rho_max >= admm.rho,
           f"admm.rho_max={admm.rho_max!r} must be >= admm.rho={admm.rho!r}")
    _check_choice("admm.rho_schedule", admm.rho_schedule, RHO_SCHEDULES)
    _check_choice("admm.retrain_pseudo_from", getattr(admm, "retrain_pseudo_from", "pruned"), ("pruned", "unpruned"))
    _check_positive("admm.retrain_refresh_every", getattr(admm, "retrain_refresh_every", 0), allow_zero=True)
    if getattr(admm, "retrain_loss", None) is not None:
        _check(admm.retrain_loss == "source",
               f"admm.retrain_loss={admm.retrain_loss!r} is not one of: null (the protection loss), source")
    _check(admm.rho_balance_mu > 1, f"admm.rho_balance_mu={admm.rho_balance_mu!r} must be > 1")
    _check(admm.rho_balance_tau > 1, f"admm.rho_balance_tau={admm.rho_balance_tau!r} must be > 1")


def validate_loss(loss: Any) -> None:
    """The loss node: its option's own keys only, each weight >= 0."""
    kind = loss.get("kind") if hasattr(loss, "get") else None
    _check_choice("loss.kind", kind, tuple(LOSSES))
    schema = LOSSES[kind]
    chosen = OmegaConf.get_type(loss) if isinstance(loss, DictConfig) else schema
    option = next((name for name, cls in LOSSES.items() if cls is chosen), kind)
    _check(option == kind, f"loss.kind={kind!r} does not change the loss option (loss={option}); choose the loss "
                           f"with loss={kind}")
    extra = unknown_keys(loss, schema, "loss.")
    _check(not extra, f"{', '.join(extra)} is not a key of loss={kind} (keys: "
                      f"{', '.join(f.name for f in dataclasses.fields(schema) if f.name != 'kind')}); "
                      "choose another loss with loss=ssl|supervised|ntl|none")
    for f in dataclasses.fields(schema):
        if f.name == "pseudo_clusters":
            _check(loss.pseudo_clusters >= 2, f"loss.pseudo_clusters={loss.pseudo_clusters!r} must be >= 2")
        elif f.name == "sim_modes":
            _check(len(loss.sim_modes) > 0 and all(m in ("masked", "dense") for m in loss.sim_modes),
                   f"loss.sim_modes={list(loss.sim_modes)!r}; accepted: a non-empty list of masked, dense")
        elif f.name == "sim_penalty":
            _check_choice("loss.sim_penalty", loss.sim_penalty, ("uniform", "fisher"))
        elif f.name in ("sim_every", "sim_inner_steps"):
            _check(is_int(loss[f.name]) and loss[f.name] >= 1, f"loss.{f.name}={loss[f.name]!r} must be an integer >= 1")
        elif f.name != "kind":
            _check_positive(f"loss.{f.name}", loss[f.name], allow_zero=True)


def validate_default_encoder(node: Any) -> None:
    _check_seed("pretrain.seed", node.seed)
    validate_encoder_and_method(node.encoder, node.method, "pretrain.")
    validate_optim_and_method(node.optim, node.method)


def validate_protect(cfg: Any) -> None:
    _check_stage(cfg, ProtectConfig, "protect")
    validate_data(cfg.data)
    validate_trainer(cfg.trainer)
    _check_seed("seed", cfg.seed)
    if cfg.checkpoint is None:
        validate_default_encoder(cfg.pretrain)
    validate_prune(cfg.prune)
    validate_admm(cfg.admm)
    validate_loss(cfg.loss)
    _check(len(cfg.data.targets) > 0, "data.targets=[] is empty; protect needs at least one unauthorized target domain")
    check_source_and_targets(cfg.data.source, cfg.data.targets)
    if cfg.eval_targets:
        for target in cfg.eval_targets:
            check_domain_spec(target, "eval_targets")
        check_source_and_targets(cfg.data.source, cfg.eval_targets, "eval_targets")
    if cfg.evaluate:
        validate_sweep(cfg.sweep)
        _check(cfg.eval_targets is None or len(cfg.eval_targets) > 0,
               "eval_targets=[] is empty; leave it unset (null) to evaluate on data.targets")


def validate_evaluate(cfg: Any) -> None:
    _check_stage(cfg, EvaluateConfig, "evaluate")
    validate_data(cfg.data)
    validate_trainer(cfg.trainer)
    validate_sweep(cfg.sweep)
    _check_seed("seed", cfg.seed)
    _check(len(cfg.checkpoints) > 0, "checkpoints=[] is empty; pass checkpoints=[path/to/encoder.safetensors,...]")
    if cfg.names is not None:
        _check(len(cfg.names) == len(cfg.checkpoints),
               f"names has {len(cfg.names)} entries but checkpoints has {len(cfg.checkpoints)}; give one name per checkpoint")
        repeated = _first_repeat([str(name) for name in cfg.names])
        _check(repeated is None, f"names={list(cfg.names)} gives {repeated!r} twice; give each checkpoint its own name")
    # The same file twice would be attacked twice under two names: hours of work for a copy.
    repeated = _first_repeat([checkpoint_key(str(path)) for path in cfg.checkpoints])
    _check(repeated is None, f"checkpoints lists {repeated!r} twice; list each checkpoint once")
    _check(len(cfg.data.targets) > 0, "data.targets=[] is empty; give at least one target domain")


def _first_repeat(items: list[str]) -> str | None:
    """The first item that appears a second time in ``items``, or None."""
    seen: set[str] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def validate_domains(cfg: Any) -> None:
    _check_stage(cfg, DomainsConfig, "domains")
    validate_data(cfg.data)
    _check(len(cfg.names) > 0, "names=[] is empty; pass names=[mnist,optdigits,...] (any domain load_domain accepts)")
    for name in cfg.names:
        check_domain_spec(name, "names")
    _check(is_int(cfg.per_class) and cfg.per_class >= 1, f"per_class={cfg.per_class!r} must be an integer >= 1")


def validate_report(cfg: Any) -> None:
    _check_stage(cfg, ReportConfig, "report")
    _check(len(cfg.runs) > 0, "runs=[] is empty; pass runs=[runs/evaluate/NAME,runs/protect/NAME,...]")
    for run in cfg.runs:
        resolve_results_path(run)


#: The checks each stage runs on its config, by stage name; the command line runs them too,
#: before torch is imported and before the run directory exists (ntp_ssl/cli.precheck).
STAGE_VALIDATORS = {"pretrain": validate_pretrain, "protect": validate_protect, "evaluate": validate_evaluate,
                    "domains": validate_domains, "report": validate_report}


def input_checkpoints(stage: str, cfg: Any) -> list[str]:
    """The checkpoint files a stage reads, as its config names them: the command line looks for
    them before anything heavy is imported, the stage hashes them into its run's inputs."""
    if stage == "evaluate":
        return [str(path) for path in cfg.checkpoints]
    if stage == "protect" and cfg.checkpoint:
        return [str(cfg.checkpoint)]
    return []
