"""Checkpoints that are safe to load and safe to write.

A checkpoint is two files side by side::

    encoder.safetensors   tensors only (never pickled code)
    encoder.json          what built them: backbone, method, image size, domains, seed,
                          metrics, package version, the SHA-256 of the .safetensors file

Both are written atomically (temporary name, then rename), in an order that makes the
``.json`` the commit point, so that a crash at any moment leaves either the old pair or the
new one, never a mix: the tensors go to ``NAME.safetensors.pending`` first, then the
``.json`` (with the new hash) replaces the old one, then the pending file is renamed onto
``NAME.safetensors``. Whoever next looks the checkpoint up (``resolve_checkpoint_path``:
the loader, every stage's input digests, the command line's precheck) and finds a ``.json``
whose hash matches the pending file (a crash between the last two steps) finishes the rename.
A ``.safetensors`` without its ``.json`` is an unfinished write and is never trusted.
Loading checks the hash. Nested training state (optimizer, scheduler, RNG) goes through
:func:`flatten_state`, which keeps the tensors for safetensors and the rest for JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ntp_ssl import __version__
from ntp_ssl.checks import MAX_METADATA_BYTES, resolve_checkpoint_path
from ntp_ssl.encoders import build_encoder
from ntp_ssl.errors import CheckpointError, ConfigError
from ntp_ssl.io import atomic_path, atomic_write_json, pending_path, sha256_file

log = logging.getLogger("ntp_ssl")

FORMAT_VERSION = 1
LEGACY_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
MAX_CHECKPOINT_BYTES = 8 << 30  # no encoder this tool builds comes near; a bigger file is not one of ours


def check_regular_file(path: Path, what: str, limit: int) -> None:
    """Open only regular files of a bounded size: a symlink to /dev/zero or a FIFO would make
    hashing or reading block forever, a huge file would exhaust memory."""
    try:
        info = path.stat()  # follows symlinks: what would be read
    except OSError as exc:
        raise CheckpointError(f"{what} {str(path)!r} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{what} {str(path)!r} is not a regular file (a device, FIFO or socket); "
                              "accepted: a regular .safetensors file")
    if info.st_size > limit:
        raise CheckpointError(f"{what} {str(path)!r} is {info.st_size} bytes, over the {limit} bytes accepted")


META_DIGEST_KEY = "meta_sha256"


def meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``meta`` (less this digest itself). With the tensors'
    hash inside it, it covers the whole checkpoint: an edited epoch, backbone or mask
    setting in the ``.json`` is refused like an edited tensor."""
    body = {k: v for k, v in meta.items() if k != META_DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``path`` (.safetensors) and its ``.json`` sidecar crash-safely; return the weights path.

    Order: tensors to ``.pending``, then the ``.json`` (the commit point), then the rename of
    ``.pending`` onto ``path``. Killed at any moment, a later load sees the old checkpoint
    or the new one, both verified by their hash (see :func:`load_checkpoint`).
    """
    path = Path(path).with_suffix(".safetensors")
    pending = pending_path(path)
    contiguous: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.numel() and t.data_ptr() in seen:  # safetensors refuses tensors that share memory
            t = t.clone()
        seen.add(t.data_ptr())
        contiguous[name] = t
    with atomic_path(pending) as tmp:
        save_file(contiguous, str(tmp))
        digest = sha256_file(tmp)
    full_meta = {"format_version": FORMAT_VERSION, "ntp_ssl_version": __version__, **meta, "sha256": digest}
    full_meta[META_DIGEST_KEY] = meta_digest(full_meta)
    atomic_write_json(path.with_suffix(".json"), full_meta)
    try:
        os.replace(pending, path)
    except FileNotFoundError:  # a concurrent loader finished the rename for us
        if not path.exists() or sha256_file(path) != digest:
            raise
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors and metadata, refusing anything that could run code or was half written."""
    raw = Path(path).expanduser()
    if raw.suffix in LEGACY_SUFFIXES:
        return _load_legacy(raw)
    if raw.suffix == ".json":
        raw = raw.with_suffix(".safetensors")
    path = resolve_checkpoint_path(raw)  # also finishes a save killed between its commit and its rename
    meta_path = path.with_suffix(".json")
    if not meta_path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {meta_path.name}; it is incomplete or not an ntp-ssl checkpoint")
    check_regular_file(path, "checkpoint", MAX_CHECKPOINT_BYTES)
    meta = _read_meta(meta_path)
    if meta.get("sha256") is None or sha256_file(path) != meta["sha256"]:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match the SHA-256 in {meta_path.name}; it is corrupted or was changed")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file ({exc})") from None
    return tensors, meta


def verified_or_set_aside(path: Path, *, set_aside: bool = True) -> dict[str, Any] | None:
    """The metadata of the finished checkpoint ``path`` when it verifies (tensors' and
    metadata's hashes); otherwise None, with the damaged pair renamed to ``*.damaged-<time>``
    (kept, never deleted) so that the stage makes it again instead of reporting it finished."""
    try:
        return load_checkpoint(path)[1]
    except CheckpointError as exc:
        if not set_aside:  # another process (rank 0) does it
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for part in (path, path.with_suffix(".json")):
            if part.exists() or part.is_symlink():
                part.rename(part.with_name(f"{part.name}.damaged-{stamp}"))
        log.warning("%s; set aside as *.damaged-%s, making it again", exc, stamp)
        return None


def _read_meta(meta_path: Path) -> dict[str, Any]:
    check_regular_file(meta_path, "checkpoint metadata", MAX_METADATA_BYTES)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint metadata {str(meta_path)!r} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint metadata {str(meta_path)!r} is not a JSON object")
    # files written before the digest existed have none; every file written since has one
    if META_DIGEST_KEY in meta and meta[META_DIGEST_KEY] != meta_digest(meta):
        raise CheckpointError(f"checkpoint metadata {str(meta_path)!r} does not match its {META_DIGEST_KEY}; "
                              "it was edited or damaged")
    return meta


def _load_legacy(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A .pt/.pth state dict, read with ``weights_only=True``: tensors and plain containers only."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    check_regular_file(path, "checkpoint", MAX_CHECKPOINT_BYTES)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own message goes on to advise loading the file with the unpickler unrestricted,
        # which runs whatever code the file holds: only the offending global is quoted here.
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(exc))
        reason = f"it needs the global {found.group(1)}" if found else f"it is not a tensor state dict ({type(exc).__name__})"
        raise CheckpointError(
            f"refusing to load {str(path)!r}: {reason}, and unpickling it could run code; accepted: a "
            ".safetensors checkpoint or a .pt/.pth holding only a dict of tensors"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"refusing to load {str(path)!r}: expected a dict of tensors (a state dict)")
    return dict(obj), {"format_version": 0, "legacy_path": str(path)}


# ----------------------------------------------------------------------------- nested state


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested dict/list of tensors and plain values into (tensors, JSON tree).

    Each tensor is replaced in the tree by ``{"__tensor__": key}`` and stored under that key.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value
            return {"__tensor__": key}
        if isinstance(value, dict):
            return {"__dict__": [[walk_key(k), walk(v, f"{key}.{k}")] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return {"__list__": [walk(v, f"{key}.{i}") for i, v in enumerate(value)], "tuple": isinstance(value, tuple)}
        if hasattr(value, "tolist"):  # numpy arrays and scalars
            return {"__array__": value.tolist(), "dtype": str(getattr(value, "dtype", ""))}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")

    def walk_key(k: Any) -> Any:
        if isinstance(k, (int, str)):
            return k
        raise TypeError(f"cannot store a dict key of type {type(k).__name__}")

    tree = walk(obj, prefix or "state")
    return tensors, tree


def unflatten_state(tensors: dict[str, torch.Tensor], tree: Any) -> Any:
    import numpy as np

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "__tensor__" in node:
                return tensors[node["__tensor__"]]
            if "__dict__" in node:
                return {k: walk(v) for k, v in node["__dict__"]}
            if "__list__" in node:
                items = [walk(v) for v in node["__list__"]]
                return tuple(items) if node.get("tuple") else items
            if "__array__" in node:
                return np.asarray(node["__array__"], dtype=node["dtype"] or None)
        return node

    return walk(tree)


@contextmanager
def resuming(what: str):
    """Loading a training state: what a crafted or foreign state raises (a missing key, a
    wrong type, a shape mismatch) becomes one CheckpointError, ``cannot resume {what}: ...``."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise CheckpointError(f"cannot resume {what}: its state does not fit this run ({type(exc).__name__}: "
                              f"{detail}); remove it to start over") from None


def save_training_state(path: str | Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Save a resumable training state (model, optimizer, scheduler, RNG, counters)."""
    tensors, tree = flatten_state(state)
    return save_checkpoint(path, tensors, {**meta, "kind": "training_state", "tree": tree})


def load_training_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != "training_state":
        raise CheckpointError(f"{str(path)!r} is not a resumable training state")
    return unflatten_state(tensors, meta["tree"]), meta


# ----------------------------------------------------------------------------- encoders


MASK_PREFIX = "mask."
ENCODER_PREFIX = "encoder."


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}


def load_encoder(path: str | Path, *, expect_backbone: str | None = None):
    """Rebuild an encoder from a checkpoint: ``(encoder, meta, masks, tensors)``.

    ``masks`` maps encoder parameter names to bool masks (empty for an unprotected encoder).
    """
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") == "training_state":
        raise CheckpointError(f"checkpoint {str(path)!r} is a resumable training state, not an encoder; "
                              "give the run's encoder.safetensors or protected.safetensors")
    backbone = meta.get("backbone")
    if backbone is None:
        raise CheckpointError(f"checkpoint {str(path)!r} does not say which backbone built it (no 'backbone' in its metadata)")
    if expect_backbone is not None and backbone != expect_backbone:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {backbone!r} encoder, not the {expect_backbone!r} asked for")
    encoder = build_encoder(backbone, in_channels=meta_int(meta, "channels", 3, path),
                            image_size=meta_int(meta, "image_size", 32, path))
    state = split_prefix(tensors, ENCODER_PREFIX)
    try:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError:  # shape mismatches
        missing, unexpected = ["(tensor shapes differ)"], []
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit a {backbone!r} encoder "
            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
        )
    for name, tensor in state.items():  # NaN weights would score chance level, quietly
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"checkpoint {str(path)!r}: tensor {name!r} holds NaN or infinite values; "
                                  "accepted: finite weights (was it saved after a diverged step?)")
    masks = check_masks(split_prefix(tensors, MASK_PREFIX), dict(encoder.named_parameters()), path)
    return encoder, meta, masks, tensors


def meta_int(meta: dict, key: str, default: int, path: str | Path) -> int:
    """An integer field of checkpoint metadata, or a CheckpointError naming the bad value."""
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not (0 < value <= 1 << 16):
        raise CheckpointError(f"checkpoint {str(path)!r}: metadata {key}={value!r} is not a positive integer "
                              "up to 65536")
    return value


def check_masks(raw: dict[str, torch.Tensor], parameters: dict[str, torch.Tensor],
                path: str | Path) -> dict[str, torch.Tensor]:
    """Masks as bool tensors: each names a parameter, has its shape, and holds only 0 and 1
    (a value such as 2, 0.5, -1 or NaN is damage, not a "keep")."""
    masks = {}
    for name, mask in raw.items():
        if name not in parameters:
            raise CheckpointError(f"checkpoint {str(path)!r}: mask {name!r} names no encoder parameter")
        if mask.shape != parameters[name].shape:
            raise CheckpointError(f"checkpoint {str(path)!r}: mask {name!r} has shape {tuple(mask.shape)}, "
                                  f"its parameter {tuple(parameters[name].shape)}")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
            raise CheckpointError(f"checkpoint {str(path)!r}: mask {name!r} holds {bad!r}; accepted: only 0 and 1")
        masks[name] = mask.bool()
    return masks


def check_compatible(meta: dict, image_size: int, channels: int, what: str) -> None:
    """A checkpoint's encoder takes the images the config builds, or a ConfigError says how to match them."""
    built = (int(meta.get("image_size", 32)), int(meta.get("channels", 3)))
    if built != (image_size, channels):
        raise ConfigError(
            f"{what} was built for {built[0]}x{built[0]} images with {built[1]} channel(s) but "
            f"data.image_size={image_size} data.channels={channels}; set them to match"
        )
