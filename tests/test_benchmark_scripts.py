"""The encoder-search shell scripts in benchmarks/, run on a stub of the CLI: which encoders they
pretrain with which overrides, which runs they attack, and that finished runs are not redone.
(A real run takes an hour; the bug these guard against, a baseline that silently followed the
config default and so compared an encoder with itself, needs only the command lines.)"""

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or not Path("/usr/bin/time").exists(),
                                reason="needs bash and /usr/bin/time")

# Records its arguments and leaves the files the scripts look for (a pretrained encoder, an
# evaluate run's summary), as the real `ntp-ssl pretrain` / `ntp-ssl evaluate` would.
STUB = textwrap.dedent("""\
    #!/usr/bin/env bash
    echo "$*" >> "$STUB_LOG"
    for word in "$@"; do
      case $word in run_name=*) name=${word#run_name=} ;; paths.root=*) root=${word#paths.root=} ;; esac
    done
    case $1 in
      pretrain) mkdir -p "$root/pretrain/$name" && touch "$root/pretrain/$name/encoder.safetensors" ;;
      evaluate) mkdir -p "$root/evaluate/$name" && echo '{}' > "$root/evaluate/$name/summary.json" &&
                printf '# %s\\nline two\\n' "$name" > "$root/evaluate/$name/summary.md" ;;
    esac
    """)


def _run(script: str, out: Path, tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    stub = tmp_path / "ntp-ssl-stub"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    done = subprocess.run(["bash", str(REPO / "benchmarks" / script), str(out)], capture_output=True, text=True,
                          env={**os.environ, "NTP_SSL_BIN": str(stub), "STUB_LOG": str(log), **env})
    return done, log.read_text().splitlines() if log.exists() else []


def _calls(calls: list[str], command: str, name: str) -> list[str]:
    return [c for c in calls if c.startswith(command + " ") and f"run_name={name} " in c + " "]


def test_encoder_schedule_pins_the_old_baseline_and_reports_the_chosen_lever(tmp_path):
    out = tmp_path / "out"
    done, calls = _run("encoder_schedule.sh", out, tmp_path, CHOSEN="b32", PSEEDS="0 1")
    assert done.returncode == 0, done.stderr
    # the baseline is the batch-256 encoder whatever the config's default is now
    for name in ("default", "default_pseed1"):
        (call,) = _calls(calls, "pretrain", name)
        assert "optim.batch_size=256" in call.split()
    (chosen,) = _calls(calls, "pretrain", "b32_pseed1")
    assert {"seed=1", "optim.batch_size=32"} <= set(chosen.split())
    assert "optim.batch_size=256" not in chosen.split()
    # step 1 on the validation split with sweep seed 0, step 2 on the test split with sweep seeds 1 2
    (val,) = _calls(calls, "evaluate", "val_b32")
    assert {"data.split=validation", "sweep.seeds=[0]", "sweep=main_job"} <= set(val.split())
    (test,) = _calls(calls, "evaluate", "test_pseed1")
    assert "data.split=validation" not in test and "sweep.seeds=[1,2]" in test.split()
    assert f"checkpoints=[{out}/runs/pretrain/default_pseed1/encoder.safetensors," in test
    assert "names=[default_pseed1,b32_pseed1]" in test.split()
    # a second run redoes nothing: every pretrain and evaluate run is found finished
    again, calls_again = _run("encoder_schedule.sh", out, tmp_path, CHOSEN="b32", PSEEDS="0 1")
    assert again.returncode == 0 and calls_again == calls


def test_encoder_schedule_refuses_a_lever_it_does_not_have(tmp_path):
    done, _ = _run("encoder_schedule.sh", tmp_path / "out", tmp_path, STEP1="0", CHOSEN="b16")
    assert done.returncode == 2 and "CHOSEN=b16 is not a lever" in done.stderr and "b32" in done.stderr


def test_encoder_levers_pins_the_old_default_batch_on_every_encoder(tmp_path):
    done, calls = _run("encoder_levers.sh", tmp_path / "out", tmp_path)
    assert done.returncode == 0, done.stderr
    pretrains = [c for c in calls if c.startswith("pretrain ")]
    assert len(pretrains) == 9  # default, six levers, two for pretraining seed 1
    assert all("optim.batch_size=256" in c.split() for c in pretrains)
    (wide,) = _calls(calls, "pretrain", "wide")
    assert "encoder.backbone=small_cnn_wide" in wide.split()
