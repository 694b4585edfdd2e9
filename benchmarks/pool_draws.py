"""One setup's protected encoders pooled over independent draws, each beside its own sparse scratch.

The same protection seed protected on two machines gives two different encoders (the CPUs'
floating-point kernels differ and training follows another path; docs/RESULTS.md), so runs
from two machines cannot be paired seed by seed as sweep seeds of one encoder can
(``converged_table.py``'s ``+``). Each (folder, protection seed) here is its own draw: one
protected encoder with its own mask on a random initialisation (``-sparse_scratch``), attacked
under the folder's sweep seed. Printed, over all draws: the mean SLC-AUC of the attack with a
95% t-interval for the protected encoders, their sparse scratch, and the paired difference
(protected minus its own sparse scratch, draw by draw); then the per-target means. Each
folder's number for a model is its mean over the run's targets, each weighed equally.

    .venv/bin/python benchmarks/pool_draws.py label_free \\
        benchmarks/results/converged_cl/files_label_free_cl_lr_grid5_masked \\
        benchmarks/results/converged_cl/files_label_free_cl_grid5_sweep2

``--against random_mask=FOLDER,FOLDER`` adds a control measured in its own runs, one folder per
draw folder and in the same order (same machine and sweep seed): each draw is paired with the
control's model of the same protection seed on the same targets, and the difference (protected
minus control) is pooled over the draws like the sparse-scratch one.

A draw measured in several runs, one per target, is one argument ``DIR+DIR+...``, in the draw
list and in ``--against`` alike (each target in one run only). ``--targets a,b`` reads only
those targets (every draw must hold each of them), so draws measured on different target sets
can be pooled over the ones they share. ``--no-twin`` pools a setup evaluated
without sparse scratch (``sparse_scratch=[]``; a setup on a random support, whose "own mask on
a random initialisation" is the random-mask control): its draws are the protected models alone,
compared with the controls of ``--against``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from ntp_ssl.evaluate.sweep import SPARSE_SCRATCH_SUFFIX

sys.path.insert(0, str(Path(__file__).parent))
from converged_table import fmt_ci, parse_model  # noqa: E402


def read_draws(setup: str, folders: list[Path], attack: str,
               targets: set[str] | None = None) -> dict[int, dict[str, dict[str, float]]]:
    """protection seed -> {"protected" | "sparse_scratch": {target: SLC-AUC of ``attack``}} of one
    draw's runs (one run, or one run per target), only ``targets`` when given."""
    draws: dict[int, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for folder in folders:
        summary = json.loads((folder / "summary.json").read_text())
        for row in summary["summary"]:
            name, kind, seed = parse_model(row["model"])
            if name != setup or seed is None or row["attack"] != attack:
                continue
            if targets is not None and row["domain"] not in targets:
                continue
            values = draws[seed]["sparse_scratch" if kind == SPARSE_SCRATCH_SUFFIX else "protected"]
            if row["domain"] in values:  # two runs of one draw measured the same point: which to read?
                raise SystemExit(f"error: {row['model']} on {row['domain']} under {attack!r} is in two runs of "
                                 f"one draw ({'+'.join(map(str, folders))}); accepted: one run per target")
            values[row["domain"]] = float(row["slc_auc"])
    return {seed: dict(kinds) for seed, kinds in draws.items()}


def draw_name(folders: list[Path]) -> str:
    """The draw's label in tables: its run folder's name (the first, for a draw split by target)."""
    return folders[0].name + (f" (+{len(folders) - 1} runs)" if len(folders) > 1 else "")


def pool(setup: str, draws_folders: list[list[Path]], attack: str, targets: set[str] | None = None,
         twin: bool = True) -> dict:
    """The draws of every folder (each seed with both kinds on the same targets; with ``twin=False``
    the protected models alone), their means over targets, and the per-target lists; an incomplete
    draw is left out with a warning, and a folder without a complete draw is an error. A unit is
    (draw, seed, protected, sparse scratch or None)."""
    units, per_target = [], defaultdict(lambda: defaultdict(list))
    kinds_needed = {"protected", "sparse_scratch"} if twin else {"protected"}
    for folders in draws_folders:
        draws = read_draws(setup, folders, attack, targets)
        complete = {s: {k: d[k] for k in kinds_needed} for s, d in draws.items()
                    if kinds_needed <= set(d) and (not twin or d["protected"].keys() == d["sparse_scratch"].keys())}
        name = draw_name(folders)
        for seed in sorted(set(draws) - set(complete)):
            print(f"warning: {name}: {setup}-seed{seed} left out: it lacks its {SPARSE_SCRATCH_SUFFIX} twin "
                  f"under {attack!r} or the two hold different targets", file=sys.stderr)
        if not complete:
            accepted = ("an evaluate run with sparse_scratch=[...], or --no-twin" if twin
                        else f"a run holding {setup}-seed<k> under that attack")
            raise SystemExit(f"error: {name} holds no {setup}-seed<k> model"
                             f"{f' with its {SPARSE_SCRATCH_SUFFIX} twin' if twin else ''} under attack {attack!r}"
                             f"{f' on {sorted(targets)}' if targets else ''}; accepted: {accepted}")
        for seed in sorted(complete):
            kinds = complete[seed]
            if targets is not None and set(kinds["protected"]) != targets:  # a mean over fewer targets mixes
                raise SystemExit(f"error: {name}: {setup}-seed{seed} holds {sorted(kinds['protected'])} of --targets "
                                 f"{sorted(targets)}; accepted: targets every draw holds")
            means = {kind: sum(v.values()) / len(v) for kind, v in kinds.items()}
            units.append((name, seed, means["protected"], means.get("sparse_scratch")))
            for kind, values in kinds.items():
                for target, value in values.items():
                    per_target[target][kind].append(value)
    return {"units": units, "per_target": per_target}


def against(setup: str, folders: list[list[Path]], control: str, control_folders: list[list[Path]],
            attack: str, targets: set[str] | None = None) -> tuple[list[tuple], dict[str, dict[str, list[float]]]]:
    """(folder, seed, protected, control) per draw: the control's ``control-seed<k>`` in the control
    folder paired with ``folders[i]``, averaged over the protected model's targets; and per target the
    two lists. A draw whose control model or targets are missing is an error (a mixed pair is not a
    paired difference)."""
    if len(folders) != len(control_folders):
        raise SystemExit(f"error: --against gave {len(control_folders)} folders for {len(folders)} draw folders; "
                         "accepted: one control folder per draw folder, in the same order")
    named = [f for group in control_folders for f in group]
    if len(set(named)) != len(named):
        raise SystemExit(f"error: --against names a control folder twice ({[str(f) for f in named]}); "
                         "accepted: each draw's own control run (another machine or sweep seed is another run)")
    pairs, per_target = [], defaultdict(lambda: defaultdict(list))
    for folder, control_folder in zip(folders, control_folders):
        mine = {s: d["protected"] for s, d in read_draws(setup, folder, attack, targets).items() if "protected" in d}
        theirs = {s: d["protected"] for s, d in read_draws(control, control_folder, attack, targets).items()
                  if "protected" in d}
        for seed, values in sorted(mine.items()):
            missing = set(values) - set(theirs.get(seed, {}))
            if missing:
                raise SystemExit(f"error: {draw_name(control_folder)} lacks {control}-seed{seed} under {attack!r} on "
                                 f"{sorted(missing)}; accepted: a control run of the same seeds and targets")
            pairs.append((draw_name(folder), seed, sum(values.values()) / len(values),
                          sum(theirs[seed][t] for t in values) / len(values)))
            for target, value in values.items():
                per_target[target]["protected"].append(value)
                per_target[target]["control"].append(theirs[seed][target])
    return pairs, per_target


def print_per_target(per_target: dict, first: str, second: str, names: str) -> None:
    """Per target, the mean over draws of each kind and of their difference."""
    print(f"\nper target (mean over draws): {names}")
    for target, kinds in sorted(per_target.items()):
        p, c = kinds[first], kinds[second]
        print(f"  {target}: {sum(p) / len(p):+.3f} / {sum(c) / len(c):+.3f} / {(sum(p) - sum(c)) / len(p):+.3f}")


def _draw_folders(spec: str) -> list[Path]:
    """``DIR[+DIR...]``: one draw's runs, each checked to hold an evaluate run's summary."""
    folders = [Path(part) for part in spec.split("+") if part]
    for folder in folders:
        if not (folder / "summary.json").is_file():
            raise SystemExit(f"error: {folder} holds no summary.json of an evaluate run")
    if not folders:
        raise SystemExit(f"error: {spec!r} names no folder; accepted: DIR[+DIR...]")
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("setup", help="the models' name before -seed<k>, e.g. label_free")
    parser.add_argument("folders", nargs="+", metavar="DIR[+DIR...]",
                        help="evaluate runs' files folders, one argument per draw (a draw's runs by target joined by '+')")
    parser.add_argument("--attack", default="finetune_masked")
    parser.add_argument("--against", action="append", default=[], metavar="SETUP=DRAW[,DRAW...]",
                        help="a control's runs, one per draw argument in the same order (a draw split by "
                             "target: its runs joined by '+')")
    parser.add_argument("--targets", default=None, help="comma list: read only these targets of every run")
    parser.add_argument("--no-twin", action="store_true",
                        help="the setup was evaluated without sparse scratch: pool the protected models alone")
    args = parser.parse_args()
    targets = set(args.targets.split(",")) if args.targets else None
    draws = [_draw_folders(spec) for spec in args.folders]
    controls = []
    for spec in args.against:
        name, _, group = spec.partition("=")
        if not name or not group:
            raise SystemExit(f"error: --against {spec!r}: accepted: SETUP=DRAW[,DRAW...]")
        controls.append((name, [_draw_folders(g) for g in group.split(",")]))
    pooled = pool(args.setup, draws, args.attack, targets, twin=not args.no_twin)
    units = pooled["units"]
    protected = [u[2] for u in units]
    only = f", targets {sorted(targets)}" if targets else ""
    print(f"{args.attack}, {len(units)} draws ({len(draws)} folders{only}):\n")
    if args.no_twin:
        print("| draw | protected |\n|---|---:|")
        for name, seed, p, _ in units:
            print(f"| {name} seed {seed} | {p:+.3f} |")
        print(f"| **all draws** | {fmt_ci(protected)} |")
        per_target = pooled["per_target"]
        print("\nper target (mean over draws): protected")
        for target, kinds in sorted(per_target.items()):
            print(f"  {target}: {sum(kinds['protected']) / len(kinds['protected']):+.3f}")
    else:
        scratch = [u[3] for u in units]
        print("| draw | protected | its sparse scratch | difference |\n|---|---:|---:|---:|")
        for name, seed, p, s in units:
            print(f"| {name} seed {seed} | {p:+.3f} | {s:+.3f} | {p - s:+.3f} |")
        differences = [p - s for p, s in zip(protected, scratch)]
        print(f"| **all draws** | {fmt_ci(protected)} | {fmt_ci(scratch)} | {fmt_ci(differences)} |")
        print_per_target(pooled["per_target"], "protected", "sparse_scratch",
                         "protected / its sparse scratch / difference")
    for name, group in controls:
        pairs, per_target = against(args.setup, draws, name, group, args.attack, targets)
        print(f"\n{args.setup} against {name}, paired draw by draw (same folder order, same seed, same targets):\n")
        print(f"| draw | {args.setup} | {name} | difference |\n|---|---:|---:|---:|")
        for folder, seed, p, c in pairs:
            print(f"| {folder} seed {seed} | {p:+.3f} | {c:+.3f} | {p - c:+.3f} |")
        print(f"| **all draws** | {fmt_ci([p for *_, p, _ in pairs])} | {fmt_ci([c for *_, c in pairs])} "
              f"| {fmt_ci([p - c for *_, p, c in pairs])} |")
        print_per_target(per_target, "protected", "control", f"{args.setup} / {name} / difference")


if __name__ == "__main__":
    main()
