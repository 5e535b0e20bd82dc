"""Step-1 baselines and tables: full-bank kNN, iterative refinement, the bank floor, the nearest table.

Oracles: the naive per-memory search of tests/memory_oracle.py and brute-force loops written here
from the definitions.
"""

import numpy as np
import pytest
import torch

from medsclean.config import CutConfig, DistillConfig, ExtractConfig, ScoreConfig, SelectConfig
from medsclean.presets import CPU, PAPER
from medsclean.errors import ConfigError
from medsclean.step1.banks import bank_size, draw_banks
from medsclean.maps import image_scores
from medsclean.step1.classes import refine_memory, score_classes
from medsclean.step1.engines.exact import memory_scores_exact
from medsclean.step1.reduce import nearest_table, scores_from_table

from .memory_oracle import naive_memory_scores


def _features(n=10, p=6, d=5, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, p, d))
    return f / np.linalg.norm(f, axis=-1, keepdims=True)


def _knn_oracle(f: np.ndarray, members=None) -> np.ndarray:
    """(N, P) cosine distance of each patch to its nearest patch in the memory, leaving the image out."""
    n = f.shape[0]
    members = range(n) if members is None else members
    out = np.zeros(f.shape[:2])
    for i in range(n):
        others = [j for j in members if j != i]
        memory = f[others].reshape(-1, f.shape[2])
        out[i] = (1.0 - f[i] @ memory.T).min(axis=1)
    return out


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("leave_self_out", [True, False])
def test_scores_from_table_match_the_naive_search(k, leave_self_out):
    f = _features()
    banks = draw_banks(10, 25, 0.3, generator=np.random.default_rng(1))
    table = nearest_table(torch.from_numpy(f).float(), k=k)
    assert table.shape == (10, 6, 10, k)
    got = scores_from_table(table, banks, leave_self_out=leave_self_out).numpy()
    want = naive_memory_scores(f, banks, k=k, leave_self_out=leave_self_out)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_table_of_queries_is_their_distance_to_each_image():
    f, q = _features(), _features(n=3, seed=5)
    table = nearest_table(torch.from_numpy(f).float(), queries=torch.from_numpy(q).float())
    want = np.zeros((3, 6, 10))
    for a in range(3):
        for j in range(10):
            want[a, :, j] = (1 - q[a] @ f[j].T).min(axis=1)
    np.testing.assert_allclose(table[..., 0].numpy(), want, atol=1e-5)


def test_method_knn_is_the_full_bank_leave_self_out_nearest_neighbour():
    f = _features(n=12)
    cfg = SelectConfig(method="knn").step1(ScoreConfig(min_bank=4))
    assert (cfg.banks, cfg.ratio, cfg.replace, cfg.min_bank) == (1, 1.0, False, 1)
    maps, banks = score_classes(torch.from_numpy(f).float(), ["a"] * 12,
                                ScoreConfig(banks=cfg.banks, ratio=cfg.ratio, replace=cfg.replace, engine="exact"))
    np.testing.assert_allclose(maps.numpy(), _knn_oracle(f), atol=1e-5)
    assert sorted(banks["a"][0].tolist()) == list(range(12))


def test_iterative_refinement_drops_the_most_suspicious_share_per_round():
    f = _features(n=20, seed=3)
    f[15:] = _features(n=5, seed=9)[:, :, :]  # unrelated images: they score high
    maps, banks = score_classes(torch.from_numpy(f).float(), ["a"] * 20,
                                ScoreConfig(banks=1, ratio=1.0, replace=False, refine_rounds=2, refine_drop=0.1,
                                            engine="exact"))
    # Brute force: score against all, keep the 18 lowest, rescore, keep the 16 lowest, rescore.
    memory = list(range(20))
    for keep in (18, 16):
        scores = image_scores(_knn_oracle(f, memory)).numpy()
        memory = sorted(np.argsort(scores, kind="stable")[:keep].tolist())
    np.testing.assert_allclose(maps.numpy(), _knn_oracle(f, memory), atol=1e-5)
    assert banks["a"][0].tolist() == memory


def test_refinement_through_the_engine_equals_refinement_through_the_table():
    f = torch.from_numpy(_features(n=15, seed=4)).float()
    table = nearest_table(f)
    via_engine = refine_memory(lambda b: memory_scores_exact(f, b), 15, rounds=3, drop=0.1)
    via_table = refine_memory(lambda b: scores_from_table(table, b), 15, rounds=3, drop=0.1)
    assert via_engine[0].tolist() == via_table[0].tolist()
    torch.testing.assert_close(via_engine[1], via_table[1])


def test_bank_floor_for_small_classes():
    assert bank_size(72, 0.1) == 8
    assert bank_size(72, 0.1, min_images=16) == 16
    assert bank_size(300, 0.1, min_images=16) == 30
    assert bank_size(10, 0.1, min_images=16) == 10  # never more than the class
    banks = draw_banks(72, 5, 0.1, generator=np.random.default_rng(0), min_images=16)
    assert banks.shape == (5, 16)
    # The floor at 1 draws exactly what the paper's rule draws.
    np.testing.assert_array_equal(draw_banks(50, 7, 0.1, generator=np.random.default_rng(3)),
                                  draw_banks(50, 7, 0.1, generator=np.random.default_rng(3), min_images=1))


def test_paper_preset_keeps_the_papers_rule():
    score = PAPER.build(ScoreConfig)
    assert (score.min_bank, score.ratio, score.banks, score.replace) == (1, 0.1, 100, True)
    select, cut = PAPER.build(SelectConfig), PAPER.build(CutConfig)
    assert (select.iters, select.k) == (10_000, 3.0)
    assert (cut.rule, cut.k, cut.reject_fraction, cut.threshold) == ("mad", None, None, None)
    distill = PAPER.build(DistillConfig)
    assert (distill.iters, distill.width, distill.depth, distill.heads) == (10_000, None, 8, 12)
    assert PAPER.build(ExtractConfig).backbone == "vit_base_patch14_reg4_dinov2"


def test_preset_overrides_and_validation():
    assert CPU.build(SelectConfig, iters=7).iters == 7
    assert CPU.build(SelectConfig, iters=None).iters == CPU.value(SelectConfig, "iters") == 600
    assert CPU.build(CutConfig).rule == "mixture" and PAPER.build(CutConfig).rule == "mad"
    assert CPU.build(DistillConfig).token_pool == 2 and PAPER.build(DistillConfig).token_pool == 1
    with pytest.raises(ConfigError, match="method") as exc:
        SelectConfig(method="bogus")
    assert exc.value.params == ("method",) and exc.value.stage == "select"
    with pytest.raises(ConfigError, match="rule"):
        CutConfig(rule="bogus")
    with pytest.raises(ConfigError, match="reject_fraction"):
        CutConfig(reject_fraction=1.0)
    with pytest.raises(ConfigError, match="contradict"):
        CutConfig(reject_fraction=0.1, threshold=0.5)
    with pytest.raises(ConfigError, match="min_bank"):
        ScoreConfig(min_bank=0)
    for zero in ({"iters": 0}, {"depth": 0}, {"width": 0}, {"batch_size": 0}):
        with pytest.raises(ConfigError):  # zero is refused, never read as "use the preset"
            CPU.build(DistillConfig, **zero)


def test_select_knn_with_reject_fraction_through_the_cli(tmp_path):
    """`select --method knn --reject-fraction 0.25`: scores are the brute-force leave-self-out kNN on the
    stored features, and exactly the top quarter of each class is rejected."""
    import csv
    import json

    from typer.testing import CliRunner

    from medsclean.cli import app
    from medsclean.workdir.store import Store

    from .helpers import make_mvtec

    root = make_mvtec(tmp_path / "data", n_train=8, size=64)
    work = tmp_path / "work"
    res = CliRunner().invoke(app, ["select", str(root), "--work", str(work), "--method", "knn",
                                   "--reject-fraction", "0.25", "--resize", "64", "--crop", "64",
                                   "--num-workers", "0", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["method"] == "knn"
    assert all(c["rejected"] == 2 for c in summary["classes"].values())
    with open(f"{summary['cut_dir']}/scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    features = Store(work).load("extract").sharded_tensors(["index", "memory"])["memory"].float().numpy()
    for cls in ("brick", "gravel"):
        idx = [i for i, r in enumerate(rows) if r["class"] == cls]
        want = image_scores(_knn_oracle(features[idx].astype(np.float64))).numpy()
        got = np.array([float(rows[i]["final_eta"]) for i in idx])
        np.testing.assert_allclose(got, want, atol=1e-4)
        rejected = {i for i in idx if rows[i]["kept"] == "0"}
        assert rejected == {idx[j] for j in np.argsort(-want)[:2]}


def test_final_cut_mad_is_the_papers_step3_rule_at_t_equals_T():
    """With cut "mad", the final clean set is exactly Step 3's own re-selection at t = T."""
    from medsclean.selection.progressive import select_per_class
    from medsclean.stages.cut import final_cut

    rng = np.random.default_rng(7)
    eta = np.concatenate([rng.gamma(9, 0.1, 60), rng.gamma(9, 0.1, 40) + rng.uniform(0, 2, 40)])
    classes = ["a"] * 55 + ["b"] * 45
    cfg = PAPER.build(SelectConfig)
    keep, tau = final_cut(eta, classes, PAPER.build(CutConfig), cfg.k)
    want_keep, want_tau = select_per_class(eta, classes, cfg.iters, cfg.iters, cfg.k)
    np.testing.assert_array_equal(keep, want_keep)
    assert tau == pytest.approx(want_tau)


@pytest.mark.parametrize("method", ["knn", "iterative"])
def test_knn_and_iterative_refuse_include_self(method, tmp_path):
    from typer.testing import CliRunner

    from medsclean.cli import app

    with pytest.raises(ConfigError) as error:
        SelectConfig(method=method).step1(ScoreConfig(include_self=True))
    assert error.value.params == ("include_self", "method")
    assert SelectConfig(method="memory").step1(ScoreConfig(include_self=True)).include_self  # the ensemble may
    work = tmp_path / "work"
    result = CliRunner().invoke(app, ["select", str(tmp_path), "--method", method, "--include-self", "--work",
                                      str(work)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --include-self does not apply to --method " + method)
    assert not work.exists()  # refused before any work
