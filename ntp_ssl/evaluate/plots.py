"""Learning-curve figures of an SLC sweep.

One panel per (target domain, attack): x is the number of target samples n on a log
axis, y the test accuracy. Each model is a line (mean over seeds) with a shaded min-max
band over seeds; the from-scratch curve (``attack == "scratch"``) is drawn, black and
dashed, on every panel of its domain, so a model line under it is non-transferable.

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas, without
pyplot, so nothing here touches a display or global figure state.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from ntp_ssl.errors import ConfigError
from ntp_ssl.evaluate.results import SCRATCH_ATTACK, normalize_row
from ntp_ssl.io import atomic_write_with

_PANEL_SIZE = (4.2, 3.2)  # inches per panel
_SCRATCH_STYLE = dict(color="black", linestyle="--", marker="s", markersize=3.5, linewidth=1.6)


def _scratch_label(scratch_model: str) -> str:
    return "from scratch" if scratch_model == "scratch" else f"{scratch_model} (from scratch)"


def _curve_stats(points: dict[int, list[float]]) -> tuple[np.ndarray, ...]:
    """n ascending, and the mean, min and max accuracy over seeds at each n."""
    ns = np.array(sorted(points), dtype=float)
    values = [np.asarray(points[int(n)], dtype=float) for n in ns]
    return (ns, np.array([v.mean() for v in values]),
            np.array([v.min() for v in values]), np.array([v.max() for v in values]))


def slc_figure(rows: Sequence[dict], *, title: str | None = None, scratch_model: str = "scratch") -> Figure:
    """The learning-curve figure of ``rows`` (see the module docstring), returned unsaved."""
    table = [normalize_row(row, i) for i, row in enumerate(rows)]
    if not table:
        raise ConfigError("no result rows to plot; accepted: at least one row")

    # {(model, domain, attack): {n: [accuracy per seed]}}
    curves: dict[tuple[str, str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in table:
        is_scratch = row["model"] == scratch_model
        if is_scratch and row["attack"] != SCRATCH_ATTACK:
            continue  # only the scratch baseline proper is drawn
        curves[(row["model"], row["domain"], row["attack"])][row["n"]].append(row["accuracy"])

    if not curves:
        raise ConfigError(f"no result rows to plot besides {scratch_model!r} rows with attack other than "
                          f"{SCRATCH_ATTACK!r}; accepted: model rows or the scratch baseline")
    domains = sorted({d for _, d, _ in curves})
    attacks = sorted({a for m, _, a in curves if m != scratch_model}) or [SCRATCH_ATTACK]
    models = sorted({m for m, _, _ in curves if m != scratch_model})
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    y_max = max(row["accuracy"] for row in table)
    y_top = 1.02 if y_max <= 1.0 else (102.0 if y_max <= 100.0 else None)

    fig = Figure(figsize=(_PANEL_SIZE[0] * len(attacks), _PANEL_SIZE[1] * len(domains) + 0.6),
                 layout="constrained")
    axes = fig.subplots(len(domains), len(attacks), squeeze=False)
    handles: dict[str, object] = {}
    for i, domain in enumerate(domains):
        scratch = curves.get((scratch_model, domain, SCRATCH_ATTACK))
        scratch_only = not any((m, domain, a) in curves for m in models for a in attacks)
        for j, attack in enumerate(attacks):
            ax = axes[i][j]
            panel_models = [m for m in models if (m, domain, attack) in curves]
            if not panel_models and not (scratch_only and j == 0):
                ax.set_visible(False)  # nothing to compare; a scratch-only domain gets one panel
                continue
            for model in panel_models:
                ns, mean, low, high = _curve_stats(curves[(model, domain, attack)])
                (line,) = ax.plot(ns, mean, marker="o", markersize=3.5, linewidth=1.6,
                                  color=colours[model], label=model)
                ax.fill_between(ns, low, high, color=colours[model], alpha=0.2, linewidth=0)
                handles.setdefault(model, line)
            if scratch:
                ns, mean, low, high = _curve_stats(scratch)
                (line,) = ax.plot(ns, mean, label=_scratch_label(scratch_model), **_SCRATCH_STYLE)
                ax.fill_between(ns, low, high, color="black", alpha=0.1, linewidth=0)
                handles.setdefault(scratch_model, line)
            ax.set_xscale("log")
            if y_top is not None:
                ax.set_ylim(0.0, y_top)
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(f"target {domain} | {_scratch_label(scratch_model) if scratch_only else attack}", fontsize=10)
            ax.set_xlabel("target training samples n")
            ax.set_ylabel("test accuracy")
    if title:
        fig.suptitle(title)
    labels = [m for m in models if m in handles] + ([scratch_model] if scratch_model in handles else [])
    fig.legend([handles[m] for m in labels],
               [_scratch_label(m) if m == scratch_model else m for m in labels],
               loc="outside lower center", ncol=min(len(labels), 5), frameon=False,
               title="line: mean over seeds, band: min-max")
    return fig


def plot_slc_curves(
    rows: Sequence[dict], out_path: str | Path, *, title: str | None = None, scratch_model: str = "scratch"
) -> Path:
    """Save :func:`slc_figure` as a PNG at ``out_path``, atomically; returns the path."""
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".png":
        raise ConfigError(f"plot path {str(out_path)!r} does not end in .png; accepted: a .png file")
    fig = slc_figure(rows, title=title, scratch_model=scratch_model)
    return atomic_write_with(out_path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
