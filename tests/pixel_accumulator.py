"""Streaming pixel metrics from score histograms: a second computation of `pixel_metrics`'
numbers, in O(bins) memory, that tests compare with the exact one and
benchmarks/bench_metrics.py times (with the repository root on sys.path).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from medsclean.metrics import DEFAULT_FPR_LIMIT, _CurveIntegrator, _label_regions, _pixel_inputs


class PixelMetricAccumulator:
    """Streaming pixel AUROC / AP / AUPRO from fixed-range score histograms.

    Each bin is treated as one run of tied scores, so the result differs from :func:`pixel_metrics`
    only by the score resolution ``(hi - lo) / bins`` (|delta| well below 1e-3 at 2**16 bins when
    the range is tight). Memory is O(bins); regions are labelled per image inside :meth:`update`
    (a region never spans images). Scores outside ``score_range`` are counted in the end bins;
    :meth:`compute` warns when more than 1 % of pixels fell outside.

    Example:
        >>> acc = PixelMetricAccumulator(score_range=(0.0, 1.0))
        >>> for masks, maps in batches:
        ...     acc.update(masks, maps)
        >>> acc.compute()["aupro"]
    """

    def __init__(self, *, score_range: tuple[float, float], bins: int = 1 << 16,
                 fpr_limit: float = DEFAULT_FPR_LIMIT) -> None:
        lo, hi = (float(v) for v in score_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"score_range must be finite with lo < hi, got {score_range}")
        if bins < 2:
            raise ValueError(f"bins must be at least 2, got {bins}")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        self.score_range, self.bins, self.fpr_limit = (lo, hi), int(bins), fpr_limit
        self.ok_counts = np.zeros(self.bins, dtype=np.int64)
        self.defect_counts = np.zeros(self.bins, dtype=np.int64)
        self.pro_weights = np.zeros(self.bins, dtype=np.float64)
        self.n_regions = 0
        self.n_outside = 0

    def _bin_index(self, scores: np.ndarray) -> np.ndarray:
        lo, hi = self.score_range
        scores = scores.astype(np.float64)
        self.n_outside += int(np.count_nonzero((scores < lo) | (scores > hi)))
        scaled = (scores - lo) * (self.bins / (hi - lo))
        return np.clip(np.floor(scaled), 0, self.bins - 1).astype(np.intp)

    def update(self, masks, maps) -> None:
        """Add a batch: masks (B, H, W) bool, maps (B, H, W) float (H, W may vary by batch)."""
        masks, maps = _pixel_inputs(masks, maps)
        if np.isnan(maps).any():
            raise ValueError("maps contain NaN; fix the scoring step before evaluating")
        for mask, score_map in zip(masks, maps):
            labels, count = _label_regions(mask)
            labels = labels.ravel()
            index = self._bin_index(score_map.ravel())
            defect = labels > 0
            self.ok_counts += np.bincount(index[~defect], minlength=self.bins)
            self.defect_counts += np.bincount(index[defect], minlength=self.bins)
            if count:
                inverse_size = 1.0 / np.bincount(labels, minlength=count + 1)[1:]
                self.pro_weights += np.bincount(index[defect], weights=inverse_size[labels[defect] - 1],
                                                minlength=self.bins)
            self.n_regions += count

    def compute(self) -> dict[str, float]:
        """The metrics of everything added so far (same keys and NaN rules as pixel_metrics)."""
        n_pixels = int(self.ok_counts.sum() + self.defect_counts.sum())
        if n_pixels and self.n_outside > 0.01 * n_pixels:
            warnings.warn(f"{self.n_outside / n_pixels:.1%} of scores fell outside score_range "
                          f"{self.score_range}; widen it for accurate metrics", stacklevel=2)
        occupied = (self.ok_counts + self.defect_counts)[::-1] > 0  # highest scores first
        fp = np.cumsum(self.ok_counts[::-1])[occupied]
        tp = np.cumsum(self.defect_counts[::-1])[occupied]
        pro = np.cumsum(self.pro_weights[::-1])[occupied]
        integrator = _CurveIntegrator(n_neg=int(self.ok_counts.sum()), n_pos=int(self.defect_counts.sum()),
                                      n_regions=self.n_regions, fpr_limit=self.fpr_limit)
        integrator.add(fp, tp, pro)
        return {"pixel_auroc": integrator.auroc("pixel_auroc"),
                "pixel_ap": integrator.average_precision("pixel_ap"),
                "aupro": integrator.aupro()}
