"""Images a user confirmed as defects leave every Step-1 memory (`--rescore`) but are still scored.
The oracle is the method's definition written out: per bank, the distinct members minus the
excluded images (and minus the query image), nearest cosine distance per patch, mean over banks."""

import numpy as np
import pytest
import torch

from medsclean.config import ScoreConfig
from medsclean.errors import DataError
from medsclean.step1.banks import class_generator, draw_banks, without_members
from medsclean.step1.classes import refine_memory, score_classes


def _unit(rng, shape):
    x = rng.standard_normal(shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_without_members_hand_case():
    banks = np.array([[0, 1, 2], [2, 2, 3], [1, 1, 1]])
    out = without_members(banks, np.array([1]), n_images=4)
    assert out.tolist() == [[0, 0, 2], [2, 2, 3], [0, 0, 0]]  # an all-excluded row takes image 0
    assert without_members(banks, np.array([], dtype=np.int64), 4).tolist() == banks.tolist()
    with pytest.raises(DataError, match="every image"):
        without_members(banks, np.arange(4), n_images=4)


def _definition(features: np.ndarray, banks: np.ndarray, excluded: set[int]) -> np.ndarray:
    n, p, _ = features.shape
    sums, counts = np.zeros((n, p)), np.zeros(n)
    for bank in banks:
        for i in range(n):
            members = sorted(set(bank.tolist()) - excluded - {i})
            if not members:
                continue
            memory = features[members].reshape(-1, features.shape[-1]).astype(np.float64)
            sums[i] += (1.0 - features[i].astype(np.float64) @ memory.T).min(axis=1)
            counts[i] += 1
    return sums / counts[:, None]


@pytest.mark.parametrize("engine", ["exact", "faiss"])
def test_excluded_images_leave_every_memory_and_are_still_scored(engine):
    features = _unit(np.random.default_rng(3), (12, 5, 8))
    cfg = ScoreConfig(banks=7, ratio=0.4, engine=engine, seed=2)
    excluded = [3, 7]
    maps, banks = score_classes(features, ["a"] * 12, cfg, exclude=excluded)
    drawn = draw_banks(12, 7, 0.4, generator=class_generator(2, "a"))
    assert not np.isin(banks["a"].numpy(), excluded).any()
    expected = _definition(features, drawn, set(excluded))
    assert np.isfinite(maps.numpy()).all()
    assert np.abs(maps.numpy() - expected).max() <= 1e-5
    plain, _ = score_classes(features, ["a"] * 12, cfg)
    assert not torch.allclose(plain, maps)  # the exclusion changed the memories


def test_exclusion_positions_are_global_and_map_to_each_class():
    features = _unit(np.random.default_rng(4), (10, 4, 6))
    classes = ["a", "b"] * 5
    cfg = ScoreConfig(banks=5, ratio=0.5, engine="exact", seed=1)
    _, banks = score_classes(features, classes, cfg, exclude=[2, 3])  # image 2 is in a, image 3 in b
    assert not np.isin(banks["a"].numpy(), [2]).any() and not np.isin(banks["b"].numpy(), [3]).any()


def test_refined_memory_never_takes_an_excluded_image_back():
    seen = []

    def score_against(bank):
        seen.append(bank[0].tolist())
        return torch.arange(10, dtype=torch.float32)[:, None].repeat(1, 3)  # image i scores i

    refine_memory(score_against, 10, rounds=3, drop=0.2, excluded=np.array([0, 1]))
    assert all(0 not in bank and 1 not in bank for bank in seen)
    assert seen[0] == list(range(2, 10))
    assert seen[-1] == [2, 3, 4, 5]  # 10 - round(3 * 0.2 * 10) = 4 kept, the lowest-scored allowed ones
