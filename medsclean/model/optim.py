"""The optimiser and learning-rate schedule of Steps 2-3.

StableAdamW is AdamW (decoupled weight decay, AMSGrad, bias correction) whose update is
shrunk, tensor by tensor, whenever the gradient is large compared with its running
second moment: the cure for the loss spikes that plain Adam shows when a rarely active
weight suddenly receives a large gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor


class StableAdamW(torch.optim.Optimizer):
    """AdamW with AMSGrad and per-tensor update clipping.

    For each parameter tensor theta with gradient g, at step t (1-based), learning rate
    lr, weight decay wd, betas (b1, b2), epsilon eps and clip threshold c:

        theta <- theta * (1 - lr * wd)                          # decoupled decay, unclipped lr
        m <- b1 * m + (1 - b1) * g
        v <- b2 * v + (1 - b2) * g**2
        v_max <- max(v_max, v)                                   # AMSGrad (v_max = v without it)
        denom = sqrt(v_max) / sqrt(1 - b2**t) + eps
        r = sqrt(mean((g / denom)**2))                           # RMS over the tensor's elements
        theta <- theta - lr / (1 - b1**t) / max(1, r / c) * m / denom

    r compares this step's gradient with the bias-corrected running second moment; it
    is about 1 in steady state, so only surprising gradients are damped. Parameters
    without a gradient are skipped entirely (no decay either).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        eps: float = 1e-10,
        amsgrad: bool = True,
        clip_threshold: float = 1.0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or clip_threshold <= 0:
            raise ValueError("lr, eps and weight_decay must be >= 0 and clip_threshold > 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), not {betas}")
        defaults = dict(
            lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, clip_threshold=clip_threshold
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - the class docstring states the update
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: Tensor, group: dict) -> None:
        grad = param.grad
        if grad.is_sparse:
            raise RuntimeError("StableAdamW does not support sparse gradients")
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(param)

        param.mul_(1.0 - lr * group["weight_decay"])
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        second_moment = exp_avg_sq
        if group["amsgrad"]:
            second_moment = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
        denom = second_moment.sqrt().div_(math.sqrt(1.0 - beta2**step)).add_(eps)
        # A tensor, not a Python float: no host-device sync per parameter on GPUs.
        rms_ratio = (grad / denom).square().mean().sqrt()
        clip = torch.clamp(rms_ratio / group["clip_threshold"], min=1.0)
        step_size = lr / (1.0 - beta1**step)
        param.sub_(exp_avg / denom * (step_size / clip))


def warm_cosine_lr(step: int, *, base_lr: float, final_lr: float, warmup: int, total: int) -> float:
    """Learning rate at iteration `step` (0-based) of a run of `total` iterations.

    Linear warm-up from 0 at step 0 to base_lr at step `warmup`, then a half cosine
    from base_lr down to final_lr, reached exactly at the last step (total - 1) and
    kept beyond it. If the run is shorter than the warm-up, it ends still warming up.

    Returns:
        The learning rate (same unit as base_lr).
    """
    if total < 1:
        raise ValueError(f"total must be >= 1, not {total}")
    if step < warmup:
        return base_lr * step / warmup
    span = total - 1 - warmup
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup) / span)
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """Flatten an optimiser's per-parameter state into named CPU tensors.

    Keys are "<i>.<name>" with i the parameter's position in the optimiser's parameter
    list; numbers (such as the step count) become 0-d tensors. Hyper-parameters are not
    included: they come from the training configuration.
    """
    flat: dict[str, Tensor] = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        for name, value in optimizer.state.get(param, {}).items():
            tensor = value if isinstance(value, Tensor) else torch.tensor(value)
            flat[f"{index}.{name}"] = tensor.detach().cpu().clone()
    return flat


def load_optimizer_state_tensors(optimizer: torch.optim.Optimizer, flat: dict[str, Tensor]) -> None:
    """Inverse of `optimizer_state_tensors` for an optimiser over the same parameters.

    Tensors go to the parameter's device and dtype; 0-d integer tensors become ints.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for key, tensor in flat.items():
        index_text, name = key.split(".", 1)
        index = int(index_text)
        if index >= len(params):
            raise ValueError(f"optimiser state names parameter {index}, but there are only {len(params)}")
        param = params[index]
        if tensor.ndim == 0 and not tensor.is_floating_point():
            value = int(tensor.item())
        else:
            value = tensor.to(device=param.device, dtype=param.dtype).clone()
        optimizer.state[param][name] = value

