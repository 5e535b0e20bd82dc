"""How much work and memory Step 1 takes: the exact engine's block sizes, the class's working set
under ``--max-memory``, and the cost model behind ``--engine auto`` (FLOPs, projected seconds).

Nothing here changes the maps: block sizes and bounds change the speed and the memory only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable

import torch

from medsclean.config import ScoreConfig
from medsclean.errors import DataError
from medsclean.step1.banks import ALL_CLASSES, bank_size

MIB = 2**20
FLOAT_BYTES = 4
CPU_BLOCK_BYTES = 256 * MIB
"""Default working-memory target of one exact-engine block on the CPU."""
GPU_BLOCK_BYTES = 2048 * MIB
"""Default working-memory target of one exact-engine block on a GPU."""
TABLE_BYTES = 2048 * MIB
"""Largest :func:`~medsclean.step1.reduce.nearest_table` iterative refinement keeps in memory; above it,
one pass per round."""
MIN_BLOCK_BYTES = 4 * MIB
"""Smallest block budget a ``max_memory`` bound may leave after the class's own tensors."""

CPU_FLOPS = 50e9
"""FLOP rate the engine choice assumes on the CPU: the exact engine's measured rate on the
2-core reference machine (docs/bench-score.md, docs/scaling.md)."""
GPU_FLOPS = 20e12
"""FLOP rate assumed on a GPU (float32 matmul of a current data-centre GPU; not measured here)."""
APPROX_ADVICE_SECONDS = 1800.0
"""``engine="auto"`` scores every class exactly (exact or faiss, the same scores); a class whose exact pass is
projected past this many seconds is reported (``EngineChoice.over_bound``) so that the user can choose
``--engine approx`` for it. It never changes the engine."""


def default_block_bytes(device: str | torch.device) -> int:
    """The block target of the exact engine on ``device``: :data:`CPU_BLOCK_BYTES` or :data:`GPU_BLOCK_BYTES`."""
    return CPU_BLOCK_BYTES if torch.device(device).type == "cpu" else GPU_BLOCK_BYTES


def table_bytes(n_images: int, n_patches: int, k: int = 1) -> int:
    """Bytes of a class's nearest-distance table: 4 * N^2 * P * k."""
    return FLOAT_BYTES * n_images * n_images * n_patches * k


# ---------------------------------------------------------------------------
# Block sizes of the exact engine


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
        """Working memory of one block in bytes, besides the float32 features (N * P * D * 4): the
        memory model :func:`plan_exact_blocks` sizes the blocks by.

        = 4 * q*P * (c*P  +  (N+1)*k  +  b*w*k  +  B), with q query images, c database
        images, b banks per chunk and w distinct images per bank.
        """
        rows = self.query_images * n_patches
        floats = rows * (
            self.database_images * n_patches + (n_images + 1) * k + self.bank_chunk * bank_width * k + n_banks
        )
        return FLOAT_BYTES * floats


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
    row_bytes = FLOAT_BYTES * n_patches
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


# ---------------------------------------------------------------------------
# A class's working set under --max-memory


def coreset_size(n_patches: int, coreset: float, k: int = 1) -> int:
    """Patches each image keeps in the approx engine's memories: ceil(coreset * P), at least k (and 1), at most P."""
    return min(n_patches, max(1, k, math.ceil(round(coreset * n_patches, 9))))


def working_set_bytes(n_images: int, n_patches: int, dim: int, *, coreset: float = 1.0, k: int = 1) -> int:
    """Bytes a class's own tensors hold during Step 1 besides the blocks: its float32 features,
    the reduced memory of the approx engine (``coreset`` < 1) and the (N, P) maps."""
    kept = coreset_size(n_patches, coreset, k)
    reduced = n_images * kept * dim if kept < n_patches else 0
    return FLOAT_BYTES * (n_images * n_patches * dim + reduced + 2 * n_images * n_patches)


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
            f"{max_memory / 1e9:.2f} GB of --max-memory allow with {MIN_BLOCK_BYTES // MIB} MiB of blocks; "
            "raise --max-memory")
    return int(budget)


def streaming_layout(max_memory: int, n_images: int, n_patches: int, dim: int, *, k: int = 1,
                     label: Hashable = ALL_CLASSES) -> tuple[int, int]:
    """Block budget and key-chunk size (images) of the exact engine when the class's features do
    not fit in ``max_memory``: the (N, P) maps are held, a quarter of the rest goes to a key chunk
    of float16 features (read, then copied out of its shard), the blocks take the rest.

    Raises:
        DataError: the maps alone leave less than twice :data:`MIN_BLOCK_BYTES`.
    """
    own = 2 * FLOAT_BYTES * n_images * n_patches
    budget = max_memory - own
    if budget < 2 * MIN_BLOCK_BYTES:
        raise DataError(
            f"class {label!r} needs {own / 1e9:.2f} GB for its maps alone, more than the {max_memory / 1e9:.2f} GB "
            f"of --max-memory allow with {2 * MIN_BLOCK_BYTES // MIB} MiB of blocks; raise --max-memory")
    key_images = max(1, (budget // 4) // (2 * 2 * n_patches * dim))
    return int(budget // 2), int(key_images)


# ---------------------------------------------------------------------------
# Cost model


def exact_flops(n_images: int, n_patches: int, dim: int) -> float:
    """FLOPs of the exact engine's distance products: 2 * N^2 * P^2 * D."""
    return 2.0 * n_images**2 * n_patches**2 * dim


def bank_flops(n_images: int, n_patches: int, dim: int, *, n_banks: int = ScoreConfig.banks,
               ratio: float = ScoreConfig.ratio) -> float:
    """FLOPs of searching every bank separately (FAISS engine, reference): 2 * N*P * m*P * D * B."""
    return 2.0 * n_images * n_patches * bank_size(n_images, ratio) * n_patches * dim * n_banks


def projected_exact_seconds(n_images: int, n_patches: int, dim: int, *, device: str | torch.device = "cpu") -> float:
    """Projected time of the exact engine on one class: its FLOPs at :data:`CPU_FLOPS` or :data:`GPU_FLOPS`."""
    rate = CPU_FLOPS if torch.device(device).type == "cpu" else GPU_FLOPS
    return exact_flops(n_images, n_patches, dim) / rate
