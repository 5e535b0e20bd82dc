"""benchmarks/suite_data.py: the benchmark's own images, defects, dataset writer and repeats."""

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
import suite_data as sd  # noqa: E402

SIZE = 80


def _defect(category: str, kind: str, seed: int, size: int = SIZE):
    rng = sd._rng(seed, category, "unit", 0)
    good = sd.render_good(category, rng, size)
    img, mask = sd.make_defect(good, kind, rng)
    return good, img, mask


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("category", sd.CATEGORIES)
def test_good_images_are_rgb_views_that_vary(category):
    a = sd.render_good(category, np.random.default_rng(1), SIZE)
    b = sd.render_good(category, np.random.default_rng(2), SIZE)
    assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8
    assert a.std() > 5 and not np.array_equal(a, b)


@pytest.mark.parametrize("kind", sd.DEFECT_KINDS)
def test_defect_changes_exactly_its_mask(kind):
    total = SIZE * SIZE
    for category in sd.CATEGORIES:
        for seed in (0, 1):
            good, img, mask = _defect(category, kind, seed)
            assert img.shape == good.shape and img.dtype == np.uint8
            assert mask.shape == (SIZE, SIZE) and mask.dtype == bool
            assert np.array_equal(img[~mask], good[~mask])
            delta = np.abs(img.astype(int) - good).max(-1)
            assert (delta[mask] >= 1).all()        # only changed pixels are in the mask
            low = sd.MIN_PIXELS if kind in sd.LINE_KINDS else max(sd.MIN_PIXELS, 0.002 * total)
            assert low <= mask.sum() <= 0.06 * total, (category, seed, mask.sum())
            frame = mask.copy()
            frame[3:-3, 3:-3] = False
            assert frame.any() == (kind == "border"), (category, seed)


def test_area_bounds_at_full_size():
    for kind in ("stain", "blur", "thin_scratch"):
        _, _, mask = _defect("china", kind, 3, size=256)
        assert max(40, 0.002 * 256 * 256 if kind != "thin_scratch" else 0) <= mask.sum()
        assert mask.sum() <= 0.06 * 256 * 256


def test_same_seed_same_arrays_other_seed_other_arrays():
    for kind in ("crack", "extra_material", "border"):
        g1, i1, m1 = _defect("tissue", kind, 5)
        g2, i2, m2 = _defect("tissue", kind, 5)
        _, i3, m3 = _defect("tissue", kind, 6)
        assert np.array_equal(g1, g2) and np.array_equal(i1, i2) and np.array_equal(m1, m2)
        assert not np.array_equal(i1, i3) and not np.array_equal(m1, m3)


def test_unknown_names_are_refused(tmp_path):
    with pytest.raises(ValueError):
        sd.render_good("brick", np.random.default_rng(0), SIZE)
    with pytest.raises(ValueError):
        sd.make_defect(np.zeros((SIZE, SIZE, 3), np.uint8), "dent", np.random.default_rng(0))
    with pytest.raises(ValueError):
        sd.generate(tmp_path / "x", categories=("brick",), size=64)


def _files(root: Path) -> dict[str, bytes]:
    """The dataset's PNG files (not the repeats) by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))
            if p.relative_to(root).parts[1] in ("train", "test", "ground_truth")}


SMALL = dict(categories=("tissue", "retina"), n_train=3, n_test_good=2, n_test_defect=9, size=64)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "data"
    return out, sd.generate(out, **SMALL)


def test_generate_writes_the_mvtec_layout(small_set):
    out, summary = small_set
    assert summary["generator"] == "suite_data/1" and summary["seed"] == 0 and summary["size"] == 64
    assert json.loads((out / "suite-data.json").read_text()) == summary
    for cat in SMALL["categories"]:
        assert len(list((out / cat / "train" / "good").glob("*.png"))) == 3
        assert len(list((out / cat / "test" / "good").glob("*.png"))) == 2
        kinds = sorted(p.name for p in (out / cat / "test").iterdir() if p.name != "good")
        assert kinds == sorted(sd.DEFECT_KINDS)
        assert summary["counts"][cat]["test/thin_scratch"] == 2     # 9 images round-robin
        assert summary["counts"][cat]["test/border"] == 1
        for img_path in (out / cat / "test").glob("*/*.png"):
            assert _read(img_path).shape == (64, 64, 3)
            if img_path.parent.name == "good":
                continue
            mask = _read(out / cat / "ground_truth" / img_path.parent.name / f"{img_path.stem}_mask.png")
            assert mask.shape == (64, 64) and mask.dtype == np.uint8
            assert set(np.unique(mask)) == {0, 255}
    assert sorted(p.name for p in out.parent.iterdir()) == ["data"]    # no temporary left


def test_generate_is_reproducible_and_stable_when_growing(small_set, tmp_path):
    out, _ = small_set
    first = _files(out)
    grown = sd.generate(tmp_path / "b", **{**SMALL, "n_train": 4, "n_test_defect": 10})
    second = _files(tmp_path / "b")
    assert len(second) == len(first) + 2 * (1 + 2)                 # +1 train, +1 defect and mask
    assert all(second[k] == v for k, v in first.items())           # byte-identical
    assert grown["counts"]["tissue"]["test/crack"] == 2
    sd.generate(tmp_path / "c", **{**SMALL, "seed": 1})
    other = _files(tmp_path / "c")
    assert other.keys() == first.keys() and all(other[k] != first[k] for k in first)


def test_generate_refuses_non_empty_output_unless_overwrite(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        sd.generate(out, categories=("flower",), n_train=1, n_test_good=0, n_test_defect=1, size=64)
    assert (out / "keep.txt").exists()
    sd.generate(out, categories=("flower",), n_train=1, n_test_good=0, n_test_defect=1, size=64,
                overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "flower" / "train" / "good" / "000.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_generate_is_atomic(tmp_path, monkeypatch):
    real_save, calls = sd._save, []

    def failing_save(path, arr):
        calls.append(path)
        if len(calls) == 5:
            raise OSError("disk full")
        real_save(path, arr)

    monkeypatch.setattr(sd, "_save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        sd.generate(tmp_path / "data", categories=("china",), n_train=4, n_test_good=2,
                    n_test_defect=2, size=64)
    assert list(tmp_path.iterdir()) == []                          # neither out nor a temporary
    (tmp_path / "empty").mkdir()                                   # an empty folder is replaced
    monkeypatch.setattr(sd, "_save", real_save)
    sd.generate(tmp_path / "empty", categories=("china",), n_train=1, n_test_good=0,
                n_test_defect=0, size=64)
    assert (tmp_path / "empty" / "suite-data.json").exists()


def _best_ncc(a: np.ndarray, b: np.ndarray, reach: int) -> float:
    """The largest normalized cross-correlation of the centres of a and b over shifts <= reach px."""
    a, b = a.astype(float).mean(-1), b.astype(float).mean(-1)
    n, c = a.shape[0], a.shape[0] // 4
    core = a[c:n - c, c:n - c]
    core = (core - core.mean()) / core.std()
    best = -1.0
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            win = b[c + dy:n - c + dy, c + dx:n - c + dx]
            best = max(best, float((core * (win - win.mean()) / win.std()).mean()))
    return best


@pytest.mark.parametrize("category,kind", [("retina", "crack"), ("tissue", "stain"),
                                           ("china", "border"), ("flower", "blur")])
def test_repeat_copies_are_close_but_not_equal(category, kind):
    _, img, mask = _defect(category, kind, 2, size=96)
    copies = sd.repeat_copies(img, mask, 3, np.random.default_rng(0))
    assert len(copies) == 3
    for copy, copy_mask in copies:
        assert copy.shape == img.shape and copy.dtype == np.uint8
        assert copy_mask.shape == mask.shape and copy_mask.dtype == bool and copy_mask.any()
        assert not np.array_equal(copy, img)
        assert _best_ncc(img, copy, reach=4) > 0.8
    assert not np.array_equal(copies[0][0], copies[1][0])


def test_repeat_copies_refuse_an_empty_mask():
    img = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError):
        sd.repeat_copies(img, np.zeros((64, 64), bool), 1, np.random.default_rng(0))


def test_write_repeats(small_set):
    out, summary = small_set
    mapping = sd.write_repeats(out, copies=2, seed=0)
    n_defect = sum(n for counts in summary["counts"].values() for split, n in counts.items()
                   if split.startswith("test/") and split != "test/good")
    assert len(mapping) == 2 * n_defect
    for copy, original in mapping.items():
        cat, folder, defect, name = copy.split("/")
        assert folder == "repeats" and original == f"{cat}/test/{defect}/{name.split('_r')[0]}.png"
        assert name.endswith(("_r1.png", "_r2.png"))
        mask = _read(out / cat / "repeats_gt" / defect / name.replace(".png", "_mask.png"))
        assert _read(out / copy).shape == (64, 64, 3) and mask.shape == (64, 64) and mask.max() == 255
    assert sd.write_repeats(out, copies=2, seed=0) == mapping      # reruns rewrite the same paths


# ---------------------------------------------------------------- classes and logical defects
# SHA-256 of the arrays of the first four classes at 64 px, seed 0, recorded from the generator
# before the fixed-camera objects were added: those classes must not change.
OLD_CLASS_DIGESTS = {
    "tissue": "6c2aa3b9114e8bac21f99881c7c5f1c129449e70b2c8e8d85f6e8cab4bbf5948",
    "retina": "cb3114870381cc58ab0fefd277d308489f34ef7254ec88f83ac5da2e78d5d44d",
    "china": "5cb945b9c791d7cb8d9702e66ee5e752a2a38c68ba646bc06016bc5cfeadefc6",
    "flower": "fbd467819ccacbaf1dc618b56763186a88f4a603547514fd457d4dd1359b5ae5",
}
NEW_OBJECTS = ("motorcycle", "rocket")


def _class_digest(category: str, size: int = 64) -> str:
    """SHA-256 over train/good 0-1, test/good 0-1 and test defects 0-7 (images and packed masks)
    of `category`, drawn as `generate` draws them."""
    import hashlib

    h, kinds = hashlib.sha256(), sd.kinds_for(category)
    for split in ("train/good", "test/good"):
        for i in range(2):
            h.update(sd.render_good(category, sd._rng(0, category, split, i), size).tobytes())
    for i in range(8):
        rng = sd._rng(0, category, "test/defect", i)
        img, mask = sd.make_defect(sd.render_good(category, rng, size), kinds[i % len(kinds)], rng)
        h.update(img.tobytes())
        h.update(np.packbits(mask).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("category", sorted(OLD_CLASS_DIGESTS))
def test_old_classes_are_bit_identical(category):
    assert sd.kinds_for(category) == sd.DEFECT_KINDS
    assert _class_digest(category) == OLD_CLASS_DIGESTS[category]


def test_class_kinds_and_defect_kinds():
    assert sd.CATEGORIES[:4] == ("tissue", "retina", "china", "flower")
    assert sd.CATEGORIES[4:] == NEW_OBJECTS and set(sd.CLASS_KIND) == set(sd.CATEGORIES)
    assert [sd.CLASS_KIND[c] for c in sd.CATEGORIES] == ["texture", "object", "scene", "scene",
                                                         "object", "object"]
    for cat in NEW_OBJECTS:
        assert sd.kinds_for(cat) == sd.DEFECT_KINDS + ("displaced_part", "absent_part",
                                                       "recoloured_part")
    with pytest.raises(ValueError):
        sd.kinds_for("brick")


def _grey_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the grey levels of two images (H, W, 3)."""
    return float(np.corrcoef(a.mean(-1).ravel(), b.mean(-1).ravel())[0, 1])


def _pair_correlations(category: str, n: int = 3) -> list[float]:
    views = [sd.render_good(category, sd._rng(0, category, "train/good", i), 64) for i in range(n + 1)]
    return [_grey_correlation(views[0], v) for v in views[1:]]


def test_fixed_camera_objects_are_aligned_and_scenes_are_not():
    scene = max(_pair_correlations("china"))
    for cat in NEW_OBJECTS:
        shots = _pair_correlations(cat)
        assert min(shots) > 0.5 and min(shots) > scene + 0.3, (cat, shots, scene)
        a, b = (sd.render_good(cat, sd._rng(0, cat, "train/good", i), 64) for i in range(2))
        assert not np.array_equal(a, b)


def _object_defect(category: str, kind: str, seed: int, size: int = SIZE):
    """(good, defective image, mask) of a fixed-camera object, its parts picked in its zone."""
    rng = sd._rng(seed, category, "unit", 0)
    good = sd.render_good(category, rng, size)
    return (good, *sd.make_defect(good, kind, rng, category=category))


@pytest.mark.parametrize("kind", sd.LOGICAL_KINDS)
def test_logical_defects_change_exactly_their_mask(kind):
    total = SIZE * SIZE
    for category in NEW_OBJECTS:
        good, img, mask = _object_defect(category, kind, 0)
        again = _object_defect(category, kind, 0)
        assert all(np.array_equal(x, y) for x, y in zip((good, img, mask), again))
        assert mask.dtype == bool and mask.any()
        delta = np.abs(img.astype(int) - good).max(-1)
        assert np.array_equal(mask, delta >= 1), (category, kind)
        assert max(sd.MIN_PIXELS, 0.002 * total) <= mask.sum() <= 0.06 * total
        assert (mask & sd._part_zone(category, SIZE)).any()
        frame = mask.copy()
        frame[3:-3, 3:-3] = False
        assert not frame.any()


def test_recoloured_part_keeps_the_luma():
    good, img, mask = _object_defect("motorcycle", "recoloured_part", 1, size=96)
    luma = np.array([0.299, 0.587, 0.114])
    inner = mask & (img.max(-1) < 250) & (img.min(-1) > 5)            # not clipped
    assert np.abs(img[inner] @ luma - good[inner] @ luma).mean() < 2.0
    assert np.abs(img[inner].astype(int) - good[inner]).max() > 40     # but the colour did change


@pytest.fixture(scope="module")
def object_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite-objects") / "data"
    n = len(sd.kinds_for("rocket"))
    return out, sd.generate(out, categories=("rocket",), n_train=1, n_test_good=1,
                            n_test_defect=n, size=64)


def test_generate_writes_every_kind_of_a_fixed_camera_object(object_set):
    out, summary = object_set
    assert summary["kinds_by_category"] == {"rocket": list(sd.kinds_for("rocket"))}
    assert summary["class_kinds"] == {"rocket": "object"}
    kinds = sorted(p.name for p in (out / "rocket" / "test").iterdir() if p.name != "good")
    assert kinds == sorted(sd.kinds_for("rocket"))
    for kind in sd.LOGICAL_KINDS:
        mask = _read(out / "rocket" / "ground_truth" / kind / "000_mask.png")
        assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}


def test_write_repeats_covers_a_fixed_camera_object(object_set):
    out, _ = object_set
    mapping = sd.write_repeats(out, copies=1, seed=0)
    assert len(mapping) == len(sd.kinds_for("rocket"))
    assert {copy.split("/")[2] for copy in mapping} == set(sd.kinds_for("rocket"))
