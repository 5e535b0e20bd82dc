"""Engine ``exact`` (torch): every patch against every image of the class in one blockwise pass.

One pass finds, for every patch, its nearest distances to every image of the class; a bank's
score is then a minimum over its members (``reduce``). All B banks cost about one
all-against-all comparison, 2 N^2 P^2 D FLOPs. Under an executor, or when the class's features
do not fit ``--max-memory`` on the CPU, the same pass runs as block tasks (``engines.blocked``);
with iterative refinement it keeps the pass whole as a table and reduces it once per round.
"""

from __future__ import annotations

import numpy as np
import torch

from medsclean.config import ScoreConfig
from medsclean.step1.banks import check_banks, member_table
from medsclean.step1.engines.blocked import blocked_scorer
from medsclean.step1.plan import (MIN_BLOCK_BYTES, TABLE_BYTES, ExactPlan, block_budget, default_block_bytes,
                                  plan_exact_blocks, streaming_layout, table_bytes, working_set_bytes)
from medsclean.step1.reduce import nearest_similarities, nearest_table, scores_from_nearest, scores_from_table
from medsclean.step1.rows import as_features, check_k
from medsclean.step1.runtime import BankScorer, ClassJob, ProgressCallback, report_progress


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
    """Memory-ensemble maps of one class, all banks in one pass (see ``medsclean.step1``).

    Query blocks are streamed: besides the class features (N * P * D float32 on
    ``device``) the working memory is about ``4 * q*P * (c*P + (N+1)*k + b*w*k + B)``
    bytes for q query images per block, c database images per product, b banks per
    reduction chunk and w distinct images per bank (see ``plan.plan_exact_blocks``),
    which keeps it near ``max_block_bytes`` unless a single image already exceeds it.

    Args:
        features: (N, P, D) L2-normalised patch features (any float dtype; computed in float32).
        banks: (B, m) image indices of each bank, as from ``banks.draw_banks``.
        k: nearest neighbours per score (1 in the paper).
        leave_self_out: never match an image against itself.
        device: torch device for the matrix products.
        block_images: query images per block; default from ``max_block_bytes``.
        max_block_bytes: working-memory target of one block, in bytes; default
            ``plan.CPU_BLOCK_BYTES`` on the CPU, ``plan.GPU_BLOCK_BYTES`` elsewhere.
        on_block: called with (images done, N) after every query block.

    Returns:
        (N, P) float32 CPU tensor of memory scores (cosine distances, higher = more anomalous).
    """
    features = as_features(features, device)
    check_k(k, features.shape[1])
    return exact_pass(features, features, banks, k=k, leave_self_out=leave_self_out, block_images=block_images,
                      max_block_bytes=max_block_bytes, on_block=on_block)


def exact_pass(
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
    banks = check_banks(banks, n_images)
    if max_block_bytes is None:
        max_block_bytes = default_block_bytes(features.device)
    members = member_table(banks, pad_index=n_images).to(features.device)
    plan = plan_exact_blocks(
        n_images,
        n_patches,
        k=k,
        n_banks=len(banks),
        bank_width=members.shape[1],
        max_block_bytes=max_block_bytes,
        block_images=block_images,
        database_patches=database.shape[1],
    )
    maps = torch.empty(n_images, n_patches, dtype=torch.float32)
    for start in range(0, n_images, plan.query_images):
        stop = min(n_images, start + plan.query_images)
        block_maps = exact_block(features, start, stop, members, k, leave_self_out, plan, database)
        maps[start:stop] = block_maps.cpu()
        report_progress(on_block, stop, n_images)
    return maps


def exact_block(
    features: torch.Tensor,
    start: int,
    stop: int,
    members: torch.Tensor,
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
    nearest_similarities(queries, features if database is None else database, k, plan.database_images, nearest)
    torch.sub(1.0, nearest, out=nearest)  # similarities -> distances, ascending along k
    return scores_from_nearest(nearest, start, stop, members, k, leave_self_out, plan.bank_chunk)


def score_class(job: ClassJob) -> BankScorer:
    """The exact engine for one class: in one process, as block tasks (an executor, or features over
    ``--max-memory`` on the CPU), or from a table kept whole for iterative refinement."""
    n_images, n_patches, dim = job.rows.shape
    k, runtime = job.cfg.k, job.runtime
    block_bytes, key_images = runtime.max_block_bytes, None
    bound = job.max_memory
    if bound is not None and working_set_bytes(n_images, n_patches, dim, k=k) + MIN_BLOCK_BYTES > bound:
        block_bytes, key_images = streaming_layout(bound, n_images, n_patches, dim, k=k, label=job.label)
    elif bound is not None:
        block_bytes = block_budget(bound, n_images, n_patches, dim, k=k, label=job.label)
    if runtime.executor is not None or (key_images is not None and torch.device(runtime.device).type == "cpu"):
        return blocked_scorer(job, block_bytes, key_images)
    if job.cfg.refine_rounds and table_bytes(n_images, n_patches, k) <= TABLE_BYTES:
        table = nearest_table(job.rows.read(), k=k, device=runtime.device, max_block_bytes=block_bytes,
                              on_block=job.on_block)
        return lambda bank: scores_from_table(table, bank, leave_self_out=job.leave_self_out)
    return lambda bank: memory_scores_exact(job.rows.read(), bank, k=k, leave_self_out=job.leave_self_out,
                                            device=runtime.device, max_block_bytes=block_bytes,
                                            on_block=job.on_block)
