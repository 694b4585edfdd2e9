"""Counting what pruning left: per-tensor and total sparsity, dead channels, file sizes."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ntp_ssl.errors import ConfigError


def sparsity_report(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    *,
    dense_bytes: int | None = None,
    saved_bytes: int | None = None,
) -> dict[str, Any]:
    """Count zeros in the model's actual weights (not in the masks).

    ``tensors[name]`` for each key of ``masks``: ``shape``, ``numel``, ``nonzeros``,
    ``sparsity = 1 - nonzeros / numel``, ``mask_kept`` (True entries of the mask) and, for
    tensors with at least 2 dims, ``zero_output_channels`` (all-zero slices along dim 0)
    and ``zero_input_channels`` (all-zero slices along dim 1); ``None`` for fewer dims.
    ``prunable`` totals over those tensors, ``model`` over all parameters (buffers
    excluded); ``files`` (when a size is given): ``dense_bytes``, ``saved_bytes``,
    ``ratio = saved / dense``.
    """
    params = dict(model.named_parameters())
    tensors: dict[str, dict[str, Any]] = {}
    for name, mask in masks.items():
        if name not in params:
            raise ConfigError(f"mask names parameter {name!r}, which the model does not have")
        w = params[name].detach()
        nonzero = w != 0
        count = int(nonzero.sum())
        entry: dict[str, Any] = {
            "shape": list(w.shape),
            "numel": w.numel(),
            "nonzeros": count,
            "sparsity": _sparsity(count, w.numel()),
            "mask_kept": int(mask.to(torch.bool).sum()),
            "zero_output_channels": None,
            "zero_input_channels": None,
        }
        if w.dim() >= 2:
            entry["zero_output_channels"] = int((~nonzero.reshape(w.shape[0], -1).any(dim=1)).sum())
            entry["zero_input_channels"] = int((~nonzero.transpose(0, 1).reshape(w.shape[1], -1).any(dim=1)).sum())
        tensors[name] = entry
    numel = sum(e["numel"] for e in tensors.values())
    nonzeros = sum(e["nonzeros"] for e in tensors.values())
    all_numel = sum(p.numel() for p in params.values())
    all_nonzeros = sum(int((p.detach() != 0).sum()) for p in params.values())
    report: dict[str, Any] = {
        "tensors": tensors,
        "prunable": {"numel": numel, "nonzeros": nonzeros, "sparsity": _sparsity(nonzeros, numel)},
        "model": {"numel": all_numel, "nonzeros": all_nonzeros, "sparsity": _sparsity(all_nonzeros, all_numel)},
    }
    if dense_bytes is not None or saved_bytes is not None:
        ratio = saved_bytes / dense_bytes if dense_bytes and saved_bytes is not None else None
        report["files"] = {"dense_bytes": dense_bytes, "saved_bytes": saved_bytes, "ratio": ratio}
    return report


def format_sparsity_table(report: Mapping[str, Any]) -> str:
    """An aligned plain-text table of :func:`sparsity_report`, one row per tensor, then totals."""
    header = ["tensor", "shape", "numel", "nonzeros", "sparsity", "zero out ch", "zero in ch"]
    rows = []
    for name, e in report["tensors"].items():
        rows.append([
            name,
            "x".join(str(s) for s in e["shape"]) or "scalar",
            str(e["numel"]),
            str(e["nonzeros"]),
            f"{100 * e['sparsity']:.2f}%",
            "-" if e["zero_output_channels"] is None else str(e["zero_output_channels"]),
            "-" if e["zero_input_channels"] is None else str(e["zero_input_channels"]),
        ])
    totals = []
    for label, key in (("total (prunable)", "prunable"), ("total (all params)", "model")):
        t = report[key]
        totals.append([label, "", str(t["numel"]), str(t["nonzeros"]), f"{100 * t['sparsity']:.2f}%", "", ""])
    widths = [max(len(r[i]) for r in [header, *rows, *totals]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        left = cells[0].ljust(widths[0])
        return "  ".join([left, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]).rstrip()

    rule = "-" * len(line(header))
    out = [line(header), rule, *(line(r) for r in rows), rule, *(line(r) for r in totals)]
    files = report.get("files")
    if files:
        parts = [
            f"{k.replace('_', ' ')}: {_size(files[k])}" for k in ("dense_bytes", "saved_bytes", "release_bytes")
            if files.get(k) is not None
        ]
        if files.get("ratio") is not None:
            parts.append(f"ratio: {files['ratio']:.3f}")
        out.append("files: " + ", ".join(parts))
    return "\n".join(out)


def _sparsity(nonzeros: int, numel: int) -> float:
    return 1.0 - nonzeros / numel if numel else 0.0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
