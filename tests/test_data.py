import io
import json

import numpy as np
import pytest
from PIL import Image

from medsclean.workdir.data import discover, image_id
from medsclean.errors import DataError, UsageError
from medsclean.workdir.images import Preprocess, decode_image, normalise, read_mask, resize_crop

from .helpers import crops, make_mvtec, save_png, texture


@pytest.fixture()
def odd_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    a, b, c = crops(texture("grass"), 3, 48, rng)
    save_png(root / "plain.png", a)
    save_png(root / "sub dir" / "naïve ünïcode.PNG", b)
    Image.fromarray(c).convert("RGBA").save(root / "sub dir" / "rgba.png")
    Image.fromarray(c).convert("P").save(root / "palette.png")
    Image.fromarray((a[..., 0].astype(np.uint16) * 257)).save(root / "deep16.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"")
    return root


def test_folder_discovery_sorted_recursive_case_insensitive(odd_folder):
    ds = discover(odd_folder)
    rels = [r.rel_path for r in ds.records]
    assert rels == sorted(rels)
    assert set(rels) == {"plain.png", "sub dir/naïve ünïcode.PNG", "sub dir/rgba.png", "palette.png",
                         "deep16.png", "corrupt.png"}
    assert ds.layout == "folder"
    by_rel = {r.rel_path: r for r in ds.records}
    assert by_rel["sub dir/rgba.png"].cls == "sub dir"
    assert by_rel["plain.png"].cls == "imgs"
    assert by_rel["plain.png"].id == image_id("plain.png") == discover(odd_folder).records[rels.index("plain.png")].id
    assert all(r.label is None for r in ds.records)


def test_class_from_options(odd_folder):
    assert {r.cls for r in discover(odd_folder, class_from="none").records} == {"imgs"}
    with pytest.raises(UsageError):
        discover(odd_folder, class_from="grandparent")


def test_decode_odd_modes(odd_folder):
    for name in ("sub dir/rgba.png", "palette.png", "deep16.png", "sub dir/naïve ünïcode.PNG"):
        img = decode_image(odd_folder / name)
        assert img.mode == "RGB" and img.size == (48, 48)
    deep = np.asarray(decode_image(odd_folder / "deep16.png"))[..., 0]
    src = np.asarray(Image.open(odd_folder / "plain.png"))[..., 0]
    assert np.abs(deep.astype(int) - src.astype(int)).max() <= 1  # 16-bit scaled back to 8-bit
    with pytest.raises(DataError, match="corrupt.png"):
        decode_image(odd_folder / "corrupt.png")


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    (tmp_path / "rot.jpg").write_bytes(buf.getvalue())
    out = np.asarray(decode_image(tmp_path / "rot.jpg"))
    assert out.shape == (40, 20, 3)
    assert out[:15].mean() > 200 and out[25:].mean() < 50  # white now on top


def test_preprocess_matches_hand_computation(tmp_path):
    arr = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    spec = Preprocess(resize=16, crop=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="nearest")
    out = normalise(resize_crop(Image.fromarray(arr), spec), spec)
    expected = ((arr[4:12, 4:12].astype(np.float32) / 255.0 - 0.5) / 0.25).transpose(2, 0, 1)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_mvtec_layout_train_and_test(tmp_path):
    root = make_mvtec(tmp_path / "mv")
    train = discover(root)
    assert train.layout == "mvtec" and train.classes == ["brick", "gravel"]
    assert len(train) == 12 and all(r.label == 0 and r.mask is None for r in train.records)
    test = discover(root, split="test")
    assert len(test) == 8
    bad = [r for r in test.records if r.label == 1]
    assert len(bad) == 4 and all(r.mask is not None and r.mask.name.endswith("_mask.png") for r in bad)
    assert all(r.defect == "spot" for r in bad)
    one_cat = discover(root / "brick", split="test")
    assert one_cat.classes == ["brick"] and len(one_cat) == 4


def test_mvtec_mask_of_wrong_size_is_an_error(tmp_path):
    root = make_mvtec(tmp_path / "mv", categories=("brick",))
    save_png(root / "brick" / "ground_truth" / "spot" / "001_mask.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(DataError, match="001_mask.png.*12x10"):
        discover(root, split="test")


def test_mvtec_mask_without_image_is_an_error(tmp_path):
    root = make_mvtec(tmp_path / "mv", categories=("brick",))
    save_png(root / "brick" / "ground_truth" / "spot" / "077_mask.png", np.zeros((64, 64), np.uint8))
    with pytest.raises(DataError, match="077_mask.png: mask without an image"):
        discover(root, split="test")


def test_noisy_manifest_labels_train_images(tmp_path):
    root = make_mvtec(tmp_path / "mv", categories=("brick",))
    src = root / "brick" / "test" / "spot" / "000.png"
    (root / "brick" / "train" / "good" / "x1.png").write_bytes(src.read_bytes())
    manifest = {"format": "medsclean-noisy/1", "injected": [
        {"class": "brick", "train_path": "brick/train/good/x1.png", "origin": "brick/test/spot/000.png",
         "mask": "brick/ground_truth/spot/000_mask.png", "defect": "spot"}]}
    (root / "medsclean-noisy.json").write_text(json.dumps(manifest))
    train = discover(root)
    labelled = {r.rel_path: r for r in train.records}
    assert labelled["brick/train/good/x1.png"].label == 1
    assert labelled["brick/train/good/x1.png"].mask.name == "000_mask.png"
    assert sum(r.label for r in train.records) == 1


def test_folder_with_masks_paired_by_stem(tmp_path):
    rng = np.random.default_rng(1)
    imgs, masks = tmp_path / "imgs", tmp_path / "masks"
    for i, im in enumerate(crops(texture("gravel"), 3, 32, rng)):
        save_png(imgs / f"im {i}.png", im)
    m = np.zeros((32, 32), np.uint8)
    m[3:9, 3:9] = 255
    save_png(masks / "im 0_mask.png", m)
    save_png(masks / "im 1.png", np.zeros((32, 32), np.uint8))  # an empty mask: a normal image
    ds = discover(imgs, masks=masks)
    labels = {r.rel_path: (r.label, r.mask is not None) for r in ds.records}
    assert labels == {"im 0.png": (1, True), "im 1.png": (0, False), "im 2.png": (0, False)}
    np.testing.assert_array_equal(read_mask(masks / "im 0_mask.png") > 0.5, m > 0)
    save_png(masks / "ghost.png", m)
    with pytest.raises(DataError, match="ghost.png: mask without an image"):
        discover(imgs, masks=masks)


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        discover(tmp_path / "empty")


def test_mask_extensions_are_the_image_extensions():
    from medsclean.workdir.data import MASK_EXTENSIONS
    from medsclean.workdir.images import IMAGE_EXTENSIONS

    assert sorted(MASK_EXTENSIONS) == sorted(IMAGE_EXTENSIONS)


def test_mask_lookup_mirrors_the_image_path_in_any_image_format(tmp_path):
    from medsclean.workdir.data import find_mask

    cat = tmp_path / "pcb"
    m = np.zeros((8, 8), np.uint8)
    nested = save_png(cat / "test" / "bad" / "lot 1" / "a.png", m)
    save_png(cat / "ground_truth" / "bad" / "a_mask.png", m)  # the flat folder is not the image's
    save_png(cat / "ground_truth" / "bad" / "lot 1" / "a_mask.png", m)
    upper = save_png(cat / "test" / "bad" / "b.png", m)
    Image.fromarray(m).save(cat / "ground_truth" / "bad" / "b.JPEG", format="JPEG")
    missing = save_png(cat / "test" / "bad" / "c.png", m)
    assert find_mask(cat, nested) == cat / "ground_truth" / "bad" / "lot 1" / "a_mask.png"
    assert find_mask(cat, upper) == cat / "ground_truth" / "bad" / "b.JPEG"
    assert find_mask(cat, missing) is None


def test_noisy_manifest_of_another_format_is_an_error(tmp_path):
    root = make_mvtec(tmp_path / "mv", categories=("brick",))
    (root / "medsclean-noisy.json").write_text(json.dumps({"format": "other/9", "injected": []}))
    with pytest.raises(DataError, match="other/9"):
        discover(root)
    assert len(discover(root, split="test")) == 4  # the manifest only labels training images
