"""What the distill, select and cut stages share.

A stage's result (`StageResult`, `stage_times`); how a training stage trains (`TrainingSetup`: seed, device,
reporter, data-parallel trainer); the stored features as model input (`load_groups`); the decoder
built for an encoder (`model_config_for`, `check_model_shape`) and a stored model (`load_model`,
`model_state`); checkpoints in the work folder's partial area (`checkpointer`, `resume_from`,
`drop_partial`); and a training function run on every data-parallel rank (`run_on_ranks`,
`save_rank0`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsclean.config import DistillConfig
from medsclean.errors import ConfigError
from medsclean.ui import Reporter
from medsclean.values import divisor_near
from medsclean.workdir.artifacts import Artifact, load_tensors_with_metadata, save_tensors

CHECKPOINT = "checkpoint.safetensors"
"""A training stage's checkpoint, in its partial folder."""
PARALLEL_RESULT = "data-parallel.safetensors"
"""Rank 0's weights and extras after a data-parallel run, in the stage's partial folder."""


@dataclass(frozen=True)
class StageResult:
    """A stage's artifact, whether it came from the cache, and the seconds the stage took."""

    artifact: Artifact
    cached: bool
    seconds: float


def stage_times(results: dict) -> dict:
    """{stage: {"seconds", "cached", "path"}} of stage results, for summaries and metrics.json."""
    return {name: {"seconds": round(r.seconds, 2), "cached": r.cached, "path": str(r.artifact.path)}
            for name, r in results.items()}


@dataclass(frozen=True)
class TrainingSetup:
    """How a training stage (distill, select) trains, apart from its config.

    Attributes:
        seed: the run seed (data order, dropout, the model's initial weights).
        device: where to train ("cpu", "cuda", "cuda:N").
        reporter: progress and messages.
        trainer: None to train here, or a function returning a data-parallel trainer of `world`
            ranks (`distributed.train.DataParallelTrainer`), called only when a model is trained: the
            ranks train together (`model.parallel.DataParallel`, each rank on the device Ray Train
            gave it) and rank 0's weights come back. Such a run starts afresh instead of resuming.
        world: the number of data-parallel ranks (part of the cache key when > 1).
    """

    seed: int
    device: str
    reporter: Reporter
    trainer: Callable[[], Any] | None = None
    world: int = 1

    @property
    def key_world(self) -> int:
        """The world size in the cache key: 1 when training stays here."""
        return self.world if self.trainer is not None else 1


def load_groups(features: Artifact) -> tuple[list, dict]:
    """The G stored feature groups (N, L, C_g) of a features artifact, and its encoder record."""
    encoder = features.manifest["encoder"]
    names = [f"group{g}" for g in range(len(encoder["group_dims"]))]
    tensors = features.sharded_tensors(["index", *names])
    return [tensors[n] for n in names], encoder


def model_config_for(encoder: dict, cfg: DistillConfig):
    """Decoder shape for an encoder: ViTs keep the token width with heads of 64 channels (12 for
    ViT-B, as the encoder); CNN stages are projected to `cfg.width`."""
    from medsclean.model.decoder import CNN_WIDTH, ModelConfig

    dims = tuple(encoder["group_dims"])
    if encoder["kind"] == "vit" and cfg.width is None:
        heads = max(1, dims[0] // 64)
        return ModelConfig(group_dims=dims, n_prefix=encoder["n_prefix"], width=None, depth=cfg.depth,
                           heads=heads, dropout=cfg.dropout, token_pool=cfg.token_pool)
    width = cfg.width if cfg.width is not None else CNN_WIDTH
    return ModelConfig(group_dims=dims, n_prefix=encoder["n_prefix"], width=width, depth=cfg.depth,
                       heads=cfg.heads, dropout=cfg.dropout, token_pool=cfg.token_pool)


def check_model_shape(encoder: dict, cfg: DistillConfig) -> None:
    """Refuse `cfg.heads` when it cannot split the width of the decoder `model_config_for` builds for
    `encoder` (a features manifest's "encoder"). `DistillConfig` checks a width it is given; an unset
    width is known only with the encoder: a ViT's decoder takes its heads from the token width, a
    CNN's is `model.CNN_WIDTH` wide. Call it as soon as the features exist, before scoring.

    Raises:
        ConfigError: (params heads, width) the heads do not divide that width.
    """
    from medsclean.model.decoder import CNN_WIDTH

    if cfg.width is not None or encoder["kind"] == "vit":
        return
    if CNN_WIDTH % cfg.heads:
        raise ConfigError(("heads", "width"), f"heads {cfg.heads} must divide {CNN_WIDTH}, the decoder's channels for "
                          f"a CNN encoder when width is unset; try heads {divisor_near(CNN_WIDTH, cfg.heads)} or set "
                          f"width", stage="distill")


def load_model(art: Artifact):
    """The reconstruction model stored in a distill or select artifact, strictly loaded, eval mode."""
    from medsclean.model.decoder import ModelConfig, ReconstructionModel

    model = ReconstructionModel(ModelConfig.from_dict(art.manifest["model"]), seed=0)
    model.load_state_dict(art.tensors("model.safetensors"), strict=True)
    return model.eval()


def model_state(model) -> dict:
    """The model's weights as contiguous CPU tensors, ready to store."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def checkpointer(partial: Path):
    """A `model.loop.CheckpointCallback` that saves each checkpoint into the partial folder."""
    def save(state: dict, meta: dict) -> None:
        save_tensors(partial / CHECKPOINT, state, metadata={"meta": json.dumps(meta)})

    return save


def resume_from(partial: Path, reporter: Reporter, stage: str):
    """The (state, meta) checkpoint kept in the partial folder, or None."""
    path = partial / CHECKPOINT
    if not path.is_file():
        return None
    tensors, metadata = load_tensors_with_metadata(path)
    meta = json.loads(metadata["meta"])
    reporter.info(f"{stage}: resuming from the checkpoint at iteration {meta.get('step', '?')}")
    return tensors, meta


def progress_callback(task):
    """A `model.loop.StepCallback` that advances a reporter task."""
    return lambda step, record: task.update(completed=step)


def drop_partial(partial: Path) -> None:
    shutil.rmtree(partial, ignore_errors=True)


def run_on_ranks(trainer, function, payload: dict) -> tuple[dict, dict]:
    """Run `function(payload, parallel)` on every rank of `trainer`; rank 0's model weights and its
    JSON extras (written to payload["out"] by `save_rank0`)."""
    payload["out"].unlink(missing_ok=True)
    trainer.run(function, payload)
    state, metadata = load_tensors_with_metadata(payload["out"])
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    extra = json.loads(metadata["extra"])
    extra.update({k.removeprefix("result."): v for k, v in state.items() if k.startswith("result.")})
    return weights, extra


def save_rank0(parallel, out: Path, model, extra: dict, tensors: dict | None = None) -> None:
    """On rank 0 only: the model's weights, `tensors` and the JSON-able `extra`, into `out`."""
    if parallel.rank == 0:
        state = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        state.update({f"result.{k}": v for k, v in (tensors or {}).items()})
        save_tensors(out, state, metadata={"extra": json.dumps(extra)})
