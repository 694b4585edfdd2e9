"""The release file of a protected encoder: sparse, and loadable without ntp-ssl.

``ntp-ssl protect`` writes ``protected.release.safetensors`` beside ``protected.safetensors``.
Each pruned tensor is stored as a packed bitmask (one bit per weight, ``uint8``) and its kept
values in order; every other tensor (batch-norm weights and statistics, unpruned biases) as
is. At sparsity ``s`` a pruned float32 tensor of ``n`` weights takes ``n/8 + 4 n (1 - s)``
bytes instead of ``4 n`` (0.525 n at s = 0.9). The layer list of the encoder is in the
safetensors header, so :func:`load_release` rebuilds a plain ``torch.nn.Module`` from torch
and safetensors alone: this file imports nothing else and may be copied next to a user's
code as it is. Sequential encoders (``small_cnn``, ``vgg11_bn``: convs, batch norms, ReLUs,
max-pools, then global average pooling) are rebuilt as modules; for other backbones
(ResNets) :func:`load_release_state_dict` gives the dense state dict.

    from ntp_ssl.release import load_release        # or: from release import load_release
    encoder = load_release("runs/protect/NAME/protected.release.safetensors")
    features = encoder(images)                        # (B, C, H, W) -> (B, feature_dim)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

FORMAT = "ntp-ssl-sparse-release-1"
BITS_SUFFIX, VALUES_SUFFIX = ".__bits", ".__values"
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)  # bit i of a byte: element 8k + i


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes, 8 elements per byte (element 8k + i is bit i of byte k)."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: the first ``numel`` bits as a flat bool tensor."""
    bits = (packed.to(torch.uint8).view(-1, 1) & _BIT_WEIGHTS).ne(0)
    return bits.reshape(-1)[:numel]


def _layers(encoder: nn.Module) -> list[dict] | None:
    """The layer list of a ``features`` + global-average-pool encoder; None for any other."""
    features, pool = getattr(encoder, "features", None), getattr(encoder, "pool", None)
    if not isinstance(features, nn.Sequential) or not isinstance(pool, nn.AdaptiveAvgPool2d):
        return None
    layers = []
    for module in features:
        if isinstance(module, nn.Conv2d):
            layers.append({"op": "conv", "in": module.in_channels, "out": module.out_channels,
                           "kernel": list(module.kernel_size), "stride": list(module.stride),
                           "padding": list(module.padding), "bias": module.bias is not None})
        elif isinstance(module, nn.BatchNorm2d):
            layers.append({"op": "bn", "features": module.num_features, "eps": module.eps})
        elif isinstance(module, nn.ReLU):
            layers.append({"op": "relu"})
        elif isinstance(module, nn.MaxPool2d):
            layers.append({"op": "maxpool", "kernel": module.kernel_size, "stride": module.stride,
                           "padding": module.padding, "dilation": module.dilation, "ceil_mode": module.ceil_mode})
        elif isinstance(module, nn.Identity):
            layers.append({"op": "identity"})
        else:
            return None
    return layers


def save_release(path: str | Path, encoder: nn.Module, masks: dict[str, torch.Tensor], *, backbone: str,
                 extra: dict[str, str] | None = None) -> Path:
    """Write ``encoder`` with its pruned tensors (``masks``: parameter name -> bool keep mask) packed."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in encoder.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        if name in masks:
            keep = masks[name].to(torch.bool).cpu()
            tensors[name + BITS_SUFFIX] = pack_bits(keep)
            tensors[name + VALUES_SUFFIX] = tensor.reshape(-1)[keep.reshape(-1)].clone()
        else:
            tensors[name] = tensor.clone()
    shapes = {name: list(t.shape) for name, t in encoder.state_dict().items() if name in masks}
    header = {"format": FORMAT, "backbone": backbone, "feature_dim": str(getattr(encoder, "feature_dim", "")),
              "pruned_shapes": json.dumps(shapes), "layers": json.dumps(_layers(encoder)), **(extra or {})}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def load_release_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(dense state dict, header) of a release file; pruned weights come back as exact zeros."""
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not an ntp-ssl release file (format {header.get('format')!r}, "
                             f"expected {FORMAT!r})")
        stored = {key: handle.get_tensor(key) for key in handle.keys()}
    shapes = json.loads(header["pruned_shapes"])
    state = {key: t for key, t in stored.items() if not key.endswith((BITS_SUFFIX, VALUES_SUFFIX))}
    for name, shape in shapes.items():
        numel = 1
        for size in shape:
            numel *= size
        keep = unpack_bits(stored[name + BITS_SUFFIX], numel)
        values = stored[name + VALUES_SUFFIX]
        if int(keep.sum()) != values.numel():
            raise ValueError(f"{str(path)!r}: {name} keeps {int(keep.sum())} weights but stores {values.numel()}")
        dense = values.new_zeros(numel)
        dense[keep] = values
        state[name] = dense.reshape(shape)
    return state, header


def _pair(value):
    return tuple(value) if isinstance(value, list) else value


class ReleasedEncoder(nn.Module):
    """``flatten(pool(features(x)), 1)``, the layer names of the original encoder."""

    def __init__(self, layers: list[dict], feature_dim: int) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        for layer in layers:
            op = layer["op"]
            if op == "conv":
                modules.append(nn.Conv2d(layer["in"], layer["out"], tuple(layer["kernel"]), tuple(layer["stride"]),
                                         tuple(layer["padding"]), bias=layer["bias"]))
            elif op == "bn":
                modules.append(nn.BatchNorm2d(layer["features"], eps=layer["eps"]))
            elif op == "relu":
                modules.append(nn.ReLU(inplace=True))
            elif op == "maxpool":
                modules.append(nn.MaxPool2d(*(_pair(layer[k]) for k in ("kernel", "stride", "padding", "dilation")),
                                            ceil_mode=layer["ceil_mode"]))
            elif op == "identity":
                modules.append(nn.Identity())
            else:
                raise ValueError(f"unknown layer {op!r} in a release file")
        self.features = nn.Sequential(*modules)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last, as ntp-ssl's encoders compute (faster on the CPU; the same features
        # as NCHW up to float rounding, and then exactly ntp-ssl's)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.flatten(self.pool(self.features(x)), 1)


def load_release(path: str | Path) -> nn.Module:
    """The released encoder as a plain ``torch.nn.Module`` in eval mode (sequential backbones)."""
    state, header = load_release_state_dict(path)
    layers = json.loads(header["layers"])
    if layers is None:
        raise ValueError(f"{str(path)!r} holds a {header.get('backbone')!r} encoder, which is not sequential; "
                         "use load_release_state_dict and the backbone's own class")
    encoder = ReleasedEncoder(layers, int(header["feature_dim"]))
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()
