"""encoders/ and configs/ install inside the package: no generic top-level module names."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_editable_install_maps_the_folders_into_the_package():
    import importlib.util

    import ntp_ssl.configs
    import ntp_ssl.encoders

    assert Path(ntp_ssl.encoders.__file__).parent == REPO / "encoders"
    assert Path(ntp_ssl.configs.__file__).parent == REPO / "configs"
    spec = importlib.util.find_spec("encoders")  # only the repo folder itself, when run from the repo root
    assert spec is None or Path(spec.origin).parent == REPO / "encoders"


@pytest.mark.slow
def test_built_wheel_holds_only_ntp_ssl(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next(tmp_path.glob("ntp_ssl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"ntp_ssl"}
    for required in ("ntp_ssl/encoders/small_cnn.py", "ntp_ssl/configs/pretrain.yaml", "ntp_ssl/configs/protect.yaml",
                     "ntp_ssl/configs/experiment/protect_label_free.yaml", "ntp_ssl/configs/hydra/default.yaml",
                     "ntp_ssl/shared/train.py", "ntp_ssl/pipeline.py"):
        assert required in names
    assert "ntp_ssl/configs/experiment/protect_magnitude.yaml" in names
