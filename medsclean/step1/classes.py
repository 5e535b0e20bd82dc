"""Step 1 over a whole training set: class by class, each against banks of its own images,
through the engine the config names (``engines.ENGINES``), optionally refined round by round."""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import numpy as np
import torch

from medsclean.choices import Aggregate
from medsclean.config import ScoreConfig
from medsclean.errors import DataError
from medsclean.maps import AGGREGATE_RATIOS, image_scores
from medsclean.step1.banks import ALL_CLASSES, class_generator, draw_banks, without_members
from medsclean.step1.engines import ENGINES, engine_for
from medsclean.step1.reduce import scores_from_table
from medsclean.step1.rows import FeatureRows, TensorRows, as_feature_tensor
from medsclean.step1.runtime import BankScorer, ClassJob, Runtime


def group_images(classes: Sequence[Hashable], per_class: bool) -> dict[Hashable, np.ndarray]:
    """Class -> int64 positions of its images; one group, :data:`~medsclean.step1.banks.ALL_CLASSES`,
    when classes are not scored apart."""
    if not per_class:
        return {ALL_CLASSES: np.arange(len(classes))}
    groups: dict[Hashable, list[int]] = {}
    for position, label in enumerate(classes):
        groups.setdefault(label, []).append(position)
    return {label: np.asarray(positions, dtype=np.int64) for label, positions in groups.items()}


def score_classes(
    features: torch.Tensor | np.ndarray,
    classes: Sequence[Hashable],
    cfg: ScoreConfig = ScoreConfig(),
    runtime: Runtime = Runtime(),
    exclude: Sequence[int] = (),
) -> tuple[torch.Tensor, dict[Hashable, torch.Tensor]]:
    """Memory-ensemble maps of a whole training set, class by class.

    Each class (or, with ``cfg.per_class`` False, the whole set under the key
    :data:`~medsclean.step1.banks.ALL_CLASSES`) draws its banks from ``banks.class_generator``
    (seed, class name), so a class's banks do not depend on the other classes or on image order
    across classes, and the same seed gives identical output.

    Args:
        features: (N, P, D) L2-normalised patch features of all images: a tensor, or rows read on
            demand (``store.ShardedRows``), so that only one class is in memory at a time, and
            under a memory bound not even that (the exact engine then streams key chunks).
        classes: N class labels, one per image.
        cfg: the Step-1 options (banks, ratio, k, engine, seed, refinement, ...); ``cfg.device``
            is not read: the runtime's device is the resolved one.
        runtime: device, memory bounds, executor, precomputed tables, callbacks (none change the maps).
        exclude: positions of images left out of every memory (`banks.without_members`); they are
            still scored.

    Returns:
        maps: (N, P) float32 memory scores in the input order.
        banks: class -> (B, m) int64 tensor of banks as positions into ``features``.

    Raises:
        DataError: a class has a single image under leave-self-out.
        ConfigError: an invalid option.
    """
    source = features if hasattr(features, "subset") else None
    tensor = None if source is not None else as_feature_tensor(features)  # float16 stays float16
    n_images, n_patches, _ = (source or tensor).shape
    if len(classes) != n_images:
        raise ValueError(f"got {len(classes)} class labels for {n_images} feature maps")
    maps = torch.empty(n_images, n_patches, dtype=torch.float32)
    banks_per_class: dict[Hashable, torch.Tensor] = {}
    excluded = np.asarray(sorted(set(exclude)), dtype=np.int64)
    for label, positions in group_images(classes, cfg.per_class).items():
        if not cfg.include_self and len(positions) < 2:
            raise DataError(
                f"class {label!r} has a single training image, so leave-self-out has no memory for it; "
                "add images to the class or pass --include-self"
            )
        rows = torch.from_numpy(positions)
        class_rows = source.subset(positions) if source is not None else TensorRows(tensor[rows])
        local_excluded = np.flatnonzero(np.isin(positions, excluded))
        local_banks, maps[rows] = score_class(label, class_rows, cfg, runtime, local_excluded)
        banks_per_class[label] = torch.from_numpy(positions[local_banks])
        if runtime.on_class is not None:
            runtime.on_class(label)
    return maps, banks_per_class


def score_class(label: Hashable, rows: FeatureRows, cfg: ScoreConfig, runtime: Runtime,
                excluded: np.ndarray | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """The banks (B, m) and the (N, P) maps of one class of (N, P, D) features; `excluded`: class
    positions left out of every memory."""
    n_images = rows.shape[0]
    excluded = np.zeros(0, dtype=np.int64) if excluded is None else excluded
    generator = class_generator(cfg.seed, label)
    banks = draw_banks(n_images, cfg.banks, cfg.ratio, replace=cfg.replace, generator=generator,
                       min_images=cfg.min_bank)
    banks = without_members(banks, excluded, n_images)
    choice = engine_for(cfg, runtime, rows.shape)
    if runtime.on_engine is not None:
        runtime.on_engine(label, choice)
    table = (runtime.tables or {}).get(label)
    if table is not None:
        score_against: BankScorer = lambda bank: scores_from_table(  # noqa: E731
            table, bank, leave_self_out=not cfg.include_self)
    else:
        progress = None if runtime.on_progress is None else \
            (lambda done, total: runtime.on_progress(label, done, total))
        score_against = ENGINES[choice.name].score_class(ClassJob(label, rows, cfg, runtime, generator, progress))
    if cfg.refine_rounds:
        return refine_memory(score_against, n_images, rounds=cfg.refine_rounds, drop=cfg.refine_drop,
                             aggregate=cfg.aggregate, excluded=excluded)
    return banks, score_against(banks)


def refine_memory(
    score_against: Callable[[np.ndarray], torch.Tensor],
    n_images: int,
    *,
    rounds: int,
    drop: float,
    aggregate: str = Aggregate.TOP1PCT.value,
    excluded: np.ndarray | None = None,
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
        aggregate: image score used to rank images (:func:`image_scores`).
        excluded: indices never in the memory (user-confirmed defects); they are still scored.

    Returns:
        bank: (1, m) int64 indices of the final memory.
        maps: (N, P) maps of the last round.
    """
    allowed = np.ones(n_images, dtype=bool)
    if excluded is not None:
        allowed[excluded] = False
    bank = np.flatnonzero(allowed)[None, :]
    maps = score_against(bank)
    for r in range(1, rounds + 1):
        keep = max(2, n_images - round(r * drop * n_images))
        order = np.argsort(image_scores(maps, ratio=AGGREGATE_RATIOS[aggregate]).numpy(), kind="stable")
        bank = np.sort(order[allowed[order]][:keep])[None, :]
        maps = score_against(bank)
    return bank, maps
