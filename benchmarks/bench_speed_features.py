"""The attacker's speed features, on and off: what they save and what they change.

One model (an encoder checkpoint: ``--checkpoint``, or the default encoder pretrained here)
is swept with the ``evaluate`` stage's default protocol (composed from the real config,
``sweep=converged`` unless overridden) on ``--targets``, twice, each with a fresh scratch
cache so both pay for their scratch baseline:

- off: the protocol as it is (every learning rate of the grid trained to the full budget);
- on: ``sweep.halving=--eta`` (successive halving over the grid) and
  ``sweep.patience=--patience`` (early stopping after that many validation checks without
  improvement).

Reported: wall time and optimiser steps each way (steps counted by wrapping
``ClassifierFit.advance``), the speed-up, and what the features change: the SLC-AUC per
(model, domain, attack) each way, how many fine-tune rows chose the same learning rate,
and the largest accuracy difference.

Usage: ``python benchmarks/bench_speed_features.py [--quick] [--checkpoint encoder.safetensors]
[--targets optdigits syndigits mnistm] [--eta 3] [--patience 3] [overrides ...]``
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import default_out, fmt, log, table  # noqa: E402
from bench_sweep import QUICK_EVALUATE, build_models, evaluate_setup, warm_up  # noqa: E402


@contextlib.contextmanager
def counting_steps():
    """Count every optimiser step a :class:`ClassifierFit` takes while inside."""
    from ntp_ssl.shared.train import ClassifierFit

    counter = {"steps": 0}
    original = ClassifierFit.advance

    def advance(self, to_step):
        before = self.step
        result = original(self, to_step)
        counter["steps"] += self.step - before
        return result

    ClassifierFit.advance = advance
    try:
        yield counter
    finally:
        ClassifierFit.advance = original


def timed(label: str, models, targets, settings, *, specs: dict, device, progress: bool, cache_dir: Path):
    from ntp_ssl.evaluate.sweep import SweepWork, run_sweep

    work = SweepWork()
    log(f"{label}: halving={settings.halving} patience={settings.patience}")
    with counting_steps() as counter:
        start = time.perf_counter()
        rows = run_sweep(models, targets, settings, domain_specs=specs, cache_dir=cache_dir, device=device,
                         progress=progress, work=work)
        seconds = time.perf_counter() - start
    log(f"{label}: {seconds:.1f} s, {counter['steps']} optimiser steps, {dataclasses.asdict(work)}")
    return {"rows": rows, "wall_s": seconds, "optimizer_steps": counter["steps"], "work": dataclasses.asdict(work)}


def differences(off: list[dict], on: list[dict], unmasked: set[str]) -> dict[str, Any]:
    """What the speed features changed: per (model, domain, attack) SLC-AUC both ways, the
    searched fine-tunes whose chosen learning rate is the same (an ``unmasked`` model's
    mask-kept rows are copies of its dense ones, so they are not counted twice), the largest
    accuracy difference."""
    from ntp_ssl.evaluate.results import summarize

    def key(r):
        return r["model"], r["domain"], r["attack"], int(r["seed"]), float(r["fraction"])

    a, b = {key(r): r for r in off}, {key(r): r for r in on}
    shared = sorted(set(a) & set(b))
    twins = ("finetune_masked", "lpft_masked")
    searched = [k for k in shared if a[k]["choice"] is not None and k[2] not in ("linear", "knn")
                and not (k[0] in unmasked and k[2] in twins)]
    slc_off = {(s["model"], s["domain"], s["attack"]): s["slc_auc"] for s in summarize(off)}
    slc_on = {(s["model"], s["domain"], s["attack"]): s["slc_auc"] for s in summarize(on)}
    return {
        "rows": len(shared), "rows_unmatched": len(set(a) ^ set(b)),
        "fine_tune_rows_searched": len(searched),
        "same_learning_rate": sum(a[k]["choice"] == b[k]["choice"] for k in searched),
        "max_abs_accuracy_diff": max((abs(float(a[k]["accuracy"]) - float(b[k]["accuracy"])) for k in shared),
                                     default=0.0),
        "slc_auc": [{"model": m, "domain": d, "attack": t, "off": slc_off[(m, d, t)], "on": slc_on.get((m, d, t))}
                    for (m, d, t) in sorted(slc_off)],
    }


def report(results: dict[str, Any]) -> str:
    off, on, diff = results["off"], results["on"], results["differences"]
    lines = [f"targets {', '.join(results['targets'])}; seeds {results['seeds']}; "
             f"on = halving {results['eta']}, patience {results['patience']}", "",
             table(["run", "wall (s)", "optimiser steps", "fine-tunes", "speed-up"],
                   [["off", fmt(off["wall_s"], ".1f"), str(off["optimizer_steps"]), str(off["work"]["fine_tunes"]),
                     "1.00x"],
                    ["on", fmt(on["wall_s"], ".1f"), str(on["optimizer_steps"]), str(on["work"]["fine_tunes"]),
                     f"{off['wall_s'] / on['wall_s']:.2f}x"]]),
             "", f"searched fine-tunes (scratch included): {diff['fine_tune_rows_searched']}, same learning rate: "
                 f"{diff['same_learning_rate']}; largest accuracy difference {diff['max_abs_accuracy_diff']:.3f}", "",
             table(["model", "domain", "attack", "SLC-AUC off", "SLC-AUC on", "on - off"],
                   [[s["model"], s["domain"], s["attack"], fmt(s["off"], "+.3f"), fmt(s["on"], "+.3f"),
                     fmt(None if s["on"] is None else s["on"] - s["off"], "+.3f")] for s in diff["slc_auc"]],
                   align="lllrrr")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run: " + " ".join(QUICK_EVALUATE))
    parser.add_argument("--checkpoint", type=Path, help="encoder checkpoint (default: pretrain the default one)")
    parser.add_argument("--pruned", action="store_true", help="sweep a 90%% magnitude-pruned copy instead (a mask)")
    parser.add_argument("--source", default="mnist")
    parser.add_argument("--targets", nargs="+", default=["optdigits"])
    parser.add_argument("--eta", type=int, default=3, help="sweep.halving when on")
    parser.add_argument("--patience", type=int, default=3, help="sweep.patience when on")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--cache-dir", type=Path, help="domain cache (default: a temporary folder)")
    parser.add_argument("--work-dir", type=Path, help="where the encoder is pretrained when no --checkpoint")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/speed_features.json)")
    parser.add_argument("overrides", nargs="*", help="extra evaluate-config overrides, e.g. sweep.seeds=[0]")
    args = parser.parse_args(argv)
    out = args.out or default_out("speed_features.json", args.quick)

    from omegaconf import OmegaConf

    from ntp_ssl.data import domain_spec, load_domains_for
    from ntp_ssl.io import atomic_write_json

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ntp-bench-speed-")))
        cfg, overrides, device, info, checkpoint = evaluate_setup(tmp, args, list(args.targets))
        models, _ = build_models(checkpoint, 0.9)
        models = models[1:] if args.pruned else models[:1]
        targets = load_domains_for(cfg, list(args.targets))
        settings = OmegaConf.to_object(cfg.sweep)
        specs = {t.name: domain_spec(cfg.data) for t in targets}
        progress = cfg.trainer.progress and not args.no_progress
        log("warm-up sweep (untimed)")
        warm_up(models, targets[0], settings, spec=specs[targets[0].name], device=device, tmp=tmp)
        off_settings = dataclasses.replace(settings, halving=0, patience=0)
        on_settings = dataclasses.replace(settings, halving=args.eta, patience=args.patience)
        results: dict[str, Any] = {"system": info, "quick": args.quick, "checkpoint": str(checkpoint),
                                   "model": models[0].name, "targets": list(args.targets),
                                   "seeds": list(settings.seeds), "eta": args.eta, "patience": args.patience,
                                   "config_overrides": overrides[1:]}
        for label, run_settings in (("off", off_settings), ("on", on_settings)):
            results[label] = timed(label, models, targets, run_settings, specs=specs, device=device,
                                   progress=progress, cache_dir=tmp / f"scratch-{label}")
        results["differences"] = differences(results["off"]["rows"], results["on"]["rows"],
                                             {m.name for m in models if not m.masks})
        results["speedup"] = results["off"]["wall_s"] / results["on"]["wall_s"]
    atomic_write_json(out, results)
    print(report(results))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
