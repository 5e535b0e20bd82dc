"""Stage `select` (Step 3): the final score η of every image.

With method "meds" it fine-tunes the distilled model while re-selecting the clean images
(`model.training.progressive_select`), checkpointing into the work folder's partial area; with the
other methods η is the Step-1 image score. The clean list is the `cut` stage's, a cut of the stored
η, so a new cut of a finished run needs no training.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from medsclean.config import DistillConfig, SelectConfig
from medsclean.stages.common import (PARALLEL_RESULT, StageResult, TrainingSetup, checkpointer, drop_partial,
                                     load_groups, load_model, model_state, progress_callback, resume_from,
                                     run_on_ranks, save_rank0)
from medsclean.workdir.artifacts import Artifact, digest
from medsclean.workdir.store import Store

MIN_CLASS_SIZE = 5
"""Below this many images a class's threshold is unreliable: `run_select` warns."""


def select_key(features: Artifact, scores: Artifact, distilled: Artifact | None, cfg: SelectConfig,
               seed: int, world: int = 1) -> str:
    """The select key; as for `distill.distill_key`, a data-parallel Step 3's world size is part of it."""
    world = world if cfg.method == "meds" else 1
    # the payload keeps the 0.1 stage names (features, scores): changing them would change every stored key
    return digest({"features": features.key, "scores": scores.key,
                   "distill": distilled.key if distilled is not None else None, "select": asdict(cfg), "seed": seed,
                   **({"world": world} if world > 1 else {})})


def run_select(features: Artifact, scores: Artifact, distilled: Artifact | None, store: Store, cfg: SelectConfig,
               setup: TrainingSetup, *, force: bool = False) -> StageResult:
    """The final score η of every image: with method meds, Step 3 (fine-tuning the distilled model
    while re-selecting); otherwise the Step-1 image scores. The clean list is `cut.run_cut`'s.

    Args:
        features, scores: the artifacts of the extract and score stages.
        distilled: the distill artifact (method meds), else None.
        store: the work folder.
        cfg: Step-3 settings.
        setup: seed, device, reporter and data-parallel trainer (Step 3 only).
        force: recompute even when a cached artifact exists.

    Returns:
        The select artifact: eta.safetensors {"eta", "memory_score" and, with meds, "distilled_score"}
        (N,) and, with meds, model.safetensors of the fine-tuned model.
    """
    t0 = time.perf_counter()
    key = select_key(features, scores, distilled, cfg, setup.seed, setup.key_world)
    if (art := store.cached("select", key, setup.reporter, force=force)) is not None:
        return StageResult(art, True, time.perf_counter() - t0)
    images = features.manifest["images"]
    _warn_small_classes([row["class"] for row in images], setup)
    memory_scores = scores.tensors("scores.safetensors", ["image_scores"])["image_scores"].double()
    import torch

    if cfg.method == "meds":
        _, eta, rounds, model, distilled_scores = _fine_tune(features, distilled, store, cfg, key, setup)
        files = {"model.safetensors": model_state(model)}
        model_cfg = model.config.to_dict()
        eta_tensors = {"distilled_score": torch.from_numpy(np.asarray(distilled_scores, dtype=np.float64)).float()}
    else:
        eta, files, model_cfg, eta_tensors = memory_scores.numpy(), {}, None, {}
        rounds = [{"t": 0, "alpha": 1.0, "final": True}]
    files["eta.safetensors"] = {"eta": torch.from_numpy(np.asarray(eta, dtype=np.float64)),
                                "memory_score": memory_scores.clone(), **eta_tensors}
    manifest = {"images": images, "config": asdict(cfg), "seed": setup.seed, "model": model_cfg,
                "grid": features.manifest["encoder"]["grid"], "rounds": rounds,
                "parents": {"extract": features.key, "score": scores.key,
                            "distill": distilled.key if distilled is not None else None}}
    art = store.write_stage("select", key, files, manifest)
    drop_partial(store.partial_dir("select", key))
    return StageResult(art, False, time.perf_counter() - t0)


def _warn_small_classes(classes: list[str], setup: TrainingSetup) -> None:
    for name in sorted(set(classes)):
        if classes.count(name) < MIN_CLASS_SIZE:
            setup.reporter.warn(f"class {name!r} has only {classes.count(name)} images: its threshold is "
                                f"unreliable; merge classes with --class-from none")


def _fine_tune(features: Artifact, distilled: Artifact, store: Store, cfg: SelectConfig, key: str,
               setup: TrainingSetup):
    """Step 3 here (resuming a checkpoint) or on the data-parallel ranks: (keep, eta, rounds, the
    fine-tuned model, the distilled model's image scores)."""
    from medsclean.model.loop import TrainContext
    from medsclean.model.training import progressive_select

    model = load_model(distilled).train()
    base = distilled.tensors("maps.safetensors")
    partial = store.partial_dir("select", key)
    optim = DistillConfig(**distilled.manifest["config"])
    parallel = setup.trainer() if setup.trainer is not None else None
    if parallel is not None:
        setup.reporter.info(f"select: data-parallel on {parallel.workers} Ray Train workers")
        payload = {"features": features, "distilled": distilled, "cfg": cfg, "optim": optim, "seed": setup.seed,
                   "out": partial / PARALLEL_RESULT}
        state, extra = run_on_ranks(parallel, select_on_rank, payload)
        model.load_state_dict(state, strict=True)
        keep, eta = extra["keep"].numpy().astype(bool), extra["eta"].numpy()
        return keep, eta, extra["rounds"], model, base["image_scores"].double().numpy()
    groups, _ = load_groups(features)
    classes = [row["class"] for row in features.manifest["images"]]
    with setup.reporter.task("select", total=cfg.iters) as task:
        context = TrainContext(seed=setup.seed, device=setup.device, on_step=progress_callback(task),
                               checkpoint=checkpointer(partial), resume=resume_from(partial, setup.reporter, "select"))
        result = progressive_select(model, groups, classes, base["maps"], cfg, optim, context)
    return result.keep, result.eta, result.rounds, model, base["image_scores"].double().numpy()


def select_on_rank(payload: dict, parallel) -> None:
    """One rank of a data-parallel Step 3 (run by `distributed.train.DataParallelTrainer`)."""
    import torch

    from medsclean.model.loop import TrainContext
    from medsclean.model.training import progressive_select

    features, distilled = payload["features"], payload["distilled"]
    groups, _ = load_groups(features)
    classes = [row["class"] for row in features.manifest["images"]]
    model = load_model(distilled).train()
    base = distilled.tensors("maps.safetensors")
    context = TrainContext(seed=payload["seed"], device=parallel.device, parallel=parallel)
    result = progressive_select(model, groups, classes, base["maps"], payload["cfg"], payload["optim"], context)
    save_rank0(parallel, payload["out"], model.cpu(), {"rounds": result.rounds, "history": result.history},
               {"keep": torch.from_numpy(result.keep.astype(np.uint8)), "eta": torch.from_numpy(result.eta)})
