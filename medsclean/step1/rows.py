"""A class's patch features as the engines read them, and the checks every engine makes on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from medsclean.errors import ConfigError


class FeatureRows(Protocol):
    """(N, P, D) patch features of a class, read a range of images at a time: a tensor in memory
    (:class:`TensorRows`) or the rows of the features artifact on disk (``store.ShardedRows``)."""

    shape: tuple[int, ...]

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(stop - start, P, D) rows of any float dtype."""


@dataclass(frozen=True)
class TensorRows:
    """A :class:`FeatureRows` over a tensor already in memory."""

    tensor: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.tensor[start:stop]


def as_feature_tensor(features: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The (N, P, D) features as a tensor of their own dtype, without a copy."""
    tensor = torch.as_tensor(features)
    if tensor.ndim != 3:
        raise ValueError(f"features must be (N, P, D), got shape {tuple(tensor.shape)}")
    if tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise ValueError(f"features must hold at least one image and one patch, got {tuple(tensor.shape)}")
    return tensor


def as_features(features: torch.Tensor | np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, P, D) float32 features on ``device``; float16 input travels as float16, then widens."""
    return as_feature_tensor(features).to(device).float()


def check_k(k: int, n_patches: int) -> None:
    """ConfigError unless 1 <= k <= P: a patch's k nearest patches must come from one image."""
    if not 1 <= k <= n_patches:
        raise ConfigError("k", f"k must lie in [1, {n_patches}] (the patches per image), not {k}")
