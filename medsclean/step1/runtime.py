"""What Step 1 is run with besides its options (``ScoreConfig``): the device, the workers, the memory
bounds and the callbacks. None of it changes the maps; it is not part of the cache key.

:class:`ClassJob` is what an engine is handed to score one class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Protocol

import numpy as np
import torch

from medsclean.config import ScoreConfig
from medsclean.step1.plan import APPROX_ADVICE_SECONDS
from medsclean.step1.rows import FeatureRows

ProgressCallback = Callable[[int, int], None]
"""Called with (done, total) as one class advances."""

BankScorer = Callable[[np.ndarray], torch.Tensor]
"""An engine ready for one class: (B, m) banks of image indices -> (N, P) float32 maps of all N images."""


def report_progress(on_block: ProgressCallback | None, done: int, total: int) -> None:
    if on_block is not None:
        on_block(done, total)


class TaskExecutor(Protocol):
    """Runs the exact engine's block tasks (``engines.blocked.MapTasks``) on ``workers`` workers
    (``medsclean.distributed``: Ray workers)."""

    workers: int

    def map_tasks(self, function, job, tasks): ...


@dataclass(frozen=True)
class Runtime:
    """How Step 1 runs; the same maps whatever these are.

    Attributes:
        device: torch device of the exact and approx engines.
        max_memory: bound in bytes on a class's working set (its float32 features, the reduced memory,
            the maps and the blocks); the block budget is what is left (``plan.block_budget``), and a
            class whose features do not fit streams key chunks (``plan.streaming_layout``). None: the
            config's ``max_memory``. Overrides ``max_block_bytes``.
        max_block_bytes: block memory target of the exact engine (default by device).
        executor: runs the exact engine's (query block x key chunk) tasks elsewhere; the maps are
            identical to those of this process.
        advice_seconds: under engine auto, a class whose exact pass is projected past this is still
            scored exactly, and its ``EngineChoice`` has ``over_bound`` set.
        tables: class -> its ``reduce.nearest_table``, precomputed; such a class is scored from its
            table (the exact maps, no pass over the features).
        on_engine: called with (class, ``engines.EngineChoice``) before a class is scored.
        on_progress: called with (class, done, total) as a class advances.
        on_class: called with the class label when a class is finished.
    """

    device: str | torch.device = "cpu"
    max_memory: int | None = None
    max_block_bytes: int | None = None
    executor: TaskExecutor | None = None
    advice_seconds: float = APPROX_ADVICE_SECONDS
    tables: Mapping[Hashable, torch.Tensor] | None = None
    on_engine: Callable[[Hashable, Any], None] | None = None
    on_progress: Callable[[Hashable, int, int], None] | None = None
    on_class: Callable[[Hashable], None] | None = None


@dataclass(frozen=True)
class ClassJob:
    """One class to score, as an engine receives it.

    Attributes:
        label: the class.
        rows: its (N, P, D) L2-normalised features.
        cfg: the Step-1 options.
        runtime: device, bounds, executor.
        generator: the class's generator, past the draw of its banks (the approx engine's coreset
            draws from it).
        on_block: progress of this class, (done, total).
    """

    label: Hashable
    rows: FeatureRows
    cfg: ScoreConfig
    runtime: Runtime
    generator: np.random.Generator
    on_block: ProgressCallback | None = None

    @property
    def leave_self_out(self) -> bool:
        return not self.cfg.include_self

    @property
    def max_memory(self) -> int | None:
        """The bound on the class's working set in bytes: the runtime's, else the config's."""
        return self.runtime.max_memory if self.runtime.max_memory is not None else self.cfg.max_memory_bytes
