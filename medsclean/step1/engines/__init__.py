"""The Step-1 engines, one module each, and their registry.

Every engine scores one class: :attr:`EngineSpec.score_class` takes a ``runtime.ClassJob`` and
returns a function of the banks, ``(B, m) -> (N, P)`` maps. Engines that give the exact scores
(``exact`` = True) give the same maps to float32 round-off, and ``--engine auto`` chooses among
them only (:func:`choose_engine`); the others are the user's choice.

The names themselves live in ``medsclean.choices.Engine`` (light, so that the CLI and the configs
list and check them before torch is imported); this registry covers exactly those names.

Adding an engine: a module here with its ``score_class(job)``, an entry in :data:`ENGINES`, its
name in ``choices.Engine``, and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, NamedTuple

import torch

from medsclean.choices import Engine
from medsclean.config import ScoreConfig
from medsclean.step1 import faiss_index as knn
from medsclean.step1.engines import approx, exact, faiss
from medsclean.step1.plan import APPROX_ADVICE_SECONDS, bank_flops, exact_flops, projected_exact_seconds
from medsclean.step1.runtime import BankScorer, ClassJob, Runtime


@dataclass(frozen=True)
class EngineSpec:
    """One engine.

    Attributes:
        score_class: (class job) -> a function of the banks giving the class's maps.
        exact: gives the exact scores (the same maps as every other exact engine); ``auto`` picks
            only such engines, and only their scores share a cache key.
        runs_tasks: runs its pass as block tasks on an executor (``--executor ray``) when given one.
    """

    score_class: Callable[[ClassJob], BankScorer]
    exact: bool
    runs_tasks: bool = False


ENGINES = MappingProxyType({
    Engine.EXACT.value: EngineSpec(exact.score_class, exact=True, runs_tasks=True),
    Engine.FAISS.value: EngineSpec(faiss.score_class, exact=True),
    Engine.IVF.value: EngineSpec(faiss.score_class_ivf, exact=False),
    Engine.APPROX.value: EngineSpec(approx.score_class, exact=False),
})
"""Engine name -> :class:`EngineSpec`."""

assert set(ENGINES) == set(Engine.values()) - {Engine.AUTO.value}, "the registry must cover choices.Engine"


class EngineChoice(NamedTuple):
    """The engine a class is scored with, why, and its projected exact time.

    Attributes:
        name: a key of :data:`ENGINES` (one whose scores are not exact only when the user asked for it).
        reason: one line for the log and the run's record.
        projected_seconds: the exact pass's projected time on this device (``plan.projected_exact_seconds``).
        over_bound: ``engine="auto"`` and ``projected_seconds`` passes the advice bound: the class is still
            scored exactly, and the run says that ``--engine approx`` would be faster.
    """

    name: str
    reason: str
    projected_seconds: float = 0.0
    over_bound: bool = False


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
        choice = EngineChoice(Engine.EXACT.value, f"torch on {device}: {work}", seconds, over)
    elif faiss_gpu:
        choice = EngineChoice(Engine.FAISS.value, f"faiss-gpu sees a GPU and torch runs on the CPU ({work})",
                              seconds, over)
    else:
        choice = EngineChoice(Engine.EXACT.value, f"CPU only: {work}", seconds, over)
    assert ENGINES[choice.name].exact
    return choice


def engine_for(cfg: ScoreConfig, runtime: Runtime, shape: tuple[int, ...]) -> EngineChoice:
    """The engine of a class of (N, P, D) features: the one ``cfg.engine`` names, or under ``auto``
    :func:`choose_engine`'s."""
    n_images, n_patches, dim = shape
    if cfg.engine == Engine.AUTO:
        return choose_engine(n_images, n_patches, dim, device=runtime.device, faiss_gpu=knn.gpu_count() > 0,
                             n_banks=cfg.banks, ratio=cfg.ratio, advice_seconds=runtime.advice_seconds)
    seconds = projected_exact_seconds(n_images, n_patches, dim, device=runtime.device)
    return EngineChoice(cfg.engine, f"--engine {cfg.engine}", seconds, False)
