"""Widen an evaluate run's learning-rate grid after the fact: merge it with a run of the extra rates.

The attacker of ``ntp-ssl evaluate`` (ntp_ssl/evaluate/attack.py) trains one model per learning
rate of ``sweep.lr_grid``, each from the same seed on the same validation split of its n
samples, and keeps the one with the best validation accuracy (on a tie, the earlier rate).
Each rate's fit is independent of the others, so a run with the grid ``G`` and a run with the
grid ``E`` (the same protocol otherwise) together hold what one run with the grid ``G + E``
would choose: for each point (model, domain, attack, seed, fraction), the base row unless the
extra row's validation accuracy is strictly higher (the tie goes to ``G``, which comes first).
Points without a search (fewer than ``sweep.search_min_n`` samples: the preset rate, no
validation split) are the same in both runs and keep the base row. Scratch is merged the same
way, and the SLC-AUC recomputed from the merged rows with the library's ``summarize``.

Nothing reads a test split to choose: the test accuracy is carried along with the row that the
validation accuracy picked.

    .venv/bin/python benchmarks/merge_lr_grids.py OUT_DIR --base DIR[,DIR...] --extra DIR[,DIR...]

Each DIR holds an evaluate run's ``results.csv`` and ``summary.json`` (the base folders' source
accuracies are carried over). OUT_DIR gets ``results.csv``, ``results.json`` and ``summary.json``,
which ``benchmarks/converged_table.py`` reads like any run's; an existing OUT_DIR is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from ntp_ssl.evaluate.results import read_results, row_key, summarize, write_results
from ntp_ssl.io import atomic_write_json

FROZEN_ATTACKS = ("linear", "knn")  # no learning rate: never in an extra run's grid


def _rows_of(folders: list[Path]) -> dict[tuple, dict]:
    """The rows of several runs by point; a point two runs share (scratch, typically) must agree."""
    rows: dict[tuple, dict] = {}
    for folder in folders:
        for row in read_results(folder / "results.csv"):
            key = row_key(row)
            if key in rows and rows[key]["accuracy"] != row["accuracy"]:
                raise SystemExit(f"error: {folder} and an earlier folder disagree on {key}: accuracy "
                                 f"{rows[key]['accuracy']} against {row['accuracy']}; give runs of one protocol")
            rows.setdefault(key, row)
    return rows


def _searched(row: dict) -> bool:
    return row.get("val_accuracy") is not None  # read_results gives None for an empty cell


def merge_rows(base: dict[tuple, dict], extra: dict[tuple, dict]) -> tuple[list[dict], Counter]:
    """Every base row, each replaced by the extra row of its point when that one's validation
    accuracy is strictly higher; and a count of (attack, outcome) for the report.
    An extra point the base lacks, or a point searched in one run and not the other, is an error."""
    missing = sorted(set(extra) - set(base))
    if missing:
        raise SystemExit(f"error: the base runs lack {len(missing)} point(s) of the extra runs, e.g. {missing[0]}; "
                         "give the base runs of every model, attack and seed the extra runs hold")
    merged, counts = [], Counter()
    for key, row in base.items():
        other, attack = extra.get(key), row["attack"]
        if other is None:
            if attack not in FROZEN_ATTACKS:
                counts[(attack, "base only")] += 1
            merged.append(row)
            continue
        if int(other["n"]) != int(row["n"]) or other.get("steps") != row.get("steps"):
            raise SystemExit(f"error: {key}: n / steps differ between the runs ({row['n']}/{row.get('steps')} "
                             f"against {other['n']}/{other.get('steps')}); give runs of one protocol")
        if _searched(row) != _searched(other):
            raise SystemExit(f"error: {key} searched a learning rate in one run and not in the other")
        if not _searched(row):
            counts[(attack, "no search")] += 1
            merged.append(row)
        elif float(other["val_accuracy"]) > float(row["val_accuracy"]):
            counts[(attack, "extra rate chosen")] += 1
            merged.append(other)
        else:
            counts[(attack, "base grid kept")] += 1
            merged.append(row)
    return merged, counts


def _source_accuracy(folders: list[Path]) -> dict:
    accuracy: dict = {}
    for folder in folders:
        accuracy.update(json.loads((folder / "summary.json").read_text()).get("source_accuracy") or {})
    return accuracy


def _folders(spec: str) -> list[Path]:
    folders = [Path(part) for part in spec.split(",") if part]
    for folder in folders:
        if not (folder / "results.csv").is_file() or not (folder / "summary.json").is_file():
            raise SystemExit(f"error: {folder} holds no results.csv and summary.json of an evaluate run")
    if not folders:
        raise SystemExit(f"error: {spec!r} names no folder; accepted: DIR[,DIR...]")
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the merged results.csv / results.json / summary.json")
    parser.add_argument("--base", required=True, help="DIR[,DIR...]: the runs of the base grid")
    parser.add_argument("--extra", required=True, help="DIR[,DIR...]: the runs of the extra learning rates")
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; give a new folder (nothing is overwritten)")
    base_folders, extra_folders = _folders(args.base), _folders(args.extra)
    merged, counts = merge_rows(_rows_of(base_folders), _rows_of(extra_folders))
    source_accuracy = _source_accuracy(base_folders)
    summary = summarize(merged, source_accuracy=source_accuracy)
    args.out.mkdir(parents=True)
    write_results(merged, args.out)
    atomic_write_json(args.out / "summary.json", {
        "summary": summary, "source_accuracy": source_accuracy,
        "merged_from": {"base": [str(f) for f in base_folders], "extra": [str(f) for f in extra_folders]},
    })
    for (attack, outcome), count in sorted(counts.items()):
        print(f"{attack}: {outcome} at {count} point(s)", file=sys.stderr)


if __name__ == "__main__":
    main()
