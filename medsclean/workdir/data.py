"""Finding the images of a dataset: plain folders, the MVTec AD layout, and folders with masks.

Every image gets a stable id (derived from its path relative to the root), a class, and where
known a label (0 normal, 1 anomalous) and a mask path. Discovery only reads file headers; pixels
are decoded later, in the stage that needs them.

This module owns the layout rules that every other module follows: what counts as an image file,
how folders are listed, which folders are MVTec categories, where an image's mask lies, and the
name, format and reading of the contamination manifest that `medsclean make-noisy` writes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from medsclean.choices import ClassFrom, Layout, Split
from medsclean.errors import ConfigError, DataError
from medsclean.workdir.images import IMAGE_EXTENSIONS
from medsclean.workdir.atomic import write_json_atomic

LAYOUTS = Layout.values()
SPLITS = Split.values()
CLASS_FROM = ClassFrom.values()
NOISY_MANIFEST = "medsclean-noisy.json"
NOISY_FORMAT = "medsclean-noisy/1"
MASK_SUFFIX = "_mask"
# IMAGE_EXTENSIONS in the order a mask is looked for when several files fit: lossless first.
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset.

    Attributes:
        id: 12 hex characters of the SHA-1 of `rel_path`; stable across runs and machines.
        rel_path: POSIX path relative to the dataset root.
        path: absolute path of the file.
        cls: class (product category) the image belongs to.
        label: 0 normal, 1 anomalous, None unknown.
        mask: ground-truth mask file, where one exists.
        defect: defect type (MVTec folder name), where known.
    """

    id: str
    rel_path: str
    path: Path
    cls: str
    label: int | None = None
    mask: Path | None = None
    defect: str | None = None

    def stat_row(self) -> dict:
        """The row of the manifest image table: identity, size and mtime for staleness checks."""
        st = self.path.stat()
        return {"id": self.id, "path": self.rel_path, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "class": self.cls, "label": self.label}


@dataclass(frozen=True)
class Dataset:
    """The images of one split of a dataset root, in stable sorted order."""

    root: Path
    layout: str
    split: str
    records: tuple[ImageRecord, ...]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def classes(self) -> list[str]:
        return sorted({r.cls for r in self.records})

    def table(self) -> list[dict]:
        return [r.stat_row() for r in self.records]


def image_id(rel_path: str) -> str:
    return hashlib.sha1(rel_path.encode("utf-8")).hexdigest()[:12]


def is_image_file(name: str) -> bool:
    """Whether a file name is a visible image: not hidden, and with an extension of IMAGE_EXTENSIONS (any case)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: Path) -> list[Path]:
    """All image files under `folder`, recursively, hidden entries skipped, sorted by relative path.

    Symbolic links are followed; a missing folder has no images.
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if is_image_file(f))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def discover(root: Path, *, layout: str = "auto", split: str = "train", masks: Path | None = None,
             class_from: str = "top") -> Dataset:
    """Find the images of `root`.

    Args:
        root: the image folder or dataset root.
        layout: "folder" (any tree of images), "mvtec" (`<cat>/train/good`, `<cat>/test/<defect>`,
            `<cat>/ground_truth/<defect>/<stem>_mask.png`, one or several categories), or "auto".
        split: for the MVTec layout, which split to read.
        masks: a folder of masks paired with the images by file stem (`x.png` ↔ `x.png` or
            `x_mask.png`); images with a non-empty mask are labelled anomalous, the rest normal.
        class_from: for plain folders, "top" (first folder under root), "parent" (the image's
            own folder), or "none" (one class named after the root).

    Raises:
        DataError: the root is missing or empty, or masks do not fit their images.
        UsageError: an option value is unknown.
    """
    root = Path(root).expanduser().resolve()
    _check_choice("layout", layout, LAYOUTS)
    _check_choice("split", split, SPLITS)
    _check_choice("class_from", class_from, CLASS_FROM)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; pass the folder that holds your images")
    if layout == "auto":
        layout = "mvtec" if mvtec_categories(root) and masks is None else "folder"
    if layout == "mvtec":
        records = _discover_mvtec(root, split)
    else:
        records = _discover_folder(root, class_from)
        if masks is not None:
            records = _attach_masks(records, Path(masks).expanduser().resolve())
    if not records:
        where = f"{root} ({layout} layout, {split} split)" if layout == "mvtec" else str(root)
        raise DataError(f"{where}: no images found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return Dataset(root=root, layout=layout, split=split, records=tuple(records))


def _check_choice(option: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(option, f"{option} must be one of {', '.join(choices)}, not {value!r}")


def _discover_folder(root: Path, class_from: str) -> list[ImageRecord]:
    records = []
    for path in list_images(root):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if class_from == "none" or len(parts) == 1:
            cls = root.name
        elif class_from == "top":
            cls = parts[0]
        else:
            cls = "/".join(parts[:-1])
        records.append(ImageRecord(id=image_id(rel), rel_path=rel, path=path, cls=cls))
    return records


def _is_category(folder: Path) -> bool:
    return (folder / "train").is_dir() or (folder / "test").is_dir()


def mvtec_categories(root: Path) -> list[Path]:
    """Category folders of an MVTec-layout root: visible folders holding `train/` or `test/`, sorted.

    A root that is itself one category (has `train/` or `test/`) is returned alone; a missing root
    has none.
    """
    if _is_category(root):
        return [root]
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _is_category(d))


def find_mask(category: Path, image: Path, split: str = "test") -> Path | None:
    """The mask of an image of `<category>/<split>/`, or None when it has none.

    The mask mirrors the image's path under `<category>/ground_truth/`: for `<split>/<defect>/<stem>.*`
    it is `ground_truth/<defect>/<stem>_mask.*` (MVTec AD) or else `ground_truth/<defect>/<stem>.*`
    (VisA converted to the MVTec layout), with an extension of MASK_EXTENSIONS in lower or upper case.
    """
    rel = image.relative_to(category / split)
    folder = category / "ground_truth" / rel.parent
    extensions = MASK_EXTENSIONS + tuple(e.upper() for e in MASK_EXTENSIONS)
    for name in (f"{image.stem}{MASK_SUFFIX}", image.stem):
        for ext in extensions:
            candidate = folder / f"{name}{ext}"
            if candidate.is_file():
                return candidate
    return None


def mask_image_stem(mask: Path) -> str:
    """The stem of the image a mask belongs to: the mask's stem without a trailing `_mask`."""
    return mask.stem.removesuffix(MASK_SUFFIX)


def _discover_mvtec(root: Path, split: str) -> list[ImageRecord]:
    injected = _noisy_injections(root) if split == "train" else {}
    records: list[ImageRecord] = []
    for cat in mvtec_categories(root):
        split_dir = cat / split
        if not split_dir.is_dir():
            continue
        gt_dir = cat / "ground_truth"
        used_masks: set[Path] = set()
        for path in list_images(split_dir):
            rel = path.relative_to(root).as_posix()
            defect = path.relative_to(split_dir).parts[0] if path.parent != split_dir else "good"
            label, mask = (0, None) if defect == "good" else (1, find_mask(cat, path, split))
            if rel in injected:
                label, mask, defect = 1, injected[rel]["mask"], injected[rel]["defect"]
            if mask is not None:
                _check_mask_size(path, mask)
                used_masks.add(mask.resolve())
            records.append(ImageRecord(id=image_id(rel), rel_path=rel, path=path, cls=cat.name,
                                       label=label, mask=mask, defect=defect))
        if split == "test" and gt_dir.is_dir():
            orphans = [m for m in list_images(gt_dir) if m.resolve() not in used_masks]
            orphans = [m for m in orphans if not _has_test_image(cat, m, gt_dir)]
            if orphans:
                raise DataError(f"{orphans[0]}: mask without an image ({len(orphans)} such masks in {gt_dir}); "
                                f"remove it or add its image under {cat / 'test'}")
    return records


def _has_test_image(cat: Path, mask: Path, gt_dir: Path) -> bool:
    rel = mask.relative_to(gt_dir)
    stem = mask_image_stem(mask)
    folder = cat / "test" / rel.parent
    return folder.is_dir() and any(p.stem == stem for p in folder.iterdir() if is_image_file(p.name))


def write_noisy_manifest(folder: Path, manifest: dict) -> Path:
    """Write a contamination manifest (a dict with `"format": NOISY_FORMAT`) into `folder`."""
    path = Path(folder) / NOISY_MANIFEST
    write_json_atomic(path, manifest)
    return path


def read_noisy_manifest(root: Path) -> dict | None:
    """The contamination manifest of a tree written by `make-noisy`, or None if it has none.

    Raises:
        DataError: the manifest exists but is unreadable or of another format.
    """
    path = Path(root) / NOISY_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable contamination manifest ({exc}); recreate it with "
                        f"`medsclean make-noisy`") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != NOISY_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: format {found!r} is not {NOISY_FORMAT!r}; recreate it with "
                        f"`medsclean make-noisy`")
    return manifest


def _noisy_injections(root: Path) -> dict[str, dict]:
    """Train images injected by `medsclean make-noisy`, keyed by path relative to root."""
    manifest = read_noisy_manifest(root) or {}
    out = {}
    for item in manifest.get("injected", []):
        mask = root / item["mask"] if item.get("mask") else None
        out[item["train_path"]] = {"mask": mask, "defect": item.get("defect")}
    return out


def _attach_masks(records: list[ImageRecord], masks_dir: Path) -> list[ImageRecord]:
    if not masks_dir.is_dir():
        raise DataError(f"{masks_dir}: no such masks folder; pass --masks DIR with masks named like their images")
    by_stem: dict[str, Path] = {}
    for m in list_images(masks_dir):
        stem = mask_image_stem(m)
        if stem in by_stem:
            raise DataError(f"{m}: two masks for the image stem {stem!r} ({by_stem[stem].name}); keep one")
        by_stem[stem] = m
    image_stems = {r.path.stem for r in records}
    orphans = sorted(set(by_stem) - image_stems)
    if orphans:
        raise DataError(f"{by_stem[orphans[0]]}: mask without an image ({len(orphans)} such masks); "
                        f"remove it or add the image named {orphans[0]}.*")
    out = []
    for r in records:
        mask = by_stem.get(r.path.stem)
        label = 0
        if mask is not None:
            _check_mask_size(r.path, mask)
            label = int(_mask_has_defect(mask))
        out.append(ImageRecord(id=r.id, rel_path=r.rel_path, path=r.path, cls=r.cls, label=label,
                               mask=mask if label else None))
    return out


def _header_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError):
        return None


def _check_mask_size(image: Path, mask: Path) -> None:
    isize, msize = _header_size(image), _header_size(mask)
    if msize is None:
        raise DataError(f"{mask}: cannot read this mask; replace it with a PNG of the image's size")
    if isize is not None and isize != msize:
        raise DataError(f"{mask}: mask is {msize[0]}x{msize[1]} but its image {image.name} is "
                        f"{isize[0]}x{isize[1]}; masks must have their image's size")


def _mask_has_defect(mask: Path) -> bool:
    with Image.open(mask) as m:
        return m.getbbox() is not None if m.mode in ("L", "1", "P") else m.convert("L").getbbox() is not None

