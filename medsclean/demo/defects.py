"""Defects of the demo dataset: one synthetic defect painted on a good image, with its exact
mask: the mask is the painted region, and every pixel outside it is bit-identical to the good
image the defect was painted on (`make_defect`).
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import draw as skdraw

from medsclean.demo.good_images import SOURCES, base_image, to_uint8
from medsclean.errors import UsageError

DEFECTS: tuple[str, ...] = ("scratch", "crack", "foreign_patch", "stain", "hole", "color_spot")
# Defect area bounds, as fractions of the image area.
MIN_DEFECT_AREA = 0.003
MAX_DEFECT_AREA = 0.05
_MAX_DEFECT_TRIES = 200


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------

def _defect_centre(rng: np.random.Generator, size: int) -> np.ndarray:
    """(x, y) of a defect, kept in the central 60 % so that object defects land on the object."""
    return rng.uniform(0.2 * size, 0.8 * size, size=2)


def _blob(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float,
          roughness: float = 0.3) -> np.ndarray:
    """An irregular filled blob: a polygon whose radius is a random low-order Fourier series.

    Returns:
        bool array (size, size).
    """
    theta = np.linspace(0.0, 2 * np.pi, 72, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 6):
        r += rng.uniform(0, roughness / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    aspect = rng.uniform(0.6, 1.0)
    tilt = rng.uniform(0, np.pi)
    x, y = radius * r * np.cos(theta), radius * r * aspect * np.sin(theta)
    cols = centre[0] + x * math.cos(tilt) - y * math.sin(tilt)
    rows = centre[1] + x * math.sin(tilt) + y * math.cos(tilt)
    mask = np.zeros((size, size), dtype=bool)
    rr, cc = skdraw.polygon(rows, cols, shape=mask.shape)
    mask[rr, cc] = True
    return mask


def _polylines(size: int, lines: Sequence[tuple[np.ndarray, int]]) -> np.ndarray:
    """Rasterise polylines without anti-aliasing.

    Args:
        lines: (points (n, 2) as x, y; width in pixels) per polyline.

    Returns:
        bool array (size, size).
    """
    canvas = Image.new("L", (size, size), 0)
    pen = ImageDraw.Draw(canvas)
    for points, width in lines:
        pen.line([tuple(p) for p in points.tolist()], fill=255, width=int(width), joint="curve")
    return np.asarray(canvas) > 0


def _random_walk(rng: np.random.Generator, start: np.ndarray, heading: float, n_steps: int,
                 step: float, wiggle: float) -> tuple[np.ndarray, np.ndarray]:
    """A path whose heading drifts by N(0, wiggle) radians per step.

    Returns:
        points (n_steps + 1, 2) as (x, y), and the heading after each point (n_steps + 1,).
    """
    headings = heading + np.concatenate([[0.0], np.cumsum(rng.normal(0.0, wiggle, n_steps))])
    steps = step * np.stack([np.cos(headings[1:]), np.sin(headings[1:])], axis=1)
    points = start + np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    return points, headings


def _contrast_target(good: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> float:
    """A grey level that stands out from the region: usually the opposite end of the range."""
    local = float(good[region].mean()) if region.any() else 128.0
    bright = (local < 128) if rng.random() < 0.8 else (local >= 128)
    return rng.uniform(225, 250) if bright else rng.uniform(5, 30)


def _saturated_colour(rng: np.random.Generator) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.85, 1.0), rng.uniform(0.75, 1.0))
    return np.array([r, g, b], dtype=np.float32) * 255


def _scale(size: int) -> float:
    return size / 256.0


# ---------------------------------------------------------------------------------------------
# Defects: each returns (altered image float32 (S, S, 3), region bool (S, S)). Only pixels in
# the region are taken from the altered image.
# ---------------------------------------------------------------------------------------------

Painted = tuple[np.ndarray, np.ndarray]
DefectPainter = Callable[[np.ndarray, np.random.Generator, str | None], Painted]


def _paint_scratch(good: np.ndarray, rng: np.random.Generator, category: str | None) -> Painted:
    size = good.shape[0]
    n_seg = 8
    length = rng.uniform(0.35, 0.7) * size
    heading = rng.uniform(0, 2 * np.pi)
    points, _ = _random_walk(rng, np.zeros(2), heading, n_seg, length / n_seg, wiggle=0.08)
    points += _defect_centre(rng, size) - points.mean(axis=0)
    width = max(1, round(rng.uniform(1.5, 3.5) * _scale(size)))
    region = _polylines(size, [(points, width)])
    strength = rng.uniform(0.65, 0.9)
    altered = good * (1 - strength) + _contrast_target(good, region, rng) * strength
    return altered, region


def _paint_crack(good: np.ndarray, rng: np.random.Generator, category: str | None) -> Painted:
    size = good.shape[0]
    step = 3.0 * _scale(size)
    n_main = int(rng.uniform(0.25, 0.5) * size / step)
    main, headings = _random_walk(rng, np.zeros(2), rng.uniform(0, 2 * np.pi), n_main, step, wiggle=0.3)
    lines = [(main, max(1, round(rng.uniform(2.0, 3.0) * _scale(size))))]
    for _ in range(rng.integers(1, 4)):
        at = int(rng.integers(1, n_main))
        turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.1)
        n_branch = max(2, int(n_main * rng.uniform(0.2, 0.45)))
        branch, _ = _random_walk(rng, main[at], headings[at] + turn, n_branch, step, wiggle=0.35)
        lines.append((branch, max(1, round(rng.uniform(1.0, 2.0) * _scale(size)))))
    shift = _defect_centre(rng, size) - main.mean(axis=0)
    region = _polylines(size, [(pts + shift, w) for pts, w in lines])
    altered = good * rng.uniform(0.12, 0.35)
    return altered, region


def _paint_foreign_patch(good: np.ndarray, rng: np.random.Generator, category: str | None) -> Painted:
    size = good.shape[0]
    region = _blob(rng, size, _defect_centre(rng, size), rng.uniform(0.05, 0.11) * size)
    others = [c for c, s in SOURCES.items() if s.kind == "texture" and c != category]
    donor = str(rng.choice(others))
    base = np.asarray(base_image(donor, size), dtype=np.float32)
    y0 = int(rng.integers(0, base.shape[0] - size + 1))
    x0 = int(rng.integers(0, base.shape[1] - size + 1))
    patch = base[y0:y0 + size, x0:x0 + size] * rng.uniform(0.7, 1.3, size=3).astype(np.float32)
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(25, 50)
    patch = patch - patch[region].mean() + good[region].mean() + shift
    return patch, region


def _paint_stain(good: np.ndarray, rng: np.random.Generator, category: str | None) -> Painted:
    size = good.shape[0]
    radius = rng.uniform(0.06, 0.11) * size
    blob = _blob(rng, size, _defect_centre(rng, size), radius, roughness=0.4).astype(np.float32)
    alpha = ndimage.gaussian_filter(blob, sigma=radius * 0.3)
    alpha /= max(float(alpha.max()), 1e-6)
    # Hard cut: below the threshold the stain is not painted at all, so the mask is exact while
    # the visible edge inside it stays soft.
    region = alpha >= 0.25
    palette = np.array([[110, 70, 35], [25, 22, 18], [70, 80, 40], [150, 120, 60], [200, 190, 150]],
                       dtype=np.float32)
    local = good[region].mean(axis=0) if region.any() else np.full(3, 128.0, np.float32)
    distinct = palette[np.linalg.norm(palette - local, axis=1) > 80]
    colour = distinct[rng.integers(len(distinct))] if len(distinct) else palette[rng.integers(len(palette))]
    strength = rng.uniform(0.5, 0.8)
    a = (alpha * strength)[..., None]
    altered = good * (1 - a) + colour * a
    return altered, region


def _paint_hole(good: np.ndarray, rng: np.random.Generator, category: str | None) -> Painted:
    size = good.shape[0]
    region = _blob(rng, size, _defect_centre(rng, size), rng.uniform(0.04, 0.085) * size, roughness=0.35)
    # The background seen through the hole: dark behind bright material, light behind dark.
    floor = rng.uniform(8, 35) if good[region].mean() > 90 else rng.uniform(200, 230)
    altered = np.full_like(good, floor) + rng.normal(0, 1.0, size=good.shape[:2] + (1,)).astype(np.float32)
    # A lit rim where the material was torn away: inside the region, so the mask stays exact.
    rim_width = max(1, round(_scale(size)))
    rim = region & ~ndimage.binary_erosion(region, iterations=rim_width)
    altered[rim] = good[rim] * 0.4 + 0.6 * (235 if floor < 128 else 20)
    return altered, region


def _paint_color_spot(good: np.ndarray, rng: np.random.Generator, category: str | None) -> Painted:
    size = good.shape[0]
    centre = _defect_centre(rng, size)
    altered = good.copy()
    region = np.zeros(good.shape[:2], dtype=bool)
    for _ in range(rng.integers(4, 10)):
        x, y = centre + rng.normal(0, 0.05 * size, size=2)
        rr, cc = skdraw.disk((y, x), rng.uniform(3.0, 6.5) * _scale(size), shape=region.shape)
        altered[rr, cc] = 0.1 * good[rr, cc] + 0.9 * _saturated_colour(rng)
        region[rr, cc] = True
    return altered, region


_PAINTERS: dict[str, DefectPainter] = {
    "scratch": _paint_scratch,
    "crack": _paint_crack,
    "foreign_patch": _paint_foreign_patch,
    "stain": _paint_stain,
    "hole": _paint_hole,
    "color_spot": _paint_color_spot,
}


def make_defect(good: np.ndarray, kind: str, rng: np.random.Generator, *,
                category: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of `kind` on a good image.

    Draws until the defect covers between 0.3 % and 5 % of the image.

    Args:
        good: uint8 (S, S, 3) defect-free image.
        kind: one of `DEFECTS`.
        rng: the image's generator.
        category: the good image's category; foreign patches then come from another texture.

    Returns:
        image: uint8 (S, S, 3), equal to `good` wherever `mask` is False.
        mask: bool (S, S), the painted region.
    """
    if kind not in _PAINTERS:
        raise UsageError(f"unknown defect {kind!r}; choose from {', '.join(DEFECTS)}")
    if good.dtype != np.uint8 or good.ndim != 3 or good.shape[2] != 3 or good.shape[0] != good.shape[1]:
        raise ValueError(f"good must be a square uint8 (S, S, 3) array, got {good.dtype} {good.shape}")
    good_f = good.astype(np.float32)
    for _ in range(_MAX_DEFECT_TRIES):
        altered, region = _PAINTERS[kind](good_f, rng, category)
        if MIN_DEFECT_AREA <= region.mean() <= MAX_DEFECT_AREA:
            image = good.copy()
            image[region] = to_uint8(altered[region])
            return image, region
    raise RuntimeError(f"could not draw a {kind} defect of acceptable area at size {good.shape[0]}")
