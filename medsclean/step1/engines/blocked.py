"""The exact engine as independent tasks: (query block) x (key chunk), then a min-reduction.

``engines.exact`` scores a block of query images against every image of the class at once. Here
the images of the class are also cut into key chunks. A task scores one query block against one
key chunk and returns, per query patch, its best distances to each memory restricted to the
chunk's images (plus to all of them, the fallback of a patch no memory can score). The nearest
distance to a memory is a minimum over its images, so the result of all chunks is the elementwise
minimum of the parts (for k > 1: the k smallest of the parts' k smallest). The bank sum is then
done as the one-pass engine does it.

Tasks read their rows from a ``rows.FeatureRows`` source, so that neither a task nor the caller
holds the class's features: a tensor in memory, or the rows of the features artifact on disk
(``store.ShardedRows``). A task is a plain picklable value; ``map_tasks`` decides where it runs
(in this process, or on Ray workers: ``medsclean.distributed``).

Identical to the one-pass engine, bit for bit, when both use the same ``ExactPlan``: the query
blocks, the database blocks of each matrix product and the bank chunks of the sum are the same,
and the key chunks are whole multiples of the database block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from medsclean.step1.banks import check_banks, member_table
from medsclean.step1.plan import ExactPlan, default_block_bytes, plan_exact_blocks
from medsclean.step1.reduce import k_smallest, mean_of_k_smallest, nearest_similarities
from medsclean.step1.rows import FeatureRows, check_k
from medsclean.step1.runtime import BankScorer, ClassJob, ProgressCallback, TaskExecutor, report_progress


@dataclass(frozen=True)
class BlockTask:
    """Query images [q0, q1) of a class against key images [k0, k1)."""

    query: tuple[int, int]
    keys: tuple[int, int]


@dataclass(frozen=True)
class BlockJob:
    """What every task of one class shares (sent to a worker once)."""

    rows: FeatureRows
    member_table: torch.Tensor  # (B, w) distinct members of each bank, padded with N
    k: int
    leave_self_out: bool
    plan: ExactPlan
    device: str = "cpu"  # "cuda": the task's products run on the GPU its worker was given


MapTasks = Callable[[Callable, BlockJob, list[BlockTask]], Iterable[tuple[BlockTask, torch.Tensor]]]


def run_locally(function: Callable, job: BlockJob, tasks: list[BlockTask]) -> Iterator[tuple[BlockTask, torch.Tensor]]:
    """`MapTasks` in this process, in order."""
    for task in tasks:
        yield task, function(job, task)


@dataclass(frozen=True)
class TaskSpread:
    """How a class's pass is cut into tasks, and where they run.

    Attributes:
        key_images: images per key chunk (rounded up to whole database blocks); default from `key_chunks`.
        key_chunks: key chunks per class when `key_images` is not given.
        min_tasks: cut the key side further until there are at least this many tasks (for workers).
        map_tasks: runs `partial_bank_distances` over the tasks, yielding (task, result) in any order.
    """

    key_images: int | None = None
    key_chunks: int = 1
    min_tasks: int = 1
    map_tasks: MapTasks = run_locally

    @classmethod
    def over(cls, executor: TaskExecutor | None, key_images: int | None = None) -> TaskSpread:
        """Tasks in this process, or about four per worker of `executor`."""
        if executor is None:
            return cls(key_images=key_images)
        return cls(key_images=key_images, min_tasks=4 * executor.workers, map_tasks=executor.map_tasks)


def key_chunk_images(n_images: int, plan: ExactPlan, chunks: int) -> int:
    """Images per key chunk for about `chunks` chunks: a whole number of database blocks."""
    per_chunk = math.ceil(n_images / max(1, chunks))
    return min(n_images, math.ceil(per_chunk / plan.database_images) * plan.database_images)


def block_tasks(n_images: int, plan: ExactPlan, key_images: int) -> list[BlockTask]:
    """Every (query block, key chunk) pair, query block by query block."""
    if key_images % plan.database_images and key_images < n_images:
        raise ValueError(f"key chunks of {key_images} images are not whole database blocks of "
                         f"{plan.database_images}")
    return [BlockTask((q, min(n_images, q + plan.query_images)), (c, min(n_images, c + key_images)))
            for q in range(0, n_images, plan.query_images) for c in range(0, n_images, key_images)]


def partial_bank_distances(job: BlockJob, task: BlockTask) -> torch.Tensor:
    """One task: (R, B + 1, k) ascending best distances of the query block's R = q * P patches to
    each bank's images within the key chunk (+inf for a bank with none there), and in column B to
    every image of the chunk; the query's own image is left out under leave-self-out."""
    q0, q1 = task.query
    k0, k1 = task.keys
    k, plan = job.k, job.plan
    queries = job.rows.read(q0, q1).to(job.device).float()
    block, n_patches, dim = queries.shape
    rows = block * n_patches
    keys = job.rows.read(k0, k1).to(job.device)
    chunk = k1 - k0
    nearest = torch.empty(rows, chunk + 1, k, dtype=torch.float32, device=job.device)
    nearest_similarities(queries.reshape(rows, dim), keys, k, plan.database_images, nearest)
    torch.sub(1.0, nearest, out=nearest)
    nearest[:, chunk, :] = math.inf
    if job.leave_self_out:
        own = range(max(q0, k0), min(q1, k1))
        if len(own):
            view = nearest.view(block, n_patches, chunk + 1, k)
            view[torch.tensor(own) - q0, :, torch.tensor(own) - k0, :] = math.inf
    members = job.member_table.to(job.device)
    local = torch.where((members >= k0) & (members < k1), members - k0, chunk)  # elsewhere: the +inf column
    out = torch.empty(rows, members.shape[0] + 1, k, dtype=torch.float32, device=job.device)
    for start in range(0, members.shape[0], plan.bank_chunk):
        part = local[start:start + plan.bank_chunk]
        gathered = nearest[:, part.reshape(-1), :].view(rows, part.shape[0], -1)
        out[:, start:start + part.shape[0], :] = k_smallest(gathered, k)
    out[:, -1, :] = k_smallest(nearest[:, :chunk, :].reshape(rows, 1, -1), k)[:, 0, :]
    return out.cpu()


def merge_partials(merged: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """The min-reduction of two parts of one query block (either order gives the same result)."""
    if merged is None:
        return part
    if part.shape[-1] == 1:
        return torch.minimum(merged, part)
    return k_smallest(torch.cat([merged, part], dim=-1), part.shape[-1])


def scores_from_partials(merged: torch.Tensor, block: int, bank_chunk: int) -> torch.Tensor:
    """(block, P) scores from the reduced (R, B + 1, k) distances of a query block: the mean over
    the banks that could score a patch, summed in the one-pass engine's bank chunks."""
    rows, columns, k = merged.shape
    n_banks = columns - 1
    sums = torch.zeros(rows, dtype=torch.float32)
    counts = torch.zeros(rows, dtype=torch.float32)
    for start in range(0, n_banks, bank_chunk):
        part = merged[:, start:min(n_banks, start + bank_chunk), :].contiguous()
        per_bank = part[..., 0] if k == 1 else part.mean(dim=-1)
        usable = torch.isfinite(per_bank)
        sums += torch.where(usable, per_bank, 0.0).sum(dim=1)
        counts += usable.sum(dim=1)
    scores = sums / counts
    unscored = counts == 0
    if unscored.any():
        fallback = mean_of_k_smallest(merged[unscored, n_banks, :], k) if k > 1 else merged[unscored, n_banks, 0]
        scores[unscored] = torch.where(torch.isfinite(fallback), fallback, math.nan)
    return scores.view(block, rows // block)


def memory_scores_blocked(
    rows: FeatureRows,
    banks: np.ndarray,
    *,
    k: int = 1,
    leave_self_out: bool = True,
    max_block_bytes: int | None = None,
    spread: TaskSpread = TaskSpread(),
    device: str = "cpu",
    on_block: ProgressCallback | None = None,
) -> torch.Tensor:
    """Memory-ensemble maps of one class from (query block x key chunk) tasks; equal to
    `engines.exact.memory_scores_exact` with the same `max_block_bytes`.

    Besides the (N, P) maps the caller holds, per unfinished query block, the (q*P, B+1, k) reduced
    distances; a task holds a query block and a key chunk of features and their distances.

    Args:
        rows: the class's (N, P, D) L2-normalised features.
        banks: (B, m) image indices of each bank.
        k: nearest neighbours per score.
        leave_self_out: never match an image against itself.
        max_block_bytes: the one-pass engine's block target (default `plan.CPU_BLOCK_BYTES`).
        spread: how the key side is cut and where the tasks run (default: one chunk, this process).
        device: where a task's products run ("cuda": the GPU of the worker that runs it).
        on_block: called with (query images done, N) as query blocks finish (in any order).

    Returns:
        (N, P) float32 maps.
    """
    n_images, n_patches, _ = rows.shape
    check_k(k, n_patches)
    banks = check_banks(banks, n_images)
    members = member_table(banks, pad_index=n_images)
    plan = plan_exact_blocks(n_images, n_patches, k=k, n_banks=len(banks), bank_width=members.shape[1],
                             max_block_bytes=default_block_bytes("cpu") if max_block_bytes is None else max_block_bytes)
    tasks = block_tasks(n_images, plan, _key_images(n_images, plan, spread))
    expected = {}
    for task in tasks:
        expected[task.query] = expected.get(task.query, 0) + 1
    job = BlockJob(rows, members, k, leave_self_out, plan, "cuda" if str(device).startswith("cuda") else "cpu")
    maps = torch.empty(n_images, n_patches, dtype=torch.float32)
    merged: dict[tuple[int, int], torch.Tensor] = {}
    done = 0
    for task, part in spread.map_tasks(partial_bank_distances, job, tasks):
        merged[task.query] = merge_partials(merged.get(task.query), part)
        expected[task.query] -= 1
        if expected[task.query] == 0:
            q0, q1 = task.query
            maps[q0:q1] = scores_from_partials(merged.pop(task.query), q1 - q0, plan.bank_chunk)
            done += q1 - q0
            report_progress(on_block, done, n_images)
    return maps


def _key_images(n_images: int, plan: ExactPlan, spread: TaskSpread) -> int:
    """Images per key chunk: enough chunks for `spread.key_images` and for `spread.min_tasks` tasks."""
    key_chunks = spread.key_chunks
    if spread.key_images is not None:
        key_chunks = max(key_chunks, math.ceil(n_images / spread.key_images))
    key_chunks = max(key_chunks, math.ceil(spread.min_tasks / math.ceil(n_images / plan.query_images)))
    return key_chunk_images(n_images, plan, key_chunks)


def blocked_scorer(job: ClassJob, max_block_bytes: int | None, key_images: int | None) -> BankScorer:
    """The exact maps of a class from block tasks: streamed here under a memory bound (`key_images`),
    or spread over the runtime's executor (about four tasks per worker; on "cuda", one GPU each)."""
    device = str(job.runtime.device)
    block_bytes = default_block_bytes(device) if max_block_bytes is None else max_block_bytes
    spread = TaskSpread.over(job.runtime.executor, key_images)
    return lambda bank: memory_scores_blocked(job.rows, bank, k=job.cfg.k, leave_self_out=job.leave_self_out,
                                              max_block_bytes=block_bytes, spread=spread, device=device,
                                              on_block=job.on_block)
