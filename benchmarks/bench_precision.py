"""The attacker's arithmetic on this machine: float32 against bfloat16 autocast (``sweep.precision``).

The sweep's cost is its fine-tunes (docs/BENCHMARKS.md, "The main job"): the default small
CNN, batch 64, forward, backward and Adam, then validation and test forwards in eval mode.
On a CPU with AMX or AVX-512 bfloat16 instructions oneDNN runs the convolutions in
bfloat16; elsewhere bfloat16 is emulated. Measured here, alternating the two arithmetics
``--repeats`` times so that a drift of the machine's speed falls on both (nothing else may
run):

- milliseconds per fine-tune step (``shared/train.ClassifierFit``'s step: autocast forward,
  float32 loss, backward, Adam), after 10 warm-up steps;
- milliseconds per image of the evaluation forward (``classifier_accuracy``) at batch 512,
  what the sweep's validation checks and test accuracies use, and at batch 128.

Usage: ``python benchmarks/bench_precision.py [--steps 100] [--repeats 3] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

PRECISIONS = ("32", "bf16-mixed")


def _model():
    from ntp_ssl.encoders import build_encoder

    torch.manual_seed(0)
    return torch.nn.Sequential(build_encoder("small_cnn", in_channels=3, image_size=32), torch.nn.Linear(256, 10))


def train_step_ms(precision: str, steps: int) -> float:
    from ntp_ssl.shared.train import autocast_context

    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    for i in range(10 + steps):
        if i == 10:
            start = time.perf_counter()
        with autocast_context("cpu", precision):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1000


def eval_ms_per_image(precision: str, images: int = 2048, batch_size: int = 512) -> float:
    from ntp_ssl.shared.train import classifier_accuracy

    model = _model()
    encoder, head = model[0], model[1]
    x, y = torch.rand(images, 3, 32, 32), torch.randint(0, 10, (images,))
    classifier_accuracy(encoder, head, x, y, batch_size=batch_size, precision=precision)  # warm-up
    start = time.perf_counter()
    for _ in range(3):
        classifier_accuracy(encoder, head, x, y, batch_size=batch_size, precision=precision)
    return (time.perf_counter() - start) / 3 / images * 1000


def medians(runs: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Each variant's median of each measure over the repeats."""
    return {variant: {key: statistics.median(values) for key, values in measures.items()}
            for variant, measures in runs.items()}


def paired_speedups(runs: dict[str, dict[str, list[float]]], base: str, other: str,
                    names: dict[str, str]) -> dict[str, float]:
    """For each ``name: measure``, the median over repeats of base / other within the same repeat
    (paired, so a drift of the machine's speed cancels); above 1, ``other`` is faster."""
    return {name: statistics.median(a / b for a, b in zip(runs[base][measure], runs[other][measure]))
            for name, measure in names.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from ntp_ssl.shared.machine import cpu_model, native_bf16

    runs: dict[str, dict[str, list[float]]] = {
        p: {"step_ms": [], "eval_ms_per_image": [], "eval_ms_per_image_b128": []} for p in PRECISIONS}
    for _ in range(args.repeats):
        for precision in PRECISIONS:
            runs[precision]["step_ms"].append(train_step_ms(precision, args.steps))
            runs[precision]["eval_ms_per_image"].append(eval_ms_per_image(precision))
            runs[precision]["eval_ms_per_image_b128"].append(eval_ms_per_image(precision, batch_size=128))
    result = {
        "cpu": cpu_model(), "native_bf16": native_bf16(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "steps": args.steps, "repeats": runs, "medians": medians(runs),
        **paired_speedups(runs, "32", "bf16-mixed", {"speedup_step": "step_ms", "speedup_eval": "eval_ms_per_image"}),
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
