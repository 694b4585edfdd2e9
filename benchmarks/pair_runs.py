"""Pair two runs of the same sweep made with one setting changed (e.g. ``sweep.precision``).

Reads each run directory's ``results.csv`` and ``summary.json`` and prints, row by row, the
fine-tune accuracies and chosen learning rates of both (a model's mask-kept row that only
repeats its dense one, as for an encoder without a mask, is left out), the mean, spread and
range of the differences, how often the same learning rate was chosen, whether the frozen
attacks (linear probe, kNN) agree exactly, and each model's target and source SLC-AUC side
by side.

Usage: ``python benchmarks/pair_runs.py RUN_DIR_A RUN_DIR_B [--quiet]``
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

FROZEN = ("linear", "knn")


def read_rows(run_dir: Path) -> dict[tuple[str, str, str, str], dict[str, str]]:
    with open(run_dir / "results.csv", newline="") as f:
        return {(r["model"], r["domain"], r["attack"], r["fraction"]): r for r in csv.DictReader(f)}


def repeats_dense(rows: dict, key: tuple[str, str, str, str]) -> bool:
    model, domain, attack, fraction = key
    dense = rows.get((model, domain, "finetune_dense", fraction))
    return attack == "finetune_masked" and dense is not None and dense == {**rows[key], "attack": "finetune_dense"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--quiet", action="store_true", help="only the totals and the SLC-AUCs")
    args = parser.parse_args()
    rows_a, rows_b = read_rows(args.run_a), read_rows(args.run_b)
    if set(rows_a) != set(rows_b):
        raise SystemExit(f"the runs hold different rows: {sorted(set(rows_a) ^ set(rows_b))[:5]}")
    diffs, same_lr, searched, frozen_equal, frozen = [], 0, 0, 0, 0
    for key in sorted(rows_a):
        a, b = rows_a[key], rows_b[key]
        if key[2] in FROZEN:
            frozen += 1
            frozen_equal += a["accuracy"] == b["accuracy"]
            continue
        if repeats_dense(rows_a, key):
            continue
        diff = float(b["accuracy"]) - float(a["accuracy"])
        diffs.append(diff)
        if a["choice"]:
            searched += 1
            same_lr += a["choice"] == b["choice"]
        if not args.quiet:
            print(*key, f"{float(a['accuracy']):.3f} {float(b['accuracy']):.3f} {diff:+.3f}",
                  a["choice"] or "-", b["choice"] or "-")
    spread = (f"B - A mean {statistics.mean(diffs):+.4f}, sd {statistics.stdev(diffs) if len(diffs) > 1 else 0:.4f}, "
              f"range {min(diffs):+.3f} to {max(diffs):+.3f}; " if diffs else "")
    print(f"fine-tune and scratch rows: {len(diffs)}; {spread}the same learning rate at {same_lr} of {searched} "
          f"searched points; frozen-attack accuracies equal at {frozen_equal} of {frozen}")
    summary_a = json.loads((args.run_a / "summary.json").read_text())
    summary_b = json.loads((args.run_b / "summary.json").read_text())
    for va, vb in zip(summary_a["verdicts"], summary_b["verdicts"]):
        pairs = ", ".join(f"{k} {va['target_slc_auc'][k]:+.3f} / {vb['target_slc_auc'][k]:+.3f}"
                          for k in va["target_slc_auc"] if k != "best")
        print(f"{va['model']}: target SLC-AUC (A / B) {pairs}; source SLC-AUC "
              f"{va['source']['slc_auc']:+.3f} / {vb['source']['slc_auc']:+.3f}; source kNN "
              f"{va['source']['knn']:.3f} / {vb['source']['knn']:.3f}")


if __name__ == "__main__":
    main()
