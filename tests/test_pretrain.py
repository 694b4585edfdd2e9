"""Pretraining: resume after an interruption, determinism, and two-process DDP on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import TINY_DATA, TINY_PRETRAIN
from ntp_ssl.cli import config_dir
from ntp_ssl.config import register_schemas


def compose_pretrain(cache_dir: Path, *overrides: str):
    register_schemas()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="pretrain",
                       overrides=[*TINY_DATA, *TINY_PRETRAIN, f"paths.cache_dir={cache_dir}",
                                  "trainer.projector=false", *overrides])


def _history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "encoder.json").read_text())["history"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, cache_dir, monkeypatch, method):
    from ntp_ssl.pretrain import stage

    cfg = compose_pretrain(cache_dir, "optim.epochs=3", f"method.name={method}", "method.memory_bank_size=128")
    reference = tmp_path / "reference"
    stage.run_pretrain(cfg, reference)

    real_epoch = stage.train_one_epoch
    calls = {"n": 0}

    def crashing_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # die in the middle of the second epoch
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(stage, "train_one_epoch", crashing_epoch)
    with pytest.raises(KeyboardInterrupt):
        stage.run_pretrain(cfg, interrupted)
    assert (interrupted / "last.safetensors").exists() and not (interrupted / "encoder.safetensors").exists()
    monkeypatch.setattr(stage, "train_one_epoch", real_epoch)
    stage.run_pretrain(cfg, interrupted)

    resumed, uninterrupted = _history(interrupted), _history(reference)
    assert [h["epoch"] for h in resumed] == [1, 2, 3]
    for a, b in zip(resumed, uninterrupted):  # same seed, same machine: the same numbers
        assert a["loss"] == b["loss"]
        assert a.get("knn_top1_k20") == b.get("knn_top1_k20")
    from ntp_ssl.shared.checkpoint import load_checkpoint

    state_a, _ = load_checkpoint(interrupted / "encoder.safetensors")
    state_b, _ = load_checkpoint(reference / "encoder.safetensors")
    assert state_a.keys() == state_b.keys()
    assert all(bool((state_a[k] == state_b[k]).all()) for k in state_a)


@pytest.mark.slow
def test_same_seed_same_numbers_other_seed_differs(tmp_path, cache_dir):
    from ntp_ssl.pretrain.stage import run_pretrain

    cfg = compose_pretrain(cache_dir, "optim.epochs=1")
    a = run_pretrain(cfg, tmp_path / "a")["metrics"]
    b = run_pretrain(cfg, tmp_path / "b")["metrics"]
    run_pretrain(compose_pretrain(cache_dir, "optim.epochs=1", "seed=1"), tmp_path / "c")
    assert a == b
    assert _history(tmp_path / "a")[0]["loss"] != _history(tmp_path / "c")[0]["loss"]


def test_resume_from_a_corrupted_last_checkpoint_is_a_clear_error(tmp_path, cache_dir):
    from ntp_ssl.errors import CheckpointError
    from ntp_ssl.pretrain.stage import run_pretrain

    cfg = compose_pretrain(cache_dir, "optim.epochs=1")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.safetensors").write_bytes(b"not a checkpoint")
    (run_dir / "last.json").write_text('{"sha256": "0"}')
    with pytest.raises(CheckpointError, match="cannot resume"):
        run_pretrain(cfg, run_dir)


def test_resume_from_a_run_with_other_optimiser_settings_is_refused(tmp_path, cache_dir):
    from ntp_ssl.errors import CheckpointError
    from ntp_ssl.pretrain.stage import run_pretrain
    from ntp_ssl.shared.checkpoint import load_training_state, save_training_state

    run_pretrain(compose_pretrain(cache_dir, "optim.epochs=1", "optim.lr=0.1"), tmp_path / "a")
    last = tmp_path / "a" / "last.safetensors"
    for override, diff in (("optim.lr=0.01", "optim.lr: 0.1 -> 0.01"), ("optim.name=adam", "optim.name: 'sgd' -> 'adam'")):
        cfg = compose_pretrain(cache_dir, "optim.epochs=1", "optim.lr=0.1", override, f"resume_from={last}")
        with pytest.raises(CheckpointError, match=f"other optimiser settings \\({diff}"):
            run_pretrain(cfg, tmp_path / override)
    state, meta = load_training_state(last)  # a state saved before the settings were recorded
    legacy = save_training_state(tmp_path / "legacy" / "last", state, {k: v for k, v in meta.items()
                                                                        if k in ("stage", "backbone", "method")})
    cfg = compose_pretrain(cache_dir, "optim.epochs=1", "optim.name=adam", f"resume_from={legacy}")
    with pytest.raises(CheckpointError, match="another optimiser"):  # used to crash with KeyError: 'step'
        run_pretrain(cfg, tmp_path / "adam")


def test_a_finished_run_whose_encoder_is_damaged_is_redone_not_reported(tmp_path, cache_dir, caplog):
    import logging

    from ntp_ssl.pretrain.stage import run_pretrain
    from ntp_ssl.shared.checkpoint import load_checkpoint, sha256_file

    cfg = compose_pretrain(cache_dir, "optim.epochs=1")
    first = run_pretrain(cfg, tmp_path / "run")
    encoder = Path(first["checkpoint"])
    digest = sha256_file(encoder)
    encoder.write_bytes(encoder.read_bytes()[:1000])  # truncated
    with caplog.at_level(logging.WARNING):
        again = run_pretrain(cfg, tmp_path / "run")
    assert "set aside" in caplog.text and "already finished" not in caplog.text
    assert sha256_file(Path(again["checkpoint"])) == digest  # made again, the same weights
    load_checkpoint(again["checkpoint"])
    assert len(list((tmp_path / "run").glob("encoder.safetensors.damaged-*"))) == 1


TORCHRUN = Path(sys.executable).parent / "torchrun"
NO_TORCHRUN = pytest.mark.skipif(shutil.which("torchrun", path=str(TORCHRUN.parent)) is None, reason="no torchrun")


def _ddp_pretrain(cache_dir: Path, *overrides: str) -> tuple[list[str], dict]:
    """The command and environment of a tiny two-process pretraining on CPU (run_name=ddp)."""
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "ntp_ssl.cli", "pretrain", *TINY_DATA,
           "optim.batch_size=64", "method.hidden_dim=64", "method.projection_dim=32",
           "trainer.projector=false", "trainer.threads=1", "run_name=ddp", *overrides]
    return cmd, {**os.environ, "NTP_SSL_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@NO_TORCHRUN
def test_two_process_ddp_on_cpu(tmp_path, cache_dir):
    cmd, env = _ddp_pretrain(cache_dir, "optim.epochs=1")
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    run_dir = tmp_path / "runs" / "pretrain" / "ddp"
    meta = json.loads((run_dir / "encoder.json").read_text())
    # 300 images, global batch 64 split over 2 processes: 4 steps of 32 per process.
    assert meta["history"][0]["epoch"] == 1
    assert "process(es)" in result.stdout + result.stderr and "2 process(es)" in (result.stdout + result.stderr)


def test_resume_from_a_missing_path_is_a_clear_error(tmp_path, cache_dir):
    from ntp_ssl.errors import CheckpointError
    from ntp_ssl.pretrain.stage import run_pretrain

    cfg = compose_pretrain(cache_dir, "optim.epochs=1", f"resume_from={tmp_path / 'nowhere'}")
    with pytest.raises(CheckpointError, match="resume_from=.*does not exist"):
        run_pretrain(cfg, tmp_path / "run")


def test_resume_from_a_run_of_another_backbone_is_refused(tmp_path, cache_dir):
    import torch

    from ntp_ssl.shared.checkpoint import save_training_state
    from ntp_ssl.errors import CheckpointError
    from ntp_ssl.pretrain.stage import run_pretrain

    other = save_training_state(tmp_path / "other" / "last", {"model": {"w": torch.zeros(1)}},
                                {"stage": "pretrain", "backbone": "resnet18", "method": "simclr"})
    cfg = compose_pretrain(cache_dir, "optim.epochs=1", f"resume_from={other}")
    with pytest.raises(CheckpointError, match="holds a resnet18/simclr run, not small_cnn/simclr"):
        run_pretrain(cfg, tmp_path / "run")


def test_a_crafted_resume_state_is_one_line(tmp_path, cache_dir):
    """A self-consistent file (its hashes recomputed) whose state does not fit the run."""
    from ntp_ssl.errors import CheckpointError
    from ntp_ssl.pretrain.stage import run_pretrain
    from ntp_ssl.shared.checkpoint import load_training_state, save_training_state

    run_pretrain(compose_pretrain(cache_dir, "optim.epochs=1"), tmp_path / "a")
    state, meta = load_training_state(tmp_path / "a" / "last.safetensors")
    for key, value in (("epoch", 1_000_000), ("epoch", "one"), ("history", None), ("scheduler", {"x": 1})):
        crafted = save_training_state(tmp_path / key / "last", {**state, key: value},
                                      {k: v for k, v in meta.items() if k in ("stage", "backbone", "method", "optim")})
        cfg = compose_pretrain(cache_dir, "optim.epochs=1", f"resume_from={crafted}")
        with pytest.raises(CheckpointError, match="its state does not fit this run") as info:
            run_pretrain(cfg, tmp_path / f"run-{key}-{value}")
        assert "\n" not in str(info.value)


def test_a_batch_that_does_not_split_over_the_processes_is_refused(cache_dir, monkeypatch):
    """Each process takes batch_size // processes images a step: 64 over 3 would train on 63 a
    step and run past the schedule's total_steps."""
    import torch
    from types import SimpleNamespace

    from ntp_ssl.errors import ConfigError
    from ntp_ssl.pretrain import stage

    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = compose_pretrain(cache_dir, "optim.epochs=1", "optim.batch_size=64")
    with pytest.raises(ConfigError, match="optim.batch_size=64 does not split evenly over 3 processes"):
        stage._build_run(cfg, SimpleNamespace(device=torch.device("cpu")), lambda event: None)


def test_each_process_seeds_its_own_loader_workers(cache_dir, monkeypatch):
    """The loader's generator seeds its workers' augmentations: under DDP the processes must not
    share it (they would draw the same crops), and process 0 keeps the single-process seed."""
    import torch
    from types import SimpleNamespace

    from ntp_ssl.pretrain import stage

    class Stop(Exception):
        pass

    seeds = {}

    def first_loader(loss_module, method, loader, *args, **kwargs):
        seeds[current["rank"]] = loader.generator.initial_seed()
        raise Stop

    monkeypatch.setattr(stage, "train_one_epoch", first_loader)
    cfg = compose_pretrain(cache_dir, "optim.epochs=1", "optim.batch_size=64")
    run = stage._build_run(cfg, SimpleNamespace(device=torch.device("cpu"), writer=None), lambda event: None)
    current = {}
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        current["rank"] = (rank, world)
        run.rank, run.world = rank, world
        with pytest.raises(Stop):
            stage._run_epoch(run, None, epoch=0)
    assert seeds[(0, 2)] == seeds[(0, 1)]
    assert seeds[(1, 2)] != seeds[(0, 2)]


def test_a_resume_restores_the_loss_scale_of_mixed_precision(tmp_path, cache_dir, monkeypatch):
    """A float16 run's GradScaler has grown or halved its scale by the time it saves: a resume
    that started again from the initial scale would skip other steps than the saved run. (CUDA
    only in use; a CPU scaler stands in for it here.)"""
    import torch

    from ntp_ssl.pretrain import stage

    real_build, real_resume = stage._build_run, stage._resume
    scales = []

    def with_a_scaler(*args, **kwargs):
        run = real_build(*args, **kwargs)
        run.scaler = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=1)  # doubles every clean step
        return run

    def recording(run, path):
        real_resume(run, path)
        scales.append(run.scaler.get_scale())

    monkeypatch.setattr(stage, "_build_run", with_a_scaler)
    monkeypatch.setattr(stage, "_resume", recording)
    stage.run_pretrain(compose_pretrain(cache_dir, "optim.epochs=1"), tmp_path / "saved")
    state, _ = stage.load_training_state(tmp_path / "saved" / "last.safetensors")
    steps = int(state["global_step"])
    assert steps > 0 and state["scaler"]["scale"] == 16.0 * 2 ** steps
    stage.run_pretrain(compose_pretrain(cache_dir, "optim.epochs=1",
                                        f"resume_from={tmp_path / 'saved' / 'last.safetensors'}"), tmp_path / "resumed")
    assert scales == [16.0 * 2 ** steps]


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux /proc), children first found first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
@NO_TORCHRUN
def test_two_process_ddp_killed_and_resumed_ends_like_an_uninterrupted_run(tmp_path, cache_dir):
    """Each process's random stream (its augmentations) is saved and restored: a resumed
    process 1 drawing from process 0's stream would leave the uninterrupted run's path."""
    import signal
    import time

    from conftest import assert_same_tensors

    cmd, env = _ddp_pretrain(cache_dir, "optim.epochs=3", "trainer.eval_every=3")
    reference, work = tmp_path / "reference", tmp_path / "killed"
    for folder in (reference, work):
        folder.mkdir()
    result = subprocess.run(cmd, cwd=reference, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    run_dir = work / "runs" / "pretrain" / "ddp"
    with open(work / "killed.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=log, start_new_session=True)
        start = time.monotonic()
        while proc.poll() is None and not (run_dir / "last.json").exists():
            assert time.monotonic() - start < 600, "no resume point in 600 s"
            time.sleep(0.01)
        killed = proc.poll() is None
        if killed:  # the whole job, as a lost machine would end it: torchrun starts its workers
            for pid in [*_descendants(proc.pid), proc.pid]:  # in sessions of their own
                os.kill(pid, signal.SIGKILL)
        proc.wait(60)
    assert killed, "the run finished before it could be killed"
    assert not (run_dir / "encoder.json").exists()
    result = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "resuming from" in result.stdout + result.stderr
    assert_same_tensors(reference / "runs" / "pretrain" / "ddp" / "encoder.safetensors",
                        run_dir / "encoder.safetensors")
