"""The evaluation folders kept under benchmarks/results/ are the evidence docs/RESULTS.md cites.

Each holds the raw rows (results.csv: one accuracy per model, domain, attack, seed and
fraction) beside the numbers made from them (summary.json: SLC-AUC per model, domain and
attack, with its interval, and the verdict lines). Folders were copied, merged
(merge_lr_grids.py) and re-summarised by hand over many sessions; here every stored summary
is recomputed from its own rows with the plain formula of the design, written out again
without the package's code, so a summary left stale beside edited rows, or rows from another
run, fails:

    AUC      = sum_i (ln r_i - ln r_{i-1}) * (a_i + a_{i-1}) / 2     (points sorted by r)
    SLC-AUC  = AUC(model) - AUC(scratch), per sweep seed, then the mean over seeds
    interval = mean -+ t(0.975, k - 1) * sd / sqrt(k) over the k seeds (none for one seed)
    verdict  = per attack, the mean over the target domains (the source, mnist, left out);
               "best": the mean over targets of the best attack on each
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
SOURCE = "mnist"  # every stored evaluation attacks from mnist; its rows are the source curve


def _stored_folders() -> list[Path]:
    return sorted(p.parent for p in RESULTS.rglob("summary.json") if (p.parent / "results.csv").is_file())


def _area(points: dict[float, float]) -> float:
    rs = sorted(points)
    return sum((math.log(b) - math.log(a)) * (points[a] + points[b]) / 2 for a, b in zip(rs, rs[1:]))


def _curves(folder: Path) -> dict[tuple, dict[float, float]]:
    curves: dict[tuple, dict[float, float]] = defaultdict(dict)
    with open(folder / "results.csv", newline="") as f:
        for row in csv.DictReader(f):
            key = (row["model"], row["domain"], row["attack"], int(row["seed"]))
            fraction = float(row["fraction"])
            assert fraction not in curves[key], f"{folder}: {key} has fraction {fraction} twice"
            curves[key][fraction] = float(row["accuracy"])
    return curves


def test_enough_stored_evaluations_to_check():
    # the check below must not pass by finding nothing
    assert len(_stored_folders()) >= 100


@pytest.mark.parametrize("folder", _stored_folders(), ids=lambda p: str(p.relative_to(RESULTS)))
def test_stored_summary_recomputes_from_its_rows(folder: Path):
    stats = pytest.importorskip("scipy.stats")
    curves = _curves(folder)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["summary"], f"{folder}: empty summary"
    for line in summary["summary"]:
        model, domain, attack = line["model"], line["domain"], line["attack"]
        values = []
        for (m, d, a, seed), points in sorted(curves.items()):
            if (m, d, a) != (model, domain, attack):
                continue
            scratch = curves[("scratch", domain, "scratch", seed)]
            assert set(points) == set(scratch), f"{folder}: {model} {domain} {attack} seed {seed} grid"
            values.append(_area(points) - _area(scratch))
        where = f"{folder.relative_to(RESULTS)}: {model} {domain} {attack}"
        assert len(values) == line["n_seeds"], where
        mean = sum(values) / len(values)
        assert line["slc_auc"] == pytest.approx(mean, abs=1e-9), where
        if len(values) > 1:
            half = stats.t.ppf(0.975, len(values) - 1) * stats.tstd(values) / math.sqrt(len(values))
            assert line["slc_auc_ci_low"] == pytest.approx(mean - half, abs=1e-6), where
            assert line["slc_auc_ci_high"] == pytest.approx(mean + half, abs=1e-6), where

    for verdict in summary.get("verdicts", []):
        lines = [line for line in summary["summary"] if line["model"] == verdict["model"]]
        on_targets = [line for line in lines if line["domain"] != SOURCE]
        best_per_target: dict[str, float] = {}
        for line in on_targets:
            best_per_target[line["domain"]] = max(best_per_target.get(line["domain"], -math.inf), line["slc_auc"])
        for attack, value in verdict["target_slc_auc"].items():
            if attack == "best":
                expected = sum(best_per_target.values()) / len(best_per_target)
            else:
                xs = [line["slc_auc"] for line in on_targets if line["attack"] == attack]
                expected = sum(xs) / len(xs)
            where = f"{folder.relative_to(RESULTS)}: verdict {verdict['model']} {attack}"
            assert value == pytest.approx(expected, abs=1e-9), where
