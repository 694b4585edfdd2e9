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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_precision import medians, paired_speedups  # noqa: E402
from bench_thread_scaling import forward_ms_per_image, sweep_model, time_train_steps  # noqa: E402

MODES = ("eager", "compiled")


def _model(mode: str) -> torch.nn.Module:
    """A fresh instance of the sweep's network, compiled or not (each fine-tune of a sweep
    would compile its own)."""
    model = sweep_model(torch.get_num_threads())
    return torch.compile(model) if mode == "compiled" else model


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
            step_ms, first_step_s = time_train_steps(_model(mode), args.steps)
            runs[mode]["step_ms"].append(step_ms)
            runs[mode]["first_step_s"].append(first_step_s)
            # one pass over the images first: for the compiled model, the compile
            runs[mode]["eval_ms_per_image_b128"].append(
                forward_ms_per_image(_model(mode), batch_size=128, images=2048, warmup=1, timed=3))
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
