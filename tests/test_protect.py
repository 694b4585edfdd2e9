"""`ntp-ssl protect` end to end on tiny settings, and what its protected checkpoint holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SMALL_SEARCH, TINY_DATA, assert_same_tensors, event_tags
from test_pretrain import compose_pretrain

TINY_PROTECT = [*TINY_DATA, "data.targets=[optdigits,mnistm]", "admm.iterations=2", "admm.steps_per_iteration=3",
                "admm.retrain_steps=3", "admm.batch_size=32", "prune.sparsity=0.8"]
TINY_SWEEP = ["sweep.fractions=[0.05,1.0]", "sweep.seeds=[0]", "sweep.steps=4", "sweep.batch_size=16", *SMALL_SEARCH]


@pytest.fixture(scope="module")
def encoder_checkpoint(tmp_path_factory, cache_dir) -> Path:
    from ntp_ssl.pretrain.stage import run_pretrain

    run_dir = tmp_path_factory.mktemp("pretrained")
    return Path(run_pretrain(compose_pretrain(cache_dir, "optim.epochs=1"), run_dir)["checkpoint"])


def _compose_protect(cache_dir: Path, checkpoint, *overrides: str):
    """The protect config on tiny settings for ``checkpoint``, without the evaluation."""
    from hydra import compose, initialize_config_dir

    from ntp_ssl.cli import config_dir
    from ntp_ssl.config import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="protect", overrides=[*TINY_PROTECT, f"checkpoint={checkpoint}",
                                                         f"paths.cache_dir={cache_dir}", "evaluate=false", *overrides])


def _check_protected_file(path: Path, sparsity: float) -> None:
    from safetensors import safe_open

    from ntp_ssl.shared.checkpoint import load_encoder

    encoder, meta, masks, tensors = load_encoder(path)
    assert meta["kind"] == "protected_encoder" and masks
    named = dict(encoder.named_parameters())
    for name, mask in masks.items():
        assert int((named[name] != 0).sum()) == int(mask.sum()), name  # exactly the mask's nonzeros
        assert int((tensors[f"encoder.{name}"][~mask] != 0).sum()) == 0
    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
    forbidden = ("weight_orig", "Z/", "U/", "optimizer", "exp_avg", "momentum_buffer")
    assert not [k for k in keys if any(f in k for f in forbidden)], keys
    assert all(k.startswith(("encoder.", "projection_head.", "classifier.", "mask.")) for k in keys)
    totals = meta["sparsity"]["prunable"]
    assert abs(totals["sparsity"] - sparsity) < 0.01
    # the release file beside it: the same features from torch and safetensors alone, fewer bytes
    from ntp_ssl.release import load_release

    release = path.with_name("protected.release.safetensors")
    x = torch.randn(4, int(meta["channels"]), int(meta["image_size"]), int(meta["image_size"]))
    with torch.no_grad():
        assert torch.equal(encoder.eval()(x), load_release(release)(x))
    assert release.stat().st_size < path.stat().st_size
    assert (release.stat().st_mode & 0o777) == (path.stat().st_mode & 0o777)  # the usual permissions, not 0600
    assert meta["sparsity"]["files"]["release_bytes"] == release.stat().st_size


@pytest.mark.slow
def test_label_free_protect_then_evaluate_through_the_command(cli, tmp_path, encoder_checkpoint):
    result = cli("protect", *TINY_PROTECT, *TINY_SWEEP, f"checkpoint={encoder_checkpoint}", "run_name=free",
                 "loss=ssl")
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "runs" / "protect" / "free"
    _check_protected_file(run_dir / "protected.safetensors", 0.8)
    diagnostics = json.loads((run_dir / "admm_diagnostics.json").read_text())
    assert len(diagnostics["iterations"]) == 2
    for iteration in diagnostics["iterations"]:
        assert iteration["primal_relative"] > 0 and 0 <= iteration["support_overlap"] <= 1
        assert iteration["lr"] > 0 and iteration["rho"] > iteration["rho_w_step"] > 0  # geometric schedule
    first, second = diagnostics["iterations"]
    assert second["rho_w_step"] == first["rho"]  # the rho set after one iteration runs the next W-step
    assert 0 < diagnostics["hard_prune"]["magnitude_overlap"] <= 1
    assert set(diagnostics["hard_prune"]["knn_before"]) == {"mnist", "optdigits", "mnistm"}
    report = json.loads((run_dir / "sparsity.json").read_text())
    assert {"tensors", "prunable", "model", "files"} <= report.keys()
    assert "total (prunable)" in result.stdout
    tags = event_tags(run_dir / "tb")
    for tag in ("protect/loss/ssl_source", "protect/loss/ssl_target", "protect/loss/mmd", "protect/loss/fisher_pseudo",
                "protect/loss/fisher_source",
                "protect/admm/rho", "protect/admm/primal_total", "protect/admm/dual_total", "protect/z_sparsity",
                "protect/knn_top1/mnist", "protect/knn_top1/optdigits"):
        assert tag in tags, tag
    assert any(t.startswith("slc/optdigits/finetune_masked/protected") for t in tags)
    rows = (run_dir / "results.csv").read_text().splitlines()
    assert rows[0].startswith("model,domain,attack,seed,fraction,n,accuracy")
    models = {line.split(",")[0] for line in rows[1:]}
    assert models == {"protected", "unprotected", "scratch", "sparse_scratch"}
    # the sparse-scratch control (the protected mask on a random init) is attacked mask-kept only
    assert {line.split(",")[2] for line in rows[1:] if line.startswith("sparse_scratch,")} == {"finetune_masked"}
    assert {line.split(",")[1] for line in rows[1:]} == {"optdigits", "mnistm", "mnist"}  # targets and source
    assert (run_dir / "slc_curves.png").stat().st_size > 5000
    assert "SLC-AUC" in (run_dir / "summary.md").read_text()


@pytest.mark.slow
def test_supervised_protect_through_the_command(cli, tmp_path, encoder_checkpoint):
    result = cli("protect", *TINY_PROTECT, f"checkpoint={encoder_checkpoint}", "run_name=sup",
                 "loss=supervised", "loss.head_steps=20", "prune.projection=global", "evaluate=false")
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "runs" / "protect" / "sup"
    _check_protected_file(run_dir / "protected.safetensors", 0.8)
    tags = event_tags(run_dir / "tb")
    assert {"protect/loss/ce_source", "protect/loss/ce_target", "protect/loss/fisher_target"} <= tags
    # A protected checkpoint cannot be protected again by mistake.
    again = cli("protect", *TINY_PROTECT, f"checkpoint={run_dir / 'protected.safetensors'}", "run_name=twice",
                "evaluate=false")
    assert again.returncode == 2 and "already protected" in again.stderr


@pytest.mark.slow
def test_protect_resumes_after_an_interruption(tmp_path, cache_dir, encoder_checkpoint, monkeypatch):
    from ntp_ssl.pipeline import run_main_job
    from ntp_ssl.protect.admm import ADMMPruner

    cfg = _compose_protect(cache_dir, encoder_checkpoint, "admm.iterations=3")
    run_main_job(cfg, tmp_path / "reference")
    real_update = ADMMPruner.update
    calls = {"n": 0}

    def crashing_update(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_update(self)

    monkeypatch.setattr(ADMMPruner, "update", crashing_update)
    with pytest.raises(KeyboardInterrupt):
        run_main_job(cfg, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "protected.safetensors").exists()
    monkeypatch.setattr(ADMMPruner, "update", real_update)
    run_main_job(cfg, tmp_path / "resumed")

    from ntp_ssl.shared.checkpoint import load_checkpoint

    assert_same_tensors(tmp_path / "reference" / "protected.safetensors", tmp_path / "resumed" / "protected.safetensors")
    _, meta_a = load_checkpoint(tmp_path / "reference" / "protected.safetensors")
    _, meta_b = load_checkpoint(tmp_path / "resumed" / "protected.safetensors")
    assert meta_a["metrics"]["knn_after"] == meta_b["metrics"]["knn_after"]


@pytest.mark.slow
def test_a_supervised_checkpoint_is_protected_with_its_own_classifier(tmp_path, cache_dir):
    from ntp_ssl.errors import ConfigError
    from ntp_ssl.pipeline import run_main_job
    from ntp_ssl.pretrain.stage import run_pretrain
    from ntp_ssl.shared.checkpoint import load_checkpoint

    checkpoint = run_pretrain(compose_pretrain(cache_dir, "optim.epochs=1", "method.name=supervised"),
                              tmp_path / "sup")["checkpoint"]
    supervised, label_free = (_compose_protect(cache_dir, checkpoint, f"loss={kind}") for kind in ("supervised", "ssl"))
    result = run_main_job(supervised, tmp_path / "protected")
    tensors, meta = load_checkpoint(result["checkpoint"])
    assert any(k.startswith("classifier.") for k in tensors) and meta["method"] == "supervised"
    # loss=none (the source task alone) trains the checkpoint's classifier with the encoder too
    pretrained, _ = load_checkpoint(checkpoint)
    source_only = run_main_job(_compose_protect(cache_dir, checkpoint, "loss=none"), tmp_path / "none")
    retrained, _ = load_checkpoint(source_only["checkpoint"])
    assert any(not torch.equal(retrained[k], pretrained[k]) for k in retrained if k.startswith("classifier."))
    with pytest.raises(ConfigError, match="loss=ssl needs an encoder with an SSL projection head"):
        run_main_job(label_free, tmp_path / "label_free")


@pytest.mark.slow
def test_protect_gives_the_same_encoder_whether_the_default_encoder_was_cached_or_not(tmp_path):
    """Cold: the run pretrains the default encoder itself; warm: it finds it in the cache. Same numbers."""
    from conftest import run_cli

    cache = tmp_path / "cache"  # an empty cache of its own, so the first run must pretrain
    common = [*TINY_PROTECT, "evaluate=false", "pretrain.optim.epochs=1", "pretrain.optim.batch_size=64",
              "pretrain.method.hidden_dim=64", "pretrain.method.projection_dim=32"]
    tensors = {}
    for name in ("cold", "warm"):
        result = run_cli(["protect", *common, f"run_name={name}"], cwd=tmp_path, cache=cache)
        assert result.returncode == 0, result.stderr[-4000:]
        assert ("already finished" in result.stderr + result.stdout) == (name == "warm")
        from safetensors.torch import load_file

        tensors[name] = load_file(str(tmp_path / "runs" / "protect" / name / "protected.safetensors"))
    assert tensors["cold"].keys() == tensors["warm"].keys()
    for key, value in tensors["cold"].items():
        assert torch.equal(value, tensors["warm"][key]), key


@pytest.mark.slow
def test_protection_never_reads_a_test_split(tmp_path, cache_dir, encoder_checkpoint, monkeypatch):
    """Everything chosen at protect time (pseudo-labels, heads, monitoring) reads train splits
    only: with every test split's labels shuffled and its images replaced by noise, the
    protected weights are the same bit for bit."""
    import dataclasses

    import numpy as np

    from ntp_ssl.pipeline import run_main_job
    from ntp_ssl.protect import stage

    cfg = _compose_protect(cache_dir, encoder_checkpoint)
    run_main_job(cfg, tmp_path / "clean")
    real_load = stage.load_domains_for

    def scrambled(cfg, names):
        rng = np.random.default_rng(7)
        return [dataclasses.replace(d, test_labels=rng.permutation(d.test_labels),
                                    test_images=rng.integers(0, 255, d.test_images.shape, dtype=np.uint8))
                for d in real_load(cfg, names)]

    monkeypatch.setattr(stage, "load_domains_for", scrambled)
    run_main_job(cfg, tmp_path / "scrambled")
    assert_same_tensors(tmp_path / "clean" / "protected.safetensors", tmp_path / "scrambled" / "protected.safetensors")


def test_the_feature_memo_saves_extractions_and_changes_no_weight(tmp_path, cache_dir, encoder_checkpoint,
                                                                  monkeypatch, caplog):
    """The kNN monitor and the pseudo-labels share the encoder's train features while its state
    is unchanged (shared/features.py, TrainFeatures): fewer extractions, and the same protected
    weights, bit for bit, as extracting them every time."""
    import logging

    from ntp_ssl.pipeline import run_main_job
    from ntp_ssl.shared.features import TrainFeatures

    cfg = _compose_protect(cache_dir, encoder_checkpoint)
    caplog.set_level(logging.INFO, logger="ntp_ssl.protect")
    run_main_job(cfg, tmp_path / "memo")
    # 3 domains, 2 ADMM iterations. Extracted: before ADMM, after each iteration (the kNN
    # monitor), after the hard prune, after retraining. Reused: the pseudo-labels at the start
    # of each iteration and of the retraining, and the kNN just before the hard prune.
    assert "train-split features (per domain): 15 extracted, 12 reused" in caplog.text
    monkeypatch.setattr(TrainFeatures, "_unchanged", lambda self, state: False)  # extract every time
    caplog.clear()
    run_main_job(cfg, tmp_path / "always")
    assert "train-split features (per domain): 27 extracted, 0 reused" in caplog.text
    assert_same_tensors(tmp_path / "memo" / "protected.safetensors", tmp_path / "always" / "protected.safetensors")


@pytest.mark.parametrize("loss", ["ssl", "supervised"])
def test_source_distillation_is_a_term_of_both_losses(tmp_path, cache_dir, encoder_checkpoint, loss):
    """loss.w_source_distill > 0 adds mean(1 - cos(f_S, teacher(x_S))) with the teacher frozen at the
    unprotected encoder; a different objective, so other protected weights; reported per iteration."""
    from ntp_ssl.pipeline import run_main_job
    from ntp_ssl.shared.checkpoint import load_checkpoint

    for name, weight in (("plain", 0.0), ("distilled", 5.0)):
        run_main_job(_compose_protect(cache_dir, encoder_checkpoint, f"loss={loss}",
                                      f"loss.w_source_distill={weight}"), tmp_path / name)
    _, meta = load_checkpoint(tmp_path / "distilled" / "protected.safetensors")
    iterations = meta["metrics"]["iterations"]
    assert all(0.0 <= it["distill_source"] <= 2.0 for it in iterations)
    _, plain_meta = load_checkpoint(tmp_path / "plain" / "protected.safetensors")
    assert "distill_source" not in plain_meta["metrics"]["iterations"][0]
    plain, distilled = (load_checkpoint(tmp_path / n / "protected.safetensors")[0] for n in ("plain", "distilled"))
    assert any(not torch.equal(plain[k], distilled[k]) for k in plain if k.startswith("encoder."))


def test_source_relational_distillation_is_a_term_of_protection(tmp_path, cache_dir, encoder_checkpoint):
    """loss.w_source_relational > 0 adds the source batch's pairwise-cosine distance to the frozen
    teacher's, reported per iteration and in the retraining; the feature distillation stays off."""
    from ntp_ssl.pipeline import run_main_job
    from ntp_ssl.shared.checkpoint import load_checkpoint

    run_main_job(_compose_protect(cache_dir, encoder_checkpoint, "loss.w_source_relational=5.0"), tmp_path / "rel")
    _, meta = load_checkpoint(tmp_path / "rel" / "protected.safetensors")
    for record in (*meta["metrics"]["iterations"], meta["metrics"]["retrain"]):
        assert 0.0 <= record["relational_source"] <= 4.0 and "distill_source" not in record
    assert any(it["relational_source"] > 0 for it in meta["metrics"]["iterations"])  # the encoder did move


@pytest.mark.parametrize("loss, source_terms", [("ssl", {"ssl_source"}), ("supervised", {"ce_source"})])
def test_masked_retraining_on_the_source_terms_alone(tmp_path, cache_dir, encoder_checkpoint, loss, source_terms):
    """admm.retrain_loss=source: ADMM unchanged, then the retraining minimises the source term
    (and the distillation) alone, with no target term, so other protected weights."""
    from ntp_ssl.pipeline import run_main_job
    from ntp_ssl.shared.checkpoint import load_checkpoint

    common = (f"loss={loss}", "loss.w_source_distill=1.0")
    run_main_job(_compose_protect(cache_dir, encoder_checkpoint, *common), tmp_path / "nt")
    run_main_job(_compose_protect(cache_dir, encoder_checkpoint, *common, "admm.retrain_loss=source"),
                 tmp_path / "source")
    (nt, nt_meta), (src, src_meta) = (load_checkpoint(tmp_path / n / "protected.safetensors") for n in ("nt", "source"))
    assert set(src_meta["metrics"]["retrain"]) == {*source_terms, "distill_source", "total"}
    assert set(nt_meta["metrics"]["retrain"]) > {*source_terms, "distill_source", "total"}  # target terms too
    assert src_meta["metrics"]["iterations"] == nt_meta["metrics"]["iterations"]  # the same ADMM before it
    assert any(not torch.equal(nt[k], src[k]) for k in nt if k.startswith("encoder."))


def test_the_simulated_attacker_is_a_term_of_protection(tmp_path, cache_dir, encoder_checkpoint):
    from ntp_ssl.pipeline import run_main_job
    from ntp_ssl.shared.checkpoint import load_checkpoint

    run_main_job(_compose_protect(cache_dir, encoder_checkpoint, "loss.w_sim_attack=1.0", "loss.sim_every=2",
                                  "loss.sim_inner_steps=2"), tmp_path / "sim")
    _, meta = load_checkpoint(tmp_path / "sim" / "protected.safetensors")
    for iteration in meta["metrics"]["iterations"]:  # the mean over the steps that simulated (every second)
        assert iteration["sim_masked"] >= 0 and iteration["sim_dense"] >= 0
    assert "sim_masked" in meta["metrics"]["retrain"]


def test_a_crafted_protect_state_is_one_line(tmp_path, cache_dir, encoder_checkpoint):
    from ntp_ssl.errors import CheckpointError
    from ntp_ssl.pipeline import run_main_job
    from ntp_ssl.shared.checkpoint import load_training_state, save_training_state

    cfg = _compose_protect(cache_dir, encoder_checkpoint)
    run_main_job(cfg, tmp_path / "run")
    state, _ = load_training_state(tmp_path / "run" / "protect_state.safetensors")
    for name in ("protected.safetensors", "protected.json"):
        (tmp_path / "run" / name).unlink()
    save_training_state(tmp_path / "run" / "protect_state", {**state, "iteration": 10**6}, {"stage": "protect"})
    with pytest.raises(CheckpointError, match="cannot resume protection from .*its state does not fit this run"):
        run_main_job(cfg, tmp_path / "run")


@pytest.mark.parametrize("overrides, expected", [
    ([], [("pruned", 0)]),
    (["admm.retrain_refresh_every=2"], [("pruned", 0), ("pruned", 2), ("pruned", 4)]),
    (["admm.retrain_pseudo_from=unpruned"], [("unpruned", 0)]),
    (["admm.retrain_pseudo_from=unpruned", "admm.retrain_refresh_every=3"], [("unpruned", 0), ("pruned", 3)]),
])
def test_retraining_pseudo_labels_come_from_the_encoder_asked_for(tmp_path, cache_dir, encoder_checkpoint,
                                                                   monkeypatch, overrides, expected):
    """The random-mask variant's pseudo-labels: clustered after the hard prune (default) or before
    it, once or again every k retraining steps from the retrained encoder, each with its own seed."""
    from ntp_ssl.pipeline import run_main_job
    from ntp_ssl.protect.objective import NonTransferableObjective

    calls = []
    real_refresh = NonTransferableObjective.refresh_pseudo_labels

    def spy(self, source, targets, *, seed):
        conv = [p for n, p in self.method.encoder.named_parameters() if p.dim() == 4]
        zeros = sum(int((p == 0).sum()) for p in conv) / sum(p.numel() for p in conv)
        calls.append(("pruned" if zeros > 0.5 else "unpruned", seed))  # 80% sparsity, or dense
        return real_refresh(self, source, targets, seed=seed)

    monkeypatch.setattr(NonTransferableObjective, "refresh_pseudo_labels", spy)
    run_main_job(_compose_protect(cache_dir, encoder_checkpoint, "admm.iterations=0", "prune.projection=random",
                                  "admm.retrain_steps=5", "seed=0", *overrides), tmp_path / "run")
    assert calls == expected


def test_retraining_terms_are_averaged_over_the_steps_of_the_chunks_that_had_them():
    from ntp_ssl.protect.loop import _weighted_means

    chunks = [(60, {"total": 1.0, "sim_masked": 0.5}), (60, {"total": 2.0}), (30, {"total": 4.0, "sim_masked": 1.5})]
    means = _weighted_means(chunks)
    assert means["total"] == pytest.approx((60 * 1.0 + 60 * 2.0 + 30 * 4.0) / 150)  # 2.0
    assert means["sim_masked"] == pytest.approx((60 * 0.5 + 30 * 1.5) / 90)


def test_protection_views_are_the_encoders_pretraining_views(tmp_path, cache_dir, monkeypatch):
    """The SSL terms of protection see the views the encoder was pretrained on (its checkpoint's
    method_config), not the built-in ones, when it was pretrained with other crops or inversion."""
    import ntp_ssl.protect.loop as loop
    from ntp_ssl.pipeline import run_main_job
    from ntp_ssl.pretrain.stage import run_pretrain

    checkpoint = run_pretrain(compose_pretrain(cache_dir, "optim.epochs=1", "method.min_scale=0.5",
                                               "method.invert_prob=0.3"), tmp_path / "pretrained")["checkpoint"]
    asked: list[dict] = []
    original = loop.build_train_transform

    def recording(method, **kwargs):
        asked.append(kwargs)
        return original(method, **kwargs)

    monkeypatch.setattr(loop, "build_train_transform", recording)
    run_main_job(_compose_protect(cache_dir, checkpoint), tmp_path / "protect")
    assert asked and all(kw["min_scale"] == 0.5 and kw["invert_prob"] == 0.3 for kw in asked)
    # a checkpoint that recorded no view options (pretrained before they existed): the built-in views
    asked.clear()
    loop.protection_view_transform(_compose_protect(cache_dir, checkpoint), {"temperature": 0.2})
    assert [(kw["min_scale"], kw["invert_prob"]) for kw in asked] == [(None, None)]
