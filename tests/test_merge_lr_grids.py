"""benchmarks/merge_lr_grids.py: a run of grid G merged with a run of the extra rates E gives the
rows of one run of grid G + E (the slow reference, run here), and the merge rule on its own."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ntp_ssl.config import SweepConfig
from ntp_ssl.data import Domain
from ntp_ssl.encoders import build_encoder
from ntp_ssl.evaluate.results import read_results, summarize, write_results
from ntp_ssl.evaluate.sweep import ModelUnderTest, run_sweep

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from merge_lr_grids import merge_rows  # noqa: E402

TINY = SweepConfig(fractions=[0.2, 1.0], seeds=[0], attacks=["linear", "finetune_dense"], epochs=2, min_steps=6,
                   max_steps=6, search_min_n=20, batch_size=16, probe_l2_grid=[1e-2], augment_shift=0)


def _domain() -> Domain:
    rng = np.random.default_rng(0)
    # two classes that differ in mean brightness, so the learning rates give different validation accuracies
    labels = np.arange(80) % 2
    images = (rng.integers(0, 120, (80, 16, 16, 3)) + 30 * labels[:, None, None, None]).astype(np.uint8)
    test_labels = np.arange(40) % 2
    test = (rng.integers(0, 120, (40, 16, 16, 3)) + 30 * test_labels[:, None, None, None]).astype(np.uint8)
    return Domain(name="toy", train_images=images, train_labels=labels, test_images=test, test_labels=test_labels,
                  num_classes=2)


def _key(row: dict) -> tuple:
    return (row["model"], row["domain"], row["attack"], int(row["seed"]), float(row["fraction"]))


def _run(grid: list[float]) -> dict[tuple, dict]:
    torch.manual_seed(0)  # the same encoder in every run
    model = ModelUnderTest("m", build_encoder("small_cnn", image_size=16), "small_cnn")
    rows = run_sweep([model], [_domain()], dataclasses.replace(TINY, lr_grid=grid), progress=False)
    return {_key(r): r for r in rows}


FIELDS = ("accuracy", "choice", "val_accuracy", "best_step", "steps", "n")


def test_a_merged_grid_is_the_run_of_the_whole_grid():
    base_grid, extra_grid = [1e-5, 3e-2], [1e-3]
    whole = _run(base_grid + extra_grid)
    merged, counts = merge_rows(_run(base_grid), _run(extra_grid))
    merged = {_key(r): r for r in merged}
    assert merged.keys() == whole.keys()
    for key in whole:
        assert [merged[key].get(f) for f in FIELDS] == [whole[key].get(f) for f in FIELDS], key
    # not vacuous: the extra rate won somewhere, and the searched points were compared
    assert any(r["choice"] == extra_grid[0] for r in whole.values())
    assert counts[("finetune_dense", "extra rate chosen")] + counts[("scratch", "extra rate chosen")] >= 1
    # and the SLC-AUC recomputed from the merged rows is the whole grid's
    assert summarize(list(merged.values())) == summarize(list(whole.values()))


def _row(attack: str, val, accuracy: float, choice=None, n: int = 100, steps: int = 10) -> dict:
    return {"model": "scratch" if attack == "scratch" else "m", "domain": "d", "attack": attack, "seed": 1,
            "fraction": 1.0, "n": n, "accuracy": accuracy, "choice": choice, "val_accuracy": val, "steps": steps,
            "best_step": 5}


def test_the_merge_rule_ties_go_to_the_base_and_unsearched_points_keep_it():
    base = {"tie": _row("finetune_dense", 0.5, 0.40, 1e-3), "better": _row("scratch", 0.5, 0.40, 1e-3),
            "worse": _row("finetune_masked", 0.7, 0.40, 1e-3), "none": _row("finetune_dense", None, 0.30, n=10),
            "frozen": _row("linear", 0.9, 0.80, 1e-2)}
    extra = {"tie": _row("finetune_dense", 0.5, 0.99, 1e-2), "better": _row("scratch", 0.6, 0.10, 1e-2),
             "worse": _row("finetune_masked", 0.6, 0.99, 1e-2), "none": _row("finetune_dense", None, 0.30, n=10)}
    merged, counts = merge_rows(base, extra)
    # the extra row is taken on a strictly higher validation accuracy alone, whatever its test accuracy
    assert [r["accuracy"] for r in merged] == [0.40, 0.10, 0.40, 0.30, 0.80]
    assert counts == Counter({("finetune_dense", "base grid kept"): 1, ("scratch", "extra rate chosen"): 1,
                              ("finetune_masked", "base grid kept"): 1, ("finetune_dense", "no search"): 1})


@pytest.mark.parametrize("extra, message", [
    ({"other": _row("finetune_dense", 0.5, 0.4)}, "base runs lack"),
    ({"p": _row("finetune_dense", 0.5, 0.4, steps=20)}, "n / steps differ"),
    ({"p": _row("finetune_dense", None, 0.4)}, "searched a learning rate in one run"),
])
def test_runs_of_different_protocols_are_refused(extra, message):
    with pytest.raises(SystemExit, match=message):
        merge_rows({"p": _row("finetune_dense", 0.5, 0.4)}, extra)


def test_the_command_writes_a_run_converged_table_reads_and_never_overwrites(tmp_path):
    def run_dir(name: str, rows: list[dict]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        write_results(rows, folder)
        folder.joinpath("summary.json").write_text(json.dumps({"summary": summarize(rows), "source_accuracy": {
            "m-seed1": {"linear": 0.9, "knn": 0.8}}}))
        return folder

    def rows(half: tuple, full: tuple) -> list[dict]:
        """scratch at 0.5 on both fractions; the model's (val accuracy, test accuracy) at each"""
        return [{**_row("scratch", 0.5, 0.5, 1e-3), "fraction": f, "n": int(100 * f)} for f in (0.5, 1.0)] + [
            {**_row("finetune_dense", val, acc, 1e-3), "model": "m-seed1", "fraction": f, "n": int(100 * f)}
            for f, (val, acc) in ((0.5, half), (1.0, full))]

    # the extra rate wins on validation at fraction 1.0 only (where its test accuracy is lower)
    base, extra = run_dir("base", rows((0.5, 0.8), (0.5, 0.6))), run_dir("extra", rows((0.4, 0.9), (0.7, 0.4)))
    out = tmp_path / "merged"
    command = [sys.executable, str(REPO / "benchmarks" / "merge_lr_grids.py"), str(out), "--base", str(base),
               "--extra", str(extra)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    merged = read_results(out / "results.csv")
    assert [r["accuracy"] for r in merged if r["model"] == "m-seed1"] == [0.8, 0.4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source_accuracy"] == {"m-seed1": {"linear": 0.9, "knn": 0.8}}
    # SLC-AUC: ln(1.0 / 0.5) x (mean of 0.8 and 0.4 minus scratch's 0.5)
    assert [round(s["slc_auc"], 6) for s in summary["summary"]] == [round(math.log(2) * 0.1, 6)]
    table = subprocess.run([sys.executable, str(REPO / "benchmarks" / "converged_table.py"), f"m={out}"],
                           capture_output=True, text=True, cwd=REPO)
    assert table.returncode == 0 and "+0.069" in table.stdout, table.stdout + table.stderr
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert again.returncode != 0 and "exists" in again.stderr
