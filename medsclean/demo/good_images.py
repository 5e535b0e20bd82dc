"""Good images of the demo dataset: seeded crops of photographs and textures that ship inside
scikit-image's wheel (no download), framed per category (`SOURCES`).

Randomness is derived per image from (seed, category, split, index) (`image_rng`), so an image
does not change when more images are requested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from medsclean import seeding
from medsclean.errors import UsageError

MIN_SIZE = 64


@dataclass(frozen=True)
class Source:
    """A scikit-image sample image and how good images are framed from it.

    Attributes:
        function: name of the `skimage.data` function that loads it (offline).
        kind: "texture" (random position, flips) or "object" (fixed framing, aligned).
        licence: the licence scikit-image states for the image.
        side: side of the nominal square crop, as a fraction of the source's shorter side.
        centre: objects only: the fixed framing centre (x, y) as fractions of width and height.
        max_rotation_deg: largest random rotation, in degrees.
        scale_jitter: largest relative change of the crop side.
        shift_jitter: objects only: largest shift of the framing, as a fraction of the crop side.
    """

    function: str
    kind: str
    licence: str
    side: float
    centre: tuple[float, float] | None = None
    max_rotation_deg: float = 0.0
    scale_jitter: float = 0.02
    shift_jitter: float = 0.0


SOURCES: dict[str, Source] = {
    "brick": Source("brick", "texture", "CC0-1.0 (CC0Textures 'Bricks25')", side=0.5,
                    max_rotation_deg=3.0, scale_jitter=0.08),
    "grass": Source("grass", "texture", "CC0-1.0 (DeviantArt 'Grass-01' by linolafett)", side=0.5,
                    max_rotation_deg=10.0, scale_jitter=0.08),
    "gravel": Source("gravel", "texture", "CC0-1.0 (CC0Textures 'Gravel04')", side=0.5,
                     max_rotation_deg=180.0, scale_jitter=0.08),
    "coins": Source("coins", "object", "no known copyright restrictions (Brooklyn Museum collection)",
                    side=0.9, centre=(0.5, 0.5), max_rotation_deg=1.5, scale_jitter=0.02, shift_jitter=0.015),
    "coffee": Source("coffee", "object", "CC0-1.0 (photographer Rachel Michetti)",
                     side=0.92, centre=(0.5, 0.5), max_rotation_deg=1.5, scale_jitter=0.02, shift_jitter=0.015),
}
DEFAULT_CATEGORIES: tuple[str, ...] = ("brick", "grass", "gravel", "coins")


# ---------------------------------------------------------------------------------------------
# Seeding and sources
# ---------------------------------------------------------------------------------------------

def image_rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    """The generator of one image: a pure function of its identity, stable across processes.

    Args:
        seed: non-negative dataset seed.
        category: category name.
        split: "train/good", "test/good" or "test/<defect>".
        index: index of the image within its folder.
    """
    return seeding.rng(seed, category, split, index)


def source(category: str) -> Source:
    if category not in SOURCES:
        raise UsageError(f"unknown demo category {category!r}; choose from {', '.join(SOURCES)}")
    return SOURCES[category]


@lru_cache(maxsize=32)
def base_image(category: str, size: int) -> Image.Image:
    """The source image as RGB, rescaled so that the nominal crop is `size` pixels wide."""
    from skimage import data

    src = source(category)
    arr = getattr(data, src.function)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    img = Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB")
    factor = size / (src.side * min(img.size))
    new_size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    return img.resize(new_size, Image.Resampling.LANCZOS)


@lru_cache(maxsize=32)
def _is_gray_source(category: str) -> bool:
    arr = np.asarray(base_image(category, MIN_SIZE))
    return bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())


# ---------------------------------------------------------------------------------------------
# Good images
# ---------------------------------------------------------------------------------------------

def _affine_crop(base: Image.Image, size: int, centre: tuple[float, float], side: float,
                 angle: float) -> np.ndarray:
    """A rotated square crop of `base`, resampled to size×size in one bilinear step.

    Args:
        centre: (x, y) centre of the crop in base pixels.
        side: side of the crop in base pixels.
        angle: rotation in radians.
    """
    k = side / size
    cos, sin = math.cos(angle) * k, math.sin(angle) * k
    half = size / 2.0
    # Output pixel (x, y) samples base at R·k·(x − half, y − half) + centre.
    coeffs = (cos, -sin, centre[0] - cos * half + sin * half,
              sin, cos, centre[1] - sin * half - cos * half)
    out = base.transform((size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def _frame_texture(src: Source, base: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    side = size * rng.uniform(1 - src.scale_jitter, 1 + src.scale_jitter)
    angle = math.radians(rng.uniform(-src.max_rotation_deg, src.max_rotation_deg))
    half_extent = side / 2 * (abs(math.cos(angle)) + abs(math.sin(angle)))
    cx = rng.uniform(half_extent, base.width - half_extent)
    cy = rng.uniform(half_extent, base.height - half_extent)
    crop = _affine_crop(base, size, (cx, cy), side, angle)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    return crop


def _frame_object(src: Source, base: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    assert src.centre is not None
    side = size * rng.uniform(1 - src.scale_jitter, 1 + src.scale_jitter)
    angle = math.radians(rng.uniform(-src.max_rotation_deg, src.max_rotation_deg))
    dx, dy = rng.uniform(-src.shift_jitter, src.shift_jitter, size=2) * side
    centre = (src.centre[0] * base.width + dx, src.centre[1] * base.height + dy)
    return _affine_crop(base, size, centre, side, angle)


def _photometric_jitter(img: np.ndarray, rng: np.random.Generator, gray: bool) -> np.ndarray:
    """Mild brightness/contrast change and sensor noise; grey sources stay grey."""
    gain = rng.uniform(0.95, 1.05)
    contrast = rng.uniform(0.94, 1.06)
    mean = float(img.mean())
    out = (img - mean) * contrast + mean * gain
    noise_shape = img.shape[:2] + ((1,) if gray else (3,))
    out = out + rng.normal(0.0, 1.5, size=noise_shape).astype(np.float32)
    return out


def make_good(category: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One defect-free image of a category.

    Args:
        category: a key of `SOURCES`.
        size: side of the square output in pixels.
        rng: the image's generator (see `image_rng`).

    Returns:
        uint8 array of shape (size, size, 3).
    """
    src = source(category)
    base = base_image(category, size)
    frame = _frame_texture if src.kind == "texture" else _frame_object
    img = _photometric_jitter(frame(src, base, size, rng), rng, _is_gray_source(category))
    return to_uint8(img)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))
