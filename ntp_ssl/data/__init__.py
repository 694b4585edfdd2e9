"""Domains: labelled image datasets with train/test splits in one common size and channel count.

Entry point: :func:`load_domain`. The embedded digit domains (mnist, optdigits, syndigits,
mnistm) build offline from data inside installed packages and are cached on disk.
"""

from ntp_ssl.data.cache import default_cache_dir
from ntp_ssl.data.contact_sheet import write_contact_sheet
from ntp_ssl.data.domain import Domain, ImageArrayDataset, normalize_stats, to_float_tensor
from ntp_ssl.data.load import (
    EMBEDDED_DOMAINS,
    TORCHVISION_DOMAINS,
    domain_spec,
    limit_domain,
    load_domain,
    load_domains_for,
)

__all__ = [
    "EMBEDDED_DOMAINS",
    "TORCHVISION_DOMAINS",
    "Domain",
    "ImageArrayDataset",
    "default_cache_dir",
    "domain_spec",
    "limit_domain",
    "load_domain",
    "load_domains_for",
    "normalize_stats",
    "to_float_tensor",
    "write_contact_sheet",
]
