"""``ntp-ssl domains``: list domains with their sizes and class counts, draw a contact sheet."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ntp_ssl.io import atomic_write_json

log = logging.getLogger("ntp_ssl.data")


def run_domains(cfg: Any, run_dir: Path) -> dict[str, Any]:
    from ntp_ssl.config import validate_data
    from ntp_ssl.data import write_contact_sheet
    from ntp_ssl.pretrain.stage import load_domains_for

    validate_data(cfg.data)
    run_dir = Path(run_dir)
    domains = load_domains_for(cfg, list(cfg.names))
    listing = [domain.describe() for domain in domains]
    width = max(len(d.name) for d in domains)
    print(f"{'domain':<{width}}  {'train':>6}  {'test':>6}  classes  size     per-class train counts")
    for domain, info in zip(domains, listing):
        counts = " ".join(str(int((domain.train_labels == c).sum())) for c in range(domain.num_classes))
        print(f"{domain.name:<{width}}  {len(domain.train_labels):>6}  {len(domain.test_labels):>6}  "
              f"{domain.num_classes:>7}  {domain.image_size}x{domain.image_size}x{domain.channels}  {counts}")
    sheet = write_contact_sheet(domains, run_dir / "contact_sheet.png", per_class=cfg.per_class, seed=cfg.data.seed)
    atomic_write_json(run_dir / "domains.json", listing)
    print(f"contact sheet: {sheet}")
    return {"domains": listing, "contact_sheet": str(sheet)}
