"""Bad inputs: each gets a one-line error that names the value and what would work.

Together with the tests named in docs/RELIABILITY.md (test_config, test_cli,
test_checkpoint, test_data, test_evaluate, test_protect, test_pretrain), these are the
rows of the bad-input table there. Most checks run in-process (compose the real config,
call the stage or its validate_* function) because the point is the message; a handful
run the real command to show exit code 2, one `error:` line and no traceback.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import TINY_DATA, TINY_PRETRAIN
from ntp_ssl.shared.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from ntp_ssl.cli import config_dir
from ntp_ssl.config import register_schemas, validate_evaluate, validate_pretrain, validate_protect
from ntp_ssl.encoders import build_encoder
from ntp_ssl.errors import CheckpointError, ConfigError, DataError, NtpSslError

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _compose(stage: str, *overrides: str, cache_dir: Path | None = None):
    register_schemas()
    base = [*TINY_DATA] if stage in ("pretrain", "protect", "evaluate") else []
    if cache_dir is not None:
        base.append(f"paths.cache_dir={cache_dir}")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=stage, overrides=[*base, *overrides])


def _one_line(exc_info, *fragments: str) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert isinstance(exc_info.value, NtpSslError)  # the command prints it as `error: ...`, exit 2
    return message


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, cache_dir) -> Path:
    """A tiny finished pretrain run directory: encoder.safetensors (16x16, 3 channels) and last.safetensors."""
    from ntp_ssl.pretrain.stage import run_pretrain

    run_dir = tmp_path_factory.mktemp("bad-inputs-encoder")
    cfg = _compose("pretrain", *TINY_PRETRAIN, "optim.epochs=1", "trainer.projector=false", "data.targets=[optdigits]",
                   cache_dir=cache_dir)
    run_pretrain(cfg, run_dir)
    return run_dir


# ----------------------------------------------------------------------------- config values (start-up checks)


@pytest.mark.parametrize(
    "stage,override,fragment",
    [
        ("pretrain", "optim.momentum=-1", "optim.momentum=-1.0 must be in [0, 1)"),
        ("pretrain", "method.hidden_dim=0", "method.hidden_dim=0 must be > 0"),
        ("pretrain", "method.projection_dim=-4", "method.projection_dim=-4 must be > 0"),
        ("pretrain", "trainer.device=cuda:x", "trainer.device='cuda:x' is not one of"),
        ("pretrain", "trainer.projector_samples=0", "trainer.projector_samples=0 must be > 0"),
        ("pretrain", "seed=-1", "seed=-1 must be an integer from 0 to 2147483647"),
        ("pretrain", "seed=100000000000000000000", "seed=100000000000000000000 must be an integer from 0 to"),
        ("pretrain", "data.seed=-2", "data.seed=-2 must be an integer from 0 to"),
        ("protect", "admm.rho_schedule=adaptive", "admm.rho_schedule='adaptive' is not one of: geometric, balanced"),
        ("protect", "admm.rho_balance_tau=1", "admm.rho_balance_tau=1.0 must be > 1"),
        ("protect", "admm.lr_final=0", "admm.lr_final=0.0 must be > 0"),
        ("protect", "admm.retrain_loss=target", "admm.retrain_loss='target' is not one of: null (the protection loss), source"),
        ("evaluate", "data.split=val", "data.split='val' is not one of: test, validation"),
        ("protect", "loss.w_source_distill=-1", "loss.w_source_distill=-1.0 must be >= 0"),
        ("protect", "loss.sim_modes=[both]", "loss.sim_modes=['both']; accepted: a non-empty list of masked, dense"),
        ("protect", "loss.sim_every=0", "loss.sim_every=0 must be an integer >= 1"),
        ("protect", "loss.sim_penalty=kl", "loss.sim_penalty='kl' is not one of: uniform, fisher"),
        ("protect", "loss.w_source_relational=-2", "loss.w_source_relational=-2.0 must be >= 0"),
        ("protect", "admm.batch_size=1", "admm.batch_size=1 must be >= 2 (batch norm needs two samples)"),
        ("evaluate", "sweep.scratch=false", "sweep.scratch=False: every SLC-AUC is measured against the from-scratch"),
        ("evaluate", "sweep.seeds=[2147483648]", "sweep.seeds contains 2147483648; every seed must be an integer"),
        ("pretrain", "data.train_limit=-1", "data.train_limit=-1 must be >= 0"),
        ("pretrain", "optim.epochs=0", "optim.epochs=0 must be > 0"),
        ("pretrain", "method.momentum_base=1.5", "method.momentum_base=1.5 must be in [0, 1]"),
        ("pretrain", "+optim.lrr=0.1", "unknown config key(s) optim.lrr"),
        ("protect", "admm.weight_decay=-1", "admm.weight_decay=-1.0 must be >= 0"),
        ("protect", "admm.rho_max=0.001", "admm.rho_max=0.001 must be >= admm.rho=0.1"),
        ("protect", "admm.iterations=-1", "admm.iterations=-1 must be >= 0"),
        ("protect", "loss.w_mmd=-1", "loss.w_mmd=-1.0 must be >= 0"),
        ("protect", "pretrain.optim.lr=0", "optim.lr=0.0 must be > 0"),
        ("protect", "+loss.w_typo=1", "loss.w_typo is not a key of loss=ssl"),
        ("evaluate", "sweep.weight_decay=-1", "sweep.weight_decay=-1.0 must be >= 0"),
        ("evaluate", "sweep.seeds=[0,-1]", "sweep.seeds contains -1"),
        ("evaluate", "sweep.steps=-1", "sweep.steps=-1 must be >= 0"),
        ("evaluate", "sweep.knn_k=0", "sweep.knn_k=0 must be > 0"),
        ("evaluate", "names=[a,b]", "names has 2 entries but checkpoints has 1"),
    ],
)
def test_bad_config_values_fail_at_start_with_one_line(stage, override, fragment):
    overrides = [override, "checkpoints=[x.safetensors]"] if stage == "evaluate" else [override]
    cfg = _compose(stage, *overrides)
    validate = {"pretrain": validate_pretrain, "protect": validate_protect, "evaluate": validate_evaluate}[stage]
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    _one_line(info, fragment)


def test_the_shipped_configs_have_no_unknown_keys():
    from ntp_ssl.config import SCHEMAS, unknown_keys

    for stage, schema in SCHEMAS.items():
        assert unknown_keys(_compose(stage), schema) == [], stage
    for path in sorted((config_dir() / "experiment").glob("*.yaml")):
        stage = "pretrain" if path.stem.startswith("pretrain") else "protect"
        assert unknown_keys(_compose(stage, f"experiment={path.stem}"), SCHEMAS[stage]) == [], path.name


def test_cuda_device_without_cuda_is_one_line():
    from ntp_ssl.shared.train import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError) as info:
        resolve_device("cuda")
    _one_line(info, "trainer.device='cuda'", "no CUDA device", "trainer.device=cpu")


def test_batches_larger_than_the_data_are_clamped_not_errors():
    """admm.batch_size and sweep.batch_size larger than the data: accepted, one batch is the whole set."""
    from ntp_ssl.shared.train import batch_indices, endless_batches

    batches = list(batch_indices(7, 64, 3, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [7, 7, 7]
    dataset = torch.utils.data.TensorDataset(torch.arange(10.0))
    assert len(next(endless_batches(dataset, 4096, seed=0, workers=0))[0]) == 10


# ----------------------------------------------------------------------------- run directories


def test_a_run_directory_with_work_from_another_config_is_refused(tmp_path):
    from ntp_ssl.shared.runs import claim_run_dir

    first = _compose("pretrain", "optim.lr=0.1")
    assert claim_run_dir(tmp_path, first) is False
    (tmp_path / "last.safetensors").write_bytes(b"work")
    assert claim_run_dir(tmp_path, first) is True  # the same config resumes
    with pytest.raises(ConfigError) as info:
        claim_run_dir(tmp_path, _compose("pretrain", "optim.lr=0.01"))
    _one_line(info, "holds a run with a different config", "optim.lr: 0.1 -> 0.01", "run_name=NEW_NAME")
    # presentation keys are not part of the config a run directory belongs to
    assert claim_run_dir(tmp_path, _compose("pretrain", "optim.lr=0.1", "trainer.threads=2")) is True


def test_a_run_directory_left_by_a_start_up_error_is_taken_over_by_the_corrected_command(tmp_path):
    """`ntp-ssl pretrain optim.batch_size=4096` stops at start-up; the corrected command, same run name, runs."""
    from ntp_ssl.shared.runs import claim_run_dir

    bad = _compose("pretrain", "optim.batch_size=4096")
    good = _compose("pretrain", "optim.batch_size=64")
    run_dir = tmp_path / "run"
    claim_run_dir(run_dir, bad)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("x: 1\n")
    (run_dir / "pretrain.log").write_text("error\n")
    (run_dir / "machine.json").write_text("[]\n")  # start_stage records the machine before start-up checks end
    (run_dir / "tb").mkdir()
    assert claim_run_dir(run_dir, good) is False
    assert json.loads((run_dir / "run_config.json").read_text())["optim"]["batch_size"] == 64
    (run_dir / "tb" / "events.out.tfevents.1").write_bytes(b"x")  # once it has logged anything, it is a run
    with pytest.raises(ConfigError, match="different config"):
        claim_run_dir(run_dir, bad)


def _hold_in_another_process(run_dir: Path):
    """A process holding ``run_dir``'s lock until its stdin closes."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from ntp_ssl.shared.runs import lock_run_dir; "
            f"lock_run_dir(Path({str(run_dir)!r})); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_run_directory_belongs_to_one_process_at_a_time(tmp_path):
    from ntp_ssl.shared.runs import claim_run_dir, lock_run_dir, release_run_dir

    run_dir = tmp_path / "run"
    holder = _hold_in_another_process(run_dir)
    try:
        with pytest.raises(ConfigError) as info:
            claim_run_dir(run_dir, _compose("pretrain", "optim.lr=0.1"))
        _one_line(info, "is in use by another run (pid ", "run_name=NEW_NAME")
        assert not (run_dir / "run_config.json").exists()  # refused before anything was written
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert claim_run_dir(run_dir, _compose("pretrain", "optim.lr=0.1")) is False  # released with its process
    lock_run_dir(run_dir)  # re-entrant in the holding process
    release_run_dir(run_dir)
    release_run_dir(run_dir)  # a no-op when not held


def test_a_second_command_on_a_busy_run_directory_is_one_line(cli, tmp_path):
    holder = _hold_in_another_process(tmp_path / "runs" / "pretrain" / "busy")
    try:
        result = cli("pretrain", *TINY_DATA, "run_name=busy")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: run directory") and "is in use by another run" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "pretrain" / "busy" / ".hydra").exists()  # nothing written into the busy run


# ----------------------------------------------------------------------------- checkpoints


def _run_evaluate(tmp_path: Path, cache_dir: Path, *overrides: str):
    from ntp_ssl.evaluate.stage import run_evaluate

    cfg = _compose("evaluate", "data.targets=[optdigits]", "sweep.fractions=[1.0]", "sweep.seeds=[0]", "sweep.steps=1",
                   *overrides, cache_dir=cache_dir)
    return run_evaluate(cfg, tmp_path / "evaluate-run")


def test_evaluate_with_a_missing_checkpoint(tmp_path, cache_dir):
    with pytest.raises(CheckpointError) as info:
        _run_evaluate(tmp_path, cache_dir, f"checkpoints=[{tmp_path / 'nope.safetensors'}]")
    _one_line(info, "nope.safetensors", "does not exist", "a .safetensors file or a run directory")


def test_evaluate_with_one_channel_data_and_a_three_channel_checkpoint(tmp_path, cache_dir, pretrained):
    with pytest.raises(ConfigError) as info:
        _run_evaluate(tmp_path, cache_dir, f"checkpoints=[{pretrained / 'encoder.safetensors'}]", "data.channels=1")
    _one_line(info, "built for 16x16 images with 3 channel(s)", "data.channels=1", "set them to match")


def test_evaluate_with_two_checkpoints_of_the_same_name(tmp_path, cache_dir, pretrained):
    copy = tmp_path / "copy"  # another file whose name (its stem) is also 'encoder'
    copy.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(pretrained / f"encoder{suffix}", copy / f"encoder{suffix}")
    with pytest.raises(ConfigError) as info:
        _run_evaluate(tmp_path, cache_dir,
                      f"checkpoints=[{pretrained / 'encoder.safetensors'},{copy / 'encoder.safetensors'}]")
    _one_line(info, "model names ['encoder', 'encoder'] are not unique", "names=[...]")


def test_evaluate_refuses_one_checkpoint_listed_twice_or_a_name_given_twice(tmp_path, cache_dir, pretrained):
    path = pretrained / "encoder.safetensors"
    with pytest.raises(ConfigError) as info:  # under two names it would be attacked twice
        _run_evaluate(tmp_path, cache_dir, f"checkpoints=[{path},{path}]", "names=[a,b]")
    _one_line(info, f"checkpoints lists {str(path.resolve())!r} twice", "list each checkpoint once")
    with pytest.raises(ConfigError) as info:  # a run directory and the file in it are one checkpoint
        _run_evaluate(tmp_path, cache_dir, f"checkpoints=[{pretrained},{pretrained / 'encoder.json'}]", "names=[a,b]")
    _one_line(info, f"checkpoints lists {str(path.resolve())!r} twice")
    with pytest.raises(ConfigError) as info:
        _run_evaluate(tmp_path, cache_dir, f"checkpoints=[{path},{tmp_path / 'other.safetensors'}]", "names=[a,a]")
    _one_line(info, "names=['a', 'a'] gives 'a' twice", "its own name")
    assert not (tmp_path / "evaluate-run").exists()  # refused before the run directory is made


def test_a_training_state_is_not_an_encoder(tmp_path, cache_dir, pretrained):
    with pytest.raises(CheckpointError) as info:
        _run_evaluate(tmp_path, cache_dir, f"checkpoints=[{pretrained / 'last.safetensors'}]")
    _one_line(info, "last.safetensors", "is a resumable training state, not an encoder", "encoder.safetensors")


def test_a_folder_without_an_encoder(tmp_path, cache_dir):
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(CheckpointError) as info:
        _run_evaluate(tmp_path, cache_dir, f"checkpoints=[{tmp_path / 'empty-run'}]")
    _one_line(info, "empty-run", "holds no encoder.safetensors or protected.safetensors")


def test_a_plain_pt_state_dict_does_not_say_what_built_it(tmp_path, cache_dir):
    torch.save({"features.0.weight": torch.zeros(2)}, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError) as info:
        _run_evaluate(tmp_path, cache_dir, f"checkpoints=[{tmp_path / 'weights.pt'}]")
    _one_line(info, "weights.pt", "does not say which backbone built it")


def test_checkpoints_of_two_backbones_in_one_evaluation():
    from ntp_ssl.encoders import build_encoder
    from ntp_ssl.config import SweepConfig
    from ntp_ssl.evaluate.sweep import ModelUnderTest, run_sweep

    settings = SweepConfig(fractions=[1.0], seeds=[0], attacks=["knn"], steps=1, batch_size=8,
                           knn_k=5)
    models = [ModelUnderTest("a", build_encoder("small_cnn", image_size=16), "small_cnn"),
              ModelUnderTest("b", build_encoder("vgg11_bn", image_size=16), "vgg11_bn")]
    with pytest.raises(ConfigError) as info:
        run_sweep(models, [], settings, progress=False)
    _one_line(info, "mix backbones ['small_cnn', 'vgg11_bn']", "one architecture per run")


def test_checkpoint_metadata_that_is_not_json(tmp_path):
    path = save_checkpoint(tmp_path / "encoder", {"w": torch.zeros(2)}, {"backbone": "small_cnn"})
    path.with_suffix(".json").write_text('{"backbone": "small_')
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    _one_line(info, "encoder.json", "is not valid JSON")


def test_a_file_that_matches_its_hash_but_is_not_safetensors(tmp_path):
    path = tmp_path / "encoder.safetensors"
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    path.with_suffix(".json").write_text(json.dumps({"sha256": sha256_file(path), "backbone": "small_cnn"}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    _one_line(info, "is not a readable safetensors file")


def _run_protect(tmp_path: Path, cache_dir: Path, *overrides: str):
    from ntp_ssl.pipeline import run_main_job

    cfg = _compose("protect", "data.targets=[optdigits]", "evaluate=false", "admm.iterations=1",
                   "admm.steps_per_iteration=1", "admm.retrain_steps=0", *overrides, cache_dir=cache_dir)
    return run_main_job(cfg, tmp_path / "protect-run")


def test_protect_of_a_protected_checkpoint(tmp_path, cache_dir, pretrained):
    tensors, meta = load_checkpoint(pretrained / "encoder.safetensors")
    mask = {"mask.features.0.weight": (tensors["encoder.features.0.weight"] != 0).to(torch.uint8)}
    protected = save_checkpoint(tmp_path / "protected", {**tensors, **mask},
                                {k: v for k, v in meta.items() if k != "sha256"})
    with pytest.raises(ConfigError) as info:
        _run_protect(tmp_path, cache_dir, f"checkpoint={protected}")
    _one_line(info, "protected.safetensors", "is already protected", "protect an unprotected encoder")


def test_protect_with_a_missing_checkpoint(tmp_path, cache_dir):
    with pytest.raises(CheckpointError) as info:
        _run_protect(tmp_path, cache_dir, f"checkpoint={tmp_path / 'missing.safetensors'}")
    _one_line(info, "missing.safetensors", "does not exist")


def test_protect_with_another_image_size_than_the_checkpoint(tmp_path, cache_dir, pretrained):
    with pytest.raises(ConfigError) as info:
        _run_protect(tmp_path, cache_dir, f"checkpoint={pretrained / 'encoder.safetensors'}", "data.image_size=32")
    _one_line(info, "built for 16x16 images", "data.image_size=32")


def test_protect_for_another_source_than_the_encoders_pretraining_one_says_so(tmp_path, cache_dir, pretrained, caplog):
    checkpoint = f"checkpoint={pretrained / 'encoder.safetensors'}"
    with caplog.at_level(logging.WARNING, logger="ntp_ssl"):
        _run_protect(tmp_path, cache_dir, checkpoint, "data.source=syndigits")
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "pretrained on" in r.getMessage()]
    assert said == ["the encoder was pretrained on 'mnist'; it is protected for data.source='syndigits', which the "
                    "source-side numbers measure"], said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ntp_ssl"):  # its own source, spelt otherwise: nothing to say
        _run_protect(tmp_path / "again", cache_dir, checkpoint, "data.source=' MNIST '")
    assert not [r for r in caplog.records if "pretrained on" in r.getMessage()]


# ----------------------------------------------------------------------------- report


def test_report_with_no_runs():
    from ntp_ssl.evaluate.stage import run_report

    with pytest.raises(ConfigError) as info:
        run_report(_compose("report"), Path("unused"))
    _one_line(info, "runs=[] is empty")


def test_report_of_a_run_without_results(tmp_path):
    from ntp_ssl.evaluate.stage import run_report

    (tmp_path / "pretrain-run").mkdir()
    with pytest.raises(ConfigError) as info:
        run_report(_compose("report", f"runs=[{tmp_path / 'pretrain-run'}]"), tmp_path / "report")
    _one_line(info, "pretrain-run", "has no results.csv")


def test_report_of_a_damaged_results_file(tmp_path):
    from ntp_ssl.evaluate.stage import run_report

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.csv").write_text("model,domain,attack,seed,fraction,n,accuracy\nssl,optdigits,linear,zero,")
    with pytest.raises(DataError) as info:
        run_report(_compose("report", f"runs=[{tmp_path / 'run'}]"), tmp_path / "report")
    _one_line(info, "results.csv", "is not a results table")


def test_report_refuses_runs_with_different_scratch_baselines(tmp_path):
    """report scores every gathered model against one scratch curve per domain: runs whose
    baselines differ (another protocol or machine) are refused, not silently mixed."""
    from ntp_ssl.evaluate.stage import run_report

    header = "model,domain,attack,seed,fraction,n,accuracy\n"

    def run(name: str, scratch_at_half: float) -> Path:
        (tmp_path / name).mkdir()
        curves = (("ssl", "linear", (0.5, 0.7)), ("scratch", "scratch", (scratch_at_half, 0.9)))
        rows = "".join(f"{model},optdigits,{attack},0,{r},{int(r * 100)},{acc}\n"
                       for model, attack, accs in curves for r, acc in zip((0.5, 1.0), accs))
        (tmp_path / name / "results.csv").write_text(header + rows)
        return tmp_path / name

    a, same, other = run("a", 0.6), run("same", 0.6), run("other", 0.4)
    result = run_report(_compose("report", f"runs=[{a},{same}]"), tmp_path / "report-same")
    assert {line["model"] for line in result["summary"]} == {"a/ssl", "same/ssl"}
    with pytest.raises(ConfigError) as info:
        run_report(_compose("report", f"runs=[{a},{other}]"), tmp_path / "report-other")
    _one_line(info, str(a), str(other), "different from-scratch baselines", "optdigits", "0.6", "0.4")


# ----------------------------------------------------------------------------- the real command: exit 2, one line


def _npz_with_mismatched_lengths(folder: Path) -> Path:
    path = folder / "bad.npz"
    np.savez(path, x=np.zeros((3, 8, 8), np.uint8), y=np.zeros(2, np.int64))
    return path


@pytest.mark.parametrize(
    "case",
    ["evaluate-missing-checkpoint", "report-without-results", "npz-length-mismatch", "missing-folder",
     "negative-momentum", "unknown-plus-key", "protect-negative-weight-decay"],
)
def test_the_command_exits_2_with_one_error_line(cli, tmp_path, case):
    args = {
        "evaluate-missing-checkpoint": (["evaluate", *TINY_DATA, "checkpoints=[nope.safetensors]",
                                         "data.targets=[optdigits]"], "'nope.safetensors' does not exist"),
        "report-without-results": (["report", f"runs=[{tmp_path}]"], "has no results.csv"),
        "npz-length-mismatch": (["pretrain", *TINY_DATA, f"data.source=npz:{_npz_with_mismatched_lengths(tmp_path)}"],
                                "'y' has 2 labels but 'x' has 3 images"),
        "missing-folder": (["pretrain", *TINY_DATA, f"data.source=folder:{tmp_path / 'no-such-folder'}"],
                           "no-such-folder' does not exist"),
        "negative-momentum": (["pretrain", *TINY_DATA, "optim.momentum=-1"], "optim.momentum=-1.0 must be in [0, 1)"),
        "unknown-plus-key": (["pretrain", *TINY_DATA, "+optim.lrr=0.1"], "unknown config key(s) optim.lrr"),
        "protect-negative-weight-decay": (["protect", *TINY_DATA, "checkpoint=x.safetensors", "admm.weight_decay=-1"],
                                          "admm.weight_decay=-1.0 must be >= 0"),
    }
    command, fragment = args[case]
    result = cli(*command, env_extra=ONE_THREAD)
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr[-3000:]


def test_a_run_root_that_is_a_file_is_one_line(cli, tmp_path):
    (tmp_path / "afile").write_text("")
    result = cli("pretrain", *TINY_DATA, "paths.root=afile", env_extra=ONE_THREAD)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_a_value_of_the_wrong_type_is_one_line_exit_2(cli):
    result = cli("pretrain", "optim.lr=fast", env_extra=ONE_THREAD)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "optim.lr" in lines[0]


# ----------------------------------------------------------------------------- degenerate data


def _npz_cfg(tmp_path, **arrays):
    from types import SimpleNamespace

    np.savez(tmp_path / "d.npz", **arrays)
    data = SimpleNamespace(image_size=16, channels=3, seed=0, root=None, download=False, train_limit=0, test_limit=0)
    return SimpleNamespace(data=data, paths=SimpleNamespace(cache_dir=str(tmp_path / "cache")))


def test_a_domain_nothing_can_be_measured_on_is_one_line(tmp_path):
    from ntp_ssl.data import load_domains_for

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (40, 16, 16), dtype=np.uint8)
    cfg = _npz_cfg(tmp_path, x=x, y=np.arange(40) % 4, x_test=x[:0], y_test=np.zeros(0, np.int64))
    with pytest.raises(DataError) as info:  # it used to score 0.0
        load_domains_for(cfg, [f"npz:{tmp_path / 'd.npz'}"])
    _one_line(info, "has no test images")
    cfg = _npz_cfg(tmp_path, x=x, y=np.zeros(40, np.int64))
    with pytest.raises(DataError) as info:  # it used to score 1.0
        load_domains_for(cfg, [f"npz:{tmp_path / 'd.npz'}"])
    _one_line(info, "has a single class (0) in its train split")


def test_a_folder_with_only_one_split_folder_is_refused(tmp_path):
    from PIL import Image

    from ntp_ssl.data import load_domain

    for label in ("a", "b"):
        (tmp_path / "f" / "train" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "f" / "train" / label / f"{i}.png")
    with pytest.raises(DataError) as info:  # "train" used to become the one class
        load_domain(f"folder:{tmp_path / 'f'}", image_size=16, cache_dir=tmp_path)
    _one_line(info, "has a train/ folder but no test/")


def test_an_encoder_with_nan_weights_is_refused(tmp_path):
    from ntp_ssl.shared.checkpoint import load_encoder, save_checkpoint

    encoder = build_encoder("small_cnn", image_size=16)
    tensors = {f"encoder.{k}": v.clone() for k, v in encoder.state_dict().items()}
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name].view(-1)[0] = float("nan")
    path = save_checkpoint(tmp_path / "nan", tensors, {"backbone": "small_cnn", "image_size": 16, "channels": 3})
    with pytest.raises(CheckpointError) as info:  # it used to score chance level under kNN, exit 0
        load_encoder(path)
    _one_line(info, f"tensor {name[len('encoder.'):]!r} holds NaN or infinite values")


def test_a_binary_results_file_is_one_line(tmp_path):
    from ntp_ssl.evaluate.results import read_results

    path = tmp_path / "results.csv"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(DataError) as info:  # was a UnicodeDecodeError traceback from `report`
        read_results(path)
    _one_line(info, "is not UTF-8 text")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height (a decompression bomb's header), with one tiny IDAT."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


def test_a_huge_image_in_a_folder_domain_is_one_line(tmp_path):
    from PIL import Image

    from ntp_ssl.data import load_domain

    for label in ("a", "b"):
        (tmp_path / "f" / label).mkdir(parents=True)
        for i in range(5):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "f" / label / f"{i}.png")
    _png_header_only(tmp_path / "f" / "a" / "bomb.png", 50_000, 50_000)  # PIL's own bomb check: was a traceback
    with pytest.raises(DataError) as info:
        load_domain(f"folder:{tmp_path / 'f'}", image_size=16, cache_dir=tmp_path)
    _one_line(info, "cannot read image", "bomb.png", "decompression bomb")
    _png_header_only(tmp_path / "f" / "a" / "bomb.png", 5_000, 5_000)  # under PIL's limit, still gigabytes decoded
    with pytest.raises(DataError) as info:
        load_domain(f"folder:{tmp_path / 'f'}", image_size=16, cache_dir=tmp_path)
    _one_line(info, "is 5000x5000; accepted: up to 16777216 pixels")


def test_an_npz_label_of_1e12_is_one_line(tmp_path):
    from ntp_ssl.data import load_domain

    y = np.arange(40) % 4
    y[0] = 10**12  # the class count would be 1e12 + 1
    np.savez(tmp_path / "l.npz", x=np.zeros((40, 16, 16), np.uint8), y=y)
    with pytest.raises(DataError) as info:
        load_domain(f"npz:{tmp_path / 'l.npz'}", image_size=16, cache_dir=tmp_path)
    _one_line(info, "has label 1000000000000; accepted: labels 0..99999")


def test_a_rerun_whose_image_folder_was_edited_in_place_is_refused(tmp_path):
    """An uncompressed image edited in place keeps its byte size: the folder's digest must read
    the pixels, not only the names and sizes."""
    from PIL import Image

    from ntp_ssl.shared.runs import claim_run_dir
    from ntp_ssl.shared.stage import input_digests

    for cls in ("c0", "c1"):
        (tmp_path / "f" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "f" / cls / "a.bmp")
    spec = f"folder:{tmp_path / 'f'}"
    cfg = _compose("evaluate", "checkpoints=[x]")
    run_dir = tmp_path / "run"
    assert claim_run_dir(run_dir, cfg, inputs=input_digests([], [spec])) is False
    (run_dir / "results.csv").write_text("work")
    size = (tmp_path / "f" / "c1" / "a.bmp").stat().st_size
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "f" / "c1" / "a.bmp")
    assert (tmp_path / "f" / "c1" / "a.bmp").stat().st_size == size  # the case a listing missed
    with pytest.raises(ConfigError) as info:
        claim_run_dir(run_dir, cfg, inputs=input_digests([], [spec]))
    _one_line(info, "holds a run with a different config (inputs.domain folder:")


@pytest.mark.parametrize("damaged", ['{"seed": 0', "null", "[1, 2]", "\xff\xfe"])
def test_a_run_directory_whose_config_file_is_damaged_is_neither_resumed_nor_overwritten(tmp_path, damaged):
    """run_config.json is written atomically; a disk or a hand can still damage it. Then which
    config made the work beside it is unknown: refused while work is there, taken over when
    there is none."""
    from ntp_ssl.shared.runs import claim_run_dir

    cfg = _compose("evaluate", "checkpoints=[x]")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run_config.json").write_bytes(damaged.encode("latin-1"))
    (run_dir / "sweep_progress.json").write_text("[]")
    with pytest.raises(ConfigError) as info:
        claim_run_dir(run_dir, cfg)
    _one_line(info, "holds work but its run_config.json is not a config")
    assert (run_dir / "run_config.json").read_bytes() == damaged.encode("latin-1")  # left as it was
    (run_dir / "sweep_progress.json").unlink()
    assert claim_run_dir(run_dir, cfg) is False  # nothing but bookkeeping: the run directory is taken over
    assert claim_run_dir(run_dir, cfg) is True


def test_a_rerun_whose_input_file_was_swapped_is_refused(tmp_path):
    """A run directory records what it read by content: the same path with other bytes is another run."""
    from ntp_ssl.shared.runs import claim_run_dir
    from ntp_ssl.shared.stage import input_digests

    checkpoint = save_checkpoint(tmp_path / "encoder", {"w": torch.zeros(2)}, {"backbone": "small_cnn"})
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.arange(4))
    domains = [f"npz:{tmp_path / 'd.npz'}", "optdigits"]
    cfg = _compose("evaluate", f"checkpoints=[{checkpoint}]")
    run_dir = tmp_path / "run"
    assert claim_run_dir(run_dir, cfg, inputs=input_digests([str(checkpoint)], domains)) is False
    assert claim_run_dir(run_dir, cfg, inputs=input_digests([str(checkpoint)], domains)) is True  # resumes
    (run_dir / "results.csv").write_text("work")
    save_checkpoint(checkpoint, {"w": torch.ones(2)}, {"backbone": "small_cnn"})  # swapped under the same path
    with pytest.raises(ConfigError) as info:
        claim_run_dir(run_dir, cfg, inputs=input_digests([str(checkpoint)], domains))
    _one_line(info, "holds a run with a different config (inputs.checkpoint ")
    save_checkpoint(checkpoint, {"w": torch.zeros(2)}, {"backbone": "small_cnn"})
    np.savez(tmp_path / "d.npz", x=np.ones((4, 8, 8), np.uint8), y=np.arange(4))  # other pixels, same name
    with pytest.raises(ConfigError, match="inputs.domain npz:"):
        claim_run_dir(run_dir, cfg, inputs=input_digests([str(checkpoint)], domains))
    legacy = json.loads((run_dir / "run_config.json").read_text())
    legacy.pop("inputs")  # a run directory made before inputs were recorded still resumes
    (run_dir / "run_config.json").write_text(json.dumps(legacy))
    assert claim_run_dir(run_dir, cfg, inputs=input_digests([str(checkpoint)], domains)) is True


def test_a_fifo_given_as_a_checkpoint_does_not_hang_the_input_digest(tmp_path):
    import os

    from ntp_ssl.shared.stage import input_digests

    fifo = tmp_path / "enc.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="is not a regular file"):
        input_digests([str(fifo)], [])
