"""The real `ntp-ssl` console command: help, errors, and tiny end-to-end runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_DATA, TINY_PRETRAIN, event_tags


def test_help_lists_stages(cli):
    result = cli("--help")
    assert result.returncode == 0
    for stage in ("pretrain", "protect", "evaluate", "report", "domains"):
        assert stage in result.stdout


def test_stage_help_shows_the_config(cli):
    result = cli("pretrain", "--help")
    assert result.returncode == 0, result.stderr
    assert "ntp-ssl pretrain" in result.stdout
    assert "batch_size: 32\n" in result.stdout


def test_unknown_stage_is_one_line_error(cli):
    result = cli("trian")
    assert result.returncode == 2
    assert "unknown stage 'trian'" in result.stderr and "pretrain" in result.stderr


def test_config_typo_is_a_short_error(cli):
    result = cli("pretrain", "optim.lrr=0.1")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert "lrr" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["data.image_size=0"], "data.image_size=0"),
        (["data.source=imagenet"], "imagenet"),
        (["encoder.backbone=resnet999"], "resnet999"),
        (["method.name=byol"], "byol"),
        (["data.source=npz:/nonexistent/file.npz"], "/nonexistent/file.npz"),
    ],
)
def test_bad_input_exits_2_with_one_line(cli, tmp_path, args, fragment):
    result = cli("pretrain", *TINY_DATA, "optim.epochs=1", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args,fragment", [
    (["pretrain", "seed=-3"], "seed=-3"),
    (["protect", "prune.sparsity=1.5"], "prune.sparsity"),
    (["evaluate", "checkpoints=[x.safetensors]", "sweep.fractions=[2]"], "sweep.fractions"),
    (["evaluate", "checkpoints=[nope.safetensors]"], "checkpoint 'nope.safetensors' does not exist"),
    (["evaluate", "checkpoints=[a.safetensors,b.safetensors]", "names=[m,m]"], "names=['m', 'm'] gives 'm' twice"),
    (["protect", "checkpoint=no/such/run"], "checkpoint 'no/such/run' does not exist"),
    (["pretrain", "data.source=imagenet"], "data.source: unknown domain 'imagenet'"),
    (["protect", "data.targets=[optdigts]"], "data.targets: unknown domain 'optdigts' (did you mean 'optdigits'?)"),
    (["pretrain", "encoder.backbone=resnet999"], "encoder.backbone='resnet999' is not one of: small_cnn,"),
    (["protect", "pretrain.method.name=byol"], "pretrain.method.name='byol' is not one of: simclr, moco, supervised"),
    (["domains", "names=[mnits]"], "names: unknown domain 'mnits' (did you mean 'mnist'?)"),
    (["report", "runs=[runs/evaluate/nope]"], "run 'runs/evaluate/nope' has no results.csv"),
    # a list given without its brackets: Hydra's words, then the spelling it wanted
    (["evaluate", "checkpoints=a.safetensors"], "a list is written in brackets: checkpoints=[a.safetensors]"),
    (["protect", "data.targets=usps,optdigits"],
     "for a list write data.targets=[usps,optdigits]; to sweep over the values, add -m"),
])
def test_a_bad_value_is_refused_before_torch_is_imported_and_before_a_run_directory_is_made(tmp_path, args,
                                                                                          fragment):
    """The command line runs the stage's checks on the composed config, and looks for its input
    checkpoints, first: a typo costs a second, not the seconds of importing torch, and leaves
    nothing behind."""
    import subprocess
    import sys

    probe = ("import sys; from ntp_ssl.cli import main; code = main(sys.argv[1:]); "
             "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); sys.exit(code)")
    quiet = [] if args[0] in ("domains", "report") else ["trainer.progress=false"]  # they have no trainer
    result = subprocess.run([sys.executable, "-c", probe, *args, *quiet], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout.strip() == "torch not imported"
    assert list(tmp_path.iterdir()) == []  # no runs/ folder, no run directory


def test_batch_larger_than_dataset_is_refused(cli):
    result = cli("pretrain", *TINY_DATA, "optim.epochs=1", "optim.batch_size=4096")
    assert result.returncode == 2
    assert "optim.batch_size=4096" in result.stderr


@pytest.mark.slow
def test_pretrain_end_to_end(cli, tmp_path):
    result = cli("pretrain", *TINY_DATA, *TINY_PRETRAIN, "run_name=tiny")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "pretrain" / "tiny"
    from ntp_ssl.shared.checkpoint import load_encoder

    encoder, meta, masks, _ = load_encoder(run_dir / "encoder.safetensors")
    assert meta["backbone"] == "small_cnn" and meta["method"] == "simclr" and masks == {}
    assert 0.0 <= meta["metrics"]["knn_top1_k20"] <= 1.0
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "pretrain.log").exists()
    tags = event_tags(run_dir / "tb")
    assert {"pretrain/loss", "pretrain/lr", "pretrain/knn_top1_k20", "pretrain/knn_top1_k200"} <= tags
    # The same command again finds the finished run and does not redo or overwrite it.
    before = (run_dir / "encoder.safetensors").stat().st_mtime_ns
    again = cli("pretrain", *TINY_DATA, *TINY_PRETRAIN, "run_name=tiny")
    assert again.returncode == 0 and (run_dir / "encoder.safetensors").stat().st_mtime_ns == before
    # A different config in the same run directory is refused, not mixed in.
    clash = cli("pretrain", *TINY_DATA, *TINY_PRETRAIN, "run_name=tiny", "optim.lr=0.01")
    assert clash.returncode == 2 and "different config" in clash.stderr


@pytest.mark.slow
def test_domains_command_lists_and_draws(cli, tmp_path):
    result = cli("domains", "data.image_size=16")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("mnist", "optdigits", "syndigits", "mnistm"):
        assert name in result.stdout
    sheet = tmp_path / "runs" / "domains" / "domains" / "contact_sheet.png"
    assert sheet.exists() and sheet.stat().st_size > 1000
    listing = json.loads((sheet.parent / "domains.json").read_text())
    assert {d["name"] for d in listing} == {"mnist", "optdigits", "syndigits", "mnistm"}


@pytest.mark.slow
def test_multirun_writes_one_run_directory_per_job(cli, tmp_path):
    result = cli("domains", "-m", "data.image_size=16,24", "names=[optdigits]")
    assert result.returncode == 0, result.stderr[-3000:]
    sheets = sorted((tmp_path / "runs" / "multirun" / "domains").rglob("contact_sheet.png"))
    assert [p.parent.name for p in sheets] == ["data.image_size=16,names=[optdigits]",
                                               "data.image_size=24,names=[optdigits]"]


@pytest.mark.slow
def test_multirun_with_the_parallel_joblib_launcher(cli, tmp_path):
    """The efficacy grid's local form: Hydra's joblib launcher runs the jobs in worker processes."""
    result = cli("domains", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "data.image_size=16,24",
                 "names=[optdigits]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    sheets = sorted((tmp_path / "runs" / "multirun" / "domains").rglob("contact_sheet.png"))
    assert [p.parent.name for p in sheets] == ["data.image_size=16,names=[optdigits]",
                                               "data.image_size=24,names=[optdigits]"]
    for sheet in sheets:
        hydra_cfg = (sheet.parent / ".hydra" / "hydra.yaml").read_text()
        assert "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher" in hydra_cfg


@pytest.mark.parametrize("name", ["../evaluate/X", "../../..", "", "a/b", ".."])
def test_a_run_name_that_is_not_one_folder_name_is_refused_before_anything_is_made(cli, tmp_path, name):
    """report with run_name=../evaluate/X used to overwrite another run's results; an empty name
    made runs/report itself the run directory."""
    result = cli("report", "runs=[somewhere]", f"run_name={name}")
    assert result.returncode == 2 and result.stderr.startswith("error: run_name=")
    assert "must be one folder name" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "evaluate").exists()


def test_stage_validation_refuses_an_unsafe_run_name_too():
    """A multirun reaches the stage without the command line's precheck."""
    from omegaconf import OmegaConf

    from ntp_ssl.config import PretrainConfig, validate_pretrain
    from ntp_ssl.errors import ConfigError

    cfg = OmegaConf.structured(PretrainConfig)
    cfg.run_name = "../x"
    with pytest.raises(ConfigError, match="run_name='../x' must be one folder name"):
        validate_pretrain(cfg)


def test_a_system_error_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """A full disk or a read-only folder (simulated: the tests may run as root) is `error: ...`, exit 2."""
    import errno

    from ntp_ssl import cli as cli_module

    def full_disk(cfg, run_dir):
        raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "encoder.safetensors"))

    monkeypatch.setattr(cli_module, "stage_runner", lambda stage: full_disk)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli_module.main(["pretrain", f"paths.root={tmp_path / 'runs'}", "run_name=disk"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot use '") and "No space left on device" in err and "paths.root" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
