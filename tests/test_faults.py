"""Fault injection: `kill -9` at any moment, half-written files, NaN losses, determinism.

The crash tests run the real command. Each one makes an uninterrupted reference run,
then runs the same command again in a second folder, SIGKILLs it at several moments
(a fixed early time, and right after each kind of resume point appears on disk), plants
the debris a crash or a careless user could leave (``.tmp-*`` files, a truncated
checkpoint without its ``.json``, a stale ``.pending`` file), runs the command once more
to the end, and checks that the final artifacts equal the reference: checkpoint tensors
bit for bit, results rows exactly.

Everything is tiny (16x16 images, a few hundred samples, a few steps); the whole file
runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from conftest import SMALL_SEARCH, TINY_DATA, TINY_PRETRAIN, assert_same_tensors, toy_domain
from ntp_ssl.shared.checkpoint import load_checkpoint, load_training_state, pending_path, save_checkpoint, sha256_file
from ntp_ssl.errors import CheckpointError, NumericalError
from test_pretrain import compose_pretrain

EXE = str(Path(sys.executable).parent / "ntp-ssl")

PRETRAIN_ARGS = ["pretrain", *TINY_DATA, *TINY_PRETRAIN, "optim.epochs=3", "trainer.projector=false", "data.targets=[optdigits]",
                 "run_name=crash"]
PROTECT_ARGS = ["protect", *TINY_DATA, *SMALL_SEARCH, "data.targets=[optdigits]", "admm.iterations=2",
                "admm.steps_per_iteration=3", "admm.retrain_steps=3", "admm.batch_size=32", "prune.sparsity=0.8",
                "evaluate=true", "sweep.fractions=[0.05,1.0]", "sweep.seeds=[0]", "sweep.steps=4",
                "sweep.batch_size=16", "run_name=crash"]
EVALUATE_ARGS = ["evaluate", *TINY_DATA, *SMALL_SEARCH, "names=[ssl]", "data.targets=[optdigits]",
                 "sweep.fractions=[0.05,0.2,1.0]", "sweep.seeds=[0,1]", "sweep.steps=4", "sweep.batch_size=16", "run_name=crash"]


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# ----------------------------------------------------------------------------- helpers


def _private_cache(folder: Path, shared: Path) -> Path:
    """A cache of its own (so scratch baselines are computed, not read) sharing the built domains."""
    folder.mkdir(parents=True)
    (shared / "domains").mkdir(parents=True, exist_ok=True)
    (folder / "domains").symlink_to(shared / "domains", target_is_directory=True)
    return folder


def _env(cache: Path) -> dict:
    # One thread: on a small shared machine, OpenMP threads that spin while waiting for a busy
    # core make tiny runs many times slower (and the numbers are the same for every run here).
    return {**os.environ, "NTP_SSL_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1", **ONE_THREAD}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The in-process tests likewise run single-threaded; the previous settings come back after."""
    import faiss

    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


def _run(args: list[str], cwd: Path, cache: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([EXE, *args], cwd=cwd, env=_env(cache), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def _run_and_kill(args: list[str], cwd: Path, cache: Path, when: Callable[[float], bool], *,
                  timeout: float = 300) -> bool:
    """Start the command, SIGKILL it (its whole process group) as soon as ``when(elapsed)`` is true.

    Returns True when it was killed, False when it finished first.
    """
    cwd.mkdir(parents=True, exist_ok=True)
    with open(cwd / "killed-run.log", "ab") as log:
        proc = subprocess.Popen([EXE, *args], cwd=cwd, env=_env(cache), stdout=log, stderr=log,
                                start_new_session=True)
        start = time.monotonic()
        try:
            while proc.poll() is None:
                elapsed = time.monotonic() - start
                if elapsed > timeout:
                    raise AssertionError(f"the command did not reach the kill point in {timeout} s")
                if when(elapsed):
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(30)
                    return True
                time.sleep(0.01)
            assert proc.returncode == 0, (cwd / "killed-run.log").read_text()[-3000:]
            return False
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)


def _exists(path: Path) -> Callable[[float], bool]:
    return lambda _elapsed: path.exists()


def _after(seconds: float) -> Callable[[float], bool]:
    return lambda elapsed: elapsed >= seconds


def _changed(path: Path) -> Callable[[float], bool]:
    """True once ``path`` exists with content other than what it held when this was called."""
    before = path.read_bytes() if path.exists() else None
    return lambda _elapsed: path.exists() and path.read_bytes() != before


def _rows(path: Path) -> list[dict]:
    from ntp_ssl.evaluate.results import read_results

    return read_results(path)


def _plant_debris(run_dir: Path, final_name: str) -> None:
    """What a crash (or a careless copy) could leave: none of it may be trusted by the rerun."""
    (run_dir / f".tmp-{final_name}-crashed1").write_bytes(b"\x00half a file")
    (run_dir / ".tmp-results.csv-crashed2").write_text("model,domain\nbogus,")
    (run_dir / ".tmp-sweep_progress.json-crashed3").write_text('[{"model": "bog')


def _toy_domain(n_train: int = 30, n_test: int = 20):
    return toy_domain(0, n_train, n_test)


def _settings(**values):
    from ntp_ssl.config import SweepConfig

    base = dict(fractions=[1.0], seeds=[0], attacks=["knn"], steps=2, batch_size=8,
                lr_finetune=1e-3, weight_decay=0.0, knn_k=5, scratch=False)
    return SweepConfig(**{**base, **values})


@pytest.fixture(scope="module")
def encoder_checkpoint(tmp_path_factory, cache_dir) -> Path:
    from ntp_ssl.pretrain.stage import run_pretrain

    run_dir = tmp_path_factory.mktemp("faults-encoder")
    cfg = compose_pretrain(cache_dir, "optim.epochs=1", "data.targets=[optdigits]")
    return Path(run_pretrain(cfg, run_dir)["checkpoint"])


# ----------------------------------------------------------------------------- kill -9 through the command


def _reference_run_then_fresh_dirs(stage: str, args: list[str], tmp_path: Path, cache_dir: Path):
    """Run the command undisturbed (with a cache of its own) for reference; return its run directory,
    and the work directory, run directory and fresh private cache for the run that gets killed."""
    reference = tmp_path / "reference"
    _run(args, reference, _private_cache(tmp_path / "cache-ref", cache_dir))
    work = tmp_path / "killed"
    return (reference / "runs" / stage / "crash", work, work / "runs" / stage / "crash",
            _private_cache(tmp_path / "cache-killed", cache_dir))


@pytest.mark.slow
def test_pretrain_killed_at_any_moment_finishes_like_an_uninterrupted_run(tmp_path, cache_dir):
    reference = tmp_path / "reference"
    _run(PRETRAIN_ARGS, reference, cache_dir)
    ref_dir = reference / "runs" / "pretrain" / "crash"

    work = tmp_path / "killed"
    run_dir = work / "runs" / "pretrain" / "crash"
    last = run_dir / "last.safetensors"
    # 1. early, while it starts up or builds its data
    _run_and_kill(PRETRAIN_ARGS, work, cache_dir, _after(2.0))
    # 2. right after the first resume point (epoch 1) is committed
    assert _run_and_kill(PRETRAIN_ARGS, work, cache_dir, _exists(last)), "finished before its first checkpoint"
    state, _ = load_training_state(last)
    assert int(state["epoch"]) >= 1
    # 3. right after the next resume point replaces it
    assert _run_and_kill(PRETRAIN_ARGS, work, cache_dir, _changed(last.with_suffix(".json")))
    assert not (run_dir / "encoder.json").exists()
    # debris: a truncated encoder without its .json, a stale pending file, .tmp-* leftovers
    reference_bytes = (ref_dir / "encoder.safetensors").read_bytes()
    (run_dir / "encoder.safetensors").write_bytes(reference_bytes[: len(reference_bytes) // 3])
    pending = pending_path(last)
    if pending.exists():
        # the kill landed between the .json commit and the rename: this file holds the committed
        # tensors (not debris), and the rerun must roll it forward rather than find it damaged
        assert sha256_file(pending) == json.loads(last.with_suffix(".json").read_text())["sha256"]
    else:
        pending.write_bytes(b"stale pending tensors")
    _plant_debris(run_dir, "encoder.safetensors")

    final = _run(PRETRAIN_ARGS, work, cache_dir)
    assert "resuming from" in final.stdout + final.stderr  # finished epochs were not redone
    assert_same_tensors(ref_dir / "encoder.safetensors", run_dir / "encoder.safetensors")
    ref_meta = json.loads((ref_dir / "encoder.json").read_text())
    meta = json.loads((run_dir / "encoder.json").read_text())
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3]
    for a, b in zip(ref_meta["history"], meta["history"]):
        assert a["loss"] == b["loss"] and a.get("knn_top1_k20") == b.get("knn_top1_k20")
    assert meta["metrics"] == ref_meta["metrics"]


@pytest.mark.slow
def test_protect_with_evaluation_killed_at_any_moment_finishes_like_an_uninterrupted_run(
        tmp_path, cache_dir, encoder_checkpoint):
    args = [*PROTECT_ARGS, f"checkpoint={encoder_checkpoint}"]
    ref_dir, work, run_dir, cache = _reference_run_then_fresh_dirs("protect", args, tmp_path, cache_dir)
    # 1. early: loading, fitting the heads, the first kNN
    _run_and_kill(args, work, cache, _after(3.0))
    # 2. right after the first ADMM iteration's resume point
    assert _run_and_kill(args, work, cache, _exists(run_dir / "protect_state.safetensors"))
    assert not (run_dir / "protected.json").exists()
    # 3. in the SLC sweep, after its first finished grid point
    assert _run_and_kill(args, work, cache, _exists(run_dir / "sweep_progress.json"))
    assert (run_dir / "protected.json").exists() and not (run_dir / "results.csv").exists()
    assert "resuming protection from" in (work / "killed-run.log").read_text()  # ADMM went on, not over
    _plant_debris(run_dir, "protected.safetensors")

    final = _run(args, work, cache)
    output = final.stdout + final.stderr
    assert "already done" in output and "resuming the sweep" in output  # no finished work redone
    assert_same_tensors(ref_dir / "protected.safetensors", run_dir / "protected.safetensors")
    ref_meta = json.loads((ref_dir / "protected.json").read_text())
    meta = json.loads((run_dir / "protected.json").read_text())
    assert meta["metrics"]["knn_after"] == ref_meta["metrics"]["knn_after"]
    assert meta["sparsity"] == ref_meta["sparsity"]
    assert json.loads((run_dir / "sparsity.json").read_text()) == json.loads((ref_dir / "sparsity.json").read_text())
    assert _rows(run_dir / "results.csv") == _rows(ref_dir / "results.csv")
    assert {r["model"] for r in _rows(run_dir / "results.csv")} == {"protected", "unprotected", "scratch",
                                                                     "sparse_scratch"}


@pytest.mark.slow
def test_evaluate_killed_at_any_moment_finishes_like_an_uninterrupted_run(tmp_path, cache_dir, encoder_checkpoint):
    args = [*EVALUATE_ARGS, f"checkpoints=[{encoder_checkpoint}]"]
    ref_dir, work, run_dir, cache = _reference_run_then_fresh_dirs("evaluate", args, tmp_path, cache_dir)
    progress = run_dir / "sweep_progress.json"
    _run_and_kill(args, work, cache, _after(2.5))
    assert _run_and_kill(args, work, cache, _exists(progress))
    done_before = len(json.loads(progress.read_text()))
    assert _run_and_kill(args, work, cache, _changed(progress))
    assert len(json.loads(progress.read_text())) > done_before  # the rerun kept the finished points
    assert not (run_dir / "results.csv").exists()
    _plant_debris(run_dir, "results.csv")
    (cache / "scratch").mkdir(exist_ok=True)
    (cache / "scratch" / ".tmp-0123456789abcdef01234567.json-crashed").write_text('{"accuracy": 0.9')

    final = _run(args, work, cache)
    assert "resuming the sweep" in final.stdout + final.stderr
    assert _rows(run_dir / "results.csv") == _rows(ref_dir / "results.csv")
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads((ref_dir / "summary.json").read_text())


# ----------------------------------------------------------------------------- the commit of one checkpoint


def _crash_on(monkeypatch, module, name: str, when: Callable[..., bool]) -> None:
    real = getattr(module, name)

    def crashing(*args, **kwargs):
        if when(*args, **kwargs):
            raise KeyboardInterrupt("killed here")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, crashing)


@pytest.mark.parametrize("fresh", [False, True], ids=["overwrite", "first-write"])
@pytest.mark.parametrize("step", ["tensors", "commit", "rename"])
def test_a_checkpoint_save_killed_at_any_step_leaves_the_old_or_the_new_one(tmp_path, monkeypatch, step, fresh):
    """save_checkpoint is three steps: tensors to .pending, the .json (commit), the rename.

    A crash between any two leaves a pair that loads (the old one or the new one, verified
    by its hash) or no checkpoint at all, never a pair that fails to load: a resuming stage
    would otherwise stop with an error instead of finishing the job.
    """
    from ntp_ssl.shared import checkpoint as ckpt
    from ntp_ssl import io as ntp_io

    path = tmp_path / "last.safetensors"
    if not fresh:
        save_checkpoint(path, {"w": torch.zeros(4)}, {"epoch": 1})
    if step == "tensors":
        _crash_on(monkeypatch, ntp_io.os, "fsync", lambda *a: True)
    elif step == "commit":
        _crash_on(monkeypatch, ckpt, "atomic_write_json", lambda p, *a: Path(p).suffix == ".json")
    else:
        _crash_on(monkeypatch, ckpt.os, "replace", lambda src, dst: str(src).endswith(".pending"))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": torch.ones(4)}, {"epoch": 2})
    monkeypatch.undo()

    committed = step == "rename"
    if fresh and not committed:
        assert not path.exists()  # no checkpoint: the stage starts that part again
        with pytest.raises(CheckpointError, match="does not exist"):
            load_checkpoint(path)
        return
    tensors, meta = load_checkpoint(path)
    expected = 2 if committed else 1
    assert meta["epoch"] == expected and torch.equal(tensors["w"], torch.full((4,), float(expected - 1)))
    assert path.exists() and not pending_path(path).exists() or not committed
    again, meta_again = load_checkpoint(path)  # the rolled-forward pair is an ordinary pair now
    assert meta_again["epoch"] == expected and torch.equal(again["w"], tensors["w"])


@pytest.mark.parametrize("fresh", [False, True], ids=["overwrite", "first-write"])
@pytest.mark.parametrize("named", ["file", "json", "folder"])
def test_every_stage_finds_a_checkpoint_whose_save_was_killed_after_its_commit(tmp_path, monkeypatch, fresh, named):
    """A save killed between the commit of its .json and the rename of its tensors is the new
    checkpoint. The stages look it up (input digests, the command line's precheck) before they
    load it: the lookup finishes the rename, so they neither call it missing (first write) nor
    hash the old tensors under the new .json (overwrite)."""
    from ntp_ssl.checks import resolve_checkpoint_path
    from ntp_ssl.shared import checkpoint as ckpt
    from ntp_ssl.shared.stage import input_digests

    path = tmp_path / "run" / "encoder.safetensors"
    if not fresh:
        save_checkpoint(path, {"w": torch.zeros(4)}, {"epoch": 1})
    _crash_on(monkeypatch, ckpt.os, "replace", lambda src, dst: str(src).endswith(".pending"))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": torch.ones(4)}, {"epoch": 2})
    monkeypatch.undo()
    committed = json.loads(path.with_suffix(".json").read_text())["sha256"]
    assert pending_path(path).exists() and path.exists() != fresh

    given = {"file": path, "json": path.with_suffix(".json"), "folder": path.parent}[named]
    assert resolve_checkpoint_path(given) == path
    assert not pending_path(path).exists() and sha256_file(path) == committed
    assert input_digests([str(given)], []) == {f"checkpoint {given}": committed}
    tensors, meta = load_checkpoint(given)
    assert meta["epoch"] == 2 and torch.equal(tensors["w"], torch.ones(4))


def test_a_pending_file_the_json_does_not_name_is_left_alone_by_the_lookup(tmp_path):
    from ntp_ssl.checks import resolve_checkpoint_path

    path = tmp_path / "encoder.safetensors"
    pending_path(path).write_bytes(b"tensors of a save killed before its commit")
    save_json = path.with_suffix(".json")
    save_json.write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint_path(path)
    assert pending_path(path).read_bytes() == b"tensors of a save killed before its commit" and not path.exists()


def test_a_committed_save_in_a_read_only_folder_is_one_clear_error(tmp_path, monkeypatch):
    """The lookup cannot finish the rename there (simulated: the tests may run as root): it says
    which file to rename rather than calling the checkpoint missing or damaged."""
    from ntp_ssl import io as ntp_io
    from ntp_ssl.checks import resolve_checkpoint_path
    from ntp_ssl.shared import checkpoint as ckpt

    path = tmp_path / "encoder.safetensors"
    _crash_on(monkeypatch, ckpt.os, "replace", lambda src, dst: str(src).endswith(".pending"))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": torch.ones(2)}, {"epoch": 1})
    monkeypatch.undo()

    def read_only(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ntp_io.os, "replace", read_only)
    with pytest.raises(CheckpointError, match="read-only; rename encoder.safetensors.pending to encoder.safetensors"):
        resolve_checkpoint_path(path)
    assert pending_path(path).exists() and not path.exists()


def test_a_stale_pending_file_is_never_trusted(tmp_path):
    path = save_checkpoint(tmp_path / "encoder", {"w": torch.arange(3.0)}, {"epoch": 1})
    pending_path(path).write_bytes(b"garbage from a crashed save")
    tensors, meta = load_checkpoint(path)
    assert meta["epoch"] == 1 and torch.equal(tensors["w"], torch.arange(3.0))
    path.write_bytes(path.read_bytes()[:-4])  # now the real file is damaged too: refused, not replaced
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


def test_checkpoint_files_get_the_usual_permissions(tmp_path):
    path = save_checkpoint(tmp_path / "encoder", {"w": torch.zeros(2)}, {})
    assert (path.stat().st_mode & 0o777) == (path.with_suffix(".json").stat().st_mode & 0o777)


def test_a_truncated_scratch_cache_entry_is_recomputed_not_trusted(tmp_path):
    from ntp_ssl.evaluate import sweep

    domain = _toy_domain(40, 20)
    settings = _settings(attacks=("linear",), scratch=True)
    tensors = sweep._tensors(domain)
    idx = np.arange(20)
    fresh, cached = sweep.scratch_accuracy("small_cnn", domain, {}, tensors, idx, fraction=0.5, seed=0,
                                           settings=settings, cache_dir=None, device="cpu")
    key = sweep.scratch_key("small_cnn", domain, {}, fraction=0.5, n=20, seed=0, settings=settings)
    entry = tmp_path / "scratch" / f"{key}.json"
    entry.parent.mkdir()
    entry.write_text('{"accuracy": 0.9')  # half of an entry
    acc, was_cached = sweep.scratch_accuracy("small_cnn", domain, {}, tensors, idx, fraction=0.5, seed=0,
                                             settings=settings, cache_dir=tmp_path, device="cpu")
    assert (acc, was_cached) == (fresh, False)
    assert json.loads(entry.read_text())["result"]["accuracy"] == fresh.accuracy  # rewritten whole


def test_a_corrupted_sweep_progress_file_is_not_a_traceback(tmp_path):
    """sweep_progress.json is only ever written atomically, so a crash cannot damage it; a disk
    or a user can. Then the sweep should start over (it is a cache of finished work) or stop
    with a one-line error, not with a JSONDecodeError traceback."""
    from ntp_ssl.encoders import build_encoder
    from ntp_ssl.errors import NtpSslError
    from ntp_ssl.evaluate import sweep

    domain = _toy_domain()
    settings = _settings()
    progress = tmp_path / "sweep_progress.json"
    model = sweep.ModelUnderTest("m", build_encoder("small_cnn", image_size=16), "small_cnn")
    for damaged in ('[{"model": "m", "dom', '{"rows": 1}', '[1, 2]', '[{"model": "m"}]', '[{"model": "m", "domain": "x", '
                    '"attack": "linear", "seed": "zero", "fraction": 0.5, "n": 4, "accuracy": 0.5}]'):
        progress.write_text(damaged)  # truncated, the wrong shape, rows that are not result rows
        try:
            rows = sweep.run_sweep([model], [domain], settings, progress_path=progress, progress=False)
        except NtpSslError as exc:
            assert "sweep_progress.json" in str(exc) and "\n" not in str(exc)
        else:
            assert len(rows) == 1 and json.loads(progress.read_text()) == rows


# ----------------------------------------------------------------------------- NaN and infinite losses


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_pretrain_nan_loss_is_one_clear_line(cli):
    line = _one_error_line(cli("pretrain", *TINY_DATA, *TINY_PRETRAIN, "trainer.projector=false", "optim.lr=1e30",
                               "run_name=nan", env_extra=ONE_THREAD))
    assert "pretrain" in line and "SimCLR loss" in line and "at step" in line
    assert "nan" in line.lower() or "inf" in line.lower()
    assert "lower learning rate" in line


def test_pretrain_nan_in_a_later_epoch_keeps_the_last_good_checkpoint(tmp_path, cache_dir, monkeypatch):
    from ntp_ssl.pretrain import stage

    cfg = compose_pretrain(cache_dir, "optim.epochs=3", "data.targets=[optdigits]")
    real_forward = stage._LossModule.forward
    calls = {"n": 0}

    def forward(self, views, labels):
        calls["n"] += 1
        loss = real_forward(self, views, labels)
        return loss * float("nan") if calls["n"] == 6 else loss  # 300 images / 64: 4 steps an epoch

    monkeypatch.setattr(stage._LossModule, "forward", forward)
    with pytest.raises(NumericalError) as info:
        stage.run_pretrain(cfg, tmp_path / "run")
    message = str(info.value)
    assert "at step 5" in message and "SimCLR loss" in message and "\n" not in message
    assert "lower learning rate" in message
    state, _ = load_training_state(tmp_path / "run" / "last.safetensors")  # still loads, hash checked
    assert int(state["epoch"]) == 1 and int(state["global_step"]) == 4
    assert not (tmp_path / "run" / "encoder.safetensors").exists()


@pytest.mark.slow
def test_protect_nan_loss_is_one_clear_line(cli, encoder_checkpoint):
    line = _one_error_line(cli("protect", *TINY_DATA, f"checkpoint={encoder_checkpoint}", "data.targets=[optdigits]",
                               "admm.iterations=1", "admm.steps_per_iteration=3", "admm.retrain_steps=1",
                               "evaluate=false", "admm.lr=1e30", "run_name=nan",
                               env_extra=ONE_THREAD))
    assert "protect" in line and "non-transferable loss" in line and "at step" in line
    assert "lower learning rate" in line and "lower weight on that loss term" in line


@pytest.mark.slow
def test_protect_nan_in_a_later_iteration_keeps_the_last_good_state(tmp_path, cache_dir, encoder_checkpoint,
                                                                      monkeypatch):
    from ntp_ssl.pipeline import run_main_job
    from ntp_ssl.protect.objective import NonTransferableObjective

    cfg = _compose_protect(cache_dir, encoder_checkpoint, "evaluate=false")
    real_call = NonTransferableObjective.__call__
    calls = {"n": 0}

    def call(self, *args, **kwargs):
        calls["n"] += 1
        loss, terms = real_call(self, *args, **kwargs)
        return (loss * float("inf") if calls["n"] == 5 else loss), terms  # 3 steps an iteration: iteration 2

    monkeypatch.setattr(NonTransferableObjective, "__call__", call)
    with pytest.raises(NumericalError) as info:
        run_main_job(cfg, tmp_path / "run")
    assert "at step 4" in str(info.value) and "non-transferable loss" in str(info.value)
    state, _ = load_training_state(tmp_path / "run" / "protect_state.safetensors")
    assert int(state["iteration"]) == 1 and state["phase"] == "admm"
    assert not (tmp_path / "run" / "protected.safetensors").exists()


def test_evaluate_nan_loss_names_the_attack(tmp_path):
    from ntp_ssl.encoders import build_encoder
    from ntp_ssl.evaluate import sweep

    domain = _toy_domain()
    settings = _settings(attacks=("finetune_dense",), steps=3, lr_finetune=1e30)
    model = sweep.ModelUnderTest("m", build_encoder("small_cnn", image_size=16), "small_cnn")
    with pytest.raises(NumericalError) as info:
        sweep.run_sweep([model], [domain], settings, progress_path=tmp_path / "p.json", progress=False)
    assert "evaluate fine-tune" in str(info.value) and "cross-entropy" in str(info.value)


# ----------------------------------------------------------------------------- protect: the export window


def _compose_protect(cache_dir: Path, checkpoint: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from ntp_ssl.cli import config_dir
    from ntp_ssl.config import register_schemas

    register_schemas()
    keys = {o.split("=", 1)[0] for o in overrides} | {"run_name"}
    args = [a for a in PROTECT_ARGS[1:] if a.split("=", 1)[0] not in keys]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="protect", overrides=[*args, f"checkpoint={checkpoint}",
                                                         f"paths.cache_dir={cache_dir}", *overrides])


@pytest.mark.slow
def test_protect_killed_between_export_and_report_still_writes_the_report(tmp_path, cache_dir, encoder_checkpoint,
                                                                          monkeypatch):
    from ntp_ssl.pipeline import run_main_job
    from ntp_ssl.protect import stage

    cfg = _compose_protect(cache_dir, encoder_checkpoint, "evaluate=false")
    real_files = stage.write_sparsity_files

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed after protected.safetensors, before sparsity.json")

    monkeypatch.setattr(stage, "write_sparsity_files", killed)
    with pytest.raises(KeyboardInterrupt):
        run_main_job(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "protected.json").exists()
    assert not (tmp_path / "run" / "sparsity.json").exists()
    assert "sparsity" in json.loads((tmp_path / "run" / "protected.json").read_text())  # one save, with the report
    monkeypatch.setattr(stage, "write_sparsity_files", real_files)
    run_main_job(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "sparsity.json").read_text()) == json.loads(
        (tmp_path / "run" / "protected.json").read_text())["sparsity"]


# ----------------------------------------------------------------------------- determinism (CPU)


@pytest.mark.slow
def test_protect_with_evaluation_is_deterministic(tmp_path, cache_dir, encoder_checkpoint):
    from ntp_ssl.pipeline import run_main_job

    results = []
    for name in ("a", "b"):
        cache = _private_cache(tmp_path / f"cache-{name}", cache_dir)  # scratch baselines computed twice
        cfg = _compose_protect(cache, encoder_checkpoint)
        results.append(run_main_job(cfg, tmp_path / name))
    assert_same_tensors(tmp_path / "a" / "protected.safetensors", tmp_path / "b" / "protected.safetensors")
    assert results[0]["rows"] == results[1]["rows"]
    assert _rows(tmp_path / "a" / "results.csv") == _rows(tmp_path / "b" / "results.csv")
    assert results[0]["source_accuracy"] == results[1]["source_accuracy"]


@pytest.mark.slow
def test_evaluate_is_deterministic(tmp_path, cache_dir, encoder_checkpoint):
    from hydra import compose, initialize_config_dir

    from ntp_ssl.cli import config_dir
    from ntp_ssl.config import register_schemas
    from ntp_ssl.evaluate.stage import run_evaluate

    register_schemas()
    rows = []
    for name in ("a", "b"):
        cache = _private_cache(tmp_path / f"cache-{name}", cache_dir)
        args = [a for a in EVALUATE_ARGS[1:] if not a.startswith("run_name=")]
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="evaluate", overrides=[*args, f"checkpoints=[{encoder_checkpoint}]",
                                                             f"paths.cache_dir={cache}"])
        rows.append(run_evaluate(cfg, tmp_path / name)["rows"])
    assert rows[0] == rows[1]
    assert {r["model"] for r in rows[0]} == {"ssl", "scratch"}


def test_an_older_run_without_the_layout_option_compares_as_nchw(tmp_path):
    """trainer.channels_last came on by default after runs existed: an older run directory
    (no such key) was made in NCHW, so it resumes with channels_last=false and refuses true."""
    from omegaconf import OmegaConf

    from ntp_ssl.errors import ConfigError
    from ntp_ssl.shared.runs import claim_run_dir, release_run_dir, with_legacy_values, without_legacy_values

    old = {"trainer": {"device": "cpu"}, "admm": {"lr": 0.001}}
    assert with_legacy_values(old) == {"trainer": {"device": "cpu", "channels_last": False}, "admm": {"lr": 0.001}}
    assert old == {"trainer": {"device": "cpu"}, "admm": {"lr": 0.001}}  # a copy: the caller's dict is untouched
    assert with_legacy_values({"admm": {"lr": 0.001}}) == {"admm": {"lr": 0.001}}  # no trainer section, no fill
    assert with_legacy_values({"trainer": {"channels_last": True}}) == {"trainer": {"channels_last": True}}
    assert without_legacy_values({"trainer": {"channels_last": False, "device": "cpu"}}) == {
        "trainer": {"device": "cpu"}}
    assert without_legacy_values({"trainer": {"channels_last": True}}) == {"trainer": {"channels_last": True}}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run_config.json").write_text(json.dumps(old))
    (run_dir / "out.txt").write_text("work")
    with pytest.raises(ConfigError, match="trainer.channels_last: False -> True"):
        claim_run_dir(run_dir, OmegaConf.create({"trainer": {"device": "cpu", "channels_last": True},
                                                 "admm": {"lr": 0.001}}))
    release_run_dir(run_dir)
    assert claim_run_dir(run_dir, OmegaConf.create({"trainer": {"device": "cpu", "channels_last": False},
                                                    "admm": {"lr": 0.001}})) is True
    release_run_dir(run_dir)


def test_an_option_added_later_with_a_null_default_leaves_older_run_directories_resumable(tmp_path):
    from omegaconf import OmegaConf

    from ntp_ssl.errors import ConfigError
    from ntp_ssl.shared.runs import claim_run_dir, release_run_dir, without_new_nulls

    assert without_new_nulls({"a": 1, "new": None, "d": {"x": 2, "y": None}}, {"a": 1, "d": {"x": 2}}) == {
        "a": 1, "d": {"x": 2}}
    assert without_new_nulls({"a": 1, "new": 0}, {"a": 1}) == {"a": 1, "new": 0}  # a set value still differs
    assert without_new_nulls({"a": None}, {"a": 1}) == {"a": None}  # a key the old run had is kept
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run_config.json").write_text(json.dumps({"admm": {"lr": 0.001}}))
    assert claim_run_dir(run_dir, OmegaConf.create({"admm": {"lr": 0.001, "lr_final": None}})) is True
    release_run_dir(run_dir)
    (run_dir / "out.txt").write_text("work")  # the directory holds work: a real difference is refused
    with pytest.raises(ConfigError, match="admm.lr_final: None -> 0.0001"):
        claim_run_dir(run_dir, OmegaConf.create({"admm": {"lr": 0.001, "lr_final": 1e-4}}))
    release_run_dir(run_dir)
