"""The efficacy benchmark: does protection hold, and which loss terms matter?

Runs `ntp-ssl protect` for every named setup below (configs/experiment/protect_*.yaml plus
ablations as overrides) and seed, on the embedded suite (source mnist; targets optdigits,
syndigits, mnistm), each run evaluating the protected and the unprotected encoder against
training from scratch. Then it gathers every run's summary.json into one table.

    .venv/bin/python benchmarks/bench_efficacy.py                       # all setups, seeds 0 1 2
    .venv/bin/python benchmarks/bench_efficacy.py --seeds 0 --setups label_free magnitude
    .venv/bin/python benchmarks/bench_efficacy.py --sparsity-sweep label_free   # 0.5 ... 0.99

The runs go to benchmarks/results/efficacy/ (resumable: a finished run is not redone).
Sequential on purpose: on a 2-core machine parallel runs only compete. On a cluster, the
same grid runs as a Hydra multirun, e.g.
    ntp-ssl protect -m experiment=protect_label_free,protect_magnitude seed=0,1,2 hydra/launcher=submitit_slurm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ntp_ssl.config import PruneConfig

SETUPS: dict[str, list[str]] = {
    "magnitude": ["experiment=protect_magnitude"],
    "random_mask": ["experiment=protect_random_mask"],
    "ntl": ["experiment=protect_ntl"],
    "supervised": ["experiment=protect_supervised"],
    "label_free": ["experiment=protect_label_free"],
    "label_free_no_target_ssl": ["experiment=protect_label_free", "loss.w_target_ssl=0"],
    "label_free_no_mmd": ["experiment=protect_label_free", "loss.w_mmd=0"],
    "label_free_no_fisher": ["experiment=protect_label_free", "loss.w_fisher_pseudo=0"],
    "label_free_no_source_fisher": ["experiment=protect_label_free", "loss.w_fisher_source=0"],
    "label_free_moco": ["experiment=protect_label_free", "pretrain.method.name=moco"],
    "target_free": ["experiment=protect_target_free"],
}
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.99)
DEFAULT_SPARSITY = PruneConfig().sparsity  # the setups run at this one already


def run_setup(name: str, overrides: list[str], seed: int, root: Path, extra: list[str]) -> dict:
    run_name = f"{name}-seed{seed}"
    run_dir = root / "protect" / run_name
    exe = Path(sys.executable).parent / "ntp-ssl"
    cmd = [str(exe), "protect", *overrides, f"seed={seed}", f"sweep.seeds=[{seed}]", f"run_name={run_name}",
           f"paths.root={root}", "trainer.progress=false", *extra]
    wall_file = run_dir / "bench_wall.json"
    if not (run_dir / "summary.json").exists():
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            raise SystemExit(f"{name} seed {seed} failed:\n{proc.stderr[-3000:]}")
        wall_file.write_text(json.dumps({"wall_s": time.perf_counter() - started}))
    wall = json.loads(wall_file.read_text())["wall_s"] if wall_file.exists() else float("nan")
    summary = json.loads((run_dir / "summary.json").read_text())
    meta = json.loads((run_dir / "protected.json").read_text())
    return {"setup": name, "seed": seed, "command": "ntp-ssl " + " ".join(cmd[1:]), "wall_s": wall,
            "summary": summary["summary"], "source_accuracy": summary["source_accuracy"],
            "sparsity": meta["sparsity"]["prunable"]["sparsity"],
            "knn_before": meta["metrics"].get("knn_before"), "knn_after": meta["metrics"].get("knn_after")}


def table(results: list[dict]) -> str:
    """Mean over seeds per setup x target x attack: protected SLC-AUC (raw, normalised), unprotected, kept accuracy."""
    cells: dict[tuple, list[dict]] = {}
    for res in results:
        for row in res["summary"]:
            cells.setdefault((res["setup"], row["domain"], row["attack"], row["model"]), []).append(row)
    lines = ["| setup | target | attack | protected SLC-AUC (raw) | normalised | unprotected SLC-AUC | seeds |",
             "|---|---|---|---:|---:|---:|---:|"]
    for (setup, domain, attack, model), rows in sorted(cells.items()):
        if model != "protected":
            continue
        plain = cells.get((setup, domain, attack, "unprotected"), [])
        lines.append(f"| {setup} | {domain} | {attack} | {np.mean([r['slc_auc'] for r in rows]):+.3f} | "
                     f"{np.mean([r['slc_auc_norm'] for r in rows]):+.3f} | "
                     f"{np.mean([r['slc_auc'] for r in plain]) if plain else float('nan'):+.3f} | {len(rows)} |")
    lines += ["", "| setup | mean protected SLC-AUC, mask-kept | linear | dense | source kNN kept (protected / unprotected) | sparsity | wall min/run |",
              "|---|---:|---:|---:|---|---:|---:|"]
    for setup in dict.fromkeys(r["setup"] for r in results):
        runs = [r for r in results if r["setup"] == setup]
        means = {}
        for attack in ("finetune_masked", "linear", "finetune_dense"):
            values = [row["slc_auc"] for r in runs for row in r["summary"]
                      if row["model"] == "protected" and row["attack"] == attack]
            means[attack] = np.mean(values) if values else float("nan")
        kept_p = np.mean([r["source_accuracy"]["protected"]["knn"] for r in runs])
        kept_u = np.mean([r["source_accuracy"]["unprotected"]["knn"] for r in runs])
        lines.append(f"| {setup} | {means['finetune_masked']:+.3f} | {means['linear']:+.3f} | "
                     f"{means['finetune_dense']:+.3f} | {kept_p:.3f} / {kept_u:.3f} | "
                     f"{np.mean([r['sparsity'] for r in runs]):.3f} | {np.mean([r['wall_s'] for r in runs]) / 60:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sparsity-sweep", choices=list(SETUPS), help="also sweep prune.sparsity for this setup")
    parser.add_argument("--root", default="benchmarks/results/efficacy")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    parser.add_argument("--table", default="efficacy", help="name of the table files written in --root")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    results = []
    for name in args.setups:
        for seed in args.seeds:
            results.append(run_setup(name, SETUPS[name], seed, root, args.extra))
            print(f"done: {name} seed {seed} ({results[-1]['wall_s'] / 60:.1f} min)", flush=True)
    if args.sparsity_sweep:
        base = args.sparsity_sweep
        for sparsity in SPARSITIES:
            for seed in args.seeds:
                if sparsity == DEFAULT_SPARSITY:  # the setup's own run: the same config, already run above or now
                    res = {**run_setup(base, SETUPS[base], seed, root, args.extra), "setup": f"{base}-s{sparsity}"}
                else:
                    res = run_setup(f"{base}-s{sparsity}", [*SETUPS[base], f"prune.sparsity={sparsity}"], seed, root,
                                    args.extra)
                results.append(res)
    text = table(results)
    (root / f"{args.table}.md").write_text(text + "\n")
    (root / f"{args.table}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
