"""Stage `distill` (Step 2): the model trained to reproduce the Step-1 maps, and its maps.

Reads the stored features and the Step-1 maps of the `score` stage; writes the trained model and
its maps and image scores of every training image. Checkpoints into the work folder's partial
area and resumes an interrupted run exactly. Also here: the measured time of one training step
and the iteration counts that fit a time budget (`--budget`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace

import numpy as np

from medsclean.config import DistillConfig
from medsclean.stages.common import (CHECKPOINT, PARALLEL_RESULT, StageResult, TrainingSetup, checkpointer,
                                     drop_partial, load_groups, model_config_for, model_state, progress_callback,
                                     resume_from, run_on_ranks, save_rank0)
from medsclean.workdir.artifacts import Artifact, digest
from medsclean.workdir.store import Store

PROBE_STEPS = 8
SELECT_OVERHEAD = 1.0 / 3.0
"""Step 3 re-scores every image before each pass: about one forward per training batch, a third of
a training step (forward + backward + update)."""


def _key_fields(cfg: DistillConfig) -> dict:
    """The distill settings in a key; a default token_pool (1) is left out, so that keys of runs
    made before the option existed stay valid."""
    fields_ = asdict(cfg)
    if fields_["token_pool"] == 1:
        del fields_["token_pool"]
    return fields_


def distill_key(features: Artifact, scores: Artifact, cfg: DistillConfig, seed: int, world: int = 1) -> str:
    """The distill key; a data-parallel run's world size is part of it (a different world size trains
    on other shares of the batches, with other dropout streams)."""
    # the payload keeps the 0.1 stage names (features, scores): changing them would change every stored key
    return digest({"features": features.key, "scores": scores.key, "distill": _key_fields(cfg), "seed": seed,
                   **({"world": world} if world > 1 else {})})


def run_distill(features: Artifact, scores: Artifact, store: Store, cfg: DistillConfig, setup: TrainingSetup, *,
                force: bool = False) -> StageResult:
    """Train the reconstruction model on the stored features to reproduce the Step-1 maps.

    Args:
        features, scores: the artifacts of the extract and score stages.
        store: the work folder.
        cfg: Step-2 settings.
        setup: seed, device, reporter and data-parallel trainer (`TrainingSetup`).
        force: recompute even when a cached artifact exists (its checkpoint is dropped).

    Returns:
        The distill artifact: model.safetensors and maps.safetensors {"maps" (N, H*W), "image_scores" (N,)}.
    """
    t0 = time.perf_counter()
    key = distill_key(features, scores, cfg, setup.seed, setup.key_world)
    if (art := store.cached("distill", key, setup.reporter, force=force)) is not None:
        return StageResult(art, True, time.perf_counter() - t0)
    import torch

    from medsclean.model.decoder import ReconstructionModel
    from medsclean.model.training import compute_maps
    from medsclean.maps import image_scores

    partial = store.partial_dir("distill", key)
    if force:
        (partial / CHECKPOINT).unlink(missing_ok=True)
    groups, encoder = load_groups(features)
    model = ReconstructionModel(model_config_for(encoder, cfg), seed=setup.seed)
    history = _train(model, groups, features, scores, cfg, setup, partial)
    maps = compute_maps(model, groups, device=setup.device)
    per_image = image_scores(maps, dtype=torch.float64).numpy()
    manifest = {"images": features.manifest["images"], "grid": encoder["grid"], "model": model.config.to_dict(),
                "config": asdict(cfg), "seed": setup.seed,
                "parents": {"extract": features.key, "score": scores.key},
                "final_loss": float(np.mean(history["loss"][-20:])), "device": str(setup.device)}
    art = store.write_stage("distill", key, {
        "model.safetensors": model_state(model),
        "maps.safetensors": {"maps": maps.float(), "image_scores": torch.from_numpy(per_image).float()},
    }, manifest)
    drop_partial(partial)
    return StageResult(art, False, time.perf_counter() - t0)


def _train(model, groups: list, features: Artifact, scores: Artifact, cfg: DistillConfig, setup: TrainingSetup,
           partial) -> dict[str, list[float]]:
    """Train `model` (fresh, its seed the run's) in place and return its loss history: here, resuming a
    checkpoint in `partial`, or on the data-parallel ranks of `setup.trainer` (rank 0's weights)."""
    from medsclean.model.loop import TrainContext
    from medsclean.model.training import distill

    targets = scores.tensors("scores.safetensors", ["maps"])["maps"]
    parallel = setup.trainer() if setup.trainer is not None else None
    if parallel is not None:
        payload = {"features": features, "scores": scores, "cfg": cfg, "seed": setup.seed,
                   "out": partial / PARALLEL_RESULT}
        setup.reporter.info(f"distill: data-parallel on {parallel.workers} Ray Train workers")
        state, extra = run_on_ranks(parallel, distill_on_rank, payload)
        model.load_state_dict(state, strict=True)
        return extra["history"]
    with setup.reporter.task("distill", total=cfg.iters) as task:
        context = TrainContext(seed=setup.seed, device=setup.device, on_step=progress_callback(task),
                               checkpoint=checkpointer(partial),
                               resume=resume_from(partial, setup.reporter, "distill"))
        return distill(model, groups, targets, cfg, context)


def distill_on_rank(payload: dict, parallel) -> None:
    """One rank of a data-parallel `run_distill` (run by `distributed.train.DataParallelTrainer`)."""
    from medsclean.model.decoder import ReconstructionModel
    from medsclean.model.loop import TrainContext
    from medsclean.model.training import distill

    groups, encoder = load_groups(payload["features"])
    targets = payload["scores"].tensors("scores.safetensors", ["maps"])["maps"]
    model = ReconstructionModel(model_config_for(encoder, payload["cfg"]), seed=payload["seed"])
    history = distill(model, groups, targets, payload["cfg"],
                      TrainContext(seed=payload["seed"], device=parallel.device, parallel=parallel))
    save_rank0(parallel, payload["out"], model.cpu(), {"history": history})


def seconds_per_step(features: Artifact, cfg: DistillConfig, *, seed: int, device: str) -> float:
    """Measured seconds of one training step of this model on these features (median of the last
    steps of a short probe run on a throw-away model)."""
    import torch

    from medsclean.model.decoder import ReconstructionModel
    from medsclean.model.loop import TrainContext
    from medsclean.model.training import distill

    groups, encoder = load_groups(features)
    n = min(len(groups[0]), 2 * cfg.batch_size)
    probe = [g[:n] for g in groups]
    model = ReconstructionModel(model_config_for(encoder, cfg), seed=seed)
    stamps: list[float] = []
    distill(model, probe, torch.zeros(n, probe[0].shape[1] - encoder["n_prefix"]),
            replace(cfg, iters=PROBE_STEPS, warmup=1, checkpoint_every=0),
            TrainContext(seed=seed, device=device, on_step=lambda step, record: stamps.append(time.perf_counter())))
    return float(np.median(np.diff(stamps)[2:]))


def iterations_for_budget(seconds: float, step_seconds: float) -> int:
    """Steps of Step 2 and of Step 3 each (equal counts, multiples of 10, at least 10) that fit
    `seconds` of training: T * step * (1 + 1 + SELECT_OVERHEAD) <= seconds."""
    steps = seconds / (step_seconds * (2.0 + SELECT_OVERHEAD))
    return max(10, int(steps // 10) * 10)
