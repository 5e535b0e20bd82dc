"""Map post-processing against hand-built kernels, exact properties of linear interpolation, Pillow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medsclean.maps import crop_masks, gaussian_kernel2d, postprocess_maps, resize_masks, image_scores


def hand_gaussian(kernel: int, sigma: float) -> np.ndarray:
    centre = (kernel - 1) / 2
    weights = np.array([[np.exp(-((i - centre) ** 2 + (j - centre) ** 2) / (2 * sigma**2))
                         for j in range(kernel)] for i in range(kernel)])
    return weights / weights.sum()


@pytest.mark.parametrize(("kernel", "sigma"), [(5, 4.0), (3, 1.0), (7, 2.5)])
def test_gaussian_kernel_sums_to_one_and_matches_hand_built(kernel, sigma):
    weights = gaussian_kernel2d(kernel, sigma)
    assert weights.dtype == torch.float32 and weights.shape == (kernel, kernel)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(weights.numpy(), hand_gaussian(kernel, sigma), rtol=1e-6)


def test_gaussian_kernel_rejects_even_support():
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernel2d(4, 4.0)


def test_linear_ramp_survives_both_resizes_and_the_blur_in_the_interior():
    tokens, crop, size = 7, 40, 32
    ramp = torch.arange(tokens, dtype=torch.float16).expand(2, tokens, tokens)  # value = column
    out = postprocess_maps(ramp, crop=crop, size=size, sigma=4.0, kernel=5)
    assert out.shape == (2, size, size) and out.dtype == torch.float32
    # align_corners=True: crop pixel j holds j*(tokens-1)/(crop-1); align_corners=False: output
    # pixel u samples crop coordinate (u+0.5)*crop/size-0.5; a symmetric blur keeps linear values.
    columns = np.arange(size)
    expected = ((columns + 0.5) * crop / size - 0.5) * (tokens - 1) / (crop - 1)
    interior = slice(2, size - 2)
    np.testing.assert_allclose(out[:, interior, interior].numpy(),
                               np.broadcast_to(expected[interior], (2, size - 4, size - 4)), atol=1e-4)


def test_blur_pads_with_zeros_at_the_border():
    out = postprocess_maps(torch.full((1, 4, 4), 2.0), crop=16, size=16, sigma=4.0, kernel=5)
    kernel = hand_gaussian(5, 4.0)
    assert float(out[0, 8, 8]) == pytest.approx(2.0, abs=1e-5)
    assert float(out[0, 0, 0]) == pytest.approx(2.0 * kernel[2:, 2:].sum(), abs=1e-5)
    assert float(out[0, 0, 8]) == pytest.approx(2.0 * kernel[2:, :].sum(), abs=1e-5)


def test_sigma_zero_disables_the_blur():
    out = postprocess_maps(np.full((3, 5, 5), 0.25, dtype=np.float32), crop=20, size=10, sigma=0, kernel=5)
    np.testing.assert_allclose(out.numpy(), 0.25)


def test_resize_masks_nearest_and_threshold():
    masks = torch.tensor([[[1.0, 0.0], [0.0, 0.4]]])
    strict = resize_masks(masks, size=4, threshold=0.5)
    assert strict.dtype == torch.bool
    expected = np.zeros((4, 4), dtype=bool)
    expected[:2, :2] = True
    np.testing.assert_array_equal(strict[0].numpy(), expected)
    loose = resize_masks(masks, size=4, threshold=0.0)  # the reference's "> 0"
    expected[2:, 2:] = True
    np.testing.assert_array_equal(loose[0].numpy(), expected)


def test_crop_masks_resizes_like_pillow_then_crops_the_centre():
    rng = np.random.default_rng(0)
    mask = (rng.random((37, 53)) > 0.7).astype(np.float32)
    out = crop_masks(mask[None], resize=24, crop=18)
    reference = np.asarray(Image.fromarray(mask, mode="F").resize((24, 24), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(out[0].numpy(), np.clip(reference[3:21, 3:21], 0, 1), atol=1e-4)


def test_crop_masks_same_size_is_a_plain_centre_crop():
    mask = np.zeros((1, 8, 8), dtype=bool)
    mask[0, 3, 2:6] = True
    np.testing.assert_array_equal(crop_masks(mask, resize=8, crop=4)[0].numpy(), mask[0, 2:6, 2:6])


def test_image_scores_hand_cases():
    maps = torch.arange(1, 11, dtype=torch.float32).reshape(1, 2, 5)
    assert float(image_scores(maps, ratio=0.2)[0]) == pytest.approx(9.5)  # mean(10, 9)
    assert float(image_scores(maps, ratio=0.0)[0]) == pytest.approx(10.0)  # ratio 0 -> max
    assert float(image_scores(maps, ratio=0.01)[0]) == pytest.approx(10.0)  # max(1, int(0.1))
    paper_grid = torch.arange(784, dtype=torch.float32).reshape(1, 28, 28)
    # int(0.01 * 784) = 7 patches: 777..783
    assert float(image_scores(paper_grid)[0]) == pytest.approx(780.0)
    shuffled = paper_grid.flatten()[torch.randperm(784, generator=torch.Generator().manual_seed(0))]
    assert float(image_scores(shuffled.reshape(1, 784))[0]) == pytest.approx(780.0)


def test_image_scores_in_float64_equals_a_numpy_partition_mean():
    """Step 3 scores images in float64: the same top-k values averaged in double precision."""
    rng = np.random.default_rng(0)
    maps = rng.random((7, 1000), dtype=np.float32) ** 3
    for ratio in (0.01, 0.05, 0.0):
        k = max(1, int(ratio * maps.shape[1]))
        expected = np.sort(maps.astype(np.float64), axis=1)[:, -k:].mean(axis=1)
        got = image_scores(maps, ratio=ratio, dtype=torch.float64)
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-15, atol=0)
