"""The export of a protected encoder: ``protected.safetensors`` and its sparsity report.

The file holds the weights baked as ``W * M`` (exactly the mask's nonzeros), the heads, and
the mask itself as ``mask.<param>``; its ``.json`` records what protected it. After writing,
the file is read back and checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from ntp_ssl.config import to_plain
from ntp_ssl.io import atomic_path, atomic_write_json, atomic_write_text
from ntp_ssl.pretrain.methods import export_state
from ntp_ssl.release import save_release
from ntp_ssl.protect.sparsity import format_sparsity_table, sparsity_report
from ntp_ssl.shared.checkpoint import MASK_PREFIX, load_checkpoint, save_checkpoint


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def write_sparsity_files(run_dir: Path, report: dict, *, writer, encoder: nn.Module,
                         masks: dict[str, torch.Tensor]) -> None:
    """sparsity.json, sparsity.txt, the printed table, and TensorBoard text and kept-weight histograms."""
    table = format_sparsity_table(report)
    atomic_write_json(run_dir / "sparsity.json", report)
    atomic_write_text(run_dir / "sparsity.txt", table + "\n")
    print(table)
    writer.add_text("sparsity", f"```\n{table}\n```", 0)
    for name, param in encoder.named_parameters():
        if name in masks:
            writer.add_histogram(f"weights/{name}", param.detach().cpu()[masks[name].cpu()], 0)
    writer.flush()


def write_admm_diagnostics(run_dir: Path, metrics: dict) -> None:
    """admm_diagnostics.json: per iteration ||W - Z|| / ||W||, the overlap of consecutive Z
    supports, the W-step's learning rate (``lr``) and rho (``rho_w_step``: its penalty's, and
    the dual residual's scale), ``rho`` the schedule set for the next W-step, and the
    residuals; at the hard prune the kNN just before and after it and the overlap of the
    final mask with the magnitude mask of the unprotected weights."""
    keys = ("iteration", "lr", "rho_w_step", "rho", "primal_total", "dual_total", "primal_relative",
            "support_overlap", "knn")
    atomic_write_json(run_dir / "admm_diagnostics.json", {
        "iterations": [{k: it.get(k) for k in keys} for it in metrics.get("iterations", [])],
        "hard_prune": metrics.get("hard_prune"), "knn_before": metrics.get("knn_before"),
        "knn_after_retraining": metrics.get("knn_after")})


def export_protected(path: Path, method: nn.Module, masks: dict[str, torch.Tensor], *, cfg: Any, checkpoint: Path,
                     meta: dict, metrics: dict) -> dict:
    """Bake ``W * M`` into ``method``'s encoder, write ``path`` (+ ``.json``), verify it; returns the sparsity report."""
    named = dict(method.encoder.named_parameters())
    with torch.no_grad():  # bake W * M: the file holds exactly the mask's nonzeros
        for name, mask in masks.items():
            named[name].mul_(mask.to(named[name].dtype))
    tensors = export_state(method)
    for name, mask in masks.items():
        tensors[f"{MASK_PREFIX}{name}"] = mask.to(torch.uint8).cpu()
    dense_bytes = sum(p.numel() * p.element_size() for p in method.encoder.parameters())
    report = sparsity_report(method.encoder, masks, dense_bytes=dense_bytes, saved_bytes=len(safetensors_bytes(tensors)))
    protected_meta = {
        **{k: v for k, v in meta.items() if k not in ("sha256", "history")},
        "kind": "protected_encoder",
        "name": "protected",
        "protected_from": {"path": str(checkpoint), "sha256": meta.get("sha256")},
        "protection": {"prune": to_plain(cfg.prune), "admm": to_plain(cfg.admm), "loss": to_plain(cfg.loss)},
        "source": cfg.data.source, "targets": list(cfg.data.targets), "seed": cfg.seed,
        "metrics": metrics,
        "sparsity": report,
    }
    # the release file: pruned tensors packed (bitmask + kept values), loadable without ntp-ssl
    release = path.with_name(f"{path.stem}.release.safetensors")
    with atomic_path(release) as tmp:  # whole or not at all, with the usual permissions
        save_release(tmp, method.encoder, masks, backbone=str(meta.get("backbone")),
                     extra={"source": str(cfg.data.source)})
    report.setdefault("files", {})["release_bytes"] = release.stat().st_size
    save_checkpoint(path, tensors, protected_meta)
    saved, _ = load_checkpoint(path)  # read back: exactly the mask's nonzeros, nothing dense besides
    for name, mask in masks.items():
        nonzeros = int((saved[f"encoder.{name}"] != 0).sum())
        if nonzeros > int(mask.sum()):
            raise RuntimeError(f"export bug: {name} has {nonzeros} nonzeros but its mask keeps {int(mask.sum())}")
    return report
