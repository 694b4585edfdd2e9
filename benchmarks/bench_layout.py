"""The encoders' memory layout: NCHW against channels-last (``trainer.channels_last``).

Times, in one process and in turns (NCHW, channels-last, NCHW, ...) so that a drift of the
machine's speed falls on both, the three kinds of work the main job spends its time on,
each as the product runs it:

- ``fine-tune``: one attack of the SLC sweep (``ClassifierFit``: the default small CNN with
  a 90% random mask kept, a fresh linear head, batch 64, shifts of 2 pixels, Adam with
  weight decay, a validation check every tenth of the budget on 500 images);
- ``pretrain step``: a SimCLR training step at the default batch of 32 (two 32 px views,
  projection head, NT-Xent, Adam);
- ``features``: frozen-feature extraction (eval mode, batches of 512).

Reported per workload: the median time of each layout, the median of the paired ratios
NCHW / channels-last (above 1: channels-last is faster), and how far the two layouts'
numbers are apart (features of the same weights and images; a fine-tune's final loss).
The inputs are random tensors of the domains' shape (the work does not depend on the
pixels), so it needs no domain cache.

Usage: ``python benchmarks/bench_layout.py [--quick] [--repeats 5] [--out benchmarks/results/layout.json]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_pretrain import default_out, gemm_peak, log, print_system, system_info, table  # noqa: E402

from ntp_ssl.encoders import build_encoder  # noqa: E402
from ntp_ssl.encoders.layout import channels_last_enabled, set_channels_last  # noqa: E402
from ntp_ssl.pretrain.methods import build_method  # noqa: E402
from ntp_ssl.shared.features import extract_features  # noqa: E402
from ntp_ssl.shared.train import ClassifierFit  # noqa: E402

LAYOUTS = {"nchw": False, "channels_last": True}


def _encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_encoder("small_cnn", in_channels=3, image_size=32)


def fine_tune_work(steps: int, samples: int = 2000) -> Callable[[], float]:
    """One masked fine-tune as the sweep runs it (a quarter of ``samples`` as its validation
    split, checked every tenth of the steps); returns its final loss."""
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(samples, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (samples,), generator=generator)
    val = (x[:samples // 4] + 0.01, y[:samples // 4])
    base = _encoder()
    masks = {name: torch.rand(p.shape, generator=generator) > 0.9 for name, p in base.named_parameters() if p.dim() > 1}

    def run() -> float:
        encoder = copy.deepcopy(base)
        torch.manual_seed(2)
        head = nn.Linear(encoder.feature_dim, 10)
        fit = ClassifierFit(encoder, head, x, y, steps=steps, batch_size=64, lr=1e-3, weight_decay=5e-4,
                            masks=masks, augment_shift=2, seed=0, val=val, eval_every=max(1, steps // 10))
        return fit.advance(steps).finish().loss

    return run


def pretrain_work(steps: int) -> Callable[[], float]:
    """``steps`` SimCLR steps at batch 32; returns the last loss."""
    generator = torch.Generator().manual_seed(3)
    views = [torch.rand(steps, 32, 3, 32, 32, generator=generator) for _ in range(2)]

    def run() -> float:
        method = build_method("simclr", _encoder())
        opt = torch.optim.Adam(method.parameters(), lr=1e-3)
        method.train()
        loss = torch.tensor(0.0)
        for step in range(steps):
            loss = method.training_loss([views[0][step], views[1][step]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss.item()

    return run


def features_work(images: int) -> Callable[[], torch.Tensor]:
    x = torch.rand(images, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    encoder = _encoder()

    def run() -> torch.Tensor:
        return extract_features(encoder, x, batch_size=512, device="cpu")

    return run


def timed(work: Callable[[], Any], channels_last: bool) -> tuple[float, Any]:
    before = channels_last_enabled()
    set_channels_last(channels_last)
    try:
        start = time.perf_counter()
        out = work()
        return time.perf_counter() - start, out
    finally:
        set_channels_last(before)


def measure(name: str, work: Callable[[], Any], repeats: int) -> dict[str, Any]:
    timed(work, True)  # warm-up: oneDNN builds its kernels once per shape
    timed(work, False)
    times: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    outputs: dict[str, Any] = {}
    for repeat in range(repeats):
        for layout, flag in LAYOUTS.items():
            seconds, outputs[layout] = timed(work, flag)
            times[layout].append(seconds)
        log(f"{name} {repeat + 1}/{repeats}: nchw {times['nchw'][-1]:.2f} s, channels-last {times['channels_last'][-1]:.2f} s")
    ratios = [a / b for a, b in zip(times["nchw"], times["channels_last"])]
    a, b = outputs["nchw"], outputs["channels_last"]
    difference = float((a - b).abs().max()) if isinstance(a, torch.Tensor) else abs(a - b)
    return {"workload": name, "times_s": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
            "ratio_nchw_over_channels_last": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "output_difference": difference, "output_kind": "max |feature difference|" if isinstance(a, torch.Tensor)
            else "|final loss difference|"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny workloads, 2 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else args.repeats
    if repeats < 1:
        parser.error(f"--repeats must be at least 1, got {repeats}")
    info = system_info()
    print_system(info)
    info["gemm"] = gemm_peak(size=512 if args.quick else 2048)
    # --quick validates at every one of its 10 steps: on a smaller split, or it is most of the smoke run
    workloads = [("fine-tune", fine_tune_work(10, samples=400) if args.quick else fine_tune_work(100)),
                 ("pretrain step", pretrain_work(4 if args.quick else 40)),
                 ("features", features_work(512 if args.quick else 4096))]
    results = [measure(name, work, repeats) for name, work in workloads]
    rows = [[r["workload"], f"{r['median_s']['nchw']:.2f} s", f"{r['median_s']['channels_last']:.2f} s",
             f"{r['ratio_nchw_over_channels_last']['median']:.2f}x "
             f"({r['ratio_nchw_over_channels_last']['min']:.2f}-{r['ratio_nchw_over_channels_last']['max']:.2f})",
             f"{r['output_difference']:.1e} ({r['output_kind']})"] for r in results]
    print(table(["workload", "NCHW (median)", "channels-last (median)", "speed-up (median of pairs, min-max)",
                 "numbers apart"], rows))
    print(f"\nfloat32 GEMM 2048^3 (median): {info['gemm']['median_flops_per_s'] / 1e9:.0f} GFLOP/s")
    out = args.out or default_out("layout.json", args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"system": info, "repeats": repeats, "results": results}, indent=2) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
