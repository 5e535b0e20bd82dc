"""The Step-3 selection rule against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

import torch

from medsclean.errors import MedscleanError
from medsclean.maps import image_scores
from medsclean.selection.progressive import (
    alpha,
    blend_scores,
    median_absolute_deviation,
    select_per_class,
    threshold,
)


def test_alpha_reaches_one_halfway():
    assert alpha(0, 10) == 0.0
    assert alpha(2, 10) == pytest.approx(0.4)
    assert alpha(5, 10) == 1.0
    assert alpha(8, 10) == 1.0


def test_blend_scores_hand_computed():
    s0, s_theta = np.array([1.0, 2.0]), np.array([3.0, 0.0])
    np.testing.assert_allclose(blend_scores(s0, s_theta, 0, 10), [1.0, 2.0])
    # t = 1 of 10: alpha = 0.2 -> 0.8 * s0 + 0.2 * s_theta
    np.testing.assert_allclose(blend_scores(s0, s_theta, 1, 10), [1.4, 1.6])
    np.testing.assert_allclose(blend_scores(s0, s_theta, 7, 10), [3.0, 0.0])


def test_mad_is_unscaled_median_absolute_deviation():
    # median 3, |x - 3| = [2, 1, 0, 1, 97] -> median 1
    assert median_absolute_deviation([1, 2, 3, 4, 100]) == 1.0
    # median 2.5, |x - 2.5| = [1.5, .5, .5, 1.5] -> median 1.0
    assert median_absolute_deviation([1, 2, 3, 4]) == 1.0


def test_threshold_grows_from_median_with_t():
    eta = [1, 2, 3, 4, 100]
    assert threshold(eta, 0, 10) == 3.0
    assert threshold(eta, 5, 10, k=3.0) == pytest.approx(3 + 3 * 0.5 * 1)
    assert threshold(eta, 10, 10, k=1.0) == pytest.approx(4.0)


def test_selection_is_strict_at_the_threshold():
    keep, tau = select_per_class([1, 2, 3, 4, 100], ["c"] * 5, 0, 10)
    assert tau == {"c": 3.0}
    assert keep.tolist() == [True, True, False, False, False]  # 3 == tau is rejected
    keep, _ = select_per_class([1, 2, 3, 4, 100], ["c"] * 5, 5, 10, k=3.0)  # tau = 4.5
    assert keep.tolist() == [True, True, True, True, False]
    keep, tau = select_per_class([1, 2, 3, 4], ["c"] * 4, 0, 10)  # even count: median 2.5
    assert tau == {"c": 2.5} and keep.tolist() == [True, True, False, False]


def test_all_tied_class_and_single_image_class_keep_nothing():
    keep, tau = select_per_class([5.0, 5.0, 5.0], ["c"] * 3, 10, 10, k=3.0)
    assert tau == {"c": 5.0} and not keep.any()
    keep, tau = select_per_class([0.2], ["lonely"], 10, 10)
    assert tau == {"lonely": 0.2} and not keep.any()


def test_selection_is_per_class():
    eta = [1.0, 10.0, 2.0, 20.0, 3.0, 30.0, 0.5]
    classes = ["b", "a", "b", "a", "b", "a", "z"]
    keep, tau = select_per_class(eta, classes, 0, 10)
    assert list(tau) == ["a", "b", "z"]
    assert tau == {"a": 20.0, "b": 2.0, "z": 0.5}
    assert keep.tolist() == [True, True, False, False, False, False, False]


def test_non_finite_scores_raise():
    with pytest.raises(MedscleanError, match="NaN"):
        select_per_class([1.0, float("nan")], ["a", "a"], 0, 10)


@pytest.mark.parametrize("n_patches, k", [(50, 1), (250, 2), (1000, 10), (784, 7)])
def test_image_scores_are_top_one_percent_means(n_patches, k):
    maps = np.random.default_rng(n_patches).random((3, n_patches))
    expected = np.sort(maps, axis=1)[:, ::-1][:, :k].mean(axis=1)
    np.testing.assert_allclose(image_scores(maps, dtype=torch.float64).numpy(), expected)



def test_combine_class_scores_hand_computed():
    from medsclean.selection.progressive import combine_class_scores

    # Class a: medians 2 and 10 -> ratios (0.5, 1, 4) and (1, 1, 0.25); geometric means 0.707, 1, 1.
    # Class b: two images, medians 3 and 1.5 -> ratios (2/3, 4/3) and (2/3, 4/3).
    first = [1.0, 2.0, 8.0, 2.0, 4.0]
    second = [10.0, 10.0, 2.5, 1.0, 2.0]
    combined = combine_class_scores([first, second], ["a", "a", "a", "b", "b"])
    assert np.allclose(combined, [np.sqrt(0.5), 1.0, 1.0, 2 / 3, 4 / 3])
    # Scale-free: multiplying one score set by a constant changes nothing.
    assert np.allclose(combine_class_scores([np.multiply(first, 7.0), second], ["a"] * 3 + ["b"] * 2), combined)
    with pytest.raises(ValueError):
        combine_class_scores([first], ["a", "a"])
    with pytest.raises(ValueError, match="positive"):
        combine_class_scores([[0.0, 1.0]], ["a", "a"])


def test_the_cut_reads_eta_or_its_combination_with_the_memory_score():
    import torch

    from medsclean.config import CutConfig
    from medsclean.errors import ConfigError
    from medsclean.selection.progressive import combine_class_scores
    from medsclean.stages.cut import final_scores

    stored = {"eta": torch.tensor([0.2, 0.4, 0.9, 0.3], dtype=torch.float64),
              "memory_score": torch.tensor([0.5, 0.1, 0.6, 0.3])}
    classes = ["a", "a", "a", "b"]
    assert np.array_equal(final_scores(stored, classes, "eta"), [0.2, 0.4, 0.9, 0.3])
    combined = final_scores(stored, classes, "eta+memory")
    assert np.allclose(combined, combine_class_scores([stored["eta"].numpy(), stored["memory_score"].numpy()],
                                                      classes))
    # By hand for class a: eta/0.4 = (0.5, 1, 2.25), memory/0.5 = (1, 0.2, 1.2).
    assert np.allclose(combined[:3], np.sqrt([0.5 * 1.0, 1.0 * 0.2, 2.25 * 1.2]), atol=1e-7)
    assert CutConfig(rule="mixture", score="eta+memory").describe() == "mixture of eta+memory"
    assert CutConfig(reject_fraction=0.1, score="eta+memory").describe() == "top 0.1 of eta+memory"
    assert CutConfig(threshold=0.5).describe() == "eta < 0.5"
    with pytest.raises(ConfigError, match="score"):
        CutConfig(score="memory")


def test_selection_json_says_which_rule_each_class_used(tmp_path):
    """A class of 8 images is cut by mad under --cut mixture, and the record says why."""
    import json

    from medsclean.config import CutConfig, ExtractConfig, ScoreConfig, SelectConfig
    from medsclean.workdir.data import discover
    from medsclean.stages.features import run_extract
    from medsclean.stages.scores import run_score
    from medsclean.workdir.store import Store
    from medsclean.demo.synth import generate_dataset
    from medsclean.selection.cut_rules import cut_mad
    from medsclean.stages.common import TrainingSetup
    from medsclean.stages.cut import run_cut
    from medsclean.stages.select import run_select
    from medsclean.ui import SilentReporter

    generate_dataset(tmp_path / "data", categories=("gravel",), n_train=8, n_test_good=0, n_test_defect=0, size=64)
    store, quiet = Store(tmp_path / "work"), SilentReporter()
    features = run_extract(discover(tmp_path / "data"), store, ExtractConfig(resize=64, crop=64, num_workers=0),
                           reporter=quiet).artifact
    scores = run_score(features, store, ScoreConfig(banks=5), device="cpu", reporter=quiet).artifact
    selected = run_select(features, scores, None, store, SelectConfig(method="memory"),
                          TrainingSetup(seed=0, device="cpu", reporter=quiet)).artifact
    cut = run_cut(selected, store, CutConfig(rule="mixture")).artifact
    record = json.loads(cut.file("selection.json").read_text())["rounds"][-1]["rules"]
    assert record["gravel"]["rule"] == "mad" and "8 images, fewer than the 20" in record["gravel"]["why"]
    assert cut.manifest["rules"] == record
    eta = selected.tensors("eta.safetensors")["eta"].double().numpy()
    assert cut.manifest["tau"]["gravel"] == cut_mad(eta, SelectConfig().k)
