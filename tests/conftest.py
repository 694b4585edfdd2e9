"""Shared test set-up: one domain cache per test session, tiny configs, the real command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def bench_efficacy():
    """benchmarks/bench_efficacy.py as a module."""
    return load_benchmark("bench_efficacy")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The domain cache: $NTP_SSL_CACHE_DIR when CI sets one (reused across runs), else a session folder."""
    env = os.environ.get("NTP_SSL_CACHE_DIR")
    path = Path(env) if env else tmp_path_factory.mktemp("ntp-ssl-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


# Settings small enough for a 2-core machine: 16x16 images, a few hundred samples.
TINY_DATA = ["data.image_size=16", "data.train_limit=300", "data.test_limit=200", "trainer.progress=false"]
# Two learning rates and two l2 values for the end-to-end runs: the attacker's search (split,
# choose, refit) still runs at every point that can carry one, at under half the cost of the
# presets' five-value grids.
SMALL_SEARCH = ["sweep.lr_grid=[1e-3,1e-2]", "sweep.probe_l2_grid=[1e-3,1e-1]"]
TINY_PRETRAIN = ["optim.epochs=2", "optim.batch_size=64", "method.hidden_dim=64", "method.projection_dim=32",
                 "trainer.eval_every=1", "trainer.projector_samples=20"]


def run_cli(args: list[str], *, cwd: Path, cache: Path, timeout: int = 600, env_extra: dict | None = None,
            command: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the real `ntp-ssl` console command (the installed entry point)."""
    env = {**os.environ, "NTP_SSL_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    exe = Path(sys.executable).parent / "ntp-ssl"
    cmd = (command or [str(exe)]) + args
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def event_tags(event_dir: Path, kind: str = "scalars") -> set[str]:
    """The TensorBoard tags of ``kind`` (scalars, images, ...) in every event file under ``event_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for path in event_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags()[kind])
    return tags


def tensorboard_image_size(event_dir: Path, tag: str) -> tuple[int, int]:
    """(width, height) of the first image logged under ``tag``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for path in event_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path))
        acc.Reload()
        if tag in acc.Tags()["images"]:
            image = acc.Images(tag)[0]
            return image.width, image.height
    raise AssertionError(f"no image {tag!r} under {event_dir}")


def assert_same_tensors(a_path: Path, b_path: Path) -> None:
    """Two checkpoints hold the same tensors, bit for bit."""
    from ntp_ssl.shared.checkpoint import load_checkpoint

    a, _ = load_checkpoint(a_path)
    b, _ = load_checkpoint(b_path)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ from the reference: {different[:5]}"


@pytest.fixture
def cli(tmp_path, cache_dir):
    def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return run_cli(list(args), cwd=tmp_path, cache=cache_dir, **kwargs)

    return _run


def toy_domain(seed: int = 0, n_train: int = 60, n_test: int = 30, shuffle_test: bool = False,
               num_classes: int = 10, name: str = "toy") -> Domain:
    """Random 16x16 RGB images, labels cycling through ``num_classes`` classes (test labels
    shuffled on request)."""
    from ntp_ssl.data import Domain

    rng = np.random.default_rng(seed)
    test_labels = np.arange(n_test) % num_classes
    if shuffle_test:
        test_labels = np.random.default_rng(99).permutation(test_labels)
    return Domain(name=name, train_images=rng.integers(0, 255, (n_train, 16, 16, 3), dtype=np.uint8),
                  train_labels=np.arange(n_train) % num_classes,
                  test_images=rng.integers(0, 255, (n_test, 16, 16, 3), dtype=np.uint8),
                  test_labels=test_labels, num_classes=num_classes)
