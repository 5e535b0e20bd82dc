"""Engine ``approx``: the exact engine's pass against a reduced memory. Only the user chooses it
(``--engine approx``); ``auto`` never does.

Every image keeps a greedy k-center coreset (PatchCore's, on a random projection) of
``coreset * P`` of its patches, so a bank's memory is the union of its members' coresets, a subset
of its patches. Scores are therefore >= the exact ones patch by patch, equal with ``coreset=1``;
the work is about ``coreset`` times the exact engine's (``docs/scaling.md`` measures its ranking
agreement with ``exact``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from medsclean.config import ScoreConfig
from medsclean.errors import ConfigError
from medsclean.step1.engines.exact import exact_pass
from medsclean.step1.plan import block_budget, coreset_size
from medsclean.step1.rows import as_feature_tensor, as_features, check_k
from medsclean.step1.runtime import BankScorer, ClassJob, ProgressCallback

CoresetMethod = Literal["greedy", "random"]

CORESET_PROJECTION_DIM = 128
"""Width of the random projection the greedy coreset measures distances in (PatchCore uses 128)."""


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
        coreset: share of each image's patches kept (``plan.coreset_size``).
        generator: the source of randomness.
        method: "greedy" or "random".
        k: the coreset keeps at least k patches.
        projection_dim: width of the random projection (none when D is not larger).
        block_images: images processed together.

    Returns:
        (N, s) int64 patch indices, s = ``plan.coreset_size``; with s = P, every patch in order.
    """
    features = as_feature_tensor(features)
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
        chosen[first:last] = _greedy_centres(features[first:last].float(), starts[first:last], size, projection)
    return chosen


def _greedy_centres(points: torch.Tensor, starts: torch.Tensor, size: int,
                    projection: torch.Tensor | None) -> torch.Tensor:
    """(n, size) k-center picks of n images' (n, P, D) patches from their first centres `starts` (n,)."""
    if projection is not None:
        points = points @ projection
    rows = torch.arange(points.shape[0], device=points.device)
    centre = starts.to(points.device)
    picked = [centre]
    nearest = ((points - points[rows, centre][:, None, :]) ** 2).sum(dim=-1)
    for _ in range(1, size):
        centre = nearest.argmax(dim=1)
        picked.append(centre)
        nearest = torch.minimum(nearest, ((points - points[rows, centre][:, None, :]) ** 2).sum(dim=-1))
    return torch.stack(picked, dim=1).cpu()


def memory_scores_approx(
    features: torch.Tensor | np.ndarray,
    banks: np.ndarray,
    kept: torch.Tensor,
    *,
    k: int = ScoreConfig.k,
    leave_self_out: bool = True,
    device: str | torch.device = "cpu",
    max_block_bytes: int | None = None,
    on_block: ProgressCallback | None = None,
) -> torch.Tensor:
    """Memory-ensemble maps of one class against per-image coresets.

    Every patch of every image is scored, as by ``engines.exact.memory_scores_exact``; only the
    memories shrink: a bank's memory is the union of its members' ``kept`` patches. A patch's
    distance to a subset is never smaller, so the maps are >= the exact maps, and equal to
    them when every patch is kept. Work: about s / P times the exact engine's products.

    Args:
        features: (N, P, D) L2-normalised patch features.
        banks: (B, m) image indices of each bank.
        kept: (N, s) patch indices each image keeps, from :func:`coreset_patches`.
        k, leave_self_out, device, max_block_bytes, on_block: as for ``memory_scores_exact``.

    Returns:
        (N, P) float32 CPU tensor of memory scores.
    """
    features = as_features(features, device)
    n_images, n_patches, dim = features.shape
    check_k(k, n_patches)
    kept = torch.as_tensor(kept).to(features.device)
    database = features if kept.shape[1] == n_patches else \
        torch.gather(features, 1, kept[:, :, None].expand(-1, -1, dim))
    return exact_pass(features, database, banks, k=k, leave_self_out=leave_self_out, block_images=None,
                      max_block_bytes=max_block_bytes, on_block=on_block)


def score_class(job: ClassJob) -> BankScorer:
    """The approx engine for one class. The coreset draws from the class generator after the banks:
    deterministic per (seed, class), and the same coreset for every bank set (refinement rounds)."""
    n_images, n_patches, dim = job.rows.shape
    cfg, runtime = job.cfg, job.runtime
    block_bytes = runtime.max_block_bytes
    if job.max_memory is not None:
        block_bytes = block_budget(job.max_memory, n_images, n_patches, dim, k=cfg.k, label=job.label,
                                   coreset=cfg.coreset)
    state = job.generator.bit_generator.state

    def score(bank: np.ndarray) -> torch.Tensor:
        job.generator.bit_generator.state = state
        features = as_features(job.rows.read(), runtime.device)
        kept = coreset_patches(features, cfg.coreset, generator=job.generator, k=cfg.k)
        return memory_scores_approx(features, bank, kept, k=cfg.k, leave_self_out=job.leave_self_out,
                                    device=runtime.device, max_block_bytes=block_bytes, on_block=job.on_block)

    return score
