"""Tidy SLC results: one row per (model, domain, attack, seed, fraction), and summaries.

A row is a dict with the keys of :data:`RESULT_COLUMNS` (extra keys are kept after
them). ``write_results`` stores rows as CSV and JSON, ``summarize`` turns them into one
SLC-AUC line per (model, domain, attack), and ``summary_markdown`` / ``summary_text``
print those lines.

The from-scratch baseline: rows with ``model == scratch_model`` and ``attack ==
"scratch"``. Scratch training is always a full fine-tune of a fresh network, so it does
not depend on the attack; every attack of every model (linear probe, fine-tune with or
without mask, kNN) is compared with that one scratch curve of the same domain and seed.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from ntp_ssl.errors import ConfigError, DataError
from ntp_ssl.evaluate.slc import mean_ci95, slc_auc
from ntp_ssl.io import atomic_write_text

RESULT_COLUMNS: tuple[str, ...] = ("model", "domain", "attack", "seed", "fraction", "n", "accuracy")
SCRATCH_ATTACK = "scratch"

_TYPES: dict[str, type] = {
    "model": str, "domain": str, "attack": str, "seed": int, "fraction": float, "n": int, "accuracy": float,
}


# --------------------------------------------------------------------------- rows


def _plain(value: Any) -> Any:
    """numpy / torch scalars as Python scalars; everything else unchanged."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def normalize_row(row: dict, index: int = 0) -> dict:
    """A copy of ``row`` with the result columns first and typed, extras after them."""
    if not isinstance(row, dict):
        raise ConfigError(f"result row {index} is a {type(row).__name__}, not a dict")
    missing = [c for c in RESULT_COLUMNS if c not in row]
    if missing:
        raise ConfigError(f"result row {index} lacks {missing}; accepted: rows with keys {list(RESULT_COLUMNS)}")
    out: dict[str, Any] = {}
    for column in RESULT_COLUMNS:
        value = _plain(row[column])
        kind = _TYPES[column]
        try:
            if kind is int:
                if isinstance(value, bool) or float(value) != int(value):
                    raise ValueError
                typed: Any = int(value)
            elif kind is float:
                if isinstance(value, bool):
                    raise ValueError
                typed = float(value)
            else:
                if not isinstance(value, str) or not value:
                    raise ValueError
                typed = value
        except (TypeError, ValueError):
            expected = "non-empty string" if kind is str else kind.__name__
            raise ConfigError(f"result row {index}: {column}={value!r} is not a {expected}") from None
        out[column] = typed
    for key in sorted(k for k in row if k not in out):
        if not isinstance(key, str):
            raise ConfigError(f"result row {index}: key {key!r} is not a string")
        out[key] = _plain(row[key])
    return out


def row_key(row: dict) -> tuple:
    """The grid point a result row measures: (model, domain, attack, seed, fraction)."""
    return (row["model"], row["domain"], row["attack"], int(row["seed"]), float(row["fraction"]))


def _columns(rows: Sequence[dict]) -> list[str]:
    extras = sorted({k for row in rows for k in row if k not in RESULT_COLUMNS})
    return list(RESULT_COLUMNS) + extras


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back to the same float
    if isinstance(value, (str, bool, int)):
        return str(value)
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value, sort_keys=True)
    raise ConfigError(f"result value {value!r} of type {type(value).__name__} cannot be written to CSV")


def write_results(rows: Sequence[dict], out_dir: str | Path, *, stem: str = "results") -> tuple[Path, Path]:
    """Write rows to ``out_dir/<stem>.csv`` and ``out_dir/<stem>.json`` atomically.

    Both texts are built in memory before either file is touched, so a bad value leaves
    the previous files as they were. Columns: :data:`RESULT_COLUMNS`, then extra keys
    sorted by name. The JSON holds ``{"columns": [...], "rows": [...]}``.
    """
    if not stem or "/" in stem or stem.startswith("."):
        raise ConfigError(f"results stem {stem!r} is not a plain file name; accepted: e.g. 'results'")
    table = [normalize_row(row, i) for i, row in enumerate(rows)]
    columns = _columns(table)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in table:
        writer.writerow([_csv_cell(row.get(c)) for c in columns])
    csv_text = buffer.getvalue()
    try:
        json_text = json.dumps({"columns": columns, "rows": table}, indent=2, allow_nan=True) + "\n"
    except TypeError as error:
        raise ConfigError(f"results cannot be written as JSON: {error}") from None

    out_dir = Path(out_dir)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    atomic_write_text(csv_path, csv_text)
    atomic_write_text(json_path, json_text)
    return csv_path, json_path


def _parse_extra(text: str) -> Any:
    """CSV extras typed back as well as text allows: '' -> None, then bool, int, float, str."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_results(path: str | Path) -> list[dict]:
    """Rows from a ``.csv`` or ``.json`` written by :func:`write_results`, typed back.

    Result columns come back exactly (seed and n int, fraction and accuracy float).
    JSON extras come back exactly; CSV extras as the best of None/bool/int/float/str.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ConfigError(f"results file {str(path)!r} is neither .csv nor .json")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DataError(f"cannot read results file {str(path)!r}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise DataError(f"results file {str(path)!r} is not UTF-8 text; give a results.csv or results.json "
                        "written by evaluate or protect") from None
    try:
        if suffix == ".json":
            data = json.loads(text)
            raw = data["rows"] if isinstance(data, dict) else data
            if not isinstance(raw, list):
                raise ValueError("no list of rows")
        else:
            raw = []
            for record in csv.DictReader(io.StringIO(text)):
                raw.append({k: (v if k in RESULT_COLUMNS else _parse_extra(v)) for k, v in record.items()})
        return [normalize_row(row, i) for i, row in enumerate(raw)]
    except (ValueError, KeyError, ConfigError) as error:
        raise DataError(f"results file {str(path)!r} is not a results table: {error}") from None


# --------------------------------------------------------------------------- summary


def _curves(rows: Sequence[dict]) -> dict[tuple, dict[float, float]]:
    """{(model, domain, attack, seed): {fraction: accuracy}}; a repeated point is an error."""
    curves: dict[tuple, dict[float, float]] = defaultdict(dict)
    for i, row in enumerate(rows):
        row = normalize_row(row, i)
        key = (row["model"], row["domain"], row["attack"], row["seed"])
        if row["fraction"] in curves[key]:
            raise ConfigError(
                f"result rows repeat model={key[0]} domain={key[1]} attack={key[2]} seed={key[3]} "
                f"fraction={row['fraction']}; accepted: one accuracy per point"
            )
        curves[key][row["fraction"]] = row["accuracy"]
    return curves


def _source_accuracy(source_accuracy: dict | None, model: str, attack: str) -> float | None:
    if not source_accuracy or model not in source_accuracy:
        return None
    value = source_accuracy[model]
    if isinstance(value, dict):
        value = value.get(attack)
    return None if value is None else float(value)


def summarize(
    rows: Sequence[dict],
    *,
    scratch_model: str = "scratch",
    source_accuracy: dict | None = None,
) -> list[dict]:
    """One line per (model, domain, attack) of every model other than ``scratch_model``.

    Per seed, on the fractions that the model's curve has (the scratch curve of that
    domain and seed, attack "scratch", must have them all):
    ``slc_auc = AUC(model) - AUC(scratch)`` and its value normalised by ``ln(r_max/r_min)``.
    Over seeds: mean and Student-t 95% interval of both (``None`` with one seed), the mean
    accuracy of model and scratch at the largest fraction, and the source accuracy when given as
    ``{model: {attack: acc}}`` or ``{model: acc}``. Sorted by (domain, model, attack).
    """
    curves = _curves(rows)
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for model, domain, attack, seed in curves:
        if model != scratch_model:
            groups[(model, domain, attack)].append(seed)

    summary = []
    for (model, domain, attack), seeds in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0], item[0][2])):
        raw, normed, acc_max, scratch_max, max_fractions = [], [], [], [], []
        for seed in sorted(seeds):
            model_curve = curves[(model, domain, attack, seed)]
            scratch_curve = curves.get((scratch_model, domain, SCRATCH_ATTACK, seed))
            if scratch_curve is None:
                raise ConfigError(
                    f"no scratch rows (model={scratch_model}, attack={SCRATCH_ATTACK}) for domain={domain} "
                    f"seed={seed}, needed to score model={model} attack={attack}"
                )
            fractions = sorted(model_curve)
            missing = [r for r in fractions if r not in scratch_curve]
            if missing:
                raise ConfigError(
                    f"scratch curve of domain={domain} seed={seed} lacks fractions {missing} that "
                    f"model={model} attack={attack} has"
                )
            model_acc = [model_curve[r] for r in fractions]
            scratch_acc = [scratch_curve[r] for r in fractions]
            raw.append(slc_auc(fractions, model_acc, scratch_acc))
            normed.append(slc_auc(fractions, model_acc, scratch_acc, normalize=True))
            acc_max.append(model_acc[-1])
            scratch_max.append(scratch_acc[-1])
            max_fractions.append(fractions[-1])
        mean, low, high = mean_ci95(raw)
        n_mean, n_low, n_high = mean_ci95(normed)
        summary.append({
            "model": model,
            "domain": domain,
            "attack": attack,
            "n_seeds": len(raw),
            "slc_auc": mean,
            "slc_auc_ci_low": low,
            "slc_auc_ci_high": high,
            "slc_auc_norm": n_mean,
            "slc_auc_norm_ci_low": n_low,
            "slc_auc_norm_ci_high": n_high,
            "max_fraction": max(max_fractions),
            "accuracy_at_max_fraction": math.fsum(acc_max) / len(acc_max),
            "scratch_accuracy_at_max_fraction": math.fsum(scratch_max) / len(scratch_max),
            "source_accuracy": _source_accuracy(source_accuracy, model, attack),
        })
    return summary


# --------------------------------------------------------------------------- tables

_HEADERS = ("model", "domain", "attack", "seeds", "SLC-AUC [95% CI]", "normalised [95% CI]",
            "acc@r_max", "scratch@r_max", "source acc")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _with_interval(line: dict, key: str) -> str:
    """``mean [low, high]``; the mean alone where one seed gave no interval."""
    low, high = line[f"{key}_ci_low"], line[f"{key}_ci_high"]
    if low is None or high is None:
        return _fmt(line[key])
    return f"{_fmt(line[key])} [{_fmt(low)}, {_fmt(high)}]"


def _cells(line: dict) -> list[str]:
    return [
        str(line["model"]),
        str(line["domain"]),
        str(line["attack"]),
        str(line["n_seeds"]),
        _with_interval(line, "slc_auc"),
        _with_interval(line, "slc_auc_norm"),
        _fmt(line["accuracy_at_max_fraction"]),
        _fmt(line["scratch_accuracy_at_max_fraction"]),
        _fmt(line.get("source_accuracy")),
    ]


def summary_markdown(summary: Sequence[dict]) -> str:
    """The summary as a GitHub markdown table (numbers right-aligned)."""
    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [row(_HEADERS), "|" + "|".join([":---"] * 3 + ["---:"] * (len(_HEADERS) - 3)) + "|"]
    lines += [row(_cells(line)) for line in summary]
    return "\n".join(lines) + "\n"


def summary_text(summary: Sequence[dict]) -> str:
    """The summary as a plain-text table with aligned columns, for the console."""
    table = [list(_HEADERS)] + [_cells(line) for line in summary]
    widths = [max(len(r[i]) for r in table) for i in range(len(_HEADERS))]

    def row(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(padded).rstrip()

    lines = [row(table[0]), "  ".join("-" * w for w in widths)] + [row(r) for r in table[1:]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- verdicts


def verdicts(summary: Sequence[dict], *, source_accuracy: dict | None, source: str | None,
             reference: str = "unprotected") -> list[dict]:
    """One verdict per model: the source it keeps and the target SLC-AUC per attack.

    Source: linear-probe and kNN accuracy on the source domain, and the source-domain SLC-AUC
    of the best attack there (what a licensed user would pick), each also as a difference
    from the ``reference`` model's. Targets: per attack, the mean SLC-AUC over the other
    domains, and ``best``: the mean over those domains of the best attack on each (the owner's
    worst case). Selectivity, per attack also swept on the source: the source SLC-AUC minus
    the mean target SLC-AUC under that attack (``best``: the best against the best). Above 0
    the licensed domain is the better start; a protection that hits the targets alone raises
    it above the reference's, one that hits every domain alike (sparsity) does not.
    Models in summary order, the reference first when present; without it, no differences.
    """
    models = list(dict.fromkeys(line["model"] for line in summary))
    models.sort(key=lambda m: m != reference)

    def best_on(model: str, domain: str) -> float | None:
        values = [line["slc_auc"] for line in summary if line["model"] == model and line["domain"] == domain]
        return max(values) if values else None

    def kept(model: str) -> dict[str, float | None]:
        values = {attack: _source_accuracy(source_accuracy, model, attack) for attack in ("linear", "knn")}
        return {**values, "slc_auc": best_on(model, source) if source is not None else None}

    # with no reference model in the run there is nothing to subtract: no difference is
    # reported (None), rather than a row of dashes against a model that is not there
    base = kept(reference) if reference in models else None
    out = []
    for model in models:
        own = kept(model)
        per_attack: dict[str, list[float]] = defaultdict(list)
        domains = []
        for line in summary:
            if line["model"] == model and line["domain"] != source:
                per_attack[line["attack"]].append(line["slc_auc"])
                domains.append(line["domain"])
        targets = {attack: math.fsum(v) / len(v) for attack, v in sorted(per_attack.items())}
        best = [best_on(model, domain) for domain in dict.fromkeys(domains)]
        targets["best"] = math.fsum(best) / len(best) if best else None
        on_source = {line["attack"]: line["slc_auc"] for line in summary
                     if source is not None and line["model"] == model and line["domain"] == source}
        on_source["best"] = own["slc_auc"]
        selectivity = {attack: on_source[attack] - value for attack, value in targets.items()
                       if value is not None and on_source.get(attack) is not None}
        out.append({
            "model": model,
            "source": own,
            "source_minus_reference": {key: (None if value is None or base[key] is None else value - base[key])
                                       for key, value in own.items()} if base is not None and model != reference
                                      else None,
            "target_slc_auc": targets,
            "selectivity": selectivity,
        })
    return out


def verdict_text(lines: Sequence[dict], *, reference: str = "unprotected") -> str:
    """The verdicts as one plain line per model (the summary opens with them)."""
    def signed(value: float | None) -> str:
        return "-" if value is None else f"{value:+.3f}"

    text = []
    for line in lines:
        delta = line["source_minus_reference"] or {}
        # a source measure the run did not make (sweep.source_accuracy / sweep.source_curve off,
        # or no source domain) is left out, not printed as a dash with a dash of a difference
        source = ", ".join(
            f"{name} {_fmt(line['source'][key]) if key != 'slc_auc' else signed(line['source'][key])}"
            + (f" ({signed(delta.get(key))} vs {reference})" if delta else "")
            for key, name in (("linear", "linear"), ("knn", "kNN"), ("slc_auc", "best SLC-AUC"))
            if line["source"].get(key) is not None) or "not measured"
        targets = ", ".join(f"{attack} {signed(value)}" for attack, value in line["target_slc_auc"].items())
        selective = ", ".join(f"{attack} {signed(value)}" for attack, value in line["selectivity"].items())
        text.append(f"{line['model']}: source {source}; target SLC-AUC {targets}"
                    + (f"; selectivity (source minus targets) {selective}" if selective else ""))
    return "\n".join(text) + "\n"
