"""A PNG that shows a few samples of each class of each domain, one row per domain."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ntp_ssl.data.domain import Domain
from ntp_ssl.data.ops import resize_image, rng_for
from ntp_ssl.errors import ConfigError, DataError
from ntp_ssl.io import atomic_path

MIN_TILE = 32
PAD = 2


def _label_font(size: int) -> ImageFont.ImageFont:
    try:
        import matplotlib

        return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def write_contact_sheet(domains: Sequence[Domain], path: str | Path, *, per_class: int = 2, seed: int = 0) -> Path:
    """Write a PNG at ``path``: one row per domain (named on the left), ``per_class`` random
    training samples of each class side by side, with class names above. Returns ``path``."""
    domains = list(domains)
    if not domains or not all(isinstance(d, Domain) for d in domains):
        raise DataError(f"write_contact_sheet needs a non-empty sequence of Domain objects, got {domains!r:.80}")
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ConfigError(f"per_class must be a positive int, got {per_class!r}")
    tile = max(MIN_TILE, max(d.image_size for d in domains))
    num_classes = max(d.num_classes for d in domains)
    font = _label_font(max(10, tile // 3))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(measure.textbbox((0, 0), d.name, font=font)[2] for d in domains) + 3 * PAD + tile // 6
    header_h = max(12, tile // 2)
    cell = tile + PAD
    width = label_w + num_classes * per_class * cell + PAD
    height = header_h + len(domains) * cell + PAD
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)

    names = next((d.class_names for d in domains if d.num_classes == num_classes and d.class_names), ())
    header_font = _label_font(max(8, header_h * 2 // 3))
    for c in range(num_classes):
        x = label_w + c * per_class * cell + per_class * cell // 2
        text = names[c] if names else str(c)
        pen.text((x, header_h // 2), text[:12], font=header_font, fill=(0, 0, 0), anchor="mm")

    for row, domain in enumerate(domains):
        y = header_h + row * cell
        pen.text((2 * PAD, y + tile // 2), domain.name, font=font, fill=(0, 0, 0), anchor="lm")
        rng = rng_for(seed, "contact-sheet", domain.name)
        for c in range(domain.num_classes):
            idx = np.flatnonzero(domain.train_labels == c)
            chosen = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
            for k, i in enumerate(chosen):
                image = resize_image(np.asarray(domain.train_images[i]), tile)
                pixels = np.ascontiguousarray(image[..., 0] if image.shape[2] == 1 else image)
                pil = Image.fromarray(pixels).convert("RGB")
                sheet.paste(pil, (label_w + (c * per_class + k) * cell, y))

    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
