"""The from-scratch detectors a cleaning run is compared with (a helper module, not a script).

`train_detector` trains a reconstruction detector, Dinomaly-style, on a fixed subset of the
images: every image (no cleaning), the images a selection kept, or the truly normal ones (an upper
bound). bench_accuracy.py trains its three baselines with it; medsclean itself never trains on a
fixed subset, so it lives here, on the package's training loop (`medsclean.model.loop`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from medsclean.config import DistillConfig, SelectConfig
from medsclean.errors import DataError
from medsclean.model.decoder import ReconstructionModel
from medsclean.model.loop import Loop, StepCallback, TrainContext, run_loop
from medsclean.model.training import check_features, hard_mining_loss


def train_detector(model: ReconstructionModel, groups: Sequence[Tensor], subset: np.ndarray, cfg: SelectConfig,
                   optim: DistillConfig, *, seed: int, device: str | torch.device = "cpu",
                   on_step: StepCallback | None = None) -> dict[str, list[float]]:
    """Train a reconstruction detector, Dinomaly-style, on a fixed subset of the images.

    Shuffled drop_last passes over the subset (all of it in one batch if smaller than a batch),
    each batch one step of the global cosine loss with hard mining (p ramps to cfg.p_final over
    cfg.ramp_steps steps; Dinomaly alone uses p_final 0.9), with the optimiser and learning-rate
    schedule of Step 2 (`medsclean.model.training.distill`). Images outside the subset are never read.

    Args:
        model: usually freshly initialised; trained in place and moved to `device`.
        groups: G stored tensors (N, L, C_g).
        subset: (N,) bool, True for the images to train on; at least one.
        cfg: iterations and hard mining (iters, p_final, ramp_steps, mining_factor).
        optim: optimiser, batch size and schedule, as Step 2's.
        seed: fixes data order and dropout.
        device: where to train.
        on_step: called after every step, as for `distill`.

    Returns:
        History {"loss": [...], "lr": [...]}, one value per step.

    Raises:
        DataError: when the subset is not an (N,) bool array or selects no image.
    """
    n_images, _ = check_features(model.config, groups)
    chosen = np.asarray(subset)
    if chosen.dtype != np.bool_ or chosen.shape != (n_images,):
        raise DataError(
            f"the training subset must be an ({n_images},) bool array, one flag per stored image, "
            f"not {chosen.dtype} of shape {chosen.shape}"
        )
    if not chosen.any():
        raise DataError("the training subset selects no image: keep at least one image to train on")
    members = torch.from_numpy(np.flatnonzero(chosen))
    model.to(torch.device(device))
    loop = Loop("detector", hard_mining_loss(model, cfg), lambda step: members)
    return run_loop(model, groups, optim, cfg.iters, TrainContext(seed=seed, device=device, on_step=on_step), loop)
