"""Projections onto sparsity sets: the Z-step of ADMM pruning.

Every function is pure: it takes a mapping ``name -> tensor`` and returns a new dict with
the same keys, shapes and dtypes; the inputs are never modified. Pruned entries are set to
``+0.0``; kept entries keep their exact value.

Exact projections (``layer``, ``global``, ``channel``, and the ``random`` control) zero exactly :func:`n_pruned`
entries (or filters). Ranking is by magnitude; ties are broken by position, the earlier
entry (lower flat index, earlier tensor in the mapping's order) being pruned first, so
the result is deterministic. Each exact projection is idempotent:
``Proj(Proj(w)) == Proj(w)``.

The ``*_masks`` functions return the boolean "kept" masks the projections apply; the
ADMM pruner uses them so that its mask has the exact sparsity even where a kept value
happens to be exactly zero.
"""

from __future__ import annotations

import math
import numbers
import zlib
from typing import Callable, Mapping

import torch
from torch import Tensor

from ntp_ssl.errors import ConfigError

Weights = Mapping[str, Tensor]


def n_pruned(numel: int, sparsity: float) -> int:
    """Number of entries an exact projection zeroes: ``min(floor(s * n + 0.5), n - 1)``.

    Rounds half up (``n = 10, s = 0.25 -> 3``) and never removes all ``n`` entries of a
    non-empty tensor: sparsity is below 1, so at least one entry survives
    (``n = 1 -> 0`` for any sparsity). ``n = 0 -> 0``.
    """
    check_sparsity(sparsity)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if numel == 0:
        return 0
    return min(int(math.floor(sparsity * numel + 0.5)), numel - 1)


# ----------------------------------------------------------------------------- masks


def topk_masks_per_layer(weights: Weights, sparsity: float) -> dict[str, Tensor]:
    """Per tensor: keep the ``n - n_pruned(n, s)`` entries of largest ``|w|``."""
    check_sparsity(sparsity)
    masks = {}
    for name, w in weights.items():
        scores = w.detach().abs().reshape(-1)
        masks[name] = _keep_largest(scores, n_pruned(scores.numel(), sparsity)).reshape(w.shape)
    return masks


def random_masks_per_layer(weights: Weights, sparsity: float, seed: int | None = None) -> dict[str, Tensor]:
    """Per tensor: keep ``n - n_pruned(n, s)`` entries chosen at random, whatever their values
    (the "random mask" control: sparsity without any choice of weights). The draw is fixed by
    the tensor's name (``seed=None``: the same encoder always gets the same mask, whatever the
    run's seed) or by the name and ``seed`` together (independent masks for different seeds)."""
    check_sparsity(sparsity)
    masks = {}
    for name, w in weights.items():
        key = name if seed is None else f"{int(seed)}/{name}"
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        scores = torch.rand(w.numel(), generator=generator)
        masks[name] = _keep_largest(scores, n_pruned(w.numel(), sparsity)).reshape(w.shape).to(w.device)
    return masks


def project_random(weights: Weights, sparsity: float, seed: int | None = None) -> dict[str, Tensor]:
    """``W * M`` with the random keep masks of :func:`random_masks_per_layer`."""
    return apply_keep_masks(weights, random_masks_per_layer(weights, sparsity, seed))


def topk_masks_global(weights: Weights, sparsity: float) -> dict[str, Tensor]:
    """One ranking over all entries of all tensors by plain ``|w|``; prune ``n_pruned(total, s)``.

    No per-tensor rescaling: a tensor whose weights are small overall loses more of them
    than the average, and at high sparsity can lose all of them.
    """
    check_sparsity(sparsity)
    if not weights:
        return {}
    flats = [w.detach().abs().reshape(-1) for w in weights.values()]
    dtype = torch.float64 if any(f.dtype == torch.float64 for f in flats) else torch.float32
    device = flats[0].device
    scores = torch.cat([f.to(device=device, dtype=dtype) for f in flats])
    keep = _keep_largest(scores, n_pruned(scores.numel(), sparsity))
    masks, start = {}, 0
    for (name, w), flat in zip(weights.items(), flats):
        masks[name] = keep[start : start + flat.numel()].reshape(w.shape).to(w.device)
        start += flat.numel()
    return masks


def channel_masks(weights: Weights, sparsity: float) -> dict[str, Tensor]:
    """Per tensor: keep the output filters (slices along dim 0) of largest L2 norm.

    ``n_pruned(out_channels, s)`` whole filters are zeroed; a 1-D tensor is treated as
    ``out_channels`` filters of one entry each, a 0-D tensor as one filter.
    """
    check_sparsity(sparsity)
    masks = {}
    for name, w in weights.items():
        if w.numel() == 0:
            masks[name] = torch.ones_like(w, dtype=torch.bool)
            continue
        filters = w.detach().reshape(w.shape[0] if w.dim() > 0 else 1, -1)
        norms = filters.double().pow(2).sum(dim=1)  # squared norm ranks like the norm
        keep = _keep_largest(norms, n_pruned(norms.numel(), sparsity))
        shape = (-1,) + (1,) * (w.dim() - 1) if w.dim() > 0 else ()
        masks[name] = keep.reshape(shape).expand(w.shape).clone()
    return masks


def soft_threshold_masks(weights: Weights, delta: float) -> dict[str, Tensor]:
    """Support of the soft threshold: ``|v| > delta``."""
    check_delta(delta)
    return {name: w.detach().abs() > delta for name, w in weights.items()}


# ----------------------------------------------------------------------- projections


def project_topk_per_layer(weights: Weights, sparsity: float) -> dict[str, Tensor]:
    """Exact per-tensor top-k: zero the ``n_pruned(numel, s)`` smallest ``|w|`` of each tensor."""
    return apply_keep_masks(weights, topk_masks_per_layer(weights, sparsity))


def project_topk_global(weights: Weights, sparsity: float) -> dict[str, Tensor]:
    """Exact global top-k: zero the ``n_pruned(total, s)`` smallest ``|w|`` over all tensors."""
    return apply_keep_masks(weights, topk_masks_global(weights, sparsity))


def project_channels(weights: Weights, sparsity: float) -> dict[str, Tensor]:
    """Exact filter pruning: per tensor, zero the ``n_pruned(out, s)`` dim-0 slices of smallest ``||w_i||_2``."""
    return apply_keep_masks(weights, channel_masks(weights, sparsity))


def soft_threshold(weights: Weights, delta: float) -> dict[str, Tensor]:
    """Elementwise ``sign(v) * max(|v| - delta, 0)`` (the prox of ``delta * ||v||_1``); no exact sparsity."""
    check_delta(delta)
    out = {}
    for name, w in weights.items():
        shrunk = w.abs() - delta
        out[name] = torch.where(shrunk > 0, torch.sign(w) * shrunk, torch.zeros_like(w))  # +0.0 where pruned
    return out


def apply_keep_masks(weights: Weights, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``w * m`` for boolean keep masks ``m``; pruned entries become ``+0.0``."""
    return {name: w.masked_fill(~masks[name].to(w.device), 0) for name, w in weights.items()}


def _soft_project(weights: Weights, sparsity: float, delta: float | None = None) -> dict[str, Tensor]:
    if delta is None:
        raise ConfigError("soft projection needs delta (a number >= 0), got None")
    return soft_threshold(weights, delta)


PROJECTIONS: dict[str, Callable[..., dict[str, Tensor]]] = {
    "layer": project_topk_per_layer,
    "global": project_topk_global,
    "channel": project_channels,
    "soft": _soft_project,
    "random": project_random,
}

MASKS: dict[str, Callable[[Weights, float], dict[str, Tensor]]] = {
    "layer": topk_masks_per_layer,
    "global": topk_masks_global,
    "channel": channel_masks,
    "random": random_masks_per_layer,
}


def check_kind(kind: str) -> str:
    """Raise :class:`ConfigError` unless ``kind`` names a projection in :data:`PROJECTIONS`."""
    if kind not in PROJECTIONS:
        raise ConfigError(f"unknown projection {kind!r}; accepted: {', '.join(sorted(PROJECTIONS))}")
    return kind


def project(weights: Weights, kind: str, *, sparsity: float, delta: float | None = None,
            random_seed: int | None = None) -> dict[str, Tensor]:
    """``Proj(weights)`` of ``PROJECTIONS[kind]``; ``delta`` is used (and required) by ``soft``
    only, ``random_seed`` by ``random`` only (as in :func:`project_with_masks`)."""
    check_kind(kind)
    check_sparsity(sparsity)
    if kind == "soft":
        return _soft_project(weights, sparsity, delta)
    if kind == "random":
        return project_random(weights, sparsity, random_seed)
    return PROJECTIONS[kind](weights, sparsity)


def project_with_masks(
    weights: Weights, kind: str, *, sparsity: float, delta: float | None = None, random_seed: int | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(Proj(weights), keep masks)``; for ``soft`` the masks are ``|v| > delta``; ``random_seed``
    is used by ``random`` only (see :func:`random_masks_per_layer`)."""
    check_kind(kind)
    check_sparsity(sparsity)
    if kind == "soft":
        projected = _soft_project(weights, sparsity, delta)
        return projected, soft_threshold_masks(weights, delta)  # type: ignore[arg-type]
    if kind == "random":
        masks = random_masks_per_layer(weights, sparsity, random_seed)
        return apply_keep_masks(weights, masks), masks
    masks = MASKS[kind](weights, sparsity)
    return apply_keep_masks(weights, masks), masks


# -------------------------------------------------------------------------- helpers


def _keep_largest(scores: Tensor, n_prune: int) -> Tensor:
    """Bool mask over a 1-D ``scores`` that drops the ``n_prune`` smallest (earlier index first on ties)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        order = torch.sort(scores, stable=True).indices  # ascending; ties keep index order
        keep[order[:n_prune]] = False
    return keep


def check_sparsity(sparsity: float) -> None:
    """Raise :class:`ConfigError` unless ``sparsity`` is a real number in ``[0, 1)``."""
    ok = isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool) and 0.0 <= sparsity < 1.0
    if not ok:  # also rejects NaN
        raise ConfigError(f"sparsity must be a number in [0, 1), got {sparsity!r}")


def check_delta(delta: float) -> None:
    """Raise :class:`ConfigError` unless ``delta`` is a finite real number ``>= 0``."""
    ok = isinstance(delta, numbers.Real) and not isinstance(delta, bool) and delta >= 0.0 and math.isfinite(delta)
    if not ok:
        raise ConfigError(f"soft-threshold delta must be a finite number >= 0, got {delta!r}")
