"""Tables of `ntp-ssl evaluate` runs whose models are one setup's protection seeds.

Each ``SETUP=FILES_DIR`` names a folder holding an evaluate run's ``summary.json`` and
``results.csv`` (as copied under ``benchmarks/results/converged_syndigits/``), its models named
``<setup>-seed<k>`` (a folder's other models are left out, so one run holding two setups can
be read as either); several folders may be given for one setup (``SETUP=DIR1,DIR2``: seeds
measured in separate runs of the same protocol), and ``DIR@k`` reads the model named just
``<setup>`` as protection seed k (``unprotected=DIR@1`` for the unprotected encoder).
``SETUP=GROUP1+GROUP2`` joins runs of the same protocol with different sweep seeds (each group
a comma list as above): a protection seed's numbers are then the mean over the groups that
hold it (a warning names a seed, or a seed's attack, that some group lacks, and the tables mark
such a cell with ``*``: it mixes groups), so the interval is still over protection seeds. The
same join averages over targets (RESULTS' "syndigits and mnistm together"). A run holding
several targets (``data.targets=[...]``) is read as the mean over its targets, each weighed
equally: each target is its own group, with the same warnings and marks. ``--targets a,b``
reads only those targets of every run; a pair of setups over different target sets is
printed with a warning (its difference mixes targets). The accuracy-by-n
table is printed per target.
Printed: per setup, the mean SLC-AUC of each attack over the protection seeds with a 95%
t-interval and the source linear / kNN accuracy (a run with ``sparse_scratch=[...]`` adds a
row "SETUP sparse scratch" for its ``-sparse_scratch`` models); each setup minus each other,
paired by protection seed (a setup of one model, such as ``unprotected=DIR@1``, is paired
with every seed of the other, the interval over those seeds); and the dense (or
``--curve-attack``) fine-tune's test accuracy at each target's five largest sample counts (or
``--curve-n``) beside scratch.

    .venv/bin/python benchmarks/converged_table.py \\
        label_free_admm=benchmarks/results/converged_syndigits/files_label_free_admm \\
        magnitude=benchmarks/results/converged_syndigits/files_magnitude
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_efficacy import ATTACK_LABELS, _cell  # noqa: E402

from ntp_ssl.evaluate.sweep import SPARSE_SCRATCH_SUFFIX as SPARSE_SCRATCH  # noqa: E402

ATTACKS = tuple(a for a in ATTACK_LABELS if a != "best")  # bench_efficacy's column order
SEED = re.compile(r"-seed(\d+)$")
CURVE_POINTS = 5  # the accuracy-by-n table's default columns: each target's largest sample counts


def parse_model(model: str, default: int | None = None) -> tuple[str, str, int | None]:
    """(setup, "" or SPARSE_SCRATCH, protection seed) of ``<setup>[-seed<k>][-sparse_scratch]``;
    without a seed suffix the seed is ``default``."""
    kind = SPARSE_SCRATCH if model.endswith(SPARSE_SCRATCH) else ""
    name = model[: len(model) - len(kind)]
    match = SEED.search(name)
    if match is None:
        return name, kind, default
    return name[: match.start()], kind, int(match.group(1))


def read_setup(setup: str, folders: list[tuple[Path, int | None]]) -> dict[str, dict[str, tuple]]:
    """Per target, then per model kind ("" for the setup's own models, SPARSE_SCRATCH for their
    sparse scratch): (per seed: attack SLC-AUC and source accuracy), (attack -> seed -> (target,
    n) -> accuracy), (scratch: (target, n) -> accuracy); a kind the folders lack has empty dicts.
    A run of several targets gives one entry per target, which ``main`` joins like '+' groups
    (the targets' grids share n, hence the target in the curve keys). A seed measured in two
    folders keeps the first folder's numbers. Only the models of ``setup`` are read; a folder
    without one is an error."""
    kinds = ("", SPARSE_SCRATCH)
    metrics: dict[str, dict] = defaultdict(lambda: {kind: defaultdict(dict) for kind in kinds})
    curves: dict[str, dict] = defaultdict(lambda: {kind: defaultdict(lambda: defaultdict(dict)) for kind in kinds})
    scratch: dict[str, dict] = defaultdict(dict)

    def ours(model: str, default_seed: int | None) -> tuple[str, int | None]:
        name, kind, seed = parse_model(model, default_seed)
        return kind, seed if name == setup else None

    for folder, default_seed in folders:
        summary = json.loads((folder / "summary.json").read_text())
        rows = [(*ours(row["model"], default_seed), row) for row in summary["summary"]]
        if all(seed is None for _, seed, _ in rows):
            held = sorted({row["model"] for row in summary["summary"]})
            hint = "" if default_seed is not None else f" (a model named just {setup!r} needs DIR@k)"
            raise SystemExit(f"error: {folder} holds no model of setup {setup!r}{hint}; it holds {held}")
        targets = sorted({row["domain"] for row in summary["summary"]})
        for kind, seed, row in rows:
            if seed is not None:
                metrics[row["domain"]][kind][seed].setdefault(row["attack"], float(row["slc_auc"]))
        for model, acc in summary["source_accuracy"].items():
            kind, seed = ours(model, default_seed)
            if seed is not None:
                for target in targets:  # the source is the same for every target of the run
                    metrics[target][kind][seed]["source_linear"] = float(acc["linear"])
                    metrics[target][kind][seed]["source_knn"] = float(acc["knn"])
        with open(folder / "results.csv", newline="") as handle:
            per_n: dict[tuple[str, str, int, tuple[str, int]], list[float]] = defaultdict(list)
            for row in csv.DictReader(handle):
                point = (row["domain"], int(row["n"]))
                if row["attack"] == "scratch":
                    scratch[row["domain"]][point] = float(row["accuracy"])
                    continue
                kind, seed = ours(row["model"], default_seed)
                if seed is not None:
                    per_n[(kind, row["attack"], seed, point)].append(float(row["accuracy"]))
            for (kind, attack, seed, point), values in per_n.items():
                curves[point[0]][kind][attack][seed].setdefault(point, sum(values) / len(values))
    return {target: {kind: (dict(metrics[target][kind]), curves[target][kind], scratch[target]) for kind in kinds}
            for target in sorted({*metrics, *curves, *scratch})}


def merge_sweep_seeds(name: str, groups: list[tuple]):
    """read_setup's triple averaged over sweep-seed groups, key by key, and the (seed, key) pairs
    averaged over only some groups (a key a group lacks is averaged over the groups that have it,
    with a warning: that mean weighs the groups, targets or sweep seeds, unlike the others')."""
    def mean_of(dicts: list[dict]) -> dict:
        keys = {k for d in dicts for k in d}
        return {k: sum(d[k] for d in dicts if k in d) / sum(k in d for d in dicts) for k in keys}

    seeds = {s for metrics, _, _ in groups for s in metrics}
    partial = set()
    for seed in sorted(seeds):
        held = [m[seed] for m, _, _ in groups if seed in m]
        if len(held) < len(groups):
            print(f"warning: {name}: protection seed {seed} is in {len(held)} of {len(groups)} '+' groups; "
                  "its numbers average those only", file=sys.stderr)
        for key in sorted({k for m in held for k in m}):
            count = sum(key in m for m in held)
            if count < len(held):
                print(f"warning: {name}: {key} of protection seed {seed} is in {count} of its {len(held)} "
                      "'+' groups; its number averages those only", file=sys.stderr)
            if count < len(groups):
                partial.add((seed, key))
    metrics = {s: mean_of([m[s] for m, _, _ in groups if s in m]) for s in seeds}
    curves: dict = defaultdict(dict)
    for attack in {a for _, c, _ in groups for a in c}:
        for seed in {s for _, c, _ in groups for s in c.get(attack, {})}:
            curves[attack][seed] = mean_of([c[attack][seed] for _, c, _ in groups if seed in c.get(attack, {})])
    return metrics, curves, mean_of([sc for _, _, sc in groups]), partial


def fmt_ci(values: list[float]) -> str:
    """bench_efficacy's cell (mean and 95% t-interval), a lone seed marked as such."""
    return _cell(values) + (" (1 seed)" if len(values) == 1 else "")


def parse_group(group: str) -> list[tuple[Path, int | None]]:
    """``DIR[@k],DIR[@k]...``: the folders of one sweep seed, each checked to hold an evaluate run."""
    paths = []
    for spec in group.split(","):
        path, _, seed = spec.partition("@")
        if seed and not seed.isdigit():
            raise SystemExit(f"error: {spec!r}: the seed after '@' must be a whole number")
        if not (Path(path) / "summary.json").is_file() or not (Path(path) / "results.csv").is_file():
            raise SystemExit(f"error: {path} holds no summary.json and results.csv of an evaluate run")
        paths.append((Path(path), int(seed) if seed else None))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("setups", nargs="+", help="SETUP=FILES_DIR[,FILES_DIR...][+FILES_DIR...] (+: another sweep seed or target)")
    parser.add_argument("--curve-attack", default="finetune_dense")
    parser.add_argument("--curve-n", default=None,
                        help="comma list of sample counts for every target's accuracy-by-n table "
                             f"(default: each target's {CURVE_POINTS} largest)")
    parser.add_argument("--targets", default=None,
                        help="comma list: read only these targets of every run (default: all each run holds)")
    args = parser.parse_args(argv)
    wanted = set(args.targets.split(",")) if args.targets else None
    setups, targets_of = {}, {}
    for item in args.setups:
        name, sep, folders = item.partition("=")
        if not sep or not folders:
            raise SystemExit(f"error: {item!r} is not SETUP=FILES_DIR[,FILES_DIR...][+FILES_DIR...]")
        # one group per '+' group and target: a run of several targets is read as the mean over them
        by_target = [(target, by_kind) for group in folders.split("+")
                     for target, by_kind in read_setup(name, parse_group(group)).items()
                     if wanted is None or target in wanted]
        if not by_target:
            raise SystemExit(f"error: setup {name!r} holds none of --targets {args.targets!r}")
        targets_of[name] = {target for target, _ in by_target}
        read = [by_kind for _, by_kind in by_target]
        setups[name] = merge_sweep_seeds(name, [by_kind[""] for by_kind in read])
        # a run with sparse_scratch=[...] also holds each model's mask on a random
        # initialisation: its own row, paired with the setup's by protection seed below
        sparse = merge_sweep_seeds(f"{name} sparse scratch", [by_kind[SPARSE_SCRATCH] for by_kind in read])
        if sparse[0]:
            setups[f"{name} sparse scratch"] = sparse
            targets_of[f"{name} sparse scratch"] = targets_of[name]

    attacks = [a for a in ATTACKS if any(a in m for metrics, *_ in setups.values() for m in metrics.values())]
    print("| setup | seeds | " + " | ".join(attacks) + " | source linear | source kNN |")
    print("|---|---|" + "---|" * (len(attacks) + 2))
    for name, (metrics, _, _, partial) in setups.items():
        seeds = sorted(metrics)
        cells = []
        for a in attacks:
            values = [metrics[s][a] for s in seeds if a in metrics[s]]
            # '*': some seed's number averages only some '+' groups (see the warnings)
            star = " *" if any((s, a) in partial for s in seeds) else ""
            cells.append(fmt_ci(values) + star if values else "")
        src = []
        for key in ("source_linear", "source_knn"):  # blank where no run measured the source
            values = [metrics[s][key] for s in seeds if key in metrics[s]]
            src.append(f"{sum(values) / len(values):.3f}" if values else "")
        print(f"| {name} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " | " + " | ".join(src) + " |")
    if any(partial for *_, partial in setups.values()):
        print("\n\\* mixes '+' groups: some protection seed's number is the mean over only the groups that "
              "hold it (the warnings say which)")

    names = list(setups)
    print("\nPaired by protection seed (first minus second):\n")
    print("| difference | seeds | " + " | ".join(attacks) + " | source kNN |")
    print("|---|---|" + "---|" * (len(attacks) + 1))
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            (a, _, _, partial_a), (b, _, _, partial_b) = setups[first], setups[second]
            if targets_of[first] != targets_of[second]:  # a mean over other targets is not a pair
                print(f"warning: {first} holds targets {sorted(targets_of[first])} and {second} "
                      f"{sorted(targets_of[second])}: their difference mixes target sets; pass --targets "
                      "to compare the same ones", file=sys.stderr)
            # one side a single model (the unprotected encoder, read as one seed): every seed of
            # the other minus it (the cross product), the interval over the other's seeds alone
            if len(a) == 1 < len(b) or len(b) == 1 < len(a):
                pairs = [(sa, sb) for sa in sorted(a) for sb in sorted(b)]
                label = ",".join(map(str, sorted(a if len(a) > 1 else b))) + " (vs its one model)"
            else:
                common = sorted(set(a) & set(b))
                pairs, label = [(s, s) for s in common], ",".join(map(str, common))
            if len(pairs) < 2:
                continue
            cells = []
            for key in (*attacks, "source_knn"):
                held = [(sa, sb) for sa, sb in pairs if key in a[sa] and key in b[sb]]
                star = " *" if any((sa, key) in partial_a or (sb, key) in partial_b for sa, sb in held) else ""
                diffs = [a[sa][key] - b[sb][key] for sa, sb in held]
                cells.append(fmt_ci(diffs) + star if len(diffs) > 1 else "")
            print(f"| {first} - {second} | {label} | " + " | ".join(cells) + " |")

    given = [int(n) for n in args.curve_n.split(",")] if args.curve_n else None
    scratch = next(iter(setups.values()))[2]
    for target in sorted({t for t, _ in scratch}):
        # the targets' grids differ (n = fraction x train size), so by default each its own columns
        ns = given or sorted({n for t, n in scratch if t == target})[-CURVE_POINTS:]
        print(f"\n{args.curve_attack} on {target}: test accuracy by number of target samples "
              "(mean over protection seeds)\n")
        print("| model | " + " | ".join(str(n) for n in ns) + " |")
        print("|---|" + "---:|" * len(ns))
        print("| scratch | " + " | ".join(f"{scratch[(target, n)]:.3f}" if (target, n) in scratch else ""
                                         for n in ns) + " |")
        for name, (_, curves, *_) in setups.items():
            by_seed = curves.get(args.curve_attack, {})
            cells = []
            for n in ns:
                values = [c[(target, n)] for c in by_seed.values() if (target, n) in c]
                cells.append(f"{sum(values) / len(values):.3f}" if values else "")
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
