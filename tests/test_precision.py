"""The attacker's arithmetic (``sweep.precision``): bfloat16 autocast on the CPU, its
resolution from ``auto``, and its place in the protocol (scratch cache key, old runs)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import toy_domain as _domain

from ntp_ssl.config import SWEEP_PRESETS, SweepConfig
from ntp_ssl.encoders import build_encoder
from ntp_ssl.evaluate.attack import attack_precision, fine_tune_attack
from ntp_ssl.evaluate.sweep import _tensors
from ntp_ssl.shared import machine
from ntp_ssl.shared.train import (autocast_context, classifier_accuracy, fit_classifier, precision_warning,
                                  resolve_precision)

TINY = SweepConfig(fractions=[1.0], seeds=[0], attacks=["finetune_dense"], epochs=2, min_steps=3, max_steps=6,
                   lr_grid=[1e-3, 3e-3], search_min_n=20, batch_size=16)


def _dtype_inside(precision: str, device: str = "cpu") -> torch.dtype:
    with autocast_context(device, precision):
        return nn.Linear(4, 2)(torch.ones(1, 4)).dtype


def test_autocast_is_bfloat16_on_the_cpu_only_for_bf16_mixed():
    assert _dtype_inside("bf16-mixed") == torch.bfloat16
    assert _dtype_inside("32") == torch.float32
    assert _dtype_inside("16-mixed") == torch.float32  # float16 has no fast CPU kernels: float32 there


def test_auto_resolves_by_the_cpus_bfloat16_instructions(monkeypatch):
    for explicit in ("32", "bf16-mixed", "16-mixed"):
        assert resolve_precision(explicit, "cpu") == explicit
    monkeypatch.setattr(machine, "native_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(machine, "native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "32"
    assert attack_precision(dataclasses.replace(TINY, precision="auto"), "cpu") == "32"
    assert attack_precision(TINY, "cpu") == "32"
    # the main job's attacker follows the CPU; `ntp-ssl evaluate`'s reference attacker stays float32
    main_job, converged = SweepConfig(**SWEEP_PRESETS["main_job"]), SweepConfig(**SWEEP_PRESETS["converged"])
    assert (main_job.precision, main_job.eval_batch_size) == ("auto", 128)
    assert (converged.precision, converged.eval_batch_size) == ("32", 512)


def test_a_precision_the_cpu_cannot_honour_is_named(monkeypatch):
    monkeypatch.setattr(machine, "native_bf16", lambda: False)
    emulated = precision_warning("bf16-mixed", "cpu")
    assert "bf16-mixed" in emulated and "without bfloat16 instructions" in emulated and "32" in emulated
    assert "16-mixed" in precision_warning("16-mixed", "cpu") and "float32" in precision_warning("16-mixed", "cpu")
    assert precision_warning("32", "cpu") is None
    assert precision_warning("auto", "cpu") is None  # resolved before it is checked
    monkeypatch.setattr(machine, "native_bf16", lambda: True)
    assert precision_warning("bf16-mixed", "cpu") is None
    assert precision_warning("16-mixed", "cuda") is None and precision_warning("bf16-mixed", "cuda") is None


def test_the_sweep_warns_when_asked_for_bf16_on_a_cpu_without_it(monkeypatch, caplog):
    from ntp_ssl.evaluate.sweep import run_sweep

    monkeypatch.setattr(machine, "native_bf16", lambda: False)
    settings = dataclasses.replace(TINY, precision="bf16-mixed", attacks=["knn"], scratch=False)
    with caplog.at_level("WARNING", logger="ntp_ssl.evaluate"):
        run_sweep([], [_domain()], settings, progress=False)
    assert any("sweep.precision bf16-mixed on a CPU without bfloat16" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="ntp_ssl.evaluate"):
        run_sweep([], [_domain()], dataclasses.replace(settings, precision="auto"), progress=False)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # auto -> 32 here: nothing to warn of


@pytest.mark.parametrize("flags,expected", [("fpu avx2 avx512f", False), ("avx2 avx512_bf16", True),
                                            ("avx2 amx_tile amx_bf16", True), ("avx2 amx_tile", False)])
def test_native_bf16_reads_the_cpu_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
    assert machine.native_bf16(cpuinfo) is expected


def test_a_bf16_fit_runs_its_forward_in_bfloat16_and_learns_like_float32():
    """Separable toy data: the class is the brightest of ten image regions. Both arithmetics
    learn it; the bfloat16 fit really computes its convolutions in bfloat16."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 10
    images = torch.rand(400, 3, 16, 16, generator=g) * 0.2
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 5)
        images[i, :, row * 8:(row + 1) * 8, col * 3:col * 3 + 3] += 0.8
    accuracies, seen = {}, []
    for precision in ("32", "bf16-mixed"):
        torch.manual_seed(0)
        encoder = build_encoder("small_cnn", in_channels=3, image_size=16)
        head = nn.Linear(encoder.feature_dim, 10)
        hook = encoder.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        fit_classifier(encoder, head, images[:300], labels[:300], steps=60, batch_size=32, lr=3e-3,
                       precision=precision)
        hook.remove()
        accuracies[precision] = classifier_accuracy(encoder, head, images[300:], labels[300:], precision=precision)
        assert all(dtype == (torch.bfloat16 if precision == "bf16-mixed" else torch.float32) for dtype in seen)
        seen.clear()
    assert accuracies["32"] >= 0.9 and accuracies["bf16-mixed"] >= 0.9, accuracies


def test_the_fine_tune_attack_uses_sweep_precision():
    domain = _domain()
    x_train, y_train, x_test, y_test = _tensors(domain)  # as the sweep converts a domain
    seen = []
    torch.manual_seed(0)
    encoder = build_encoder("small_cnn", in_channels=3, image_size=16)
    encoder.register_forward_hook(lambda module, args, out: seen.append(out.dtype))  # copied with the encoder
    fine_tune_attack(encoder, None, x_train, y_train, x_test, y_test, num_classes=10,
                     settings=dataclasses.replace(TINY, precision="bf16-mixed"), seed=0, device="cpu")
    assert seen and set(seen) == {torch.bfloat16}


def test_precision_enters_the_scratch_key_only_when_not_float32():
    from ntp_ssl.evaluate.sweep import scratch_key

    domain = _domain()
    before = scratch_key("small_cnn", domain, {}, fraction=1.0, n=60, seed=0, settings=TINY)
    assert scratch_key("small_cnn", domain, {}, fraction=1.0, n=60, seed=0, settings=TINY, precision="32") == before
    assert scratch_key("small_cnn", domain, {}, fraction=1.0, n=60, seed=0, settings=TINY,
                       precision="bf16-mixed") != before


def test_the_evaluation_batch_enters_the_scratch_key_only_when_not_512():
    from ntp_ssl.evaluate.sweep import scratch_key

    domain = _domain()
    keys = {b: scratch_key("small_cnn", domain, {}, fraction=1.0, n=60, seed=0,
                           settings=dataclasses.replace(TINY, eval_batch_size=b)) for b in (512, 128)}
    assert keys[512] == scratch_key("small_cnn", domain, {}, fraction=1.0, n=60, seed=0, settings=TINY)
    assert keys[128] != keys[512]


def test_the_evaluation_batch_changes_no_choice_on_a_float32_attack():
    """The validation and test forwards in batches of 7 instead of 512: the same accuracies
    up to float rounding, so on this tiny problem the same choices and numbers."""
    domain = _domain()
    x_train, y_train, x_test, y_test = _tensors(domain)  # as the sweep converts a domain
    results = []
    for batch in (512, 7):
        torch.manual_seed(0)
        encoder = build_encoder("small_cnn", in_channels=3, image_size=16)
        results.append(fine_tune_attack(encoder, None, x_train, y_train, x_test, y_test, num_classes=10,
                                        settings=dataclasses.replace(TINY, eval_batch_size=batch), seed=0,
                                        device="cpu"))
    assert (results[0].choice, results[0].best_step, results[0].accuracy) == (
        results[1].choice, results[1].best_step, results[1].accuracy)


def test_scratch_is_cached_apart_per_resolved_precision(tmp_path, monkeypatch):
    """``auto`` resolving to bf16-mixed shares the explicit bf16-mixed entry, not the float32 one."""
    from ntp_ssl.evaluate.sweep import scratch_accuracy

    domain = _domain()
    tensors = _tensors(domain)
    idx = np.arange(60)
    monkeypatch.setattr(machine, "native_bf16", lambda: True)

    def run(precision):
        return scratch_accuracy("small_cnn", domain, {}, tensors, idx, fraction=1.0, seed=0,
                                settings=dataclasses.replace(TINY, precision=precision), cache_dir=tmp_path,
                                device="cpu")[1]

    assert [run("32"), run("bf16-mixed"), run("auto"), run("32")] == [False, False, True, True]
    assert len(list((tmp_path / "scratch").glob("*.json"))) == 2


def test_an_older_run_without_sweep_precision_compares_as_float32(tmp_path):
    from omegaconf import OmegaConf

    from ntp_ssl.errors import ConfigError
    from ntp_ssl.shared.runs import claim_run_dir, release_run_dir, with_legacy_values

    old = {"sweep": {"seeds": [0]}}
    assert with_legacy_values(old) == {"sweep": {"seeds": [0], "precision": "32", "eval_batch_size": 512}}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run_config.json").write_text(json.dumps(old))
    (run_dir / "out.txt").write_text("work")
    current = {"seeds": [0], "precision": "32", "eval_batch_size": 512}
    claim_run_dir(run_dir, OmegaConf.create({"sweep": current}))  # resumes
    release_run_dir(run_dir)
    with pytest.raises(ConfigError, match="sweep.precision: '32' -> 'bf16-mixed'"):
        claim_run_dir(run_dir, OmegaConf.create({"sweep": {**current, "precision": "bf16-mixed"}}))
    release_run_dir(run_dir)
    with pytest.raises(ConfigError, match="sweep.eval_batch_size: 512 -> 128"):
        claim_run_dir(run_dir, OmegaConf.create({"sweep": {**current, "eval_batch_size": 128}}))
    release_run_dir(run_dir)
