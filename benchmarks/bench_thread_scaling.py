"""How much a process-parallel sweep could gain over torch's own threads, on this machine.

The sweep's cost is its fine-tune steps (docs/BENCHMARKS.md, "The main job"): the default
backbone, batch 64, forward, backward and Adam, compute-bound on a CPU. torch spreads one
step over every core; for a network this small that scales poorly, so independent fine-tunes
in separate single-thread processes might do more steps per second. Measured here, each
timing alone on the machine (nothing else may run):

- one process with ``torch.get_num_threads()`` threads (what the sweep does today);
- one process with one thread;
- ``--processes`` single-thread processes at once (the most a process pool could give);
- the evaluation forward pass (no grad, eval mode) per image at several batch sizes, which
  validation checks and test accuracy spend about a sixth of a fine-tune on.

Usage: ``python benchmarks/bench_thread_scaling.py [--steps 100] [--processes 2] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import torch


def sweep_model(threads: int) -> torch.nn.Module:
    """The sweep's fine-tuned network (the default encoder and a linear head) on ``threads``
    torch threads. With channels-last on, its weights are converted too, where the sweep moves
    only each input batch (the encoder does that on entry): the weights' layout alone was
    measured at 1.02-1.06x per step on the AVX2 CPU (docs/BENCHMARKS.md), so these timings
    may read a few percent faster than the sweep's steps."""
    from ntp_ssl.encoders import build_encoder
    from ntp_ssl.encoders.layout import channels_last_enabled

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch.nn.Sequential(build_encoder("small_cnn", in_channels=3, image_size=32), torch.nn.Linear(256, 10))
    if channels_last_enabled():
        model = model.to(memory_format=torch.channels_last)
    return model


def time_train_steps(model: torch.nn.Module, steps: int, barrier=None) -> tuple[float, float]:
    """(milliseconds per fine-tune step of ``model`` (batch 64, Adam) after 10 warm-up steps,
    seconds of the first step); with ``barrier``, timed once every process has warmed up, so
    that the timed windows overlap."""
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    begin = time.perf_counter()
    for i in range(10 + steps):
        if i == 1:
            first_step_s = time.perf_counter() - begin
        if i == 10:
            if barrier is not None:
                barrier.wait()
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1000, first_step_s


def train_step_ms(threads: int, steps: int, barrier=None) -> float:
    """Milliseconds per fine-tune step (batch 64) with ``threads`` threads (time_train_steps)."""
    return time_train_steps(sweep_model(threads), steps, barrier)[0]


def _worker(steps: int, barrier, results) -> None:
    results.put(train_step_ms(1, steps, barrier))


def concurrent_step_ms(processes: int, steps: int) -> list[float]:
    """Per-process milliseconds per step of ``processes`` single-thread processes at once."""
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_worker, args=(steps, barrier, results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    times = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    return times


def forward_ms_per_image(model: torch.nn.Module, batch_size: int, images: int = 1024, warmup: int = 2,
                         timed: int = 5) -> float:
    """Milliseconds per image of ``model``'s forward in eval mode without grad, in batches of
    ``batch_size``: ``warmup`` passes over the images, then the mean of ``timed`` passes."""
    model.eval()
    x = torch.rand(images, 3, 32, 32)
    with torch.no_grad():
        for repeat in range(warmup + timed):
            if repeat == warmup:
                start = time.perf_counter()
            for i in range(0, images, batch_size):
                model(x[i:i + batch_size])
    return (time.perf_counter() - start) / timed / images * 1000


def eval_ms_per_image(batch_size: int, threads: int, images: int = 1024) -> float:
    return forward_ms_per_image(sweep_model(threads), batch_size, images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    result = {"threads": threads, "steps": args.steps}
    result["step_ms_all_threads"] = train_step_ms(threads, args.steps)
    result["step_ms_one_thread"] = train_step_ms(1, args.steps)
    per_process = concurrent_step_ms(args.processes, args.steps)
    result["step_ms_per_process"] = per_process
    result["steps_per_s_all_threads"] = 1000 / result["step_ms_all_threads"]
    result["steps_per_s_processes"] = sum(1000 / ms for ms in per_process)
    result["process_pool_gain"] = result["steps_per_s_processes"] / result["steps_per_s_all_threads"]
    result["eval_ms_per_image"] = {bs: eval_ms_per_image(bs, threads) for bs in (64, 128, 256, 512)}
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
