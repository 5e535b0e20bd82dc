"""The arithmetic every exact Step-1 path shares: each query patch's nearest similarities to every
image of the class, and their reduction to one score per patch over the banks.

A bank's nearest distance is the minimum over its member images' nearest distances, so one pass
over all images serves all banks. :func:`nearest_table` keeps that pass whole, so that any set of
memories over the same images is a reduction of it (:func:`scores_from_table`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from medsclean.config import ScoreConfig
from medsclean.step1.banks import check_banks, member_table
from medsclean.step1.plan import default_block_bytes, plan_exact_blocks
from medsclean.step1.rows import as_features, check_k
from medsclean.step1.runtime import ProgressCallback, report_progress


def nearest_similarities(
    queries: torch.Tensor, features: torch.Tensor, k: int, database_images: int, out: torch.Tensor
) -> None:
    """Fill ``out`` (R, N+1, k) with each query row's k largest similarities to every image.

    Column N (the padding image of the bank table) is left untouched.

    Args:
        queries: (R, D) query patches.
        features: (N, P, D) all patches of the class.
        k: similarities kept per (query, image) pair, largest first.
        database_images: images per matrix product.
        out: (R, N+1, k) output buffer.
    """
    n_images, n_patches, dim = features.shape
    rows = queries.shape[0]
    buffer = torch.empty(rows * database_images * n_patches, dtype=queries.dtype, device=queries.device)
    for start in range(0, n_images, database_images):
        stop = min(n_images, start + database_images)
        block = features[start:stop].reshape(-1, dim).to(queries.dtype)  # float16 memories widen per block
        # A reused output buffer avoids a fresh allocation (and page faults) per product.
        similarities = buffer[: rows * block.shape[0]].view(rows, block.shape[0])
        torch.matmul(queries, block.T, out=similarities)
        per_image = similarities.view(rows, stop - start, n_patches)
        if k == 1:
            out[:, start:stop, 0] = per_image.amax(dim=-1)
        else:
            out[:, start:stop, :] = per_image.topk(k, dim=-1).values


def k_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """(..., k) the k smallest of the last dim, ascending."""
    if k == 1:
        return values.amin(dim=-1, keepdim=True)
    return values.topk(k, dim=-1, largest=False).values


def mean_of_k_smallest(distances: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k smallest values along the last dim; +inf where fewer than k are finite."""
    if k == 1:
        return distances.amin(dim=-1)
    return distances.topk(k, dim=-1, largest=False).values.mean(dim=-1)


def reduce_over_banks(
    nearest: torch.Tensor, members: torch.Tensor, k: int, bank_chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's score against every bank, summed over the banks that could score it.

    Args:
        nearest: (R, N+1, k) ascending nearest distances per image; +inf marks an
            image that may not be used (the query's own image, the padding column N).
        members: (B, w) distinct members of each bank, padded with N (``banks.member_table``).
        k: neighbours per score.
        bank_chunk: banks reduced together.

    Returns:
        sums: (R,) float32 sum of the bank scores.
        counts: (R,) float32 number of banks that had an image to compare with.
    """
    rows = nearest.shape[0]
    sums = torch.zeros(rows, dtype=nearest.dtype, device=nearest.device)
    counts = torch.zeros(rows, dtype=nearest.dtype, device=nearest.device)
    for start in range(0, members.shape[0], bank_chunk):
        chunk = members[start : start + bank_chunk]
        gathered = nearest[:, chunk.reshape(-1), :].view(rows, chunk.shape[0], -1)  # (R, b, w*k)
        per_bank = mean_of_k_smallest(gathered, k)
        usable = torch.isfinite(per_bank)
        sums += torch.where(usable, per_bank, 0.0).sum(dim=1)
        counts += usable.sum(dim=1)
    return sums, counts


def scores_from_nearest(
    nearest: torch.Tensor,
    start: int,
    stop: int,
    members: torch.Tensor,
    k: int,
    leave_self_out: bool,
    bank_chunk: int,
) -> torch.Tensor:
    """(stop-start, P) scores from the (rows, N+1, k) nearest distances of query images start..stop-1.

    Overwrites the padding column N (and, leaving self out, each query's own image) with +inf.
    """
    block = stop - start
    n_images = nearest.shape[1] - 1
    n_patches = nearest.shape[0] // block
    nearest[:, n_images, :] = math.inf
    if leave_self_out:
        own = nearest.view(block, n_patches, n_images + 1, k)
        own[torch.arange(block), :, torch.arange(start, stop), :] = math.inf
    sums, counts = reduce_over_banks(nearest, members, k, bank_chunk)
    scores = sums / counts
    unscored = counts == 0
    if unscored.any():
        # No bank held another image: fall back to every other image of the class.
        fallback = mean_of_k_smallest(nearest[unscored, :n_images, :].reshape(int(unscored.sum()), -1), k)
        scores[unscored] = torch.where(torch.isfinite(fallback), fallback, math.nan)
    return scores.view(block, n_patches)


def nearest_table(
    features: torch.Tensor | np.ndarray,
    *,
    queries: torch.Tensor | np.ndarray | None = None,
    k: int = ScoreConfig.k,
    device: str | torch.device = "cpu",
    max_block_bytes: int | None = None,
    on_block: ProgressCallback | None = None,
) -> torch.Tensor:
    """Every patch's k nearest cosine distances to every image of the class, self included.

    The exact engine's intermediate kept whole: any set of memories over these images
    (banks, a full bank, a shrinking memory) is then a reduction of this table
    (:func:`scores_from_table`) instead of another pass over the features.

    Args:
        features: (N, P, D) L2-normalised patch features.
        queries: (Q, P, D) images to look up instead of the class itself (e.g. test images).
        k: distances kept per (patch, image) pair, ascending.
        device: torch device of the matrix products.
        max_block_bytes: working-memory target of one block (default by device).
        on_block: called with (images done, N) after every query block.

    Returns:
        (Q, P, N, k) float32 CPU tensor (Q = N without `queries`); 4 * Q * N * P * k bytes.
    """
    features = as_features(features, device)
    queries = features if queries is None else as_features(queries, device)
    n_images, n_patches, dim = features.shape
    n_queries = queries.shape[0]
    check_k(k, n_patches)
    if max_block_bytes is None:
        max_block_bytes = default_block_bytes(features.device)
    plan = plan_exact_blocks(n_images, n_patches, k=k, n_banks=1, bank_width=1, max_block_bytes=max_block_bytes)
    table = torch.empty(n_queries, n_patches, n_images, k, dtype=torch.float32)
    for start in range(0, n_queries, plan.query_images):
        stop = min(n_queries, start + plan.query_images)
        rows = (stop - start) * n_patches
        nearest = torch.empty(rows, n_images + 1, k, dtype=torch.float32, device=features.device)
        nearest_similarities(queries[start:stop].reshape(rows, dim), features, k, plan.database_images, nearest)
        table[start:stop] = (1.0 - nearest[:, :n_images]).view(stop - start, n_patches, n_images, k).cpu()
        report_progress(on_block, stop, n_queries)
    return table


def scores_from_table(table: torch.Tensor, banks: np.ndarray, *, leave_self_out: bool = True,
                      block_images: int = 16) -> torch.Tensor:
    """Memory-ensemble maps from a :func:`nearest_table`: equal to the exact engine's
    (``engines.exact.memory_scores_exact``) on the same features and banks.

    Args:
        table: (N, P, N, k) nearest distances.
        banks: (B, m) image indices of each bank.
        leave_self_out: never match an image against itself.
        block_images: query images reduced together.

    Returns:
        (N, P) float32 maps.
    """
    n_images, n_patches, _, k = table.shape
    banks = check_banks(banks, n_images)
    members = member_table(banks, pad_index=n_images)
    bank_chunk = max(1, min(len(banks), 64))
    maps = torch.empty(n_images, n_patches, dtype=torch.float32)
    for start in range(0, n_images, block_images):
        stop = min(n_images, start + block_images)
        rows = (stop - start) * n_patches
        nearest = torch.empty(rows, n_images + 1, k, dtype=torch.float32)
        nearest[:, :n_images] = table[start:stop].reshape(rows, n_images, k)
        maps[start:stop] = scores_from_nearest(nearest, start, stop, members, k, leave_self_out, bank_chunk)
    return maps
