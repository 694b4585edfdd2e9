"""The start of every stage: the run directory claimed, threads, seed, device, cache, TensorBoard."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ntp_ssl.data import default_cache_dir
from ntp_ssl.encoders.layout import set_channels_last
from ntp_ssl.shared.checkpoint import (
    LEGACY_SUFFIXES,
    MAX_CHECKPOINT_BYTES,
    check_regular_file,
    resolve_checkpoint_path,
    sha256_file,
)
from ntp_ssl.shared.machine import record_machine
from ntp_ssl.shared.runs import claim_run_dir
from ntp_ssl.shared.train import configure_threads, resolve_device, seed_everything, use_deterministic_cuda


@dataclass
class StageContext:
    """Where a stage writes (``run_dir``, ``cache_dir``), what it runs on, and its TensorBoard
    writer, made on first use so that a stage with nothing to do leaves no event file."""

    run_dir: Path
    cache_dir: Path
    device: torch.device
    purge_step: int | None = None
    _writer: Any = field(default=None, repr=False)

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.purge_step)
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def input_digests(checkpoints: Sequence[str], domains: Sequence[str]) -> dict[str, str]:
    """What a run reads besides its config, by content: the SHA-256 of each checkpoint and of
    each ``npz:`` file, and of each ``folder:``'s files (their names and contents: an image
    edited in place keeps its size). A run directory keyed on these refuses a rerun whose
    input file was swapped under the same path."""
    digests = {}
    for path in checkpoints:
        resolved = resolve_checkpoint_path(path)
        if resolved.suffix == ".safetensors" or resolved.suffix in LEGACY_SUFFIXES:
            check_regular_file(resolved, "checkpoint", MAX_CHECKPOINT_BYTES)  # a FIFO would hang the hash
        digests[f"checkpoint {path}"] = sha256_file(resolved)
    for spec in dict.fromkeys(domains):
        kind, _, rest = str(spec).strip().partition(":")
        location = Path(rest).expanduser()
        if kind.lower() == "npz" and location.is_file():
            digests[f"domain {spec}"] = sha256_file(location)
        elif kind.lower() == "folder" and location.is_dir():
            listing = sorted(f"{p.relative_to(location)}:{sha256_file(p)}" for p in location.rglob("*") if p.is_file())
            digests[f"domain {spec}"] = hashlib.sha256("\n".join(listing).encode()).hexdigest()
    return digests


def start_stage(cfg: Any, run_dir: Path, *, rank: int = 0, claim: bool = True,
                inputs: dict[str, str] | None = None) -> StageContext:
    """Claim ``run_dir`` for ``cfg`` and its ``inputs`` (rank 0; see :func:`input_digests`),
    set the threads, seed every RNG with ``cfg.seed + rank`` and pick the device; returns the
    stage's context."""
    run_dir = Path(run_dir)
    if claim and rank == 0:
        claim_run_dir(run_dir, cfg, inputs=inputs)
    configure_threads(cfg.trainer.threads)
    set_channels_last(cfg.trainer.channels_last)
    seed_everything(cfg.seed + rank)
    device = resolve_device(cfg.trainer.device)
    if device.type == "cuda":
        use_deterministic_cuda()
    if claim and rank == 0:
        record_machine(run_dir, device)  # machine.json: which CPU and torch made this run's numbers
    cache_dir = Path(cfg.paths.cache_dir or default_cache_dir()).expanduser()
    return StageContext(run_dir=run_dir, cache_dir=cache_dir, device=device)
