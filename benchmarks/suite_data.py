"""Independent image-and-defect generator for the accuracy benchmark (generator "suite_data/1").

Good images are views of real photographs that install offline with scikit-image and
scikit-learn: `tissue` (skimage immunohistochemistry, 512x512) random crops of 50 % +- 8 % of
the side with random 90-degree turns and flips; `retina` (skimage retina, 1411x1411) a fixed
centre framing of 90 % of the side with +-1.5 % shift, +-2 % scale, +-2 degree jitter; `china`
and `flower` (sklearn sample images, 427x640) random crops of 55 % +- 8 % of the shorter side.
All get a +-4 % brightness and contrast jitter. Two aligned objects are shot as by a fixed camera
on a line: `motorcycle` (skimage stereo_motorcycle, left view, 500x741) and `rocket` (skimage
rocket, 427x640), a fixed square framing with +-2 degree rotation, +-2 % shift, +-5 % exposure and
contrast and Gaussian sensor noise of 2 grey levels. `CLASS_KIND` says which kind each class is.

Defects are procedural: `DEFECT_KINDS` on every class, and on the aligned objects also the
logical kinds `LOGICAL_KINDS` (a part moved elsewhere, a part gone, a part in the wrong colour);
`kinds_for` gives a class's list. The mask of a defect holds exactly the pixels that changed by
>= 1 grey level in some channel.

Conventions: images are square RGB uint8 arrays (size, size, 3), masks bool (size, size);
lengths and coordinates are in pixels of the output image, points are (y, x), angles are in
degrees unless named `theta` (radians).
"""

from __future__ import annotations

import colorsys
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.signal import lfilter
from scipy.spatial import cKDTree

from medsclean.seeding import rng as seeded_rng
from medsclean.seeding import stable_id
from medsclean.workdir.atomic import atomic_directory, write_json_atomic

GENERATOR = "suite_data/1"
CATEGORIES = ("tissue", "retina", "china", "flower", "motorcycle", "rocket")
CLASS_KIND = {"tissue": "texture", "retina": "object", "china": "scene", "flower": "scene",
              "motorcycle": "object", "rocket": "object"}
BASE_KINDS = ("thin_scratch", "crack", "stain", "missing_material", "extra_material", "blur",
              "colour_shift")
DEFECT_KINDS = BASE_KINDS + ("border",)
LOGICAL_KINDS = ("displaced_part", "absent_part", "recoloured_part")
ALL_KINDS = DEFECT_KINDS + LOGICAL_KINDS
LINE_KINDS = ("thin_scratch", "crack")
FRAME = 3            # px: a border defect has mask pixels in this outer frame, others have none
MIN_PIXELS = 40      # px: the smallest mask of any defect
MIN_AREA = 0.002     # fraction of the image: the smallest mask of a non-line defect
MAX_AREA = 0.06      # fraction of the image: the largest mask of any defect
MAX_TRIES = 200
_CROP = {"tissue": (0.50, True), "china": (0.55, False), "flower": (0.55, False)}
# Fixed-camera objects: the framing's centre (x, y) as fractions of the photo's width and height;
# its side as a fraction of the photo's height; and the part zone, the box (top, bottom, left,
# right), as fractions of the framed image, where logical defects pick their parts (the product
# rather than the shelves behind it).
_CAMERA = {"motorcycle": ((390 / 741, 255 / 500), 480 / 500, (0.36, 0.92, 0.02, 0.98)),
           "rocket": ((320 / 640, 258 / 427), 310 / 427, (0.08, 0.97, 0.03, 0.97))}
CAMERA_ANGLE = 2.0       # degrees: the largest rotation of a fixed-camera shot
CAMERA_SHIFT = 0.02      # fraction of the side: the largest shift of a fixed-camera shot
CAMERA_EXPOSURE = 0.05   # the largest relative change of exposure and of contrast
CAMERA_NOISE = 2.0       # grey levels: the standard deviation of the sensor noise


def kinds_for(category: str) -> tuple[str, ...]:
    """The defect kinds of `category`, in their round-robin order: `DEFECT_KINDS`, followed by
    `LOGICAL_KINDS` on the fixed-camera objects."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    return DEFECT_KINDS + LOGICAL_KINDS if category in _CAMERA else DEFECT_KINDS


# ---------------------------------------------------------------- good images
@lru_cache(maxsize=None)
def _base(category: str) -> Image.Image:
    """The full-resolution source photograph of `category`, as an RGB PIL image."""
    if category in ("tissue", "retina", "motorcycle", "rocket"):
        from skimage import data
        loaders = {"tissue": data.immunohistochemistry, "retina": data.retina,
                   "motorcycle": lambda: data.stereo_motorcycle()[0], "rocket": data.rocket}
        arr = loaders[category]()
    else:
        from sklearn.datasets import load_sample_images
        bunch = load_sample_images()
        arr = next(im for f, im in zip(bunch.filenames, bunch.images)
                   if Path(f).name == f"{category}.jpg")
    return Image.fromarray(np.ascontiguousarray(arr[..., :3], dtype=np.uint8), "RGB")


@lru_cache(maxsize=8)
def _retina_scaled(size: int) -> np.ndarray:
    """The whole retina photo resized so that 90 % of its side spans `size` px; float32 (S, S, 3)."""
    side = round(size / 0.9)
    return np.asarray(_base("retina").resize((side, side), Image.LANCZOS), np.float32)


@lru_cache(maxsize=8)
def _camera_canvas(category: str, size: int) -> np.ndarray:
    """The fixed-camera photo of `category` resized so that its framing spans `size` px and cut
    (reflect-padded where needed) to a float32 (C, C, 3) window, C >= 1.5 size, centred on it."""
    (fx, fy), side, _ = _CAMERA[category]
    base = _base(category)
    factor = size / (side * base.height)
    scaled = np.asarray(base.resize((round(base.width * factor), round(base.height * factor)),
                                    Image.LANCZOS), np.float32)
    half = int(np.ceil(0.75 * size))
    padded = np.pad(scaled, ((half, half), (half, half), (0, 0)), mode="reflect")
    cy, cx = round(fy * scaled.shape[0]) + half, round(fx * scaled.shape[1]) + half
    return padded[cy - half:cy + half, cx - half:cx + half]


def _camera_shot(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One fixed-camera shot of `category`: its framing turned by U(-2, 2) degrees, moved by
    U(-2 %, 2 %) of the side, exposure and contrast scaled by U(0.95, 1.05) and Gaussian noise
    of `CAMERA_NOISE` grey levels added; uint8 (size, size, 3)."""
    angle = rng.uniform(-CAMERA_ANGLE, CAMERA_ANGLE)
    shift = rng.uniform(-CAMERA_SHIFT, CAMERA_SHIFT, 2) * size
    img = _affine(_camera_canvas(category, size), angle, shift, 1.0, (size, size))
    exposure, contrast = 1 + rng.uniform(-CAMERA_EXPOSURE, CAMERA_EXPOSURE, 2)
    img = ((img - img.mean()) * contrast + img.mean()) * exposure
    img = img + rng.normal(0.0, CAMERA_NOISE, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _affine(img: np.ndarray, angle: float, shift, scale: float = 1.0, out_shape=None,
            order: int = 1, mode: str = "reflect") -> np.ndarray:
    """`img` (H, W) or (H, W, C) rotated by `angle` degrees about its centre, zoomed by `scale`
    and moved by `shift` = (dy, dx) px; float32 of shape `out_shape` (H', W') (default H, W)."""
    out_shape = tuple(out_shape or img.shape[:2])
    t = np.deg2rad(angle)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) / scale
    c_in, c_out = (np.array(img.shape[:2]) - 1) / 2, (np.array(out_shape) - 1) / 2
    offset = c_in - rot @ (c_out + np.asarray(shift, float))
    if img.ndim == 3:
        rot, offset = np.pad(rot, ((0, 1), (0, 1))), np.append(offset, 0.0)
        rot[2, 2], out_shape = 1.0, out_shape + img.shape[2:]
    return ndimage.affine_transform(img.astype(np.float32), rot, offset, out_shape,
                                    order=order, mode=mode)


def _random_crop(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop of the category's photo resized to `size`; float32 (size, size, 3)."""
    base, (frac, flips) = _base(category), _CROP[category]
    w, h = base.size
    side = min(w, h) * (frac + rng.uniform(-0.08, 0.08))
    y0, x0 = rng.uniform(0, h - side), rng.uniform(0, w - side)
    arr = np.asarray(base.resize((size, size), Image.LANCZOS, box=(x0, y0, x0 + side, y0 + side)))
    if flips:
        arr = np.rot90(arr, int(rng.integers(4)))
        arr = arr[:, ::-1] if rng.random() < 0.5 else arr
    return arr.astype(np.float32)


def _retina_frame(rng: np.random.Generator, size: int) -> np.ndarray:
    """The centre framing of the retina with small jitter; float32 (size, size, 3)."""
    angle, scale = rng.uniform(-2, 2), 1 + rng.uniform(-0.02, 0.02)
    shift = rng.uniform(-0.015, 0.015, 2) * size
    return _affine(_retina_scaled(size), angle, shift, scale, (size, size), mode="nearest")


def render_good(category: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One defect-free image of `category`: uint8 (size, size, 3)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    if category in _CAMERA:
        return _camera_shot(category, rng, size)
    img = _retina_frame(rng, size) if category == "retina" else _random_crop(category, rng, size)
    brightness, contrast = 1 + rng.uniform(-0.04, 0.04, 2)
    img = (img - img.mean()) * contrast + img.mean() * brightness
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- geometry
def _edge_point(rng: np.random.Generator, side: int):
    """A point (y, x) within 2 px of a random image edge and the inward normal `theta` (rad)."""
    along, depth, edge = rng.uniform(0.1, 0.9) * (side - 1), rng.uniform(0, 2), int(rng.integers(4))
    points = [(depth, along), (side - 1 - depth, along), (along, depth), (along, side - 1 - depth)]
    return np.array(points[edge]), (np.pi / 2, -np.pi / 2, 0.0, np.pi)[edge]


def _centre(rng: np.random.Generator, side: int, border: bool, margin: float) -> np.ndarray:
    """A defect centre (y, x): on an edge for border defects, else `margin` px inside."""
    if border:
        return _edge_point(rng, side)[0]
    margin = min(margin, 0.4 * side)
    return rng.uniform(margin, side - 1 - margin, 2)


def _curve_start(rng: np.random.Generator, side: int, border: bool, length: float):
    """Start point (y, x) and heading `theta` (rad) of a curve of `length` px."""
    if border:
        start, normal = _edge_point(rng, side)
        return start, normal + rng.uniform(-np.pi / 3, np.pi / 3)
    theta = rng.uniform(0, 2 * np.pi)
    centre = rng.uniform(0.3, 0.7, 2) * side
    return centre - length / 2 * np.array([np.sin(theta), np.cos(theta)]), theta


def _fit_inside(curves: list[np.ndarray], side: int, margin: float = 5) -> list[np.ndarray]:
    """Polylines (N, 2) moved together so that they lie `margin` px inside the image."""
    pts = np.vstack(curves)
    lo, hi = pts.min(0), pts.max(0)
    shift = np.maximum(margin - lo, 0) + np.minimum(side - 1 - margin - hi, 0)
    return [c + shift for c in curves]


def _coverage(pts: np.ndarray, widths: np.ndarray, shape) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], float32 (H, W), of the polyline `pts` (N, 2) whose width
    in px varies along it as `widths` (N,)."""
    s = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(pts, axis=0).T))])
    t = np.linspace(0, s[-1], max(2, int(s[-1] / 0.25) + 1))
    dense = np.stack([np.interp(t, s, pts[:, 0]), np.interp(t, s, pts[:, 1])], 1)
    w = np.interp(t, s, widths)
    reach = w.max() / 2 + 1
    lo = np.maximum(np.floor(dense.min(0) - reach), 0).astype(int)
    hi = np.minimum(np.ceil(dense.max(0) + reach) + 1, shape).astype(int)
    cov = np.zeros(shape, np.float32)
    if np.any(hi <= lo):
        return cov
    yy, xx = np.mgrid[lo[0]:hi[0], lo[1]:hi[1]]
    d, idx = cKDTree(dense).query(np.c_[yy.ravel(), xx.ravel()], distance_upper_bound=reach)
    near = np.clip(w[np.minimum(idx, len(w) - 1)] / 2 + 0.5 - d, 0, 1)
    cov[lo[0]:hi[0], lo[1]:hi[1]] = near.reshape(yy.shape)
    return cov


def _blob_site(g: np.ndarray, rng, border: bool, frac: tuple, rough: float) -> np.ndarray:
    """Bool (H, W): an ellipse covering a fraction in `frac` of the image, with random aspect
    and angle, placed for a border or inner defect, whose outline is perturbed by smoothed
    noise of relative amplitude `rough` (0: a clean ellipse)."""
    shape, area = g.shape[:2], rng.uniform(*frac) * g.shape[0] * g.shape[1]
    centre = _centre(rng, shape[0], border, margin=1.6 * np.sqrt(area / np.pi) + 6)
    aspect, th = rng.uniform(0.45, 1.0), rng.uniform(0, np.pi)
    a = np.sqrt(area / (np.pi * aspect))
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    dy, dx = yy - centre[0], xx - centre[1]
    u, v = dx * np.cos(th) + dy * np.sin(th), -dx * np.sin(th) + dy * np.cos(th)
    rho = np.hypot(u / a, v / (a * aspect))
    if rough:
        noise = ndimage.gaussian_filter(rng.standard_normal(shape), max(1.0, a * aspect / 2))
        rho = rho + rough * noise / (noise.std() + 1e-9)
    return rho < 1


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    """`mask` (H, W) feathered by a Gaussian of `sigma` px: alpha in [0, 1], float32 (H, W)."""
    return ndimage.gaussian_filter(mask.astype(np.float32), sigma)


# ---------------------------------------------------------------- defect models
# Each model takes the good image g (float32 H x W x 3, 0..255), the rng and whether the defect
# must touch the border; it returns the defective image (float, any range) and the support
# (bool H x W) outside which nothing may change.

def _thin_scratch(g, rng, border):
    """A 1-2 px wide cubic Bezier line, 20-60 % of the side long, lighter or darker."""
    side = g.shape[0]
    length = rng.uniform(0.2, 0.6) * side
    start, theta = _curve_start(rng, side, border, length)
    u, n = np.array([np.sin(theta), np.cos(theta)]), np.array([np.cos(theta), -np.sin(theta)])
    ctrl = [start, start + u * length / 3 + n * rng.normal(0, 0.2 * length),
            start + 2 * u * length / 3 + n * rng.normal(0, 0.2 * length), start + u * length]
    t = np.linspace(0, 1, 96)[:, None]
    pts = ((1 - t) ** 3 * ctrl[0] + 3 * (1 - t) ** 2 * t * ctrl[1]
           + 3 * (1 - t) * t ** 2 * ctrl[2] + t ** 3 * ctrl[3])
    pts = start + (pts - start) * length / np.hypot(*np.diff(pts, axis=0).T).sum()
    pts = pts if border else _fit_inside([pts], side)[0]
    cov = _coverage(pts, np.full(len(pts), rng.uniform(1.0, 2.0)), g.shape[:2])
    local = g[cov > 0].mean() if cov.any() else 128.0
    lighter = rng.random() < 0.5 if 60 < local < 190 else local <= 60
    k = rng.uniform(0.45, 0.9)
    target = g + (255 - g) * k if lighter else g * (1 - k)
    return g + cov[..., None] * (target - g), cov > 0


def _walk(start, theta: float, length: float, rng) -> np.ndarray:
    """A jagged random walk (N, 2) of 1-px steps whose heading wanders around `theta` (rad)."""
    n = max(2, int(length))
    heading = theta + lfilter([1.0], [1.0, -0.93], rng.normal(0, 0.15, n))
    return np.vstack([start, start + np.cumsum(np.stack([np.sin(heading), np.cos(heading)], 1), 0)])


def _crack(g, rng, border):
    """A dark jagged crack: a trunk of 25-45 % of the side, 1.6-3 px tapering to 1 px, with
    2-3 side branches."""
    side = g.shape[0]
    length = rng.uniform(0.25, 0.45) * side
    start, theta = _curve_start(rng, side, border, length)
    trunk = _walk(start, theta, length, rng)
    widths = np.linspace(rng.uniform(1.6, 3.0), 1.0, len(trunk))
    curves, curve_widths = [trunk], [widths]
    for _ in range(int(rng.integers(2, 4))):            # 2-3 side branches off the trunk
        i = int(rng.integers(len(trunk) // 5, len(trunk) * 4 // 5))
        heading = np.arctan2(*(trunk[i + 1] - trunk[i]))
        branch = _walk(trunk[i], heading + rng.choice([-1, 1]) * rng.uniform(0.4, 1.1),
                       rng.uniform(0.25, 0.5) * length, rng)
        curves.append(branch)
        curve_widths.append(np.linspace(max(0.75 * widths[i], 1.0), 1.0, len(branch)))
    curves = curves if border else _fit_inside(curves, side)
    cov = np.max([_coverage(c, w, g.shape[:2]) for c, w in zip(curves, curve_widths)], axis=0)
    return g * (1 - rng.uniform(0.55, 0.85) * cov[..., None]), cov > 0


def _stain(g, rng, border):
    """A low-contrast irregular blotch: a colour shift of 8-20 % of the local intensity range."""
    blob = _blob_site(g, rng, border, (0.006, 0.04), rough=0.55)
    if not blob.any():
        return g, blob
    alpha = _soft(blob, rng.uniform(1.0, 2.5))
    lum = g.mean(-1)[ndimage.binary_dilation(blob, iterations=5)]   # range floored at 40 levels
    amp = rng.uniform(0.08, 0.20) * max(np.percentile(lum, 98) - np.percentile(lum, 2), 40.0)
    colour = rng.normal(0, 0.5, 3) + rng.choice([-1.0, 1.0])
    return g + alpha[..., None] * amp * colour / np.abs(colour).max(), alpha > 1e-3


def _missing_material(g, rng, border):
    """A chipped polygon filled with a flat dark (or bright background) colour, darker
    towards its rim, with a soft shadow around it."""
    from skimage.draw import polygon
    side = g.shape[0]
    r = np.sqrt(rng.uniform(0.005, 0.035) * side * side / np.pi)
    cy, cx = _centre(rng, side, border, margin=1.3 * r + 8)
    n = int(rng.integers(5, 9))
    ang, rad = np.sort(rng.uniform(0, 2 * np.pi, n)), r * rng.uniform(0.65, 1.3, n)
    hole = np.zeros(g.shape[:2], bool)
    hole[polygon(cy + rad * np.sin(ang), cx + rad * np.cos(ang), shape=hole.shape)] = True
    lum = g.mean(-1)
    if rng.random() < 0.7:                               # a dark hole
        fill = g.reshape(-1, 3).mean(0) * rng.uniform(0.12, 0.35)
    else:                                                # the bright background showing through
        fill = g[lum >= np.percentile(lum, 97)].mean(0)
    rim = np.clip(ndimage.distance_transform_edt(hole) / rng.uniform(2, 5), 0, 1)
    shadow = _soft(hole, rng.uniform(1.5, 3.0))
    out = np.where(hole[..., None], fill * (0.65 + 0.35 * rim)[..., None],
                   g * (1 - 0.55 * shadow[..., None]))
    return out, hole | (shadow > 1e-3)


def _extra_material(g, rng, border):
    """A blob of foreign texture: the same image turned by 90 degrees and shifted, or a
    tinted noise pattern."""
    side = g.shape[0]
    blob = _blob_site(g, rng, border, (0.006, 0.04), rough=0.3)
    if rng.random() < 0.5:      # texture from elsewhere in the same image, turned by 90 degrees
        shift = tuple(int(s) for s in rng.integers(side // 4, 3 * side // 4, 2))
        foreign = np.roll(np.rot90(g, int(rng.choice([1, 3]))), shift, axis=(0, 1))
    else:                       # a tinted noise pattern
        noise = sum(ndimage.gaussian_filter(rng.standard_normal(g.shape[:2]), s) * w
                    for s, w in ((1.0, 1.0), (3.0, 2.0)))
        tint = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 0.8),
                                            rng.uniform(0.35, 0.85))) * 255
        foreign = tint * (1 + 0.25 * noise / (noise.std() + 1e-9))[..., None]
    alpha = _soft(blob, 0.8) * rng.uniform(0.85, 1.0)
    return g + alpha[..., None] * (foreign - g), alpha > 1e-3


def _blur(g, rng, border):
    """A disk or ellipse blurred with a Gaussian of sigma 3-6 px, feathered over 1.5 px."""
    blob = _blob_site(g, rng, border, (0.008, 0.045), rough=0.0)
    sigma = rng.uniform(3.0, 6.0)
    alpha = _soft(blob, 1.5)
    return g + alpha[..., None] * (ndimage.gaussian_filter(g, (sigma, sigma, 0)) - g), alpha > 1e-3


def _colour_shift(g, rng, border):
    """An irregular region whose hue turns by 20-60 degrees or whose saturation collapses
    or saturates."""
    from skimage.color import hsv2rgb, rgb2hsv
    blob = _blob_site(g, rng, border, (0.006, 0.04), rough=0.25)
    hsv = rgb2hsv(g / 255.0)
    mode = rng.random()
    if mode < 0.6:                                       # hue rotated by 20-60 degrees
        hsv[..., 0] = (hsv[..., 0] + rng.choice([-1, 1]) * rng.uniform(20, 60) / 360) % 1
    elif mode < 0.8:                                     # washed out
        hsv[..., 1] *= rng.uniform(0.05, 0.3)
    else:                                                # over-saturated
        hsv[..., 1] = 1 - (1 - hsv[..., 1]) * rng.uniform(0.1, 0.4)
    alpha = _soft(blob, 1.2)
    return g + alpha[..., None] * (hsv2rgb(hsv) * 255 - g), alpha > 1e-3


# ---------------------------------------------------------------- logical defect models
# A logical defect changes which parts the object has, where they are, or their colour, with
# no damage to the surface. These models are meant for the fixed-camera objects and never touch
# the border. Each takes the good image g (float32 H x W x 3), the rng and the part zone (bool
# H x W: where the object's parts are) and returns the defective image and the support, as the
# models above do.

def _part_zone(category: str | None, side: int) -> np.ndarray:
    """Bool (side, side): the part zone of a fixed-camera `category`; the whole image for any
    other category or None."""
    zone = np.zeros((side, side), bool)
    if category not in _CAMERA:
        zone[:] = True
        return zone
    top, bottom, left, right = (round(f * side) for f in _CAMERA[category][2])
    zone[top:bottom, left:right] = True
    return zone


def _edge_strength(g: np.ndarray) -> np.ndarray:
    """Gradient magnitude of the lightly smoothed luminance of g (H, W, 3): float (H, W), in
    grey levels per px (Sobel scale)."""
    lum = ndimage.gaussian_filter(g.mean(-1), 1.0)
    return np.hypot(ndimage.sobel(lum, 0), ndimage.sobel(lum, 1))


def _to_ycc(g: np.ndarray) -> np.ndarray:
    """g (H, W, 3) in RGB to full-range BT.601 (Y, Cb, Cr), chroma centred on 0: float (H, W, 3)."""
    y = g @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.stack([y, 0.564 * (g[..., 2] - y), 0.713 * (g[..., 0] - y)], -1)


def _from_ycc(ycc: np.ndarray) -> np.ndarray:
    """The inverse of `_to_ycc`: (Y, Cb, Cr) float (H, W, 3) to RGB float (H, W, 3), unclipped."""
    y, cb, cr = ycc[..., 0], ycc[..., 1], ycc[..., 2]
    r, b = y + cr / 0.713, y + cb / 0.564
    return np.stack([r, (y - 0.299 * r - 0.114 * b) / 0.587, b], -1)


def _most_salient_site(g, rng, frac: tuple, rough: float, salience: np.ndarray,
                       draws: int = 6) -> np.ndarray:
    """Of `draws` inner blob sites (see `_blob_site`) the one with the highest mean `salience`
    (H, W) inside: bool (H, W)."""
    sites = [_blob_site(g, rng, False, frac, rough) for _ in range(draws)]
    return max(sites, key=lambda site: float(salience[site].mean()) if site.any() else -np.inf)


def _harmonic_fill(g: np.ndarray, hole: np.ndarray, sweeps: int = 250) -> np.ndarray:
    """g (H, W, 3) with the pixels of `hole` (bool (H, W)) replaced by the solution of Laplace's
    equation whose boundary values are the pixels around the hole (the smoothest continuation
    of the surroundings): float32 (H, W, 3). Solved by Jacobi sweeps on the hole's bounding box,
    started from a Gaussian-weighted average of the surroundings."""
    out = g.astype(np.float32).copy()
    if not hole.any():
        return out
    ys, xs = np.nonzero(hole)
    top, left = max(ys.min() - 2, 0), max(xs.min() - 2, 0)
    bottom, right = min(ys.max() + 3, g.shape[0]), min(xs.max() + 3, g.shape[1])
    box, inside = out[top:bottom, left:right], hole[top:bottom, left:right]
    known = (~inside).astype(np.float32)
    reach = max(2.0, 0.25 * min(inside.shape))
    weight = ndimage.gaussian_filter(known, reach) + 1e-6
    start = ndimage.gaussian_filter(box * known[..., None], (reach, reach, 0)) / weight[..., None]
    box[inside] = start[inside]
    for _ in range(sweeps):
        padded = np.pad(box, ((1, 1), (1, 1), (0, 0)), mode="edge")
        neighbours = (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]) / 4
        box[inside] = neighbours[inside]
    return out


def _with_sensor_noise(img: np.ndarray, where: np.ndarray, rng) -> np.ndarray:
    """`img` (H, W, 3) with Gaussian noise of `CAMERA_NOISE` grey levels added where `where`
    (bool (H, W)) holds, so that a synthetic fill is as noisy as the photo around it."""
    noisy = img.copy()
    noisy[where] += rng.normal(0.0, CAMERA_NOISE, (int(where.sum()), 3)).astype(noisy.dtype)
    return noisy


def _displaced_part(g, rng, zone):
    """A detailed part of the object moved: its old place smoothly filled from around it, its
    content pasted (feathered over 0.7 px) 28-50 % of the side away, with its centre in the
    part zone, where it changes the image most."""
    side = g.shape[0]
    source = _most_salient_site(g, rng, (0.006, 0.02), 0.2, _edge_strength(g) * zone)
    ys, xs = np.nonzero(source)
    if not len(ys):
        return g, source
    keep_clear = ndimage.binary_dilation(source, iterations=4)
    lo, hi = FRAME + 3, side - FRAME - 4
    best, best_change = None, -1.0
    for _ in range(12):
        theta, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.28, 0.5) * side
        dy, dx = int(round(dist * np.sin(theta))), int(round(dist * np.cos(theta)))
        if min(ys.min() + dy, xs.min() + dx) < lo or max(ys.max() + dy, xs.max() + dx) > hi:
            continue
        target = np.roll(source, (dy, dx), axis=(0, 1))
        centre_y, centre_x = np.rint(np.argwhere(target).mean(0)).astype(int)
        if (target & keep_clear).any() or not zone[centre_y, centre_x]:
            continue
        moved = np.roll(g, (dy, dx), axis=(0, 1))
        change = float(np.abs(moved - g)[target].mean())
        if change > best_change:
            best, best_change = (target, moved), change
    if best is None:
        return g, np.zeros_like(source)
    target, moved = best
    out = _with_sensor_noise(_harmonic_fill(g, source), source, rng)
    alpha = _soft(target, 0.7)[..., None]
    return out + alpha * (moved - out), source | (alpha[..., 0] > 1e-3)


def _absent_part(g, rng, zone):
    """A detailed part of the object gone: an irregular region over strong edges in the part
    zone replaced by the smoothest continuation of its surroundings (harmonic fill) plus sensor
    noise."""
    hole = _most_salient_site(g, rng, (0.01, 0.04), 0.3, _edge_strength(g) * zone)
    return _with_sensor_noise(_harmonic_fill(g, hole), hole, rng), hole


def _chroma_contrast(ycc: np.ndarray) -> np.ndarray:
    """Each pixel's chroma minus the image's median chroma (the dominant background colour, as
    a sky or a floor): float (H, W, 2) of (Cb, Cr) differences, in grey levels."""
    chroma = ycc[..., 1:]
    return chroma - np.median(chroma.reshape(-1, 2), axis=0)


def _same_hue_pixels(contrast: np.ndarray, site: np.ndarray, max_turn: float = 40.0) -> np.ndarray:
    """The pixels of `site` (bool (H, W)) that share the site's dominant colour: bool (H, W).

    `contrast` (H, W, 2) is `_chroma_contrast`. The dominant colour is the sum of the contrast
    vectors over the site; a pixel is kept if its contrast vector points within `max_turn`
    degrees of it and is at least half as long as the site's 75th percentile, and it lies in
    the largest such connected piece."""
    if not site.any():
        return site
    length = np.hypot(contrast[..., 0], contrast[..., 1])
    dominant = contrast[site].sum(0)
    cos_turn = contrast @ dominant / ((np.hypot(*dominant) + 1e-9) * (length + 1e-9))
    part = site & (cos_turn > np.cos(np.deg2rad(max_turn)))
    part &= length >= 0.5 * np.percentile(length[site], 75)
    labels, n = ndimage.label(part)
    if n == 0:
        return part
    return labels == 1 + int(np.argmax(ndimage.sum(part, labels, range(1, n + 1))))


def _recoloured_part(g, rng, zone):
    """A distinctly coloured, detailed part in the wrong colour: its chroma (Cb, Cr) turned by
    110-180 degrees either way and scaled by 1.1-1.6, its luma kept; feathered over 0.7 px.
    The site is the one whose colour stands out most from the image's dominant colour, weighted
    by nearby edge strength (a plain background is no part); only its pixels of the site's own
    colour change."""
    ycc = _to_ycc(g)
    contrast = _chroma_contrast(ycc)
    detail = ndimage.gaussian_filter(_edge_strength(g), 3.0)
    salience = np.hypot(contrast[..., 0], contrast[..., 1]) * detail * zone
    region = _same_hue_pixels(contrast, _most_salient_site(g, rng, (0.015, 0.05), 0.25, salience))
    turn = np.deg2rad(rng.choice([-1, 1]) * rng.uniform(110, 180))
    gain = rng.uniform(1.1, 1.6)
    cb, cr = ycc[..., 1].copy(), ycc[..., 2].copy()
    ycc[..., 1] = gain * (np.cos(turn) * cb - np.sin(turn) * cr)
    ycc[..., 2] = gain * (np.sin(turn) * cb + np.cos(turn) * cr)
    alpha = _soft(region, 0.7)
    return g + alpha[..., None] * (_from_ycc(ycc) - g), alpha > 1e-3


_MODELS = {"thin_scratch": _thin_scratch, "crack": _crack, "stain": _stain,
           "missing_material": _missing_material, "extra_material": _extra_material,
           "blur": _blur, "colour_shift": _colour_shift}
_LOGICAL_MODELS = {"displaced_part": _displaced_part, "absent_part": _absent_part,
                   "recoloured_part": _recoloured_part}


def _apply(good: np.ndarray, out: np.ndarray, support: np.ndarray):
    """Round `out` to uint8 and keep it only where it differs from `good` inside `support`."""
    new = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    mask = support & (np.abs(new.astype(np.int16) - good).max(-1) >= 1)
    img = good.copy()
    img[mask] = new[mask]
    return img, mask


def _acceptable(mask: np.ndarray, kind: str, border: bool) -> bool:
    """Whether `mask` meets the area bounds of `kind` and touches the frame iff `border`."""
    n, total = int(mask.sum()), mask.size
    low = MIN_PIXELS if kind in LINE_KINDS else max(MIN_PIXELS, MIN_AREA * total)
    frame = mask.copy()
    frame[FRAME:-FRAME, FRAME:-FRAME] = False
    return low <= n <= MAX_AREA * total and bool(frame.any()) == border


def make_defect(good: np.ndarray, kind: str, rng: np.random.Generator,
                category: str | None = None):
    """A defect of `kind` on `good` (uint8 (H, W, 3), square): (image uint8 (H, W, 3), mask bool
    (H, W)). Pixels outside the mask equal `good`; each mask pixel differs by >= 1 in a channel.
    `border` picks one of the `BASE_KINDS` at random and places it on an image edge. The
    `LOGICAL_KINDS` are meant for the fixed-camera objects (see `kinds_for`); given the image's
    `category`, they pick their parts in its part zone (else anywhere)."""
    if kind not in ALL_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {ALL_KINDS}")
    g, border = good.astype(np.float32), kind == "border"
    zone = _part_zone(category, good.shape[0]) if kind in LOGICAL_KINDS else None
    for _ in range(MAX_TRIES):
        sub = BASE_KINDS[int(rng.integers(len(BASE_KINDS)))] if border else kind
        model = _LOGICAL_MODELS[sub](g, rng, zone) if zone is not None else _MODELS[sub](g, rng, border)
        img, mask = _apply(good, *model)
        if _acceptable(mask, sub, border):
            return img, mask
    raise RuntimeError(f"no acceptable {kind} defect in {MAX_TRIES} draws")


# ---------------------------------------------------------------- dataset writer
def _rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    """The generator of one image: independent of how many other images are drawn."""
    return seeded_rng(seed, category, split, index)


def _save(path: Path, arr: np.ndarray) -> None:
    """Write `arr` (uint8 (H, W, 3) or (H, W)) as a PNG, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")


def _write_category(root: Path, cat: str, n_train: int, n_good: int, n_defect: int,
                    size: int, seed: int) -> dict:
    """Write one category in MVTec-AD layout under `root`; returns {split folder: image count}."""
    for split, n in (("train/good", n_train), ("test/good", n_good)):
        for i in range(n):
            _save(root / split / f"{i:03d}.png", render_good(cat, _rng(seed, cat, split, i), size))
    counts, kinds = {"train/good": n_train, "test/good": n_good}, kinds_for(cat)
    for i in range(n_defect):
        kind, j = kinds[i % len(kinds)], i // len(kinds)
        rng = _rng(seed, cat, "test/defect", i)
        img, mask = make_defect(render_good(cat, rng, size), kind, rng, category=cat)
        _save(root / "test" / kind / f"{j:03d}.png", img)
        _save(root / "ground_truth" / kind / f"{j:03d}_mask.png", mask.astype(np.uint8) * 255)
        counts[f"test/{kind}"] = counts.get(f"test/{kind}", 0) + 1
    return counts


def generate(out: Path, *, categories=CATEGORIES, n_train: int = 80, n_test_good: int = 20,
             n_test_defect: int = 40, size: int = 256, seed: int = 0,
             overwrite: bool = False) -> dict:
    """Write an MVTec-AD-layout dataset to `out` and return its summary (also in
    `out/suite-data.json`). Defect kinds go round-robin over `kinds_for(category)`; images are
    `size` px square. Written in a sibling temporary folder and renamed onto `out`; refuses a
    non-empty `out` unless `overwrite`."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True)")
    if set(categories) - set(CATEGORIES):
        raise ValueError(f"unknown categories {sorted(set(categories) - set(CATEGORIES))}")
    with atomic_directory(out, overwrite=True) as tmp:
        counts = {cat: _write_category(tmp / cat, cat, n_train, n_test_good, n_test_defect, size, seed)
                  for cat in categories}
        summary = {"generator": GENERATOR, "seed": seed, "size": size,
                   "categories": list(categories), "defect_kinds": list(DEFECT_KINDS),
                   "class_kinds": {cat: CLASS_KIND[cat] for cat in categories},
                   "kinds_by_category": {cat: list(kinds_for(cat)) for cat in categories},
                   "counts": counts}
        write_json_atomic(tmp / "suite-data.json", summary)
    return summary


# ---------------------------------------------------------------- repeated defects
def repeat_copies(image: np.ndarray, mask: np.ndarray, n: int, rng: np.random.Generator):
    """`n` copies of one defect image (uint8 (H, W, 3)) and its mask (bool (H, W)), each rotated
    by U(-3, 3) degrees and moved by U(-3 %, 3 %) of the side along each axis: list of
    (image uint8 (H, W, 3), mask bool (H, W)); the image is reflect-padded, the mask zero-padded
    and resampled nearest. A draw that empties the mask or leaves the image unchanged is redrawn."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise ValueError("the defect mask is empty")
    copies = []
    for _ in range(100 * max(n, 1)):
        if len(copies) == n:
            break
        angle, shift = rng.uniform(-3, 3), rng.uniform(-0.03, 0.03, 2) * np.array(mask.shape)
        img = np.clip(np.rint(_affine(image, angle, shift)), 0, 255).astype(np.uint8)
        moved = _affine(mask, angle, shift, order=0, mode="constant") > 0.5
        if moved.any() and not np.array_equal(img, image):
            copies.append((img, moved))
    if len(copies) < n:
        raise RuntimeError("could not keep the defect inside the image")
    return copies


def write_repeats(root: Path, copies: int = 2, seed: int = 0) -> dict:
    """For every `<cat>/test/<defect>/NNN.png` under `root` (not `good`), write `copies`
    transformed copies to `<cat>/repeats/<defect>/NNN_r{j}.png` with masks in
    `<cat>/repeats_gt/<defect>/NNN_r{j}_mask.png`; returns {copy path: original path}, both
    relative to `root` (POSIX)."""
    root, mapping = Path(root), {}
    for test in sorted(p for p in root.glob("*/test") if p.is_dir()):
        cat = test.parent
        for folder in sorted(p for p in test.iterdir() if p.is_dir() and p.name != "good"):
            for src in sorted(folder.glob("*.png")):
                image = np.asarray(Image.open(src).convert("RGB"))
                mask_path = cat / "ground_truth" / folder.name / f"{src.stem}_mask.png"
                mask = np.asarray(Image.open(mask_path).convert("L")) > 0
                rng = _rng(seed, cat.name, f"repeats/{folder.name}", stable_id(src.stem))
                for j, (img, m) in enumerate(repeat_copies(image, mask, copies, rng), start=1):
                    dst = cat / "repeats" / folder.name / f"{src.stem}_r{j}.png"
                    _save(dst, img)
                    _save(cat / "repeats_gt" / folder.name / f"{src.stem}_r{j}_mask.png",
                          m.astype(np.uint8) * 255)
                    mapping[dst.relative_to(root).as_posix()] = src.relative_to(root).as_posix()
    return mapping
