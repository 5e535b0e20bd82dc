"""Engines ``faiss`` and ``ivf``: one FAISS inner-product index per bank, as the reference does.

About ``B * ratio`` times the work of ``exact``, but it runs on faiss-gpu when torch has no GPU.
``faiss`` (a flat index) gives the exact scores; ``ivf`` trades exactness for speed on huge
classes. FAISS itself is reached only through ``medsclean.step1.faiss_index``.
"""

from __future__ import annotations

import numpy as np
import torch

from medsclean.config import ScoreConfig
from medsclean.step1 import faiss_index as knn
from medsclean.step1.banks import bank_members, check_banks
from medsclean.step1.rows import as_features, check_k
from medsclean.step1.runtime import BankScorer, ClassJob, ProgressCallback, report_progress


def _search_distances(
    faiss_index, queries: np.ndarray, k: int, n_patches: int, exclude_position: np.ndarray | None
) -> np.ndarray:
    """Mean distance of each query row to its k nearest indexed rows, NaN where fewer than k are found.

    Args:
        faiss_index: index over the patches of a list of images, P rows per image.
        queries: (R, D) query patches.
        k: neighbours per score.
        n_patches: P, rows per indexed image.
        exclude_position: (R,) position, within the indexed images, of the image each
            query row must not match (its own), or None to allow every row.

    Returns:
        (R,) float64 mean cosine distances.
    """
    search_k = k if exclude_position is None else min(k + n_patches, faiss_index.ntotal)
    similarities, ids = knn.search_inner_product(faiss_index, queries, search_k)
    if exclude_position is not None:
        own = (ids // n_patches) == exclude_position[:, None]
        similarities = np.where(own & (ids >= 0), -np.inf, similarities)
        similarities = -np.sort(-similarities, axis=1)
    top = similarities[:, :k].astype(np.float64)
    distances = 1.0 - top
    distances[~np.isfinite(top)] = np.nan
    return distances.mean(axis=1)


def _accumulate(sums: np.ndarray, counts: np.ndarray, images: np.ndarray, distances: np.ndarray) -> None:
    """Add one bank's (len(images), P) distances to the running sums, skipping NaN (nothing found)."""
    found = ~np.isnan(distances)
    sums[images] += np.where(found, distances, 0.0)
    counts[images] += found


def memory_scores_faiss(
    features: torch.Tensor | np.ndarray,
    banks: np.ndarray,
    *,
    k: int = ScoreConfig.k,
    leave_self_out: bool = True,
    search: knn.IndexOptions = knn.IndexOptions(),
    on_block: ProgressCallback | None = None,
) -> torch.Tensor:
    """Memory-ensemble maps of one class with one FAISS index per bank.

    Images outside a bank search its index for their k nearest patches. Under
    leave-self-out the bank's own members search the same index for k + P
    neighbours and drop those of their own image (at most P), which is exact for
    a flat index and costs a larger result heap for about ``ratio`` of the
    queries. Total work is about ``B * ratio`` all-against-all passes.
    (faiss-gpu limits k + P to 2048.)

    With an IVF index the search is approximate; a patch for which a bank returns
    no neighbour skips that bank.

    Args:
        features: (N, P, D) L2-normalised patch features.
        banks: (B, m) image indices of each bank, as from ``banks.draw_banks``.
        k: nearest neighbours per score.
        leave_self_out: never match an image against itself.
        search: the index of every bank: flat (exact) or ivf (approximate), GPU or not, IVF lists
            and probes, the k-means seed (``faiss_index.IndexOptions``).
        on_block: called with (banks done, B) after every bank.

    Returns:
        (N, P) float32 CPU tensor of memory scores.
    """
    array = np.ascontiguousarray(as_features(features).numpy())
    n_images, n_patches, dim = array.shape
    banks = check_banks(banks, n_images)
    check_k(k, n_patches)
    sums = np.zeros((n_images, n_patches))
    counts = np.zeros((n_images, n_patches))
    for done, members in enumerate(bank_members(banks), start=1):
        faiss_index = search.build(array[members].reshape(-1, dim))
        if leave_self_out:
            outside = np.setdiff1d(np.arange(n_images), members)
            inside = members if len(members) > 1 else members[:0]  # a bank of only i is skipped for i
        else:
            outside, inside = np.arange(n_images), members[:0]
        for images, is_member in ((outside, False), (inside, True)):
            if len(images) == 0:
                continue
            exclude = np.repeat(np.searchsorted(members, images), n_patches) if is_member else None
            distances = _search_distances(faiss_index, array[images].reshape(-1, dim), k, n_patches, exclude)
            _accumulate(sums, counts, images, distances.reshape(len(images), n_patches))
        report_progress(on_block, done, len(banks))
    scores = np.divide(sums, counts, out=np.full_like(sums, np.nan), where=counts > 0)
    unscored = np.flatnonzero((counts == 0).any(axis=1))
    if len(unscored) and n_images > 1:
        # No bank held another image: fall back to every other image of the class.
        faiss_index = search.build(array.reshape(-1, dim))
        exclude = np.repeat(unscored, n_patches)
        fallback = _search_distances(faiss_index, array[unscored].reshape(-1, dim), k, n_patches, exclude)
        scores[unscored] = np.where(counts[unscored] == 0, fallback.reshape(-1, n_patches), scores[unscored])
    return torch.from_numpy(scores.astype(np.float32))


def _scorer(job: ClassJob, index: knn.IndexKind) -> BankScorer:
    search = knn.IndexOptions(index=index, seed=job.cfg.seed)
    return lambda bank: memory_scores_faiss(job.rows.read(), bank, k=job.cfg.k, leave_self_out=job.leave_self_out,
                                            search=search, on_block=job.on_block)


def score_class(job: ClassJob) -> BankScorer:
    """Engine ``faiss``: a flat (exact) index per bank."""
    return _scorer(job, "flat")


def score_class_ivf(job: ClassJob) -> BankScorer:
    """Engine ``ivf``: an IVF (approximate) index per bank, its k-means seeded by the run seed."""
    return _scorer(job, "ivf")
