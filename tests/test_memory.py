"""Step-1 memory-ensemble engines against the naive oracle and hand-made cases."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from medsclean.config import ScoreConfig
from medsclean.errors import DataError, UsageError
from medsclean.step1 import faiss_index as knn
from medsclean.step1.banks import ALL_CLASSES, bank_size, draw_banks
from medsclean.maps import AGGREGATE_RATIOS, image_scores
from medsclean.step1.classes import score_classes
from medsclean.step1.engines import ENGINES as REGISTRY
from medsclean.step1.engines import choose_engine
from medsclean.step1.engines.exact import memory_scores_exact
from medsclean.step1.engines.faiss import memory_scores_faiss
from medsclean.step1.plan import exact_flops, plan_exact_blocks
from tests.memory_oracle import naive_memory_scores

TOLERANCE = 1e-5
ENGINES = {
    "exact": memory_scores_exact,
    # A tiny block budget forces several query blocks, database chunks and bank chunks.
    "exact-small-blocks": lambda f, b, **kw: memory_scores_exact(f, b, max_block_bytes=3_000, **kw),
    "faiss": memory_scores_faiss,
}


def unit_rows(array: np.ndarray) -> np.ndarray:
    return (array / np.linalg.norm(array, axis=-1, keepdims=True)).astype(np.float32)


def random_features(n_images: int, n_patches: int, dim: int, seed: int) -> np.ndarray:
    return unit_rows(np.random.default_rng(seed).standard_normal((n_images, n_patches, dim)))


def structured_features(n_images: int, side: int, dim: int, seed: int) -> np.ndarray:
    """Images that repeat a few patch prototypes with small noise; image 1 is an exact copy of image 0."""
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((4, dim))
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    pattern = ((rows // 2 + cols // 2) % 4).reshape(-1)  # a checkerboard of prototypes
    features = prototypes[pattern][None] + 0.05 * rng.standard_normal((n_images, side * side, dim))
    features[1] = features[0]
    return unit_rows(features)


def max_error(maps: torch.Tensor, reference: np.ndarray) -> float:
    return float(np.nanmax(np.abs(maps.numpy().astype(np.float64) - reference)))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("leave_self_out", [True, False])
@pytest.mark.parametrize("replace", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_engines_equal_naive_oracle_on_random_features(engine, leave_self_out, replace, k):
    features = random_features(14, 9, 16, seed=0)
    banks = draw_banks(14, n_banks=12, ratio=0.25, replace=replace, generator=np.random.default_rng(3))
    reference = naive_memory_scores(features, banks, k=k, leave_self_out=leave_self_out)
    maps = ENGINES[engine](features, banks, k=k, leave_self_out=leave_self_out)
    assert maps.shape == (14, 9) and maps.dtype == torch.float32
    assert max_error(maps, reference) <= TOLERANCE


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("leave_self_out", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_engines_equal_naive_oracle_on_structured_features(engine, leave_self_out, k):
    features = structured_features(10, side=4, dim=12, seed=1)
    banks = draw_banks(10, n_banks=15, ratio=0.2, generator=np.random.default_rng(5))
    reference = naive_memory_scores(features, banks, k=k, leave_self_out=leave_self_out)
    maps = ENGINES[engine](features, banks, k=k, leave_self_out=leave_self_out)
    assert max_error(maps, reference) <= TOLERANCE


def test_duplicate_image_scores_zero_only_when_its_copy_is_in_memory():
    features = structured_features(6, side=4, dim=12, seed=2)
    banks = np.array([[1, 2], [3, 4]])  # image 0's exact copy (1) is in bank 0 only
    maps = memory_scores_exact(features, banks)
    bank_1_scores = naive_memory_scores(features, banks[1:])[0]
    np.testing.assert_allclose(maps[0].numpy(), bank_1_scores / 2, atol=TOLERANCE)


def test_ivf_visiting_every_list_equals_exact_oracle():
    features = random_features(12, 16, 8, seed=4)
    banks = draw_banks(12, n_banks=6, ratio=0.5, replace=False, generator=np.random.default_rng(0))
    reference = naive_memory_scores(features, banks, k=2)
    maps = memory_scores_faiss(features, banks, k=2, search=knn.IndexOptions("ivf", nlist=2, nprobe=2))
    assert max_error(maps, reference) <= TOLERANCE


def test_include_self_matches_hand_computed_two_image_case():
    first, second = unit_rows(np.array([[1.0, 0.0]])), unit_rows(np.array([[0.6, 0.8]]))
    features = np.stack([first, second])  # (2, 1, 2): one patch per image, cosine 0.6
    banks = np.array([[0], [1]])
    for engine in (memory_scores_exact, memory_scores_faiss):
        included = engine(features, banks, leave_self_out=False)
        excluded = engine(features, banks, leave_self_out=True)
        # With itself: distance 0 in its own bank, 0.4 in the other -> 0.2. Without: only the other bank -> 0.4.
        np.testing.assert_allclose(included.numpy().ravel(), [0.2, 0.2], atol=1e-6)
        np.testing.assert_allclose(excluded.numpy().ravel(), [0.4, 0.4], atol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("k", [1, 2])
def test_image_no_bank_can_score_falls_back_to_all_other_images(engine, k):
    features = random_features(5, 4, 6, seed=7)
    banks = np.zeros((3, 2), dtype=np.int64)  # every bank is {0}
    reference = naive_memory_scores(features, banks, k=k)
    others = np.sort(1.0 - features[0] @ features[1:].reshape(-1, 6).T, axis=1)[:, :k].mean(axis=1)
    np.testing.assert_allclose(reference[0], others, atol=1e-6)
    assert max_error(ENGINES[engine](features, banks, k=k), reference) <= TOLERANCE


@pytest.mark.parametrize("engine", ENGINES)
def test_single_image_class_has_nan_map_and_score_classes_refuses_it(engine):
    features = random_features(1, 4, 6, seed=0)
    maps = ENGINES[engine](features, np.zeros((2, 1), dtype=np.int64))
    assert torch.isnan(maps).all()
    with pytest.raises(DataError, match="single training image"):
        score_classes(random_features(3, 4, 6, seed=0), ["a", "a", "b"], ScoreConfig(banks=2, engine="exact"))


def test_float16_features_are_scored_in_float32():
    features = random_features(8, 5, 16, seed=9).astype(np.float16)
    banks = draw_banks(8, n_banks=5, ratio=0.3, generator=np.random.default_rng(1))
    reference = naive_memory_scores(features.astype(np.float32), banks)
    assert max_error(memory_scores_exact(torch.from_numpy(features), banks), reference) <= TOLERANCE
    maps, class_banks = score_classes(torch.from_numpy(features), ["a"] * 8, ScoreConfig(banks=5, ratio=0.3, engine="faiss"))
    reference = naive_memory_scores(features.astype(np.float32), class_banks["a"].numpy())
    assert max_error(maps, reference) <= TOLERANCE


def test_exact_engine_reports_progress_per_block():
    calls = []
    features = random_features(7, 4, 6, seed=0)
    banks = draw_banks(7, n_banks=3, ratio=0.3, generator=np.random.default_rng(0))
    memory_scores_exact(features, banks, block_images=3, on_block=lambda done, total: calls.append((done, total)))
    assert calls == [(3, 7), (6, 7), (7, 7)]


@pytest.mark.parametrize("n_images, n_patches, k", [(300, 784, 1), (461, 784, 3), (40, 256, 1), (2000, 196, 1)])
def test_plan_keeps_block_memory_within_budget(n_images, n_patches, k):
    budget = 64 * 2**20
    width = bank_size(n_images, 0.1)
    plan = plan_exact_blocks(n_images, n_patches, k=k, n_banks=100, bank_width=width, max_block_bytes=budget)
    assert plan.peak_bytes(n_images, n_patches, k, 100, width) <= budget
    assert 1 <= plan.query_images <= n_images and 1 <= plan.database_images <= n_images
    # Most of the budget is used, so the products are not needlessly small.
    assert plan.peak_bytes(n_images, n_patches, k, 100, width) >= budget / 4


def test_anomalous_image_with_unique_patches_gets_highest_image_score():
    rng = np.random.default_rng(11)
    dim, side = 32, 10
    prototypes = rng.standard_normal((5, dim))
    normal = prototypes[rng.integers(0, 5, size=(20, side * side))] + 0.1 * rng.standard_normal((20, side * side, dim))
    normal[7, 40:44] = rng.standard_normal((4, dim)) * 3  # a small defect nowhere else in the class
    features = unit_rows(normal)
    for engine in ("exact", "faiss"):
        maps, _ = score_classes(features, ["part"] * 20, ScoreConfig(banks=30, ratio=0.1, engine=engine, seed=0))
        scores = image_scores(maps)
        assert int(scores.argmax()) == 7
        assert float(scores[7]) > 2 * float(np.delete(scores.numpy(), 7).max())


@pytest.mark.parametrize("per_class", [True, False])
def test_score_classes_equals_oracle_per_class_with_its_banks(per_class):
    features = random_features(18, 6, 8, seed=12)
    classes = ["screw", "tile", "screw", "wood", "tile", "screw"] * 3
    maps, banks = score_classes(
        features, classes, ScoreConfig(banks=8, ratio=0.3, k=3, engine="exact", seed=4, per_class=per_class)
    )
    expected_keys = {"screw", "tile", "wood"} if per_class else {ALL_CLASSES}
    assert set(banks) == expected_keys
    for label, class_banks in banks.items():
        class_banks = class_banks.numpy()
        positions = np.flatnonzero([label in (c, ALL_CLASSES) for c in classes])
        assert class_banks.shape == (8, bank_size(len(positions), 0.3))
        assert np.isin(class_banks, positions).all()
        local = np.searchsorted(positions, class_banks)
        reference = naive_memory_scores(features[positions], local, k=3)
        assert max_error(maps[positions], reference) <= TOLERANCE


def test_score_classes_engines_agree_and_seed_controls_output():
    features = random_features(16, 5, 8, seed=13)
    classes = ["a"] * 9 + ["b"] * 7
    exact, banks = score_classes(features, classes, ScoreConfig(banks=10, engine="exact", seed=1))
    again, banks_again = score_classes(features, classes, ScoreConfig(banks=10, engine="exact", seed=1))
    via_faiss, _ = score_classes(features, classes, ScoreConfig(banks=10, engine="faiss", seed=1))
    other, banks_other = score_classes(features, classes, ScoreConfig(banks=10, engine="exact", seed=2))
    assert torch.equal(exact, again)
    assert all(torch.equal(banks[c], banks_again[c]) for c in banks)
    assert float((exact - via_faiss).abs().max()) <= TOLERANCE
    assert not torch.equal(banks["a"], banks_other["a"])
    assert not torch.equal(exact, other)


def test_class_banks_do_not_depend_on_other_classes():
    features = random_features(12, 4, 6, seed=14)
    _, alone = score_classes(features[:6], ["a"] * 6, ScoreConfig(banks=5, engine="exact", seed=3))
    _, together = score_classes(features, ["b"] * 6 + ["a"] * 6, ScoreConfig(banks=5, engine="exact", seed=3))
    assert torch.equal(alone["a"] + 6, together["a"])


def test_class_banks_are_the_same_in_every_process():
    script = (
        "import numpy as np; from medsclean.step1.banks import class_generator, draw_banks;"
        "print(draw_banks(50, 3, 0.1, generator=class_generator(7, 'metal_nut')).tolist())"
    )
    outputs = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        outputs.add(result.stdout)
    assert len(outputs) == 1


def test_draw_banks_shape_range_and_replacement():
    with_replacement = draw_banks(10, n_banks=200, ratio=1.0, replace=True, generator=np.random.default_rng(0))
    without = draw_banks(10, n_banks=200, ratio=1.0, replace=False, generator=np.random.default_rng(0))
    assert with_replacement.shape == without.shape == (200, 10)
    assert with_replacement.dtype == np.int64
    assert with_replacement.min() >= 0 and with_replacement.max() <= 9
    assert any(len(np.unique(row)) < 10 for row in with_replacement)
    assert all(sorted(row) == list(range(10)) for row in without.tolist())
    assert not (without == without[0]).all()  # banks are drawn independently


def test_bank_size_is_the_ceiling_of_ratio_times_n():
    assert [bank_size(n, 0.1) for n in (1, 9, 10, 11, 209, 280)] == [1, 1, 1, 2, 21, 28]
    assert bank_size(10, 0.3) == 3  # 0.3 * 10 is 3.0000000000000004 in floating point
    assert draw_banks(209, 4, 0.1, generator=np.random.default_rng(0)).shape == (4, 21)


@pytest.mark.parametrize("ratio, n_banks", [(0.0, 5), (1.5, 5), (0.1, 0)])
def test_draw_banks_rejects_bad_options(ratio, n_banks):
    with pytest.raises(UsageError):
        draw_banks(10, n_banks, ratio, generator=np.random.default_rng(0))


def test_k_larger_than_patches_is_a_usage_error():
    with pytest.raises(UsageError, match="^k must lie in"):
        memory_scores_exact(random_features(3, 4, 6, seed=0), np.array([[0, 1]]), k=5)


def test_image_scores_hand_computed():
    maps = torch.zeros(2, 250)
    maps[0, [3, 100, 200]] = torch.tensor([5.0, 4.0, 1.0])  # P=250 -> top 2 patches
    maps[1, 7] = -1.0
    np.testing.assert_allclose(image_scores(maps).numpy(), [4.5, 0.0])
    np.testing.assert_allclose(image_scores(maps, ratio=AGGREGATE_RATIOS["max"]).numpy(), [5.0, 0.0])
    small = torch.tensor([[0.1, 0.9, 0.3]])  # P < 100 -> the single largest
    np.testing.assert_allclose(image_scores(small).numpy(), [0.9])
    from medsclean.choices import Aggregate

    assert set(AGGREGATE_RATIOS) == set(Aggregate.values())  # every --aggregate choice has its score


def test_choose_engine_prefers_exact_unless_only_faiss_has_a_gpu():
    assert choose_engine(200, 784, 768, device="cuda:0", faiss_gpu=True).name == "exact"
    assert choose_engine(200, 784, 768, device="cpu", faiss_gpu=False).name == "exact"
    chosen = choose_engine(200, 784, 768, device="cpu", faiss_gpu=True)
    assert chosen.name == "faiss" and "TFLOP" in chosen.reason
    assert exact_flops(2, 3, 4) == 2 * 4 * 9 * 4


def test_the_registry_holds_every_engine_name_and_auto_picks_only_exact_ones():
    from medsclean.choices import Engine

    assert set(REGISTRY) == set(Engine.values()) - {"auto"}
    assert {name for name, spec in REGISTRY.items() if spec.exact} == {"exact", "faiss"}
    for device, faiss_gpu in (("cpu", False), ("cpu", True), ("cuda:0", True)):
        assert REGISTRY[choose_engine(50, 16, 8, device=device, faiss_gpu=faiss_gpu).name].exact


def test_knn_matches_brute_force_ranking():
    rng = np.random.default_rng(0)
    database, queries = rng.standard_normal((300, 8)), rng.standard_normal((20, 8))
    index = knn.build_inner_product_index(database, use_gpu=False)
    similarities, ids = knn.search_inner_product(index, queries, k=4)
    brute = queries @ database.T
    expected_ids = np.argsort(-brute, axis=1)[:, :4]
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(similarities, np.take_along_axis(brute, expected_ids, axis=1), rtol=1e-5)


@pytest.mark.skipif(knn.gpu_count() > 0, reason="a GPU is visible to faiss")
def test_knn_gpu_request_without_gpu_is_a_usage_error():
    with pytest.raises(UsageError, match="faiss-gpu"):
        knn.build_inner_product_index(np.ones((2, 4)), use_gpu=True)


def test_importing_the_engines_does_not_import_faiss():
    script = "import sys, medsclean.step1.classes; print('faiss' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_exact_engine_on_cuda_equals_oracle():
    features = random_features(20, 16, 32, seed=15)
    banks = draw_banks(20, n_banks=10, ratio=0.2, generator=np.random.default_rng(0))
    for k in (1, 3):
        reference = naive_memory_scores(features, banks, k=k)
        maps = memory_scores_exact(torch.from_numpy(features).half(), banks, k=k, device="cuda")
        half_reference = naive_memory_scores(torch.from_numpy(features).half().float().numpy(), banks, k=k)
        assert max_error(maps, half_reference) <= TOLERANCE
        assert max_error(maps, reference) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(knn.gpu_count() == 0, reason="needs faiss-gpu and a GPU")
def test_faiss_engine_on_gpu_equals_oracle():
    features = random_features(20, 16, 32, seed=16)
    banks = draw_banks(20, n_banks=10, ratio=0.2, generator=np.random.default_rng(0))
    reference = naive_memory_scores(features, banks, k=2)
    assert max_error(memory_scores_faiss(features, banks, k=2, search=knn.IndexOptions(use_gpu=True)), reference) <= TOLERANCE
