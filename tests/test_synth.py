"""The demo dataset generator: exact masks, MVTec naming, determinism, atomic writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsclean.demo import defects, good_images, synth
from medsclean.errors import DataError, UsageError


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", defects.DEFECTS)
@pytest.mark.parametrize("category", ["gravel", "coins"])
def test_defect_changes_exactly_the_masked_pixels(kind, category):
    for seed in range(4):
        rng = np.random.default_rng(seed)
        good = good_images.make_good(category, 128, rng)
        image, mask = defects.make_defect(good, kind, rng, category=category)
        assert image.shape == good.shape and image.dtype == np.uint8
        assert mask.shape == (128, 128) and mask.dtype == bool
        changed = (image != good).any(axis=-1)
        # Outside the mask the defective image is bit-identical to its good image.
        assert not changed[~mask].any()
        # Inside the mask the defect is painted: (nearly) every pixel changes, and visibly.
        assert changed[mask].mean() > 0.9
        diff = np.abs(image.astype(int) - good.astype(int)).max(axis=-1)
        assert diff[mask].mean() > 10
        assert defects.MIN_DEFECT_AREA <= mask.mean() <= defects.MAX_DEFECT_AREA


def test_defect_area_bounds_hold_at_other_sizes():
    for size in (64, 384):
        for i, kind in enumerate(defects.DEFECTS):
            rng = np.random.default_rng(100 + i)
            good = good_images.make_good("brick", size, rng)
            _, mask = defects.make_defect(good, kind, rng, category="brick")
            assert 0.003 <= mask.mean() <= 0.05, (size, kind, mask.mean())


def test_good_images_vary_and_grey_sources_stay_grey():
    imgs = [good_images.make_good("grass", 96, good_images.image_rng(0, "grass", "train/good", i)) for i in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.abs(imgs[a].astype(int) - imgs[b].astype(int)).mean() > 5
    for img in imgs:
        assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
    coffee = good_images.make_good("coffee", 96, good_images.image_rng(0, "coffee", "train/good", 0))
    assert np.abs(coffee[..., 0].astype(int) - coffee[..., 2].astype(int)).mean() > 10


def test_objects_stay_aligned_textures_do_not():
    def correlations(category):
        imgs = [good_images.make_good(category, 96, good_images.image_rng(1, category, "train/good", i)).mean(axis=-1).ravel()
                for i in range(5)]
        return [np.corrcoef(imgs[a], imgs[b])[0, 1] for a in range(5) for b in range(a + 1, 5)]

    # Pearson correlation ignores the brightness/contrast jitter: aligned objects correlate
    # strongly pixel by pixel, independent texture crops do not.
    assert min(correlations("coins")) > 0.5 and min(correlations("coffee")) > 0.5
    assert max(abs(c) for c in correlations("gravel")) < 0.2


def test_layout_and_names_follow_mvtec(tmp_path):
    out = tmp_path / "demo"
    summary = synth.generate_dataset(out, categories=["brick", "coins"], n_train=3, n_test_good=2,
                                     n_test_defect=7, size=64, seed=5)
    expected = {"medsclean-synth.json"}
    per_defect = {"scratch": 2, "crack": 1, "foreign_patch": 1, "stain": 1, "hole": 1, "color_spot": 1}
    for cat in ("brick", "coins"):
        expected |= {f"{cat}/train/good/{i:03d}.png" for i in range(3)}
        expected |= {f"{cat}/test/good/{i:03d}.png" for i in range(2)}
        for defect, n in per_defect.items():
            expected |= {f"{cat}/test/{defect}/{i:03d}.png" for i in range(n)}
            expected |= {f"{cat}/ground_truth/{defect}/{i:03d}_mask.png" for i in range(n)}
    assert set(_tree_digest(out)) == expected
    assert summary["categories"]["brick"]["n_test_defect"] == per_defect
    assert summary["categories"]["coins"]["licence"].startswith("no known copyright")
    for path in out.rglob("*.png"):
        with Image.open(path) as img:
            assert img.size == (64, 64)
            assert img.mode == ("L" if path.name.endswith("_mask.png") else "RGB")
    assert not list(tmp_path.glob(".demo.*")), "temporary folder left behind"


def test_written_files_match_their_good_image_pixel_for_pixel(tmp_path):
    out = tmp_path / "demo"
    synth.generate_dataset(out, categories=["gravel"], n_train=1, n_test_good=1, n_test_defect=6, size=64, seed=2)
    for defect in defects.DEFECTS:
        image = np.asarray(Image.open(out / "gravel" / "test" / defect / "000.png"))
        mask = np.asarray(Image.open(out / "gravel" / "ground_truth" / defect / "000_mask.png"))
        assert set(np.unique(mask).tolist()) <= {0, 255} and mask.any()
        good, rendered, rendered_mask = synth.render_test_defect("gravel", defect, 0, size=64, seed=2)
        np.testing.assert_array_equal(image, rendered)
        np.testing.assert_array_equal(mask > 0, rendered_mask)
        np.testing.assert_array_equal(image[mask == 0], good[mask == 0])


def test_same_seed_same_bytes_and_images_do_not_depend_on_counts(tmp_path):
    kwargs = dict(categories=["grass"], n_test_good=1, n_test_defect=2, size=64, defects=["crack", "stain"])
    a = _tree_digest(_gen(tmp_path / "a", n_train=3, seed=7, **kwargs))
    b = _tree_digest(_gen(tmp_path / "b", n_train=3, seed=7, **kwargs))
    c = _tree_digest(_gen(tmp_path / "c", n_train=2, seed=7, **kwargs))
    d = _tree_digest(_gen(tmp_path / "d", n_train=3, seed=8, **kwargs))
    assert a == b
    assert all(c[k] == a[k] for k in c if k.endswith(".png"))
    differing = [k for k in a if k.endswith(".png") and a[k] != d[k]]
    assert len(differing) == len([k for k in a if k.endswith(".png")])


def _gen(out: Path, **kwargs) -> Path:
    synth.generate_dataset(out, **kwargs)
    return out


def test_refuses_non_empty_output_and_accepts_empty_folder(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="busy"):
        synth.generate_dataset(busy, categories=["brick"], n_train=1, n_test_good=0, n_test_defect=0, size=64)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    synth.generate_dataset(empty, categories=["brick"], n_train=1, n_test_good=0, n_test_defect=0, size=64)
    assert (empty / "brick" / "train" / "good" / "000.png").is_file()


@pytest.mark.parametrize("kwargs, match", [
    (dict(categories=["marble"]), "marble"),
    (dict(categories="brick"), "list"),
    (dict(defects=["dent"]), "dent"),
    (dict(n_train=-1), "n_train"),
    (dict(size=16), "size"),
    (dict(seed=-3), "seed"),
])
def test_bad_arguments_are_usage_errors(tmp_path, kwargs, match):
    with pytest.raises(UsageError, match=match):
        synth.generate_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "render_test_defect", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        synth.generate_dataset(tmp_path / "out", categories=["brick"], n_train=2, n_test_good=1,
                               n_test_defect=1, size=64)
    assert list(tmp_path.iterdir()) == []


def test_unknown_defect_kind_in_make_defect():
    good = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(UsageError, match="dent"):
        defects.make_defect(good, "dent", np.random.default_rng(0))
