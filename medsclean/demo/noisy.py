"""Contaminated training sets for benchmarks: the MeDS / SoftPatch noise-injection protocol.

From a dataset in the MVTec AD layout, `make_noisy` builds a new MVTec-layout tree whose
`<cat>/train/good/` holds the original good images plus anomalous test images injected at a given
ratio, and writes `medsclean-noisy.json`, which records which training images are injected.

Every training image (original or injected) gets a neutral name, `<12 hex>.<ext>` from a SHA-256
of its category and source path, so neither the name nor the sort order reveals the label. Files
are absolute symlinks to the source (or copies with `copy=True`); the source is never written.

The layout rules (image files, categories, masks, the manifest's name and format) are those of
`medsclean.workdir.data`; this module holds only the contamination protocol.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsclean import seeding
from medsclean.workdir.data import (MASK_SUFFIX, NOISY_FORMAT, find_mask, list_images, mvtec_categories,
                   write_noisy_manifest)
from medsclean.errors import ConfigError, DataError, UsageError
from medsclean.workdir.atomic import atomic_directory

TRAIN_MASK_DIR = "ground_truth_train"


# ---------------------------------------------------------------------------------------------
# Reading the source layout
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Anomaly:
    """An anomalous test image of the source dataset.

    Attributes:
        origin: path relative to the source root (POSIX).
        defect: defect type (its folder under `test/`).
        mask: mask path relative to the source root, or None when the image has no mask.
    """

    origin: str
    defect: str
    mask: str | None


def good_train_images(category_dir: Path) -> list[Path]:
    """The good training images of a category: every image under `train/good/`, sorted."""
    return list_images(category_dir / "train" / "good")


def category_dirs(root: Path) -> list[Path]:
    """The categories of an MVTec-layout root (`data.mvtec_categories`) that have good training images."""
    return [d for d in mvtec_categories(root) if good_train_images(d)]


def anomalous_test_images(root: Path, category_dir: Path) -> list[Anomaly]:
    """All anomalous test images of a category (every `test/` folder but `good`), sorted by path."""
    anomalies = []
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        return anomalies
    for defect_dir in sorted(d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith(".")):
        if defect_dir.name == "good":
            continue
        for path in list_images(defect_dir):
            mask = find_mask(category_dir, path)
            anomalies.append(Anomaly(origin=path.relative_to(root).as_posix(), defect=defect_dir.name,
                                     mask=mask.relative_to(root).as_posix() if mask else None))
    return anomalies


# ---------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------

def injection_count(ratio: float, n_good: int, n_available: int) -> int:
    """min(floor(ratio · n_good), n_available), with a tolerance for float round-off.

    Equal to the reference's `int(ratio * n_good)` for the protocol's ratios (0.02 … 0.4).
    """
    return min(math.floor(ratio * n_good + 1e-9), n_available)


def class_rng(seed: int, category: str) -> np.random.Generator:
    """The generator that picks a category's injected images: `seeding.rng(seed, category)`."""
    return seeding.rng(seed, category)


def select_injected(anomalies: Sequence[Anomaly], count: int, seed: int, category: str) -> list[Anomaly]:
    """`count` anomalies drawn without replacement, in source order."""
    picked = class_rng(seed, category).choice(len(anomalies), size=count, replace=False)
    return [anomalies[i] for i in sorted(picked.tolist())]


def neutral_name(category: str, origin: str) -> str:
    """The training-set file name of a source image: 12 hex characters of SHA-256 + extension."""
    digest = hashlib.sha256(f"{category}\n{origin}".encode("utf-8")).hexdigest()[:12]
    return digest + Path(origin).suffix.lower()


def _place(source: Path, target: Path, copy: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copy2(source, target)
    else:
        os.symlink(source, target)


def _check_paths(root: Path, out: Path) -> tuple[Path, Path]:
    root = Path(root).expanduser().resolve()
    out = Path(out).expanduser().absolute()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; pass the root of an MVTec-layout dataset")
    if out.resolve() == root or root in out.resolve().parents:
        raise DataError(f"{out}: lies inside the source {root}; write the noisy copy outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: already exists and is not an empty folder; choose a new output path "
                        f"or remove it first")
    return root, out


def _pick_categories(root: Path, categories: Sequence[str] | None) -> list[Path]:
    found = category_dirs(root)
    if not found:
        raise DataError(f"{root}: no <category>/train/good/ folder with images; make-noisy reads the "
                        f"MVTec AD layout (see docs/datasets.md)")
    if categories is None:
        return found
    by_name = {d.name: d for d in found}
    missing = [c for c in categories if c not in by_name]
    if missing:
        raise UsageError(f"category {missing[0]!r} is not in {root} (found: {', '.join(sorted(by_name))}); "
                         f"fix --categories")
    return [by_name[c] for c in dict.fromkeys(categories)]


def _mirror_category(root: Path, out: Path, cat_dir: Path, *, ratio: float, seed: int, overlap: bool,
                     copy: bool) -> tuple[dict, list[dict], list[dict]]:
    """Write one category of the noisy tree.

    Returns:
        class summary, injected entries, train entries (all as in the manifest).
    """
    cat = cat_dir.name
    goods = good_train_images(cat_dir)
    anomalies = anomalous_test_images(root, cat_dir)
    injected = select_injected(anomalies, injection_count(ratio, len(goods), len(anomalies)), seed, cat)
    train_dir = out / cat / "train" / "good"
    train_entries, injected_entries = [], []
    for path in goods:
        origin = path.relative_to(root).as_posix()
        name = neutral_name(cat, origin)
        _place(path, train_dir / name, copy)
        train_entries.append({"class": cat, "train_path": f"{cat}/train/good/{name}", "origin": origin,
                              "injected": False})
    for anomaly in injected:
        name = neutral_name(cat, anomaly.origin)
        _place(root / anomaly.origin, train_dir / name, copy)
        mask_rel = None
        if anomaly.mask is not None:
            mask_rel = f"{cat}/{TRAIN_MASK_DIR}/{Path(name).stem}{MASK_SUFFIX}{Path(anomaly.mask).suffix.lower()}"
            _place(root / anomaly.mask, out / mask_rel, copy)
        train_path = f"{cat}/train/good/{name}"
        injected_entries.append({"class": cat, "train_path": train_path, "origin": anomaly.origin,
                                 "mask": mask_rel, "defect": anomaly.defect})
        train_entries.append({"class": cat, "train_path": train_path, "origin": anomaly.origin, "injected": True})
    if len({e["train_path"] for e in train_entries}) != len(train_entries):
        raise RuntimeError(f"{cat}: two training images map to one neutral name")

    removed = set() if overlap else {a.origin for a in injected} | {a.mask for a in injected if a.mask}
    n_test = 0
    for sub in ("test", "ground_truth"):
        if not (cat_dir / sub).is_dir():
            continue
        for path in list_images(cat_dir / sub):
            origin = path.relative_to(root).as_posix()
            if origin in removed:
                continue
            _place(path, out / cat / path.relative_to(cat_dir), copy)
            n_test += sub == "test"
    n_train = len(goods) + len(injected)
    summary = {"n_good": len(goods), "n_available_anomalies": len(anomalies), "n_injected": len(injected),
               "n_train": n_train, "true_fraction": len(injected) / n_train, "n_test": n_test}
    return summary, injected_entries, train_entries


def make_noisy(root: Path, out: Path, *, ratio: float, seed: int, overlap: bool = True, copy: bool = False,
               categories: Sequence[str] | None = None) -> dict:
    """Build a contaminated copy of an MVTec-layout dataset.

    Per category, min(floor(ratio · N_good), N_anomalous_test) anomalous test images, drawn with a
    generator seeded by (seed, category), join `train/good/`. With `overlap` (MeDS) the test set
    is mirrored unchanged; without it (SoftPatch's default) the injected images and their masks
    are left out of the test set. Injected images' masks are mirrored to
    `<cat>/ground_truth_train/<train stem>_mask.<ext>`.

    Args:
        root: source dataset root (MVTec AD layout, or one category folder); never written.
        out: the tree to create; must not exist (or be an empty folder) and must lie outside `root`.
        ratio: noise ratio r relative to the number of good training images (≥ 0).
        seed: non-negative seed of the selection.
        overlap: keep the injected images in the test set.
        copy: copy files instead of creating absolute symlinks.
        categories: category names to include; all by default.

    Returns:
        The manifest, also written to `<out>/medsclean-noisy.json`.

    Raises:
        DataError: `root` lacks the layout, or `out` is non-empty or inside `root`.
        UsageError: a bad ratio or seed, or an unknown category.
    """
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio >= 0):
        raise ConfigError("ratio", f"ratio must be a finite number ≥ 0 (e.g. 0.1), not {ratio!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError("seed", f"seed must be a non-negative integer, not {seed!r}")
    root, out = _check_paths(root, out)
    cat_dirs = _pick_categories(root, categories)
    manifest = {"format": NOISY_FORMAT, "source": str(root), "ratio": float(ratio), "seed": int(seed),
                "overlap": bool(overlap), "copy": bool(copy), "link": "copy" if copy else "absolute-symlink",
                "classes": {}, "true_fraction": 0.0, "injected": [], "train": []}
    with atomic_directory(out) as tmp:
        for cat_dir in cat_dirs:
            summary, injected, train = _mirror_category(root, tmp, cat_dir, ratio=ratio, seed=int(seed),
                                                        overlap=overlap, copy=copy)
            manifest["classes"][cat_dir.name] = summary
            manifest["injected"].extend(injected)
            manifest["train"].extend(train)
        n_train = sum(c["n_train"] for c in manifest["classes"].values())
        manifest["true_fraction"] = len(manifest["injected"]) / n_train
        write_noisy_manifest(tmp, manifest)
    return manifest
