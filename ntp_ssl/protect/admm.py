"""ADMM pruning: which parameters to prune, and the Z/U state of the ADMM run.

The problem is ``min_W L(W)  s.t.  W in S`` with ``S`` a sparsity set (see
:mod:`ntp_ssl.protect.projections`). With an auxiliary copy ``Z`` and a scaled dual ``U``
(Boyd et al. 2011, section 3.1.1), one iteration is

    W-step:  some epochs of SGD on  L(W) + rho/2 * sum_l ||W_l - Z_l + U_l||^2
             (the caller's loop, adding penalty() to its loss)
    Z-step:  Z = Proj(W + U)                                        (update())
    U-step:  U = U + W - Z                                          (update())
    rho:     rho <- min(rho * growth, rho_max), or residual balancing;  U <- U * rho_old / rho_new

The rescaling of ``U`` keeps the unscaled dual ``rho * U`` unchanged when ``rho`` moves,
as the scaled form requires.
"""

from __future__ import annotations

import math
import numbers
from typing import Mapping

import torch
from torch import Tensor, nn

from ntp_ssl.errors import CheckpointError, ConfigError
from ntp_ssl.protect.projections import (
    check_delta,
    check_kind,
    check_sparsity,
    project_with_masks,
    soft_threshold_masks,
)

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.modules.batchnorm._BatchNorm,)


def select_prunable(
    model: nn.Module,
    *,
    include_bias: bool = False,
    include_batchnorm: bool = False,
    exclude_first_layer: bool = False,
) -> dict[str, nn.Parameter]:
    """The parameters ADMM prunes, named as in ``model.named_parameters()`` and in that order.

    Default: the weights of ``nn.Conv1d/2d/3d`` and ``nn.Linear`` modules. ``include_bias``
    adds their biases, ``include_batchnorm`` the affine weight and bias of batch norms.
    ``exclude_first_layer`` drops the first conv/linear module in registration order
    (weight and bias), the layer that sees raw pixels.
    """
    chosen: set[int] = set()
    first = True
    for module in model.modules():
        if isinstance(module, _WEIGHTED):
            if first and exclude_first_layer:
                first = False
                continue
            first = False
            chosen.add(id(module.weight))
            if include_bias and module.bias is not None:
                chosen.add(id(module.bias))
        elif include_batchnorm and isinstance(module, _NORMS) and module.affine:
            chosen.update((id(module.weight), id(module.bias)))
    return {name: p for name, p in model.named_parameters() if id(p) in chosen}


def find_conv_bn_pairs(model: nn.Module) -> dict[str, list[str]]:
    """Map a conv/linear weight name to the per-output-channel parameters that die with its filters.

    For each ``nn.ConvNd`` / ``nn.Linear`` (in registration order): its bias, and the affine
    weight and bias of the batch norm registered *directly* after it (the next leaf module
    in ``model.named_modules()`` order) when that norm has as many features as the layer
    has outputs. This matches plain ``Sequential`` CNNs, VGG features and torchvision
    ResNet blocks (``conv1 -> bn1``, ``conv2 -> bn2``, ``downsample.0 -> downsample.1``).
    The pairing is structural, not traced: a norm registered after a conv but applied to
    another tensor of the same width would be paired wrongly. Layers with nothing coupled
    are left out. Order per entry: norm weight, norm bias, layer bias.
    """
    leaves = [(name, m) for name, m in model.named_modules() if next(m.children(), None) is None]
    names = {id(p): name for name, p in model.named_parameters()}
    pairs: dict[str, list[str]] = {}
    for i, (_, module) in enumerate(leaves):
        if not isinstance(module, _WEIGHTED):
            continue
        out_features = module.weight.shape[0]
        coupled: list[str] = []
        if i + 1 < len(leaves):
            nxt = leaves[i + 1][1]
            if isinstance(nxt, _NORMS) and nxt.affine and nxt.num_features == out_features:
                coupled += [names[id(nxt.weight)], names[id(nxt.bias)]]
        if module.bias is not None:
            coupled.append(names[id(module.bias)])
        if coupled:
            pairs[names[id(module.weight)]] = coupled
    return pairs


class ADMMPruner:
    """ADMM for ``min_W L(W)  s.t.  W in S``.

    W-step on ``L(W) + rho/2 * sum_l ||W_l - Z_l + U_l||^2`` (the caller's loop);
    ``Z = Proj(W + U)``; ``U = U + W - Z``; ``rho *= growth`` (capped, U rescaled).

    ``params`` are pruned in place only by :meth:`hard_prune`. ``Z`` starts as ``Proj(W)``
    and ``U`` as zero. The mask is the set of entries the last Z-step kept (for the exact
    projections it has exactly the target sparsity). With ``projection="channel"``,
    ``coupled`` (from :func:`find_conv_bn_pairs`) and ``all_params`` (e.g.
    ``dict(model.named_parameters())``), :meth:`masks` and :meth:`hard_prune` also cover
    the batch-norm and bias entries of pruned filters, so masked retraining keeps them
    at zero too.
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        *,
        sparsity: float,
        projection: str = "layer",
        rho: float = 5e-3,
        rho_growth: float = 1.0,
        rho_max: float = 1.0,
        rho_schedule: str = "geometric",
        balance_mu: float = 10.0,
        balance_tau: float = 2.0,
        soft_delta: float | None = None,
        random_seed: int | None = None,
        coupled: Mapping[str, list[str]] | None = None,
        all_params: Mapping[str, nn.Parameter] | None = None,
    ) -> None:
        check_kind(projection)
        check_sparsity(sparsity)
        if not params:
            raise ConfigError("ADMM needs at least one prunable parameter, got none")
        if not _positive(rho):
            raise ConfigError(f"rho must be a number > 0, got {rho!r}")
        if not _positive(rho_growth):
            raise ConfigError(f"rho_growth must be a number > 0, got {rho_growth!r}")
        if not _positive(rho_max) or rho_max < rho:
            raise ConfigError(f"rho_max must be a number >= rho ({rho}), got {rho_max!r}")
        if rho_schedule not in ("geometric", "balanced"):
            raise ConfigError(f"rho_schedule {rho_schedule!r} is not one of: geometric, balanced")
        if not (_positive(balance_mu) and balance_mu > 1 and _positive(balance_tau) and balance_tau > 1):
            raise ConfigError(f"balance_mu {balance_mu!r} and balance_tau {balance_tau!r} must be numbers > 1")
        if projection == "soft":
            if soft_delta is None:
                raise ConfigError("projection 'soft' needs soft_delta (a number >= 0), got None")
            check_delta(soft_delta)
        self.params = dict(params)
        self.sparsity = float(sparsity)
        self.projection = projection
        self.rho = float(rho)
        self.rho_growth = float(rho_growth)
        self.rho_max = float(rho_max)
        self.rho_min = float(rho)
        self.rho_schedule, self.balance_mu, self.balance_tau = rho_schedule, float(balance_mu), float(balance_tau)
        self.soft_delta = None if soft_delta is None else float(soft_delta)
        if random_seed is not None and projection != "random":
            raise ConfigError(f"random_seed={random_seed!r} applies to projection 'random' only, got {projection!r}")
        self.random_seed = random_seed
        self.coupled, self.all_params = self._check_coupled(coupled, all_params)
        self.iterations = 0
        with torch.no_grad():
            weights = {n: p.detach() for n, p in self.params.items()}
            z, self._masks = self._project(weights)
        self.Z: dict[str, Tensor] = {n: t.clone() for n, t in z.items()}
        self.U: dict[str, Tensor] = {
            n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in weights.items()
        }

    # ------------------------------------------------------------------ ADMM steps

    def penalty(self) -> Tensor:
        """``rho/2 * sum_l ||W_l - Z_l + U_l||^2``, differentiable in W (float32 or wider)."""
        self._follow_devices()
        total = None
        for name, w in self.params.items():
            diff = w - self.Z[name] + self.U[name]
            term = diff.to(torch.promote_types(diff.dtype, torch.float32)).pow(2).sum()
            total = term if total is None else total + term
        return 0.5 * self.rho * total

    @torch.no_grad()
    def update(self) -> dict[str, float]:
        """Z-step, U-step, rho schedule. Returns ``primal/<name> = ||W - Z||``,
        ``dual/<name> = rho * ||Z - Z_prev||``, their root-sum-square totals
        ``primal_total``/``dual_total``, ``rho_w_step`` (the rho of the W-step just run, which
        scales its penalty and this dual residual) and ``rho`` (the value for the next W-step)."""
        self._follow_devices()
        weights = {n: p.detach() for n, p in self.params.items()}
        z_new, self._masks = self._project({n: w + self.U[n] for n, w in weights.items()})
        stats: dict[str, float] = {"rho_w_step": self.rho}
        primal_sq = dual_sq = 0.0
        for name, w in weights.items():
            primal = torch.linalg.vector_norm((w - z_new[name]).double()).item()
            dual = self.rho * torch.linalg.vector_norm((z_new[name] - self.Z[name]).double()).item()
            stats[f"primal/{name}"], stats[f"dual/{name}"] = primal, dual
            primal_sq += primal**2
            dual_sq += dual**2
            self.U[name].add_(w - z_new[name])
            self.Z[name] = z_new[name]
        new_rho = self.next_rho(math.sqrt(primal_sq), math.sqrt(dual_sq))
        if new_rho != self.rho:
            for u in self.U.values():
                u.mul_(self.rho / new_rho)
            self.rho = new_rho
        self.iterations += 1
        stats["primal_total"] = math.sqrt(primal_sq)
        stats["dual_total"] = math.sqrt(dual_sq)
        stats["rho"] = self.rho
        return stats

    def next_rho(self, primal: float, dual: float) -> float:
        """The rho of the next W-step. ``geometric``: ``min(rho * growth, rho_max)``.
        ``balanced`` (residual balancing): ``rho * tau`` when ``primal > mu * dual`` (W is far
        from Z: pull harder), ``rho / tau`` when ``dual > mu * primal`` (Z still jumps: let
        W move), else unchanged; kept within [initial rho, rho_max]."""
        if self.rho_schedule == "geometric":
            return min(self.rho * self.rho_growth, self.rho_max)
        if primal > self.balance_mu * dual:
            return min(self.rho * self.balance_tau, self.rho_max)
        if dual > self.balance_mu * primal:
            return max(self.rho / self.balance_tau, self.rho_min)
        return self.rho

    def masks(self) -> dict[str, Tensor]:
        """Bool keep-masks: the support of the last Z-step, plus coupled channel params (channel projection)."""
        return self._with_coupled({n: m.clone() for n, m in self._masks.items()})

    @torch.no_grad()
    def hard_prune(self) -> dict[str, Tensor]:
        """``W <- W * M`` in place and return the masks. ``M`` is the support of Z; for
        ``soft`` it is the support of ``soft_threshold(W + U, delta)`` at call time.
        With the channel projection, coupled params of pruned filters are zeroed too."""
        self._follow_devices()
        if self.projection == "soft":
            weights = {n: p.detach() + self.U[n] for n, p in self.params.items()}
            self._masks = soft_threshold_masks(weights, self.soft_delta)  # type: ignore[arg-type]
        masks = self.masks()
        for name, m in masks.items():
            target = self.params[name] if name in self.params else self.all_params[name]
            target.masked_fill_(~m.to(target.device), 0)
        return masks

    # ----------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Tensor | float]:
        """``Z/<name>``, ``U/<name>`` (tensors), ``M/<name>`` (bool), ``rho`` and ``iterations`` (floats)."""
        state: dict[str, Tensor | float] = {}
        for name in self.params:
            state[f"Z/{name}"] = self.Z[name].detach().clone().contiguous()
            state[f"U/{name}"] = self.U[name].detach().clone().contiguous()
            state[f"M/{name}"] = self._masks[name].clone().contiguous()
        state["rho"] = float(self.rho)
        state["iterations"] = float(self.iterations)
        return state

    def load_state_dict(self, state: Mapping[str, Tensor | float]) -> None:
        """Restore what :meth:`state_dict` returned (for the same parameter names and shapes)."""
        for key in ("rho", "iterations"):
            if key not in state:
                raise CheckpointError(f"ADMM state lacks {key!r}; expected keys Z/*, U/*, M/*, rho, iterations")
        loaded: dict[str, dict[str, Tensor]] = {"Z": {}, "U": {}, "M": {}}
        for name, p in self.params.items():
            for prefix in loaded:
                key = f"{prefix}/{name}"
                value = state.get(key)
                if not isinstance(value, Tensor) or tuple(value.shape) != tuple(p.shape):
                    got = "missing" if value is None else f"shape {tuple(getattr(value, 'shape', ()))}"
                    raise CheckpointError(f"ADMM state {key!r} is {got}; expected a tensor of shape {tuple(p.shape)}")
                dtype = torch.bool if prefix == "M" else p.dtype
                loaded[prefix][name] = value.detach().to(device=p.device, dtype=dtype).clone()
        rho = float(state["rho"])  # type: ignore[arg-type]
        if not rho > 0:
            raise CheckpointError(f"ADMM state rho must be > 0, got {rho!r}")
        self.Z, self.U, self._masks = loaded["Z"], loaded["U"], loaded["M"]
        self.rho = rho
        self.iterations = int(state["iterations"])  # type: ignore[arg-type]

    # ------------------------------------------------------------------- internals

    def _project(self, weights: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return project_with_masks(weights, self.projection, sparsity=self.sparsity, delta=self.soft_delta,
                                  random_seed=self.random_seed)

    def _with_coupled(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.projection != "channel":
            return masks
        for conv_name, names in self.coupled.items():
            kept = masks[conv_name].reshape(masks[conv_name].shape[0], -1).any(dim=1)
            for name in names:
                param = self.all_params[name]
                m = kept.to(param.device).reshape(param.shape)
                masks[name] = masks[name] & m if name in masks else m
        return masks

    def _check_coupled(
        self, coupled: Mapping[str, list[str]] | None, all_params: Mapping[str, nn.Parameter] | None
    ) -> tuple[dict[str, list[str]], dict[str, nn.Parameter]]:
        if not coupled:
            return {}, dict(all_params or {})
        if all_params is None:
            raise ConfigError("coupled channel params need all_params (name -> parameter), got None")
        all_params = dict(all_params)
        kept: dict[str, list[str]] = {}
        for conv_name, names in coupled.items():
            if conv_name not in self.params:  # e.g. an excluded first layer: not pruned, nothing to couple
                continue
            out = self.params[conv_name].shape[0] if self.params[conv_name].dim() > 0 else 1
            for name in names:
                if name not in all_params:
                    raise ConfigError(f"coupled param {name!r} (of {conv_name!r}) is not in all_params")
                if all_params[name].numel() != out:
                    raise ConfigError(
                        f"coupled param {name!r} has {all_params[name].numel()} entries; "
                        f"expected {out}, the output channels of {conv_name!r}"
                    )
            kept[conv_name] = list(names)
        return kept, all_params

    def _follow_devices(self) -> None:
        """Move Z, U and masks to the device of their parameter if the model was moved."""
        for name, p in self.params.items():
            if self.Z[name].device != p.device:
                self.Z[name] = self.Z[name].to(p.device)
                self.U[name] = self.U[name].to(p.device)
                self._masks[name] = self._masks[name].to(p.device)


def _positive(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x > 0
