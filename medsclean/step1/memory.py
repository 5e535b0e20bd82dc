"""Step 1 of MeDS: memory-ensemble anomaly maps of the training images themselves.

For one class of N images with patch features f (N, P, D), L2-normalised per patch,
draw B random memories ("banks"), each the patches of m = ceil(ratio * N) images.
A patch's score against a bank is its cosine distance ``1 - <f, z>`` to the nearest
bank patch z (k > 1: the mean of the k smallest distances); its memory score is the
mean over banks. Higher means more anomalous.

Leave-self-out (the default) never matches an image against its own patches: for
a bank that contains image i, i is scored against the bank minus i; a bank that
holds only i is skipped for i, and the mean runs over the remaining banks. When
every bank is skipped for i (only when each bank is {i}), i is scored against all
other images of the class instead. A class with a single image then has no memory
at all and its map is NaN. ``leave_self_out=False`` reproduces the reference code:
an image in a bank matches its own patches at distance 0.

Banks drawn with replacement can list an image twice; a memory holds each member
image's patches once, so duplicates change nothing for k = 1 and are not counted
twice among the k nearest for k > 1.

Two engines give the same maps:

* ``exact`` (torch): one blockwise pass finds, for every patch, its nearest
  distances to every image of the class; a bank's score is then a minimum over its
  members. All B banks cost about one all-against-all comparison, 2 N^2 P^2 D FLOPs.
* ``faiss``: one exact FAISS inner-product index per bank, as the reference does;
  about ``B * ratio`` times the work of ``exact``, but it runs on faiss-gpu when
  torch has no GPU, and ``index="ivf"`` trades exactness for speed on huge classes.

An approximate engine trades exactness for speed on large classes; only the user chooses it
(``engine="approx"``), ``auto`` never does:

* ``approx``: the exact engine's single pass against a reduced memory: every image keeps a
  greedy k-center coreset (PatchCore's, on a random projection) of ``coreset * P`` of its
  patches, so a bank's memory is the union of its members' coresets, a subset of its
  patches. Scores are therefore >= the exact ones patch by patch, equal with
  ``coreset=1``; the work is about ``coreset`` times the exact engine's
  (``docs/scaling.md`` measures its ranking agreement with ``exact``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Hashable, Literal, NamedTuple, Protocol, Sequence

import numpy as np
import torch

from medsclean import seeding
from medsclean.step1 import faiss_index as knn
from medsclean.config import ScoreConfig
from medsclean.errors import ConfigError, DataError

Aggregate = Literal["top1pct", "max"]
EngineName = Literal["auto", "exact", "faiss", "approx"]
CoresetMethod = Literal["greedy", "random"]
ProgressCallback = Callable[[int, int], None]

ALL_CLASSES = "<all>"
"""The class key :func:`score_classes` uses when ``per_class=False``."""

_MIB = 2**20
_FLOAT_BYTES = 4
CPU_BLOCK_BYTES = 256 * _MIB
"""Default working-memory target of one exact-engine block on the CPU."""
GPU_BLOCK_BYTES = 2048 * _MIB
"""Default working-memory target of one exact-engine block on a GPU."""
TABLE_BYTES = 2048 * _MIB
"""Largest :func:`nearest_table` iterative refinement keeps in memory; above it, one pass per round."""
MIN_BLOCK_BYTES = 4 * _MIB
"""Smallest block budget a ``max_memory`` bound may leave after the class's own tensors."""

CPU_FLOPS = 50e9
"""FLOP rate the engine choice assumes on the CPU: the exact engine's measured rate on the
2-core reference machine (docs/bench-score.md, docs/scaling.md)."""
GPU_FLOPS = 20e12
"""FLOP rate assumed on a GPU (float32 matmul of a current data-centre GPU; not measured here)."""
APPROX_ADVICE_SECONDS = 1800.0
"""``engine="auto"`` scores every class exactly (exact or faiss, the same scores); a class whose exact pass is
projected past this many seconds is reported (:attr:`EngineChoice.over_bound`) so that the user can choose
``--engine approx`` for it. It never changes the engine."""
CORESET_PROJECTION_DIM = 128
"""Width of the random projection the greedy coreset measures distances in (PatchCore uses 128)."""


def table_bytes(n_images: int, n_patches: int, k: int = 1) -> int:
    """Bytes of a class's :func:`nearest_table`: 4 * N^2 * P * k."""
    return _FLOAT_BYTES * n_images * n_images * n_patches * k


# ---------------------------------------------------------------------------
# Banks


def bank_size(n_images: int, ratio: float, min_images: int = 1) -> int:
    """Images per bank: ceil(ratio * n_images), at least ``min_images``, at most n_images.

    The product is rounded to 9 decimals first so that float error cannot add an
    image (0.3 * 10 is 3.0000000000000004 in floating point; this gives 3). The floor
    keeps the memories of small classes from becoming a handful of images (72 images at
    ratio 0.1 would give banks of 8).
    """
    return min(max(n_images, 1), max(1, min_images, math.ceil(round(ratio * n_images, 9))))


def draw_banks(
    n_images: int,
    n_banks: int = ScoreConfig.banks,
    ratio: float = ScoreConfig.ratio,
    *,
    replace: bool = True,
    generator: np.random.Generator,
    min_images: int = 1,
) -> np.ndarray:
    """Draw the image indices of each memory bank.

    Args:
        n_images: N, images in the class.
        n_banks: B, number of banks.
        ratio: fraction of the class in one bank (the paper: 0.1).
        replace: draw each bank with replacement (the paper; an index may repeat
            within a bank) or without (the Real-IAD variant). Banks are always
            drawn independently of each other.
        generator: the source of randomness.
        min_images: floor on the bank size (see :func:`bank_size`).

    Returns:
        (B, m) int64 image indices in [0, N), m = :func:`bank_size`.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    if n_banks < 1:
        raise ConfigError("n_banks", f"n_banks must be at least 1, not {n_banks}")
    if not 0.0 < ratio <= 1.0:
        raise ConfigError("ratio", f"ratio must lie in (0, 1], not {ratio}")
    width = bank_size(n_images, ratio, min_images)
    if replace:
        return generator.integers(0, n_images, size=(n_banks, width), dtype=np.int64)
    rows = [generator.choice(n_images, size=width, replace=False) for _ in range(n_banks)]
    return np.stack(rows).astype(np.int64)


def _check_banks(banks: np.ndarray, n_images: int) -> np.ndarray:
    banks = np.asarray(banks)
    if banks.ndim != 2 or banks.shape[0] < 1 or banks.shape[1] < 1:
        raise ValueError(f"banks must be a non-empty (B, m) array, got shape {banks.shape}")
    if not np.issubdtype(banks.dtype, np.integer):
        raise ValueError(f"banks must hold integer image indices, got dtype {banks.dtype}")
    if banks.min() < 0 or banks.max() >= n_images:
        raise ValueError(f"bank indices must lie in [0, {n_images}), got [{banks.min()}, {banks.max()}]")
    return banks.astype(np.int64, copy=False)


def bank_members(banks: np.ndarray) -> list[np.ndarray]:
    """The distinct images of each bank, sorted: B arrays of int64 indices."""
    return [np.unique(row) for row in np.asarray(banks)]


def _padded_members(banks: np.ndarray, pad_index: int) -> torch.Tensor:
    """(B, max distinct members) int64 table of each bank's distinct images, padded with ``pad_index``."""
    members = bank_members(banks)
    width = max(len(row) for row in members)
    table = torch.full((len(members), width), pad_index, dtype=torch.int64)
    for row, images in enumerate(members):
        table[row, : len(images)] = torch.from_numpy(images)
    return table


# ---------------------------------------------------------------------------
# Shared checks


def _as_feature_tensor(features: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The (N, P, D) features as a tensor of their own dtype, without a copy."""
    tensor = torch.as_tensor(features)
    if tensor.ndim != 3:
        raise ValueError(f"features must be (N, P, D), got shape {tuple(tensor.shape)}")
    if tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise ValueError(f"features must hold at least one image and one patch, got {tuple(tensor.shape)}")
    return tensor


def _as_features(features: torch.Tensor | np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, P, D) float32 features on ``device``; float16 input travels as float16, then widens."""
    return _as_feature_tensor(features).to(device).float()


def _check_k(k: int, n_patches: int) -> None:
    if not 1 <= k <= n_patches:
        raise ConfigError("k", f"k must lie in [1, {n_patches}] (the patches per image), not {k}")


def _report(on_block: ProgressCallback | None, done: int, total: int) -> None:
    if on_block is not None:
        on_block(done, total)


# ---------------------------------------------------------------------------
# Exact engine


@dataclass(frozen=True)
class ExactPlan:
    """Block sizes of the exact engine.

    Attributes:
        query_images: images whose patches are scored together in one block.
        database_images: images compared against a query block in one matrix product.
        bank_chunk: banks reduced together.
    """

    query_images: int
    database_images: int
    bank_chunk: int

    def peak_bytes(self, n_images: int, n_patches: int, k: int, n_banks: int, bank_width: int) -> int:
        """Working memory of one block in bytes, besides the float32 features (N * P * D * 4).

        = 4 * q*P * (c*P  +  (N+1)*k  +  b*w*k  +  B), with q query images, c database
        images, b banks per chunk and w distinct images per bank.
        """
        rows = self.query_images * n_patches
        floats = rows * (
            self.database_images * n_patches + (n_images + 1) * k + self.bank_chunk * bank_width * k + n_banks
        )
        return _FLOAT_BYTES * floats


def plan_exact_blocks(
    n_images: int,
    n_patches: int,
    *,
    k: int = ScoreConfig.k,
    n_banks: int = ScoreConfig.banks,
    bank_width: int = 1,
    max_block_bytes: int = CPU_BLOCK_BYTES,
    block_images: int | None = None,
    database_patches: int | None = None,
) -> ExactPlan:
    """Pick block sizes so that one block's working memory stays near ``max_block_bytes``.

    Half of the budget goes to the similarity block, a quarter to the per-image nearest
    distances, the rest to the bank reduction. With a tiny budget the blocks shrink to
    one image, and the memory is then :meth:`ExactPlan.peak_bytes` of that plan.
    ``database_patches``: patches per database image when the memory is reduced (approx engine).
    """
    row_bytes = _FLOAT_BYTES * n_patches
    database_patches = n_patches if database_patches is None else database_patches
    if block_images is None:
        # Per query image: nearest distances (1/4 of the budget), per-bank scores (1/8),
        # and a similarity block against at least one database image (1/2).
        per_query_image = row_bytes * max((n_images + 1) * k * 4, n_banks * 8, n_patches * 2)
        block_images = max_block_bytes // per_query_image
    query_images = int(min(n_images, max(1, block_images)))
    rows_bytes = query_images * row_bytes
    database_images = int(min(n_images, max(1, (max_block_bytes // 2) // (rows_bytes * database_patches))))
    bank_chunk = int(min(n_banks, max(1, (max_block_bytes // 8) // (rows_bytes * bank_width * k))))
    return ExactPlan(query_images, database_images, bank_chunk)


def _nearest_similarities(
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


def _mean_of_k_smallest(distances: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k smallest values along the last dim; +inf where fewer than k are finite."""
    if k == 1:
        return distances.amin(dim=-1)
    return distances.topk(k, dim=-1, largest=False).values.mean(dim=-1)


def _reduce_over_banks(
    nearest: torch.Tensor, member_table: torch.Tensor, k: int, bank_chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's score against every bank, summed over the banks that could score it.

    Args:
        nearest: (R, N+1, k) ascending nearest distances per image; +inf marks an
            image that may not be used (the query's own image, the padding column N).
        member_table: (B, w) distinct members of each bank, padded with N.
        k: neighbours per score.
        bank_chunk: banks reduced together.

    Returns:
        sums: (R,) float32 sum of the bank scores.
        counts: (R,) float32 number of banks that had an image to compare with.
    """
    rows = nearest.shape[0]
    sums = torch.zeros(rows, dtype=nearest.dtype, device=nearest.device)
    counts = torch.zeros(rows, dtype=nearest.dtype, device=nearest.device)
    for start in range(0, member_table.shape[0], bank_chunk):
        chunk = member_table[start : start + bank_chunk]
        gathered = nearest[:, chunk.reshape(-1), :].view(rows, chunk.shape[0], -1)  # (R, b, w*k)
        per_bank = _mean_of_k_smallest(gathered, k)
        usable = torch.isfinite(per_bank)
        sums += torch.where(usable, per_bank, 0.0).sum(dim=1)
        counts += usable.sum(dim=1)
    return sums, counts


def memory_scores_exact(
    features: torch.Tensor | np.ndarray,
    banks: np.ndarray,
    *,
    k: int = ScoreConfig.k,
    leave_self_out: bool = True,
    device: str | torch.device = "cpu",
    block_images: int | None = None,
    max_block_bytes: int | None = None,
    on_block: ProgressCallback | None = None,
) -> torch.Tensor:
    """Memory-ensemble maps of one class, all banks in one pass (see the module docstring).

    Query blocks are streamed: besides the class features (N * P * D float32 on
    ``device``) the working memory is about ``4 * q*P * (c*P + (N+1)*k + b*w*k + B)``
    bytes for q query images per block, c database images per product, b banks per
    reduction chunk and w distinct images per bank (see :func:`plan_exact_blocks`),
    which keeps it near ``max_block_bytes`` unless a single image already exceeds it.

    Args:
        features: (N, P, D) L2-normalised patch features (any float dtype; computed in float32).
        banks: (B, m) image indices of each bank, as from :func:`draw_banks`.
        k: nearest neighbours per score (1 in the paper).
        leave_self_out: never match an image against itself (see the module docstring).
        device: torch device for the matrix products.
        block_images: query images per block; default from ``max_block_bytes``.
        max_block_bytes: working-memory target of one block, in bytes; default
            :data:`CPU_BLOCK_BYTES` on the CPU, :data:`GPU_BLOCK_BYTES` elsewhere.
        on_block: called with (images done, N) after every query block.

    Returns:
        (N, P) float32 CPU tensor of memory scores (cosine distances, higher = more anomalous).
    """
    features = _as_features(features, device)
    _check_k(k, features.shape[1])
    return _one_pass(features, features, banks, k=k, leave_self_out=leave_self_out, block_images=block_images,
                     max_block_bytes=max_block_bytes, on_block=on_block)


def _one_pass(
    features: torch.Tensor,
    database: torch.Tensor,
    banks: np.ndarray,
    *,
    k: int,
    leave_self_out: bool,
    block_images: int | None,
    max_block_bytes: int | None,
    on_block: ProgressCallback | None,
) -> torch.Tensor:
    """The exact engine's pass: every patch of ``features`` (N, P, D) against the patches each
    image keeps in ``database`` (N, P', D): all of them (exact) or a coreset (approx)."""
    n_images, n_patches, dim = features.shape
    banks = _check_banks(banks, n_images)
    if max_block_bytes is None:
        max_block_bytes = CPU_BLOCK_BYTES if features.device.type == "cpu" else GPU_BLOCK_BYTES
    member_table = _padded_members(banks, pad_index=n_images).to(features.device)
    plan = plan_exact_blocks(
        n_images,
        n_patches,
        k=k,
        n_banks=len(banks),
        bank_width=member_table.shape[1],
        max_block_bytes=max_block_bytes,
        block_images=block_images,
        database_patches=database.shape[1],
    )
    maps = torch.empty(n_images, n_patches, dtype=torch.float32)
    for start in range(0, n_images, plan.query_images):
        stop = min(n_images, start + plan.query_images)
        block_maps = _exact_block(features, start, stop, member_table, k, leave_self_out, plan, database)
        maps[start:stop] = block_maps.cpu()
        _report(on_block, stop, n_images)
    return maps


def _exact_block(
    features: torch.Tensor,
    start: int,
    stop: int,
    member_table: torch.Tensor,
    k: int,
    leave_self_out: bool,
    plan: ExactPlan,
    database: torch.Tensor | None = None,
) -> torch.Tensor:
    """(stop-start, P) memory scores of query images start..stop-1 against ``database`` (default: features)."""
    n_images, n_patches, dim = features.shape
    block = stop - start
    rows = block * n_patches
    nearest = torch.empty(rows, n_images + 1, k, dtype=torch.float32, device=features.device)
    queries = features[start:stop].reshape(rows, dim).float()
    _nearest_similarities(queries, features if database is None else database, k, plan.database_images, nearest)
    torch.sub(1.0, nearest, out=nearest)  # similarities -> distances, ascending along k
    return _scores_from_nearest(nearest, start, stop, member_table, k, leave_self_out, plan.bank_chunk)


def _scores_from_nearest(
    nearest: torch.Tensor,
    start: int,
    stop: int,
    member_table: torch.Tensor,
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
    sums, counts = _reduce_over_banks(nearest, member_table, k, bank_chunk)
    scores = sums / counts
    unscored = counts == 0
    if unscored.any():
        # No bank held another image: fall back to every other image of the class.
        fallback = _mean_of_k_smallest(nearest[unscored, :n_images, :].reshape(int(unscored.sum()), -1), k)
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
    features = _as_features(features, device)
    queries = features if queries is None else _as_features(queries, device)
    n_images, n_patches, dim = features.shape
    n_queries = queries.shape[0]
    _check_k(k, n_patches)
    if max_block_bytes is None:
        max_block_bytes = CPU_BLOCK_BYTES if features.device.type == "cpu" else GPU_BLOCK_BYTES
    plan = plan_exact_blocks(n_images, n_patches, k=k, n_banks=1, bank_width=1, max_block_bytes=max_block_bytes)
    table = torch.empty(n_queries, n_patches, n_images, k, dtype=torch.float32)
    for start in range(0, n_queries, plan.query_images):
        stop = min(n_queries, start + plan.query_images)
        rows = (stop - start) * n_patches
        nearest = torch.empty(rows, n_images + 1, k, dtype=torch.float32, device=features.device)
        _nearest_similarities(queries[start:stop].reshape(rows, dim), features, k, plan.database_images, nearest)
        table[start:stop] = (1.0 - nearest[:, :n_images]).view(stop - start, n_patches, n_images, k).cpu()
        _report(on_block, stop, n_queries)
    return table


def scores_from_table(table: torch.Tensor, banks: np.ndarray, *, leave_self_out: bool = True,
                      block_images: int = 16) -> torch.Tensor:
    """Memory-ensemble maps from a :func:`nearest_table`: equal to :func:`memory_scores_exact`
    on the same features and banks.

    Args:
        table: (N, P, N, k) nearest distances.
        banks: (B, m) image indices of each bank.
        leave_self_out: never match an image against itself.
        block_images: query images reduced together.

    Returns:
        (N, P) float32 maps.
    """
    n_images, n_patches, _, k = table.shape
    banks = _check_banks(banks, n_images)
    member_table = _padded_members(banks, pad_index=n_images)
    bank_chunk = max(1, min(len(banks), 64))
    maps = torch.empty(n_images, n_patches, dtype=torch.float32)
    for start in range(0, n_images, block_images):
        stop = min(n_images, start + block_images)
        rows = (stop - start) * n_patches
        nearest = torch.empty(rows, n_images + 1, k, dtype=torch.float32)
        nearest[:, :n_images] = table[start:stop].reshape(rows, n_images, k)
        maps[start:stop] = _scores_from_nearest(nearest, start, stop, member_table, k, leave_self_out, bank_chunk)
    return maps


# ---------------------------------------------------------------------------
# Approximate engine: the exact pass against per-image patch coresets


def coreset_size(n_patches: int, coreset: float, k: int = 1) -> int:
    """Patches each image keeps: ceil(coreset * P), at least k (and 1), at most P."""
    return min(n_patches, max(1, k, math.ceil(round(coreset * n_patches, 9))))


def coreset_patches(
    features: torch.Tensor | np.ndarray,
    coreset: float,
    *,
    generator: np.random.Generator,
    method: CoresetMethod = "greedy",
    k: int = 1,
    projection_dim: int = CORESET_PROJECTION_DIM,
    block_images: int = 256,
) -> torch.Tensor:
    """Indices of the patches each image keeps in the approx engine's memories.

    ``greedy``: PatchCore's greedy k-center coreset, per image: the features are projected to
    ``projection_dim`` dimensions by one Gaussian matrix, the first centre is a random patch,
    and each next centre is the patch farthest (Euclidean, in the projection) from those
    chosen. ``random``: a uniform random subset. Both draw only from ``generator``, so the
    same generator state gives the same coreset.

    Args:
        features: (N, P, D) patch features.
        coreset: share of each image's patches kept (:func:`coreset_size`).
        generator: the source of randomness.
        method: "greedy" or "random".
        k: the coreset keeps at least k patches.
        projection_dim: width of the random projection (none when D is not larger).
        block_images: images processed together.

    Returns:
        (N, s) int64 patch indices, s = :func:`coreset_size`; with s = P, every patch in order.
    """
    features = _as_feature_tensor(features)
    n_images, n_patches, dim = features.shape
    size = coreset_size(n_patches, coreset, k)
    if size == n_patches:
        return torch.arange(n_patches).expand(n_images, n_patches).clone()
    if method == "random":
        keys = generator.random((n_images, n_patches))
        return torch.from_numpy(np.sort(np.argsort(keys, axis=1, kind="stable")[:, :size], axis=1))
    if method != "greedy":
        raise ConfigError("coreset_method", f"coreset method must be greedy or random, not {method!r}")
    projection = None
    if dim > projection_dim:
        projection = torch.from_numpy(generator.standard_normal((dim, projection_dim)).astype(np.float32))
        projection = projection.to(features.device)
    starts = torch.from_numpy(generator.integers(0, n_patches, size=n_images))
    chosen = torch.empty(n_images, size, dtype=torch.int64)
    for first in range(0, n_images, block_images):
        last = min(n_images, first + block_images)
        points = features[first:last].float()
        if projection is not None:
            points = points @ projection
        rows = torch.arange(last - first, device=points.device)
        centre = starts[first:last].to(points.device)
        picked = [centre]
        nearest = ((points - points[rows, centre][:, None, :]) ** 2).sum(dim=-1)
        for _ in range(1, size):
            centre = nearest.argmax(dim=1)
            picked.append(centre)
            nearest = torch.minimum(nearest, ((points - points[rows, centre][:, None, :]) ** 2).sum(dim=-1))
        chosen[first:last] = torch.stack(picked, dim=1).cpu()
    return chosen


def memory_scores_approx(
    features: torch.Tensor | np.ndarray,
    banks: np.ndarray,
    *,
    coreset: float = ScoreConfig.coreset,
    generator: np.random.Generator | None = None,
    method: CoresetMethod = "greedy",
    k: int = ScoreConfig.k,
    leave_self_out: bool = True,
    device: str | torch.device = "cpu",
    block_images: int | None = None,
    max_block_bytes: int | None = None,
    on_block: ProgressCallback | None = None,
) -> torch.Tensor:
    """Memory-ensemble maps of one class against per-image coresets (see the module docstring).

    Every patch of every image is scored, as by :func:`memory_scores_exact`; only the memories
    shrink: a bank's memory is the union of its members' :func:`coreset_patches`. A patch's
    distance to a subset is never smaller, so the maps are >= the exact maps, and equal to
    them with ``coreset=1``. Work: about ``coreset`` times the exact engine's products.

    Args:
        features: (N, P, D) L2-normalised patch features.
        banks: (B, m) image indices of each bank.
        coreset: share of each image's patches kept.
        generator: randomness of the coreset (default: seed 0).
        method: "greedy" (k-center) or "random" coreset.
        k, leave_self_out, device, block_images, max_block_bytes, on_block: as for
            :func:`memory_scores_exact`.

    Returns:
        (N, P) float32 CPU tensor of memory scores.
    """
    features = _as_features(features, device)
    n_images, n_patches, dim = features.shape
    _check_k(k, n_patches)
    if generator is None:
        generator = np.random.default_rng(0)
    kept = coreset_patches(features, coreset, generator=generator, method=method, k=k).to(features.device)
    database = features if kept.shape[1] == n_patches else \
        torch.gather(features, 1, kept[:, :, None].expand(-1, -1, dim))
    return _one_pass(features, database, banks, k=k, leave_self_out=leave_self_out, block_images=block_images,
                     max_block_bytes=max_block_bytes, on_block=on_block)


def working_set_bytes(n_images: int, n_patches: int, dim: int, *, coreset: float = 1.0, k: int = 1) -> int:
    """Bytes a class's own tensors hold during Step 1 besides the blocks: its float32 features,
    the reduced memory of the approx engine (``coreset`` < 1) and the (N, P) maps."""
    kept = coreset_size(n_patches, coreset, k)
    reduced = n_images * kept * dim if kept < n_patches else 0
    return _FLOAT_BYTES * (n_images * n_patches * dim + reduced + 2 * n_images * n_patches)


def block_budget(max_memory: int, n_images: int, n_patches: int, dim: int, *, coreset: float = 1.0,
                 k: int = 1, label: Hashable = ALL_CLASSES) -> int:
    """The block budget ``max_memory`` leaves once the class's own tensors are counted.

    Raises:
        DataError: the class's own tensors leave less than :data:`MIN_BLOCK_BYTES`.
    """
    own = working_set_bytes(n_images, n_patches, dim, coreset=coreset, k=k)
    budget = max_memory - own
    if budget < MIN_BLOCK_BYTES:
        raise DataError(
            f"class {label!r} needs {own / 1e9:.2f} GB for its features and maps alone, more than the "
            f"{max_memory / 1e9:.2f} GB of --max-memory allow with {MIN_BLOCK_BYTES // _MIB} MiB of blocks; "
            "raise --max-memory")
    return int(budget)


# ---------------------------------------------------------------------------
# FAISS engine


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
    use_gpu: bool | None = None,
    index: knn.IndexKind = "flat",
    nlist: int | None = None,
    nprobe: int | None = None,
    seed: int = 0,
    on_block: ProgressCallback | None = None,
) -> torch.Tensor:
    """Memory-ensemble maps of one class with one FAISS index per bank.

    Images outside a bank search its index for their k nearest patches. Under
    leave-self-out the bank's own members search the same index for k + P
    neighbours and drop those of their own image (at most P), which is exact for
    ``index="flat"`` and costs a larger result heap for about ``ratio`` of the
    queries. Total work is about ``B * ratio`` all-against-all passes.
    (faiss-gpu limits k + P to 2048.)

    With ``index="ivf"`` the search is approximate; a patch for which a bank returns
    no neighbour skips that bank.

    Args:
        features: (N, P, D) L2-normalised patch features.
        banks: (B, m) image indices of each bank, as from :func:`draw_banks`.
        k: nearest neighbours per score.
        leave_self_out: never match an image against itself (see the module docstring).
        use_gpu: faiss-gpu on/off; None uses it when available.
        index: "flat" (exact) or "ivf" (approximate).
        nlist: IVF lists per bank index (default :func:`medsclean.step1.faiss_index.default_nlist`).
        nprobe: IVF lists visited per query (default :func:`medsclean.step1.faiss_index.default_nprobe`).
        seed: seed of the IVF k-means.
        on_block: called with (banks done, B) after every bank.

    Returns:
        (N, P) float32 CPU tensor of memory scores.
    """
    array = np.ascontiguousarray(_as_features(features).numpy())
    n_images, n_patches, dim = array.shape
    banks = _check_banks(banks, n_images)
    _check_k(k, n_patches)
    sums = np.zeros((n_images, n_patches))
    counts = np.zeros((n_images, n_patches))
    options = dict(index=index, use_gpu=use_gpu, nlist=nlist, nprobe=nprobe, seed=seed)
    for done, members in enumerate(bank_members(banks), start=1):
        faiss_index = knn.build_inner_product_index(array[members].reshape(-1, dim), **options)
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
        _report(on_block, done, len(banks))
    scores = np.divide(sums, counts, out=np.full_like(sums, np.nan), where=counts > 0)
    unscored = np.flatnonzero((counts == 0).any(axis=1))
    if len(unscored) and n_images > 1:
        # No bank held another image: fall back to every other image of the class.
        faiss_index = knn.build_inner_product_index(array.reshape(-1, dim), **options)
        exclude = np.repeat(unscored, n_patches)
        fallback = _search_distances(faiss_index, array[unscored].reshape(-1, dim), k, n_patches, exclude)
        scores[unscored] = np.where(counts[unscored] == 0, fallback.reshape(-1, n_patches), scores[unscored])
    return torch.from_numpy(scores.astype(np.float32))


# ---------------------------------------------------------------------------
# Engine choice, image scores, classes


class EngineChoice(NamedTuple):
    """The engine a class is scored with, why, and its projected exact time.

    Attributes:
        name: "exact", "faiss" or "approx" (approx only when the user asked for it).
        reason: one line for the log and the run's record.
        projected_seconds: the exact pass's projected time on this device (:func:`projected_exact_seconds`).
        over_bound: ``engine="auto"`` and ``projected_seconds`` passes the advice bound: the class is still
            scored exactly, and the run says that ``--engine approx`` would be faster.
    """

    name: Literal["exact", "faiss", "approx"]
    reason: str
    projected_seconds: float = 0.0
    over_bound: bool = False


def exact_flops(n_images: int, n_patches: int, dim: int) -> float:
    """FLOPs of the exact engine's distance products: 2 * N^2 * P^2 * D."""
    return 2.0 * n_images**2 * n_patches**2 * dim


def bank_flops(n_images: int, n_patches: int, dim: int, *, n_banks: int = ScoreConfig.banks, ratio: float = ScoreConfig.ratio) -> float:
    """FLOPs of searching every bank separately (FAISS engine, reference): 2 * N*P * m*P * D * B."""
    return 2.0 * n_images * n_patches * bank_size(n_images, ratio) * n_patches * dim * n_banks


def choose_engine(
    n_images: int,
    n_patches: int,
    dim: int,
    *,
    device: str | torch.device,
    faiss_gpu: bool | None = None,
    n_banks: int = ScoreConfig.banks,
    ratio: float = ScoreConfig.ratio,
    advice_seconds: float = APPROX_ADVICE_SECONDS,
) -> EngineChoice:
    """The engine ``--engine auto`` runs for one class: always one that gives the exact scores.

    The exact engine does the least work (one all-against-all pass instead of about
    ``B * ratio``), so it wins wherever torch has the fastest device. FAISS (flat, exact) is
    picked only when faiss-gpu sees a GPU that torch was not given. The approximate engine is
    never picked: when the exact pass is projected past ``advice_seconds`` the choice says so
    (``over_bound``), for the caller to tell the user.

    Args:
        n_images: N, images in the class.
        n_patches: P, patches per image.
        dim: D, feature width.
        device: the torch device the exact engine would run on.
        faiss_gpu: whether faiss-gpu sees a GPU; None asks :func:`medsclean.step1.faiss_index.gpu_count`.
        n_banks: B.
        ratio: bank ratio.
        advice_seconds: projected exact time past which the choice is marked ``over_bound``.

    Returns:
        The :class:`EngineChoice`.
    """
    device = torch.device(device)
    if faiss_gpu is None:
        faiss_gpu = knn.gpu_count() > 0
    one_pass = exact_flops(n_images, n_patches, dim)
    per_bank = bank_flops(n_images, n_patches, dim, n_banks=n_banks, ratio=ratio)
    work = f"exact {one_pass / 1e12:.3g} TFLOP vs per-bank search {per_bank / 1e12:.3g} TFLOP"
    seconds = projected_exact_seconds(n_images, n_patches, dim, device=device)
    over = seconds > advice_seconds
    if device.type != "cpu":
        return EngineChoice("exact", f"torch on {device}: {work}", seconds, over)
    if faiss_gpu:
        return EngineChoice("faiss", f"faiss-gpu sees a GPU and torch runs on the CPU ({work})", seconds, over)
    return EngineChoice("exact", f"CPU only: {work}", seconds, over)


def projected_exact_seconds(n_images: int, n_patches: int, dim: int, *, device: str | torch.device = "cpu") -> float:
    """Projected time of the exact engine on one class: its FLOPs at :data:`CPU_FLOPS` or :data:`GPU_FLOPS`."""
    rate = CPU_FLOPS if torch.device(device).type == "cpu" else GPU_FLOPS
    return exact_flops(n_images, n_patches, dim) / rate


def image_scores(maps: torch.Tensor | np.ndarray, *, aggregate: Aggregate = "top1pct") -> torch.Tensor:
    """One score per image from its patch map.

    Args:
        maps: (N, P) patch scores, higher = more anomalous.
        aggregate: "top1pct", the mean of the max(1, int(0.01 * P)) largest values (the
            reference code's image score), or "max".

    Returns:
        (N,) float32 image scores; NaN for a map holding NaN.
    """
    from medsclean.maps import TOP1PCT, topk_mean_score

    maps = torch.as_tensor(maps).float()
    if maps.ndim != 2:
        raise ValueError(f"maps must be (N, P), got shape {tuple(maps.shape)}")
    if aggregate not in ("top1pct", "max"):
        raise ConfigError("aggregate", f"aggregate must be top1pct or max, not {aggregate!r}")
    return topk_mean_score(maps, ratio=TOP1PCT if aggregate == "top1pct" else 0.0)


def class_generator(seed: int, label: Hashable) -> np.random.Generator:
    """The bank generator of one class: keyed by the run seed and the 64-bit id of ``str(label)``."""
    return seeding.rng(seed, seeding.stable_id64(str(label)))


def _group_images(classes: Sequence[Hashable], per_class: bool) -> dict[Hashable, np.ndarray]:
    if not per_class:
        return {ALL_CLASSES: np.arange(len(classes))}
    groups: dict[Hashable, list[int]] = {}
    for position, label in enumerate(classes):
        groups.setdefault(label, []).append(position)
    return {label: np.asarray(positions, dtype=np.int64) for label, positions in groups.items()}


def score_classes(
    features: torch.Tensor | np.ndarray,
    classes: Sequence[Hashable],
    *,
    n_banks: int = ScoreConfig.banks,
    ratio: float = ScoreConfig.ratio,
    k: int = ScoreConfig.k,
    replace: bool = True,
    per_class: bool = True,
    leave_self_out: bool = True,
    engine: EngineName = "auto",
    seed: int = 0,
    device: str | torch.device = "cpu",
    faiss_index: knn.IndexKind = "flat",
    max_block_bytes: int | None = None,
    max_memory: int | None = None,
    coreset: float = ScoreConfig.coreset,
    min_bank: int = ScoreConfig.min_bank,
    refine_rounds: int = 0,
    refine_drop: float = ScoreConfig.refine_drop,
    aggregate: Aggregate = "top1pct",
    tables: dict[Hashable, torch.Tensor] | None = None,
    executor: "TaskExecutor | None" = None,
    advice_seconds: float = APPROX_ADVICE_SECONDS,
    on_engine: Callable[[Hashable, EngineChoice], None] | None = None,
    on_progress: Callable[[Hashable, int, int], None] | None = None,
    on_class: Callable[[Hashable], None] | None = None,
) -> tuple[torch.Tensor, dict[Hashable, torch.Tensor]]:
    """Memory-ensemble maps of a whole training set, class by class.

    Each class (or, with ``per_class=False``, the whole set under the key
    :data:`ALL_CLASSES`) draws its banks from :func:`class_generator` (seed, class
    name), so a class's banks do not depend on the other classes or on image order
    across classes, and the same seed gives identical output.

    Args:
        features: (N, P, D) L2-normalised patch features of all images: a tensor, or rows read on
            demand (``store.ShardedRows``), so that only one class is in memory at a time, and
            under ``max_memory`` not even that (the exact engine then streams key chunks).
        classes: N class labels, one per image.
        n_banks: B banks per class.
        ratio: fraction of the class per bank.
        k: nearest neighbours per score.
        replace: draw banks with replacement (the paper) or without.
        per_class: score each class against its own images, or all images together.
        leave_self_out: never match an image against itself.
        engine: "exact", "faiss", "approx" or "auto" (:func:`choose_engine`: exact or faiss, never approx).
        seed: non-negative run seed.
        device: torch device of the exact engine.
        faiss_index: "flat" or "ivf" for the FAISS engine.
        max_block_bytes: block memory target of the exact engine (default by device).
        max_memory: bound in bytes on a class's Step-1 working set (its float32 features, the
            reduced memory, the maps and the blocks); the block budget is what is left
            (:func:`block_budget`). Overrides ``max_block_bytes``.
        coreset: share of each image's patches the approx engine keeps.
        min_bank: floor on the images per bank (:func:`bank_size`).
        refine_rounds: iterative refinement (SROC-style), for a single full bank: after
            scoring, keep the ``1 - r * refine_drop`` least suspicious share of the class
            as the memory and score every image again against it, r = 1..refine_rounds
            (see :func:`refine_memory`).
        refine_drop: share of the class dropped from the memory per round.
        aggregate: image score that ranks images during refinement.
        tables: class -> its :func:`nearest_table`, precomputed; such a class is scored from
            its table (the same maps, no pass over the features).
        executor: runs the exact engine's (query block x key chunk) tasks elsewhere (Ray workers,
            ``medsclean.distributed``); the maps are identical to those of this process.
        advice_seconds: under "auto", a class whose exact pass is projected past this is still scored
            exactly, and its EngineChoice has ``over_bound`` set (:func:`choose_engine`).
        on_engine: called with (class, EngineChoice) before a class is scored.
        on_progress: called with (class, done, total) as a class advances.
        on_class: called with the class label when a class is finished.

    Returns:
        maps: (N, P) float32 memory scores in the input order.
        banks: class -> (B, m) int64 tensor of banks as positions into ``features``.

    Raises:
        DataError: a class has a single image under leave-self-out.
        ConfigError: an unknown engine or an invalid option.
    """
    source = features if hasattr(features, "subset") else None
    tensor = None if source is not None else _as_feature_tensor(features)  # float16 stays float16
    if len(classes) != (source or tensor).shape[0]:
        raise ValueError(f"got {len(classes)} class labels for {(source or tensor).shape[0]} feature maps")
    if engine not in ("auto", "exact", "faiss", "approx"):
        raise ConfigError("engine", f"engine must be auto, exact, faiss or approx, not {engine!r}")
    n_images, n_patches, dim = (source or tensor).shape
    maps = torch.empty(n_images, n_patches, dtype=torch.float32)
    banks_per_class: dict[Hashable, torch.Tensor] = {}
    for label, positions in _group_images(classes, per_class).items():
        if leave_self_out and len(positions) < 2:
            raise DataError(
                f"class {label!r} has a single training image, so leave-self-out has no memory for it; "
                "add images to the class or pass --include-self"
            )
        rows = torch.from_numpy(positions)
        class_rows = source.subset(positions) if source is not None else _memory_blocks().TensorRows(tensor[rows])
        generator = class_generator(seed, label)
        local_banks = draw_banks(len(positions), n_banks, ratio, replace=replace, generator=generator,
                                 min_images=min_bank)
        choice = _resolve_engine(engine, len(positions), n_patches, dim, device, n_banks, ratio, advice_seconds)
        if on_engine is not None:
            on_engine(label, choice)
        progress = None if on_progress is None else (lambda done, total, label=label: on_progress(label, done, total))
        options = dict(k=k, leave_self_out=leave_self_out, on_block=progress)
        class_block_bytes, key_images = max_block_bytes, None
        if max_memory is not None and choice.name == "exact" and \
                working_set_bytes(len(positions), n_patches, dim, k=k) + MIN_BLOCK_BYTES > max_memory:
            class_block_bytes, key_images = streaming_layout(max_memory, len(positions), n_patches, dim, k=k,
                                                             label=label)
        elif max_memory is not None and choice.name in ("exact", "approx"):
            class_block_bytes = block_budget(max_memory, len(positions), n_patches, dim, k=k, label=label,
                                             coreset=coreset if choice.name == "approx" else 1.0)
        if choice.name in ("exact", "approx"):
            options.update(device=device, max_block_bytes=class_block_bytes)
        else:
            options.update(index=faiss_index, seed=seed)
        if choice.name == "approx":
            # The coreset draws from the class generator after the banks: deterministic per (seed, class),
            # and the same coreset for every bank set (refinement rounds) of the class.
            coreset_state = generator.bit_generator.state
            options.update(coreset=coreset, generator=generator)
        engine_function = {"exact": memory_scores_exact, "faiss": memory_scores_faiss,
                           "approx": memory_scores_approx}[choice.name]

        def score_against(bank, class_rows=class_rows, options=options):
            if "generator" in options:
                generator.bit_generator.state = coreset_state
            return engine_function(class_rows.read(), bank, **options)

        blocked = choice.name == "exact" and (executor is not None or
                                              (key_images is not None and torch.device(device).type == "cpu"))
        if blocked:
            score_against = functools.partial(
                _score_blocked, class_rows, k=k, leave_self_out=leave_self_out, max_block_bytes=class_block_bytes,
                key_images=key_images, executor=executor, device=str(device), on_block=progress)
        table = (tables or {}).get(label)
        if table is None and refine_rounds and choice.name == "exact" and not blocked and \
                table_bytes(len(positions), n_patches, k) <= TABLE_BYTES:
            table = nearest_table(class_rows.read(), k=k, device=device, max_block_bytes=class_block_bytes,
                                  on_block=progress)
        if table is not None:
            score_against = lambda bank, table=table: scores_from_table(  # noqa: E731
                table, bank, leave_self_out=leave_self_out)
        if refine_rounds:
            local_banks, maps[rows] = refine_memory(score_against, len(positions), rounds=refine_rounds,
                                                    drop=refine_drop, aggregate=aggregate)
        else:
            maps[rows] = score_against(local_banks)
        banks_per_class[label] = torch.from_numpy(positions[local_banks])
        if on_class is not None:
            on_class(label)
    return maps, banks_per_class


class TaskExecutor(Protocol):
    """Runs the exact engine's block tasks (``memory_blocks.MapTasks``) on `workers` workers."""

    workers: int

    def map_tasks(self, function, job, tasks): ...


def _memory_blocks():
    from medsclean.step1 import blocks as memory_blocks  # it imports this module's engine internals

    return memory_blocks


def _score_blocked(class_rows, bank: np.ndarray, *, k: int, leave_self_out: bool, max_block_bytes: int | None,
                   key_images: int | None, executor: TaskExecutor | None, device: str, on_block) -> torch.Tensor:
    """The exact maps of a class from block tasks: streamed here under a memory bound, or spread
    over the executor's workers (about four tasks per worker; on `device` "cuda", one GPU each)."""
    blocks = _memory_blocks()
    if max_block_bytes is None:
        max_block_bytes = CPU_BLOCK_BYTES if torch.device(device).type == "cpu" else GPU_BLOCK_BYTES
    spread = {} if executor is None else {"min_tasks": 4 * executor.workers, "map_tasks": executor.map_tasks}
    return blocks.memory_scores_blocked(class_rows, bank, k=k, leave_self_out=leave_self_out,
                                        max_block_bytes=max_block_bytes, key_images=key_images, device=device,
                                        on_block=on_block, **spread)


def streaming_layout(max_memory: int, n_images: int, n_patches: int, dim: int, *, k: int = 1,
                     label: Hashable = ALL_CLASSES) -> tuple[int, int]:
    """Block budget and key-chunk size (images) of the exact engine when the class's features do
    not fit in ``max_memory``: the (N, P) maps are held, a quarter of the rest goes to a key chunk
    of float16 features (read, then copied out of its shard), the blocks take the rest.

    Raises:
        DataError: the maps alone leave less than twice :data:`MIN_BLOCK_BYTES`.
    """
    own = 2 * _FLOAT_BYTES * n_images * n_patches
    budget = max_memory - own
    if budget < 2 * MIN_BLOCK_BYTES:
        raise DataError(
            f"class {label!r} needs {own / 1e9:.2f} GB for its maps alone, more than the {max_memory / 1e9:.2f} GB "
            f"of --max-memory allow with {2 * MIN_BLOCK_BYTES // _MIB} MiB of blocks; raise --max-memory")
    key_images = max(1, (budget // 4) // (2 * 2 * n_patches * dim))
    return int(budget // 2), int(key_images)


def refine_memory(
    score_against: Callable[[np.ndarray], torch.Tensor],
    n_images: int,
    *,
    rounds: int,
    drop: float,
    aggregate: Aggregate = "top1pct",
) -> tuple[np.ndarray, torch.Tensor]:
    """Iterative refinement of a full-bank memory: score, shrink the memory, score again.

    Round 0 scores every image against all others (leave-self-out kNN). Round r keeps the
    n - round(r * drop * n) images with the lowest scores of round r - 1 as the memory
    (at least 2) and scores every image against it, so suspicious images stop vouching for
    each other one share at a time.

    Args:
        score_against: maps a (1, m) bank of image indices to (N, P) maps of all N images.
        n_images: N.
        rounds: refinement rounds after the first scoring.
        drop: share of the class removed from the memory per round.
        aggregate: image score used to rank images.

    Returns:
        bank: (1, m) int64 indices of the final memory.
        maps: (N, P) maps of the last round.
    """
    bank = np.arange(n_images, dtype=np.int64)[None, :]
    maps = score_against(bank)
    for r in range(1, rounds + 1):
        keep = max(2, n_images - round(r * drop * n_images))
        order = np.argsort(image_scores(maps, aggregate=aggregate).numpy(), kind="stable")
        bank = np.sort(order[:keep])[None, :]
        maps = score_against(bank)
    return bank, maps


def _resolve_engine(
    engine: EngineName, n_images: int, n_patches: int, dim: int, device, n_banks: int, ratio: float,
    advice_seconds: float = APPROX_ADVICE_SECONDS,
) -> EngineChoice:
    seconds = projected_exact_seconds(n_images, n_patches, dim, device=device)
    if engine == "auto":
        return choose_engine(n_images, n_patches, dim, device=device, faiss_gpu=knn.gpu_count() > 0,
                             n_banks=n_banks, ratio=ratio, advice_seconds=advice_seconds)
    return EngineChoice(engine, f"--engine {engine}", seconds, False)
