"""Small real-image datasets for tests, built from scikit-image's offline CC0 textures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def texture(name: str = "brick") -> np.ndarray:
    """A 512×512 uint8 grayscale texture that ships with scikit-image."""
    from skimage import data

    return getattr(data, name)()


def crops(base: np.ndarray, n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`n` random square crops of `base`, as RGB uint8."""
    out = []
    for _ in range(n):
        y, x = rng.integers(0, base.shape[0] - size, size=2)
        patch = base[y:y + size, x:x + size]
        if patch.ndim == 2:
            patch = np.stack([patch] * 3, axis=-1)
        out.append(np.ascontiguousarray(patch))
    return out


def save_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def make_mvtec(root: Path, *, categories=("brick", "gravel"), n_train=6, n_test_good=2, n_test_bad=2,
               size=64, seed=0) -> Path:
    """A tiny MVTec-layout dataset: bright square defects with exact masks."""
    rng = np.random.default_rng(seed)
    for cat in categories:
        base = texture(cat)
        for i, img in enumerate(crops(base, n_train, size, rng)):
            save_png(root / cat / "train" / "good" / f"{i:03d}.png", img)
        for i, img in enumerate(crops(base, n_test_good, size, rng)):
            save_png(root / cat / "test" / "good" / f"{i:03d}.png", img)
        for i, img in enumerate(crops(base, n_test_bad, size, rng)):
            mask = np.zeros((size, size), np.uint8)
            y, x = rng.integers(4, size - 16, size=2)
            mask[y:y + 10, x:x + 10] = 255
            img = img.copy()
            img[mask > 0] = (255, 0, 0)
            save_png(root / cat / "test" / "spot" / f"{i:03d}.png", img)
            save_png(root / cat / "ground_truth" / "spot" / f"{i:03d}_mask.png", mask)
    return root


REQUIRE_RAY = "MEDSCLEAN_REQUIRE_RAY"


def require_ray():
    """The ray module; skips without it, unless $MEDSCLEAN_REQUIRE_RAY is set (CI sets it), which makes its
    absence a failure."""
    import importlib.util
    import os

    import pytest

    if importlib.util.find_spec("ray") is None:
        if os.environ.get(REQUIRE_RAY):
            pytest.fail(f"{REQUIRE_RAY} is set but ray is not installed; pip install -e '.[ray]'")
        pytest.skip(f"needs the ray extra (set {REQUIRE_RAY}=1 to make its absence a failure)")
    import ray

    return ray


def load_packaged_classifier(name: str):
    """A model of ``PACKAGED_WEIGHTS`` with its ImageNet classifier and the packaged weights, in eval mode.

    For checking that the packaged weights map correctly (a photo gets its ImageNet class).
    Inputs: (B, 3, S, S) normalised with mean = std = 0.5 (224 px suits all three); output
    (B, 1000) logits.
    """
    import torch

    from medsclean.model.encoder import packaged_state_dict
    from medsclean.model.weights import PACKAGED_WEIGHTS, load_state_dict_strictly, package_file, read_state_dict

    import timm

    arch = timm.models.get_arch_name(name)
    assert arch in PACKAGED_WEIGHTS, f"{name} has no packaged weights"
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    path = package_file(arch)
    load_state_dict_strictly(model, packaged_state_dict(arch, read_state_dict(path)), source=path)
    return model.eval().requires_grad_(False)
