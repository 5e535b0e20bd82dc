"""The export tree (`medsclean.workdir.export`): its layout, the lists relative to it, how each file is
placed (hard link, copy, symbolic link, and the copy where linking fails), and the folder it never
writes. Every expected path here is written out by hand from the files the test makes."""

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from medsclean.errors import ConfigError
from medsclean.workdir import export
from medsclean.workdir.export import export_tree, link_mode, placed

# (path in the image folder, class, kept) -> the path the export gives it, by hand
IMAGES = [
    ("brick/000.png", "brick", True, "brick/train/good/000.png"),
    ("brick/001.png", "brick", False, "_rejected/brick/001.png"),
    ("brick/002.png", "brick", True, "brick/train/good/002.png"),
    ("gravel/sub/000.png", "gravel/sub", True, "gravel__sub/train/good/000.png"),
    ("gravel/sub/001.png", "gravel/sub", False, "_rejected/gravel__sub/001.png"),
    ("grass/train/good/a/000.png", "grass", True, "grass/train/good/a__000.png"),
]


def _images(root: Path, items=IMAGES) -> tuple[list[dict], list[bool]]:
    rng = np.random.default_rng(0)
    for path, *_ in items:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(rng.bytes(64))  # the export never decodes: any bytes do
    return [{"path": p, "class": c} for p, c, *_ in items], [k for _, _, k, _ in items]


def _files(tree: Path) -> set[str]:
    return {p.relative_to(tree).as_posix() for p in tree.rglob("*") if not p.is_dir()}


def _snapshot(root: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_tree_holds_kept_images_under_train_good_and_rejected_ones_outside_the_class_folders(tmp_path):
    rows, keep = _images(tmp_path / "images")
    before = _snapshot(tmp_path / "images")
    manifest = export_tree(tmp_path / "out", tmp_path / "images", rows, keep, run="abc")
    tree = tmp_path / "out"
    expected = {t for *_, t in IMAGES}
    assert _files(tree) == expected | {"clean.txt", "rejected.txt", "medsclean-export.json"}
    for cls in ("brick", "gravel__sub", "grass"):  # nothing but train/good in a class folder
        assert [p.name for p in (tree / cls).iterdir()] == ["train"] and os.listdir(tree / cls / "train") == ["good"]
    assert (tree / "clean.txt").read_text().splitlines() == [t for _, _, k, t in IMAGES if k]
    assert (tree / "rejected.txt").read_text().splitlines() == [t for _, _, k, t in IMAGES if not k]
    assert manifest == json.loads((tree / "medsclean-export.json").read_text())
    assert manifest["run"] == "abc" and manifest["kept"] == 4 and manifest["rejected"] == 2
    assert manifest["classes"] == {"brick": {"kept": 2, "rejected": 1}, "gravel/sub": {"kept": 1, "rejected": 1},
                                   "grass": {"kept": 1, "rejected": 0}}
    assert manifest["link"] == "hardlink" and manifest["links"] == {"hardlink": 6} and placed(manifest) == "hard links"
    assert manifest["rejected_dir"] == "_rejected"
    assert [(i["path"], i["source"], i["kept"]) for i in manifest["images"]] == [
        (t, str((tmp_path / "images" / p).resolve()), k) for p, _, k, t in IMAGES]
    for path, _, _, target in IMAGES:  # hard links: the very file, not a copy
        assert os.path.samefile(tree / target, tmp_path / "images" / path) and not (tree / target).is_symlink()
    assert _snapshot(tmp_path / "images") == before  # the image folder is never written

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    tree.rename(moved)  # the lists are relative to the tree: they still name its files
    for line in (moved / "clean.txt").read_text().splitlines() + (moved / "rejected.txt").read_text().splitlines():
        assert (moved / line).is_file()


def test_copy_and_symlink_modes(tmp_path):
    rows, keep = _images(tmp_path / "images")
    copies = export_tree(tmp_path / "copies", tmp_path / "images", rows, keep, link="copy", run="k")
    links = export_tree(tmp_path / "links", tmp_path / "images", rows, keep, link="symlink", run="k")
    assert copies["links"] == {"copy": 6} and links["links"] == {"symlink": 6}
    assert placed(copies) == "copies" and placed(links) == "symbolic links"
    for path, _, _, target in IMAGES:
        source = tmp_path / "images" / path
        copy = tmp_path / "copies" / target
        assert not copy.is_symlink() and not os.path.samefile(copy, source)
        assert copy.read_bytes() == source.read_bytes()
        link = tmp_path / "links" / target
        assert link.is_symlink() and os.readlink(link) == str(source.resolve())


def test_a_symlinked_source_is_hard_linked_to_the_file_it_names(tmp_path):
    rows, keep = _images(tmp_path / "originals")
    for path, *_ in IMAGES:  # an image folder of symbolic links, as make-noisy writes
        (tmp_path / "images" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / path).symlink_to(tmp_path / "originals" / path)
    export_tree(tmp_path / "out", tmp_path / "images", rows, keep, run="k")
    for path, _, _, target in IMAGES:
        out = tmp_path / "out" / target
        assert not out.is_symlink() and os.path.samefile(out, tmp_path / "originals" / path)


def test_hardlink_falls_back_to_a_copy_per_file_where_linking_fails(tmp_path, monkeypatch):
    rows, keep = _images(tmp_path / "images")
    real_link = os.link

    def refuse_one(source, target, *args, **kwargs):
        if str(source).endswith("brick/001.png"):
            raise OSError(errno.EPERM, "Operation not permitted")  # e.g. fs.protected_hardlinks
        return real_link(source, target, *args, **kwargs)

    monkeypatch.setattr(export.os, "link", refuse_one)
    manifest = export_tree(tmp_path / "out", tmp_path / "images", rows, keep, run="k")
    assert manifest["links"] == {"hardlink": 5, "copy": 1} and placed(manifest) == "5 hard links and 1 copy"
    by_path = {i["path"]: i["link"] for i in manifest["images"]}
    assert by_path["_rejected/brick/001.png"] == "copy" and list(by_path.values()).count("hardlink") == 5
    copied = tmp_path / "out" / "_rejected/brick/001.png"
    assert not os.path.samefile(copied, tmp_path / "images/brick/001.png")
    assert copied.read_bytes() == (tmp_path / "images/brick/001.png").read_bytes()


def test_hardlink_copies_across_devices(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another device than the test's temporary folder")
    images = Path(tempfile.mkdtemp(dir=shm))
    try:
        rows, keep = _images(images)
        manifest = export_tree(tmp_path / "out", images, rows, keep, run="k")
    finally:
        shutil.rmtree(images)
    assert manifest["links"] == {"copy": 6} and all(i["link"] == "copy" for i in manifest["images"])
    assert _files(tmp_path / "out") >= {t for *_, t in IMAGES}


def test_a_class_named_rejected_keeps_its_folder_and_the_rejected_images_move_aside(tmp_path):
    items = [("_rejected/000.png", "_rejected", True, "_rejected/train/good/000.png"),
             ("_rejected/001.png", "_rejected", False, "_rejected__/_rejected/001.png"),
             ("_rejected_/000.png", "_rejected_", False, "_rejected__/_rejected_/000.png"),
             ("brick/000.png", "brick", False, "_rejected__/brick/000.png")]
    rows, keep = _images(tmp_path / "images", items)
    manifest = export_tree(tmp_path / "out", tmp_path / "images", rows, keep, run="k")
    assert manifest["rejected_dir"] == "_rejected__"
    assert _files(tmp_path / "out") == {t for *_, t in items} | {"clean.txt", "rejected.txt", "medsclean-export.json"}
    assert (tmp_path / "out" / "rejected.txt").read_text().splitlines() == [t for _, _, k, t in items if not k]


@pytest.mark.parametrize("items, message", [
    ([("a/b/0.png", "a/b", True, ""), ("a__b/1.png", "a__b", True, "")], "would share the folder a__b/"),
    ([("x/a/b.png", "x", True, ""), ("x/a__b.png", "x", True, "")], "would both be exported as x/train/good/a__b.png"),
])
def test_two_images_or_classes_at_one_place_are_refused_before_anything_is_written(tmp_path, items, message):
    rows, keep = _images(tmp_path / "images", items)
    with pytest.raises(ConfigError, match=message):
        export_tree(tmp_path / "out", tmp_path / "images", rows, keep, run="k")
    assert sorted(os.listdir(tmp_path)) == ["images"]


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    rows, keep = _images(tmp_path / "images")
    calls = []

    def fail_third(source, target, *args, **kwargs):
        calls.append(source)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return shutil.copyfile(source, target)

    monkeypatch.setattr(export.shutil, "copy2", fail_third)
    with pytest.raises(OSError, match="No space left"):
        export_tree(tmp_path / "out", tmp_path / "images", rows, keep, link="copy", run="k")
    assert sorted(os.listdir(tmp_path)) == ["images"]


def test_link_mode_and_the_deprecated_copy_flag():
    assert link_mode(None) == "hardlink" and link_mode("symlink") == "symlink"
    assert link_mode(None, copy=True) == "copy" and link_mode("copy", copy=True) == "copy"
    with pytest.raises(ConfigError, match="contradicts link symlink") as refused:
        link_mode("symlink", copy=True)
    assert refused.value.params == ("copy", "link")
    with pytest.raises(ConfigError, match="not one of hardlink, symlink, copy"):
        link_mode("reflink")


def test_an_export_inside_the_image_folder_is_refused(tmp_path):
    rows, keep = _images(tmp_path / "images")
    with pytest.raises(ConfigError, match="inside the image folder"):
        export_tree(tmp_path / "images" / "out", tmp_path / "images", rows, keep, run="k")
    assert not (tmp_path / "images" / "out").exists()


def test_contradictory_link_flags_are_refused_before_any_stage(tmp_path):
    """`--copy --link symlink` is a usage error found with the other path checks: no work folder appears."""
    from typer.testing import CliRunner

    from medsclean.cli import app
    from tests.helpers import make_mvtec

    data = make_mvtec(tmp_path / "data", categories=("brick",), n_train=4)
    work = tmp_path / "work"
    res = CliRunner().invoke(app, ["select", str(data), "--work", str(work), "--export", str(tmp_path / "out"),
                                   "--copy", "--link", "symlink"])
    assert res.exit_code == 2
    assert "--copy" in res.output and "--link" in res.output
    assert not work.exists() and not (tmp_path / "out").exists()
