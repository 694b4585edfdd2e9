"""SynDigits-like digits rendered with the TrueType fonts that ship with matplotlib.

Each sample: a centre digit (the label) in a random usable font, with neighbour digits on the
same baseline left and right (partly cut off, as in house-number crops), a random affine
(rotation, shear, horizontal stretch, offset), an optional outline, foreground on a plain or
gradient background of contrasting colour, Gaussian blur and pixel noise.
"""

from __future__ import annotations

import functools
import glob
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ntp_ssl.data.domain import Domain
from ntp_ssl.data.ops import conform, rng_for
from ntp_ssl.errors import DataError

TRAIN_SIZE, TEST_SIZE = 5000, 1250
MIN_RENDER_SIZE = 32  # render at least this large, then shrink, so small outputs stay legible
_CHUNK = 512


@functools.lru_cache(maxsize=None)
def load_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _glyph_vector(font: ImageFont.FreeTypeFont, digit: int) -> np.ndarray | None:
    """A 16x16 zero-mean unit-norm picture of the digit's ink, fitted to its bounding box."""
    size = font.size
    canvas = Image.new("L", (3 * size, 3 * size), 0)
    ImageDraw.Draw(canvas).text((1.5 * size, 1.5 * size), str(digit), font=font, fill=255, anchor="mm")
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("L", (side, side), 0)
    square.paste(glyph, ((side - glyph.size[0]) // 2, (side - glyph.size[1]) // 2))
    vec = np.asarray(square.resize((16, 16), Image.BILINEAR), dtype=np.float64).ravel()
    vec = vec - vec.mean()
    norm = np.linalg.norm(vec)
    return vec / norm if norm > 0 else None


@functools.lru_cache(maxsize=1)
def digit_fonts() -> tuple[tuple[str, float], ...]:
    """``(path, digit height per font pixel)`` for every bundled font that draws digits.

    A font is kept when all ten digits render and at least 6 of them are closest to the same
    digit of DejaVu Sans (matplotlib's default font); this drops symbol fonts (cmsy10, cmex10,
    STIX size variants), empty display fonts and the LastResort placeholder font.
    """
    import matplotlib

    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    reference = [_glyph_vector(load_font(os.path.join(folder, "DejaVuSans.ttf"), 40), d) for d in range(10)]
    ref = np.stack(reference)
    fonts = []
    for path in sorted(glob.glob(os.path.join(folder, "*.ttf"))):
        try:
            font = load_font(path, 40)
        except OSError:
            continue
        vectors = [_glyph_vector(font, d) for d in range(10)]
        if any(v is None for v in vectors):
            continue
        matches = int(((np.stack(vectors) @ ref.T).argmax(axis=1) == np.arange(10)).sum())
        if matches < 6:
            continue
        heights = [font.getbbox(str(d), anchor="ls")[3] - font.getbbox(str(d), anchor="ls")[1] for d in range(10)]
        fonts.append((path, float(np.median(heights)) / 40.0))
    if not fonts:
        raise DataError(f"no font in {folder} draws digits; syndigits needs matplotlib's bundled fonts")
    return tuple(fonts)


def _sample_params(n: int, rng: np.random.Generator, num_fonts: int) -> dict[str, np.ndarray]:
    """All random choices for ``n`` samples, drawn up front in a fixed order."""
    p = {
        "label": rng.permutation(np.resize(np.arange(10), n)),
        "font": rng.integers(num_fonts, size=n),
        "height": rng.uniform(0.42, 0.8, n),  # glyph height / canvas
        "offset": rng.uniform(-0.08, 0.08, (n, 2)),  # canvas fractions
        "angle": rng.uniform(-15.0, 15.0, n),  # degrees
        "shear": rng.uniform(-0.25, 0.25, n),
        "stretch": rng.uniform(0.8, 1.2, n),
        "neighbour": rng.random((n, 2)) < 0.7,  # left, right
        "neighbour_digit": rng.integers(10, size=(n, 2)),
        "gap": rng.uniform(0.03, 0.2, (n, 2)),  # glyph-height fractions
        "outline": rng.random(n) < 0.25,
        "outline_width": rng.uniform(0.04, 0.09, n),  # glyph-height fractions
        "bg": rng.integers(0, 256, (n, 2, 3)),  # gradient end colours
        "gradient": rng.random(n) < 0.5,
        "gradient_angle": rng.uniform(0.0, 2 * math.pi, n),
        "fg": rng.integers(0, 256, (n, 3)),
        "outline_colour": rng.integers(0, 256, (n, 3)),
        "blur": rng.uniform(0.0, 1.0, n),  # sigma in pixels of a 32-pixel canvas
        "noise": rng.uniform(0.0, 12.0, n),  # std in grey levels
    }
    p["bg"][~p["gradient"], 1] = p["bg"][~p["gradient"], 0]
    # Redraw foregrounds too close in luminance to the background (bounded, so deterministic).
    luma = np.array([0.299, 0.587, 0.114])
    for _ in range(50):
        low = np.abs(p["fg"] @ luma - p["bg"].mean(axis=1) @ luma) < 70
        if not low.any():
            break
        p["fg"][low] = rng.integers(0, 256, (int(low.sum()), 3))
    low = np.abs(p["fg"] @ luma - p["bg"].mean(axis=1) @ luma) < 70
    p["fg"][low] = np.where((p["bg"].mean(axis=1) @ luma)[low, None] > 127, 0, 255)
    return p


def _render_masks(i: int, p: dict, fonts: tuple, size: int) -> tuple[Image.Image, Image.Image | None]:
    """Fill mask and optional outline mask (mode "L", size x size) of sample ``i``."""
    path, height_per_px = fonts[p["font"][i]]
    glyph_h = p["height"][i] * size
    font = load_font(path, max(4, round(glyph_h / height_per_px)))
    canvas = 2 * size
    digits = [str(p["label"][i])]
    x0, y0, x1, y1 = font.getbbox(digits[0], anchor="ls")
    base_x, base_y = size - (x0 + x1) / 2, size - (y0 + y1) / 2  # centre the label's ink on the canvas
    placements = [(base_x, base_y, digits[0], "ls")]
    left_edge, right_edge = base_x + x0, base_x + x1
    if p["neighbour"][i, 0]:
        d = str(p["neighbour_digit"][i, 0])
        bx1 = font.getbbox(d, anchor="ls")[2]
        placements.append((left_edge - p["gap"][i, 0] * glyph_h - bx1, base_y, d, "ls"))
    if p["neighbour"][i, 1]:
        d = str(p["neighbour_digit"][i, 1])
        bx0 = font.getbbox(d, anchor="ls")[0]
        placements.append((right_edge + p["gap"][i, 1] * glyph_h - bx0, base_y, d, "ls"))

    # Inverse affine: output pixel -> canvas pixel, about the output centre shifted by the offset.
    theta = math.radians(p["angle"][i])
    forward = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]) @ np.array(
        [[p["stretch"][i], p["shear"][i]], [0.0, 1.0]]
    )
    inv = np.linalg.inv(forward)
    centre_out = size / 2 + p["offset"][i] * size
    shift = np.array([size, size]) - inv @ centre_out
    coeffs = (inv[0, 0], inv[0, 1], shift[0], inv[1, 0], inv[1, 1], shift[1])
    blur = float(p["blur"][i] * size / 32)

    def draw(stroke: int) -> Image.Image:
        mask = Image.new("L", (canvas, canvas), 0)
        pen = ImageDraw.Draw(mask)
        for x, y, text, anchor in placements:
            pen.text((x, y), text, font=font, fill=255, anchor=anchor, stroke_width=stroke, stroke_fill=255)
        mask = mask.transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR)
        return mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0.05 else mask

    outline = draw(max(1, round(p["outline_width"][i] * glyph_h))) if p["outline"][i] else None
    return draw(0), outline


def render(n: int, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` RGB digits of ``size`` x ``size`` pixels (uint8 NHWC) and their labels, classes balanced."""
    fonts = digit_fonts()
    p = _sample_params(n, rng, len(fonts))
    fill = np.zeros((n, size, size), dtype=np.uint8)
    outline = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        f, o = _render_masks(i, p, fonts, size)
        fill[i] = np.asarray(f)
        if o is not None:
            outline[i] = np.asarray(o)

    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(n, start + _CHUNK))
        angle = p["gradient_angle"][sl, None, None]
        t = np.clip(0.5 + xs * np.cos(angle) + ys * np.sin(angle), 0.0, 1.0)[..., None]
        bg = p["bg"][sl].astype(np.float32)
        img = bg[:, None, None, 0] * (1 - t) + bg[:, None, None, 1] * t
        m = outline[sl, ..., None].astype(np.float32) / 255
        img = img * (1 - m) + p["outline_colour"][sl, None, None].astype(np.float32) * m
        m = fill[sl, ..., None].astype(np.float32) / 255
        img = img * (1 - m) + p["fg"][sl, None, None].astype(np.float32) * m
        img += rng.standard_normal(img.shape, dtype=np.float32) * p["noise"][sl, None, None, None].astype(np.float32)
        images[sl] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return images, p["label"].astype(np.int64)


def build_syndigits(seed: int, image_size: int, channels: int) -> Domain:
    """5,000 train and 1,250 test rendered digits from independent streams of ``seed``."""
    size = max(MIN_RENDER_SIZE, image_size)
    train_x, train_y = render(TRAIN_SIZE, rng_for(seed, "syndigits", "train"), size)
    test_x, test_y = render(TEST_SIZE, rng_for(seed, "syndigits", "test"), size)
    return Domain(
        name="syndigits",
        train_images=conform(train_x, image_size, channels),
        train_labels=train_y,
        test_images=conform(test_x, image_size, channels),
        test_labels=test_y,
        num_classes=10,
        class_names=tuple(str(d) for d in range(10)),
    )
