"""``ntp-ssl evaluate`` and ``ntp-ssl report``.

``evaluate_models`` is the piece the main job (:mod:`ntp_ssl.pipeline`) calls too: sweep,
summarise, and write results.csv/json, summary.md, slc_curves.png and TensorBoard scalars
and figures into the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from ntp_ssl.checks import resolve_results_path
from ntp_ssl.config import SweepConfig, input_checkpoints, validate_evaluate, validate_report
from ntp_ssl.data import Domain, domain_spec, load_domains_for
from ntp_ssl.errors import ConfigError
from ntp_ssl.evaluate.attack import attack_precision
from ntp_ssl.evaluate.plots import plot_slc_curves
from ntp_ssl.evaluate.results import (
    read_results,
    summarize,
    summary_markdown,
    summary_text,
    verdict_text,
    verdicts,
    write_results,
)
from ntp_ssl.evaluate.sweep import (SPARSE_SCRATCH_INIT_OFFSET, SPARSE_SCRATCH_SUFFIX, ModelUnderTest, run_sweep,
                                   source_accuracy, sparse_scratch_model)
from ntp_ssl.io import atomic_write_json, atomic_write_text
from ntp_ssl.shared.checkpoint import check_compatible, load_encoder
from ntp_ssl.shared.runs import claim_run_dir, release_run_dir
from ntp_ssl.shared.stage import input_digests, start_stage

log = logging.getLogger("ntp_ssl.evaluate")


def evaluate_models(models: Sequence[ModelUnderTest], source: Domain | None, targets: Sequence[Domain],
                    settings: SweepConfig, *, run_dir: Path, cache_dir: Path, device, progress: bool,
                    spec: dict, writer=None) -> dict[str, Any]:
    """Run the SLC sweep and write every output; returns {"rows", "summary", "source_accuracy", "verdicts"}.

    With ``settings.source_curve`` the source domain is swept too, so that the verdict can say
    whether each model stays a good start where it is licensed (the source-domain SLC-AUC)."""
    sweep_source = source is not None and settings.source_curve and source.name not in {t.name for t in targets}
    domains = list(targets) + ([source] if sweep_source else [])
    rows = run_sweep(models, domains, settings, domain_specs={d.name: spec for d in domains},
                     cache_dir=cache_dir, device=device, progress_path=run_dir / "sweep_progress.json",
                     progress=progress)
    kept = source_accuracy(models, source, settings, device=device) if source is not None and settings.source_accuracy \
        else None
    summary = summarize(rows, source_accuracy=kept)
    verdict = verdicts(summary, source_accuracy=kept, source=source.name if source is not None else None)
    write_results(rows, run_dir)
    # the arithmetic the fine-tunes ran in, resolved (sweep.precision=auto names no dtype)
    attacker = {"precision": attack_precision(settings, device)}
    atomic_write_json(run_dir / "summary.json", {"verdicts": verdict, "summary": summary, "source_accuracy": kept,
                                                 "attacker": attacker})
    atomic_write_text(run_dir / "summary.md", "\n".join(f"- {line}" for line in verdict_text(verdict).splitlines())
                      + "\n\n" + summary_markdown(summary) + "\n")
    figure = plot_slc_curves(rows, run_dir / "slc_curves.png", title=f"SLC: {', '.join(m.name for m in models)}")
    if writer is not None:
        _log_to_tensorboard(writer, rows, summary, kept, figure)
    print(verdict_text(verdict))
    print(summary_text(summary))
    return {"rows": rows, "summary": summary, "source_accuracy": kept, "verdicts": verdict}


def _log_to_tensorboard(writer, rows: list[dict], summary: list[dict], kept, figure_png: Path) -> None:
    import numpy as np
    from PIL import Image

    curves: dict[tuple, dict[int, list[float]]] = {}
    for row in rows:
        curves.setdefault((row["domain"], row["attack"], row["model"]), {}).setdefault(int(row["n"]), []).append(
            row["accuracy"])
    for (domain, attack, model), points in curves.items():
        for n, accs in sorted(points.items()):
            writer.add_scalar(f"slc/{domain}/{attack}/{model}", float(np.mean(accs)), n)
    for entry in summary:
        tag = f"slc_auc/{entry['domain']}/{entry['attack']}/{entry['model']}"
        writer.add_scalar(tag, entry["slc_auc"], 0)
    if kept:
        for model, accs in kept.items():
            for attack, acc in accs.items():
                writer.add_scalar(f"source_accuracy/{attack}/{model}", acc, 0)
    # the PNG just written, not the figure drawn again: a 12-panel figure takes 1.5-2.5 s to draw on
    # 2 cores, once for the file was enough
    with Image.open(figure_png) as image:
        writer.add_image("slc_curves", np.asarray(image.convert("RGB")), 0, dataformats="HWC")
    writer.add_text("summary", summary_markdown(summary), 0)
    writer.flush()


def load_models(checkpoints: Sequence[str], names: Sequence[str] | None) -> list[ModelUnderTest]:
    models = []
    for i, path in enumerate(checkpoints):
        encoder, meta, masks, _ = load_encoder(path)
        name = names[i] if names else (meta.get("name") or Path(path).stem)
        models.append(ModelUnderTest(name=name, encoder=encoder, backbone=meta["backbone"], masks=masks, meta=meta))
    if len({m.name for m in models}) != len(models):
        raise ConfigError(f"model names {[m.name for m in models]} are not unique; pass names=[...]")
    return models


def sparse_scratch_controls(models: Sequence[ModelUnderTest], names: Sequence[str], cfg: Any) -> list[ModelUnderTest]:
    """``<name>-sparse_scratch`` for each name in ``sparse_scratch``: that model's mask on a random
    initialisation (seed SPARSE_SCRATCH_INIT_OFFSET + seed, as the main job's control)."""
    by_name = {m.name: m for m in models}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(f"sparse_scratch={list(names)}: {unknown[0]!r} is not a model name; accepted: "
                          f"{', '.join(by_name)}")
    return [sparse_scratch_model(by_name[n], in_channels=cfg.data.channels, image_size=cfg.data.image_size,
                                 seed=SPARSE_SCRATCH_INIT_OFFSET + cfg.seed, name=n + SPARSE_SCRATCH_SUFFIX)
            for n in dict.fromkeys(names)]


def run_evaluate(cfg: Any, run_dir: Path) -> dict[str, Any]:
    validate_evaluate(cfg)
    ctx = start_stage(cfg, run_dir, inputs=input_digests(input_checkpoints("evaluate", cfg),
                                                          [cfg.data.source or "", *cfg.data.targets]))
    models = load_models(cfg.checkpoints, cfg.names)
    for model, path in zip(models, cfg.checkpoints):
        check_compatible(model.meta, cfg.data.image_size, cfg.data.channels, f"checkpoint {path!r}")
    models += sparse_scratch_controls(models, list(cfg.sparse_scratch), cfg)
    targets = load_domains_for(cfg, list(cfg.data.targets))
    wants_source = cfg.data.source and (cfg.sweep.source_accuracy or cfg.sweep.source_curve)
    source = load_domains_for(cfg, [cfg.data.source])[0] if wants_source else None
    result = evaluate_models(models, source, targets, cfg.sweep, run_dir=ctx.run_dir, cache_dir=ctx.cache_dir,
                             device=ctx.device, progress=cfg.trainer.progress, spec=domain_spec(cfg.data),
                             writer=ctx.writer)
    ctx.close()
    release_run_dir(ctx.run_dir)
    log.info("evaluation written to %s", ctx.run_dir)
    return result


def run_report(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """Gather several runs' results.csv into one table (summary.md) and one figure."""
    validate_report(cfg)
    run_dir = Path(run_dir)
    claim_run_dir(run_dir, cfg)  # like every stage: one config and one process write here
    all_rows: list[dict] = []
    scratch: dict[tuple, tuple[float, str]] = {}  # (domain, seed, fraction) -> (accuracy, the run it came from)
    for run in cfg.runs:
        results = resolve_results_path(run)
        path = Path(run).expanduser()
        label = path.name if path.is_dir() else path.parent.name
        for row in read_results(results):
            if row["model"] != "scratch":
                row["model"] = f"{label}/{row['model']}"
            else:
                # one scratch curve per domain, shared by every run's models: only right when the
                # runs trained the same baseline (one protocol, one machine: then the cache gives
                # the very numbers); another baseline would silently score the later runs' models
                key = (row["domain"], row["seed"], row["fraction"])
                if key in scratch:
                    kept, first = scratch[key]
                    if row["accuracy"] != kept:
                        raise ConfigError(
                            f"runs {first!r} and {run!r} have different from-scratch baselines on {row['domain']} "
                            f"(seed {row['seed']}, fraction {row['fraction']}: {kept} and {row['accuracy']}), so "
                            "their SLC-AUCs are not on one scale; accepted: runs of one attacker protocol on one "
                            "machine (report the others separately)")
                    continue
                scratch[key] = (row["accuracy"], str(run))
            all_rows.append(row)
    summary = summarize(all_rows)
    write_results(all_rows, run_dir)
    atomic_write_text(run_dir / "summary.md", summary_markdown(summary) + "\n")
    plot_slc_curves(all_rows, run_dir / "slc_curves.png", title="SLC comparison")
    release_run_dir(run_dir)
    print(summary_text(summary))
    return {"rows": all_rows, "summary": summary}
