"""benchmarks/pool_draws.py: every (folder, protection seed) is one draw, paired with its own sparse
scratch; the pooled mean, interval and per-target means against a hand computation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from pool_draws import against, pool  # noqa: E402


def _run_folder(path: Path, values: dict[str, dict[str, float]], attack: str = "finetune_masked") -> Path:
    """A files folder whose summary holds ``values``: model -> target -> SLC-AUC, plus a row of
    another attack and another setup that must be left out."""
    rows = [{"model": model, "domain": target, "attack": attack, "slc_auc": value}
            for model, per_target in values.items() for target, value in per_target.items()]
    rows.append({"model": "label_free-seed1", "domain": "optdigits", "attack": "finetune_dense", "slc_auc": 9.0})
    rows.append({"model": "magnitude-seed1", "domain": "optdigits", "attack": attack, "slc_auc": 9.0})
    path.mkdir()
    (path / "summary.json").write_text(json.dumps({"summary": rows, "source_accuracy": {}, "verdicts": []}))
    return path


def test_pool_pairs_each_draw_with_its_own_sparse_scratch(tmp_path):
    a = _run_folder(tmp_path / "a", {
        "label_free-seed1": {"optdigits": -1.0, "mnistm": -0.2},
        "label_free-seed1-sparse_scratch": {"optdigits": -0.4, "mnistm": 0.0},
        "label_free-seed2": {"optdigits": -0.6, "mnistm": -0.4},
        "label_free-seed2-sparse_scratch": {"optdigits": -0.2, "mnistm": -0.2},
    })
    b = _run_folder(tmp_path / "b", {  # the same seed number on another machine: another draw
        "label_free-seed1": {"optdigits": -0.8, "mnistm": 0.0},
        "label_free-seed1-sparse_scratch": {"optdigits": -0.1, "mnistm": -0.1},
    })
    pooled = pool("label_free", [[a], [b]], "finetune_masked")
    units = [(Path(folder).name, seed, round(p, 9), round(s, 9)) for folder, seed, p, s in pooled["units"]]
    assert units == [("a", 1, -0.6, -0.2), ("a", 2, -0.5, -0.2), ("b", 1, -0.4, -0.1)]
    assert pooled["per_target"]["optdigits"]["protected"] == [-1.0, -0.6, -0.8]
    assert pooled["per_target"]["mnistm"]["sparse_scratch"] == [0.0, -0.2, -0.1]

    printed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pool_draws.py"), "label_free", str(a), str(b)],
                             capture_output=True, text=True, check=True).stdout
    diffs = [-0.4, -0.3, -0.3]  # protected minus its own sparse scratch, draw by draw
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = 4.302653 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]" in printed
    assert "optdigits: -0.800 / -0.233 / -0.567" in printed


def test_pool_refuses_a_folder_without_sparse_scratch(tmp_path):
    a = _run_folder(tmp_path / "a", {"label_free-seed1": {"optdigits": -1.0}})
    with pytest.raises(SystemExit, match="sparse_scratch"):
        pool("label_free", [[a]], "finetune_masked")


def test_pool_warns_about_a_draw_it_leaves_out(tmp_path, capsys):
    a = _run_folder(tmp_path / "a", {
        "label_free-seed1": {"optdigits": -1.0},
        "label_free-seed1-sparse_scratch": {"optdigits": -0.4},
        "label_free-seed2": {"optdigits": -0.6},  # no sparse scratch: not a complete draw
    })
    pooled = pool("label_free", [[a]], "finetune_masked")
    assert [seed for _, seed, _, _ in pooled["units"]] == [1]
    assert "label_free-seed2 left out" in capsys.readouterr().err


def test_against_pairs_a_control_folder_with_each_draw_folder(tmp_path):
    a = _run_folder(tmp_path / "a", {"label_free-seed1": {"optdigits": -1.0, "mnistm": -0.2},
                                     "label_free-seed1-sparse_scratch": {"optdigits": 0.0, "mnistm": 0.0}})
    b = _run_folder(tmp_path / "b", {"label_free-seed1": {"optdigits": -0.8, "mnistm": 0.0},
                                     "label_free-seed1-sparse_scratch": {"optdigits": 0.0, "mnistm": 0.0}})
    # the control's own runs; a third target in one of them is not read (the draw's targets are)
    ca = _run_folder(tmp_path / "ca", {"random_mask-seed1": {"optdigits": -0.4, "mnistm": 0.0, "syndigits": 5.0}})
    cb = _run_folder(tmp_path / "cb", {"random_mask-seed1": {"optdigits": -0.2, "mnistm": -0.2}})
    pairs, per_target = against("label_free", [[a], [b]], "random_mask", [[ca], [cb]], "finetune_masked")
    assert [(Path(f).name, s, round(p, 9), round(c, 9)) for f, s, p, c in pairs] == \
        [("a", 1, -0.6, -0.2), ("b", 1, -0.4, -0.2)]
    assert per_target["optdigits"] == {"protected": [-1.0, -0.8], "control": [-0.4, -0.2]}
    assert set(per_target) == {"optdigits", "mnistm"}

    printed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pool_draws.py"), "label_free", str(a), str(b),
                              "--against", f"random_mask={ca},{cb}"], capture_output=True, text=True, check=True).stdout
    diffs = [-0.4, -0.2]
    mean = sum(diffs) / 2
    half = 12.706205 * math.sqrt(sum((d - mean) ** 2 for d in diffs)) / math.sqrt(2)  # t_{0.975, 1}
    assert f"| {mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] |" in printed
    assert "optdigits: -0.900 / -0.300 / -0.600" in printed


def test_against_refuses_a_control_missing_a_target_or_a_folder(tmp_path):
    a = _run_folder(tmp_path / "a", {"label_free-seed1": {"optdigits": -1.0, "mnistm": -0.2},
                                     "label_free-seed1-sparse_scratch": {"optdigits": 0.0, "mnistm": 0.0}})
    ca = _run_folder(tmp_path / "ca", {"random_mask-seed1": {"optdigits": -0.4}})
    with pytest.raises(SystemExit, match=r"lacks random_mask-seed1 .*\['mnistm'\]"):
        against("label_free", [[a]], "random_mask", [[ca]], "finetune_masked")
    with pytest.raises(SystemExit, match="one control folder per draw folder"):
        against("label_free", [[a]], "random_mask", [[ca], [ca]], "finetune_masked")
    b = _run_folder(tmp_path / "b", {"label_free-seed1": {"optdigits": -1.0, "mnistm": -0.2},
                                     "label_free-seed1-sparse_scratch": {"optdigits": 0.0, "mnistm": 0.0}})
    cb = _run_folder(tmp_path / "cb", {"random_mask-seed1": {"optdigits": -0.4, "mnistm": 0.0}})
    with pytest.raises(SystemExit, match="names a control folder twice"):  # one control run paired with two draws
        against("label_free", [[a], [b]], "random_mask", [[cb], [cb]], "finetune_masked")


def test_a_draw_split_by_target_without_twin_against_a_control(tmp_path):
    # one draw measured in two runs (one target each) and evaluated without sparse scratch
    a1 = _run_folder(tmp_path / "a1", {"variant-seed1": {"optdigits": -1.0}, "variant-seed2": {"optdigits": -0.4}})
    a2 = _run_folder(tmp_path / "a2", {"variant-seed1": {"syndigits": -0.2}, "variant-seed2": {"syndigits": 0.0}})
    b = _run_folder(tmp_path / "b", {"variant-seed1": {"optdigits": -0.6, "syndigits": -0.2, "mnistm": 7.0}})
    ca = _run_folder(tmp_path / "ca", {"random_mask-seed1": {"optdigits": -0.2, "syndigits": 0.0},
                                       "random_mask-seed2": {"optdigits": 0.0, "syndigits": 0.2}})
    cb = _run_folder(tmp_path / "cb", {"random_mask-seed1": {"optdigits": 0.0, "syndigits": 0.0, "mnistm": 7.0}})
    with pytest.raises(SystemExit, match="sparse_scratch"):  # the twin is required unless said otherwise
        pool("variant", [[a1, a2]], "finetune_masked")
    shared = {"optdigits", "syndigits"}  # b's mnistm is left out: the other draw lacks it
    pooled = pool("variant", [[a1, a2], [b]], "finetune_masked", shared, twin=False)
    assert [(name, seed, round(p, 9), s) for name, seed, p, s in pooled["units"]] == \
        [("a1 (+1 runs)", 1, -0.6, None), ("a1 (+1 runs)", 2, -0.2, None), ("b", 1, -0.4, None)]
    pairs, per_target = against("variant", [[a1, a2], [b]], "random_mask", [[ca], [cb]], "finetune_masked", shared)
    assert [round(p - c, 9) for _, _, p, c in pairs] == [-0.5, -0.3, -0.4]
    assert set(per_target) == shared

    printed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pool_draws.py"), "variant", f"{a1}+{a2}", str(b),
                              "--no-twin", "--targets", "optdigits,syndigits", "--against", f"random_mask={ca},{cb}"],
                             capture_output=True, text=True, check=True).stdout
    diffs = [-0.5, -0.3, -0.4]
    mean = sum(diffs) / 3
    half = 4.302653 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)  # t_{0.975, 2}
    assert f"| {mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] |" in printed
    assert "optdigits: -0.667 / -0.067 / -0.600" in printed


def test_a_point_in_two_runs_of_one_draw_is_refused(tmp_path):
    a1 = _run_folder(tmp_path / "a1", {"variant-seed1": {"optdigits": -1.0}})
    a2 = _run_folder(tmp_path / "a2", {"variant-seed1": {"optdigits": -0.5}})
    with pytest.raises(SystemExit, match="in two runs of one draw"):
        pool("variant", [[a1, a2]], "finetune_masked", twin=False)
    with pytest.raises(SystemExit, match=r"holds \['optdigits'\] of --targets"):  # a draw lacking a wanted target
        pool("variant", [[a1]], "finetune_masked", {"optdigits", "mnistm"}, twin=False)
