"""What share of an ``ntp-ssl evaluate`` run the converged linear probe takes.

The probe (``evaluate/probe.py``: standardised features, multinomial logistic regression by
L-BFGS in float64, its l2 chosen on the attacker's validation split, then refitted) runs six
times per sweep point (five l2 values and the refit). This runs the command in this process
with the sweep's call to the probe timed, and writes the wall time, the probe's total and
each call's (training samples, seconds). Run it alone on the machine.

Usage: ``python benchmarks/bench_probe_share.py --out FILE.json -- EVALUATE_OVERRIDES...``
(docs/BENCHMARKS.md, "The main job", gives the overrides that reproduce the main job's sweep).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write (an existing one is refused)")
    parser.add_argument("overrides", nargs="+", help="the evaluate command's overrides, after --")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"--out {str(args.out)!r} exists; give a new file")

    from ntp_ssl.cli import main as cli_main
    from ntp_ssl.evaluate import probe, sweep

    calls: list[tuple[int, float]] = []

    def timed_probe(train_features, *rest, **options):
        start = time.perf_counter()
        result = probe.converged_linear_probe(train_features, *rest, **options)
        calls.append((int(train_features.shape[0]), time.perf_counter() - start))
        return result

    sweep.converged_linear_probe = timed_probe  # the name the sweep calls
    start = time.perf_counter()
    code = cli_main(["evaluate", *args.overrides])
    wall = time.perf_counter() - start
    probe_total = sum(seconds for _, seconds in calls)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"overrides": args.overrides, "exit_code": code, "wall_s": wall,
                                    "probe_s": probe_total, "calls": sorted(calls)}, indent=2) + "\n")
    print(f"wall {wall:.1f} s, probe {probe_total:.1f} s in {len(calls)} calls ({probe_total / wall:.0%})")
    return code


if __name__ == "__main__":
    sys.exit(main())
