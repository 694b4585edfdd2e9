"""Would ``torch.compile`` speed up the sweep's fine-tunes on this CPU? Eager against compiled.

The main job's time is its sweep, and the sweep's time is fine-tune steps of the small CNN
(docs/BENCHMARKS.md, "The main job"). On a CPU without bfloat16 instructions float32 is the
attacker's arithmetic, and the levers measured so far were small. ``torch.compile`` (the
inductor backend: fused C++ kernels for batch norm, ReLU and pooling around oneDNN's
convolutions) is the one left; this measures it before anything is built on it. Alternating
eager and compiled ``--repeats`` times so that a drift of the machine's speed falls on both
(nothing else may run):

- milliseconds per fine-tune step (batch 64: forward, cross-entropy, backward, Adam) in the
  sweep's memory layout, after 10 warm-up steps; the compiled model's first call (the
  compile itself) is timed apart, and every repeat compiles a fresh model instance, as each
  fine-tune of the sweep would;
- milliseconds per image of the evaluation forward (eval mode, no grad) at batch 128, the
  main job's validation batch.

Usage: ``python benchmarks/bench_compile.py [--steps 100] [--repeats 3] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_precision import medians, paired_speedups  # noqa: E402

MODES = ("eager", "compiled")


def _model(mode: str) -> torch.nn.Module:
    from ntp_ssl.encoders import build_encoder
    from ntp_ssl.encoders.layout import channels_last_enabled

    torch.manual_seed(0)
    model = torch.nn.Sequential(build_encoder("small_cnn", in_channels=3, image_size=32), torch.nn.Linear(256, 10))
    if channels_last_enabled():
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if mode == "compiled" else model


def _images(n: int) -> torch.Tensor:
    from ntp_ssl.encoders.layout import channels_last_enabled

    x = torch.randn(n, 3, 32, 32)
    return x.contiguous(memory_format=torch.channels_last) if channels_last_enabled() else x


def train_step_ms(mode: str, steps: int) -> tuple[float, float]:
    """(milliseconds per step after 10 warm-up steps, seconds of the first step)."""
    model = _model(mode)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = _images(64), torch.randint(0, 10, (64,))
    begin = time.perf_counter()
    for i in range(10 + steps):
        if i == 1:
            first_step_s = time.perf_counter() - begin
        if i == 10:
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1000, first_step_s


def eval_ms_per_image(mode: str, images: int = 2048, batch_size: int = 128) -> float:
    model = _model(mode).eval()
    x = _images(images)
    with torch.no_grad():
        for repeat in range(4):
            if repeat == 1:  # the first pass compiles
                start = time.perf_counter()
            for i in range(0, images, batch_size):
                model(x[i:i + batch_size])
    return (time.perf_counter() - start) / 3 / images * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from ntp_ssl.shared.machine import cpu_model

    runs: dict[str, dict[str, list[float]]] = {m: {"step_ms": [], "first_step_s": [], "eval_ms_per_image_b128": []}
                                               for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            step_ms, first_step_s = train_step_ms(mode, args.steps)
            runs[mode]["step_ms"].append(step_ms)
            runs[mode]["first_step_s"].append(first_step_s)
            runs[mode]["eval_ms_per_image_b128"].append(eval_ms_per_image(mode))
    result = {
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": args.steps,
        "repeats": runs, "medians": medians(runs),
        # eager / compiled within each repeat, their median: above 1, compiled is faster
        **paired_speedups(runs, "eager", "compiled", {"speedup_step": "step_ms",
                                                      "speedup_eval": "eval_ms_per_image_b128"}),
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
