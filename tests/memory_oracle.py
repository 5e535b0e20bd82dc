"""The naive memory-ensemble score, written as the method states it: the oracle.

Kept out of the library because no engine needs it; the tests import it and
benchmarks/bench_score.py (with the repository root on sys.path) times it
against the engines.
"""

from __future__ import annotations

import numpy as np


def _score_against(query: np.ndarray, memory: np.ndarray, k: int) -> np.ndarray:
    """(P,) mean of the k smallest cosine distances of each query patch to the memory patches."""
    distances = 1.0 - query @ memory.T
    return np.partition(distances, k - 1, axis=1)[:, :k].mean(axis=1)


def naive_memory_scores(
    features: np.ndarray,
    banks: np.ndarray,
    *,
    k: int = 1,
    leave_self_out: bool = True,
    dtype: type = np.float64,
) -> np.ndarray:
    """Memory-ensemble maps by building every memory and searching it, one image at a time.

    For each bank, the memory is all patches of its distinct member images (minus the
    query image under leave-self-out; a bank left empty is skipped for that image).
    A patch's bank score is the mean of its k smallest cosine distances; its map
    value is the mean over the banks that scored it. An image that no bank could
    score is scored against all other images of the class; with none, NaN.

    Args:
        features: (N, P, D) L2-normalised features.
        banks: (B, m) image indices.
        k: nearest neighbours per score.
        leave_self_out: exclude the query image from every memory.
        dtype: computation dtype (float64 for tests; float32 to time it as the reference runs).

    Returns:
        (N, P) float64 maps.
    """
    features = np.asarray(features, dtype=dtype)
    n_images, n_patches, dim = features.shape
    sums = np.zeros((n_images, n_patches))
    counts = np.zeros(n_images)
    for bank in np.asarray(banks):
        members = np.unique(bank)
        full_memory = features[members].reshape(-1, dim)
        for image in range(n_images):
            if leave_self_out and image in members:
                others = members[members != image]
                if len(others) == 0:
                    continue
                memory = features[others].reshape(-1, dim)
            else:
                memory = full_memory
            sums[image] += _score_against(features[image], memory, k)
            counts[image] += 1
    maps = np.full((n_images, n_patches), np.nan)
    for image in range(n_images):
        if counts[image] > 0:
            maps[image] = sums[image] / counts[image]
        elif n_images > 1:
            others = np.delete(np.arange(n_images), image)
            maps[image] = _score_against(features[image], features[others].reshape(-1, dim), k)
    return maps
