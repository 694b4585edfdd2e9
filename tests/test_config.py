"""The real configs compose, validate, and reject typos, wrong types and bad values."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import REPO, load_benchmark
from ntp_ssl.cli import STAGES, config_dir
from ntp_ssl.config import STAGE_VALIDATORS, register_schemas, validate_evaluate, validate_pretrain, validate_protect
from ntp_ssl.errors import ConfigError


def _compose(stage: str, overrides: list[str] | None = None):
    register_schemas()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=stage, overrides=overrides or [])


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_composes(stage):
    cfg = _compose(stage)
    assert cfg.stage == stage
    assert cfg.paths.root == "runs"


def test_pretrain_defaults_are_the_cpu_defaults():
    cfg = _compose("pretrain")
    validate_pretrain(cfg)
    assert (cfg.data.source, cfg.encoder.backbone, cfg.method.name, cfg.optim.batch_size) == (
        "mnist", "small_cnn", "simclr", 32)
    assert cfg.run_name == "mnist-simclr-small_cnn-seed0"


def test_the_default_encoder_is_pretrained_on_the_main_jobs_data_paths_and_trainer():
    from ntp_ssl.pipeline import default_encoder_config

    cfg = _compose("protect", ["pretrain.method.name=moco", "data.source=optdigits", "data.targets=[mnist]",
                               "trainer.threads=1", "pretrain.optim.epochs=3"])
    validate_protect(cfg)
    pretrain = default_encoder_config(cfg)
    assert pretrain.run_name == "optdigits-moco-small_cnn-seed0"
    assert (pretrain.data.source, pretrain.trainer.threads, pretrain.optim.epochs) == ("optdigits", 1, 3)
    assert pretrain.stage == "pretrain" and pretrain.data.targets == ["mnist"]


def test_each_loss_option_has_only_its_own_keys():
    assert set(_compose("protect", ["loss=supervised"]).loss) == {
        "kind", "alpha", "ce_clamp", "w_fisher_labels", "head_steps", "w_source_distill", "w_source_relational",
        "w_sim_attack", "sim_every", "sim_inner_steps", "sim_inner_lr", "sim_modes", "sim_penalty"}
    assert set(_compose("protect", ["loss=none"]).loss) == {"kind"}
    assert _compose("protect", []).loss.kind == "ssl"
    with pytest.raises(Exception, match="w_mmd"):
        _compose("protect", ["loss=supervised", "loss.w_mmd=1"])
    with pytest.raises(ConfigError, match="loss=supervised"):  # the kind follows the option, not an override
        validate_protect(_compose("protect", ["loss.kind=supervised"]))


def test_overrides_apply():
    cfg = _compose("pretrain", ["data.source=optdigits", "optim.lr=0.5", "method.name=moco"])
    assert (cfg.data.source, cfg.optim.lr, cfg.method.name) == ("optdigits", 0.5, "moco")


def test_experiment_config_composes():
    cfg = _compose("pretrain", ["experiment=pretrain_resnet18_cifar10"])
    assert (cfg.encoder.backbone, cfg.data.source, cfg.trainer.precision) == ("resnet18", "cifar10", "bf16-mixed")


def test_label_free_random_experiment_is_the_measured_setup(bench_efficacy):
    """experiment=protect_label_free_random must be what bench_efficacy's label_free_random_mask
    measured (docs/RESULTS.md): the same config but for the run name."""
    from omegaconf import OmegaConf

    named = OmegaConf.to_container(_compose("protect", ["experiment=protect_label_free_random"]))
    measured = OmegaConf.to_container(_compose("protect", bench_efficacy.SETUPS["label_free_random_mask"]))
    assert named.pop("run_name") != measured.pop("run_name")
    assert named == measured
    assert (named["prune"]["projection"], named["admm"]["iterations"], named["admm"]["retrain_steps"],
            named["loss"]["kind"]) == ("random", 0, 420, "ssl")


def test_misspelt_key_is_rejected():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as info:
        _compose("pretrain", ["optim.lrr=0.1"])
    assert "lrr" in str(info.value) or "lrr" in str(info.value.__cause__)


def test_wrong_type_is_rejected():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose("pretrain", ["optim.lr=fast"])


@pytest.mark.parametrize(
    "stage,override,fragment",
    [
        ("pretrain", "data.source=imagenet", "data.source: unknown domain 'imagenet'; valid: mnist,"),
        ("pretrain", "data.source=MNIST_M", "data.source: unknown domain 'MNIST_M' (did you mean 'mnistm'?)"),
        ("pretrain", "data.source=folder:", "data.source: unknown domain 'folder:'"),
        ("pretrain", "domains=[mnist,svhnn]", "domains: unknown domain 'svhnn' (did you mean 'svhn'?)"),
        ("pretrain", "encoder.backbone=resnet999", "encoder.backbone='resnet999' is not one of: small_cnn, "),
        ("pretrain", "method.name=byol", "method.name='byol' is not one of: simclr, moco, supervised"),
        ("protect", "data.targets=[optdigits,mnist-m]", "data.targets: unknown domain 'mnist-m'"),
        ("protect", "eval_targets=[usps,cifar]", "eval_targets: unknown domain 'cifar' (did you mean 'cifar10'?)"),
        ("protect", "pretrain.encoder.backbone=vgg", "pretrain.encoder.backbone='vgg' is not one of"),
        ("protect", "pretrain.method.name=simsiam", "pretrain.method.name='simsiam' is not one of"),
        ("evaluate", "data.targets=[SVHN,stl]", "data.targets: unknown domain 'stl' (did you mean 'stl10'?)"),
        ("domains", "names=[mnist,mnits]", "names: unknown domain 'mnits' (did you mean 'mnist'?)"),
        ("domains", "names=[]", "names=[] is empty"),
        ("domains", "per_class=0", "per_class=0 must be an integer >= 1"),
        ("report", "runs=[]", "runs=[] is empty"),
        ("report", "runs=[no/such/run]", "run 'no/such/run' has no results.csv"),
    ],
)
def test_unknown_domain_backbone_and_method_names_are_refused_by_the_config_checks(stage, override, fragment):
    """The command line runs these checks before torch is imported (tests/test_cli.py), so the
    names must be known here, not only to the torch-importing registries."""
    from ntp_ssl.errors import NtpSslError

    overrides = [override]
    if stage == "evaluate":
        overrides.append("checkpoints=[x.safetensors]")
    cfg = _compose(stage, overrides)
    validate = STAGE_VALIDATORS[stage]
    with pytest.raises(NtpSslError) as info:
        validate(cfg)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_the_config_knows_every_registered_backbone_method_and_domain(tmp_path):
    from ntp_ssl.config import BACKBONE_NAMES, METHOD_NAMES
    from ntp_ssl.data.embedded import BUILDERS
    from ntp_ssl.data.external import _tv_split
    from ntp_ssl.data.load import EMBEDDED_DOMAINS, TORCHVISION_DOMAINS
    from ntp_ssl.encoders import BACKBONES
    from ntp_ssl.pretrain.methods import METHODS

    assert sorted(BACKBONE_NAMES) == sorted(BACKBONES)
    assert sorted(METHOD_NAMES) == sorted(METHODS)
    assert sorted(EMBEDDED_DOMAINS) == sorted(BUILDERS)
    for name in TORCHVISION_DOMAINS:  # each has a reader: missing data, not an unknown name
        with pytest.raises(Exception) as info:
            _tv_split(name, str(tmp_path), True, False)
        assert not isinstance(info.value, AssertionError), name


@pytest.mark.parametrize(
    "stage,override,fragment",
    [
        ("pretrain", "data.image_size=0", "data.image_size=0"),
        ("pretrain", "data.channels=2", "data.channels=2"),
        ("pretrain", "optim.name=lion", "optim.name='lion'"),
        ("pretrain", "optim.lr=-1", "optim.lr=-1"),
        ("pretrain", "trainer.precision=8", "trainer.precision='8'"),
        ("pretrain", "method.invert_prob=1.5", "method.invert_prob=1.5"),
        ("pretrain", "method.min_scale=0", "method.min_scale=0"),
        ("pretrain", "method.invert_prob=-0.1", "method.invert_prob=-0.1"),
        ("pretrain", "trainer.device=tpu", "trainer.device='tpu'"),
        ("protect", "prune.sparsity=1.0", "prune.sparsity=1.0"),
        ("protect", "prune.projection=magic", "prune.projection='magic'"),
        ("protect", "prune.random_seed=3", "prune.random_seed=3 applies to prune.projection=random only"),
        ("protect", "prune.random_seed=-1", "prune.random_seed=-1"),
        ("protect", "admm.retrain_pseudo_from=teacher", "admm.retrain_pseudo_from='teacher'"),
        ("protect", "admm.retrain_refresh_every=-1", "admm.retrain_refresh_every=-1"),
        ("protect", "loss.kind=magic", "loss.kind='magic'"),
        ("protect", "data.targets=[mnist]", "data.targets entry 'mnist' is data.source='mnist'"),
        ("protect", "data.targets=[MNIST]", "data.targets entry 'MNIST' is data.source='mnist'"),
        ("protect", "data.targets=[' Mnist ']", "data.targets entry ' Mnist ' is data.source='mnist'"),
        ("protect", "data.targets=[optdigits,OPTDIGITS]", "lists 'optdigits' and 'OPTDIGITS', the same domain twice"),
        ("protect", "eval_targets=[usps,MNIST]", "eval_targets entry 'MNIST' is data.source='mnist'"),
        ("protect", "data.targets=[]", "data.targets=[] is empty"),
        ("protect", "admm.rho=0", "admm.rho=0"),
        ("protect", "loss.pseudo_clusters=1", "loss.pseudo_clusters=1"),
        ("evaluate", "sweep.precision=fp64", "sweep.precision='fp64' is not one of: 32, bf16-mixed, auto"),
        ("evaluate", "sweep.eval_batch_size=0", "sweep.eval_batch_size=0"),
        ("evaluate", "sweep.fractions=[0.5,1.5]", "1.5"),
        ("evaluate", "sweep.fractions=[0.0]", "0.0"),
        ("evaluate", "sweep.fractions=[]", "sweep.fractions=[] is empty"),
        ("evaluate", "sweep.attacks=[steal]", "sweep.attacks='steal'"),
        ("evaluate", "sweep.seeds=[]", "sweep.seeds=[] is empty"),
    ],
)
def test_bad_values_fail_at_start_with_one_line(stage, override, fragment):
    overrides = [override]
    if stage == "evaluate":
        overrides.append("checkpoints=[x.safetensors]")
    cfg = _compose(stage, overrides)
    validate = {"pretrain": validate_pretrain, "protect": validate_protect, "evaluate": validate_evaluate}[stage]
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_evaluate_without_checkpoints_is_an_error():
    with pytest.raises(ConfigError, match="checkpoints=\\[\\] is empty"):
        validate_evaluate(_compose("evaluate"))


def test_domain_specs_compare_by_what_they_name(tmp_path, monkeypatch):
    from ntp_ssl.checks import domain_key

    monkeypatch.chdir(tmp_path)
    assert domain_key(" MNIST ") == domain_key("mnist") != domain_key("mnistm")
    assert domain_key("npz:data/a.npz") == domain_key(f"NPZ:{tmp_path}/data/../data/a.npz")
    assert domain_key("npz:a.npz") != domain_key("folder:a.npz")
    assert domain_key("folder:Data") != domain_key("folder:data")  # paths keep their case


def test_checkpoint_arguments_compare_by_the_file_they_name(tmp_path, monkeypatch):
    from ntp_ssl.checks import checkpoint_key, resolve_checkpoint_path

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "encoder.safetensors").write_bytes(b"x")
    (run / "encoder.json").write_text("{}")
    same = ["run", "run/", str(run), "run/encoder.safetensors", "run/encoder.json", "./run/../run/encoder.safetensors"]
    assert {checkpoint_key(p) for p in same} == {str(resolve_checkpoint_path(run).resolve())}
    (run / "protected.safetensors.pending").write_bytes(b"y")  # a save not yet finished: the folder means it
    assert checkpoint_key("run") == str((run / "protected.safetensors").resolve()) != checkpoint_key(
        "run/encoder.safetensors")
    assert checkpoint_key("nope.safetensors") == str((tmp_path / "nope.safetensors").resolve())  # the lookup judges it
    assert checkpoint_key("nope.json") == checkpoint_key("nope.safetensors") != checkpoint_key("nope2.safetensors")


def test_bench_reuses_an_evaluate_run_only_under_the_same_attacker_and_split(bench_efficacy, tmp_path):
    """A recorded evaluate run counts as "attacked before" only when its attacker words (split
    included) are exactly this benchmark's: a validation-split run must not stand in for a
    test-split one, and a run made with data.split=validation must still be found again."""
    validation = ["sweep=main_job", "data.split=validation", "sweep.seeds=[0]"]
    _recorded_evaluate_run(bench_efficacy, tmp_path, "seed0-sweep0_lf", validation, [0])
    found = bench_efficacy.evaluated_before(tmp_path, "seed0-sweep", "lf", False, validation)
    assert found[0] is not None and found[1] == []
    assert bench_efficacy.evaluated_before(tmp_path, "seed0-sweep", "lf", False,
                                           ["sweep=main_job", "sweep.seeds=[0]"]) == (None, [0])
    assert bench_efficacy.evaluated_before(tmp_path, "seed0-sweep", "lf", False,
                                           ["sweep=converged", "data.split=validation", "sweep.seeds=[0]"]) == (None, [0])
    assert bench_efficacy.evaluated_before(tmp_path, "seed0-sweep", "lf", True, validation) == (None, [0])  # no sparse


def test_bench_refuses_an_evaluate_run_read_back_that_was_made_under_other_defaults(bench_efficacy, tmp_path):
    """An evaluate run found by ``evaluated_before`` (the usual way results come back) is held
    to today's defaults too, as a run ``_once`` finds: here one made before the layout option."""
    from ntp_ssl.shared.runs import fingerprint

    sweep = ["sweep=main_job", "sweep.seeds=[0]"]
    for name, made_in_nchw in (("seed0-sweep0_lf", False), ("seed1-sweep0_lf", True)):
        _recorded_evaluate_run(bench_efficacy, tmp_path, name, sweep, [0])
        run_dir = tmp_path / "evaluate" / name
        command = json.loads((run_dir / "bench_wall.json").read_text())["command"].split()
        made = fingerprint(_compose(command[1], command[2:]))
        if made_in_nchw:
            del made["trainer"]["channels_last"]
        (run_dir / "run_config.json").write_text(json.dumps(made))
    found, missing = bench_efficacy.evaluated_before(tmp_path, "seed0-sweep", "lf", False, sweep)
    assert found is not None and missing == []
    with pytest.raises(SystemExit, match=r"seed1-sweep0_lf was made with another config .*"
                                         r"trainer\.channels_last: False -> True"):
        bench_efficacy.evaluated_before(tmp_path, "seed1-sweep", "lf", False, sweep)


def _recorded_evaluate_run(bench_efficacy, root, name: str, sweep: list[str], seeds: list[int],
                           accuracy: float = 0.5) -> None:
    """An evaluate run as bench_efficacy leaves it: model "lf", one row per sweep seed."""
    import json

    run_dir = root / "evaluate" / name
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"source_accuracy": {"lf": {"knn": 0.9}}}))
    (run_dir / "results.csv").write_text("model,domain,attack,seed,fraction,n,accuracy\n" + "".join(
        f"lf,optdigits,finetune_dense,{seed},1.0,10,{accuracy + seed / 100}\n" for seed in seeds))
    command = ["ntp-ssl", "evaluate", "checkpoints=[/x/lf-seed0]", "names=[lf]", "sparse_scratch=[]", *sweep,
               f"run_name={name}", f"paths.root={root}"]
    (run_dir / "bench_wall.json").write_text(json.dumps({"wall_s": 60.0, "command": " ".join(command)}))
    assert bench_efficacy.attacker_words(" ".join(command)) == sweep


def test_bench_refuses_an_evaluate_run_that_attacked_another_file_under_the_name(bench_efficacy, tmp_path):
    """A run found under the same attacker but made on another file as the same name (the
    default encoder pretrained again, or on another CPU) is refused, not reused: its numbers are
    another encoder's. The file is read from the digests the stage recorded in run_config.json."""
    from ntp_ssl.shared.runs import INPUTS_KEY

    sweep = ["sweep=main_job", "sweep.seeds=[0]"]
    _recorded_evaluate_run(bench_efficacy, tmp_path, "seed0-sweep0_lf", sweep, [0])
    run_dir = tmp_path / "evaluate" / "seed0-sweep0_lf"
    made = {"checkpoints": ["/x/mag-seed0", "/x/lf-seed0"], "names": ["mag", "lf"],
            INPUTS_KEY: {"checkpoint /x/mag-seed0": "b" * 64, "checkpoint /x/lf-seed0": "a" * 64}}
    (run_dir / "run_config.json").write_text(json.dumps(made))
    bench_efficacy._CHECKED.add(run_dir)  # this run_config.json holds no whole config: its check is not tested here
    try:
        assert bench_efficacy.attacked_file(run_dir, "lf") == "a" * 64
        assert bench_efficacy.attacked_file(run_dir, "mag") == "b" * 64
        assert bench_efficacy.attacked_file(run_dir, "other") is None
        found, missing = bench_efficacy.evaluated_before(tmp_path, "seed0-sweep", "lf", False, sweep, "a" * 64)
        assert found is not None and missing == []
        # the other model's file under this name: refused, naming the run and both digests
        with pytest.raises(SystemExit, match=r"seed0-sweep0_lf attacked another file as 'lf' "
                                             r"\(sha256 aaaaaaaaaaaa\) than this benchmark's \(sha256 bbbbbbbbbbbb\)"):
            bench_efficacy.evaluated_before(tmp_path, "seed0-sweep", "lf", False, sweep, "b" * 64)
        # a run that recorded no inputs (made before they were) counts, as before
        (run_dir / "run_config.json").write_text(json.dumps({"checkpoints": ["/x/lf-seed0"], "names": ["lf"]}))
        assert bench_efficacy.evaluated_before(tmp_path, "seed0-sweep", "lf", False, sweep, "b" * 64)[0] is not None
    finally:
        bench_efficacy._CHECKED.discard(run_dir)


def test_bench_finds_the_unprotected_reference_in_the_reference_root(bench_efficacy, tmp_path, monkeypatch):
    """--reference-root: the unprotected encoder's runs are looked up (and made) there, the
    protected encoders' in --root, each held to its own checkpoint's digest."""
    import sys

    calls = []

    def fake_protect(name, overrides, seed, root, extra):
        run_dir = root / "protect" / f"{name}-seed{seed}"
        run_dir.mkdir(parents=True)
        meta = {"source": "mnist", "protected_from": {"path": "/x/unprotected.safetensors", "sha256": "u" * 64},
                "sha256": f"{seed}" * 64}
        (run_dir / "protected.json").write_text(json.dumps(meta))
        return {"setup": name, "seed": seed, "run_dir": str(run_dir), "protect_wall_s": 1.0, "sparsity": 0.9,
                "sha256": meta["sha256"]}

    def fake_attacked(root, prefix, names, checkpoints, sparse, protocol, sweep_seeds, *, name_run, label=None,
                      sha256s=None):
        calls.append((root, prefix, names, sha256s))
        return {name: {"rows": [], "source_accuracy": {}, "wall_s": 1.0} for name in names}

    monkeypatch.setattr(bench_efficacy, "protect", fake_protect)
    monkeypatch.setattr(bench_efficacy, "attacked", fake_attacked)
    monkeypatch.setattr(bench_efficacy, "check_reference_file", lambda path, sha256: None)  # tested below
    monkeypatch.setattr(bench_efficacy, "table", lambda records, runs: "table")
    root, reference_root = tmp_path / "sparsity50", tmp_path / "sparsity99"
    monkeypatch.setattr(sys, "argv", ["bench_efficacy.py", "--setups", "label_free", "--seeds", "1", "2",
                                      "--root", str(root), "--reference-root", str(reference_root)])
    bench_efficacy.main()
    assert calls == [(reference_root, "unprotected-sweep", ["unprotected"], ["u" * 64]),
                     (root, "seed1-sweep", ["label_free"], ["1" * 64]),
                     (root, "seed2-sweep", ["label_free"], ["2" * 64])]
    table = json.loads((root / "efficacy.json").read_text())
    assert (table["reference_root"], table["reference_sha256"]) == (str(reference_root), "u" * 64)


def test_bench_refuses_a_reference_file_that_is_not_the_protected_encoder(bench_efficacy, tmp_path):
    """The protections record the digest of the encoder they were made from; the file at its
    path (a cache path keyed by config) may since hold another CPU's or another cache's draw."""
    import hashlib

    encoder = tmp_path / "encoder.safetensors"
    encoder.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    bench_efficacy.check_reference_file(str(encoder), digest)  # the same file: nothing to say
    bench_efficacy.check_reference_file(str(encoder), None)  # a protection that recorded no digest
    run_dir = tmp_path / "pretrain_run"  # protect was given a run directory: the file in it is compared
    run_dir.mkdir()
    (run_dir / "encoder.safetensors").write_bytes(b"weights")
    bench_efficacy.check_reference_file(str(run_dir), digest)
    encoder.write_bytes(b"other weights")
    with pytest.raises(SystemExit, match=rf"encoder.safetensors is not the encoder the protections were made from "
                                         rf"\(sha256 [0-9a-f]{{12}}, theirs {digest[:12]}: another cache or CPU\)"):
        bench_efficacy.check_reference_file(str(encoder), digest)
    encoder.unlink()
    with pytest.raises(SystemExit, match="the protections were made from is gone"):
        bench_efficacy.check_reference_file(str(encoder), digest)


def test_bench_adds_a_sweep_seed_without_redoing_the_first(bench_efficacy, tmp_path, monkeypatch):
    """Sweep seeds 1 2 asked, seed 1 attacked before: the old rows are kept, one new run attacks
    seed 2 alone, and the record holds each seed once, from the run that measured it."""
    _recorded_evaluate_run(bench_efficacy, tmp_path, "seed3-sweep1_lf", ["sweep=main_job", "sweep.seeds=[1]"], [1])
    found, missing = bench_efficacy.evaluated_before(tmp_path, "seed3-sweep", "lf", False,
                                                     ["sweep=main_job", "sweep.seeds=[1,2]"])
    assert missing == [2] and [(r["seed"], r["accuracy"]) for r in found["rows"]] == [(1, 0.51)]
    assert found["source_accuracy"] == {"lf": {"knn": 0.9}}
    made = []

    def fake_evaluate(run_name, checkpoints, names, sparse, root, sweep):
        made.append((run_name, sweep))
        _recorded_evaluate_run(bench_efficacy, root, run_name, sweep, [2], accuracy=0.7)
        return bench_efficacy.evaluated_before(root, run_name, "lf", False, sweep)[0]

    monkeypatch.setattr(bench_efficacy, "evaluate", fake_evaluate)
    done = bench_efficacy.attacked(tmp_path, "seed3-sweep", ["lf"], ["/x/lf-seed3"], [], ["sweep=main_job"], [1, 2],
                                   name_run=lambda tag, names: f"seed3-sweep{tag}_" + "+".join(names))
    assert made == [("seed3-sweep2_lf", ["sweep=main_job", "sweep.seeds=[2]"])]
    assert sorted((r["seed"], r["accuracy"]) for r in done["lf"]["rows"]) == [(1, 0.51), (2, 0.72)]
    assert done["lf"]["wall_s"] == 120.0
    # asked again: both seeds are found, nothing is run, and no seed is counted twice
    again = bench_efficacy.attacked(tmp_path, "seed3-sweep", ["lf"], ["/x/lf-seed3"], [], ["sweep=main_job"], [1, 2],
                                    name_run=lambda tag, names: "never")
    assert len(made) == 1 and sorted(r["seed"] for r in again["lf"]["rows"]) == [1, 2]


def test_bench_table_keeps_sparse_scratch_apart_and_pairs_gaps_by_seed(bench_efficacy):
    """bench_efficacy.table: a setup's sparse-scratch records fill its own column and paired
    row, not the setup's means; gaps pair protection seeds, each cell the mean over targets."""
    suffix = bench_efficacy.SPARSE_SCRATCH_SUFFIX

    def record(setup, seed, masked, dense, model=None, knn=0.8):  # two targets and the source, one sweep seed
        slc = {1: {t: {"finetune_masked": masked + d, "finetune_dense": dense + d, "best": max(masked, dense) + d}
                   for t, d in (("optdigits", 0.1), ("mnistm", -0.1), ("source", 5.0))}}
        return {"setup": setup, "seed": seed, "model": model or setup, "slc": slc,
                "source_linear": 0.9, "source_knn": knn}

    records = [record("unprotected", None, 0.5, 0.5, knn=0.9),
               record("lf", 1, -1.0, 0.1, knn=0.7), record("lf", 1, -2.0, 0.0, model="lf" + suffix),
               record("lf", 2, -0.6, 0.3, knn=0.8), record("lf", 2, -1.0, 0.0, model="lf" + suffix),
               record("mag", 1, -0.5, 0.3), record("mag", 2, -0.3, 0.2)]
    runs = [{"setup": s, "seed": p, "sparsity": 0.9, "protect_wall_s": 60.0} for s in ("lf", "mag") for p in (1, 2)]
    lines = bench_efficacy.table(records, runs).splitlines()
    lf = next(line for line in lines if line.startswith("| lf | 2 x 1 |"))
    # mask-kept mean over seeds of -1.0 and -0.6 (targets average out, the source stays out): -0.8, not pulled down by
    # the sparse scratch's -2.0 and -1.0, which fill the sparse-scratch column (-1.5) instead
    cells = [c.strip() for c in lf.strip("|").split("|")]
    assert cells[2].startswith("-0.800 [") and cells[3].startswith("+0.200 [")
    assert any(c.startswith("-1.500 [") for c in cells) and "0.750" in cells  # source kNN: mean of 0.7, 0.8
    start = next(i for i, line in enumerate(lines) if "minus each control" in line)
    end = next(i for i, line in enumerate(lines) if line.startswith("Selectivity"))
    gap = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
           for line in lines[start + 3:end] if line.startswith("| ")}
    # lf minus mag by seed: mask-kept -0.5 and -0.3 -> -0.4; dense -0.2 and +0.1 -> -0.05
    assert gap["mag"][0].startswith("-0.400 [") and gap["mag"][1].startswith("-0.050 [")
    # lf minus its sparse scratch, mask-kept only: +1.0 and +0.4 -> +0.7; no dense, no source kNN
    assert gap["lf sparse scratch"][0].startswith("+0.700 [") and gap["lf sparse scratch"][1:] == ["-", "-", "-"]
    # against the one unprotected record on every seed: -1.5 and -1.1 -> -1.3
    assert gap["unprotected"][0].startswith("-1.300 [")


def test_bench_table_cell_says_when_a_seed_is_missing(bench_efficacy):
    """A seed without a value drops out of the mean and interval; the cell must say so, since
    the row's "3 x 1" would not."""
    assert bench_efficacy._cell([-1.0, -0.6, -0.8]).startswith("-0.800 [")
    assert "of" not in bench_efficacy._cell([-1.0, -0.6, -0.8])
    assert bench_efficacy._cell([-1.0, float("nan"), -0.6]).endswith("(2 of 3)")
    assert bench_efficacy._cell([None, float("nan")]) == "-"


def test_paired_gaps_pair_by_seed_and_refuse_another_attacker(tmp_path):
    """benchmarks/paired_gaps.py: own minus control per protection seed over the seeds both hold,
    mean and interval; tables of another attacker, or of another protected encoder, are refused."""
    import json
    import subprocess
    import sys

    def record(setup, seed, dense):  # two targets, one sweep seed; mask-kept -1 everywhere
        slc = {"1": {t: {"finetune_masked": -1.0, "finetune_dense": dense + d, "best": dense + d}
                     for t, d in (("optdigits", 0.1), ("mnistm", -0.1))}}
        return {"setup": setup, "seed": seed, "model": setup, "slc": slc, "source_linear": 0.9, "source_knn": 0.8}

    own = {"sweep": ["sweep=main_job"], "records": [record("new", s, d) for s, d in ((1, -0.2), (2, -0.4), (3, 0.0))]}
    other = {"sweep": ["sweep=main_job"], "records": [record("old", s, 0.0) for s in (1, 2)]}
    paths = {name: tmp_path / f"{name}.json" for name in ("own", "other")}
    for name, table in (("own", own), ("other", other)):
        paths[name].write_text(json.dumps(table))
    script = REPO / "benchmarks" / "paired_gaps.py"
    args = [sys.executable, str(script), "--own-json", str(paths["own"]), "--own", "new",
            "--against-json", str(paths["other"]), "--against", "old"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("| old |"))
    # seeds 1 and 2 only: dense gaps -0.2 and -0.4, mean -0.3, t interval with 1 degree of freedom
    assert row.startswith("| old | +0.000 [+0.000, +0.000] | -0.300 [-1.571, +0.971] |") and row.endswith("| 1 2 |")
    other["sweep"] = ["sweep=converged"]
    paths["other"].write_text(json.dumps(other))
    failed = subprocess.run(args, capture_output=True, text=True)
    assert failed.returncode != 0 and "other attackers" in failed.stderr
    # the same attacker on another encoder (another CPU's default, say): refused when both tables record it
    other["sweep"] = own["sweep"]
    own["reference_sha256"], other["reference_sha256"] = "a" * 64, "b" * 64
    for name, table in (("own", own), ("other", other)):
        paths[name].write_text(json.dumps(table))
    failed = subprocess.run(args, capture_output=True, text=True)
    assert failed.returncode != 0 and "protect other encoders (sha256 aaaaaaaaaaaa and bbbbbbbbbbbb)" in failed.stderr
    other["reference_sha256"] = "a" * 64
    paths["other"].write_text(json.dumps(other))
    assert subprocess.run(args, capture_output=True, text=True).returncode == 0


@pytest.fixture(scope="module")
def converged_table():
    """benchmarks/converged_table.py's main() in this process, as ``(ARGS..., check=False) ->
    (returncode, stdout, stderr)`` like subprocess.run: a process of its own pays about 6 s of
    imports per call on 2 cores (the first test still runs the script as a command once)."""
    import contextlib
    import io
    import sys
    from types import SimpleNamespace

    script = load_benchmark("converged_table")

    def run(*args: str, check: bool = False) -> SimpleNamespace:
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                script.main([str(a) for a in args])
            except SystemExit as exit_:  # what the interpreter would do with it: a message to stderr, status 1
                code = exit_.code if isinstance(exit_.code, int) else 1
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)
        assert not (check and code), f"converged_table.py {args} exited {code}: {err.getvalue()[-2000:]}"
        return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())

    return run


def test_converged_table_pairs_evaluate_runs_by_protection_seed(tmp_path, converged_table):
    """benchmarks/converged_table.py: per setup the mean SLC-AUC over protection seeds, a seed
    in a folder without suffix read through DIR@k, first minus second paired by seed, and the
    dense curve beside scratch."""
    import json
    import subprocess
    import sys

    def folder(name, models, dense_by_model):
        path = tmp_path / name
        path.mkdir()
        summary = [{"model": m, "domain": "d", "attack": "finetune_dense", "slc_auc": dense_by_model[m]}
                   for m in models]
        source = {m: {"linear": 0.9, "knn": 0.8} for m in models}
        path.joinpath("summary.json").write_text(json.dumps({"summary": summary, "source_accuracy": source}))
        lines = ["model,domain,attack,seed,fraction,n,accuracy", "scratch,d,scratch,1,1.0,100,0.5"]
        lines += [f"{m},d,finetune_dense,1,1.0,100,{0.6 + dense_by_model[m] / 10}" for m in models]
        path.joinpath("results.csv").write_text("\n".join(lines) + "\n")
        return path

    a = folder("a", ["x-seed1", "x-seed2"], {"x-seed1": -0.2, "x-seed2": -0.4})
    a1 = folder("a3", ["x"], {"x": 0.0})  # protection seed 3, named without suffix
    b = folder("b", ["y-seed1", "y-seed2", "y-seed3"], {"y-seed1": 0.0, "y-seed2": 0.0, "y-seed3": 0.3})
    script = REPO / "benchmarks" / "converged_table.py"
    out = subprocess.run([sys.executable, str(script), f"x={a},{a1}@3", f"y={b}", "--curve-n", "100"],
                         capture_output=True, text=True, check=True).stdout
    # x: seeds 1 2 3 = -0.2 -0.4 0.0, mean -0.2, t(2) interval +-4.303 * 0.2 / sqrt(3)
    assert "| x | 1,2,3 | -0.200 [-0.697, +0.297] |" in out
    # x - y paired: -0.2, -0.4, -0.3: mean -0.3, interval +-4.303 * 0.1 / sqrt(3)
    assert "| x - y | 1,2,3 | -0.300 [-0.548, -0.052] |" in out
    assert "| scratch | 0.500 |" in out and "| x | 0.580 |" in out
    bad = converged_table(f"x={tmp_path / 'missing'}")
    assert bad.returncode != 0 and "holds no summary.json" in bad.stderr
    # a second sweep seed (+): each protection seed's number is its mean over the sweep seeds
    c = folder("c", ["y-seed1", "y-seed2", "y-seed3"], {"y-seed1": 0.2, "y-seed2": -0.2, "y-seed3": 0.1})
    out = converged_table(f"y={b}+{c}", "--curve-n", "100", check=True).stdout
    # y: seeds 1 2 3 = (0+0.2)/2, (0-0.2)/2, (0.3+0.1)/2 = 0.1, -0.1, 0.2: mean 0.0667, sd 0.1528
    assert "| y | 1,2,3 | +0.067 [-0.313, +0.446] |" in out
    assert "| y | 0.607 |" in out  # curve: 0.6 + mean(0, 0, 0.03, 0.02, -0.02, 0.01) = 0.6067
    # a seed missing from one group is averaged over the others, and the script says so
    d = folder("d", ["y-seed1", "y-seed2"], {"y-seed1": 0.2, "y-seed2": -0.2})
    uneven = converged_table(f"y={b}+{d}", check=True)
    assert "protection seed 3 is in 1 of 2 '+' groups" in uneven.stderr
    assert "| y | 1,2,3 | +0.100 [-0.397, +0.597] * |" in uneven.stdout  # 0.1, -0.1, 0.3; marked mixed
    assert "* mixes '+' groups" in uneven.stdout
    # a paired difference with a mixed side is marked too: y (seed 3 from one group) minus x
    paired = converged_table(f"y={b}+{d}", f"x={a},{a1}@3", check=True).stdout
    assert "| y - x | 1,2,3 | +0.300 [+0.300, +0.300] * |" in paired  # 0.1, -0.1, 0.3 minus -0.2, -0.4, 0.0
    even = converged_table(f"y={b}+{c}", check=True)
    assert "warning" not in even.stderr and " *" not in even.stdout
    # a run with sparse_scratch=[...]: its '-sparse_scratch' models are their own row, paired by seed
    e = folder("e", ["z-seed1", "z-seed2", "z-seed1-sparse_scratch", "z-seed2-sparse_scratch"],
               {"z-seed1": -0.2, "z-seed2": -0.4, "z-seed1-sparse_scratch": -0.3, "z-seed2-sparse_scratch": -0.6})
    out = converged_table(f"z={e}", check=True).stdout
    assert "| z | 1,2 | -0.300 [" in out and "| z sparse scratch | 1,2 | -0.450 [" in out
    assert "| z - z sparse scratch | 1,2 | +0.150 [" in out  # +0.1 and +0.2
    # one run holding two setups (a protected encoder's seeds and the unprotected one): each
    # setup reads its own models only; 'unprotected' has no seed suffix, so it needs DIR@k
    f = folder("f", ["w-seed1", "w-seed2", "unprotected"], {"w-seed1": -0.2, "w-seed2": -0.4, "unprotected": 0.5})
    out = converged_table(f"w={f}", f"unprotected={f}@1", check=True).stdout
    assert "| w | 1,2 | -0.300 [" in out and "| unprotected | 1 | +0.500 (1 seed) |" in out
    # the one unprotected model is paired with every protection seed: -0.7, -0.9, +-12.706 * 0.1
    assert "| w - unprotected | 1,2 (vs its one model) | -0.800 [-2.071, +0.471] |" in out
    unseeded = converged_table(f"unprotected={f}")
    assert unseeded.returncode != 0 and "holds no model of setup 'unprotected'" in unseeded.stderr
    assert "DIR@k" in unseeded.stderr
    # an attack some '+' groups lack is averaged over those that have it, and the script says so
    g = tmp_path / "g"
    g.mkdir()
    g.joinpath("summary.json").write_text(json.dumps({"summary": [
        {"model": "unprotected", "domain": "d", "attack": "finetune_dense", "slc_auc": 0.1},
        {"model": "unprotected", "domain": "d", "attack": "finetune_masked", "slc_auc": 0.1}],
        "source_accuracy": {"unprotected": {"linear": 0.9, "knn": 0.8}}}))
    g.joinpath("results.csv").write_text("model,domain,attack,seed,fraction,n,accuracy\n")
    partial = converged_table(f"unprotected={f}@1+{g}@1", check=True)
    assert "finetune_masked of protection seed 1 is in 1 of its 2 '+' groups" in partial.stderr
    # 0.1 from one group, marked; (0.5 + 0.1) / 2 from both, unmarked
    assert "| unprotected | 1 | +0.100 (1 seed) * | +0.300 (1 seed) |" in partial.stdout


def test_converged_table_averages_a_run_of_several_targets(tmp_path, converged_table):
    """benchmarks/converged_table.py on one evaluate run of two targets: each seed's SLC-AUC is
    the mean over the targets (not the first target's alone), and the accuracy-by-n table comes
    once per target, since the targets' grids share n."""
    import json

    slc = {("x-seed1", "a"): -0.2, ("x-seed1", "b"): -0.6, ("x-seed2", "a"): 0.0, ("x-seed2", "b"): -0.4}
    summary = [{"model": m, "domain": t, "attack": "finetune_dense", "slc_auc": v} for (m, t), v in slc.items()]
    run = tmp_path / "run"
    run.mkdir()
    run.joinpath("summary.json").write_text(json.dumps({
        "summary": summary, "source_accuracy": {m: {"linear": 0.9, "knn": 0.8} for m in ("x-seed1", "x-seed2")}}))
    lines = ["model,domain,attack,seed,fraction,n,accuracy", "scratch,a,scratch,1,1.0,10,0.5",
             "scratch,b,scratch,1,1.0,10,0.2"]
    lines += [f"x-seed{s},{t},finetune_dense,1,1.0,10,{acc}" for s in (1, 2) for t, acc in (("a", 0.6), ("b", 0.1))]
    run.joinpath("results.csv").write_text("\n".join(lines) + "\n")
    out = converged_table(f"x={run}", "--curve-n", "10", check=True).stdout
    # seed 1: (-0.2 - 0.6) / 2 = -0.4; seed 2: (0.0 - 0.4) / 2 = -0.2; mean -0.3
    assert "| x | 1,2 | -0.300 [" in out
    blocks = out.split("finetune_dense on ")[1:]
    assert [block.split(":")[0] for block in blocks] == ["a", "b"]
    assert "| scratch | 0.500 |" in blocks[0] and "| x | 0.600 |" in blocks[0]
    assert "| scratch | 0.200 |" in blocks[1] and "| x | 0.100 |" in blocks[1]
    # without --curve-n each target's table has that target's own largest n (the grids differ)
    lines += ["scratch,a,scratch,1,0.5,5,0.4", "scratch,b,scratch,1,0.5,3,0.1"]
    lines += [f"scratch,a,scratch,1,{f},{n},0.1" for f, n in ((0.01, 1), (0.02, 2), (0.03, 3), (0.04, 4))]
    run.joinpath("results.csv").write_text("\n".join(lines) + "\n")
    blocks = converged_table(f"x={run}", check=True).stdout.split("finetune_dense on ")[1:]
    assert "| model | 2 | 3 | 4 | 5 | 10 |" in blocks[0]
    # a setup of target a alone, paired with x (targets a and b): the script warns that the pair
    # mixes target sets, and --targets a compares target a on both sides
    solo = tmp_path / "solo"
    solo.mkdir()
    solo.joinpath("summary.json").write_text(json.dumps({
        "summary": [{"model": "u", "domain": "a", "attack": "finetune_dense", "slc_auc": 0.5}],
        "source_accuracy": {"u": {"linear": 0.9, "knn": 0.8}}}))
    solo.joinpath("results.csv").write_text("model,domain,attack,seed,fraction,n,accuracy\n")
    mixed = converged_table(f"x={run}", f"u={solo}@1", check=True)
    assert "mixes target sets" in mixed.stderr and "| x - u | 1,2 (vs its one model) | -0.800 [" in mixed.stdout
    same = converged_table("--targets", "a", f"x={run}", f"u={solo}@1", check=True)
    assert "mixes target sets" not in same.stderr
    assert "| x | 1,2 | -0.100 [" in same.stdout  # seed 1 -0.2, seed 2 0.0 on target a
    assert "| x - u | 1,2 (vs its one model) | -0.600 [" in same.stdout
    none = converged_table("--targets", "zzz", f"x={run}")
    assert none.returncode != 0 and "holds none of --targets 'zzz'" in none.stderr
    assert "| scratch | 0.100 | 0.100 | 0.100 | 0.400 | 0.500 |" in blocks[0]
    assert "| model | 3 | 10 |" in blocks[1] and "| x |  | 0.100 |" in blocks[1]


def test_the_default_encoder_key_ignores_the_augmentation_options_while_null():
    """Options added after caches existed must not move the default encoder's cache key while
    they are null (the built-in augmentation); set, they must."""
    import hashlib
    import json

    from ntp_ssl.pipeline import default_encoder_config, default_encoder_key
    from ntp_ssl.shared.runs import fingerprint

    pretrain_cfg = default_encoder_config(_compose("protect"))
    tree = fingerprint(pretrain_cfg)
    del tree["data"]["split"]
    for key in ("min_scale", "invert_prob"):
        assert tree["method"].pop(key) is None
    before_the_options = hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]
    assert default_encoder_key(pretrain_cfg) == before_the_options
    keys = {default_encoder_key(default_encoder_config(_compose("protect", [o]))) for o in
            ("pretrain.method.invert_prob=0.5", "pretrain.method.min_scale=0.5", "pretrain.method.min_scale=0.25")}
    assert len(keys) == 3 and before_the_options not in keys


def test_the_default_encoder_key_in_nchw_is_the_key_from_before_the_layout_option():
    """trainer.channels_last=false finds the NCHW encoder cached before the option existed;
    the default (channels-last) pretrains its own."""
    import hashlib
    import json

    from ntp_ssl.pipeline import default_encoder_config, default_encoder_key
    from ntp_ssl.shared.runs import fingerprint

    nchw = default_encoder_config(_compose("protect", ["trainer.channels_last=false"]))
    tree = fingerprint(nchw)
    del tree["data"]["split"]
    for key in ("min_scale", "invert_prob"):
        del tree["method"][key]
    assert tree["trainer"].pop("channels_last") is False
    before_the_option = hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]
    assert default_encoder_key(nchw) == before_the_option
    assert default_encoder_key(default_encoder_config(_compose("protect"))) != before_the_option


def test_augmentation_options_with_a_supervised_encoder_are_an_error():
    with pytest.raises(ConfigError, match="method.name=supervised") as info:
        validate_pretrain(_compose("pretrain", ["method.name=supervised", "method.invert_prob=0.5"]))
    assert "\n" not in str(info.value)


def test_every_bench_setup_composes_and_validates(bench_efficacy):
    """A setup of the efficacy benchmark that does not compose or validate would fail only
    after the setups before it have run (minutes to hours); here it fails at once."""
    from ntp_ssl.config import validate_protect

    for name, overrides in bench_efficacy.SETUPS.items():
        try:
            validate_protect(_compose("protect", [*overrides, "seed=1"]))
        except Exception as exc:  # name the setup: the traceback alone does not
            pytest.fail(f"setup {name!r} ({' '.join(overrides)}): {type(exc).__name__}: {exc}")


def test_bench_refuses_a_finished_run_made_under_other_defaults(bench_efficacy, tmp_path):
    """A default changed after a benchmark run was made must stop the benchmark, not hand back
    the old run's numbers under the new default's name: the recorded command is the same, the
    config it composes to is not."""
    from ntp_ssl.shared.runs import fingerprint

    iterations = _compose("protect").admm.iterations
    args = ["protect", "experiment=protect_label_free", "seed=1"]
    run_dir = tmp_path / "protect" / "label_free-seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "protected.safetensors").write_bytes(b"")
    (run_dir / "bench_wall.json").write_text(json.dumps({"wall_s": 1.0, "command": "ntp-ssl " + " ".join(args)}))

    def made_with(*overrides: str) -> None:
        made = fingerprint(_compose("protect", [*args[1:], *overrides]))
        del made["admm"]["rho_schedule"]  # an option added after the run: not a change
        (run_dir / "run_config.json").write_text(json.dumps(made))

    made_with()  # today's defaults: reused as it is, nothing run
    assert bench_efficacy.config_change(run_dir, args) is None
    assert bench_efficacy._once(run_dir, "protected.safetensors", args) == 1.0
    made_with(f"admm.iterations={iterations - 1}")  # as if the default had been one iteration fewer
    assert bench_efficacy.config_change(run_dir, args) == f"admm.iterations: {iterations - 1} -> {iterations}"
    with pytest.raises(SystemExit, match=rf"another config .*admm\.iterations: {iterations - 1} -> {iterations}"):
        bench_efficacy._once(run_dir, "protected.safetensors", args)
    made = fingerprint(_compose("protect", args[1:]))
    del made["trainer"]["channels_last"]  # a run made before the layout option: in NCHW
    (run_dir / "run_config.json").write_text(json.dumps(made))
    assert bench_efficacy.config_change(run_dir, args) == "trainer.channels_last: False -> True"
