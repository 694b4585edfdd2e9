"""The SLC sweep, fast (as the product runs it) against naive, on one source/target pair.

Two models of one architecture: an encoder checkpoint (``--checkpoint``, or pretrained
here with the default ``pretrain`` config) and a copy magnitude-pruned per layer to 90% on
its conv weights (``project_topk_per_layer``; mask = nonzero), so that one model carries a
mask. The sweep settings are the ``evaluate`` stage's defaults (composed from the real
config); ``--quick`` shrinks them.

- fast: ``run_sweep(models, [target], settings, cache_dir=fresh)``: features extracted once
  per model and domain, the scratch baseline computed once per grid point and cached;
- cache hit: the same call again on the same cache (scratch read from disk);
- naive: :func:`naive_sweep` below, the obvious loop over the product's public pieces, one model at a time:
  features re-extracted at every grid point, scratch trained per model, every grid point trained even
  when two fractions round to the same n.

The accuracies must be equal row by row; reported: wall times, speed-ups (goal >= 5x), and
how many fine-tunes and feature extractions each way ran. A second, cheap comparison
(``linear`` and ``knn`` only, no scratch) isolates the feature cache.

Usage: ``python benchmarks/bench_sweep.py [--quick] [--checkpoint encoder.safetensors]
[--cache-dir DIR] [--out benchmarks/results/sweep.json]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import (  # noqa: E402  (shared helpers of the benchmarks folder)
    QUICK_PRETRAIN,
    compose_config,
    default_out,
    fmt,
    log,
    print_system,
    system_info,
    table,
)

SPEEDUP_GOAL = 5.0
#: What --quick shrinks in the evaluate config.
QUICK_EVALUATE = ["sweep.fractions=[0.05,1.0]", "sweep.seeds=[0]", "sweep.steps=3",
                  "data.train_limit=400", "data.test_limit=200"]
#: The pretraining --quick runs when no --checkpoint is given.
QUICK_PRETRAIN_SWEEP = [o for o in QUICK_PRETRAIN if not o.startswith(("data.train_limit=", "optim.epochs="))] + [
    "data.train_limit=512", "optim.epochs=1", "trainer.projector=false"]


# ----------------------------------------------------------------------------- the naive reference


def naive_sweep(model, target, settings, *, device, work) -> list[dict]:
    """The sweep the obvious way, for one model: nothing extracted once, nothing cached, nothing reused."""
    from ntp_ssl.data import to_float_tensor
    from ntp_ssl.data.subsets import draw_subset
    from ntp_ssl.evaluate.slc import samples_for_fraction
    from ntp_ssl.evaluate.attack import fine_tune_attack
    from ntp_ssl.evaluate.sweep import SCRATCH, linear_probe, train_scratch
    from ntp_ssl.shared.features import extract_features
    from ntp_ssl.shared.knn import knn_top1

    x_train, x_test = to_float_tensor(target.train_images), to_float_tensor(target.test_images)
    y_train, y_test = torch.as_tensor(target.train_labels), torch.as_tensor(target.test_labels)
    c, rows = target.num_classes, []
    model.encoder.to(device)
    for seed in settings.seeds:
        for fraction in settings.fractions:
            n = samples_for_fraction(fraction, len(y_train), c)
            idx = torch.as_tensor(draw_subset(target.train_labels, n, seed=seed, num_classes=c))

            def row(name: str, attack: str, accuracy: float) -> None:
                rows.append({"model": name, "domain": target.name, "attack": attack, "seed": seed,
                             "fraction": fraction, "n": n, "accuracy": float(accuracy)})

            if settings.scratch:
                row(SCRATCH, SCRATCH, train_scratch(model.backbone, target, (x_train, y_train, x_test, y_test),
                                                    idx.numpy(), seed=seed, settings=settings,
                                                    device=device).accuracy)
                work.fine_tunes += 1
                work.scratch_trained += 1
            probe = head = None
            if {"linear", "knn", "lpft_masked", "lpft_dense"} & set(settings.attacks):  # again at every point
                f_train = extract_features(model.encoder, x_train, device=device)[idx]
                f_test = extract_features(model.encoder, x_test, device=device)
                work.feature_extractions += 2
                work.images_extracted += len(y_train) + len(y_test)
                probe, head = linear_probe(f_train, y_train[idx], f_test, y_test, num_classes=c, settings=settings,
                                           seed=seed)
            for attack in settings.attacks:
                if attack in ("linear", "knn"):
                    acc = (probe.accuracy if attack == "linear"
                           else knn_top1(f_train, y_train[idx], f_test, y_test, num_classes=c, k=settings.knn_k))
                else:
                    masks = model.masks if attack.endswith("_masked") else None
                    acc = fine_tune_attack(model.encoder, masks, x_train[idx], y_train[idx], x_test, y_test,
                                           num_classes=c, settings=settings, seed=seed, device=device,
                                           head=head if attack.startswith("lpft") else None).accuracy
                    work.fine_tunes += 1
                row(model.name, attack, acc)
    return rows


# ----------------------------------------------------------------------------- models


def pretrain_checkpoint(cache_dir: Path, work_dir: Path, quick: bool, source: str) -> Path:
    """The default SimCLR encoder (or a tiny one with --quick), trained once into ``work_dir``."""
    from ntp_ssl.pretrain.stage import run_pretrain

    overrides = [f"paths.cache_dir={cache_dir}", f"paths.root={work_dir}", f"data.source={source}"]
    cfg = compose_config("pretrain", overrides + (QUICK_PRETRAIN_SWEEP if quick else []))
    run_dir = work_dir / "pretrain" / str(cfg.run_name)
    log(f"pretraining the encoder under test in {run_dir} (pass --checkpoint to skip)")
    return Path(run_pretrain(cfg, run_dir)["checkpoint"])


def build_models(checkpoint: Path, sparsity: float):
    """The checkpoint's encoder and a copy magnitude-pruned per layer on its conv weights."""
    from ntp_ssl.shared.checkpoint import load_encoder
    from ntp_ssl.evaluate.sweep import ModelUnderTest
    from ntp_ssl.protect.projections import project_topk_per_layer

    encoder, meta, masks, _ = load_encoder(checkpoint)
    dense = ModelUnderTest("dense", encoder, meta["backbone"], masks=masks, meta=meta)
    pruned_encoder = copy.deepcopy(encoder)
    conv = {name: p for name, p in pruned_encoder.named_parameters() if p.dim() == 4}
    projected = project_topk_per_layer(conv, sparsity)
    with torch.no_grad():
        for name, value in projected.items():
            conv[name].copy_(value)
    pruned_masks = {name: value != 0 for name, value in projected.items()}
    kept = sum(int(m.sum()) for m in pruned_masks.values())
    total = sum(m.numel() for m in pruned_masks.values())
    pruned = ModelUnderTest("pruned", pruned_encoder, meta["backbone"], masks=pruned_masks, meta=meta)
    return [dense, pruned], {"conv_weights": total, "kept": kept, "sparsity": 1 - kept / total}


# ----------------------------------------------------------------------------- comparing rows


def _by_key(rows: list[dict]) -> dict[tuple, float]:
    return {(r["model"], r["domain"], r["attack"], int(r["seed"]), float(r["fraction"])): float(r["accuracy"])
            for r in rows}


def compare(a: dict[tuple, float], b: dict[tuple, float]) -> dict[str, Any]:
    shared = sorted(set(a) & set(b))
    diffs = [abs(a[k] - b[k]) for k in shared]
    return {"compared": len(shared), "only_first": len(set(a) - set(b)), "only_second": len(set(b) - set(a)),
            "max_abs_diff": max(diffs) if diffs else 0.0, "unequal": sum(d != 0 for d in diffs),
            "equal": bool(shared) and not any(diffs) and set(a) == set(b)}


def check_results(fast: list[dict], hit: list[dict], naive_runs: list[list[dict]]) -> dict[str, Any]:
    """Fast against naive (model rows), scratch rows across naive runs and against fast, fast against hit."""
    fast_k = _by_key(fast)
    fast_models = {k: v for k, v in fast_k.items() if k[0] != "scratch"}
    fast_scratch = {k: v for k, v in fast_k.items() if k[0] == "scratch"}
    naive_models: dict[tuple, float] = {}
    naive_scratch = []
    for rows in naive_runs:
        keyed = _by_key(rows)
        naive_models.update({k: v for k, v in keyed.items() if k[0] != "scratch"})
        naive_scratch.append({k: v for k, v in keyed.items() if k[0] == "scratch"})
    checks = {"models_fast_vs_naive": compare(fast_models, naive_models),
              "fast_vs_cache_hit": compare(fast_k, _by_key(hit))}
    if fast_scratch or any(naive_scratch):
        checks["scratch_fast_vs_naive"] = compare(fast_scratch, naive_scratch[0])
        for i, other in enumerate(naive_scratch[1:], start=2):
            checks[f"scratch_naive_run1_vs_run{i}"] = compare(naive_scratch[0], other)
    return {"checks": checks, "all_equal": all(c["equal"] for c in checks.values())}


# ----------------------------------------------------------------------------- the runs


def timed_sweep(label: str, models, target, settings, *, cache_dir: Path | None, spec: dict, device,
                progress: bool, naive: bool = False) -> tuple[list[dict], float, dict[str, int]]:
    """The product's ``run_sweep`` (or, with ``naive``, :func:`naive_sweep` per model), timed, with its work counted."""
    from ntp_ssl.evaluate.sweep import SweepWork, run_sweep

    work = SweepWork()
    log(f"{label}: {'naive_sweep' if naive else 'run_sweep'} over {', '.join(m.name for m in models)}")
    start = time.perf_counter()
    if naive:
        rows = [row for model in models for row in naive_sweep(model, target, settings, device=device, work=work)]
    else:
        rows = run_sweep(models, [target], settings, domain_specs={target.name: spec}, cache_dir=cache_dir,
                         device=device, progress=progress, work=work)
    seconds = time.perf_counter() - start
    log(f"{label}: {seconds:.1f} s, {len(rows)} rows, {dataclasses.asdict(work)}")
    return rows, seconds, dataclasses.asdict(work)


def warm_up(models, target, settings, *, spec, device, tmp: Path) -> None:
    """One tiny sweep first (one grid point, one step), so no timed run pays one-time costs
    (lazy imports, oneDNN primitive creation, faiss start-up)."""
    from ntp_ssl.evaluate.sweep import run_sweep

    small = {"fractions": settings.fractions[-1:], "seeds": settings.seeds[:1], "steps": 1}
    run_sweep(models, [target], dataclasses.replace(settings, **small), domain_specs={target.name: spec},
              cache_dir=tmp / "warm-up-cache", device=device, progress=False)


def compare_fast_naive(models, target, settings, *, spec, device, progress, tmp: Path,
                       tag: str, with_hit: bool, repeats: int = 1) -> dict[str, Any]:
    """Fast (and a cache-hit rerun) against naive; with ``repeats`` > 1 each way runs that
    often on fresh caches and the best time counts (for the short frozen-only comparison)."""
    fast_cache = tmp / f"{tag}-fast-cache"
    fast, t_fast, w_fast = timed_sweep(f"{tag} fast", models, target, settings, cache_dir=fast_cache, spec=spec,
                                       device=device, progress=progress)
    for i in range(1, repeats):
        _, seconds, _ = timed_sweep(f"{tag} fast (repeat {i + 1})", models, target, settings,
                                    cache_dir=tmp / f"{tag}-fast-cache-{i}", spec=spec, device=device,
                                    progress=progress)
        t_fast = min(t_fast, seconds)
    hit, t_hit, w_hit = fast, None, None
    if with_hit:
        hit, t_hit, w_hit = timed_sweep(f"{tag} fast, scratch cache hit", models, target, settings,
                                        cache_dir=fast_cache, spec=spec, device=device, progress=progress)
    naive_runs, t_naive, w_naive, per_model = [], 0.0, [], []
    for model in models:
        rows, seconds, work = timed_sweep(f"{tag} naive", [model], target, settings, cache_dir=None, spec=spec,
                                          device=device, progress=progress, naive=True)
        for i in range(1, repeats):
            _, again, _ = timed_sweep(f"{tag} naive (repeat {i + 1})", [model], target, settings, cache_dir=None,
                                      spec=spec, device=device, progress=progress, naive=True)
            seconds = min(seconds, again)
        naive_runs.append(rows)
        t_naive += seconds
        per_model.append(seconds)
        w_naive.append(work)
    naive_work = {k: sum(w[k] for w in w_naive) for k in w_naive[0]}
    result = {"settings": dataclasses.asdict(settings), "fast_s": t_fast, "naive_s": t_naive,
              "naive_s_per_model": per_model, "speedup": t_naive / t_fast, "work_fast": w_fast, "work_naive": naive_work,
              "rows": len(fast), "repeats": repeats, "equality": check_results(fast, hit, naive_runs)}
    if with_hit:
        result.update(cache_hit_s=t_hit, work_cache_hit=w_hit, speedup_cache_hit=t_naive / t_hit)
    work_ratio = naive_work["fine_tunes"] / w_fast["fine_tunes"] if w_fast["fine_tunes"] else None
    result["fine_tune_ratio"] = work_ratio
    return result


def report(results: dict[str, Any]) -> str:
    main = results["full"]
    out = [f"### SLC sweep, fast vs naive: {results['source']} -> {results['target']}, models dense + pruned "
           f"({100 * results['pruned']['sparsity']:.0f}% of conv weights zero)", ""]
    s = main["settings"]
    out += [f"settings: fractions {list(s['fractions'])}, seeds {list(s['seeds'])}, attacks {list(s['attacks'])}, "
            f"fine-tune budget {s['steps'] or str(s['epochs']) + ' epochs'}, lr grid {list(s['lr_grid'])}, "
            f"batch {s['batch_size']}; target train/test {results['target_sizes']}; "
            f"{results['system']['threads']} thread(s), device {results['device']}", ""]
    rows = []

    def add(label: str, seconds: float | None, work: dict | None, speedup: float | None, goal: bool) -> None:
        if seconds is None:
            return
        rows.append([label, fmt(seconds, ".1f"), str(work["fine_tunes"]), str(work["scratch_trained"]),
                     str(work["feature_extractions"]), fmt(speedup, ".2f") + "x" if speedup else "1.00x",
                     fmt(speedup >= SPEEDUP_GOAL) if goal and speedup else ""])

    add("fast (product)", main["fast_s"], main["work_fast"], None, False)
    add("fast, scratch cache hit", main.get("cache_hit_s"), main.get("work_cache_hit"), main.get("speedup_cache_hit"),
        False)
    add("naive (per model, no caches)", main["naive_s"], main["work_naive"], None, False)
    rows.append(["**speed-up naive / fast**", "", "", "", "", f"**{main['speedup']:.2f}x**",
                 fmt(main["speedup"] >= SPEEDUP_GOAL)])
    out += [table(["run", "wall s", "fine-tunes", "scratch trained", "feature extractions", "speed-up",
                   f"goal >= {SPEEDUP_GOAL:.0f}x"], rows), ""]
    eq = main["equality"]
    out.append(f"results equal row by row: {fmt(eq['all_equal'])} "
               + "; ".join(f"{k}: {c['compared']} compared, max |diff| {c['max_abs_diff']:.3g}"
                           for k, c in eq["checks"].items()))
    if main.get("fine_tune_ratio"):
        out.append(f"fine-tunes naive / fast = {main['fine_tune_ratio']:.2f}: the bound on the speed-up while "
                   "fine-tunes dominate the time")
    frozen = results.get("frozen")
    if frozen:
        out += ["", "Frozen-feature attacks only (linear, knn; no scratch), which isolates the feature cache "
                f"(best of {frozen['repeats']}):", "",
                table(["run", "wall s", "feature extractions", "speed-up", "equal"],
                      [["fast", fmt(frozen["fast_s"], ".2f"), str(frozen["work_fast"]["feature_extractions"]), "", ""],
                       ["naive", fmt(frozen["naive_s"], ".2f"), str(frozen["work_naive"]["feature_extractions"]),
                        f"{frozen['speedup']:.1f}x", fmt(frozen["equality"]["all_equal"])]])]
    return "\n".join(out)


def evaluate_setup(tmp: Path, args: argparse.Namespace, targets: list[str]):
    """What the sweep benchmarks share before sweeping: the evaluate config on ``targets``
    (with ``args``' source, cache, --quick and overrides), threads, seed and device set, the
    system printed, and the encoder checkpoint (pretrained under ``tmp`` when not given).
    Returns (cfg, overrides, device, system info, checkpoint)."""
    from ntp_ssl.shared.train import configure_threads, resolve_device, seed_everything

    cache_dir = args.cache_dir or tmp / "domains"
    overrides = [f"paths.cache_dir={cache_dir}", f"data.source={args.source}", f"data.targets=[{','.join(targets)}]",
                 *(QUICK_EVALUATE if args.quick else []), *args.overrides]
    cfg = compose_config("evaluate", overrides)
    configure_threads(cfg.trainer.threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    info = system_info()
    print_system(info)
    checkpoint = args.checkpoint or pretrain_checkpoint(cache_dir, args.work_dir or tmp / "runs", args.quick,
                                                        args.source)
    return cfg, overrides, device, info, checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run: " + " ".join(QUICK_EVALUATE))
    parser.add_argument("--checkpoint", type=Path, help="encoder checkpoint (default: pretrain the default one)")
    parser.add_argument("--source", default="mnist")
    parser.add_argument("--target", default="optdigits")
    parser.add_argument("--sparsity", type=float, default=0.9, help="of the pruned copy's conv weights")
    parser.add_argument("--no-frozen", action="store_true", help="skip the linear/knn-only comparison")
    parser.add_argument("--frozen-repeats", type=int, default=3, help="best of N for the short frozen-only runs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (the product shows them)")
    parser.add_argument("--cache-dir", type=Path, help="domain cache (default: a temporary folder); "
                                                       "scratch caches are always fresh temporary folders")
    parser.add_argument("--work-dir", type=Path, help="where the encoder is pretrained when no --checkpoint "
                                                      "(default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/sweep.json; "
                                                 "with --quick benchmarks/results/quick/sweep.json)")
    parser.add_argument("overrides", nargs="*", help="extra evaluate-config overrides, e.g. sweep.seeds=[0]")
    args = parser.parse_args(argv)
    out = args.out or default_out("sweep.json", args.quick)

    from omegaconf import OmegaConf

    from ntp_ssl.data import domain_spec, load_domains_for
    from ntp_ssl.io import atomic_write_json

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ntp-bench-sweep-")))
        cfg, overrides, device, info, checkpoint = evaluate_setup(tmp, args, [args.target])
        models, pruned = build_models(checkpoint, args.sparsity)
        target = load_domains_for(cfg, [args.target])[0]
        settings = OmegaConf.to_object(cfg.sweep)
        spec = domain_spec(cfg.data)
        progress = cfg.trainer.progress and not args.no_progress
        log("warm-up sweep (untimed)")
        warm_up(models, target, settings, spec=spec, device=device, tmp=tmp)
        results: dict[str, Any] = {
            "system": info, "quick": args.quick, "checkpoint": str(checkpoint), "source": args.source,
            "target": args.target, "target_sizes": [len(target.train_labels), len(target.test_labels)],
            "config_overrides": overrides[1:], "pruned": pruned, "device": str(device)}
        results["full"] = compare_fast_naive(models, target, settings, spec=spec, device=device, progress=progress,
                                             tmp=tmp, tag="full", with_hit=True)
        results["full"]["speedup_goal"] = SPEEDUP_GOAL
        results["full"]["speedup_goal_met"] = results["full"]["speedup"] >= SPEEDUP_GOAL
        atomic_write_json(out, results)
        if not args.no_frozen:
            frozen = dataclasses.replace(settings, attacks=[a for a in ("linear", "knn") if a in settings.attacks]
                                         or ["linear", "knn"], scratch=False)
            results["frozen"] = compare_fast_naive(models, target, frozen, spec=spec, device=device,
                                                   progress=progress, tmp=tmp, tag="frozen",
                                                   with_hit=False, repeats=args.frozen_repeats)
        results["system"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    atomic_write_json(out, results)
    print(report(results))
    print(f"\nJSON: {out}")
    return 0 if results["full"]["equality"]["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
