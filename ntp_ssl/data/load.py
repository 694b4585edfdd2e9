"""``load_domain``: one entry point from a spec string to a :class:`Domain`."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from ntp_ssl.checks import (  # the domain names live with the torch-free checks; re-exported here
    ALL_FORMS,
    EMBEDDED_DOMAINS,
    PATH_FORMS,
    TORCHVISION_DOMAINS,
    check_channels,
    check_domain_spec,
    check_image_size,
    is_int,
)
from ntp_ssl.data import cache, embedded, external
from ntp_ssl.data.domain import Domain
from ntp_ssl.data.subsets import draw_subset, stratified_split
from ntp_ssl.errors import ConfigError

log = logging.getLogger("ntp_ssl.data")


def _check_settings(image_size: object, channels: object, seed: object) -> tuple[int, int, int]:
    """Validate the shared settings and return them as plain ints."""
    image_size, channels = check_image_size(image_size), check_channels(channels)
    if not is_int(seed) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
    return int(image_size), int(channels), int(seed)


def load_domain(
    spec: str,
    *,
    image_size: int = 32,
    channels: int = 3,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    root: str | None = None,
    download: bool = False,
) -> Domain:
    """Load the domain named by ``spec`` at ``image_size`` x ``image_size`` with ``channels`` channels.

    ``spec`` is an embedded name (built once per seed and cached under ``cache_dir``), a
    torchvision name (read from ``root``, default ``<cache_dir>/torchvision``; fetched only when
    ``download``), ``folder:<path>`` or ``npz:<path>`` (split from ``seed`` unless the data has
    its own test split).
    """
    image_size, channels, seed = _check_settings(image_size, channels, seed)
    spec = check_domain_spec(spec)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else cache.default_cache_dir()
    kind, _, rest = spec.partition(":")
    if rest and kind.lower() in ("folder", "npz"):
        loader = external.load_folder if kind.lower() == "folder" else external.load_npz
        domain = loader(rest, image_size, channels, seed, name=spec)
        log.info("read domain %s (%d train / %d test)", spec, len(domain.train_labels), len(domain.test_labels))
        return domain
    name = spec.lower()
    if name in EMBEDDED_DOMAINS:
        return _load_embedded(name, image_size, channels, seed, cache_dir)
    if name in TORCHVISION_DOMAINS:
        tv_root = Path(root).expanduser() if root else cache_dir / "torchvision"
        domain = external.load_torchvision(name, tv_root, download, image_size, channels)
        log.info("read domain %s from %s (%d train / %d test)", name, tv_root, len(domain.train_labels),
                 len(domain.test_labels))
        return domain
    raise AssertionError(f"check_domain_spec accepted {spec!r}")  # it accepts only the forms above


def _load_embedded(name: str, image_size: int, channels: int, seed: int, cache_dir: Path) -> Domain:
    path = cache.cache_path(cache_dir, name, image_size, channels, seed)
    domain = cache.read_cached(path, name, image_size, channels, seed)
    if domain is not None:
        log.info("loaded domain %s (%dpx, %dch, seed %d) from cache %s", name, image_size, channels, seed, path)
        return domain
    start = time.perf_counter()
    domain = embedded.BUILDERS[name](seed, image_size, channels)
    log.info(
        "built domain %s (%d train / %d test, %dpx, %dch, seed %d) in %.1f s; caching at %s",
        name, len(domain.train_labels), len(domain.test_labels), image_size, channels, seed,
        time.perf_counter() - start, path,
    )
    cache.write_cached(path, domain, seed)
    return domain


# ----------------------------------------------------------------------------- from a config


def domain_spec(data: Any) -> dict:
    """What, besides its name, a domain's pixels depend on (``data`` is a config's data node)."""
    return {"image_size": data.image_size, "channels": data.channels, "seed": data.seed}


def load_domains_for(cfg: Any, names: list[str]) -> list[Domain]:
    """The domains named, as the config builds them (size, channels, seed, cache, limits)."""
    data = cfg.data
    cache_dir = cfg.paths.cache_dir or cache.default_cache_dir()
    domains = [
        load_domain(name, image_size=data.image_size, channels=data.channels, seed=data.seed,
                    cache_dir=cache_dir, root=data.root, download=data.download)
        for name in names
    ]
    if getattr(data, "split", None) == "validation":
        domains = [hold_out_validation(d) for d in domains]
    limited = [limit_domain(d, data.train_limit, data.test_limit, seed=data.seed) for d in domains]
    for domain in limited:  # every stage measures accuracy on these
        domain.check_measurable()
    return limited


#: the tuning split (``data.split=validation``): this share of each train split, drawn with this
#: seed whatever ``data.seed`` is, so every tuning run holds out the same images
VALIDATION_FRACTION = 0.2
VALIDATION_SEED = 20_261_128


def hold_out_validation(domain: Domain) -> Domain:
    """``domain`` with a stratified ``VALIDATION_FRACTION`` of its train split as its test split
    and the rest as its train split; its own test split is dropped, so nothing measured on the
    result has read it (choose settings here, report on the test split)."""
    fit, val = stratified_split(domain.train_labels, VALIDATION_FRACTION, seed=VALIDATION_SEED)
    return dataclasses.replace(domain, train_images=domain.train_images[fit], train_labels=domain.train_labels[fit],
                               test_images=domain.train_images[val], test_labels=domain.train_labels[val])


def limit_domain(domain: Domain, train_limit: int, test_limit: int, *, seed: int) -> Domain:
    """A class-covering subset of each split (the SLC sweep's nested draw), for quick runs.

    A limit below the class count is raised to it (one image per class); a split that is no
    larger than that is kept whole, as when the limit exceeds it."""
    changes = {}
    for split, limit in (("train", train_limit), ("test", test_limit)):
        labels = getattr(domain, f"{split}_labels")
        size = max(limit, domain.num_classes)
        if limit > 0 and size < len(labels):
            idx = draw_subset(labels, size, seed=seed, num_classes=domain.num_classes)
            changes[f"{split}_images"] = getattr(domain, f"{split}_images")[idx]
            changes[f"{split}_labels"] = labels[idx]
    return dataclasses.replace(domain, **changes) if changes else domain
