"""The CUDA path's speed: the bare training step and the main job on a GPU.

    python benchmarks/bench_gpu.py [--domains-from DIR] [--main-job-timeout S] [--out PATH]
    python benchmarks/bench_gpu.py --pretrain-workers 0,4,8 [--domains-from DIR]

1. **Bare step.** The main job's default encoder recipe (SimCLR, small CNN; the
   `pretrain` node of the protect config), one pre-built augmented batch already on the
   GPU, forward + backward + optimizer step, timed between CUDA synchronisations: images
   per second and achieved TFLOP/s (FLOPs counted by ``torch.utils.flop_counter``), for
   batch 32 (the default since issue 12's encoder search), 256 (the default before) and
   1024, in float32 and bf16 autocast (`trainer.precision`).
   It measures the network, not the loop: augmentation on the CPU is left out.
2. **The main job.** `ntp-ssl protect trainer.device=cuda` (every other setting the
   default), cold: a fresh cache, so it pretrains the default encoder. With
   `--domains-from` the domain arrays are copied into that cache first (the same arrays
   the CPU numbers were measured on; building them needs no GPU). Reported: wall time,
   the time of each stage (from the arrival times of the stages' log lines), the peak
   host memory and the verdict numbers, beside the CPU run in docs/BENCHMARKS.md.

3. **Pretraining workers** (`--pretrain-workers`, instead of 1 and 2): the default
   encoder's pretraining alone, once per `data.num_workers` value: the full loop waits on
   the CPU's per-sample augmentation unless workers share it.

Needs a CUDA device (a one-line error without one); `--device cpu` with small `--steps`,
`--batch-sizes` and `--extra` overrides smoke-tests the script on a CPU.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ntp_ssl.shared.machine import describe_machine

REPO = Path(__file__).resolve().parents[1]
STAGE_MARKS = {"[1/3 encoder]": "encoder", "[2/3 protect]": "protect", "[3/3 evaluate]": "evaluate",
               "protect finished": "end"}


@functools.lru_cache(maxsize=None)
def bench_pretrain_module():
    """benchmarks/bench_pretrain.py as a module, loaded once (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_pretrain", REPO / "benchmarks" / "bench_pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main_job_encoder_config(batch_size: int, cache: Path):
    """The pretrain config the main job uses for its default encoder, at ``batch_size``."""
    from omegaconf import OmegaConf

    from ntp_ssl.pipeline import default_encoder_config

    cfg = bench_pretrain_module().compose_config("protect", [f"paths.cache_dir={cache}"])
    pretrain_cfg = default_encoder_config(cfg)
    OmegaConf.update(pretrain_cfg, "optim.batch_size", batch_size)
    return pretrain_cfg


def bare_step(batch_size: int, precision: str, cache: Path, *, device: torch.device, steps: int = 30) -> dict[str, Any]:
    """Images/s and TFLOP/s of forward + backward + step of the default encoder's SimCLR model."""
    from torch.utils.flop_counter import FlopCounterMode

    from ntp_ssl.shared.train import autocast_context

    cfg = main_job_encoder_config(batch_size, cache)
    method, optimizer, _, loader, _, _ = bench_pretrain_module()._train_setup(cfg)
    method.to(device).train()
    views, labels = next(iter(loader(0)))
    views = [v.to(device) for v in views]
    labels = labels.to(device)
    with FlopCounterMode(display=False) as counter:
        method.training_loss(views, labels).backward()
    flops = float(counter.get_total_flops())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            loss = method.training_loss(views, labels)
        loss.backward()
        optimizer.step()

    for _ in range(5):  # warm-up: cuDNN plans, the allocator
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    images = batch_size * len(views)
    return {"batch": batch_size, "precision": precision, "images_per_step": images, "step_s": seconds,
            "images_per_s": images / seconds, "tflops_per_s": flops / seconds / 1e12, "flops_per_step": flops}


def main_job(domains_from: Path | None, timeout: float, device: str, extra: list[str]) -> dict[str, Any]:
    """The main job on the GPU, cold; stage times from the arrival of the stages' log lines."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cache = workdir / "cache"
        if domains_from is not None:
            shutil.copytree(domains_from, cache / "domains")
        cmd = [sys.executable, "-m", "ntp_ssl.cli", "protect", "run_name=gpu", "trainer.progress=false",
               f"trainer.device={device}", *extra]
        env = {**os.environ, "NTP_SSL_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
        marks: dict[str, float] = {}
        log_tail: list[str] = []
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        timed_out = False
        for line in proc.stdout:
            now = time.perf_counter() - start
            print(line, end="", file=sys.stderr, flush=True)
            log_tail = (log_tail + [line.rstrip()])[-40:]
            for mark, stage in STAGE_MARKS.items():
                if mark in line and stage not in marks:
                    marks[stage] = now
            if now > timeout:
                proc.kill()
                timed_out = True
                break
        returncode = proc.wait()
        wall = time.perf_counter() - start
        result: dict[str, Any] = {"command": " ".join(cmd[3:]), "wall_s": wall, "returncode": returncode,
                                  "timed_out": timed_out, "stage_start_s": marks,
                                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}
        summary = workdir / "runs" / "protect" / "gpu" / "summary.json"
        if returncode == 0 and summary.is_file():
            data = json.loads(summary.read_text())
            result.update(summary=data["summary"], source_accuracy=data["source_accuracy"],
                          verdicts=data.get("verdicts"))
        else:
            result["log_tail"] = log_tail
        return result


def pretrain_with_workers(workers: int, device: str, domains_from: Path | None) -> dict[str, Any]:
    """The main job's default encoder pretrained alone with ``data.num_workers=workers``:
    the GPU waits on the CPU's per-sample augmentation unless workers share it."""
    from ntp_ssl.pipeline import default_encoder_config
    from ntp_ssl.pretrain.stage import run_pretrain

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        if domains_from is not None:
            shutil.copytree(domains_from, cache / "domains")
        cfg = bench_pretrain_module().compose_config(
            "protect", [f"paths.cache_dir={cache}", f"paths.root={tmp}", f"trainer.device={device}",
                        "trainer.progress=false", f"data.num_workers={workers}"])
        start = time.perf_counter()
        result = run_pretrain(default_encoder_config(cfg), Path(tmp) / "encoder")
        return {"num_workers": workers, "wall_s": time.perf_counter() - start, "metrics": dict(result["metrics"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains-from", type=Path, help="a folder of domain .npz files to seed the cache with")
    parser.add_argument("--main-job-timeout", type=float, default=420.0, help="seconds (default 420)")
    parser.add_argument("--skip-main-job", action="store_true")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run of this script)")
    parser.add_argument("--steps", type=int, default=30, help="timed bare steps per row (default 30)")
    parser.add_argument("--batch-sizes", default="32,256,1024")
    parser.add_argument("--pretrain-workers", default="",
                        help="comma-separated data.num_workers values: time the default encoder's pretraining "
                             "alone with each, instead of the bare step and the main job")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to the main job (a smoke run)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: bench_gpu.py needs a CUDA device; torch.cuda.is_available() is False here")
    if args.domains_from is not None and not args.domains_from.is_dir():
        raise SystemExit(f"error: --domains-from {args.domains_from} is not a folder")

    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else None
    result: dict[str, Any] = {"device": args.device, "extra": args.extra,
                              "machine": {**describe_machine(device), "gpu": gpu, "cuda": torch.version.cuda,
                                          "cpu_count": os.cpu_count()},
                              "bare_step": []}
    if args.pretrain_workers:
        result["pretrain_workers"] = []
        for workers in [int(w) for w in args.pretrain_workers.split(",")]:
            row = pretrain_with_workers(workers, args.device, args.domains_from)
            print(f"default encoder pretraining, data.num_workers={workers}: {row['wall_s']:.1f} s, "
                  f"{row['metrics']}", flush=True)
            result["pretrain_workers"].append(row)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp)
            if args.domains_from is not None:
                shutil.copytree(args.domains_from, cache / "domains")
            for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
                for precision in ("32", "bf16-mixed"):
                    row = bare_step(batch_size, precision, cache, device=device, steps=args.steps)
                    print(f"bare step: batch {batch_size}, precision {precision}: {row['images_per_s']:,.0f} "
                          f"images/s, {row['tflops_per_s']:.2f} TFLOP/s", flush=True)
                    result["bare_step"].append(row)
        if not args.skip_main_job:
            result["main_job"] = main_job(args.domains_from, args.main_job_timeout, args.device, args.extra)
            job = result["main_job"]
            print(f"main job on {args.device}: {job['wall_s'] / 60:.2f} min (exit {job['returncode']}), stages at "
                  f"{job['stage_start_s']}, peak host RSS {job['peak_rss_gib']:.2f} GiB", flush=True)
            if job.get("verdicts") is not None:
                print(json.dumps(job["verdicts"], indent=1)[:3000])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
