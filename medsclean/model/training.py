"""Steps 2 and 3 as training loops over stored encoder features.

`distill` (Step 2) teaches a freshly initialised `ReconstructionModel` to reproduce the
Step-1 memory-ensemble maps. `progressive_select` (Step 3) fine-tunes the distilled model
as a detector on a clean subset that it re-selects before every pass over the data.
`train_detector` trains the same detector on a fixed subset (the benchmark's baselines).
The encoder never runs: all work on the stored (N, L, C_g) float16 groups, moving one
batch at a time to the device in float32.

Determinism and resuming: the data order comes from a private torch.Generator and the
dropout masks from the global torch RNG, which every loop forks (torch.random.fork_rng)
and seed from `seed` on entry, so the caller's RNG is untouched and two runs with the
same seed on the same device and thread count give the same weights. A checkpoint holds
the model, the optimiser state, both RNG states and the current pass order; resuming
from it reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from medsclean.config import DistillConfig, SelectConfig
from medsclean.errors import DataError, MedscleanError, UsageError
from medsclean.model.losses import hard_mining_cosine_loss, map_regression_loss, p_schedule
from medsclean.model.decoder import ModelConfig, ReconstructionModel, cosine_distance_map, upsample_map
from medsclean.model.optim import StableAdamW, load_optimizer_state_tensors, optimizer_state_tensors, warm_cosine_lr
from medsclean.selection.progressive import alpha, blend_scores, image_scores, select_per_class

StepCallback = Callable[[int, dict], None]
"""on_step(step, record): step = iterations done (1..iters); record = {"loss", "lr"}."""
CheckpointCallback = Callable[[dict[str, Tensor], dict], None]
"""checkpoint(state, meta): flat CPU tensors (safe to keep or save) and JSON-able metadata."""
Resume = tuple[dict[str, Tensor], dict]
"""A (state, meta) pair exactly as handed to a checkpoint callback."""


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


@dataclass
class _Progress:
    """What a loop must remember between steps besides the model and optimiser."""

    step: int = 0
    order: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    position: int = 0
    history: dict[str, list[float]] = field(default_factory=lambda: {"loss": [], "lr": []})


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


def collective_device(device: str | torch.device) -> torch.device:
    """The device of the tensors this rank hands to `torch.distributed` collectives.

    NCCL takes CUDA tensors only: with it, the rank's own CUDA device (`device`, its index made
    explicit). Gloo (and any other backend) gets CPU tensors. Needs an initialised process group.

    Raises:
        MedscleanError: an NCCL-only group on a rank that does not train on CUDA.
    """
    import torch.distributed as dist

    device = torch.device(device)
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and device.type == "cuda":
        return torch.device("cuda", _cuda_index(device))
    if backend == "nccl":
        raise MedscleanError(f"the NCCL process group needs CUDA ranks, but this rank trains on {device}")
    return torch.device("cpu")


@dataclass(frozen=True)
class DataParallel:
    """This process's place among `world` data-parallel trainers (torch.distributed is initialised).

    Every rank draws the same batch of image indices and trains on its share, `batch[rank::world]`,
    through `torch.nn.parallel.DistributedDataParallel`, which averages the gradients over the
    ranks during the backward pass, so all ranks keep identical weights. Each rank's loss is
    weighted by its share of the batch times the world size (`share`), so the averaged gradient
    of a mean loss is the gradient of the mean over the whole batch even when the batch does not
    divide evenly: the update is the single-process update on the whole batch (without dropout;
    each rank has its own dropout stream, seeded from the run seed and its rank, so a run is
    reproducible for a fixed world size). Step 3's hard mining picks its hard points among the
    rank's share, not the whole batch.

    The only collectives left here are the loss mean and the keep-mask broadcast; they run on
    tensors of `collective_device(device)`.

    Attributes:
        rank: this process's rank, 0 .. world - 1.
        world: the number of ranks.
        device: where this rank trains ("cpu", or its own "cuda:N").
    """

    rank: int
    world: int
    device: str = "cpu"

    def share(self, batch: Tensor) -> tuple[Tensor, float]:
        """This rank's share of a batch and the weight of its loss.

        Args:
            batch: (B,) image indices of the whole batch, the same on every rank.

        Returns:
            (B_r,) the rank's indices, `batch[rank::world]`, and B_r * world / B, so that the
            ranks' average of weighted share means is the whole batch's mean. A batch smaller
            than the world is trained whole by every rank, weight 1.
        """
        if len(batch) < self.world:
            return batch, 1.0
        mine = batch[self.rank :: self.world]
        return mine, len(mine) * self.world / len(batch)

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """`model` (already on `device`) in DistributedDataParallel: one device per rank, its index
        given on CUDA. DDP broadcasts rank 0's weights once (every rank built the same ones from the
        seed) and averages the gradients in buckets during the backward pass."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [_cuda_index(device)] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)

    def mean(self, value: Tensor) -> float:
        """The mean over the ranks of a scalar tensor (one all_reduce, on the collective device)."""
        import torch.distributed as dist

        total = value.detach().reshape(1).to(device=collective_device(self.device), dtype=torch.float64)
        dist.all_reduce(total)
        return float(total.item()) / self.world

    def from_rank0(self, array: np.ndarray) -> np.ndarray:
        """Rank 0's copy of a bool or numeric array on every rank (the selections must agree even if
        maps differ by a bit); one broadcast, on the collective device. Returns the array's dtype."""
        import torch.distributed as dist

        values = np.ascontiguousarray(array)
        carried = values.view(np.uint8) if values.dtype == np.bool_ else values
        tensor = torch.from_numpy(carried.copy()).to(collective_device(self.device))
        dist.broadcast(tensor, src=0)
        return tensor.cpu().numpy().view(values.dtype).reshape(values.shape)


def _derive_seeds(seed: int) -> tuple[int, int]:
    shuffle_seed, dropout_seed = np.random.SeedSequence(seed).generate_state(2)
    return int(shuffle_seed), int(dropout_seed)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@contextmanager
def _private_rng(device: torch.device, seed: int):
    """Fork the global CPU (and this CUDA device's) RNG and seed it; the caller's streams are restored after."""
    devices = [_cuda_index(device)] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        from medsclean.seeding import seed_torch

        seed_torch(seed, devices[0] if devices else None)
        yield


def _rng_tensors(device: torch.device, shuffler: torch.Generator) -> dict[str, Tensor]:
    states = {"rng.torch": torch.get_rng_state(), "rng.shuffle": shuffler.get_state()}
    if device.type == "cuda":
        states["rng.cuda"] = torch.cuda.get_rng_state(device)
    return states


def _batches_per_pass(n_selected: int, batch_size: int) -> int:
    """drop_last batching; a set smaller than one batch forms a single batch."""
    if n_selected == 0:
        return 0
    return max(1, n_selected // batch_size)


def _batch(order: Tensor, position: int, batch_size: int) -> Tensor:
    size = min(batch_size, len(order))
    return order[position * size : (position + 1) * size]


def _checkpoint_state(model, optimizer, shuffler, device, progress: _Progress) -> dict[str, Tensor]:
    state = {f"model.{name}": value.detach().cpu().clone() for name, value in model.state_dict().items()}
    state.update({f"optim.{name}": value for name, value in optimizer_state_tensors(optimizer).items()})
    state.update(_rng_tensors(device, shuffler))
    state["data.order"] = progress.order.clone()
    return state


def _checkpoint_meta(stage: str, iters: int, n_images: int, progress: _Progress, extra: dict) -> dict:
    return {
        "stage": stage,
        "step": progress.step,
        "iters": iters,
        "n_images": n_images,
        "pass_position": progress.position,
        "history": {name: list(values) for name, values in progress.history.items()},
        **extra,
    }


def _restore(
    resume: Resume, stage: str, iters: int, n_images: int, model, optimizer, shuffler, device
) -> _Progress:
    state, meta = resume
    if meta.get("stage") != stage:
        raise UsageError(f"the checkpoint to resume is from stage {meta.get('stage')!r}, not {stage!r}")
    if meta.get("iters") != iters or meta.get("n_images") != n_images:
        raise UsageError(
            f"the checkpoint was written for {meta.get('iters')} iterations on {meta.get('n_images')} images, "
            f"this run has {iters} on {n_images}: resume with the original settings or start afresh"
        )
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    optimizer_state = {k.removeprefix("optim."): v for k, v in state.items() if k.startswith("optim.")}
    load_optimizer_state_tensors(optimizer, optimizer_state)
    torch.set_rng_state(state["rng.torch"])
    shuffler.set_state(state["rng.shuffle"])
    if device.type == "cuda" and "rng.cuda" in state:
        torch.cuda.set_rng_state(state["rng.cuda"], device)
    history = {name: list(values) for name, values in meta["history"].items()}
    return _Progress(meta["step"], state["data.order"].long().clone(), meta["pass_position"], history)


def _optimise(optimizer: StableAdamW, params: list[Tensor], loss: Tensor, lr: float, grad_clip: float) -> None:
    """One update: backward (in a data-parallel run DistributedDataParallel averages the gradients
    over the ranks before it returns), clip the global gradient norm, step at learning rate lr."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()


def _run_iterations(
    model: ReconstructionModel,
    groups: Sequence[Tensor],
    optim: DistillConfig,
    iters: int,
    *,
    stage: str,
    seed: int,
    device: torch.device,
    batch_loss: Callable[[torch.nn.Module, list[Tensor], Tensor, int], Tensor],
    next_pass: Callable[[int], Tensor],
    on_step: StepCallback | None,
    checkpoint: CheckpointCallback | None,
    resume: Resume | None,
    extra_meta: Callable[[], dict] = dict,
    parallel: DataParallel | None = None,
) -> dict[str, list[float]]:
    """The loop shared by both steps: passes of shuffled batches until `iters` steps, with the
    optimiser, batch size, schedule and checkpoint interval of `optim`.

    batch_loss(net, batch_groups, batch_indices, step) gives the loss of one batch, a mean over its
    images: net is the module to run forward (the model, or the model in DistributedDataParallel),
    batch_groups G tensors (B, L, C_g) float32 on the device, batch_indices (B,) into the images;
    next_pass(step) gives the image indices of the next pass (non-empty).
    parallel: this rank of a data-parallel run (each trains on its share of every batch, its loss
    weighted by `DataParallel.share`; the loss recorded is the whole batch's, the sum over the ranks).
    """
    n_images = groups[0].shape[0]
    params = list(model.parameters())
    warmup = optim.warmup_for(iters)
    optimizer = StableAdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, eps=optim.eps)
    shuffle_seed, dropout_seed = _derive_seeds(seed)
    from medsclean.seeding import torch_generator

    shuffler = torch_generator(shuffle_seed)
    net = model if parallel is None else parallel.wrap(model, device)
    if parallel is not None and parallel.world > 1:
        from medsclean.seeding import rng

        dropout_seed = int(rng(dropout_seed, "rank", parallel.rank).integers(2**62))
    with _private_rng(device, dropout_seed):
        progress = _Progress()
        if resume is not None:
            progress = _restore(resume, stage, iters, n_images, model, optimizer, shuffler, device)
        while progress.step < iters:
            if progress.position >= _batches_per_pass(len(progress.order), optim.batch_size):
                selected = next_pass(progress.step)
                progress.order = selected[torch.randperm(len(selected), generator=shuffler)]
                progress.position = 0
            batch = _batch(progress.order, progress.position, optim.batch_size)
            progress.position += 1
            model.train()
            weight = 1.0
            if parallel is not None:
                batch, weight = parallel.share(batch)
            batch_groups = [g[batch].to(device=device, dtype=torch.float32) for g in groups]
            loss = batch_loss(net, batch_groups, batch, progress.step) * weight
            loss_value = float(loss.item()) if parallel is None else parallel.mean(loss)
            if not np.isfinite(loss_value):
                raise MedscleanError(
                    f"{stage}: the loss became {loss_value} at iteration {progress.step}; lower the learning rate"
                )
            lr = warm_cosine_lr(
                progress.step, base_lr=optim.lr, final_lr=optim.final_lr, warmup=warmup, total=iters
            )
            _optimise(optimizer, params, loss, lr, optim.grad_clip)
            progress.step += 1
            progress.history["loss"].append(loss_value)
            progress.history["lr"].append(lr)
            if on_step is not None:
                on_step(progress.step, {"loss": loss_value, "lr": lr})
            due = optim.checkpoint_every and progress.step % optim.checkpoint_every == 0
            if checkpoint is not None and (due or progress.step == iters):
                meta = _checkpoint_meta(stage, iters, n_images, progress, extra_meta())
                checkpoint(_checkpoint_state(model, optimizer, shuffler, device, progress), meta)
    return progress.history


def distill(
    model: ReconstructionModel,
    groups: Sequence[Tensor],
    targets: Tensor | np.ndarray,
    cfg: DistillConfig,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    on_step: StepCallback | None = None,
    checkpoint: CheckpointCallback | None = None,
    resume: Resume | None = None,
    parallel: DataParallel | None = None,
) -> dict[str, list[float]]:
    """Step 2: train the model to reproduce the memory-ensemble maps, 10 * MSE (or L1).

    All images, shuffled again every pass, batches of cfg.batch_size with the last
    incomplete batch dropped (fewer images than one batch: each step uses them all).
    StableAdamW, warm-up + cosine learning rate, gradient-norm clipping.

    Args:
        model: freshly initialised model (its seed fixes the start); trained in place
            and moved to `device`.
        groups: G stored tensors (N, L, C_g), usually float16 on the CPU.
        targets: (N, H*W) Step-1 maps of the same images, same patch order.
        cfg: Step-2 settings (iterations, optimiser, loss, batch size, checkpoint interval).
        seed: fixes data order and dropout.
        device: where to train.
        on_step: called after every step.
        checkpoint: called every cfg.checkpoint_every steps and after the last one.
        resume: a (state, meta) checkpoint of this same run to continue from.
        parallel: this rank of a data-parallel run (`DataParallel`); `device` must be its device.

    Returns:
        History {"loss": [...], "lr": [...]}, one value per step since the start of the run.
    """
    device = torch.device(device)
    n_images, n_patches = check_features(model.config, groups)
    target_maps = _check_maps(targets, (n_images, n_patches), "Step-1 maps")
    model.to(device)
    everyone = torch.arange(n_images)

    def batch_loss(net: torch.nn.Module, batch_groups: list[Tensor], batch: Tensor, step: int) -> Tensor:
        prediction = _anomaly_map(net, model.config, batch_groups)
        return map_regression_loss(prediction, target_maps[batch].to(device), cfg.loss)

    return _run_iterations(
        model, groups, cfg, cfg.iters, stage="distill", seed=seed, device=device, batch_loss=batch_loss,
        next_pass=lambda step: everyone, on_step=on_step, checkpoint=checkpoint, resume=resume, parallel=parallel,
    )


def _anomaly_map(net: torch.nn.Module, config: ModelConfig, groups: list[Tensor]) -> Tensor:
    """`ReconstructionModel.anomaly_map` through `net`'s forward (DistributedDataParallel syncs the
    gradients of what runs through its forward only): (B, H*W) maps of G groups (B, L, C_g)."""
    enc_groups, dec_groups = net(groups)
    return upsample_map(cosine_distance_map(enc_groups, dec_groups, config.n_prefix), config.token_pool)


def _hard_mining_loss(model: ReconstructionModel, cfg: SelectConfig):
    """The Step-3 / Dinomaly batch loss: global cosine with hard mining, p ramping per step."""

    def batch_loss(net: torch.nn.Module, batch_groups: list[Tensor], batch: Tensor, step: int) -> Tensor:
        enc_groups, dec_groups = net(batch_groups)
        p = p_schedule(step, cfg.p_final, cfg.ramp_steps)
        return hard_mining_cosine_loss(enc_groups, dec_groups, model.config.n_prefix, p, cfg.mining_factor)

    return batch_loss


def train_detector(
    model: ReconstructionModel,
    groups: Sequence[Tensor],
    subset: np.ndarray,
    cfg: SelectConfig,
    optim: DistillConfig,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    on_step: StepCallback | None = None,
) -> dict[str, list[float]]:
    """Train a reconstruction detector, Dinomaly-style, on a fixed subset of the images.

    The baselines of a cleaning run: every image (no cleaning), the images a selection
    kept, or the truly normal ones (an upper bound). Shuffled drop_last passes over the
    subset (all of it in one batch if smaller than a batch), each batch one step of the
    global cosine loss with hard mining (p ramps to cfg.p_final over cfg.ramp_steps steps;
    Dinomaly alone uses p_final 0.9), with the optimiser and learning-rate schedule of
    `distill`. Images outside the subset are never read.

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
    device = torch.device(device)
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
    model.to(device)

    batch_loss = _hard_mining_loss(model, cfg)

    return _run_iterations(
        model, groups, optim, cfg.iters, stage="detector", seed=seed, device=device, batch_loss=batch_loss,
        next_pass=lambda step: members, on_step=on_step, checkpoint=None, resume=None,
    )


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


def progressive_select(
    model: ReconstructionModel,
    groups: Sequence[Tensor],
    classes: Sequence[str],
    base_maps: Tensor | np.ndarray,
    cfg: SelectConfig,
    optim: DistillConfig,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    on_round: Callable[[dict], None] | None = None,
    on_step: StepCallback | None = None,
    checkpoint: CheckpointCallback | None = None,
    resume: Resume | None = None,
    parallel: DataParallel | None = None,
) -> SelectionResult:
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
        model: the distilled model, fine-tuned in place and moved to `device`.
        groups: G stored tensors (N, L, C_g).
        classes: N class names; selection is per class, training on all kept images together.
        base_maps: (N, H*W) maps of the distilled model (`compute_maps` before fine-tuning).
        cfg: Step-3 settings (iters = T, k, hard mining).
        optim: optimiser, batch size and schedule: Step 2's, with a fresh warm-up and cosine over T.
        seed: fixes data order and dropout.
        device: where to train.
        on_round: called with each round record (see `SelectionResult.rounds`).
        on_step: called after every step, as for `distill`.
        checkpoint: as for `distill`; meta also holds "rounds".
        resume: a (state, meta) checkpoint of this same run.
        parallel: this rank of a data-parallel run; every rank re-selects, and rank 0's selection is used.

    Returns:
        The final selection, its scores, every round and the loss history.

    Raises:
        MedscleanError: when a re-selection keeps no image at all.
    """
    device = torch.device(device)
    n_images, n_patches = check_features(model.config, groups)
    if len(classes) != n_images:
        raise DataError(f"{len(classes)} class labels for {n_images} images: they must match one to one")
    labels = np.asarray(classes, dtype=object)
    base_scores = image_scores(_check_maps(base_maps, (n_images, n_patches), "distilled-model maps").numpy())
    total = cfg.iters
    rounds: list[dict] = [dict(r) for r in resume[1].get("rounds", [])] if resume is not None else []
    model.to(device)

    def reselect(t: int) -> tuple[np.ndarray, np.ndarray, dict]:
        current = base_scores
        if alpha(t, total) > 0:
            current = image_scores(compute_maps(model, groups, batch_size=optim.batch_size, device=device).numpy())
        eta = blend_scores(base_scores, current, t, total)
        keep, tau = select_per_class(eta, labels.tolist(), t, total, cfg.k)
        if parallel is not None:
            keep = parallel.from_rank0(keep)
        return keep, eta, _round_record(t, total, keep, tau, labels)

    def next_pass(t: int) -> Tensor:
        keep, _, record = reselect(t)
        rounds.append(record)
        if on_round is not None:
            on_round(record)
        if not keep.any():
            raise MedscleanError(f"selection at iteration {t} kept no image (every class tied or has one image)")
        return torch.from_numpy(np.flatnonzero(keep))

    batch_loss = _hard_mining_loss(model, cfg)

    history = _run_iterations(
        model, groups, optim, cfg.iters, stage="select", seed=seed, device=device, batch_loss=batch_loss, next_pass=next_pass,
        on_step=on_step, checkpoint=checkpoint, resume=resume, extra_meta=lambda: {"rounds": [dict(r) for r in rounds]},
        parallel=parallel,
    )
    keep, eta, record = reselect(total)
    record["final"] = True
    rounds.append(record)
    if on_round is not None:
        on_round(record)
    return SelectionResult(keep=keep, eta=eta, rounds=rounds, history=history)
