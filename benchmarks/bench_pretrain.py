"""Quality and speed of ``ntp-ssl pretrain`` with the default CPU settings.

For each method (SimCLR, MoCo v2, supervised) the real ``pretrain`` config is composed
(only ``method.name`` and the paths overridden, plus what ``--quick`` shrinks) and
``run_pretrain`` runs in-process in a fresh run directory. Reported:

- quality: source kNN top-1 (k=20, k=200), the supervised test accuracy, the same
  encoder's kNN top-1 on every other embedded domain, wall time; next to the goals
  (SimCLR kNN k=20 >= 0.90, MoCo v2 >= 0.88, supervised test accuracy >= 0.97);
- speed: training images per second of the full loop; FLOPs of one training step
  (``torch.utils.flop_counter``, forward + backward of ``training_loss`` on a default
  batch); the machine's float32 GEMM peak in the same process and thread count; the
  achieved FLOP/s of a bare forward + backward + optimizer step and its share of the
  peak (goal >= 50%);
- loop overhead: median seconds per epoch of the product loop (from one epoch's start to
  the next, so DataLoader set-up, logging and checkpointing count; kNN evaluations
  subtracted) against a bare PyTorch loop over the same data, transform, model, optimizer,
  LR schedule and batch size with no logging, checkpointing or kNN, run for a few epochs
  before and again after the product run (goal: within 10%).

Every timing shares the machine with whatever else runs on it: the load average at the
start and end is recorded; run it on a quiet machine.

Usage: ``python benchmarks/bench_pretrain.py [--quick] [--methods simclr,moco,supervised]
[--cache-dir DIR] [--work-dir DIR] [--out benchmarks/results/pretrain.json]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ntp_ssl.shared.machine import cpu_model, logical_cpus

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

METHODS = ("simclr", "moco", "supervised")
#: method -> (metric, goal): the quality each default pretraining should reach.
QUALITY_GOALS = {"simclr": ("knn_top1_k20", 0.90), "moco": ("knn_top1_k20", 0.88),
                 "supervised": ("source_test_accuracy", 0.97)}
PEAK_SHARE_GOAL = 0.50  # achieved FLOP/s of the training step / GEMM peak
OVERHEAD_GOAL = 0.10  # product loop seconds per epoch / bare loop seconds per epoch - 1

#: What --quick shrinks (the rest of the config stays the default).
QUICK_PRETRAIN = ["data.train_limit=640", "data.test_limit=300", "optim.epochs=2", "optim.batch_size=128",
                  "trainer.projector_samples=50"]


# ----------------------------------------------------------------------------- shared helpers


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def compose_config(stage: str, overrides: list[str]):
    """The packaged Hydra config of ``stage`` with ``overrides``, as the CLI composes it."""
    from hydra import compose, initialize_config_dir

    from ntp_ssl.cli import config_dir
    from ntp_ssl.config import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=stage, overrides=list(overrides))


def system_info() -> dict[str, Any]:
    """What the numbers depend on: versions, threads, CPU, and how busy the machine was."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_model": cpu_model(),  # the library's, as run directories' machine.json records it
        "cpu_cores_available": logical_cpus(),
        "cuda": torch.cuda.is_available(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def print_system(info: dict[str, Any]) -> None:
    print(f"torch {info['torch']}, {info['threads']} thread(s), CPU: {info['cpu_model']} "
          f"({info['cpu_cores_available']} cores available), load average at start "
          f"{', '.join(f'{v:.2f}' for v in info['loadavg_start'] or [])}\n")


def fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def default_out(name: str, quick: bool) -> Path:
    """Quick smoke runs never overwrite the real results."""
    return RESULTS / "quick" / name if quick else RESULTS / name


# ----------------------------------------------------------------------------- GEMM peak


def gemm_peak(size: int = 2048, repeats: int = 10) -> dict[str, float]:
    """FLOP/s of a float32 ``size x size @ size x size`` matmul (best and median of ``repeats``)."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    out = torch.empty(size, size)
    for _ in range(2):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    flops = 2.0 * size**3
    return {"size": size, "repeats": repeats, "flops": flops, "best_s": min(times),
            "median_s": statistics.median(times), "peak_flops_per_s": flops / min(times),
            "median_flops_per_s": flops / statistics.median(times)}


# ----------------------------------------------------------------------------- the product loop, timed


class LoopTimer:
    """Timestamps of the product's epochs, kNN evaluations and checkpoints, taken through
    ``run_pretrain``'s public ``on_event`` hook (nothing in the product is replaced)."""

    def __init__(self) -> None:
        self.epoch_starts: list[float] = []
        self.checkpoint_ends: list[float] = []
        self.knn: list[tuple[float, float]] = []
        self._knn_start = 0.0

    def __call__(self, event: str) -> None:
        now = time.perf_counter()
        if event == "epoch_start":
            self.epoch_starts.append(now)
        elif event == "knn_start":
            self._knn_start = now
        elif event == "knn_end":
            self.knn.append((self._knn_start, now))
        elif event == "checkpoint_end":
            self.checkpoint_ends.append(now)

    def epochs(self) -> list[dict[str, float]]:
        """Per epoch: seconds from its start to the next epoch's start (the last: to its
        checkpoint), the kNN seconds inside that span, and the difference."""
        result = []
        for i, start in enumerate(self.epoch_starts):
            end = self.epoch_starts[i + 1] if i + 1 < len(self.epoch_starts) else self.checkpoint_ends[-1]
            knn = sum(e - s for s, e in self.knn if s >= start and e <= end)
            result.append({"span_s": end - start, "knn_s": knn, "loop_s": end - start - knn})
        return result


def pretrain_config(method: str, cache_dir: Path, root: Path, quick: bool, extra: list[str] | None = None):
    overrides = [f"method.name={method}", f"paths.cache_dir={cache_dir}", f"paths.root={root}"]
    return compose_config("pretrain", overrides + (QUICK_PRETRAIN if quick else []) + list(extra or []))


def run_product(cfg, run_dir: Path) -> dict[str, Any]:
    """``run_pretrain`` in a fresh ``run_dir``; quality, wall time and per-epoch loop times."""
    import json

    from ntp_ssl.data import load_domains_for
    from ntp_ssl.pretrain.stage import run_pretrain

    if run_dir.exists():  # a finished run would be returned as is: start over for honest timings
        log(f"removing the earlier benchmark run {run_dir}")
        shutil.rmtree(run_dir)
    load_domains_for(cfg, [cfg.data.source, *cfg.data.targets])  # build the domain cache before timing
    timer = LoopTimer()
    start = time.perf_counter()
    result = run_pretrain(cfg, run_dir, on_event=timer)
    wall = time.perf_counter() - start
    metrics = dict(result["metrics"])
    history = json.loads((run_dir / "encoder.json").read_text()).get("history", [])
    epochs = timer.epochs()
    return {"checkpoint": result["checkpoint"], "metrics": metrics, "wall_s": wall, "history": history,
            "epochs": epochs, "knn_s_total": sum(e - s for s, e in timer.knn)}


# ----------------------------------------------------------------------------- bare PyTorch


def _train_setup(cfg, *, seed: int = 0):
    """The pieces the product loop uses, built the same way: data, transform, model, optimizer."""
    from torch.utils.data import DataLoader

    from ntp_ssl.data import ImageArrayDataset, load_domains_for
    from ntp_ssl.pretrain.methods import build_train_transform
    from ntp_ssl.pretrain.stage import build_model
    from ntp_ssl.shared.train import build_optimizer, warmup_cosine

    torch.manual_seed(seed)
    source = load_domains_for(cfg, [cfg.data.source])[0]
    method = build_model(cfg, source.num_classes)
    transform = build_train_transform(cfg.method.name, image_size=cfg.data.image_size, channels=cfg.data.channels)
    dataset = ImageArrayDataset(source.train_images, source.train_labels, transform=transform)
    trainable = [p for p in method.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optim.name, trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                momentum=cfg.optim.momentum)
    steps_per_epoch = len(dataset) // cfg.optim.batch_size
    total = steps_per_epoch * cfg.optim.epochs
    warmup = cfg.optim.warmup_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))

    def loader(epoch: int) -> DataLoader:
        return DataLoader(dataset, batch_size=cfg.optim.batch_size, shuffle=True, drop_last=True,
                          num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(epoch))

    return method, optimizer, scheduler, loader, steps_per_epoch, total


def step_flops_and_time(cfg, *, steps: int) -> dict[str, Any]:
    """FLOPs of forward + backward of ``training_loss`` on one default batch, and the
    seconds of a bare forward + backward + optimizer step on that pre-built batch."""
    from torch.utils.flop_counter import FlopCounterMode

    method, optimizer, _, loader, _, _ = _train_setup(cfg)
    method.train()
    views, labels = next(iter(loader(0)))
    views = list(views)
    with FlopCounterMode(display=False) as counter:
        method.training_loss(views, labels).backward()
    flops = float(counter.get_total_flops())
    optimizer.zero_grad(set_to_none=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        method.training_loss(views, labels).backward()
        optimizer.step()

    for _ in range(2):  # warm-up: allocator, oneDNN primitives
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    images = labels.shape[0] * len(views)
    return {"batch": int(labels.shape[0]), "views": len(views), "images_per_step": images,
            "flops_per_step": flops, "flops_per_image": flops / images, "step_s_median": statistics.median(times),
            "step_s_best": min(times), "steps_timed": steps, "step_times_s": times}


def bare_loop(cfg, *, epochs: int) -> dict[str, Any]:
    """The same training steps as the product loop, in plain PyTorch: per-epoch seconds."""
    from ntp_ssl.pretrain.methods import MoCoV2

    method, optimizer, scheduler, loader, steps_per_epoch, total = _train_setup(cfg)
    method.train()
    times, step = [], 0
    for epoch in range(epochs):
        start = time.perf_counter()
        for views, labels in loader(epoch):
            if isinstance(method, MoCoV2):
                method.set_progress(step, total)
            loss = method.training_loss(list(views), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
        times.append(time.perf_counter() - start)
    return {"epochs": epochs, "epoch_s": times, "epoch_s_median": statistics.median(times),
            "steps_per_epoch": steps_per_epoch}


# ----------------------------------------------------------------------------- one method


def bench_method(method: str, args, cache_dir: Path, root: Path, peak: float) -> dict[str, Any]:
    cfg = pretrain_config(method, cache_dir, root, args.quick)
    run_dir = root / "pretrain" / str(cfg.run_name)
    overhead_wanted = method in args.overhead_methods
    bare_before = None
    if overhead_wanted:  # bare epochs before and after the product run, so slow drift in load evens out
        log(f"{method}: bare PyTorch loop, {args.bare_epochs} epoch(s) before the product run")
        bare_before = bare_loop(cfg, epochs=args.bare_epochs)
    log(f"{method}: run_pretrain ({cfg.optim.epochs} epochs, batch {cfg.optim.batch_size}) in {run_dir}")
    product = run_product(cfg, run_dir)
    metric, goal = QUALITY_GOALS[method]
    value = product["metrics"].get(metric)
    quality = {"metrics": product["metrics"], "goal_metric": metric, "goal": goal, "value": value,
               "goal_met": value is not None and value >= goal, "wall_s": product["wall_s"],
               "checkpoint": product["checkpoint"], "history": product["history"]}

    from ntp_ssl.data import load_domains_for

    n_train = len(load_domains_for(cfg, [cfg.data.source])[0].train_labels)
    views = 1 if method == "supervised" else 2
    steps_per_epoch = n_train // cfg.optim.batch_size
    images_per_epoch = steps_per_epoch * cfg.optim.batch_size * views
    loop = [e["loop_s"] for e in product["epochs"]]
    history_ips = [h["images_per_s"] for h in product["history"] if "images_per_s" in h]
    speed: dict[str, Any] = {
        "images_per_epoch": images_per_epoch, "steps_per_epoch": steps_per_epoch,
        "history_images_per_s_mean": statistics.mean(history_ips) if history_ips else None,
        "loop_epoch_s": loop, "loop_epoch_s_median": statistics.median(loop),
        "loop_images_per_s": images_per_epoch / statistics.median(loop),
        "knn_s_total": product["knn_s_total"], "epochs": product["epochs"],
    }
    log(f"{method}: FLOPs and bare step time ({args.steps} steps)")
    step = step_flops_and_time(cfg, steps=args.steps)
    achieved = step["flops_per_step"] / step["step_s_median"]
    speed.update(step=step, achieved_flops_per_s=achieved, peak_share=achieved / peak,
                 peak_share_goal=PEAK_SHARE_GOAL, peak_share_goal_met=achieved / peak >= PEAK_SHARE_GOAL)
    result = {"config_overrides": [f"method.name={method}"] + (QUICK_PRETRAIN if args.quick else []),
              "quality": quality, "speed": speed}
    if overhead_wanted:
        log(f"{method}: bare PyTorch loop, {args.bare_epochs} epoch(s) after the product run")
        bare_after = bare_loop(cfg, epochs=args.bare_epochs)
        bare_epochs = bare_before["epoch_s"] + bare_after["epoch_s"]
        bare_median = statistics.median(bare_epochs)
        overhead = speed["loop_epoch_s_median"] / bare_median - 1.0
        result["overhead"] = {"product_epoch_s_median": speed["loop_epoch_s_median"],
                              "product_epoch_s": loop, "bare_epoch_s_before": bare_before["epoch_s"],
                              "bare_epoch_s_after": bare_after["epoch_s"], "bare_epoch_s_median": bare_median,
                              "overhead": overhead, "goal": OVERHEAD_GOAL, "goal_met": overhead <= OVERHEAD_GOAL}
    log(f"{method}: done in {product['wall_s']:.0f} s; {metric}={fmt(value, '.4f')}")
    return result


# ----------------------------------------------------------------------------- report


def report(results: dict[str, Any], targets: list[str]) -> str:
    peak = results["gemm"]["peak_flops_per_s"]
    out = []
    header = ["method", "kNN top-1 k=20", "kNN top-1 k=200", "source test acc"]
    header += [f"{t} kNN k=20" for t in targets] + ["wall s", "goal", "met"]
    rows = []
    for method, r in results["methods"].items():
        m, q = r["quality"]["metrics"], r["quality"]
        goal = f"{'kNN k=20' if q['goal_metric'].startswith('knn') else 'test acc'} >= {q['goal']:.2f}"
        rows.append([method, fmt(m.get("knn_top1_k20")), fmt(m.get("knn_top1_k200")),
                     fmt(m.get("source_test_accuracy"))]
                    + [fmt(m.get(f"{t}/knn_top1_k20")) for t in targets]
                    + [fmt(q["wall_s"], ".0f"), goal, fmt(q["goal_met"])])
    out += ["### Quality (source: " + results["source"] + ")", "", table(header, rows), ""]

    header = ["method", "images/s (history)", "images/s (loop, no kNN)", "GFLOP/image", "GFLOP/step",
              "s/step (bare)", "GFLOP/s achieved", "% of GEMM peak", "goal >= 50%"]
    rows = []
    for method, r in results["methods"].items():
        s = r["speed"]
        rows.append([method, fmt(s["history_images_per_s_mean"], ".0f"), fmt(s["loop_images_per_s"], ".0f"),
                     fmt(s["step"]["flops_per_image"] / 1e9, ".4f"), fmt(s["step"]["flops_per_step"] / 1e9, ".1f"),
                     fmt(s["step"]["step_s_median"], ".3f"), fmt(s["achieved_flops_per_s"] / 1e9, ".1f"),
                     fmt(100 * s["peak_share"], ".1f"), fmt(s["peak_share_goal_met"])])
    g = results["gemm"]
    out += [f"### Speed (float32 GEMM {g['size']}^3 peak: {peak / 1e9:.1f} GFLOP/s best of {g['repeats']}, "
            f"median {g['median_flops_per_s'] / 1e9:.1f}; {results['system']['threads']} thread(s))", "",
            table(header, rows), ""]

    rows = []
    for method, r in results["methods"].items():
        if "overhead" not in r:
            continue
        o = r["overhead"]
        spread = lambda xs: f"{min(xs):.2f}-{max(xs):.2f}"  # noqa: E731
        bare = o["bare_epoch_s_before"] + o["bare_epoch_s_after"]
        rows.append([method, fmt(o["product_epoch_s_median"], ".2f"), spread(o["product_epoch_s"]),
                     fmt(o["bare_epoch_s_median"], ".2f"), spread(bare), f"{100 * o['overhead']:+.1f}%",
                     fmt(o["goal_met"])])
    if rows:
        out += ["### Loop overhead (median s/epoch, kNN evaluations subtracted)", "",
                table(["method", "ntp-ssl pretrain s/epoch", "range", "bare PyTorch s/epoch", "range", "overhead",
                       "goal <= 10%"], rows),
                ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run: " + " ".join(QUICK_PRETRAIN))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all three)")
    parser.add_argument("--overhead-methods", default="simclr",
                        help="methods whose loop overhead is measured against a bare loop (default: simclr)")
    parser.add_argument("--bare-epochs", type=int, default=None,
                        help="bare-loop epochs before and again after the product run (default 2; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed bare steps (default 10; quick 3)")
    parser.add_argument("--gemm-size", type=int, default=2048)
    parser.add_argument("--gemm-repeats", type=int, default=None, help="default 10; quick 3")
    parser.add_argument("--cache-dir", type=Path, help="domain cache (default: a temporary folder)")
    parser.add_argument("--work-dir", type=Path, help="keep the run directories here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/pretrain.json; "
                                                 "with --quick benchmarks/results/quick/pretrain.json)")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.overhead_methods = [m.strip() for m in args.overhead_methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods + args.overhead_methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    args.bare_epochs = args.bare_epochs or (1 if args.quick else 2)
    args.steps = args.steps or (3 if args.quick else 10)
    args.gemm_repeats = args.gemm_repeats or (3 if args.quick else 10)
    out = args.out or default_out("pretrain.json", args.quick)

    from ntp_ssl.io import atomic_write_json

    with contextlib.ExitStack() as stack:
        cache_dir = args.cache_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ntp-bench-cache-")))
        root = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ntp-bench-runs-")))
        base = pretrain_config("simclr", cache_dir, root, args.quick)
        from ntp_ssl.shared.train import configure_threads

        configure_threads(base.trainer.threads)  # the thread count every measurement uses
        info = system_info()
        print_system(info)
        log(f"GEMM peak ({args.gemm_size}^3, {args.gemm_repeats} repeats)")
        gemm = gemm_peak(args.gemm_size, args.gemm_repeats)
        targets = [t for t in base.data.targets if t != base.data.source]
        results: dict[str, Any] = {"system": info, "quick": args.quick, "source": base.data.source,
                                   "targets": targets, "gemm": gemm, "methods": {}}
        for method in args.methods:
            results["methods"][method] = bench_method(method, args, cache_dir, root, gemm["peak_flops_per_s"])
            results["system"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
            atomic_write_json(out, results)  # partial results survive an interruption
        if args.work_dir is None:
            for r in results["methods"].values():
                r["quality"]["checkpoint"] = None  # the temporary run folder is gone
    atomic_write_json(out, results)
    print(report(results, targets))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
