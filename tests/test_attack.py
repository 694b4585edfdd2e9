"""The attacker's protocol: budget, augmentation, validation split, learning-rate choice, and
that no choice ever reads a test split."""

from __future__ import annotations

import copy
import math
import dataclasses

import numpy as np
import pytest
import torch

from conftest import toy_domain as _domain

from ntp_ssl.config import SWEEP_PRESETS, SweepConfig
from ntp_ssl.data import to_float_tensor
from ntp_ssl.data.subsets import stratified_split
from ntp_ssl.encoders import build_encoder
from ntp_ssl.evaluate.attack import budget_steps, can_search, fine_tune_attack, halving_rungs
from ntp_ssl.evaluate.sweep import ModelUnderTest, run_sweep
from ntp_ssl.shared.train import ClassifierFit, classifier_accuracy, fit_classifier, random_shift

TINY = SweepConfig(fractions=[0.5, 1.0], seeds=[0], attacks=["linear", "knn", "finetune_masked", "finetune_dense"],
                   epochs=2, min_steps=3, max_steps=6, lr_grid=[1e-3, 3e-3], search_min_n=20, batch_size=16,
                   probe_l2_grid=[1e-2, 1.0])


def test_budget_is_fixed_steps_or_epochs_within_floor_and_ceiling():
    fixed = SweepConfig(steps=150)
    assert budget_steps(10, fixed) == budget_steps(5000, fixed) == 150
    epochs = SweepConfig(steps=0, epochs=30, min_steps=100, max_steps=600, batch_size=64)
    assert budget_steps(20, epochs) == 100  # 30 epochs of one step each, lifted to the floor
    assert budget_steps(640, epochs) == 300  # 30 epochs x 10 steps
    assert budget_steps(5000, epochs) == 600  # capped
    assert budget_steps(63, epochs) == 100  # one step an epoch: n // min(batch, n)


def test_the_paper_preset_is_the_fixed_step_protocol_without_search():
    paper = SweepConfig(**SWEEP_PRESETS["paper"])
    assert (paper.steps, paper.augment_shift, paper.lr_grid) == (150, 0, [])
    assert not can_search(np.arange(1000) % 10, paper, paper.lr_grid)


def test_search_needs_enough_samples_and_two_of_every_class():
    settings = SweepConfig(search_min_n=20)
    assert can_search(np.arange(40) % 10, settings, [1e-3])
    assert not can_search(np.arange(10) % 10, settings, [1e-3])  # too few
    labels = np.concatenate([np.arange(40) % 9, [9]])  # class 9 has one sample
    assert not can_search(labels, settings, [1e-3])
    assert not can_search(np.arange(40) % 10, settings, [])


def test_random_shift_moves_images_within_the_bound_and_is_seeded():
    images = torch.zeros(8, 1, 12, 12)
    images[:, :, 6, 6] = 1.0  # one bright pixel in the middle
    shifted = random_shift(images, 2, torch.Generator().manual_seed(0))
    again = random_shift(images, 2, torch.Generator().manual_seed(0))
    assert torch.equal(shifted, again) and shifted.shape == images.shape
    for image in shifted:
        row, col = (image[0] == 1.0).nonzero()[0].tolist()
        assert abs(row - 6) <= 2 and abs(col - 6) <= 2
    assert len({tuple((im[0] == 1.0).nonzero()[0].tolist()) for im in shifted}) > 1  # not all the same shift
    assert random_shift(images, 0, torch.Generator()) is images


def test_early_stopping_keeps_the_weights_of_the_best_validation_step():
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 16, 16), torch.arange(64) % 4
    encoder = build_encoder("small_cnn", image_size=16)
    head = torch.nn.Linear(encoder.feature_dim, 4)
    fit = fit_classifier(encoder, head, x, y, steps=12, batch_size=16, lr=1e-2, val=(x[:16], y[:16]), eval_every=3)
    assert fit.best_step in (3, 6, 9, 12) and 0.0 <= fit.val_accuracy <= 1.0
    assert classifier_accuracy(encoder, head, x[:16], y[:16]) == fit.val_accuracy  # the kept weights


def test_fine_tune_attack_reports_its_choice_and_searches_only_when_it_can():
    domain = _domain()
    x, xt = to_float_tensor(domain.train_images), to_float_tensor(domain.test_images)
    y, yt = torch.tensor(domain.train_labels), torch.tensor(domain.test_labels)
    encoder = build_encoder("small_cnn", image_size=16)
    searched = fine_tune_attack(encoder, None, x, y, xt, yt, num_classes=10, settings=TINY, seed=0, device="cpu")
    assert searched.choice in TINY.lr_grid and searched.val_accuracy is not None and searched.best_step is not None
    small = fine_tune_attack(encoder, None, x[:10], y[:10], xt, yt, num_classes=10, settings=TINY, seed=0,
                             device="cpu")
    assert small.choice is None and small.val_accuracy is None and small.steps == TINY.min_steps


def test_no_choice_reads_a_test_split():
    """Shuffle the test labels (and redraw the test images): every chosen learning rate,
    regularisation and early-stopping step stays the same; only test accuracies may move."""
    model = ModelUnderTest("m", build_encoder("small_cnn", image_size=16), "small_cnn")
    torch.manual_seed(0)
    runs = []
    for shuffle in (False, True):
        domain = _domain(shuffle_test=shuffle)
        if shuffle:
            domain = dataclasses.replace(domain, test_images=np.random.default_rng(5).integers(
                0, 255, domain.test_images.shape, dtype=np.uint8))
        runs.append(run_sweep([model], [domain], TINY, progress=False))
    choices = [[(r["model"], r["attack"], r["fraction"], r["choice"], r["val_accuracy"], r["best_step"], r["steps"])
                for r in rows] for rows in runs]
    assert choices[0] == choices[1]
    assert any(c[3] is not None for c in choices[0])  # something was chosen (lr or l2)


def _toy_fit(lr: float = 1e-2, **kwargs) -> ClassifierFit:
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 16, 16), torch.arange(64) % 4
    encoder = build_encoder("small_cnn", image_size=16)
    head = torch.nn.Linear(encoder.feature_dim, 4)
    options = {"steps": 12, "batch_size": 16, "val": (x[:16], y[:16]), "eval_every": 3, "augment_shift": 1, **kwargs}
    return ClassifierFit(encoder, head, x, y, lr=lr, **options)


def _weights(fit: ClassifierFit) -> list[torch.Tensor]:
    return [t.detach().clone() for m in (fit.encoder, fit.head) for t in m.state_dict().values()]


def test_a_fit_in_pieces_and_fits_in_turns_give_the_numbers_of_one_fit_at_once():
    whole = _toy_fit()
    whole_result = whole.advance(12).finish()
    pieces = _toy_fit()
    for stop in (2, 5, 5, 9, 100):  # any cut, repeated or past the end
        pieces.advance(stop)
    assert pieces.step == 12 and pieces.done
    assert pieces.finish() == whole_result
    assert all(torch.equal(a, b) for a, b in zip(_weights(pieces), _weights(whole)))
    # two learning rates advancing in turns (successive halving) against each alone
    alone = {lr: _toy_fit(lr) for lr in (1e-2, 3e-3)}
    for fit in alone.values():
        fit.advance(12)
    turns = {lr: _toy_fit(lr) for lr in (1e-2, 3e-3)}
    for stop in (3, 6, 12):
        for fit in turns.values():
            fit.advance(stop)
    for lr in alone:
        assert turns[lr].finish() == alone[lr].finish()
        assert all(torch.equal(a, b) for a, b in zip(_weights(turns[lr]), _weights(alone[lr])))


def test_patience_stops_a_fit_that_stopped_improving():
    frozen = _toy_fit(lr=0.0, patience=1)  # lr 0: validation accuracy never improves after the first check
    frozen.advance(12)
    assert frozen.stopped and frozen.step == 6  # first check sets the best, the second (no gain) stops it
    result = frozen.finish()
    assert result.best_step == 3
    patient = _toy_fit(lr=0.0, patience=5)
    patient.advance(12)
    assert not patient.stopped and patient.step == 12  # fewer checks than the patience


def _reference_rungs(steps: int, eval_every: int, candidates: int, eta: int) -> list[int]:
    """Successive halving spelled out: budgets steps/eta, steps/eta^2, ... while more than one
    candidate would be left to compare, each rounded up to a validation check."""
    if eta < 2 or candidates < 2:
        return [steps]
    budgets, left = [], candidates
    k = 1
    while left > 1:
        budgets.append(steps / eta**k)
        left = -(-left // eta)
        k += 1
    rounded = sorted({min(steps, eval_every * int(np.ceil(b / eval_every))) for b in budgets})
    return [r for r in rounded if r < steps] + [steps]


@pytest.mark.parametrize("steps,eval_every,candidates,eta", [
    (250, 25, 2, 2), (250, 25, 3, 2), (250, 25, 3, 3), (600, 60, 3, 2), (100, 10, 5, 2), (12, 2, 3, 3),
    (7, 1, 2, 2), (250, 25, 1, 2), (250, 25, 3, 0), (5, 5, 4, 2)])
def test_halving_rungs_fall_on_validation_checks(steps, eval_every, candidates, eta):
    rungs = halving_rungs(steps, eval_every, candidates, eta)
    assert rungs == _reference_rungs(steps, eval_every, candidates, eta)
    assert rungs[-1] == steps and rungs == sorted(set(rungs))
    assert all(r % eval_every == 0 for r in rungs[:-1])


def test_successive_halving_keeps_the_best_at_the_rung_and_its_numbers_are_a_full_fit():
    domain = _domain(n_train=80)
    x, xt = to_float_tensor(domain.train_images), to_float_tensor(domain.test_images)
    y, yt = torch.tensor(domain.train_labels), torch.tensor(domain.test_labels)
    encoder = build_encoder("small_cnn", image_size=16)
    settings = dataclasses.replace(TINY, lr_grid=[1e-4, 3e-3, 3e-2], halving=3, min_steps=10, max_steps=10)
    halved = fine_tune_attack(encoder, None, x, y, xt, yt, num_classes=10, settings=settings, seed=0, device="cpu")
    # the slow reference: each learning rate alone, compared at the first rung (ties: the earlier)
    rung = halving_rungs(10, 1, 3, 3)[0]
    fit_idx, val_idx = (torch.as_tensor(i) for i in stratified_split(y.numpy(), settings.val_fraction, seed=0))
    at_rung = []
    for lr in settings.lr_grid:
        torch.manual_seed(0)
        model = copy.deepcopy(encoder)
        head = torch.nn.Linear(model.feature_dim, 10)
        fit = ClassifierFit(model, head, x[fit_idx], y[fit_idx], steps=10, batch_size=settings.batch_size, lr=lr,
                            weight_decay=settings.weight_decay, seed=0, augment_shift=settings.augment_shift,
                            val=(x[val_idx], y[val_idx]), eval_every=1)
        at_rung.append(fit.advance(rung).val_accuracy)
    assert len(set(at_rung)) > 1, at_rung  # the rung decides something
    assert halved.choice == settings.lr_grid[int(np.argmax(at_rung))]
    # the survivor's numbers are those of the full search restricted to it
    alone = fine_tune_attack(encoder, None, x, y, xt, yt, num_classes=10, seed=0, device="cpu",
                             settings=dataclasses.replace(settings, lr_grid=[halved.choice], halving=0))
    assert (halved.accuracy, halved.val_accuracy, halved.best_step, halved.steps) == (
        alone.accuracy, alone.val_accuracy, alone.best_step, alone.steps)


def test_speed_features_enter_the_scratch_key_only_when_on():
    from ntp_ssl.evaluate.sweep import scratch_key

    domain = _domain()
    keys = [scratch_key("small_cnn", domain, {}, fraction=1.0, n=60, seed=0, settings=setting)
            for setting in (TINY, dataclasses.replace(TINY, halving=2), dataclasses.replace(TINY, patience=3))]
    assert len(set(keys)) == 3
    assert scratch_key("small_cnn", domain, {}, fraction=1.0, n=60, seed=0,
                       settings=dataclasses.replace(TINY, halving=0, patience=0)) == keys[0]


def test_channels_last_enters_the_scratch_key_only_when_on():
    """Scratch cached before the layout switch was trained in NCHW: a channels-last run must miss it."""
    from ntp_ssl.encoders.layout import set_channels_last
    from ntp_ssl.evaluate.sweep import scratch_key

    domain = _domain()
    try:
        set_channels_last(False)
        nchw = scratch_key("small_cnn", domain, {}, fraction=1.0, n=60, seed=0, settings=TINY)
    finally:
        set_channels_last(True)
    assert scratch_key("small_cnn", domain, {}, fraction=1.0, n=60, seed=0, settings=TINY) != nchw


def test_the_device_type_enters_the_scratch_key_only_off_the_cpu():
    """Scratch cached by a CPU run keeps its key; a GPU run of the same protocol misses it."""
    from ntp_ssl.evaluate.sweep import scratch_key

    domain = _domain()
    cpu = scratch_key("small_cnn", domain, {}, fraction=1.0, n=60, seed=0, settings=TINY)
    assert scratch_key("small_cnn", domain, {}, fraction=1.0, n=60, seed=0, settings=TINY, device_type="cpu") == cpu
    assert scratch_key("small_cnn", domain, {}, fraction=1.0, n=60, seed=0, settings=TINY, device_type="cuda") != cpu


@pytest.mark.parametrize("key,value", [("val_fraction", 1.0), ("max_steps", 1), ("lr_grid", [0.0]),
                                       ("halving", 1), ("patience", -1)])
def test_bad_protocol_values_are_one_line_errors(key, value):
    from omegaconf import OmegaConf

    from ntp_ssl.config import validate_sweep
    from ntp_ssl.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        validate_sweep(OmegaConf.structured(dataclasses.replace(SweepConfig(), **{key: value})))
    assert f"sweep.{key}" in str(info.value) and "\n" not in str(info.value)


def test_the_probe_head_on_raw_features_gives_the_probes_logits():
    from ntp_ssl.evaluate.probe import fit_logistic_regression, raw_feature_head, standardize

    torch.manual_seed(0)
    features = torch.randn(80, 6) * torch.tensor([1.0, 5.0, 0.1, 2.0, 1.0, 3.0]) + 4.0
    labels = torch.arange(80) % 3
    W, b = fit_logistic_regression(standardize(features)[0], labels, num_classes=3, l2=1e-2)
    weight, bias = raw_feature_head(W, b, features)
    expected = standardize(features)[0] @ W.T + b
    assert torch.allclose(features @ weight.T + bias, expected.float(), atol=1e-4)


def test_lpft_starts_from_the_probe_and_an_unmasked_model_trains_it_once():
    model = ModelUnderTest("m", build_encoder("small_cnn", image_size=16), "small_cnn")
    settings = dataclasses.replace(TINY, attacks=["linear", "lpft_masked", "lpft_dense"], scratch=False)
    rows = run_sweep([model], [_domain()], settings, progress=False)
    by_attack = {(r["attack"], r["fraction"]): r for r in rows}
    for fraction in settings.fractions:
        assert by_attack[("lpft_masked", fraction)] == {**by_attack[("lpft_dense", fraction)], "attack": "lpft_masked"}
    assert {r["attack"] for r in rows} == {"linear", "lpft_masked", "lpft_dense"}


def test_lpft_head_never_sees_the_validation_samples_that_choose_its_rate(monkeypatch):
    """The reported probe is refitted on all n; LP-FT's starting head must be fitted on the
    fine-tune's fit samples alone (the very split attacker_split carves), or its validation
    accuracy is that of samples its head was trained on."""
    from ntp_ssl.evaluate import sweep as sweep_module
    from ntp_ssl.evaluate.attack import attacker_split

    calls = []
    real = sweep_module.linear_probe

    def recording(train_features, y_train, *args, **kwargs):
        calls.append((train_features.clone(), y_train.clone()))
        return real(train_features, y_train, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "linear_probe", recording)
    model = ModelUnderTest("m", build_encoder("small_cnn", image_size=16), "small_cnn")
    settings = dataclasses.replace(TINY, attacks=["linear", "lpft_dense"], scratch=False, seeds=[3])
    run_sweep([model], [_domain()], settings, progress=False)
    assert len(calls) == 2 * len(settings.fractions)  # per point: the reported probe, then LP-FT's head
    for (all_n, labels), (lpft_rows, lpft_labels) in zip(calls[::2], calls[1::2]):
        fit, val = attacker_split(labels.numpy(), settings, 3)
        assert len(val) > 0
        assert torch.equal(lpft_rows, all_n[torch.as_tensor(fit)]) and torch.equal(lpft_labels, labels[fit])


def test_lpft_alone_fits_one_probe_per_point(monkeypatch):
    """Without the linear attack asked, the all-n probe would be fitted only to be dropped:
    LP-FT alone fits its own head (on the fit part) and nothing else."""
    from ntp_ssl.evaluate import sweep as sweep_module

    fitted = []
    real = sweep_module.linear_probe

    def counting(train_features, *args, **kwargs):
        fitted.append(len(train_features))
        return real(train_features, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "linear_probe", counting)
    model = ModelUnderTest("m", build_encoder("small_cnn", image_size=16), "small_cnn")
    settings = dataclasses.replace(TINY, attacks=["lpft_dense"], scratch=False, seeds=[3])
    rows = run_sweep([model], [_domain()], settings, progress=False)
    assert len(fitted) == len(settings.fractions) and {r["attack"] for r in rows} == {"lpft_dense"}


def test_successive_halving_breaks_ties_by_grid_order_as_the_full_search_does(monkeypatch):
    """Scripted validation scores: at the first rung b leads a; at the second they tie. The
    full search keeps the earlier learning rate of the grid on a tie, so halving must pick a,
    not b (the previous rung's order)."""
    from types import SimpleNamespace

    from ntp_ssl.evaluate import attack as attack_module

    grid = [1e-3, 2e-3, 3e-3, 4e-3]  # a, b, c, d
    steps = 16
    rungs = halving_rungs(steps, max(1, math.ceil(steps / 10)), len(grid), 2)
    assert len(rungs) == 3, rungs
    script = {rungs[0]: [0.8, 0.9, 0.5, 0.4], rungs[1]: [0.7, 0.7, 0.0, 0.0], rungs[2]: [0.7, 0.7, 0.0, 0.0]}

    class ScriptedFit:
        precision, eval_batch_size = "32", 128

        def __init__(self, lr):
            self.index, self.at = grid.index(lr), 0

        def advance(self, rung):
            self.at = rung
            return self

        @property
        def val_accuracy(self):
            return script[self.at][self.index]

        def finish(self):
            return SimpleNamespace(val_accuracy=self.val_accuracy, best_step=self.at)

    monkeypatch.setattr(attack_module, "_start", lambda *args, lr, **kwargs: (None, None, ScriptedFit(lr)))
    monkeypatch.setattr(attack_module, "classifier_accuracy", lambda *args, **kwargs: 0.5)
    settings = dataclasses.replace(TINY, lr_grid=grid, halving=2, min_steps=steps, max_steps=steps)
    y = torch.arange(40) % 4
    x = torch.zeros(40, 3, 16, 16)
    result = fine_tune_attack(None, None, x, y, x[:4], y[:4], num_classes=4, settings=settings, seed=0, device="cpu")
    assert result.choice == grid[0]


@pytest.mark.parametrize("halving", [0, 2])
def test_a_diverging_learning_rate_drops_out_of_the_search(halving, caplog):
    """lr 1e30 turns the loss NaN: that rate leaves the search (a warning) and the others
    compete as if it were not in the grid (with halving, whose rungs depend on the grid's
    size, one of them wins); only a grid that diverges everywhere is an error."""
    from ntp_ssl.errors import NumericalError

    domain = _domain()
    x, xt = to_float_tensor(domain.train_images), to_float_tensor(domain.test_images)
    y, yt = torch.tensor(domain.train_labels), torch.tensor(domain.test_labels)
    encoder = build_encoder("small_cnn", image_size=16)
    settings = dataclasses.replace(TINY, halving=halving)

    def attack(grid):
        return fine_tune_attack(encoder, None, x, y, xt, yt, num_classes=10, seed=0, device="cpu",
                                settings=dataclasses.replace(settings, lr_grid=grid))

    with caplog.at_level("WARNING", logger="ntp_ssl.evaluate"):
        with_diverging = attack([1e30, 1e-3, 3e-3])
    assert "learning rate 1e+30 diverged and drops out" in caplog.text
    if halving:
        assert with_diverging.choice in (1e-3, 3e-3)
    else:
        without = attack([1e-3, 3e-3])
        assert (with_diverging.choice, with_diverging.accuracy, with_diverging.val_accuracy) == (
            without.choice, without.accuracy, without.val_accuracy)
    with pytest.raises(NumericalError, match="every learning rate of sweep.lr_grid diverged: 1e"):
        attack([1e30, 1e31])
