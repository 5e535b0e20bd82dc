"""Anomaly-map post-processing of the evaluation protocol (Dinomaly's, which MeDS follows).

A model map at token resolution (e.g. 28 x 28) becomes an evaluation map in three steps:
bilinear upsampling (align_corners=True) to the crop size, bilinear resizing (align_corners=False)
to ``size`` x ``size`` (256), and a 5 x 5 Gaussian blur with sigma 4 applied as a convolution with
zero padding (so borders darken slightly, as in the reference). Ground-truth masks go through the
same geometry as the images (resize, centre crop: :func:`crop_masks`), then nearest-neighbour
resizing to ``size`` and binarisation (:func:`resize_masks`). The image score is the mean of the
top 1 % of a map's values (:func:`image_scores`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["gaussian_kernel2d", "postprocess_maps", "crop_masks", "resize_masks", "image_scores", "AGGREGATE_RATIOS"]

TOP1PCT = 0.01
"""Share of the pixels the "top1pct" image score averages (the paper's image score)."""


def gaussian_kernel2d(kernel: int, sigma: float) -> torch.Tensor:
    """A normalised isotropic Gaussian, centred on the middle of an odd square support.

    Returns:
        float32 tensor (kernel, kernel) summing to 1.
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd number of pixels, got {kernel}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    offsets = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) / 2
    profile = torch.exp(-offsets**2 / (2 * sigma**2))
    weights = torch.outer(profile, profile)
    return (weights / weights.sum()).to(torch.float32)


def _as_batch(maps: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(maps)
    if tensor.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W), got shape {tuple(tensor.shape)}")
    return tensor


def postprocess_maps(maps: torch.Tensor | np.ndarray, *, crop: int, size: int, sigma: float, kernel: int,
                     batch_size: int = 32) -> torch.Tensor:
    """Token-grid anomaly maps to evaluation maps.

    Args:
        maps: (N, h, w) float anomaly maps at token resolution (any float dtype; computed in
            float32 on the maps' device).
        crop: side of the model's input crop in pixels (392 in the paper setting).
        size: side of the evaluation maps (256).
        sigma: Gaussian standard deviation in pixels of the ``size`` grid; 0 disables the blur.
        kernel: odd side of the Gaussian support in pixels.
        batch_size: maps processed together (memory only).

    Returns:
        float32 tensor (N, size, size).
    """
    maps = _as_batch(maps, "maps")
    weights = gaussian_kernel2d(kernel, sigma).to(maps.device)[None, None] if sigma > 0 else None
    outputs = []
    for batch in maps.split(batch_size):
        batch = batch[:, None].to(torch.float32)
        batch = F.interpolate(batch, size=(crop, crop), mode="bilinear", align_corners=True)
        if size != crop:
            batch = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False)
        if weights is not None:
            batch = F.conv2d(batch, weights, padding=kernel // 2)
        outputs.append(batch[:, 0])
    if not outputs:
        return torch.zeros((0, size, size), dtype=torch.float32)
    return torch.cat(outputs)


def crop_masks(masks: torch.Tensor | np.ndarray, *, resize: int, crop: int) -> torch.Tensor:
    """Give masks the geometry of the model input: bilinear resize to a square, centre crop.

    The resize is antialiased like Pillow's (the images' resize), and the crop offset is
    ``(resize - crop) // 2`` as in :func:`medsclean.workdir.images.resize_crop`, so mask pixels stay
    aligned with map pixels. Soft values on region borders are kept for :func:`resize_masks`.

    Args:
        masks: (N, H, W) masks with values in [0, 1] (bool is accepted).
        resize: side of the square resize.
        crop: side of the centre crop, at most ``resize``.

    Returns:
        float32 tensor (N, crop, crop) in [0, 1].
    """
    masks = _as_batch(masks, "masks").to(torch.float32)
    if crop > resize:
        raise ValueError(f"crop {crop} is larger than resize {resize}")
    resized = F.interpolate(masks[:, None], size=(resize, resize), mode="bilinear",
                            align_corners=False, antialias=True)[:, 0]
    offset = (resize - crop) // 2
    return resized[:, offset:offset + crop, offset:offset + crop].clamp(0.0, 1.0)


def resize_masks(masks: torch.Tensor | np.ndarray, *, size: int, threshold: float) -> torch.Tensor:
    """Nearest-neighbour resize of ground-truth masks, then binarise with ``value > threshold``.

    ``threshold=0.5`` is the common choice; ``threshold=0`` reproduces the reference's ``> 0``
    (regions about one pixel larger after a bilinear resize).

    Args:
        masks: (N, H, W) masks with values in [0, 1] (bool is accepted).

    Returns:
        bool tensor (N, size, size), True = defect.
    """
    masks = _as_batch(masks, "masks").to(torch.float32)
    resized = F.interpolate(masks[:, None], size=(size, size), mode="nearest")[:, 0]
    return resized > threshold


AGGREGATE_RATIOS = {"top1pct": TOP1PCT, "max": 0.0}
"""The image score each `--aggregate` choice names, as the share of a map's values averaged."""


def image_scores(maps: torch.Tensor | np.ndarray, *, ratio: float = TOP1PCT,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Image scores: the mean of the ``max(1, int(ratio * P))`` largest values of each map.

    The one image-score function of the package: Step 1's image scores, Step 3's selection scores
    (in float64, `dtype=torch.float64`) and the evaluation's image scores all come from here.

    Args:
        maps: (N, ...) float maps; everything after the first dimension is one image's P values.
        ratio: fraction of values averaged, in [0, 1]; 0 gives the maximum.
        dtype: the precision the values are averaged in, and of the result.

    Returns:
        tensor (N,) of `dtype`.
    """
    maps = torch.as_tensor(maps)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    flat = maps.reshape(maps.shape[0], -1).to(dtype)
    k = max(1, int(ratio * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)
