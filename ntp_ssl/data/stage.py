"""The ``ntp-ssl domains`` stage: list domains with sizes and class counts, draw a contact sheet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ntp_ssl.config import validate_domains
from ntp_ssl.data.contact_sheet import write_contact_sheet
from ntp_ssl.data.load import load_domains_for
from ntp_ssl.io import atomic_write_json


def domains_table(infos: list[dict[str, Any]]) -> str:
    """A markdown table of :meth:`Domain.describe` dicts."""
    lines = [
        "| domain | train | test | classes | size | channels | train per class |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for d in infos:
        counts = " ".join(str(c) for c in d["train_per_class"])
        lines.append(
            f"| {d['name']} | {d['train_size']} | {d['test_size']} | {d['num_classes']} | "
            f"{d['image_size']} | {d['channels']} | {counts} |"
        )
    return "\n".join(lines)


def run_domains(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """Load ``cfg.names`` with ``cfg.data``'s settings; write domains.json and contact_sheet.png in ``run_dir``."""
    validate_domains(cfg)
    names = list(cfg.names)
    data = cfg.data
    domains = load_domains_for(cfg, names)
    run_dir = Path(run_dir)
    infos = [d.describe() for d in domains]
    atomic_write_json(run_dir / "domains.json", infos)
    sheet = write_contact_sheet(domains, run_dir / "contact_sheet.png", per_class=cfg.per_class, seed=data.seed)
    print(domains_table(infos))
    print(f"contact sheet: {sheet}")
    return {"domains": infos, "contact_sheet": str(sheet)}
