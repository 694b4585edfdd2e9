"""Run every benchmark in sequence with its defaults (``make bench``).

1. ``bench_domains.py``: building each embedded domain, cold and cached;
2. ``bench_pretrain.py``: quality and speed of ``ntp-ssl pretrain`` (SimCLR, MoCo v2, supervised);
3. ``bench_sweep.py``: the SLC sweep fast vs naive, on the SimCLR encoder step 2 trained.

The scripts share one domain cache (a temporary folder unless ``--cache-dir``) and write
their JSON to ``benchmarks/results/`` (``benchmarks/results/quick/`` with ``--quick``, which
runs each script's small smoke version). Each runs as its own process, so one failing does
not stop the others; the exit status is the number that failed.

Usage: ``python benchmarks/run_all.py [--quick] [--cache-dir DIR]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def run(name: str, args: list[str]) -> tuple[int, float]:
    command = [sys.executable, str(HERE / name), *args]
    print(f"\n## {name}\n\n$ {' '.join(command)}\n", flush=True)
    start = time.perf_counter()
    code = subprocess.call(command, cwd=HERE.parent)
    return code, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small smoke version of every benchmark")
    parser.add_argument("--cache-dir", type=Path, help="domain cache shared by the scripts (default: temporary)")
    args = parser.parse_args(argv)
    results = RESULTS / "quick" if args.quick else RESULTS
    quick = ["--quick"] if args.quick else []

    summary = []
    with contextlib.ExitStack() as stack:
        cache = args.cache_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ntp-bench-cache-")))
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ntp-bench-work-")))

        domains_args = ["--json", str(results / "domains.json")] + (["--repeats", "1"] if args.quick else [])
        summary.append(("bench_domains.py", *run("bench_domains.py", domains_args)))

        pretrain_json = results / "pretrain.json"
        summary.append(("bench_pretrain.py", *run("bench_pretrain.py", [*quick, "--cache-dir", str(cache),
                                                                         "--work-dir", str(work / "pretrain"),
                                                                         "--out", str(pretrain_json)])))

        sweep_args = [*quick, "--cache-dir", str(cache), "--work-dir", str(work / "sweep"),
                      "--out", str(results / "sweep.json")]
        checkpoint = None
        if summary[-1][1] == 0 and pretrain_json.exists():
            simclr = json.loads(pretrain_json.read_text()).get("methods", {}).get("simclr", {})
            checkpoint = simclr.get("quality", {}).get("checkpoint")
        if checkpoint and Path(checkpoint).exists():
            sweep_args += ["--checkpoint", checkpoint]  # the default SimCLR encoder, already trained
        summary.append(("bench_sweep.py", *run("bench_sweep.py", sweep_args)))

    print("\n## summary\n\n| script | exit | minutes |\n|---|---:|---:|")
    for name, code, seconds in summary:
        print(f"| {name} | {code} | {seconds / 60:.1f} |")
    print(f"\nJSON results in {results}")
    return sum(code != 0 for _, code, _ in summary)


if __name__ == "__main__":
    sys.exit(main())
