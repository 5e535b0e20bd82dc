"""The memories of a class: how many images a bank holds, drawing the banks, their members."""

from __future__ import annotations

import math
from typing import Hashable

import numpy as np
import torch

from medsclean import seeding
from medsclean.config import ScoreConfig
from medsclean.errors import ConfigError, DataError

ALL_CLASSES = "<all>"
"""The class key of the whole training set when classes are not scored apart (``per_class=False``)."""


def class_generator(seed: int, label: Hashable) -> np.random.Generator:
    """The bank generator of one class: keyed by the run seed and the 64-bit id of ``str(label)``."""
    return seeding.rng(seed, seeding.stable_id64(str(label)))


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


def without_members(banks: np.ndarray, excluded: np.ndarray, n_images: int) -> np.ndarray:
    """The banks with the `excluded` images left out of every memory (user-confirmed defects).

    The banks keep their shape and every other draw: an excluded entry becomes another member of
    its row (duplicates count once, see :func:`bank_members`), so each memory loses exactly those
    images. A row of excluded images only takes the class's first remaining image.

    Args:
        banks: (B, m) int64 image indices in [0, N).
        excluded: int64 indices in [0, N) to leave out.
        n_images: N, images in the class.

    Returns:
        (B, m) int64 banks without any excluded index.

    Raises:
        DataError: every image of the class is excluded.
    """
    out = np.array(banks, dtype=np.int64, copy=True)
    if len(excluded) == 0:
        return out
    remaining = np.setdiff1d(np.arange(n_images), excluded)
    if remaining.size == 0:
        raise DataError("every image of a class was rejected by the user; a memory needs at least one image")
    dropped = np.isin(out, excluded)
    for row in np.flatnonzero(dropped.any(axis=1)):
        kept = out[row][~dropped[row]]
        out[row][dropped[row]] = kept[0] if kept.size else remaining[0]
    return out


def check_banks(banks: np.ndarray, n_images: int) -> np.ndarray:
    """``banks`` as a (B, m) int64 array of image indices in [0, N); ValueError otherwise."""
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


def member_table(banks: np.ndarray, pad_index: int) -> torch.Tensor:
    """(B, w) int64 table of each bank's distinct images, w the most distinct members of a bank,
    padded with ``pad_index`` (the engines' column of +inf distances)."""
    members = bank_members(banks)
    width = max(len(row) for row in members)
    table = torch.full((len(members), width), pad_index, dtype=torch.int64)
    for row, images in enumerate(members):
        table[row, : len(images)] = torch.from_numpy(images)
    return table
