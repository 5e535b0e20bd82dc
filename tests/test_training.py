"""Optimiser, schedules, losses and the Step 2-3 loops."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from medsclean.errors import DataError, UsageError
from medsclean.model.losses import hard_mining_cosine_loss, hard_mining_weights, map_regression_loss, p_schedule
from medsclean.model.decoder import ModelConfig, ReconstructionModel
from medsclean.model.optim import StableAdamW, warm_cosine_lr
from medsclean.maps import image_scores
from medsclean.config import DistillConfig, SelectConfig
from medsclean.model.loop import TrainContext
from medsclean.model.training import compute_maps, distill, progressive_select

_BENCH = str(Path(__file__).resolve().parents[1] / "benchmarks")
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)
from detector_baseline import train_detector  # noqa: E402  (the benchmarks' from-scratch baselines)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- optimiser and schedules


def _reference_stable_adamw(theta, grads, lr, wd, betas=(0.9, 0.999), eps=1e-10, clip_threshold=1.0):
    """The update rule written out in float64 for a sequence of gradients."""
    beta1, beta2 = betas
    theta = theta.astype(np.float64).copy()
    m, v, v_max = np.zeros_like(theta), np.zeros_like(theta), np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        theta *= 1 - lr * wd
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        v_max = np.maximum(v_max, v)
        denom = np.sqrt(v_max) / np.sqrt(1 - beta2**t) + eps
        rms = np.sqrt(np.mean((g / denom) ** 2))
        theta -= lr / (1 - beta1**t) / max(1.0, rms / clip_threshold) * m / denom
    return theta


def _run_stable_adamw(theta, grads, lr, wd):
    param = torch.nn.Parameter(torch.tensor(theta, dtype=torch.float64))
    optimizer = StableAdamW([param], lr=lr, weight_decay=wd)
    for g in grads:
        param.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
    return param.detach().numpy()


@pytest.mark.parametrize(
    "grad_scales",
    [
        (1.0,),  # one step: |g / denom| ~ 1, no clipping
        (1.0, 10.0),  # a surprising gradient: update clipped by RMS ~ 1.41
        (1.0, 0.01),  # a small gradient after a big one: AMSGrad keeps the old second moment
    ],
)
def test_stable_adamw_matches_written_out_rule(grad_scales):
    rng = np.random.default_rng(0)
    theta = rng.normal(size=(3, 4))
    direction = rng.normal(size=(3, 4))
    grads = [scale * direction for scale in grad_scales]
    got = _run_stable_adamw(theta, grads, lr=0.1, wd=0.05)
    np.testing.assert_allclose(got, _reference_stable_adamw(theta, grads, lr=0.1, wd=0.05), rtol=1e-12, atol=1e-14)
    # and the branches the cases are meant to exercise really differ from plain AdamW
    if grad_scales == (1.0, 10.0):
        unclipped = _reference_stable_adamw(theta, grads, lr=0.1, wd=0.05, clip_threshold=1e9)
        assert not np.allclose(got, unclipped)


def test_stable_adamw_skips_parameters_without_gradient():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = StableAdamW([param], lr=0.1, weight_decay=0.5)
    optimizer.step()
    assert torch.equal(param.detach(), torch.ones(3))


def test_warm_cosine_lr_at_key_points():
    kwargs = dict(base_lr=2e-3, final_lr=2e-4, warmup=100, total=1101)
    assert warm_cosine_lr(0, **kwargs) == 0.0
    assert warm_cosine_lr(50, **kwargs) == pytest.approx(1e-3)
    assert warm_cosine_lr(100, **kwargs) == pytest.approx(2e-3)
    assert warm_cosine_lr(600, **kwargs) == pytest.approx(1.1e-3)  # halfway down the cosine
    assert warm_cosine_lr(1100, **kwargs) == pytest.approx(2e-4)
    assert warm_cosine_lr(5000, **kwargs) == pytest.approx(2e-4)
    quarter = 2e-4 + 0.5 * 1.8e-3 * (1 + math.cos(math.pi / 4))
    assert warm_cosine_lr(350, **kwargs) == pytest.approx(quarter)


def test_p_schedule_ramps_linearly_then_holds():
    assert p_schedule(0, 0.5, 1000) == 0.0
    assert p_schedule(500, 0.5, 1000) == pytest.approx(0.25)
    assert p_schedule(1000, 0.5, 1000) == 0.5
    assert p_schedule(5000, 0.5, 1000) == 0.5
    assert p_schedule(300, p_final=0.9, ramp=1000) == pytest.approx(0.27)


# ---------------------------------------------------------------- losses


def test_map_regression_loss_is_ten_times_mse_or_l1():
    pred = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    target = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    # squared errors 1, 0, 4, 9 -> mean 3.5; absolute errors 1, 0, 2, 3 -> mean 1.5
    assert map_regression_loss(pred, target).item() == pytest.approx(35.0)
    assert map_regression_loss(pred, target, kind="l1").item() == pytest.approx(15.0)
    with pytest.raises(UsageError, match="loss"):
        map_regression_loss(pred, target, kind="huber")


def _hand_made_points():
    """One image, one prefix token, 4 points in 2-D; decoder points at known angles to the encoder's x axis."""
    angles = torch.tensor([0.0, 0.3, 1.0, 1.5])  # distances 1 - cos: 0, 0.045, 0.46, 0.93
    enc = torch.zeros(1, 5, 2)
    enc[0, :, 0] = 1.0
    dec = torch.zeros(1, 5, 2, dtype=torch.float64)
    dec[0, 0] = torch.tensor([0.0, 1.0])  # the prefix token: must not matter
    dec[0, 1:, 0] = torch.cos(angles) * torch.tensor([1.0, 2.0, 0.5, 1.0])
    dec[0, 1:, 1] = torch.sin(angles) * torch.tensor([1.0, 2.0, 0.5, 1.0])
    return enc.double(), dec


def test_hard_mining_weights_threshold_is_kth_largest():
    distance = torch.tensor([[0.0, 0.045, 0.46, 0.93]], dtype=torch.float64)
    # p = 0.5: k = 2, threshold = 0.46, so the two smaller points are damped
    assert hard_mining_weights(distance, 0.5, 0.1).tolist() == [[0.1, 0.1, 1.0, 1.0]]
    assert hard_mining_weights(distance, 0.0, 0.1).tolist() == [[1.0, 1.0, 1.0, 1.0]]
    # p = 0.9: k = max(1, int(0.4)) = 1, everything below the maximum is damped
    assert hard_mining_weights(distance, 0.9, 0.1).tolist() == [[0.1, 0.1, 0.1, 1.0]]


def test_hard_mining_scales_easy_point_gradients_by_exactly_the_factor():
    enc, dec = _hand_made_points()
    dec_plain = dec.clone().requires_grad_(True)
    dec_mined = dec.clone().requires_grad_(True)
    loss_plain = hard_mining_cosine_loss([enc], [dec_plain], n_prefix=1, p=0.0)
    loss_mined = hard_mining_cosine_loss([enc], [dec_mined], n_prefix=1, p=0.5, factor=0.1)
    loss_plain.backward()
    loss_mined.backward()
    # value: one cosine of the flattened spatial maps, independent of p
    e, d = enc[0, 1:].flatten().numpy(), dec[0, 1:].flatten().numpy()
    expected = 1 - e @ d / (np.linalg.norm(e) * np.linalg.norm(d))
    assert loss_plain.item() == pytest.approx(expected)
    assert loss_mined.item() == pytest.approx(expected)
    grad_plain, grad_mined = dec_plain.grad[0], dec_mined.grad[0]
    assert torch.equal(grad_mined[1:3], grad_plain[1:3] * 0.1)  # distances 0 and 0.045: easy
    assert torch.equal(grad_mined[3:], grad_plain[3:])  # distances 0.46 and 0.93: hard
    assert torch.all(grad_plain[1:].abs().sum(dim=1) > 0)  # every spatial point does get a gradient
    assert torch.equal(grad_mined[0], torch.zeros(2))  # the prefix token is not in the loss


def test_hard_mining_loss_averages_groups():
    enc, dec = _hand_made_points()
    one = hard_mining_cosine_loss([enc], [dec], n_prefix=1, p=0.5)
    other = hard_mining_cosine_loss([enc], [enc.clone()], n_prefix=1, p=0.5)
    both = hard_mining_cosine_loss([enc, enc], [dec, enc.clone()], n_prefix=1, p=0.5)
    assert other.item() == pytest.approx(0.0, abs=1e-12)
    assert both.item() == pytest.approx((one.item() + other.item()) / 2)


# ---------------------------------------------------------------- training loops


def _synthetic_problem(seed=0, n_images=20, side=4, channels=16, n_prefix=1, outliers=(3, 11)):
    """Near-identical images (a shared pattern plus 5 % noise) and planted outliers.

    Each outlier has two patches pushed far off the pattern and a Step-1 map that is
    high on exactly those patches; normal maps are low everywhere.
    """
    gen = torch.Generator().manual_seed(seed)
    n_patches = side * side
    groups = []
    for _ in range(2):
        pattern = torch.randn(n_prefix + n_patches, channels, generator=gen)
        groups.append(pattern + 0.05 * torch.randn(n_images, n_prefix + n_patches, channels, generator=gen))
    targets = 0.1 + 0.02 * torch.rand(n_images, n_patches, generator=gen)
    for index in outliers:
        for features in groups:
            features[index, n_prefix + 5 : n_prefix + 7] += 3 * torch.randn(2, channels, generator=gen)
        targets[index, 5:7] = 0.8
    return [g.half() for g in groups], targets


def _step3(iters, batch_size=16, warmup=100, checkpoint_every=200, **select):
    """Step-3 settings and the Step-2 optimiser settings they train with."""
    return (SelectConfig(iters=iters, **select),
            DistillConfig(batch_size=batch_size, warmup=warmup, checkpoint_every=checkpoint_every))


def _tiny_model(seed=0):
    return ReconstructionModel(ModelConfig((16, 16), n_prefix=1, depth=2, heads=2), seed=seed)


def test_distill_reduces_the_map_regression_loss():
    groups, targets = _synthetic_problem()
    model = _tiny_model()
    before = map_regression_loss(compute_maps(model, groups), targets).item()
    history = distill(model, groups, targets, DistillConfig(iters=40, batch_size=4, warmup=5), TrainContext(seed=0))
    after = map_regression_loss(compute_maps(model, groups), targets).item()
    assert len(history["loss"]) == 40 and history["lr"][0] == 0.0
    assert after < 0.2 * before
    assert np.mean(history["loss"][-5:]) < 0.2 * np.mean(history["loss"][:5])


def test_distill_is_deterministic_and_leaves_the_global_rng_alone():
    groups, targets = _synthetic_problem(n_images=8, outliers=(3,))
    cfg = DistillConfig(iters=6, batch_size=4, warmup=2)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first, second = _tiny_model(), _tiny_model()
    distill(first, groups, targets, cfg, TrainContext(seed=5))
    assert torch.equal(torch.rand(1), expected_next)
    distill(second, groups, targets, cfg, TrainContext(seed=5))
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())


def _collect_checkpoints(store):
    """A checkpoint callback that round-trips each checkpoint through safetensors and JSON, as on disk."""

    def checkpoint(state, meta):
        store[meta["step"]] = (safetensors.torch.load(safetensors.torch.save(state)), json.loads(json.dumps(meta)))

    return checkpoint


def test_distill_resumed_from_a_checkpoint_equals_an_uninterrupted_run():
    groups, targets = _synthetic_problem(n_images=10, outliers=(3,))
    cfg = DistillConfig(iters=12, batch_size=4, warmup=3, checkpoint_every=5)  # 2 batches per pass
    full = _tiny_model()
    saved = {}
    full_history = distill(full, groups, targets, cfg, TrainContext(seed=3, checkpoint=_collect_checkpoints(saved)))
    assert sorted(saved) == [5, 10, 12]
    state, meta = saved[5]
    assert meta["pass_position"] == 1 and meta["step"] == 5  # interrupted in the middle of a pass
    assert {"rng.torch", "rng.shuffle", "data.order"} <= set(state)
    assert any(k.startswith("optim.") for k in state) and all(t.device.type == "cpu" for t in state.values())

    resumed = _tiny_model(seed=99)  # the checkpoint must overwrite every weight
    resumed_history = distill(resumed, groups, targets, cfg, TrainContext(seed=3, resume=(state, meta)))
    assert resumed_history == full_history
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())


def test_resume_rejects_a_checkpoint_of_another_run():
    groups, targets = _synthetic_problem(n_images=8, outliers=(3,))
    saved = {}
    distill(_tiny_model(), groups, targets, DistillConfig(iters=2, batch_size=4),
            TrainContext(seed=0, checkpoint=_collect_checkpoints(saved)))
    with pytest.raises(UsageError, match="iterations"):
        distill(_tiny_model(), groups, targets, DistillConfig(iters=3, batch_size=4),
                TrainContext(seed=0, resume=saved[2]))


def test_mismatched_inputs_raise_data_errors():
    groups, targets = _synthetic_problem(n_images=8, outliers=(3,))
    with pytest.raises(DataError, match="Step-1 maps"):
        distill(_tiny_model(), groups, targets[:, :9], DistillConfig(iters=1), TrainContext(seed=0))
    with pytest.raises(DataError, match="groups"):
        distill(_tiny_model(), groups[:1], targets, DistillConfig(iters=1), TrainContext(seed=0))
    with pytest.raises(DataError, match="class labels"):
        progressive_select(_tiny_model(), groups, ["a"] * 7, targets, *_step3(iters=1), TrainContext(seed=0))


def test_progressive_select_rejects_planted_outliers():
    groups, targets = _synthetic_problem()
    classes = ["a"] * 10 + ["b"] * 10
    model = _tiny_model()
    distill(model, groups, targets, DistillConfig(iters=60, batch_size=4, warmup=5), TrainContext(seed=0))
    base_maps = compute_maps(model, groups)
    cfg, optim = _step3(iters=40, batch_size=4, warmup=5, p_ramp=10)
    result = progressive_select(model, groups, classes, base_maps, cfg, optim, TrainContext(seed=0))
    outliers = np.zeros(20, dtype=bool)
    outliers[[3, 11]] = True
    assert not result.keep[outliers].any()
    assert result.keep[~outliers].mean() >= 0.8
    first, last = result.rounds[0], result.rounds[-1]
    assert first["t"] == 0 and first["kept"] == {"a": 5, "b": 5}  # about half at t = 0
    assert last["t"] == 40 and last.get("final") and last["alpha"] == 1.0
    assert all(earlier["t"] < later["t"] for earlier, later in zip(result.rounds, result.rounds[1:]))
    assert len(result.history["loss"]) == 40
    # eta at t = T is the fine-tuned model's own image score (alpha = 1)
    np.testing.assert_allclose(result.eta, image_scores(compute_maps(model, groups), dtype=torch.float64).numpy(), rtol=1e-6)


def test_progressive_select_resumed_equals_uninterrupted():
    groups, targets = _synthetic_problem(n_images=12, outliers=(2,))
    classes = ["a"] * 12
    base_maps = targets  # any (N, P) maps will do as the distilled model's
    cfg, optim = _step3(iters=9, batch_size=2, warmup=2, p_ramp=3, checkpoint_every=4)
    full, saved = _tiny_model(), {}
    result = progressive_select(full, groups, classes, base_maps, cfg, optim,
                                TrainContext(seed=1, checkpoint=_collect_checkpoints(saved)))
    state, meta = saved[4]
    assert len(meta["rounds"]) >= 1
    resumed = _tiny_model(seed=42)
    again = progressive_select(resumed, groups, classes, base_maps, cfg, optim,
                               TrainContext(seed=1, resume=(state, meta)))
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())
    assert again.rounds == result.rounds
    np.testing.assert_array_equal(again.keep, result.keep)
    np.testing.assert_array_equal(again.eta, result.eta)


# ---------------------------------------------------------------- detector on a fixed subset


def test_train_detector_never_reads_images_outside_the_subset():
    groups, _ = _synthetic_problem(n_images=14, outliers=(3, 11))
    subset = np.ones(14, dtype=bool)
    subset[[3, 11, 12]] = False
    cfg, optim = _step3(iters=7, batch_size=4, warmup=2, p_final=0.9, p_ramp=3)  # 2 full batches a pass
    reference = _tiny_model()
    reference_history = train_detector(reference, groups, subset, cfg, optim, seed=2)

    # Oracle 1: the excluded rows shuffled among themselves and overwritten with noise change nothing.
    gen = torch.Generator().manual_seed(7)
    scrambled = [g.clone() for g in groups]
    for g in scrambled:
        g[~torch.from_numpy(subset)] = torch.randn(3, *g.shape[1:], generator=gen).half()[[2, 0, 1]]
    other = _tiny_model()
    assert train_detector(other, scrambled, subset, cfg, optim, seed=2) == reference_history
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in reference.state_dict().items())

    # Oracle 2: the same training on the kept rows alone gives the same weights bit for bit.
    compact = _tiny_model()
    kept_rows = torch.from_numpy(np.flatnonzero(subset))
    train_detector(compact, [g[kept_rows] for g in groups], np.ones(11, dtype=bool), cfg, optim, seed=2)
    assert all(torch.equal(v, compact.state_dict()[k]) for k, v in reference.state_dict().items())


def test_train_detector_learns_to_reconstruct_its_subset():
    groups, _ = _synthetic_problem(n_images=12, outliers=(3,))
    subset = np.arange(12) != 3
    model = _tiny_model()
    before = compute_maps(model, groups)[torch.from_numpy(subset)].mean().item()
    history = train_detector(model, groups, subset, *_step3(iters=40, batch_size=4, warmup=5, p_final=0.9,
                                                                   p_ramp=10), seed=0)
    after = compute_maps(model, groups)[torch.from_numpy(subset)].mean().item()
    assert len(history["loss"]) == 40 and history["lr"][0] == 0.0
    assert np.mean(history["loss"][-5:]) < 0.5 * np.mean(history["loss"][:5])
    assert after < 0.5 * before


def test_train_detector_uses_a_subset_smaller_than_a_batch_whole():
    groups, _ = _synthetic_problem(n_images=8, outliers=(3,))
    few = np.zeros(8, dtype=bool)
    few[[0, 5]] = True
    history = train_detector(_tiny_model(), groups, few, *_step3(iters=3, batch_size=4, warmup=1), seed=0)
    assert len(history["loss"]) == 3
    # every step is one batch of both images: the same run as with a batch size of exactly 2
    exact_batch = train_detector(_tiny_model(), groups, few, *_step3(iters=3, batch_size=2, warmup=1), seed=0)
    assert exact_batch == history


@pytest.mark.parametrize("subset", [np.zeros(8, dtype=bool), np.ones(7, dtype=bool), np.ones(8, dtype=int)])
def test_train_detector_rejects_an_unusable_subset(subset):
    groups, _ = _synthetic_problem(n_images=8, outliers=(3,))
    with pytest.raises(DataError, match="subset"):
        train_detector(_tiny_model(), groups, subset, *_step3(iters=1), seed=0)
