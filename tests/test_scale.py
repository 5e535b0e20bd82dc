"""Scaling Step 1: the approximate (coreset) engine, the automatic choice, and --max-memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsclean.config import ScoreConfig
from medsclean.values import parse_size
from medsclean.errors import ConfigError, DataError
from medsclean.step1.banks import draw_banks
from medsclean.step1.classes import score_classes
from medsclean.step1.engines import choose_engine
from medsclean.step1.engines.approx import coreset_patches, memory_scores_approx
from medsclean.step1.engines.exact import memory_scores_exact
from medsclean.step1.plan import (APPROX_ADVICE_SECONDS, block_budget, coreset_size, projected_exact_seconds,
                                  streaming_layout, working_set_bytes)
from medsclean.step1.runtime import Runtime
from medsclean.stages.scores import step1_maps
from tests.test_memory import random_features, structured_features


def oracle_approx(features: np.ndarray, kept: np.ndarray, banks: np.ndarray, k: int, leave_self_out: bool):
    """Brute force: each bank's memory is the kept patches of its distinct members (minus the query image)."""
    features = features.astype(np.float64)
    n_images, n_patches, dim = features.shape
    reduced = np.stack([features[i, kept[i]] for i in range(n_images)])
    sums, counts = np.zeros((n_images, n_patches)), np.zeros(n_images)
    for bank in banks:
        members = np.unique(bank)
        for image in range(n_images):
            others = members[members != image] if leave_self_out else members
            if len(others) == 0:
                continue
            distances = 1.0 - features[image] @ reduced[others].reshape(-1, dim).T
            sums[image] += np.sort(distances, axis=1)[:, :k].mean(axis=1)
            counts[image] += 1
    return sums / counts[:, None]


@pytest.mark.parametrize("method", ["greedy", "random"])
@pytest.mark.parametrize("k,leave_self_out", [(1, True), (2, True), (1, False)])
def test_approx_equals_brute_force_on_its_coreset(method, k, leave_self_out):
    features = random_features(12, 16, 8, seed=3)
    banks = draw_banks(12, 7, 0.3, generator=np.random.default_rng(1))
    kept = coreset_patches(features, 0.25, generator=np.random.default_rng(5), method=method, k=k).numpy()
    assert kept.shape == (12, coreset_size(16, 0.25, k)) == (12, 4)
    assert all(len(np.unique(row)) == len(row) for row in kept)  # distinct patches
    maps = memory_scores_approx(features, banks, torch.from_numpy(kept), k=k, leave_self_out=leave_self_out,
                                max_block_bytes=3_000)
    reference = oracle_approx(features, kept, banks, k, leave_self_out)
    assert np.abs(maps.numpy() - reference).max() <= 1e-5


@pytest.mark.parametrize("k", [1, 3])
def test_approx_with_every_patch_is_the_exact_engine_and_never_below_it(k):
    features = structured_features(10, 4, 12, seed=2)
    banks = draw_banks(10, 9, 0.3, generator=np.random.default_rng(0))
    exact = memory_scores_exact(features, banks, k=k)
    every_patch = coreset_patches(features, 1.0, generator=np.random.default_rng(0), k=k)
    assert torch.equal(memory_scores_approx(features, banks, every_patch, k=k), exact)
    for coreset in (0.1, 0.3, 0.6):
        kept = coreset_patches(features, coreset, generator=np.random.default_rng(4), k=k)
        approx = memory_scores_approx(features, banks, kept, k=k)
        assert (approx >= exact - 1e-6).all()


def test_greedy_coreset_covers_the_image_better_than_its_first_centre():
    """The k-center rule: every further centre is the patch farthest from those chosen."""
    points = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.9, 0.0], [0.0, 1.0], [0.05, 0.0]]])
    kept = coreset_patches(points, 0.6, generator=np.random.default_rng(0), projection_dim=8)[0].tolist()
    start = kept[0]
    assert len(kept) == 3 and len(set(kept)) == 3
    if start == 0:
        assert set(kept[1:]) == {1, 3}


def test_score_classes_approx_is_deterministic_per_seed():
    features = random_features(16, 16, 8, seed=0)
    classes = ["a"] * 8 + ["b"] * 8
    first, banks = score_classes(features, classes, ScoreConfig(banks=6, engine="approx", coreset=0.25, seed=3))
    again, banks_again = score_classes(features, classes, ScoreConfig(banks=6, engine="approx", coreset=0.25, seed=3))
    other, _ = score_classes(features, classes, ScoreConfig(banks=6, engine="approx", coreset=0.25, seed=4))
    exact, exact_banks = score_classes(features, classes, ScoreConfig(banks=6, engine="exact", seed=3))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert all(torch.equal(banks[c], exact_banks[c]) for c in banks)  # the coreset draws after the banks
    assert (first >= exact - 1e-6).all() and (first > exact + 1e-4).any()
    full, _ = score_classes(features, classes, ScoreConfig(banks=6, engine="approx", coreset=1.0, seed=3))
    assert torch.equal(full, exact)
    # refinement rounds score against the same coreset each round
    refined, _ = score_classes(features, classes, ScoreConfig(banks=1, ratio=1.0, replace=False, engine="approx",
                                                              coreset=0.25, seed=3, refine_rounds=2, refine_drop=0.2))
    assert torch.isfinite(refined).all()


def test_max_memory_changes_blocks_not_scores():
    features = random_features(40, 16, 24, seed=1)
    classes = ["a"] * 25 + ["b"] * 15
    maps = {}
    for bound in (None, 8 * 2**20, 64 * 2**20, 2**32):
        for engine in ("exact", "approx"):
            maps[bound, engine], _ = score_classes(features, classes,
                                                   ScoreConfig(banks=12, engine=engine, seed=0, coreset=0.5),
                                                   Runtime(max_memory=bound))
    for engine in ("exact", "approx"):
        reference = maps[None, engine]
        for bound in (8 * 2**20, 64 * 2**20, 2**32):
            assert torch.allclose(maps[bound, engine], reference, atol=1e-6, rtol=0)
    with pytest.raises(DataError, match="raise --max-memory"):  # the maps alone leave too little
        score_classes(random_features(4000, 16, 64, seed=0), ["a"] * 4000, ScoreConfig(banks=2, engine="exact"),
                      Runtime(max_memory=6 * 2**20))


def test_a_class_larger_than_the_bound_streams_its_key_chunks():
    features = random_features(1200, 16, 64, seed=2)  # 4.9 MB of float32 features
    bound = 8_600_000  # less than those, 4 MiB of blocks and the maps: the exact engine streams
    assert working_set_bytes(1200, 16, 64) + 4 * 2**20 > bound
    block_bytes, key_images = streaming_layout(bound, 1200, 16, 64)
    assert key_images < 1200 and block_bytes < bound
    cfg = ScoreConfig(banks=5, engine="exact", seed=0)
    streamed, _ = score_classes(features, ["a"] * 1200, cfg, Runtime(max_memory=bound))
    unbounded, _ = score_classes(features, ["a"] * 1200, cfg)
    assert torch.allclose(streamed, unbounded, atol=1e-6, rtol=0)


def test_block_budget_counts_the_class_tensors():
    own = 4 * (100 * 64 * 32 + 2 * 100 * 64)
    assert block_budget(own + 2**23, 100, 64, 32) == 2**23
    assert block_budget(own + 2**23, 100, 64, 32, coreset=0.1) == 2**23 - 4 * 100 * 7 * 32


def test_auto_never_picks_approx_and_marks_classes_past_the_bound():
    small = choose_engine(200, 784, 768, device="cpu", faiss_gpu=False)
    assert small.name == "exact" and not small.over_bound
    big = choose_engine(5000, 784, 152, device="cpu", faiss_gpu=False)
    assert projected_exact_seconds(5000, 784, 152) > APPROX_ADVICE_SECONDS
    assert big.name == "exact" and big.over_bound
    assert big.projected_seconds == pytest.approx(2.0 * 5000**2 * 784**2 * 152 / 50e9)
    assert choose_engine(5000, 784, 152, device="cpu", faiss_gpu=True).name == "faiss"
    assert not choose_engine(5000, 784, 152, device="cpu", faiss_gpu=False, advice_seconds=1e9).over_bound


def test_auto_past_a_tiny_bound_gives_the_exact_scores():
    features = structured_features(40, 16, 8, seed=3)
    classes = ["small"] * 12 + ["large"] * 28
    seen = {}
    auto, _ = score_classes(features, classes, ScoreConfig(banks=6, engine="auto", seed=1),
                            Runtime(advice_seconds=1e-7, on_engine=lambda label, choice: seen.setdefault(label, choice)))
    exact, _ = score_classes(features, classes, ScoreConfig(banks=6, engine="exact", seed=1))
    assert torch.equal(auto, exact)  # bit for bit: the same engine
    assert {label: (c.name, c.over_bound) for label, c in seen.items()} == \
        {"small": ("exact", True), "large": ("exact", True)}
    approx, _ = score_classes(features, classes, ScoreConfig(banks=6, engine="approx", seed=1))
    assert not torch.equal(approx, exact)  # what auto used to switch to differs


def test_run_score_prints_one_line_per_class_past_the_bound_and_records_engines(tmp_path, monkeypatch):
    from medsclean.config import ExtractConfig
    from medsclean.workdir.data import discover
    from medsclean.stages.features import run_extract
    from medsclean.stages.scores import approx_command, run_score
    from medsclean.workdir.store import Store
    from medsclean.demo.synth import generate_dataset
    from medsclean.ui import SilentReporter

    generate_dataset(tmp_path / "data", categories=("gravel", "coins"), n_train=6, n_test_good=0,
                     n_test_defect=0, size=64)
    store = Store(tmp_path / "work")
    features = run_extract(discover(tmp_path / "data"), store, ExtractConfig(resize=64, crop=64, num_workers=0),
                           reporter=SilentReporter()).artifact
    monkeypatch.setattr("sys.argv", ["/venv/bin/medsclean", "select", "imgs", "--engine", "auto", "--seed", "2"])
    reporter = SilentReporter()
    tiny = run_score(features, store, ScoreConfig(banks=5), device="cpu", reporter=reporter,
                     advice_seconds=1e-9).artifact
    lines = [m for m in reporter.messages if "over the" in m]
    assert len(lines) == 2 and all("medsclean select imgs --seed 2 --engine approx" in m for m in lines)
    assert {c: e["engine"] for c, e in tiny.manifest["engines"].items()} == {"gravel": "exact", "coins": "exact"}
    assert all(e["over_bound"] and e["projected_exact_s"] > 0 for e in tiny.manifest["engines"].values())
    exact_store = Store(tmp_path / "work-exact")
    features_again = run_extract(discover(tmp_path / "data"), exact_store,
                                 ExtractConfig(resize=64, crop=64, num_workers=0), reporter=SilentReporter()).artifact
    exact = run_score(features_again, exact_store, ScoreConfig(banks=5, engine="exact"), device="cpu",
                      reporter=SilentReporter()).artifact
    assert torch.equal(tiny.tensors("scores.safetensors")["maps"], exact.tensors("scores.safetensors")["maps"])
    assert tiny.key == exact.key  # auto and exact are one result
    quiet = SilentReporter()
    run_score(features, Store(tmp_path / "work-default"), ScoreConfig(banks=5), device="cpu", reporter=quiet)
    assert not [m for m in quiet.messages if "over the" in m]
    assert approx_command(["python", "x"]).startswith("engine='approx'")
    assert approx_command(["medsclean", "score", "d", "--engine=exact"]) == "medsclean score d --engine approx"


def test_step1_maps_passes_coreset_and_max_memory():
    features = random_features(10, 16, 8, seed=0)
    cfg = ScoreConfig(banks=4, engine="approx", coreset=0.25, max_memory="1GB")
    maps, _ = step1_maps(features, ["a"] * 10, cfg, device="cpu")
    direct, _ = score_classes(features, ["a"] * 10, ScoreConfig(banks=4, engine="approx", coreset=0.25))
    assert torch.equal(maps, direct)


def test_config_parses_sizes_and_validates():
    assert parse_size("4GB") == 4 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size(123) == 123
    assert parse_size("1.5g") == 1_500_000_000 and parse_size("2000000") == 2_000_000
    for bad in ("4 parsecs", "-1GB", "GB", True):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert ScoreConfig(max_memory="4GB").max_memory_bytes == 4 * 10**9
    assert ScoreConfig().max_memory_bytes is None
    for field, value in (("coreset", 0.0), ("coreset", 1.5), ("max_memory", "lots"), ("max_memory", "1MB")):
        with pytest.raises(ConfigError) as error:
            ScoreConfig(**{field: value})
        assert error.value.param == field


def test_key_fields_name_the_approximation_only_when_it_changes_scores():
    base = ScoreConfig().key_fields()
    assert "coreset" not in base and "engine" not in base and "max_memory" not in base
    assert ScoreConfig(max_memory="4GB").key_fields() == base
    assert ScoreConfig(engine="exact", coreset=0.5).key_fields() == base
    approx = ScoreConfig(engine="approx").key_fields()
    assert approx["engine"] == "approx" and approx["coreset"] == ScoreConfig.coreset
    assert ScoreConfig(engine="approx", coreset=1.0).key_fields() == base
    assert ScoreConfig(engine="auto").key_fields(approx=True) == approx
    assert ScoreConfig(engine="auto").key_fields() == base  # auto always scores exactly
