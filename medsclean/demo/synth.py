"""The embedded demo dataset: MVTec-AD-layout categories made from real offline images.

Good images are seeded crops of photographs and textures that ship inside scikit-image's wheel
(no download). Defective images are good images with one synthetic defect painted in, and each
comes with an exact mask: the mask is the painted region, and every pixel outside it is
bit-identical to the good image the defect was painted on.

Randomness is derived per image from (seed, category, split, index), so an image does not change
when more images are requested, and two runs with the same seed write identical files.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import draw as skdraw

from medsclean import seeding
from medsclean.errors import UsageError
from medsclean.workdir.atomic import atomic_directory, write_json_atomic

SYNTH_FORMAT = "medsclean-synth/1"
SUMMARY_NAME = "medsclean-synth.json"
MIN_SIZE = 64
# Defect area bounds, as fractions of the image area.
MIN_DEFECT_AREA = 0.003
MAX_DEFECT_AREA = 0.05
_MAX_DEFECT_TRIES = 200


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
DEFECTS: tuple[str, ...] = ("scratch", "crack", "foreign_patch", "stain", "hole", "color_spot")


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


def _source(category: str) -> Source:
    if category not in SOURCES:
        raise UsageError(f"unknown demo category {category!r}; choose from {', '.join(SOURCES)}")
    return SOURCES[category]


@lru_cache(maxsize=32)
def _base_image(category: str, size: int) -> Image.Image:
    """The source image as RGB, rescaled so that the nominal crop is `size` pixels wide."""
    from skimage import data

    src = _source(category)
    arr = getattr(data, src.function)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    img = Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB")
    factor = size / (src.side * min(img.size))
    new_size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    return img.resize(new_size, Image.Resampling.LANCZOS)


@lru_cache(maxsize=32)
def _is_gray_source(category: str) -> bool:
    arr = np.asarray(_base_image(category, MIN_SIZE))
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
    src = _source(category)
    base = _base_image(category, size)
    frame = _frame_texture if src.kind == "texture" else _frame_object
    img = _photometric_jitter(frame(src, base, size, rng), rng, _is_gray_source(category))
    return _to_uint8(img)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


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
    base = np.asarray(_base_image(donor, size), dtype=np.float32)
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
            image[region] = _to_uint8(altered[region])
            return image, region
    raise RuntimeError(f"could not draw a {kind} defect of acceptable area at size {good.shape[0]}")


def render_test_defect(category: str, defect: str, index: int, *, size: int,
                       seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The test image `<category>/test/<defect>/<index>.png` and what it was made from.

    Returns:
        good: uint8 (S, S, 3), the underlying defect-free image.
        image: uint8 (S, S, 3), the written defective image.
        mask: bool (S, S), its ground truth.
    """
    rng = image_rng(seed, category, f"test/{defect}", index)
    good = make_good(category, size, rng)
    image, mask = make_defect(good, defect, rng, category=category)
    return good, image, mask


# ---------------------------------------------------------------------------------------------
# Writing a dataset
# ---------------------------------------------------------------------------------------------

def _save_rgb(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr, "RGB").save(path, compress_level=1)


def _save_mask(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(path, compress_level=1)


def _split_counts(total: int, defects: Sequence[str]) -> dict[str, int]:
    """Spread `total` images over the defects as evenly as possible, earlier defects first."""
    base, extra = divmod(total, len(defects))
    return {d: base + (1 if i < extra else 0) for i, d in enumerate(defects)}


def _write_category(folder: Path, category: str, *, n_train: int, n_test_good: int,
                    defect_counts: dict[str, int], size: int, seed: int) -> dict:
    for split, count in (("train/good", n_train), ("test/good", n_test_good)):
        target = folder / split
        target.mkdir(parents=True)
        for i in range(count):
            _save_rgb(target / f"{i:03d}.png", make_good(category, size, image_rng(seed, category, split, i)))
    for defect, count in defect_counts.items():
        if count == 0:
            continue
        img_dir, gt_dir = folder / "test" / defect, folder / "ground_truth" / defect
        img_dir.mkdir(parents=True)
        gt_dir.mkdir(parents=True)
        for i in range(count):
            _, image, mask = render_test_defect(category, defect, i, size=size, seed=seed)
            _save_rgb(img_dir / f"{i:03d}.png", image)
            _save_mask(gt_dir / f"{i:03d}_mask.png", mask)
    src = SOURCES[category]
    return {"source": f"skimage.data.{src.function}", "kind": src.kind, "licence": src.licence,
            "n_train": n_train, "n_test_good": n_test_good,
            "n_test_defect": {d: c for d, c in defect_counts.items() if c}}


def _validate(categories: Sequence[str], defects: Sequence[str], counts: dict[str, int], size: int,
              seed: int) -> None:
    if not categories:
        raise UsageError("categories must be a non-empty list of names, e.g. ['brick', 'gravel']")
    for c in categories:
        _source(c)
    if len(set(categories)) != len(categories):
        raise UsageError(f"categories {list(categories)} name one category twice; list each once")
    if not defects:
        raise UsageError(f"defects must be a non-empty list drawn from {', '.join(DEFECTS)}")
    unknown = [d for d in defects if d not in DEFECTS]
    if unknown or len(set(defects)) != len(defects):
        raise UsageError(f"defects {list(defects)}: each must appear once and be one of {', '.join(DEFECTS)}")
    for name, value in counts.items():
        if value < 0:
            raise UsageError(f"{name} must be 0 or more, not {value}")
    if size < MIN_SIZE:
        raise UsageError(f"size must be at least {MIN_SIZE} pixels, not {size}")
    if seed < 0:
        raise UsageError(f"seed must be a non-negative integer, not {seed}")


def generate_dataset(out: Path, *, categories: Sequence[str] = DEFAULT_CATEGORIES, n_train: int = 60,
                     n_test_good: int = 20, n_test_defect: int = 30, size: int = 256, seed: int = 0,
                     defects: Sequence[str] = DEFECTS) -> dict:
    """Write a demo dataset in the MVTec AD layout.

    Layout: `<out>/<category>/train/good/NNN.png`, `<out>/<category>/test/good/NNN.png`,
    `<out>/<category>/test/<defect>/NNN.png`, `<out>/<category>/ground_truth/<defect>/NNN_mask.png`
    (8-bit, 0/255), plus `<out>/medsclean-synth.json` (the returned summary). Good test images have
    no mask, as in MVTec AD. The folder is built next to `out` and renamed into place at the end.

    Args:
        out: the dataset root to create; must not exist, or be an empty folder.
        categories: keys of `SOURCES`.
        n_train: defect-free training images per category.
        n_test_good: defect-free test images per category.
        n_test_defect: defective test images per category, spread evenly over `defects`.
        size: side of the square images in pixels.
        seed: non-negative seed; equal seeds give identical files.
        defects: defect kinds to use, a subset of `DEFECTS`.

    Returns:
        The summary: format, size, seed, defects, and per category its source, licence and counts.

    Raises:
        DataError: `out` exists and is not an empty folder.
        UsageError: an unknown category or defect, or a negative count.
    """
    if isinstance(categories, str) or isinstance(defects, str):
        raise UsageError("categories and defects must be lists of names, e.g. ['brick', 'gravel']")
    categories, defects = list(categories), list(defects)
    _validate(categories, defects, {"n_train": n_train, "n_test_good": n_test_good,
                                    "n_test_defect": n_test_defect}, size, seed)
    out = Path(out)
    summary = {"format": SYNTH_FORMAT, "size": size, "seed": seed, "defects": defects, "categories": {}}
    with atomic_directory(out) as tmp:
        for category in categories:
            summary["categories"][category] = _write_category(
                tmp / category, category, n_train=n_train, n_test_good=n_test_good,
                defect_counts=_split_counts(n_test_defect, defects), size=size, seed=seed)
        write_json_atomic(tmp / SUMMARY_NAME, summary)
    return summary
