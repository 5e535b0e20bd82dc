"""Steps 2 and 3 as training loops over stored encoder features.

`distill` (Step 2) teaches a freshly initialised `ReconstructionModel` to reproduce the
Step-1 memory-ensemble maps. `progressive_select` (Step 3) fine-tunes the distilled model
as a detector on a clean subset that it re-selects before every pass over the data.
`compute_maps` gives a model's anomaly maps. Both steps run `loop.run_loop` (the optimiser,
schedule, checkpoints and resuming, the data-parallel ranks) with their own batch loss; the
`TrainContext` passed to them says where and how a run runs (seed, device, callbacks, resume).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from medsclean.config import DistillConfig, SelectConfig
from medsclean.errors import DataError, MedscleanError
from medsclean.model.decoder import ModelConfig, ReconstructionModel, cosine_distance_map, upsample_map
from medsclean.model.loop import BatchLoss, Loop, TrainContext, run_loop
from medsclean.model.losses import hard_mining_cosine_loss, map_regression_loss, p_schedule
from medsclean.maps import image_scores
from medsclean.selection.progressive import alpha, blend_scores, select_per_class


@dataclass
class SelectionResult:
    """Outcome of Step 3.

    Attributes:
        keep: (N,) bool, True for images selected as clean by the final re-selection at t = T.
        eta: (N,) float64 selection scores at t = T (the fine-tuned model's image scores).
        rounds: one record per re-selection, in order: {"t", "alpha", "tau": {class: float},
            "kept": {class: int}, "size": {class: int}}; the last one (t = T) has "final": True.
        history: {"loss": [...], "lr": [...]} per iteration.
    """

    keep: np.ndarray
    eta: np.ndarray
    rounds: list[dict]
    history: dict[str, list[float]]


def check_features(config: ModelConfig, groups: Sequence[Tensor]) -> tuple[int, int]:
    """Check stored groups against a model config.

    Args:
        config: the model that will read them.
        groups: G tensors (N, L, C_g).

    Returns:
        (N, P): number of images and of spatial tokens, P = L - n_prefix.

    Raises:
        DataError: on a count, shape or width that does not fit.
    """
    if len(groups) != len(config.group_dims):
        raise DataError(
            f"stored features have {len(groups)} reconstruction groups but the model expects "
            f"{len(config.group_dims)}: recompute the features with the model's backbone"
        )
    n_images, length = groups[0].shape[:2] if groups[0].ndim == 3 else (0, 0)
    for index, (tensor, width) in enumerate(zip(groups, config.group_dims)):
        if tensor.ndim != 3 or tuple(tensor.shape) != (n_images, length, width):
            raise DataError(
                f"stored feature group {index} has shape {tuple(tensor.shape)}, expected "
                f"({n_images}, {length}, {width}): recompute the features"
            )
    if n_images < 1:
        raise DataError("no stored features: the training set is empty")
    if length <= config.n_prefix:
        raise DataError(f"stored features have {length} tokens, not more than n_prefix={config.n_prefix}")
    return n_images, length - config.n_prefix


def _check_maps(maps: Tensor | np.ndarray, shape: tuple[int, int], what: str) -> Tensor:
    values = torch.as_tensor(maps, dtype=torch.float32)
    if tuple(values.shape) != shape:
        raise DataError(
            f"{what} have shape {tuple(values.shape)} but the features hold {shape[0]} images of "
            f"{shape[1]} patches: recompute them from the same features"
        )
    return values


def distill(model: ReconstructionModel, groups: Sequence[Tensor], targets: Tensor | np.ndarray, cfg: DistillConfig,
            context: TrainContext) -> dict[str, list[float]]:
    """Step 2: train the model to reproduce the memory-ensemble maps, 10 * MSE (or L1).

    All images, shuffled again every pass, batches of cfg.batch_size with the last
    incomplete batch dropped (fewer images than one batch: each step uses them all).
    StableAdamW, warm-up + cosine learning rate, gradient-norm clipping (`loop.run_loop`).

    Args:
        model: freshly initialised model (its seed fixes the start); trained in place
            and moved to `context.device`.
        groups: G stored tensors (N, L, C_g), usually float16 on the CPU.
        targets: (N, H*W) Step-1 maps of the same images, same patch order.
        cfg: Step-2 settings (iterations, optimiser, loss, batch size, checkpoint interval).
        context: seed, device, callbacks, checkpoint to resume, data-parallel rank.

    Returns:
        History {"loss": [...], "lr": [...]}, one value per step since the start of the run.
    """
    device = torch.device(context.device)
    n_images, n_patches = check_features(model.config, groups)
    target_maps = _check_maps(targets, (n_images, n_patches), "Step-1 maps")
    model.to(device)
    everyone = torch.arange(n_images)

    def batch_loss(net: torch.nn.Module, batch_groups: list[Tensor], batch: Tensor, step: int) -> Tensor:
        prediction = _anomaly_map(net, model.config, batch_groups)
        return map_regression_loss(prediction, target_maps[batch].to(device), cfg.loss)

    return run_loop(model, groups, cfg, cfg.iters, context, Loop("distill", batch_loss, lambda step: everyone))


def _anomaly_map(net: torch.nn.Module, config: ModelConfig, groups: list[Tensor]) -> Tensor:
    """`ReconstructionModel.anomaly_map` through `net`'s forward (DistributedDataParallel syncs the
    gradients of what runs through its forward only): (B, H*W) maps of G groups (B, L, C_g)."""
    enc_groups, dec_groups = net(groups)
    return upsample_map(cosine_distance_map(enc_groups, dec_groups, config.n_prefix), config.token_pool)


def hard_mining_loss(model: ReconstructionModel, cfg: SelectConfig) -> BatchLoss:
    """The Step-3 / Dinomaly batch loss: global cosine with hard mining, p ramping to cfg.p_final
    over cfg.ramp_steps steps (`loop.BatchLoss`)."""

    def batch_loss(net: torch.nn.Module, batch_groups: list[Tensor], batch: Tensor, step: int) -> Tensor:
        enc_groups, dec_groups = net(batch_groups)
        p = p_schedule(step, cfg.p_final, cfg.ramp_steps)
        return hard_mining_cosine_loss(enc_groups, dec_groups, model.config.n_prefix, p, cfg.mining_factor)

    return batch_loss


def compute_maps(
    model: ReconstructionModel,
    groups: Sequence[Tensor],
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Anomaly maps of every image in eval mode (no dropout), without gradients.

    Args:
        model: the model; moved to `device`, its train/eval mode restored afterwards.
        groups: G stored tensors (N, L, C_g).
        batch_size: images per forward pass.
        device: where to run.

    Returns:
        (N, H*W) float32 maps on the CPU.
    """
    device = torch.device(device)
    n_images, _ = check_features(model.config, groups)
    was_training = model.training
    model.to(device).eval()
    maps = []
    try:
        with torch.inference_mode():
            for start in range(0, n_images, batch_size):
                batch = [g[start : start + batch_size].to(device=device, dtype=torch.float32) for g in groups]
                maps.append(model.anomaly_map(batch).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(maps)


def _round_record(t: int, total: int, keep: np.ndarray, tau: dict[str, float], labels: np.ndarray) -> dict:
    return {
        "t": t,
        "alpha": alpha(t, total),
        "tau": tau,
        "kept": {name: int(keep[labels == name].sum()) for name in tau},
        "size": {name: int((labels == name).sum()) for name in tau},
    }


def progressive_select(model: ReconstructionModel, groups: Sequence[Tensor], classes: Sequence[str],
                       base_maps: Tensor | np.ndarray, cfg: SelectConfig, optim: DistillConfig,
                       context: TrainContext) -> SelectionResult:
    """Step 3: fine-tune the distilled model on a clean subset re-selected before every pass.

    Before each pass, at iteration t of T = cfg.iters: eta_t = (1 - alpha_t) * s0 +
    alpha_t * s_theta, with s0 the image scores of `base_maps` (the frozen distilled
    model's) and s_theta those of the current model (eval mode); per class keep eta_t <
    median + cfg.k * (t/T) * MAD. Then one shuffled drop_last pass over the kept images
    (all of them in one batch if fewer than a batch), each batch one step of the global
    cosine loss with hard mining (p ramps to p_final over p_ramp steps), with a fresh
    optimiser and learning-rate schedule identical to Step 2's. After T steps one last
    re-selection at t = T (alpha = 1, full margin) gives the final clean set: the model
    is evaluated after its last update rather than at the start of its last pass.

    Args:
        model: the distilled model, fine-tuned in place and moved to `context.device`.
        groups: G stored tensors (N, L, C_g).
        classes: N class names; selection is per class, training on all kept images together.
        base_maps: (N, H*W) maps of the distilled model (`compute_maps` before fine-tuning).
        cfg: Step-3 settings (iters = T, k, hard mining).
        optim: optimiser, batch size and schedule: Step 2's, with a fresh warm-up and cosine over T.
        context: as for `distill`; `on_round` hears each round record (see `SelectionResult.rounds`),
            a checkpoint's meta also holds "rounds"; in a data-parallel run every rank re-selects
            and rank 0's selection is used.

    Returns:
        The final selection, its scores, every round and the loss history.

    Raises:
        MedscleanError: when a re-selection keeps no image at all.
    """
    n_images, n_patches = check_features(model.config, groups)
    if len(classes) != n_images:
        raise DataError(f"{len(classes)} class labels for {n_images} images: they must match one to one")
    labels = np.asarray(classes, dtype=object)
    base_scores = image_scores(_check_maps(base_maps, (n_images, n_patches), "distilled-model maps"), dtype=torch.float64).numpy()
    rounds: list[dict] = [dict(r) for r in context.resume[1].get("rounds", [])] if context.resume is not None else []
    model.to(torch.device(context.device))
    reselect = _reselection(model, groups, labels, base_scores, cfg, optim.batch_size, context)

    def next_pass(t: int) -> Tensor:
        keep, _, record = reselect(t)
        _report_round(rounds, record, context)
        if not keep.any():
            raise MedscleanError(f"selection at iteration {t} kept no image (every class tied or has one image)")
        return torch.from_numpy(np.flatnonzero(keep))

    loop = Loop("select", hard_mining_loss(model, cfg), next_pass, lambda: {"rounds": [dict(r) for r in rounds]})
    history = run_loop(model, groups, optim, cfg.iters, context, loop)
    keep, eta, record = reselect(cfg.iters)
    record["final"] = True
    _report_round(rounds, record, context)
    return SelectionResult(keep=keep, eta=eta, rounds=rounds, history=history)


def _reselection(model: ReconstructionModel, groups: Sequence[Tensor], labels: np.ndarray, base_scores: np.ndarray,
                 cfg: SelectConfig, batch_size: int, context: TrainContext):
    """reselect(t) -> (keep (N,) bool, eta (N,) float64, round record): Step 3's selection at
    iteration t of T = cfg.iters; the current model is scored (eval mode) only once alpha_t > 0."""
    total = cfg.iters
    device = torch.device(context.device)

    def reselect(t: int) -> tuple[np.ndarray, np.ndarray, dict]:
        current = base_scores
        if alpha(t, total) > 0:
            current = image_scores(compute_maps(model, groups, batch_size=batch_size, device=device), dtype=torch.float64).numpy()
        eta = blend_scores(base_scores, current, t, total)
        keep, tau = select_per_class(eta, labels.tolist(), t, total, cfg.k)
        if context.parallel is not None:
            keep = context.parallel.from_rank0(keep)
        return keep, eta, _round_record(t, total, keep, tau, labels)

    return reselect


def _report_round(rounds: list[dict], record: dict, context: TrainContext) -> None:
    rounds.append(record)
    if context.on_round is not None:
        context.on_round(record)
