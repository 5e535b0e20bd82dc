"""The embedded demo dataset: MVTec-AD-layout categories made from real offline images.

Good images (`medsclean.demo.good_images`) are seeded crops of photographs and textures that ship
inside scikit-image's wheel (no download). Defective images are good images with one synthetic
defect painted in (`medsclean.demo.defects`), each with an exact mask.

Randomness is derived per image from (seed, category, split, index), so an image does not change
when more images are requested, and two runs with the same seed write identical files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from medsclean.demo.defects import DEFECTS, make_defect
from medsclean.demo.good_images import DEFAULT_CATEGORIES, MIN_SIZE, SOURCES, image_rng, make_good, source
from medsclean.errors import UsageError
from medsclean.workdir.atomic import atomic_directory, write_json_atomic

SYNTH_FORMAT = "medsclean-synth/1"
SUMMARY_NAME = "medsclean-synth.json"


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
        source(c)
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
