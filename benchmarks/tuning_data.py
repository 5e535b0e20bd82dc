"""Two more tuning-part classes: a scene and an aligned object (generator "tuning_data/1").

The tuning part's demo generator (`medsclean.demo.synth`) has stationary textures and one object;
this module adds the two other kinds of class a user may have, from scikit-image photos that
ship inside its wheel (no download) and that no other benchmark class uses:

  astronaut  scene: unaligned views of skimage's astronaut portrait (512x512): a square crop of
             55 % of the side, +-18 % in size, at a random place, turned by up to 8 degrees;
  chelsea    object: skimage's cat photo (300x451) as a fixed camera on a line would see it
             again and again: one square framing of 95 % of the height, turned by up to 2
             degrees and moved by up to 2 % of the side.

Both get exposure and contrast changes of up to 5 % and Gaussian sensor noise of 2 grey levels.
Defects: the demo generator's structural painters (`defects.DEFECTS`) on both classes and, on the
object only, three logical kinds written here: `misplaced_part` (a detailed part copied onto
another place), `missing_part` (a detailed part replaced by a blurred fill of its surroundings)
and `wrong_colour` (a colourful superpixel's hue turned by 120-240 degrees, its luma kept). A mask
holds exactly the pixels that differ from the good image by >= 1 grey level in some channel.

Conventions: images are square RGB uint8 arrays (size, size, 3), masks bool (size, size);
lengths are in pixels of the output image, points are (x, y) unless named `_yx`, angles in
degrees.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from medsclean.demo import defects
from medsclean.seeding import rng as seeded_rng
from medsclean.workdir.atomic import atomic_directory, write_json_atomic

GENERATOR = "tuning_data/1"
SUMMARY_NAME = "tuning-data.json"
CATEGORIES = ("astronaut", "chelsea")
CLASS_KIND = {"astronaut": "scene", "chelsea": "object"}
STRUCTURAL_KINDS = tuple(defects.DEFECTS)
LOGICAL_KINDS = ("misplaced_part", "missing_part", "wrong_colour")
DEFECT_KINDS = {"astronaut": STRUCTURAL_KINDS, "chelsea": STRUCTURAL_KINDS + LOGICAL_KINDS}
MIN_AREA = 0.002        # fraction of the image: the smallest mask of any defect
MAX_AREA = 0.06         # fraction of the image: the largest mask of a logical defect
EXPOSURE = 0.05         # the largest relative change of exposure and of contrast
NOISE = 2.0             # grey levels: the standard deviation of the sensor noise
MAX_TRIES = 100
LUMA = np.array([0.299, 0.587, 0.114], np.float32)   # Rec. 601 luma weights of R, G, B


@dataclass(frozen=True)
class Framing:
    """How the good images of a class are cut from its photo.

    Attributes:
        loader: name of the `skimage.data` function that returns the photo (offline).
        side: the nominal crop side, as a fraction of the photo's shorter side.
        centre: objects only: the fixed crop centre (x, y) as fractions of width and height;
            None for a scene, whose crops go anywhere.
        max_angle: the largest rotation, in degrees.
        size_jitter: the largest relative change of the crop side.
        max_shift: the largest shift of an object's crop, as a fraction of the output side.
    """

    loader: str
    side: float
    centre: tuple[float, float] | None
    max_angle: float
    size_jitter: float = 0.0
    max_shift: float = 0.0


FRAMINGS = {
    "astronaut": Framing("astronaut", side=0.55, centre=None, max_angle=8.0, size_jitter=0.18),
    "chelsea": Framing("chelsea", side=0.95, centre=(235 / 451, 148 / 300), max_angle=2.0,
                       max_shift=0.02),
}


# ---------------------------------------------------------------- good images
def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


@lru_cache(maxsize=8)
def _photo_at(category: str, size: int) -> np.ndarray:
    """The class's photo, resized (Lanczos) so that its nominal crop side spans `size` px:
    float32 (H, W, 3) in grey levels."""
    from skimage import data

    framing = FRAMINGS[category]
    photo = Image.fromarray(np.ascontiguousarray(getattr(data, framing.loader)()[..., :3]), "RGB")
    factor = size / (framing.side * min(photo.size))
    resized = photo.resize((round(photo.width * factor), round(photo.height * factor)),
                           Image.Resampling.LANCZOS)
    return np.asarray(resized, np.float32)


def _view(photo: np.ndarray, centre: np.ndarray, side: float, angle: float, size: int) -> np.ndarray:
    """The square of `side` px centred on `centre` (x, y) of `photo` (H, W, 3), turned by
    `angle` degrees, resampled bilinearly to float (size, size, 3)."""
    from skimage.transform import AffineTransform, warp

    theta, zoom = math.radians(angle), side / size
    linear = zoom * np.array([[math.cos(theta), -math.sin(theta)],
                              [math.sin(theta), math.cos(theta)]])
    middle = np.full(2, (size - 1) / 2)
    matrix = np.eye(3)
    matrix[:2, :2], matrix[:2, 2] = linear, centre - linear @ middle
    return warp(photo, AffineTransform(matrix=matrix), output_shape=(size, size), order=1,
                mode="reflect", preserve_range=True)


def _scene_view(photo: np.ndarray, framing: Framing, rng: np.random.Generator, size: int) -> np.ndarray:
    """A crop anywhere in the photo, of random size and rotation, wholly inside it."""
    side = size * rng.uniform(1 - framing.size_jitter, 1 + framing.size_jitter)
    angle = rng.uniform(-framing.max_angle, framing.max_angle)
    reach = side / 2 * (abs(math.cos(math.radians(angle))) + abs(math.sin(math.radians(angle))))
    height, width = photo.shape[:2]
    centre = np.array([rng.uniform(reach, width - reach), rng.uniform(reach, height - reach)])
    return _view(photo, centre, side, angle, size)


def _object_view(photo: np.ndarray, framing: Framing, rng: np.random.Generator, size: int) -> np.ndarray:
    """The fixed framing, turned by up to `max_angle` degrees and moved by up to `max_shift`."""
    angle = rng.uniform(-framing.max_angle, framing.max_angle)
    shift = rng.uniform(-framing.max_shift, framing.max_shift, 2) * size
    height, width = photo.shape[:2]
    centre = np.array([framing.centre[0] * width, framing.centre[1] * height]) + shift
    return _view(photo, centre, size, angle, size)


def _expose(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`img` (H, W, 3) with contrast and exposure scaled by U(0.95, 1.05) and Gaussian sensor
    noise of `NOISE` grey levels: uint8 (H, W, 3)."""
    contrast, exposure = 1 + rng.uniform(-EXPOSURE, EXPOSURE, 2)
    level = img.mean()
    out = ((img - level) * contrast + level) * exposure + rng.normal(0.0, NOISE, img.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_good(category: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One defect-free image of `category`: uint8 (size, size, 3)."""
    _check_category(category)
    framing, photo = FRAMINGS[category], _photo_at(category, size)
    frame = _scene_view if framing.centre is None else _object_view
    return _expose(frame(photo, framing, rng, size), rng)


# ---------------------------------------------------------------- logical defects
# Each painter takes the good image g (float32 (S, S, 3), grey levels) and the rng and returns
# (altered image float (S, S, 3), region bool (S, S)); only region pixels are taken from it.

def _superellipse(side: int, centre_yx: np.ndarray, radii_yx: np.ndarray, angle: float,
                  power: float) -> np.ndarray:
    """Bool (side, side): |u/a|^p + |v/b|^p <= 1 in axes turned by `angle` degrees about
    `centre_yx`; p = 2 is an ellipse, larger p a rectangle with rounded corners."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    dy, dx = yy - centre_yx[0], xx - centre_yx[1]
    theta = math.radians(angle)
    u = (dx * math.cos(theta) + dy * math.sin(theta)) / radii_yx[1]
    v = (-dx * math.sin(theta) + dy * math.cos(theta)) / radii_yx[0]
    return np.abs(u) ** power + np.abs(v) ** power <= 1


def _local_contrast(g: np.ndarray, window: int = 7) -> np.ndarray:
    """Standard deviation of the luma in a `window` px square around each pixel: float (S, S)."""
    luma = g @ LUMA
    mean = ndimage.uniform_filter(luma, window)
    return np.sqrt(np.maximum(ndimage.uniform_filter(luma * luma, window) - mean * mean, 0))


def _richest(shapes: list[np.ndarray], score: np.ndarray) -> np.ndarray:
    """Of candidate regions (bool (S, S) each) the one with the highest mean `score` inside."""
    means = [float(score[s].mean()) if s.any() else -np.inf for s in shapes]
    return shapes[int(np.argmax(means))]


def _candidate_centres(rng: np.random.Generator, side: int, reach: float, n: int = 8) -> np.ndarray:
    """`n` random centres (y, x), float (n, 2), at least `reach` px from every edge."""
    margin = min(reach, 0.45 * side)
    return rng.uniform(margin, side - 1 - margin, (n, 2))


def _paint_misplaced_part(g: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A copy of the most detailed of 8 rounded rectangles (12-20 % of the side across) pasted,
    hard-edged, at a random place at least 1.1 rectangle diagonals away; the original stays."""
    side = g.shape[0]
    radii = rng.uniform(0.06, 0.1, 2) * side
    angle = rng.uniform(-30, 30)
    reach = float(np.hypot(*radii)) + 4
    sources = [_superellipse(side, c, radii, angle, 4) for c in _candidate_centres(rng, side, reach)]
    source = _richest(sources, _local_contrast(g))
    source_yx = np.argwhere(source).mean(0)
    for target_yx in _candidate_centres(rng, side, reach, n=16):
        if np.hypot(*(target_yx - source_yx)) >= 2.2 * reach:
            dy, dx = np.rint(target_yx - source_yx).astype(int)
            return np.roll(g, (dy, dx), axis=(0, 1)), np.roll(source, (dy, dx), axis=(0, 1))
    return g, np.zeros_like(source)


def _blurred_fill(g: np.ndarray, hole: np.ndarray, sigma: float) -> np.ndarray:
    """Inside `hole` (bool (S, S)) a fill of g (S, S, 3) from its surroundings only: the
    Gaussian (sigma px) average of the known pixels, renormalised by their weight; float."""
    known = (~hole).astype(np.float32)
    weight = ndimage.gaussian_filter(known, sigma)[..., None] + 1e-6
    return ndimage.gaussian_filter(g * known[..., None], (sigma, sigma, 0)) / weight


def _paint_missing_part(g: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The most detailed of 8 ellipses (radii 5-10 % of the side) filled by a blur of its
    surroundings (sigma 60 % of the mean radius) plus sensor noise: a part that is not there."""
    side = g.shape[0]
    radii = rng.uniform(0.05, 0.1, 2) * side
    angle = rng.uniform(0, 180)
    shapes = [_superellipse(side, c, radii, angle, 2)
              for c in _candidate_centres(rng, side, float(radii.max()) + 4)]
    hole = _richest(shapes, _local_contrast(g))
    fill = _blurred_fill(g, hole, 0.6 * float(radii.mean()))
    return fill + rng.normal(0.0, NOISE, g.shape), hole


def _turn_about_grey(rgb: np.ndarray, angle: float) -> np.ndarray:
    """Colours (..., 3) turned by `angle` degrees about the grey axis (1, 1, 1) (Rodrigues):
    a hue rotation that keeps each pixel's mean of R, G and B."""
    axis = np.full(3, 1 / math.sqrt(3))
    theta = math.radians(angle)
    cross = np.cross(axis, rgb)
    along = (rgb @ axis)[..., None] * axis
    return rgb * math.cos(theta) + cross * math.sin(theta) + along * (1 - math.cos(theta))


def _colourful_segment(g: np.ndarray, rng: np.random.Generator, top: int = 5) -> np.ndarray:
    """One of the `top` most saturated SLIC superpixels of g (S, S, 3) whose area is a
    plausible part (2 `MIN_AREA` to 70 % of `MAX_AREA`), picked at random: bool (S, S)."""
    from skimage.segmentation import slic

    labels = slic(g / 255.0, n_segments=60, compactness=12, start_label=0)
    ids = np.arange(labels.max() + 1)
    area = np.bincount(labels.ravel(), minlength=len(ids)) / labels.size
    saturation = ndimage.mean(g.max(-1) - g.min(-1), labels, ids)
    fitting = ids[(area >= 2 * MIN_AREA) & (area <= 0.7 * MAX_AREA)]
    if not len(fitting):
        return np.zeros(labels.shape, bool)
    ranked = fitting[np.argsort(-saturation[fitting], kind="stable")][:top]
    return labels == ranked[int(rng.integers(len(ranked)))]


def _paint_wrong_colour(g: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One of the most colourful superpixels (a part such as an eye or a nose) in another
    colour: its colours pushed 1.3-2x away from grey, turned by 120-240 degrees about the grey
    axis, then shifted along grey so that each pixel keeps its Rec. 601 luma."""
    region = _colourful_segment(g, rng)
    grey = g.mean(-1, keepdims=True)
    vivid = grey + (g - grey) * rng.uniform(1.3, 2.0)
    turned = _turn_about_grey(vivid, rng.uniform(120, 240))
    turned += (g @ LUMA - turned @ LUMA)[..., None]
    return turned, region


_LOGICAL_PAINTERS = {"misplaced_part": _paint_misplaced_part, "missing_part": _paint_missing_part,
                     "wrong_colour": _paint_wrong_colour}


# ---------------------------------------------------------------- defects
def changed_pixels(good: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Bool (S, S): where `image` differs from `good` (both uint8 (S, S, 3)) by >= 1 grey level
    in some channel."""
    return (good != image).any(-1)


def _paste(good: np.ndarray, altered: np.ndarray, region: np.ndarray) -> np.ndarray:
    """`good` (uint8 (S, S, 3)) with the rounded, clipped `altered` pixels inside `region`."""
    image = good.copy()
    image[region] = np.clip(np.rint(altered[region]), 0, 255).astype(np.uint8)
    return image


def _draw(good: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One draw of a defect of `kind` on `good`: the defective image, uint8 (S, S, 3)."""
    if kind in STRUCTURAL_KINDS:
        return defects.make_defect(good, kind, rng)[0]
    altered, region = _LOGICAL_PAINTERS[kind](good.astype(np.float32), rng)
    return _paste(good, altered, region)


def make_defect(good: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A defect of `kind` on `good` (uint8 (S, S, 3), square).

    Returns:
        image: uint8 (S, S, 3), equal to `good` wherever `mask` is False.
        mask: bool (S, S), exactly the pixels that changed; between `MIN_AREA` and (for the
            logical kinds) `MAX_AREA` of the image.
    """
    if kind not in STRUCTURAL_KINDS + LOGICAL_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of "
                         f"{STRUCTURAL_KINDS + LOGICAL_KINDS}")
    largest = MAX_AREA if kind in LOGICAL_KINDS else 1.0
    for _ in range(MAX_TRIES):
        image = _draw(good, kind, rng)
        mask = changed_pixels(good, image)
        if MIN_AREA <= mask.mean() <= largest:
            return image, mask
    raise RuntimeError(f"no acceptable {kind} defect in {MAX_TRIES} draws")


# ---------------------------------------------------------------- dataset writer
def _rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    """The generator of one image: independent of how many other images are drawn."""
    return seeded_rng(seed, category, split, index)


def _save(path: Path, arr: np.ndarray) -> None:
    """Write `arr` (uint8 (H, W, 3) or (H, W)) as a PNG, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")


def _write_category(folder: Path, cat: str, n_train: int, n_good: int, n_defect: int,
                    size: int, seed: int) -> dict:
    """Write one class in MVTec-AD layout into `folder`; returns {split folder: image count}.
    Defect kinds go round-robin over `DEFECT_KINDS[cat]`."""
    for split, n in (("train/good", n_train), ("test/good", n_good)):
        for i in range(n):
            _save(folder / split / f"{i:03d}.png", render_good(cat, _rng(seed, cat, split, i), size))
    counts, kinds = {"train/good": n_train, "test/good": n_good}, DEFECT_KINDS[cat]
    for i in range(n_defect):
        kind, j = kinds[i % len(kinds)], i // len(kinds)
        rng = _rng(seed, cat, "test/defect", i)
        image, mask = make_defect(render_good(cat, rng, size), kind, rng)
        _save(folder / "test" / kind / f"{j:03d}.png", image)
        _save(folder / "ground_truth" / kind / f"{j:03d}_mask.png", mask.astype(np.uint8) * 255)
        counts[f"test/{kind}"] = counts.get(f"test/{kind}", 0) + 1
    return counts


def _merged_summary(path: Path, seed: int, size: int) -> dict:
    """The summary already at `path` if it has this generator, seed and size, else a new one;
    raises ValueError if the existing one does not match."""
    fresh = {"generator": GENERATOR, "seed": seed, "size": size, "categories": {}}
    if not path.exists():
        return fresh
    old = json.loads(path.read_text())
    if any(old.get(key) != fresh[key] for key in ("generator", "seed", "size")):
        raise ValueError(f"{path} describes other data ({old.get('generator')}, seed "
                         f"{old.get('seed')}, size {old.get('size')}); write to another folder")
    return old


def generate(out: Path, *, categories=CATEGORIES, n_train: int = 80, n_test_good: int = 20,
             n_test_defect: int = 40, size: int = 256, seed: int = 0) -> dict:
    """Write the classes `categories` in MVTec-AD layout under `out` and return the summary
    (also in `out/tuning-data.json`, merged with an earlier one of the same seed and size).

    `out` may already hold other classes (the demo generator's): only `out/<cat>` folders are
    written, each built under a temporary name and renamed into place. Images are `size` px
    square; each is a pure function of (seed, category, split, index).

    Raises:
        ValueError: an unknown or repeated category, or a summary of other data in `out`.
        FileExistsError: one of the categories' folders already exists.
    """
    out, categories = Path(out), tuple(categories)
    for cat in categories:
        _check_category(cat)
    if len(set(categories)) != len(categories):
        raise ValueError(f"categories {categories} name a class twice")
    taken = [cat for cat in categories if (out / cat).exists()]
    if taken:
        raise FileExistsError(f"{out} already holds {taken}; remove them or write elsewhere")
    summary = _merged_summary(out / SUMMARY_NAME, seed, size)
    out.mkdir(parents=True, exist_ok=True)
    for cat in categories:
        with atomic_directory(out / cat) as tmp:
            counts = _write_category(tmp, cat, n_train, n_test_good, n_test_defect, size, seed)
        summary["categories"][cat] = {"source": f"skimage.data.{FRAMINGS[cat].loader}",
                                      "class_kind": CLASS_KIND[cat],
                                      "defect_kinds": list(DEFECT_KINDS[cat]), "counts": counts}
    write_json_atomic(out / SUMMARY_NAME, summary)
    return summary
