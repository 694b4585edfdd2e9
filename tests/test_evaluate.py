"""The SLC sweep: the real command, the scratch cache, the attacks and their bad inputs."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from ntp_ssl.data import Domain
from ntp_ssl.encoders import build_encoder
from ntp_ssl.errors import ConfigError
from ntp_ssl.evaluate import attack as attack_module
from ntp_ssl.evaluate import sweep as sweep_module
from ntp_ssl.config import SweepConfig
from ntp_ssl.evaluate.sweep import ModelUnderTest, run_sweep, scratch_accuracy
from ntp_ssl.protect.projections import project_topk_per_layer

from conftest import SMALL_SEARCH, event_tags, tensorboard_image_size, toy_domain
from test_protect import encoder_checkpoint  # noqa: F401  (module fixture)

SETTINGS = SweepConfig(fractions=[0.2, 1.0], seeds=[0], attacks=["linear", "knn", "finetune_masked",
                       "finetune_dense"], steps=3, batch_size=16, lr_finetune=1e-3,
                       weight_decay=0.0, knn_k=5)


def _domain(n_train=60, n_test=30, num_classes=10, seed=0, name="toy") -> Domain:
    return toy_domain(seed, n_train, n_test, num_classes=num_classes, name=name)


def _pruned_model(name="protected") -> ModelUnderTest:
    torch.manual_seed(0)
    encoder = build_encoder("small_cnn", image_size=16)
    weights = {k: p for k, p in encoder.named_parameters() if p.dim() == 4}
    projected = project_topk_per_layer({k: p.detach() for k, p in weights.items()}, 0.9)
    masks = {k: v != 0 for k, v in projected.items()}
    with torch.no_grad():
        for k, p in weights.items():
            p.mul_(masks[k])
    return ModelUnderTest(name, encoder, "small_cnn", masks=masks)


def test_mask_kept_attack_keeps_zeros_and_dense_attack_regrows(monkeypatch):
    model = _pruned_model()
    seen = {}

    class Spy(attack_module.ClassifierFit):  # records the pruned weights of every trained copy
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.spy_masked = bool(kwargs.get("masks"))

        def finish(self):
            out = super().finish()
            named = dict(self.encoder.named_parameters())
            seen["masked" if self.spy_masked else "dense"] = sum(int((named[k][~m] != 0).sum())
                                                                 for k, m in model.masks.items())
            return out

    monkeypatch.setattr(attack_module, "ClassifierFit", Spy)
    domain = _domain()
    x = sweep_module._tensors(domain)
    for masks in (model.masks, None):
        sweep_module.fine_tune_attack(model.encoder, masks, x[0], x[1], x[2], x[3], num_classes=10,
                                      settings=SETTINGS, seed=0, device="cpu")
    assert seen["masked"] == 0
    assert seen["dense"] > 0
    # the model under test itself is never changed by an attack
    named = dict(model.encoder.named_parameters())
    assert sum(int((named[k][~m] != 0).sum()) for k, m in model.masks.items()) == 0


def test_scratch_cache_hits_on_second_run_and_misses_when_a_key_changes(tmp_path):
    domain = _domain()
    tensors = sweep_module._tensors(domain)
    idx = np.arange(20)
    kwargs = dict(fraction=0.3, seed=0, cache_dir=tmp_path, device="cpu")
    acc1, cached1 = scratch_accuracy("small_cnn", domain, {}, tensors, idx, settings=SETTINGS, **kwargs)
    acc2, cached2 = scratch_accuracy("small_cnn", domain, {}, tensors, idx, settings=SETTINGS, **kwargs)
    assert (cached1, cached2) == (False, True) and acc1 == acc2
    for changed in (dataclasses.replace(SETTINGS, steps=4), dataclasses.replace(SETTINGS, lr_finetune=1e-2)):
        assert scratch_accuracy("small_cnn", domain, {}, tensors, idx, settings=changed, **kwargs)[1] is False
    assert scratch_accuracy("small_cnn", domain, {}, tensors, idx, settings=SETTINGS,
                            **{**kwargs, "seed": 1})[1] is False
    assert scratch_accuracy("small_cnn", dataclasses.replace(domain, name="other"), {}, tensors, idx,
                            settings=SETTINGS, **kwargs)[1] is False
    assert scratch_accuracy("small_cnn", domain, {"seed": 3}, tensors, idx, settings=SETTINGS, **kwargs)[1] is False
    assert len(list((tmp_path / "scratch").glob("*.json"))) == 6


def test_sweep_rows_resume_and_fallback(tmp_path, caplog):
    models = [_pruned_model(), ModelUnderTest("plain", build_encoder("small_cnn", image_size=16), "small_cnn")]
    progress = tmp_path / "progress.json"
    with caplog.at_level(logging.INFO, logger="ntp_ssl.evaluate"):
        rows = run_sweep(models, [_domain()], SETTINGS, cache_dir=tmp_path, progress_path=progress, progress=False)
    assert "plain has no pruning mask" in caplog.text
    # a log file sees the sweep advance: one line per grid point (the bar is for terminals only)
    points = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sweep point ")]
    assert [m.split(":")[0] for m in points] == ["sweep point 1/2", "sweep point 2/2"]
    assert all(f"{_domain().name} seed 0 n=" in m for m in points)
    # 2 fractions x (scratch + 2 models x 4 attacks)
    assert len(rows) == 2 * (1 + 2 * 4)
    plain = {r["attack"]: r["accuracy"] for r in rows if r["model"] == "plain" and r["fraction"] == 1.0}
    assert plain["finetune_masked"] == plain["finetune_dense"]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["n"] >= 10

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished grid point was recomputed")

    original = sweep_module.fine_tune_attack
    sweep_module.fine_tune_attack = must_not_train
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO, logger="ntp_ssl.evaluate"):
            again = run_sweep(models, [_domain()], SETTINGS, cache_dir=tmp_path, progress_path=progress,
                              progress=False)
    finally:
        sweep_module.fine_tune_attack = original
    assert again == rows
    assert "sweep point" not in caplog.text  # resumed points did no work: nothing to report


def test_same_settings_same_rows(tmp_path):
    models = [_pruned_model()]
    a = run_sweep(models, [_domain()], SETTINGS, cache_dir=None, progress=False)
    b = run_sweep(models, [_domain()], SETTINGS, cache_dir=None, progress=False)
    assert a == b


def test_target_with_fewer_samples_than_classes_is_refused():
    tiny = _domain(n_train=6, n_test=10)
    with pytest.raises(ConfigError, match="fewer than"):
        run_sweep([_pruned_model()], [tiny], SETTINGS, progress=False)


@pytest.mark.slow
def test_evaluate_command_writes_csv_plot_and_events(cli, tmp_path, encoder_checkpoint):  # noqa: F811
    from conftest import TINY_DATA

    result = cli("evaluate", *TINY_DATA, f"checkpoints=[{encoder_checkpoint}]", "names=[ssl]",
                 "data.targets=[optdigits]", "sweep.fractions=[0.05,1.0]", "sweep.seeds=[0,1]", "sweep.steps=3",
                 "sweep.batch_size=16", "sweep.attacks=[linear,knn,finetune_dense]", *SMALL_SEARCH, "run_name=ev")
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "runs" / "evaluate" / "ev"
    lines = (run_dir / "results.csv").read_text().splitlines()
    # header + (target optdigits, source mnist) x seeds x fractions x (scratch + 3 attacks)
    assert len(lines) == 1 + 2 * 2 * 2 * (1 + 3)
    assert lines[0].startswith("model,domain,attack,seed,fraction,n,accuracy,") and "choice" in lines[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["attacker"] == {"precision": "32"}  # the default: float32 fine-tunes
    verdict = summary["verdicts"][0]
    assert verdict["model"] == "ssl" and verdict["source"]["slc_auc"] is not None
    assert set(verdict["target_slc_auc"]) == {"linear", "knn", "finetune_dense", "best"}
    assert (run_dir / "summary.md").read_text().startswith("- ssl: source linear")
    assert (run_dir / "slc_curves.png").stat().st_size > 5000
    machines = json.loads((run_dir / "machine.json").read_text())  # which CPU and torch made these numbers
    assert len(machines) == 1 and machines[0]["torch"] == torch.__version__ and machines[0]["device"] == "cpu"
    # the efficacy benchmark reads back which file the run attacked as "ssl" (to refuse a run of another encoder)
    from conftest import load_benchmark

    attacked_file = load_benchmark("bench_efficacy").attacked_file
    assert attacked_file(run_dir, "ssl") == json.loads(encoder_checkpoint.with_suffix(".json").read_text())["sha256"]
    tags = event_tags(run_dir / "tb")
    assert "slc/optdigits/linear/ssl" in tags and "slc_auc/optdigits/linear/ssl" in tags
    # TensorBoard shows the very figure of slc_curves.png (logged from the file, not drawn twice)
    from PIL import Image

    with Image.open(run_dir / "slc_curves.png") as png:
        assert tensorboard_image_size(run_dir / "tb", "slc_curves") == png.size
    report = cli("report", f"runs=[{run_dir}]", "run_name=rep")
    assert report.returncode == 0, report.stderr[-3000:]
    assert (tmp_path / "runs" / "report" / "rep" / "summary.md").exists()


def test_evaluate_rejects_a_mismatched_image_size(cli, encoder_checkpoint):  # noqa: F811
    result = cli("evaluate", "data.image_size=32", f"checkpoints=[{encoder_checkpoint}]", "trainer.progress=false")
    assert result.returncode == 2
    assert "built for 16x16 images" in result.stderr


def test_sparse_scratch_control_is_the_mask_on_a_random_init():
    from types import SimpleNamespace

    from ntp_ssl.evaluate.stage import sparse_scratch_controls

    model = _pruned_model("pruned")
    plain = ModelUnderTest("dense", build_encoder("small_cnn", image_size=16), "small_cnn")
    cfg = SimpleNamespace(data=SimpleNamespace(channels=3, image_size=16), seed=1)
    state = torch.random.get_rng_state()
    (control,) = sparse_scratch_controls([model, plain], ["pruned"], cfg)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    assert control.name == "pruned-sparse_scratch" and control.attacks == ("finetune_masked",)
    named, original = dict(control.encoder.named_parameters()), dict(model.encoder.named_parameters())
    for key, mask in model.masks.items():
        assert torch.equal(control.masks[key], mask)
        assert not named[key][~mask].any()  # pruned positions are zero
        assert not torch.equal(named[key], original[key])  # kept positions are freshly drawn
    again = sparse_scratch_controls([model], ["pruned"], cfg)[0]
    assert all(torch.equal(a, b) for a, b in zip(control.encoder.parameters(), again.encoder.parameters()))
    with pytest.raises(ConfigError, match="'nope' is not a model name; accepted: pruned, dense"):
        sparse_scratch_controls([model, plain], ["nope"], cfg)
    with pytest.raises(ConfigError, match="'dense' has no pruning mask"):
        sparse_scratch_controls([model, plain], ["dense"], cfg)


def test_scratch_cache_is_keyed_on_content_and_never_trusts_a_bad_entry(tmp_path, caplog):
    domain = _domain()
    tensors = sweep_module._tensors(domain)
    idx = np.arange(20)
    kwargs = dict(fraction=0.3, seed=0, cache_dir=tmp_path, device="cpu", settings=SETTINGS)
    truth, _ = scratch_accuracy("small_cnn", domain, {}, tensors, idx, **kwargs)
    # the same name and size with other pixels (a file replaced under its name) must miss
    noise = dataclasses.replace(domain, train_images=255 - domain.train_images)
    assert scratch_accuracy("small_cnn", noise, {}, sweep_module._tensors(noise), idx, **kwargs)[1] is False
    key = sweep_module.scratch_key("small_cnn", domain, {}, fraction=0.3, n=20, seed=0, settings=SETTINGS)
    entry = tmp_path / "scratch" / f"{key}.json"
    good = entry.read_text()
    edited = json.loads(good)
    edited["result"]["accuracy"] = 1.0  # a hand edit: the checksum no longer matches
    tampered = [json.dumps(edited), b"\xff\xfe not utf-8", "[1, 2]", '{"result": 3}',
                json.dumps({**json.loads(good), "key": "0" * 24})]
    for content in tampered:
        entry.write_bytes(content if isinstance(content, bytes) else content.encode())
        with caplog.at_level(logging.WARNING):
            result, cached = scratch_accuracy("small_cnn", domain, {}, tensors, idx, **kwargs)
        assert (result, cached) == (truth, False)
        assert "is not trusted" in caplog.text
        assert json.loads(entry.read_text()) == json.loads(good)  # rebuilt, the same as before
        caplog.clear()


def test_refilled_encoder_is_scratchs_init_with_the_kept_weights_pasted_in():
    from ntp_ssl.evaluate.sweep import refilled_encoder

    model = _pruned_model("pruned")
    state = torch.random.get_rng_state()
    refilled = refilled_encoder(model, in_channels=3, image_size=16, seed=10_007)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    torch.manual_seed(10_007)  # what train_scratch does before building scratch's encoder
    fresh = dict(build_encoder("small_cnn", image_size=16).named_parameters())
    named, original = dict(refilled.named_parameters()), dict(model.encoder.named_parameters())
    for key, tensor in named.items():
        mask = model.masks.get(key)
        if mask is None:  # biases and batch norm: the model's own
            assert torch.equal(tensor, original[key])
            continue
        assert torch.equal(tensor[mask], original[key][mask])  # kept: the model's
        assert torch.equal(tensor[~mask], fresh[key][~mask])  # pruned: scratch's initial values
        assert tensor[~mask].abs().sum() > 0
    assert not original[next(iter(model.masks))][~model.masks[next(iter(model.masks))]].any()  # model untouched


def test_refill_attack_is_the_dense_fine_tune_when_nothing_is_pruned():
    settings = dataclasses.replace(SETTINGS, attacks=["finetune_dense", "finetune_refill"], scratch=False)
    plain = ModelUnderTest("plain", build_encoder("small_cnn", image_size=16), "small_cnn")
    pruned = _pruned_model("pruned")
    all_kept = ModelUnderTest("all_kept", pruned.encoder, "small_cnn",
                              masks={k: torch.ones_like(m) for k, m in pruned.masks.items()})
    rows = run_sweep([plain, all_kept, pruned], [_domain()], settings, progress=False)
    acc = {(r["model"], r["attack"], r["fraction"]): r["accuracy"] for r in rows}
    for fraction in settings.fractions:
        for name in ("plain", "all_kept"):  # no mask, or a mask that keeps everything: nothing to refill
            assert acc[(name, "finetune_refill", fraction)] == acc[(name, "finetune_dense", fraction)]
        assert ("pruned", "finetune_refill", fraction) in acc
    only_refill = run_sweep([plain], [_domain()], dataclasses.replace(settings, attacks=["finetune_refill"]),
                            progress=False)
    assert [r["accuracy"] for r in only_refill] == [acc[("plain", "finetune_dense", f)] for f in settings.fractions]


def test_refill_is_accepted_but_not_in_the_default_attacks():
    from omegaconf import OmegaConf

    from ntp_ssl.config import validate_sweep

    assert "finetune_refill" not in SweepConfig().attacks
    validate_sweep(OmegaConf.structured(dataclasses.replace(SweepConfig(), attacks=["finetune_refill"])))
    with pytest.raises(ConfigError, match="finetune_refill"):  # the error lists it among the accepted
        validate_sweep(OmegaConf.structured(dataclasses.replace(SweepConfig(), attacks=["refill"])))
