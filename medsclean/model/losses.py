"""Training losses of Step 2 (map regression) and Step 3 (global cosine with hard mining)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medsclean.config import SelectConfig
from medsclean.errors import ConfigError

LOSS_SCALE = 10.0
LOSS_KINDS = ("mse", "l1")


def map_regression_loss(pred: Tensor, target: Tensor, kind: str = "mse") -> Tensor:
    """Step-2 distillation loss: 10 * MSE (or 10 * L1) between two anomaly maps.

    Args:
        pred: (B, P) model anomaly maps.
        target: (B, P) memory-ensemble maps of the same images.
        kind: "mse" or "l1".

    Returns:
        Scalar loss, averaged over every patch of every image.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if kind == "mse":
        return LOSS_SCALE * F.mse_loss(pred, target)
    if kind == "l1":
        return LOSS_SCALE * F.l1_loss(pred, target)
    raise ConfigError("loss", f"loss must be one of {', '.join(LOSS_KINDS)}, not {kind!r}")


def p_schedule(step: int, p_final: float, ramp: int) -> float:
    """Fraction of easy points whose gradient is damped: linear from 0 to p_final over `ramp` steps."""
    if ramp <= 0:
        return p_final
    return min(p_final * step / ramp, p_final)


def hard_mining_weights(point_distance: Tensor, p: float, factor: float) -> Tensor:
    """Gradient multiplier per point: `factor` for easy points, 1 for the hard ones.

    The threshold is the k-th largest distance of the whole tensor, k = max(1,
    int(numel * (1 - p))); points strictly below it are easy. Ties at the threshold
    therefore stay hard, and p = 0 damps nothing.

    Args:
        point_distance: (B, P) distances, any shape works (the batch is pooled).
        p: in [0, 1], roughly the fraction of points damped.
        factor: multiplier of the easy points' gradient.

    Returns:
        Tensor shaped like point_distance holding factor or 1.0.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], not {p}")
    flat = point_distance.reshape(-1)
    k = max(1, int(flat.numel() * (1.0 - p)))
    threshold = torch.topk(flat, k).values[-1]
    easy = point_distance < threshold
    return torch.where(easy, torch.full_like(point_distance, factor), torch.ones_like(point_distance))


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by a fixed tensor."""

    @staticmethod
    def forward(ctx, x: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(weights)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (weights,) = ctx.saved_tensors
        return grad * weights, None


def hard_mining_cosine_loss(
    enc_groups: Sequence[Tensor],
    dec_groups: Sequence[Tensor],
    n_prefix: int,
    p: float,
    factor: float = SelectConfig.mining_factor,
) -> Tensor:
    """Step-3 loss: one global cosine distance per image and group, hard points mined via gradients.

    For each group, the spatial tokens of an image are flattened into one (P*C_g)
    vector and the loss is 1 - cos(enc, dec) of those vectors, averaged over the batch,
    then over groups. The targets are detached. The loss value does not depend on p:
    hard mining only rescales gradients. Points (token positions) whose own distance
    1 - cos(enc_p, dec_p) is below the batch's top-(1-p) threshold (see
    `hard_mining_weights`, computed per group) pass back `factor` times their gradient.

    Args:
        enc_groups: G tensors (B, L, C_g), targets.
        dec_groups: G tensors (B, L, C_g), reconstructions (gradients flow into these).
        n_prefix: leading non-spatial tokens, excluded from the loss.
        p: fraction of easy points damped, in [0, 1].
        factor: gradient multiplier of the easy points.

    Returns:
        Scalar loss in [0, 2].
    """
    losses = []
    for enc, dec in zip(enc_groups, dec_groups, strict=True):
        enc_spatial = enc[:, n_prefix:].detach()
        dec_spatial = dec[:, n_prefix:]
        with torch.no_grad():
            point_distance = 1.0 - F.cosine_similarity(enc_spatial, dec_spatial, dim=-1)
            weights = hard_mining_weights(point_distance, p, factor).unsqueeze(-1)
        if dec_spatial.requires_grad:
            dec_spatial = _ScaleGradient.apply(dec_spatial, weights)
        cosine = F.cosine_similarity(enc_spatial.flatten(1), dec_spatial.flatten(1), dim=1)
        losses.append((1.0 - cosine).mean())
    return torch.stack(losses).mean()
