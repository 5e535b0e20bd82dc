"""Nearest-neighbour search by inner product, the one place that talks to FAISS.

FAISS is imported lazily inside the functions so that importing medsclean never
needs it. On L2-normalised vectors the inner product is the cosine similarity,
so the cosine distance of a neighbour is ``1 - similarity``.

FAISS is optional: ``pip install 'medsclean[cpu]'`` installs faiss-cpu and
``pip install 'medsclean[gpu]'`` installs faiss-gpu-cu12 (never both: the two wheels
provide the same ``faiss`` module). Without either, :func:`faiss_available` is False,
:func:`gpu_count` is 0 so that engine ``auto`` picks the exact torch engine, and
building an index (engines ``faiss`` and ``ivf``) raises :class:`UsageError` naming
the install command; :func:`require_faiss` does the same check up front.

GPU search uses faiss-gpu when it is installed and a GPU is visible; otherwise
everything runs on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from medsclean.errors import UsageError

IndexKind = Literal["flat", "ivf"]

# IVF k-means wants about this many training points per list (FAISS warns below 39).
_POINTS_PER_LIST = 39


def faiss_available() -> bool:
    """Whether the ``faiss`` package can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


FAISS_MISSING = (
    "the FAISS engines (engine faiss or ivf) need the faiss package, which is not installed; "
    "pip install 'medsclean[cpu]' (faiss-cpu) or, on a CUDA machine, pip install 'medsclean[gpu]' "
    "(faiss-gpu-cu12), never both; or use the engine exact or auto"
)
"""The message of the :class:`UsageError` raised when faiss is needed but missing."""


def require_faiss():
    """The ``faiss`` module.

    Raises:
        UsageError: faiss is not installed; the message names the extras that install it.
    """
    try:
        import faiss
    except ImportError as exc:
        raise UsageError(FAISS_MISSING) from exc
    return faiss


def gpu_count() -> int:
    """Number of GPUs FAISS can use: 0 without faiss, without faiss-gpu, or without a GPU."""
    if not faiss_available():
        return 0
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


@functools.lru_cache(maxsize=1)
def _gpu_resources():
    """One set of FAISS GPU resources (scratch memory, streams) shared by all searches."""
    import faiss

    return faiss.StandardGpuResources()


def default_nlist(n_database: int) -> int:
    """Number of IVF lists for a database of ``n_database`` vectors.

    About ``4 * sqrt(n)`` (the usual FAISS rule of thumb), capped so that k-means
    gets at least 39 training points per list.
    """
    by_rule = int(4 * math.sqrt(n_database))
    by_training = n_database // _POINTS_PER_LIST
    return max(1, min(by_rule, by_training))


def default_nprobe(nlist: int) -> int:
    """Number of IVF lists visited per query: one eighth of the lists, at least 1."""
    return max(1, nlist // 8)


def _resolve_gpu(use_gpu: bool | None) -> bool:
    available = gpu_count() > 0
    if use_gpu is None:
        return available
    if use_gpu and not available:
        raise UsageError(
            "a FAISS GPU search was requested but faiss-gpu or a visible GPU is missing; "
            "pip uninstall faiss-cpu, then pip install 'medsclean[gpu]', or run the search on the CPU"
        )
    return use_gpu


def _as_search_matrix(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array (rows, dim), got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32)


@dataclass(frozen=True)
class IndexOptions:
    """The index :func:`build_inner_product_index` builds (its keyword arguments, in one value)."""

    index: IndexKind = "flat"
    use_gpu: bool | None = None
    nlist: int | None = None
    nprobe: int | None = None
    seed: int = 0

    def build(self, database: np.ndarray):
        """:func:`build_inner_product_index` of ``database`` with these options."""
        return build_inner_product_index(database, **dataclasses.asdict(self))


def build_inner_product_index(
    database: np.ndarray,
    *,
    index: IndexKind = "flat",
    use_gpu: bool | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    seed: int = 0,
):
    """A FAISS index over ``database`` that ranks rows by inner product.

    Args:
        database: (m, d) vectors; converted to contiguous float32.
        index: "flat" (``IndexFlatIP``, exact) or "ivf" (``IndexIVFFlat`` with inner
            product, approximate, k-means trained on the database itself).
        use_gpu: True forces faiss-gpu, False forces the CPU, None picks the GPU
            when faiss-gpu and a GPU are present.
        nlist: IVF lists; default :func:`default_nlist`.
        nprobe: IVF lists visited per query; default :func:`default_nprobe`.
        seed: seed of the IVF k-means, so that approximate results are repeatable.

    Returns:
        The filled FAISS index, to be passed to :func:`search_inner_product`.

    Raises:
        UsageError: faiss is not installed (:func:`require_faiss`), or a bad ``index``/``nlist``.
    """
    faiss = require_faiss()

    database = _as_search_matrix(database, "database")
    n_database, dim = database.shape
    if n_database == 0:
        raise ValueError("the database is empty")
    if index == "flat":
        faiss_index = faiss.IndexFlatIP(dim)
    elif index == "ivf":
        nlist = nlist or default_nlist(n_database)
        if nlist > n_database:
            raise UsageError(f"IVF nlist={nlist} exceeds the {n_database} database vectors; lower nlist")
        faiss_index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        faiss_index.cp.seed = seed
        faiss_index.nprobe = min(nlist, nprobe or default_nprobe(nlist))
    else:
        raise UsageError(f"unknown index {index!r}; use 'flat' (exact) or 'ivf' (approximate)")
    if _resolve_gpu(use_gpu):
        faiss_index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, faiss_index)
    if not faiss_index.is_trained:
        faiss_index.train(database)
    faiss_index.add(database)
    return faiss_index


def search_inner_product(faiss_index, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` indexed rows with the largest inner product for every query row.

    Args:
        faiss_index: an index from :func:`build_inner_product_index`.
        queries: (n, d) vectors; converted to contiguous float32.
        k: neighbours per query, 1 <= k <= the number of indexed rows.

    Returns:
        similarities: (n, k) float32 inner products, largest first.
        ids: (n, k) int64 database row indices. An IVF search that finds fewer
        than ``k`` rows in the lists it visits pads with id -1 and similarity -inf.
    """
    queries = _as_search_matrix(queries, "queries")
    if queries.shape[1] != faiss_index.d:
        raise ValueError(f"queries have dim {queries.shape[1]} but the index has dim {faiss_index.d}")
    if not 1 <= k <= faiss_index.ntotal:
        raise ValueError(f"k={k} must lie in [1, {faiss_index.ntotal}] (the database size)")
    similarities, ids = faiss_index.search(queries, k)
    ids = ids.astype(np.int64, copy=False)
    similarities[ids < 0] = -np.inf
    return similarities, ids
