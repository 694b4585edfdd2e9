"""Pretraining methods: SimCLR, MoCo v2 and supervised, built from lightly building blocks.

Every method is an ``nn.Module`` that owns an ``encoder`` (the backbone that is released)
and its heads, and exposes ``training_loss(views, labels)``. The SSL methods also expose
``ssl_loss(view_a, view_b)``, a side-effect-free in-batch NT-Xent used by the protect stage.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead, SimCLRProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import MoCoV2Transform, SimCLRTransform
from lightly.utils.scheduler import cosine_schedule
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2 as T

from ntp_ssl.checks import check_channels, check_image_size
from ntp_ssl.errors import CheckpointError, ConfigError
from ntp_ssl.shared.checkpoint import MASK_PREFIX, load_encoder, meta_int

#: Child modules whose weights a released checkpoint holds (MoCo's key branch is not one).
EXPORTED_MODULES = ("encoder", "projection_head", "classifier")


def _feature_dim(encoder: nn.Module) -> int:
    dim = getattr(encoder, "feature_dim", None)
    if not isinstance(dim, int) or dim < 1:
        raise ConfigError(
            f"encoder {type(encoder).__name__} has no positive int attribute feature_dim "
            f"(got {dim!r}); build it with ntp_ssl.encoders.build_encoder"
        )
    return dim


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def _check_head_options(hidden_dim: Any, projection_dim: Any, temperature: Any) -> None:
    for name, value in (("hidden_dim", hidden_dim), ("projection_dim", projection_dim), ("temperature", temperature)):
        _check_positive(name, value)


def _check_views(views: Sequence[Tensor], needed: int, method: str) -> None:
    if len(views) < needed:
        raise ConfigError(
            f"{method} needs at least {needed} view(s) per batch, got {len(views)}; "
            f"build the data transform with build_train_transform({method.lower()!r}, ...)"
        )


class SimCLR(nn.Module):
    """SimCLR: encoder f, projection head g (lightly ``SimCLRProjectionHead``) and NT-Xent.

    For views a, b of a batch of n images, z = normalise(g(f(x))) and

        l_i = -log( exp(z_i . z_j(i) / T) / sum_{k != i} exp(z_i . z_k / T) )

    averaged over the 2n projections, with the other 2n - 2 projections as negatives.
    """

    def __init__(self, encoder: nn.Module, *, hidden_dim: int = 512, projection_dim: int = 128,
                 temperature: float = 0.2, gather_distributed: bool = False) -> None:
        super().__init__()
        _check_head_options(hidden_dim, projection_dim, temperature)
        self.encoder = encoder
        self.projection_head = SimCLRProjectionHead(
            input_dim=_feature_dim(encoder), hidden_dim=hidden_dim, output_dim=projection_dim
        )
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=gather_distributed)

    def forward(self, x: Tensor) -> Tensor:
        """Projection g(f(x)), shape (B, projection_dim)."""
        return self.projection_head(self.encoder(x))

    def ssl_loss(self, view_a: Tensor, view_b: Tensor) -> Tensor:
        """In-batch NT-Xent of the two views; changes no state beyond what a forward pass
        in the current train/eval mode does (batch-norm running statistics)."""
        return self.criterion(self(view_a), self(view_b))

    def training_loss(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        """NT-Xent of the first two views; ``labels`` are ignored."""
        _check_views(views, 2, "SimCLR")
        return self.ssl_loss(views[0], views[1])


class MoCoV2(nn.Module):
    """MoCo v2: query encoder f_q + head g_q (lightly ``MoCoProjectionHead``), momentum key
    encoder f_k + head g_k, and InfoNCE against a memory bank of K past keys:

        l_i = -log( exp(q_i . k_i / T) / (exp(q_i . k_i / T) + sum_{j<K} exp(q_i . n_j / T)) )

    with q, k, n L2-normalised. After each step the keys of the batch enter the bank
    (first in, first out). The key branch follows the query branch by an exponential
    moving average, theta_k <- m * theta_k + (1 - m) * theta_q, where m rises from
    ``momentum_base`` to 1 on a cosine schedule (see :meth:`set_progress`). Only
    parameters are averaged; the key branch's batch-norm statistics come from its own
    forward passes. ``memory_bank_size=0`` uses in-batch negatives instead of a bank.
    With ``symmetric=True`` both views serve as query and key: the loss is
    (l(q_a, k_b) + l(q_b, k_a)) / 2 against the same bank, and both key sets are enqueued.
    """

    def __init__(self, encoder: nn.Module, *, hidden_dim: int = 512, projection_dim: int = 128,
                 temperature: float = 0.2, memory_bank_size: int = 4096, momentum_base: float = 0.99,
                 symmetric: bool = False, gather_distributed: bool = False) -> None:
        super().__init__()
        _check_head_options(hidden_dim, projection_dim, temperature)
        if isinstance(memory_bank_size, bool) or not isinstance(memory_bank_size, int) or memory_bank_size < 0:
            raise ConfigError(
                f"memory_bank_size must be an integer >= 0 (0 = in-batch negatives), got {memory_bank_size!r}"
            )
        if isinstance(momentum_base, bool) or not isinstance(momentum_base, (int, float)) or not 0.0 <= momentum_base <= 1.0:
            raise ConfigError(f"momentum_base must be a number in [0, 1], got {momentum_base!r}")
        self.encoder = encoder
        self.projection_head = MoCoProjectionHead(
            input_dim=_feature_dim(encoder), hidden_dim=hidden_dim, output_dim=projection_dim
        )
        self.key_encoder = copy.deepcopy(self.encoder)
        self.key_projection_head = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.key_encoder)
        deactivate_requires_grad(self.key_projection_head)
        self.criterion = NTXentLoss(
            temperature=temperature,
            memory_bank_size=(memory_bank_size, projection_dim),
            gather_distributed=gather_distributed,
        )
        # In-batch NT-Xent for ssl_loss: never touches the memory bank.
        self.in_batch_criterion = NTXentLoss(temperature=temperature, gather_distributed=gather_distributed)
        self.momentum_base = float(momentum_base)
        self.momentum = float(momentum_base)
        self.symmetric = symmetric

    def forward(self, x: Tensor) -> Tensor:
        """Query projection g_q(f_q(x)), shape (B, projection_dim)."""
        return self.projection_head(self.encoder(x))

    @torch.no_grad()
    def _keys(self, x: Tensor) -> Tensor:
        return self.key_projection_head(self.key_encoder(x))

    def set_progress(self, step: int, total_steps: int) -> None:
        """m = 1 - (1 - m_base) * (cos(pi * step / (total_steps - 1)) + 1) / 2 (lightly
        ``cosine_schedule``; m = 1 from step total_steps - 1 on, and when total_steps <= 1)."""
        if step < 0 or total_steps < 0:
            raise ConfigError(
                f"step and total_steps must be >= 0, got step={step!r}, total_steps={total_steps!r}"
            )
        self.momentum = cosine_schedule(min(step, total_steps), total_steps, self.momentum_base, 1.0)

    @torch.no_grad()
    def update_key_encoder(self) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q for the encoder and the head."""
        for query, key in ((self.encoder, self.key_encoder), (self.projection_head, self.key_projection_head)):
            query_shapes = [(name, p.shape) for name, p in query.named_parameters()]
            key_shapes = [(name, p.shape) for name, p in key.named_parameters()]
            if query_shapes != key_shapes:
                raise RuntimeError(
                    "MoCo key branch no longer matches the query branch parameter by "
                    "parameter (names or shapes differ); rebuild the method"
                )
            update_momentum(query, key, m=self.momentum)

    def ssl_loss(self, view_a: Tensor, view_b: Tensor) -> Tensor:
        """In-batch NT-Xent of the query branch on both views: no memory bank, no momentum
        update (only the batch-norm statistics a forward pass in train mode updates)."""
        return self.in_batch_criterion(self(view_a), self(view_b))

    def training_loss(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        """Momentum update (when gradients are enabled), queries from view 0, keys from
        view 1, InfoNCE against the memory bank, which then receives the keys."""
        _check_views(views, 2, "MoCoV2")
        if torch.is_grad_enabled():
            self.update_key_encoder()
        query_a = self(views[0])
        key_b = self._keys(views[1])
        if not self.symmetric:
            return self.criterion(query_a, key_b)
        query_b = self(views[1])
        key_a = self._keys(views[0])
        return self.criterion(torch.cat([query_a, query_b]), torch.cat([key_b, key_a]))


class Supervised(nn.Module):
    """Encoder f + linear classifier h; loss CE(h(f(x)), y)."""

    def __init__(self, encoder: nn.Module, *, num_classes: int = 10) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.encoder = encoder
        self.classifier = nn.Linear(_feature_dim(encoder), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits h(f(x)), shape (B, num_classes)."""
        return self.classifier(self.encoder(x))

    def training_loss(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        """Cross-entropy of the first view's logits against ``labels``."""
        _check_views(views, 1, "Supervised")
        if labels is None:
            raise ConfigError("supervised pretraining needs labels, got labels=None")
        return F.cross_entropy(self(views[0]), labels)


METHODS: dict[str, type[nn.Module]] = {"simclr": SimCLR, "moco": MoCoV2, "supervised": Supervised}


def build_method(name: str, encoder: nn.Module, *, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Wrap ``encoder`` in the method ``name`` (a key of :data:`METHODS`).

    ``num_classes`` is used by ``supervised`` only; ``kwargs`` go to the method's
    constructor and must be among its keyword arguments.
    """
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; expected one of: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "encoder")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for method {name!r}; accepted: {', '.join(accepted)}"
        )
    if name == "supervised":
        kwargs["num_classes"] = num_classes
    return cls(encoder, **kwargs)


#: method -> the config keys (``method.*``) its constructor takes
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "simclr": ("hidden_dim", "projection_dim", "temperature"),
    "moco": ("hidden_dim", "projection_dim", "temperature", "memory_bank_size", "momentum_base"),
    "supervised": (),
}


def method_from_config(name: str, encoder: nn.Module, *, num_classes: int, options: Mapping[str, Any],
                       gather_distributed: bool = False) -> nn.Module:
    """The method ``name`` around ``encoder``, its options read from ``options`` (a ``method``
    config node, or the ``method_config`` a checkpoint recorded): the one way a method is built."""
    kwargs: dict[str, Any] = {key: options[key] for key in METHOD_OPTIONS.get(name, ()) if key in options}
    if name in ("simclr", "moco"):
        kwargs["gather_distributed"] = gather_distributed
    return build_method(name, encoder, num_classes=num_classes, **kwargs)


def load_method(path: str | Path, device) -> tuple[nn.Module, dict, dict[str, Tensor]]:
    """The method module (encoder + its heads) of a checkpoint, its metadata, and its masks."""
    encoder, meta, masks, tensors = load_encoder(path)
    options = meta.get("method_config") or {}
    if not isinstance(meta.get("method"), str) or not isinstance(options, dict):
        raise CheckpointError(f"checkpoint {str(path)!r}: metadata method={meta.get('method')!r} / method_config "
                              "is not a method name and a mapping of its options")
    num_classes = meta_int(meta, "num_classes", 10, path)
    try:
        method = method_from_config(meta["method"], encoder, num_classes=num_classes, options=options)
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {str(path)!r}: its method_config does not build a {meta['method']!r} "
                              f"method ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    load_exported_state(method, {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)})
    return method.to(device), meta, masks


# --------------------------------------------------------------------------- transforms


class _ConvertMode:
    """PIL image -> the same image in mode ``mode`` ("L" or "RGB")."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


class ViewsTransform:
    """PIL image -> tuple of view tensors: convert to the channel mode, then apply each
    view transform. Picklable, so it works in DataLoader worker processes."""

    def __init__(self, mode: str, views: Sequence[Callable[[Image.Image], Tensor]]) -> None:
        self.convert = _ConvertMode(mode)
        self.views = list(views)

    def __call__(self, image: Image.Image) -> tuple[Tensor, ...]:
        image = self.convert(image)
        return tuple(view(image) for view in self.views)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.convert!r}, views={self.views!r})"


#: Augmentation settings for 32 px digits: no flips (a flipped 2 is not a 2), crops that
#: keep most of the digit, half-strength colour jitter (lightly's advice for CIFAR-sized
#: images) and a modest, rare blur (PIL radius = sigma in pixels).
_SSL_VIEW_OPTIONS: dict[str, Any] = dict(
    hf_prob=0.0,
    vf_prob=0.0,
    rr_prob=0.0,
    min_scale=0.25,
    cj_strength=0.5,
    gaussian_blur=0.2,
    sigmas=(0.1, 0.6),
)


#: the ``method`` options that shape the SSL views (``build_train_transform``'s keywords)
VIEW_OPTIONS = ("min_scale", "invert_prob")


def view_options(method_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The view options of a ``method`` config node, or of the ``method_config`` a checkpoint
    recorded; None for each one it does not set (the built-in views)."""
    return {key: (method_config or {}).get(key) for key in VIEW_OPTIONS}


def build_train_transform(method: str, *, image_size: int, channels: int = 3, min_scale: float | None = None,
                          invert_prob: float | None = None) -> Callable:
    """PIL image -> tuple of normalised (channels, image_size, image_size) view tensors.

    SSL methods get two views (lightly ``SimCLRTransform`` / ``MoCoV2Transform``, without
    flips); ``supervised`` gets one lightly augmented view (random-resized crop with scale
    in [0.8, 1], rotation up to 10 degrees, shift up to 10%). Every view is normalised by
    x -> (x - 0.5) / 0.5 per channel. With ``channels == 1`` the image is converted to
    mode "L" and saturation, hue and greyscale are switched off. SSL views only:
    ``min_scale`` replaces the smallest crop scale (None: 0.25) and ``invert_prob`` > 0
    inverts each view with that probability before anything else (None or 0: never).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; expected one of: {', '.join(sorted(METHODS))}")
    check_image_size(image_size)
    check_channels(channels)
    mode = "L" if channels == 1 else "RGB"
    normalize = {"mean": [0.5] * channels, "std": [0.5] * channels}
    if method == "supervised":
        view = T.Compose(
            [
                T.RandomResizedCrop(image_size, scale=(0.8, 1.0), ratio=(0.9, 1.1)),
                T.RandomAffine(degrees=10, translate=(0.1, 0.1)),
                T.ToImage(),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(**normalize),
            ]
        )
        return ViewsTransform(mode, [view])
    options = dict(_SSL_VIEW_OPTIONS, input_size=image_size, normalize=normalize)
    if min_scale is not None:
        options["min_scale"] = float(min_scale)
    if channels == 1:
        options.update(cj_sat=0.0, cj_hue=0.0, random_gray_scale=0.0)
    views = (SimCLRTransform if method == "simclr" else MoCoV2Transform)(**options).transforms
    if invert_prob:
        views = [T.Compose([T.RandomInvert(p=float(invert_prob)), view]) for view in views]
    return ViewsTransform(mode, views)


# --------------------------------------------------------------------------- export


def export_state(method: nn.Module) -> dict[str, Tensor]:
    """The released weights: every ``encoder.*``, ``projection_head.*`` and
    ``classifier.*`` entry of the state dict (buffers included), as detached contiguous
    copies. MoCo's key branch and the loss's memory bank are not exported."""
    prefixes = tuple(f"{name}." for name in EXPORTED_MODULES)
    return {
        key: value.detach().clone().contiguous()
        for key, value in method.state_dict().items()
        if key.startswith(prefixes)
    }


def load_exported_state(method: nn.Module, state: dict[str, Tensor]) -> None:
    """Load :func:`export_state` output into ``method``; every key must match exactly, in
    name and shape. A MoCo key branch is reset to a copy of the loaded query branch."""
    expected = export_state(method)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not fit {type(method).__name__}: missing {_few(missing)}, unexpected "
            f"{_few(unexpected)}; expected keys under {', '.join(sorted({k.split('.')[0] + '.' for k in expected}))}"
        )
    wrong = [key for key in expected if tuple(state[key].shape) != tuple(expected[key].shape)]
    if wrong:
        key = wrong[0]
        raise CheckpointError(
            f"weights do not fit {type(method).__name__}: {len(wrong)} shape mismatch(es), e.g. {key} "
            f"has shape {tuple(state[key].shape)}, expected {tuple(expected[key].shape)}"
        )
    method.load_state_dict(state, strict=False)
    if isinstance(method, MoCoV2):
        method.key_encoder.load_state_dict(method.encoder.state_dict())
        method.key_projection_head.load_state_dict(method.projection_head.state_dict())


def _few(keys: Sequence[str], limit: int = 3) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"
