"""Wall time and peak memory of the main job: `ntp-ssl protect` with its defaults.

Cold: a fresh cache, so the run builds the domains and pretrains the default encoder.
Warm: the same cache again in a new run directory (encoder and scratch baselines cached).
Peak memory is the largest resident set of the child process (ru_maxrss of children).

    .venv/bin/python benchmarks/bench_main_job.py            # the real benchmark
    .venv/bin/python benchmarks/bench_main_job.py --quick    # a tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ntp_ssl.shared.machine import describe_machine

GOAL_MINUTES = 15.0
GOAL_PEAK_GIB = 4.0
QUICK = ["data.image_size=16", "data.train_limit=300", "data.test_limit=200", "pretrain.optim.epochs=1",
         "admm.iterations=1", "admm.steps_per_iteration=2", "admm.retrain_steps=2", "sweep.steps=3",
         "sweep.fractions=[0.1,1.0]"]


def run_once(workdir: Path, cache: Path, run_name: str, extra: list[str]) -> dict:
    exe = Path(sys.executable).parent / "ntp-ssl"
    env = {**os.environ, "NTP_SSL_CACHE_DIR": str(cache)}
    cmd = [str(exe), "protect", f"run_name={run_name}", "trainer.progress=false", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        raise SystemExit(f"ntp-ssl protect failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((workdir / "runs" / "protect" / run_name / "summary.json").read_text())
    return {"command": " ".join(cmd[1:]), "wall_s": wall, "peak_rss_gib": max(peak_kib, before) / 2**20,
            "summary": summary["summary"], "source_accuracy": summary["source_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke run, not the benchmark)")
    parser.add_argument("--out", default="benchmarks/results/main_job.json")
    args = parser.parse_args()
    extra = QUICK if args.quick else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        cache = tmp_path / "cache"
        cold = run_once(tmp_path, cache, "cold", extra)
        warm = run_once(tmp_path, cache, "warm", extra)
    # the facts that decide float results (CPU model and capability, threads, torch), as every
    # run's machine.json records them; cpu_count kept for comparison with older files
    result = {"machine": {**describe_machine(), "cpu_count": os.cpu_count()},
              "quick": args.quick, "cold": cold, "warm": warm}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| run | wall (min) | peak RSS (GiB) | goal |")
    print("|---|---:|---:|---|")
    for name, r in (("cold (builds domains, pretrains)", cold), ("warm (cached encoder and scratch)", warm)):
        print(f"| {name} | {r['wall_s'] / 60:.1f} | {r['peak_rss_gib']:.2f} | "
              f"< {GOAL_MINUTES:.0f} min, < {GOAL_PEAK_GIB:.0f} GiB |")
    print("\n| target | attack | protected SLC-AUC | unprotected SLC-AUC |")
    print("|---|---|---:|---:|")
    by_key = {(s["model"], s["domain"], s["attack"]): s["slc_auc"] for s in cold["summary"]}
    for (model, domain, attack), value in sorted(by_key.items()):
        if model == "protected":
            print(f"| {domain} | {attack} | {value:+.3f} | {by_key.get(('unprotected', domain, attack), float('nan')):+.3f} |")
    print(f"\nsource accuracy kept: {cold['source_accuracy']}")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
