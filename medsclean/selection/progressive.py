"""Step-3 selection rule: which training images count as clean at iteration t of T.

Pure NumPy. Scores are "higher = more anomalous". At iteration t the selection score
blends the frozen distilled model's image score with the current model's, moving fully
to the current model halfway through; each class keeps the images scoring strictly
below its median plus a margin of k * (t/T) median absolute deviations. At t = 0 about
half of every class is kept; the margin then widens to let the normal majority back in.

Ties and degenerate classes: the comparison is strict, so an image scoring exactly tau
is rejected. At t = 0 (tau = the median) a class of odd size keeps (n-1)/2 images; a
class whose scores are all equal keeps none (MAD = 0, tau = the common score); a class
of one image is always rejected (tau = its own score). Callers should warn about such
classes rather than expect them to be kept. The median is NumPy's (the mean of the two
middle values for an even count; the reference implementation takes the lower one).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from medsclean.errors import MedscleanError

def alpha(t: int, total: int) -> float:
    """Weight of the current model's score at iteration t of total: min(1, 2t/T)."""
    if total < 1:
        raise ValueError(f"total iterations must be >= 1, not {total}")
    return min(1.0, 2.0 * t / total)


def blend_scores(s0: ArrayLike, s_theta: ArrayLike, t: int, total: int) -> np.ndarray:
    """eta_t = (1 - alpha_t) * s0 + alpha_t * s_theta.

    Args:
        s0: (N,) image scores of the frozen distilled model.
        s_theta: (N,) image scores of the model being fine-tuned.
        t: iteration, 0..total.
        total: T, the number of fine-tuning iterations.

    Returns:
        (N,) float64 selection scores.
    """
    weight = alpha(t, total)
    return (1.0 - weight) * np.asarray(s0, dtype=np.float64) + weight * np.asarray(s_theta, dtype=np.float64)


def median_absolute_deviation(values: ArrayLike) -> float:
    """median(|x - median(x)|), unscaled (no 1.4826 factor)."""
    x = np.asarray(values, dtype=np.float64)
    return float(np.median(np.abs(x - np.median(x))))


def threshold(eta: ArrayLike, t: int, total: int, k: float = 3.0) -> float:
    """tau_t = median(eta) + k * (t/T) * MAD(eta) for one class's scores."""
    x = np.asarray(eta, dtype=np.float64)
    if x.size == 0:
        raise ValueError("cannot threshold an empty set of scores")
    return float(np.median(x) + k * (t / total) * median_absolute_deviation(x))


def select_per_class(
    eta: ArrayLike, classes: Sequence[str], t: int, total: int, k: float = 3.0
) -> tuple[np.ndarray, dict[str, float]]:
    """Keep, class by class, the images whose score is strictly below the class threshold.

    Args:
        eta: (N,) selection scores.
        classes: N class names, one per image.
        t: iteration, 0..total.
        total: T.
        k: MAD multiplier reached at t = T.

    Returns:
        keep: (N,) bool, True for images selected as clean.
        tau: threshold per class, classes in sorted order.

    Raises:
        MedscleanError: when a score is NaN or infinite (training diverged).
    """
    scores = np.asarray(eta, dtype=np.float64)
    labels = np.asarray(classes, dtype=object)
    if scores.shape != (len(labels),):
        raise ValueError(f"{scores.shape[0] if scores.ndim else 0} scores for {len(labels)} class labels")
    if not np.all(np.isfinite(scores)):
        raise MedscleanError(
            "selection scores contain NaN or infinity: the model diverged; lower the learning rate and rerun"
        )
    keep = np.zeros(len(scores), dtype=bool)
    tau: dict[str, float] = {}
    for name in sorted(set(labels.tolist())):
        members = labels == name
        tau[name] = threshold(scores[members], t, total, k)
        keep[members] = scores[members] < tau[name]
    return keep, tau



def combine_class_scores(score_sets: Sequence[ArrayLike], classes: Sequence[str]) -> np.ndarray:
    """Geometric mean, over several positive image scores, of each score divided by its class median.

    Dividing by the class median puts scores of any scale on one footing (1 = a typical image of the
    class) while keeping how far an outlier stands out, which the final cut needs; the geometric
    mean is the mean of log ratios, the space the mixture cut fits in. Higher = more anomalous.

    Args:
        score_sets: S arrays of (N,) positive image scores of the same images.
        classes: N class names, one per image.

    Returns:
        (N,) float64 combined scores, positive.

    Raises:
        ValueError: shapes disagree, or a score is not positive.
    """
    labels = np.asarray(classes, dtype=object)
    stacked = np.stack([np.asarray(s, dtype=np.float64) for s in score_sets])
    if stacked.shape[1] != len(labels):
        raise ValueError(f"{stacked.shape[1]} scores for {len(labels)} class labels")
    if not (stacked > 0).all():
        raise ValueError("scores to combine must be positive")
    combined = np.zeros(len(labels))
    for name in set(labels.tolist()):
        members = labels == name
        ratios = stacked[:, members] / np.median(stacked[:, members], axis=1, keepdims=True)
        combined[members] = np.exp(np.log(ratios).mean(axis=0))
    return combined
