"""Decoding image files robustly and turning them into normalised backbone inputs.

Pillow only, no torchvision: decoding runs in data-loader workers and must stay light.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medsclean.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a backbone input: resize to a square, centre-crop, normalise.

    Attributes:
        resize: side in pixels of the square resize (the paper: 448).
        crop: side in pixels of the centre crop taken after resizing (the paper: 392).
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided after subtracting the mean.
        interpolation: one of nearest, bilinear, bicubic, lanczos.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, not {self.interpolation!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def decode_image(path: Path) -> Image.Image:
    """Open any common image file as 8-bit RGB, honouring EXIF orientation.

    Handles grayscale, RGBA (composited on black), palette, and 16-bit images
    (scaled by their own dynamic range so that 12-bit sensor data is not crushed).

    Raises:
        DataError: the file cannot be decoded; the message names it.
    """
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
            return _to_rgb8(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc}); remove or replace the file, or skip it "
                        f"(the default without --strict)") from exc


def _to_rgb8(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            top = 65535.0 if arr.max() > 4095 else max(float(arr.max()), 1.0)
        else:
            top = max(float(arr.max()), 1.0)
        arr8 = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def resize_crop(img: Image.Image, spec: Preprocess) -> np.ndarray:
    """Resize to a square and centre-crop, keeping 8-bit pixels (cheap to pass between processes).

    Returns:
        uint8 array of shape (crop, crop, 3).
    """
    size = (spec.resize, spec.resize)
    resized = img if img.size == size else img.resize(size, _RESAMPLE[spec.interpolation])
    off = (spec.resize - spec.crop) // 2
    return np.asarray(resized.crop((off, off, off + spec.crop, off + spec.crop)), dtype=np.uint8)


def normalise(pixels: np.ndarray, spec: Preprocess) -> np.ndarray:
    """uint8 (..., H, W, 3) pixels → float32 (..., 3, H, W), scaled to [0, 1] then mean/std normalised."""
    arr = pixels.astype(np.float32) / 255.0
    arr = (arr - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(np.moveaxis(arr, -1, -3))


def read_mask(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as a float32 array in [0, 1] of shape (H, W).

    Args:
        path: mask file; any non-zero pixel is defect in an 8-bit mask.
        size: expected (width, height) of the paired image; a mismatch is an error.
    """
    try:
        with Image.open(path) as m:
            if size is not None and m.size != tuple(size):
                raise DataError(f"{path}: mask is {m.size[0]}x{m.size[1]} but its image is "
                                f"{size[0]}x{size[1]}; masks must match their image's size")
            if m.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(m, dtype=np.float32)
                top = max(float(arr.max()), 1.0)
                return np.clip(arr / top, 0.0, 1.0)
            return np.asarray(m.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: cannot decode mask ({exc}); replace the file") from exc
