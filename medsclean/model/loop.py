"""The training loop Steps 2 and 3 share: shuffled passes of batches over stored features.

`run_loop` trains a `ReconstructionModel` for a number of steps with StableAdamW, a warm-up +
cosine learning rate and gradient-norm clipping; a `Loop` says what one batch's loss is and which
images the next pass covers, a `TrainContext` where and how the run runs. The encoder never runs:
the loop reads the stored (N, L, C_g) float16 groups, moving one batch at a time to the device in
float32.

Determinism and resuming: the data order comes from a private torch.Generator and the dropout
masks from the global torch RNG, which the loop forks (torch.random.fork_rng) and seeds from the
run seed on entry, so the caller's RNG is untouched and two runs with the same seed on the same
device and thread count give the same weights. A checkpoint holds the model, the optimiser state,
both RNG states and the current pass order; resuming from it reproduces the uninterrupted run
exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from medsclean.config import DistillConfig
from medsclean.errors import MedscleanError, UsageError
from medsclean.model.optim import StableAdamW, load_optimizer_state_tensors, optimizer_state_tensors, warm_cosine_lr
from medsclean.model.parallel import DataParallel, cuda_index
from medsclean.seeding import seed_torch, torch_generator

StepCallback = Callable[[int, dict], None]
"""on_step(step, record): step = iterations done (1..iters); record = {"loss", "lr"}."""
RoundCallback = Callable[[dict], None]
"""on_round(record): one Step-3 re-selection (see `training.SelectionResult.rounds`)."""
CheckpointCallback = Callable[[dict[str, Tensor], dict], None]
"""checkpoint(state, meta): flat CPU tensors (safe to keep or save) and JSON-able metadata."""
Resume = tuple[dict[str, Tensor], dict]
"""A (state, meta) pair exactly as handed to a checkpoint callback."""
BatchLoss = Callable[[torch.nn.Module, list[Tensor], Tensor, int], Tensor]
"""batch_loss(net, batch_groups, batch_indices, step): the mean loss of one batch; net is the module
to run forward (the model, or the model in DistributedDataParallel), batch_groups G tensors
(B, L, C_g) float32 on the device, batch_indices (B,) into the images."""


@dataclass(frozen=True)
class TrainContext:
    """How one training run runs, apart from what it learns (its config).

    Attributes:
        seed: fixes the data order and the dropout masks.
        device: where to train.
        parallel: this rank of a data-parallel run (each rank trains on its share of every batch,
            its loss weighted by `DataParallel.share`); `device` must be its device.
        on_step: called after every step.
        on_round: called with each Step-3 re-selection record (Step 3 only).
        checkpoint: called every `checkpoint_every` steps of the config and after the last one.
        resume: a (state, meta) checkpoint of this same run to continue from.
    """

    seed: int
    device: str | torch.device = "cpu"
    parallel: DataParallel | None = None
    on_step: StepCallback | None = None
    on_round: RoundCallback | None = None
    checkpoint: CheckpointCallback | None = None
    resume: Resume | None = None


@dataclass(frozen=True)
class Loop:
    """What a training loop trains on.

    Attributes:
        stage: its name in checkpoints and errors ("distill", "select").
        batch_loss: the loss of one batch (`BatchLoss`).
        next_pass: next_pass(step) gives the (non-empty) image indices of the pass that starts at `step`.
        extra_meta: JSON-able metadata added to every checkpoint.
    """

    stage: str
    batch_loss: BatchLoss
    next_pass: Callable[[int], Tensor]
    extra_meta: Callable[[], dict] = dict


@dataclass
class _Progress:
    """What a loop must remember between steps besides the model and optimiser."""

    step: int = 0
    order: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    position: int = 0
    history: dict[str, list[float]] = field(default_factory=lambda: {"loss": [], "lr": []})


def run_loop(model: torch.nn.Module, groups: Sequence[Tensor], optim: DistillConfig, iters: int,
             context: TrainContext, loop: Loop) -> dict[str, list[float]]:
    """Passes of shuffled batches until `iters` steps, with the optimiser, batch size, schedule and
    checkpoint interval of `optim`; drop_last batching (a pass smaller than one batch is one batch).

    Args:
        model: trained in place; already on `context.device`.
        groups: G stored tensors (N, L, C_g).

    Returns:
        History {"loss": [...], "lr": [...]}, one value per step since the start of the run; in a
        data-parallel run the loss is the whole batch's (the mean over the ranks of weighted losses).

    Raises:
        MedscleanError: the loss is not finite.
        UsageError: `context.resume` is a checkpoint of another stage or other settings.
    """
    return _Trainer(model, groups, optim, iters, context, loop).run()


class _Trainer:
    """One `run_loop`: the optimiser, the data-order generator and the module run forward."""

    def __init__(self, model, groups, optim: DistillConfig, iters: int, context: TrainContext, loop: Loop):
        self.model, self.groups, self.optim, self.iters, self.loop = model, groups, optim, iters, loop
        self.context, self.parallel = context, context.parallel
        self.device = torch.device(context.device)
        self.n_images = groups[0].shape[0]
        self.params = list(model.parameters())
        self.warmup = optim.warmup_for(iters)
        self.optimizer = StableAdamW(self.params, lr=optim.lr, weight_decay=optim.weight_decay, eps=optim.eps)
        shuffle_seed, self.dropout_seed = _derive_seeds(context.seed)
        self.shuffler = torch_generator(shuffle_seed)
        self.net = model if self.parallel is None else self.parallel.wrap(model, self.device)
        if self.parallel is not None:
            self.dropout_seed = self.parallel.rank_seed(self.dropout_seed)

    def run(self) -> dict[str, list[float]]:
        with _private_rng(self.device, self.dropout_seed):
            progress = _Progress() if self.context.resume is None else self._restore(self.context.resume)
            while progress.step < self.iters:
                loss_value, lr = self._step(progress)
                progress.step += 1
                progress.history["loss"].append(loss_value)
                progress.history["lr"].append(lr)
                if self.context.on_step is not None:
                    self.context.on_step(progress.step, {"loss": loss_value, "lr": lr})
                self._maybe_checkpoint(progress)
        return progress.history

    def _next_batch(self, progress: _Progress) -> Tensor:
        if progress.position >= _batches_per_pass(len(progress.order), self.optim.batch_size):
            selected = self.loop.next_pass(progress.step)
            progress.order = selected[torch.randperm(len(selected), generator=self.shuffler)]
            progress.position = 0
        batch = _batch(progress.order, progress.position, self.optim.batch_size)
        progress.position += 1
        return batch

    def _step(self, progress: _Progress) -> tuple[float, float]:
        """One update on the next batch; its (loss, learning rate)."""
        batch = self._next_batch(progress)
        self.model.train()
        weight = 1.0
        if self.parallel is not None:
            batch, weight = self.parallel.share(batch)
        batch_groups = [g[batch].to(device=self.device, dtype=torch.float32) for g in self.groups]
        loss = self.loop.batch_loss(self.net, batch_groups, batch, progress.step) * weight
        loss_value = float(loss.item()) if self.parallel is None else self.parallel.mean(loss)
        if not np.isfinite(loss_value):
            raise MedscleanError(f"{self.loop.stage}: the loss became {loss_value} at iteration {progress.step}; "
                                 f"lower the learning rate")
        lr = warm_cosine_lr(progress.step, base_lr=self.optim.lr, final_lr=self.optim.final_lr,
                            warmup=self.warmup, total=self.iters)
        _optimise(self.optimizer, self.params, loss, lr, self.optim.grad_clip)
        return loss_value, lr

    def _maybe_checkpoint(self, progress: _Progress) -> None:
        every = self.optim.checkpoint_every
        due = every and progress.step % every == 0
        if self.context.checkpoint is None or not (due or progress.step == self.iters):
            return
        meta = {"stage": self.loop.stage, "step": progress.step, "iters": self.iters, "n_images": self.n_images,
                "pass_position": progress.position,
                "history": {name: list(values) for name, values in progress.history.items()},
                **self.loop.extra_meta()}
        state = {f"model.{name}": value.detach().cpu().clone() for name, value in self.model.state_dict().items()}
        state.update({f"optim.{name}": value for name, value in optimizer_state_tensors(self.optimizer).items()})
        state.update(_rng_tensors(self.device, self.shuffler))
        state["data.order"] = progress.order.clone()
        self.context.checkpoint(state, meta)

    def _restore(self, resume: Resume) -> _Progress:
        state, meta = resume
        stage = self.loop.stage
        if meta.get("stage") != stage:
            raise UsageError(f"the checkpoint to resume is from stage {meta.get('stage')!r}, not {stage!r}")
        if meta.get("iters") != self.iters or meta.get("n_images") != self.n_images:
            raise UsageError(
                f"the checkpoint was written for {meta.get('iters')} iterations on {meta.get('n_images')} images, "
                f"this run has {self.iters} on {self.n_images}: resume with the original settings or start afresh"
            )
        self.model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
        optimizer_state = {k.removeprefix("optim."): v for k, v in state.items() if k.startswith("optim.")}
        load_optimizer_state_tensors(self.optimizer, optimizer_state)
        torch.set_rng_state(state["rng.torch"])
        self.shuffler.set_state(state["rng.shuffle"])
        if self.device.type == "cuda" and "rng.cuda" in state:
            torch.cuda.set_rng_state(state["rng.cuda"], self.device)
        history = {name: list(values) for name, values in meta["history"].items()}
        return _Progress(meta["step"], state["data.order"].long().clone(), meta["pass_position"], history)


def _derive_seeds(seed: int) -> tuple[int, int]:
    shuffle_seed, dropout_seed = np.random.SeedSequence(seed).generate_state(2)
    return int(shuffle_seed), int(dropout_seed)


@contextmanager
def _private_rng(device: torch.device, seed: int):
    """Fork the global CPU (and this CUDA device's) RNG and seed it; the caller's streams are restored after."""
    devices = [cuda_index(device)] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
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


def _optimise(optimizer: StableAdamW, params: list[Tensor], loss: Tensor, lr: float, grad_clip: float) -> None:
    """One update: backward (in a data-parallel run DistributedDataParallel averages the gradients
    over the ranks before it returns), clip the global gradient norm, step at learning rate lr."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
