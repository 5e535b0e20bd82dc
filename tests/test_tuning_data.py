"""benchmarks/tuning_data.py: the tuning part's scene and aligned-object classes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_BENCH = str(Path(__file__).resolve().parents[1] / "benchmarks")
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)
import suite_data  # noqa: E402
import tuning_data as td  # noqa: E402

SIZE = 64
ALL_CASES = [(cat, kind) for cat in td.CATEGORIES for kind in td.DEFECT_KINDS[cat]]


def _defect(category: str, kind: str, seed: int, size: int = SIZE):
    rng = td._rng(seed, category, "unit", 0)
    good = td.render_good(category, rng, size)
    image, mask = td.make_defect(good, kind, rng)
    return good, image, mask


def _views(category: str, n: int, size: int = SIZE) -> list[np.ndarray]:
    return [td.render_good(category, td._rng(0, category, "train/good", i), size) for i in range(n)]


def _grey_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the grey levels of two images (H, W, 3)."""
    return float(np.corrcoef(a.mean(-1).ravel(), b.mean(-1).ravel())[0, 1])


def test_classes_and_kinds():
    assert td.CATEGORIES == ("astronaut", "chelsea")
    assert td.CLASS_KIND == {"astronaut": "scene", "chelsea": "object"}
    assert td.DEFECT_KINDS["astronaut"] == td.STRUCTURAL_KINDS
    assert td.DEFECT_KINDS["chelsea"] == td.STRUCTURAL_KINDS + ("misplaced_part", "missing_part",
                                                               "wrong_colour")
    used_elsewhere = {"brick", "grass", "gravel", "coins", "tissue", "retina", "china", "flower",
                      "motorcycle", "rocket"}
    assert not used_elsewhere & set(td.CATEGORIES)
    assert not {f.loader for f in td.FRAMINGS.values()} & {"brick", "grass", "gravel", "coins",
                                                          "immunohistochemistry", "retina",
                                                          "stereo_motorcycle", "rocket"}


@pytest.mark.parametrize("category", td.CATEGORIES)
def test_good_images_are_deterministic_rgb_views(category):
    a, b = _views(category, 2)
    assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8 and a.std() > 5
    assert not np.array_equal(a, b)
    assert np.array_equal(a, _views(category, 1)[0])


def test_the_object_is_aligned_and_the_scene_is_not():
    scene = [_grey_correlation(v, _views("astronaut", 1)[0]) for v in _views("astronaut", 4)[1:]]
    shots = [_grey_correlation(v, _views("chelsea", 1)[0]) for v in _views("chelsea", 4)[1:]]
    assert min(shots) > 0.6 and min(shots) > max(scene) + 0.3, (shots, scene)


@pytest.mark.parametrize("category,kind", ALL_CASES)
def test_defect_changes_exactly_its_mask(category, kind):
    good, image, mask = _defect(category, kind, 0)
    again = _defect(category, kind, 0)
    assert all(np.array_equal(x, y) for x, y in zip((good, image, mask), again))
    assert image.shape == good.shape and image.dtype == np.uint8
    assert mask.shape == (SIZE, SIZE) and mask.dtype == bool and mask.any()
    changed = np.abs(image.astype(int) - good).max(-1) >= 1
    assert np.array_equal(mask, changed)
    assert mask.mean() >= td.MIN_AREA
    if kind in td.LOGICAL_KINDS:
        assert mask.mean() <= td.MAX_AREA


def test_wrong_colour_keeps_the_luma():
    good, image, mask = _defect("chelsea", "wrong_colour", 2, size=96)
    inner = mask & (image.max(-1) < 250) & (image.min(-1) > 5)          # not clipped
    luma = np.abs(image[inner] @ td.LUMA - good[inner] @ td.LUMA)
    assert luma.mean() < 1.0
    assert np.abs(image[inner].astype(int) - good[inner]).max() > 30


def test_misplaced_part_is_a_copy_of_another_place():
    good, image, mask = _defect("chelsea", "misplaced_part", 1, size=96)
    ys, xs = np.nonzero(mask)
    patch = image[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(int)
    h, w = patch.shape[:2]
    errors = [np.abs(good[y:y + h, x:x + w].astype(int) - patch)[mask[ys.min():ys.max() + 1,
                                                                      xs.min():xs.max() + 1]].mean()
              for y in range(96 - h + 1) for x in range(96 - w + 1)
              if abs(y - ys.min()) + abs(x - xs.min()) > 4]
    assert min(errors) == 0                                          # found verbatim elsewhere


def test_unknown_names_are_refused(tmp_path):
    with pytest.raises(ValueError):
        td.render_good("tissue", np.random.default_rng(0), SIZE)
    with pytest.raises(ValueError):
        td.make_defect(np.zeros((SIZE, SIZE, 3), np.uint8), "dent", np.random.default_rng(0))
    with pytest.raises(ValueError):
        td.generate(tmp_path / "x", categories=("coins",), size=SIZE)
    assert not (tmp_path / "x").exists()


SMALL = dict(n_train=2, n_test_good=1, n_test_defect=len(td.DEFECT_KINDS["chelsea"]), size=SIZE)


@pytest.fixture(scope="module")
def tuning_root(tmp_path_factory):
    """A root that already holds another class (as the demo generator leaves it), plus ours."""
    root = tmp_path_factory.mktemp("tuning") / "data"
    (root / "brick" / "train" / "good").mkdir(parents=True)
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(root / "brick" / "train" / "good" / "000.png")
    return root, td.generate(root, **SMALL)


def test_generate_writes_the_mvtec_layout_beside_other_classes(tuning_root):
    root, summary = tuning_root
    assert summary["generator"] == td.GENERATOR and summary["size"] == SIZE
    assert json.loads((root / td.SUMMARY_NAME).read_text()) == summary
    assert (root / "brick" / "train" / "good" / "000.png").exists()
    assert sorted(p.name for p in root.iterdir()) == ["astronaut", "brick", "chelsea", td.SUMMARY_NAME]
    for cat in td.CATEGORIES:
        assert summary["categories"][cat]["class_kind"] == td.CLASS_KIND[cat]
        assert len(list((root / cat / "train" / "good").glob("*.png"))) == 2
        kinds = sorted(p.name for p in (root / cat / "test").iterdir() if p.name != "good")
        assert kinds == sorted(td.DEFECT_KINDS[cat])
        for img_path in (root / cat / "test").glob("*/*.png"):
            image = np.asarray(Image.open(img_path))
            assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
            if img_path.parent.name == "good":
                continue
            mask = np.asarray(Image.open(root / cat / "ground_truth" / img_path.parent.name
                                         / f"{img_path.stem}_mask.png"))
            assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) == {0, 255}
    counts = summary["categories"]["astronaut"]["counts"]
    assert counts["test/scratch"] == 2 and counts["test/color_spot"] == 1   # 9 round-robin over 6


def test_generate_is_reproducible_and_refuses_its_own_folders(tuning_root, tmp_path):
    root, _ = tuning_root
    with pytest.raises(FileExistsError):
        td.generate(root, categories=("chelsea",), **SMALL)
    td.generate(tmp_path / "again", categories=("chelsea",), **SMALL)
    for path in sorted((root / "chelsea").rglob("*.png")):
        rel = path.relative_to(root)
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(tmp_path / "again" / rel)))
    with pytest.raises(ValueError):                        # a summary of another seed is there
        td.generate(tmp_path / "again", categories=("astronaut",), **{**SMALL, "seed": 1})
    assert not (tmp_path / "again" / "astronaut").exists()


def test_write_repeats_covers_the_new_classes(tuning_root):
    root, summary = tuning_root
    mapping = suite_data.write_repeats(root, copies=1, seed=0)
    assert len(mapping) == 2 * SMALL["n_test_defect"]
    assert {copy.split("/")[0] for copy in mapping} == set(td.CATEGORIES)
    chelsea_kinds = {copy.split("/")[2] for copy in mapping if copy.startswith("chelsea/")}
    assert chelsea_kinds == set(td.DEFECT_KINDS["chelsea"])
