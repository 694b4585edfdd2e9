"""Paired gaps between setups recorded in different tables of ``bench_efficacy.py``.

One setup's records (``--own``, from ``--own-json``) minus each of ``--against`` (from
``--against-json``), paired by protection seed, under the main fine-tunes and the best
attack, with 95% intervals over the seeds both tables hold. Only meaningful when both tables
were measured with the same sweep seeds and attacker, and protect the same encoder (where both
record its SHA-256, tables made since 2026-12-07): this script refuses otherwise.

    .venv/bin/python benchmarks/paired_gaps.py --own-json benchmarks/results/efficacy_v2/random_mask_seeded.json \\
        --own label_free_random_mask_seeded --against-json benchmarks/results/efficacy_v2/efficacy_admm.json \\
        --against label_free_admm magnitude random_mask
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_efficacy import paired_cells, records_by_seed  # noqa: E402

ATTACKS = {"finetune_masked": "mask-kept", "finetune_dense": "dense", "best": "best attack"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--own-json", type=Path, required=True)
    parser.add_argument("--own", required=True, help="the setup compared")
    parser.add_argument("--against-json", type=Path, required=True)
    parser.add_argument("--against", nargs="+", required=True, help="setups of --against-json")
    args = parser.parse_args()
    own_table, other_table = (json.loads(p.read_text()) for p in (args.own_json, args.against_json))
    if own_table["sweep"] != other_table["sweep"]:
        raise SystemExit(f"the two tables used other attackers: {own_table['sweep']} and {other_table['sweep']}")
    encoders = own_table.get("reference_sha256"), other_table.get("reference_sha256")
    if None not in encoders and encoders[0] != encoders[1]:
        raise SystemExit(f"the two tables protect other encoders (sha256 {encoders[0][:12]} and {encoders[1][:12]}): "
                         "their protection seeds do not pair")
    own = records_by_seed(own_table["records"], args.own)
    if not own:
        raise SystemExit(f"no records of {args.own!r} in {args.own_json}")
    print(f"| {args.own} minus | " + " | ".join(ATTACKS.values()) + " | source kNN | seeds |")
    print("|---|" + "---|" * (len(ATTACKS) + 2))
    for name in args.against:
        other = records_by_seed(other_table["records"], name)
        seeds = sorted(s for s in own if s in other)
        if not seeds:
            raise SystemExit(f"no protection seed of {args.own!r} has a record of {name!r} in {args.against_json}")
        if any(sorted(own[s]["slc"]) != sorted(other[s]["slc"]) for s in seeds):
            raise SystemExit(f"{name!r} was measured on other sweep seeds than {args.own!r}")
        cells = paired_cells(own, other, seeds, list(ATTACKS))  # the attacks, then the source kNN
        print(f"| {name} | " + " | ".join(cells) + f" | {' '.join(map(str, seeds))} |")


if __name__ == "__main__":
    main()
