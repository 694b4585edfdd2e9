"""Pool tables of ``bench_efficacy.py`` that attacked the same protected encoders on other sweep seeds.

``bench_efficacy.py`` writes one table (``<table>.json``) per call; a call with ``--sweep-seeds 2``
made after one with ``--sweep-seeds 1`` (its run directories gone, say) holds the other half of
what ``--sweep-seeds 1 2`` would have measured. Its records keep each sweep seed apart
(``slc[sweep seed]``), so the union is that run's table exactly, on one condition: every table
attacked the same files. This script checks it and refuses otherwise:

- every table protects the same unprotected encoder (``reference_sha256``);
- a protection (setup, protection seed) found in several tables has the same SHA-256 in each
  (the same protected file, so its sweep seeds pair seed by seed);
- the attacker's words are the same but for ``sweep.seeds``;
- a point found in several tables (a model's SLC-AUCs on one sweep seed, its source accuracy)
  holds the same numbers in each (the unprotected encoder is in every table);
- every kept model holds every sweep seed of the union, so each row is k protection x all
  sweep seeds.

Only the setups named by ``--setups`` are kept (with their sparse scratch, and the unprotected
encoder); the first is the one whose gaps the table prints. The table is written with
``bench_efficacy.py``'s own ``table`` as ``<root>/<table>.{md,json}``; an existing file is
refused.

    R=benchmarks/results/efficacy_moco_cl
    .venv/bin/python benchmarks/merge_sweep_seeds.py $R/moco.json $R/moco_random_mask.json $R/moco_sweep2.json \\
        --setups label_free_moco random_mask_seeded_moco --root $R --table moco_2sweeps

(the tables first: ``--setups`` takes every name after it.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_efficacy import REFERENCE, _sweep_seeds, _without_seeds, attacker, table  # noqa: E402

from ntp_ssl.evaluate.sweep import SPARSE_SCRATCH_SUFFIX  # noqa: E402


def merge_tables(tables: list[dict], setups: list[str]) -> dict:
    """The union of ``tables`` (each a ``bench_efficacy.py`` table as loaded from JSON), kept to
    ``setups`` and the unprotected encoder; raises ValueError naming the first disagreement."""
    if not tables:
        raise ValueError("no table to merge")
    references = {t.get("reference_sha256") for t in tables}
    if len(references) != 1 or None in references:
        raise ValueError("the tables protect other unprotected encoders "
                         f"(reference_sha256 {sorted(map(str, references))})")
    protocols = {tuple(_without_seeds(t["sweep"])) for t in tables}
    if len(protocols) != 1:
        raise ValueError(f"the tables used other attackers: {sorted(protocols)}")
    (protocol,) = protocols

    protect_runs: dict[tuple[str, int], dict] = {}
    for t in tables:
        for run in t["protect"]:
            if run["setup"] not in setups:
                continue
            key = (run["setup"], run["seed"])
            held = protect_runs.setdefault(key, run)
            if held["sha256"] != run["sha256"]:
                raise ValueError(f"{run['setup']} seed {run['seed']} is another protected file in two tables "
                                 f"(sha256 {held['sha256'][:12]} and {run['sha256'][:12]}): "
                                 "its sweep seeds do not pair")

    merged: dict[tuple[str, int | None, str], dict] = {}
    for t in tables:
        for record in t["records"]:
            if record["setup"] not in setups and record["setup"] != REFERENCE:
                continue
            key = (record["setup"], record["seed"], record["model"])
            held = merged.setdefault(key, {**record, "slc": {}})
            for field in ("source_linear", "source_knn"):
                if held[field] != record[field]:
                    raise ValueError(f"{record['model']} (protection seed {record['seed']}) has {field} "
                                     f"{held[field]} in one table and {record[field]} in another")
            for sweep_seed, scores in record["slc"].items():
                if held["slc"].setdefault(sweep_seed, scores) != scores:
                    raise ValueError(f"{record['model']} (protection seed {record['seed']}) on sweep seed "
                                     f"{sweep_seed} has other numbers in two tables")

    missing = [s for s in setups if not any(k[0] == s for k in merged)]
    if missing:
        raise ValueError(f"no table holds the setups {missing}")
    sweep_seeds = sorted({int(s) for r in merged.values() for s in r["slc"]})
    for record in merged.values():
        held = sorted(int(s) for s in record["slc"])
        if held != sweep_seeds:
            raise ValueError(f"{record['model']} (protection seed {record['seed']}) holds sweep seeds {held}, "
                             f"not all of {sweep_seeds}: merge tables that attacked it on each")
    for record in merged.values():  # sweep seeds in order, as one run would write them
        record["slc"] = {s: record["slc"][s] for s in sorted(record["slc"], key=int)}
    # in the order one run writes them: the unprotected encoder, then per protection seed the
    # protected models in the order of --setups, then their sparse scratch
    order = {name: i for i, name in enumerate(setups)}
    records = sorted(merged.values(), key=lambda r: (-1, 0, 0) if r["setup"] == REFERENCE else
                     (r["seed"], r["model"].endswith(SPARSE_SCRATCH_SUFFIX), order[r["setup"]]))
    runs = sorted(protect_runs.values(), key=lambda r: (order[r["setup"]], r["seed"]))
    return {"protect": runs, "records": records, "sweep": attacker(list(protocol), sweep_seeds),
            "reference_root": tables[0].get("reference_root"), "reference_sha256": tables[0]["reference_sha256"],
            "merged_from_sweep_seeds": [_sweep_seeds(t["sweep"]) for t in tables]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", type=Path, help="bench_efficacy.py <table>.json files")
    parser.add_argument("--setups", nargs="+", required=True,
                        help="the setups kept; the first is compared with the rest")
    parser.add_argument("--root", type=Path, required=True, help="where <table>.md and <table>.json are written")
    parser.add_argument("--table", required=True, help="name of the merged table's files")
    args = parser.parse_args()
    outputs = [args.root / f"{args.table}.md", args.root / f"{args.table}.json"]
    for path in outputs:
        if path.exists():
            raise SystemExit(f"error: {path} exists; name another --table (nothing is overwritten)")
    try:
        merged = merge_tables([json.loads(p.read_text()) for p in args.tables], args.setups)
    except (ValueError, KeyError) as exc:
        raise SystemExit(f"error: {exc}") from None
    text = table(merged["records"], merged["protect"])
    merged["merged_from"] = [str(p) for p in args.tables]
    outputs[0].write_text(text + "\n")
    outputs[1].write_text(json.dumps(merged, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
