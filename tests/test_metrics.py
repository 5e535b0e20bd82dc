"""Metrics against independent oracles: scikit-learn, a brute-force AUPRO, hand-computed cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from medsclean.metrics import (
    UndefinedMetricWarning,
    _label_regions,
    image_ap_score,
    image_auroc_score,
    pixel_metrics,
    selection_metrics,
)
from tests.pixel_accumulator import PixelMetricAccumulator


# ------------------------------------------------------------------------------------- oracles

def brute_force_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """PRO and FPR evaluated at every distinct threshold with explicit loops; no sorting tricks."""
    regions = []
    for image_index, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(image_index, labels == r) for r in range(1, count + 1)]
    ok = ~masks
    xs, ys = [0.0], [0.0]
    for threshold in sorted(set(maps.ravel().tolist()), reverse=True):
        above = maps >= threshold
        xs.append(np.count_nonzero(above & ok) / np.count_nonzero(ok))
        ys.append(np.mean([np.count_nonzero(above[i] & region) / np.count_nonzero(region)
                           for i, region in regions]))
    area = 0.0
    for k in range(1, len(xs)):
        x0, y0, x1, y1 = xs[k - 1], ys[k - 1], xs[k], ys[k]
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
            continue
        if x0 < fpr_limit:
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
        break
    return area / fpr_limit


def random_masks_and_maps(rng: np.random.Generator, n: int = 4, size: int = 16,
                          decimals: int | None = 2) -> tuple[np.ndarray, np.ndarray]:
    """Masks with several blobs per anomalous image (the first image stays good); noisy maps that
    are brighter on defects, rounded to create many ties."""
    masks = np.zeros((n, size, size), dtype=bool)
    for image in range(1, n):
        for _ in range(rng.integers(2, 5)):
            r, c = rng.integers(0, size - 3, size=2)
            h, w = rng.integers(1, 4, size=2)
            masks[image, r:r + h, c:c + w] = True
    maps = rng.random(masks.shape) + 0.6 * masks * rng.random(masks.shape)
    if decimals is not None:
        maps = np.round(maps, decimals)
    return masks, maps.astype(np.float32)


# ------------------------------------------------------------------------------- image metrics

@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_and_ap_match_sklearn_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=200)
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # about 14 distinct values
    assert image_auroc_score(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_ap_score(labels, scores) == pytest.approx(average_precision_score(labels, scores),
                                                           abs=1e-12)


def test_image_metrics_hand_case():
    labels = [0, 0, 1, 1]
    scores = [0.1, 0.4, 0.35, 0.8]
    # pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>both -> 3 of 4
    assert image_auroc_score(labels, scores) == pytest.approx(0.75)
    # ranks: 0.8 (pos, P=1), 0.4 (neg), 0.35 (pos, P=2/3) -> AP = (1 + 2/3) / 2
    assert image_ap_score(labels, scores) == pytest.approx(5 / 6)
    # a tie between a positive and a negative counts one half
    assert image_auroc_score([0, 1], [0.5, 0.5]) == pytest.approx(0.5)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_image_metrics_one_class_is_nan_with_warning(labels):
    with pytest.warns(UndefinedMetricWarning):
        assert np.isnan(image_auroc_score(labels, [0.1, 0.2, 0.3]))
    if labels[0] == 0:
        with pytest.warns(UndefinedMetricWarning):
            assert np.isnan(image_ap_score(labels, [0.1, 0.2, 0.3]))
    else:
        assert image_ap_score(labels, [0.1, 0.2, 0.3]) == pytest.approx(1.0)


def test_image_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        image_auroc_score([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc_score([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="0/1"):
        image_ap_score([0, 2], [0.1, 0.2])


# ------------------------------------------------------------------------------- pixel metrics

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [1, 2, None])
def test_pixel_metrics_match_sklearn_and_brute_force(seed, decimals):
    masks, maps = random_masks_and_maps(np.random.default_rng(seed), decimals=decimals)
    result = pixel_metrics(masks, maps)
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-10)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()),
                                               abs=1e-10)
    assert result["aupro"] == pytest.approx(brute_force_aupro(masks, maps), abs=1e-10)


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_at_other_limits_matches_brute_force(fpr_limit):
    masks, maps = random_masks_and_maps(np.random.default_rng(11), decimals=2)
    assert pixel_metrics(masks, maps, fpr_limit=fpr_limit)["aupro"] == pytest.approx(
        brute_force_aupro(masks, maps, fpr_limit), abs=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_tie_runs_straddling_chunks_give_the_same_result(chunk_size):
    masks, maps = random_masks_and_maps(np.random.default_rng(3), decimals=1)
    expected = pixel_metrics(masks, maps)
    assert pixel_metrics(masks, maps, chunk_size=chunk_size) == pytest.approx(expected, abs=1e-12)


def test_diagonally_touching_blobs_are_one_region():
    mask = np.zeros((8, 8), dtype=bool)
    mask[1, 1] = True          # a single pixel ...
    mask[2:5, 2:5] = True      # ... touching a 3x3 block only at a corner
    labels, count = _label_regions(mask)
    assert count == 1 and labels[1, 1] == labels[3, 3] != 0
    # One region of 10 pixels: the single pixel alone above threshold gives PRO 1/10 (two
    # 4-connected regions would give mean(1, 0) = 0.5).
    maps = np.zeros((1, 8, 8), dtype=np.float32)
    maps[0, 1, 1] = 1.0
    maps[0, 0, 7] = 0.5        # one OK pixel between the two thresholds
    result = pixel_metrics(mask[None], maps)
    assert result["aupro"] == pytest.approx(brute_force_aupro(mask[None], maps), abs=1e-12)
    n_ok = 64 - 10
    # curve: (0,0) -> (0, 0.1) -> (1/54, 0.1) -> (1, 1); integrate to 0.3
    x2, y2 = 1 / n_ok, 0.1
    y_limit = y2 + (1 - y2) * (0.3 - x2) / (1 - x2)
    expected = (x2 * 0.1 + (0.3 - x2) * (y2 + y_limit) / 2) / 0.3
    assert result["aupro"] == pytest.approx(expected, abs=1e-12)


def test_regions_do_not_span_images():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[:, :, 0] = True       # the same column in both images: one region if labelled in 3-D
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    maps[0, :, 0] = 1.0
    result = pixel_metrics(masks, maps)
    # two regions: one fully found at the first threshold (PRO 0.5 at FPR 0)
    assert result["aupro"] == pytest.approx(brute_force_aupro(masks, maps), abs=1e-12)
    assert result["aupro"] == pytest.approx((0.3 * (0.5 + 0.5 + 0.5 * 0.3)) / 2 / 0.3)


def test_constant_maps_are_one_threshold():
    masks, _ = random_masks_and_maps(np.random.default_rng(5))
    maps = np.full(masks.shape, 0.7, dtype=np.float32)
    result = pixel_metrics(masks, maps)
    assert result["pixel_auroc"] == pytest.approx(0.5)
    assert result["pixel_ap"] == pytest.approx(masks.mean())
    # curve (0,0) -> (1,1): area to 0.3 is 0.045, divided by 0.3
    assert result["aupro"] == pytest.approx(0.15)


def test_no_defect_is_nan_with_warning():
    masks = np.zeros((2, 5, 5), dtype=bool)
    maps = np.random.default_rng(0).random((2, 5, 5)).astype(np.float32)
    with pytest.warns(UndefinedMetricWarning):
        result = pixel_metrics(masks, maps)
    assert all(np.isnan(v) for v in result.values())


def test_no_background_is_nan_except_ap():
    masks = np.ones((1, 3, 3), dtype=bool)
    maps = np.random.default_rng(0).random((1, 3, 3)).astype(np.float32)
    with pytest.warns(UndefinedMetricWarning):
        result = pixel_metrics(masks, maps)
    assert np.isnan(result["pixel_auroc"]) and np.isnan(result["aupro"])
    assert result["pixel_ap"] == pytest.approx(1.0)


def test_negative_zero_ties_with_zero_and_negative_scores_order():
    masks = np.array([[[True, False, False, True]]])
    maps = np.array([[[-0.0, 0.0, -1.5, -1.0]]], dtype=np.float32)
    result = pixel_metrics(masks, maps)
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert result["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()))


def test_pixel_metrics_reject_bad_input():
    masks = np.zeros((1, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match="one shape"):
        pixel_metrics(masks, np.zeros((1, 4, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        pixel_metrics(masks, np.full((1, 4, 4), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="binarise"):
        pixel_metrics(np.full((1, 4, 4), 0.5), np.zeros((1, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="fpr_limit"):
        pixel_metrics(masks, np.zeros((1, 4, 4), dtype=np.float32), fpr_limit=0)


# ------------------------------------------------------------------------------ streaming path

def smooth_masks_and_maps(rng: np.random.Generator, n: int = 6, size: int = 48):
    masks, _ = random_masks_and_maps(rng, n=n, size=size, decimals=None)
    masks = ndimage.binary_dilation(masks, structure=np.ones((1, 3, 3)))
    maps = ndimage.gaussian_filter(rng.random(masks.shape) + 0.8 * masks, sigma=(0, 1.5, 1.5))
    return masks, maps.astype(np.float32)


@pytest.mark.parametrize("seed", range(3))
def test_accumulator_matches_exact_path(seed):
    masks, maps = smooth_masks_and_maps(np.random.default_rng(seed))
    exact = pixel_metrics(masks, maps)
    accumulator = PixelMetricAccumulator(score_range=(float(maps.min()), float(maps.max())))
    for start in range(0, len(maps), 4):  # uneven batches: 4 then 2
        accumulator.update(masks[start:start + 4], maps[start:start + 4])
    streamed = accumulator.compute()
    for key in exact:
        assert abs(streamed[key] - exact[key]) <= 1e-3, key


def test_accumulator_equals_exact_path_when_every_score_has_its_own_bin():
    masks, maps = random_masks_and_maps(np.random.default_rng(2), decimals=2)
    accumulator = PixelMetricAccumulator(score_range=(-0.005, 1.605), bins=161)  # bin centres on 0.01 steps
    accumulator.update(masks, maps)
    assert accumulator.compute() == pytest.approx(pixel_metrics(masks, maps), abs=1e-9)


def test_accumulator_warns_when_range_misses_scores_and_nan_when_empty():
    masks, maps = smooth_masks_and_maps(np.random.default_rng(0), n=2, size=16)
    accumulator = PixelMetricAccumulator(score_range=(0.0, float(np.median(maps))))
    accumulator.update(masks, maps)
    with pytest.warns(UserWarning, match="outside score_range"):
        accumulator.compute()
    with pytest.warns(UndefinedMetricWarning):
        assert all(np.isnan(v) for v in PixelMetricAccumulator(score_range=(0, 1)).compute().values())


# --------------------------------------------------------------------------- selection metrics

def test_selection_metrics_hand_case():
    is_contaminant = np.array([1, 0, 1, 0, 0], dtype=bool)
    rejected = np.array([1, 1, 0, 0, 0], dtype=bool)
    suspicion = np.array([0.9, 0.8, 0.5, 0.5, 0.1])
    result = selection_metrics(is_contaminant, rejected, suspicion)
    assert result["precision"] == pytest.approx(0.5)
    assert result["recall"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx(0.5)
    # worst case among the tie at 0.5: the clean image first, so 4 of 5 are read
    assert result["inspection_depth"] == pytest.approx(0.8)
    assert result["ranking_auroc"] == pytest.approx(roc_auc_score(is_contaminant, suspicion))
    assert result["ranking_auprc"] == pytest.approx(average_precision_score(is_contaminant, suspicion))


@pytest.mark.parametrize("seed", range(5))
def test_inspection_depth_matches_explicit_worst_case_ranking(seed):
    rng = np.random.default_rng(seed)
    is_contaminant = rng.random(40) < 0.2
    is_contaminant[0] = True
    suspicion = np.round(rng.random(40) + 0.5 * is_contaminant, 1)
    # sort by suspicion descending, contaminants last among equals; read until the last one
    order = np.lexsort((is_contaminant, -suspicion))
    depth = (np.flatnonzero(is_contaminant[order]).max() + 1) / 40
    result = selection_metrics(is_contaminant, suspicion > 0.9, suspicion)
    assert result["inspection_depth"] == pytest.approx(depth)


def test_selection_metrics_clean_set_and_nothing_rejected():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = selection_metrics([0, 0, 0], [0, 0, 0], [0.1, 0.2, 0.3])
    assert {type(w.message) for w in caught} == {UndefinedMetricWarning}
    assert all(np.isnan(result[k]) for k in result)
    with pytest.warns(UndefinedMetricWarning):
        result = selection_metrics([1, 0, 0], [0, 0, 0], [0.1, 0.2, 0.3])
    assert np.isnan(result["precision"]) and result["recall"] == 0 and result["f1"] == 0
    assert result["inspection_depth"] == pytest.approx(1.0)
