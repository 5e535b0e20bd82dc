"""Stages `distill` (Step 2), `select` (Step 3) and `cut` on stored features.

`distill` writes the model trained to reproduce the Step-1 maps and its maps of every training
image. `select` writes the final score η of every image: with method "meds" it fine-tunes the
distilled model while re-selecting the clean images; with the other methods η is the Step-1
image score. `cut` writes the clean list, a cut of the stored η that needs no training, so a new
cut of a finished run takes seconds. Training stages checkpoint into the work folder's partial
area and resume an interrupted run exactly.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from medsclean.config import CutConfig, DistillConfig, SelectConfig
from medsclean.workdir.artifacts import Artifact, digest, load_tensors_with_metadata, save_tensors
from medsclean.workdir.atomic import to_json
from medsclean.workdir.store import Store
from medsclean.ui import Reporter

CHECKPOINT = "checkpoint.safetensors"
MIN_CLASS_SIZE = 5


@dataclass(frozen=True)
class StageResult:
    artifact: Artifact
    cached: bool
    seconds: float


def load_groups(features: Artifact) -> tuple[list, dict]:
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
    from medsclean.values import divisor_near
    from medsclean.errors import ConfigError
    from medsclean.model.decoder import CNN_WIDTH

    if cfg.width is not None or encoder["kind"] == "vit":
        return
    if CNN_WIDTH % cfg.heads:
        raise ConfigError(("heads", "width"), f"heads {cfg.heads} must divide {CNN_WIDTH}, the decoder's channels for "
                          f"a CNN encoder when width is unset; try heads {divisor_near(CNN_WIDTH, cfg.heads)} or set "
                          f"width", stage="distill")


def _checkpointer(partial: Path):
    def save(state: dict, meta: dict) -> None:
        save_tensors(partial / CHECKPOINT, state, metadata={"meta": json.dumps(meta)})

    return save


def _resume_from(partial: Path, reporter: Reporter, stage: str):
    path = partial / CHECKPOINT
    if not path.is_file():
        return None
    tensors, metadata = load_tensors_with_metadata(path)
    meta = json.loads(metadata["meta"])
    reporter.info(f"{stage}: resuming from the checkpoint at iteration {meta.get('step', '?')}")
    return tensors, meta


def _progress_callback(task):
    return lambda step, record: task.update(completed=step)


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
    return digest({"features": features.key, "scores": scores.key, "distill": _key_fields(cfg), "seed": seed,
                   **({"world": world} if world > 1 else {})})


def run_distill(features: Artifact, scores: Artifact, store: Store, cfg: DistillConfig, *, seed: int, device: str,
                force: bool = False, reporter: Reporter, trainer=None, world: int = 1) -> StageResult:
    """Train the reconstruction model on the stored features to reproduce the Step-1 maps.

    `trainer`: None, or a function returning a data-parallel trainer (`distributed.train`) of `world`
    ranks, called only when the model is trained: the ranks train together (`training.DataParallel`:
    DistributedDataParallel, each rank on the device Ray Train gave it) and rank 0's weights come
    back. Such a run starts afresh instead of resuming a checkpoint.
    """
    t0 = time.perf_counter()
    key = distill_key(features, scores, cfg, seed, world if trainer is not None else 1)
    if (art := store.cached("distill", key, reporter, force=force)) is not None:
        return StageResult(art, True, time.perf_counter() - t0)
    from medsclean.model.decoder import ReconstructionModel
    from medsclean.selection.progressive import image_scores
    from medsclean.model.training import compute_maps, distill

    groups, encoder = load_groups(features)
    targets = scores.tensors("scores.safetensors", ["maps"])["maps"]
    model_cfg = model_config_for(encoder, cfg)
    model = ReconstructionModel(model_cfg, seed=seed)
    partial = store.partial_dir("distill", key)
    if force:
        (partial / CHECKPOINT).unlink(missing_ok=True)
    parallel = trainer() if trainer is not None else None
    if parallel is not None:
        payload = {"features": features, "scores": scores, "cfg": cfg, "seed": seed, "out": partial / PARALLEL_RESULT}
        reporter.info(f"distill: data-parallel on {parallel.workers} Ray Train workers")
        state, extra = _run_on_ranks(parallel, _distill_on_rank, payload)
        model.load_state_dict(state, strict=True)
        history = extra["history"]
    else:
        with reporter.task("distill", total=cfg.iters) as task:
            history = distill(model, groups, targets, cfg, seed=seed, device=device,
                              on_step=_progress_callback(task), checkpoint=_checkpointer(partial),
                              resume=_resume_from(partial, reporter, "distill"))
    maps = compute_maps(model, groups, device=device)
    per_image = image_scores(maps.numpy())
    import torch

    manifest = {"images": features.manifest["images"], "grid": encoder["grid"], "model": model_cfg.to_dict(),
                "config": asdict(cfg), "seed": seed,
                "parents": {"features": features.key, "scores": scores.key},
                "final_loss": float(np.mean(history["loss"][-20:])), "device": str(device)}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    art = store.write_stage("distill", key, {
        "model.safetensors": state,
        "maps.safetensors": {"maps": maps.float(), "image_scores": torch.from_numpy(per_image).float()},
    }, manifest)
    _drop_partial(partial)
    return StageResult(art, False, time.perf_counter() - t0)


PARALLEL_RESULT = "data-parallel.safetensors"


def _run_on_ranks(trainer, function, payload: dict) -> tuple[dict, dict]:
    """Run `function(payload, parallel)` on every rank of `trainer`; rank 0's model weights and its
    JSON extras (written to payload["out"])."""
    payload["out"].unlink(missing_ok=True)
    trainer.run(function, payload)
    state, metadata = load_tensors_with_metadata(payload["out"])
    model_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    extra = json.loads(metadata["extra"])
    extra.update({k.removeprefix("result."): v for k, v in state.items() if k.startswith("result.")})
    return model_state, extra


def _save_rank0(parallel, out: Path, model, extra: dict, tensors: dict | None = None) -> None:
    if parallel.rank == 0:
        state = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        state.update({f"result.{k}": v for k, v in (tensors or {}).items()})
        save_tensors(out, state, metadata={"extra": json.dumps(extra)})


def _distill_on_rank(payload: dict, parallel) -> None:
    """One rank of a data-parallel `run_distill`."""
    from medsclean.model.decoder import ReconstructionModel
    from medsclean.model.training import distill

    groups, encoder = load_groups(payload["features"])
    targets = payload["scores"].tensors("scores.safetensors", ["maps"])["maps"]
    model = ReconstructionModel(model_config_for(encoder, payload["cfg"]), seed=payload["seed"])
    history = distill(model, groups, targets, payload["cfg"], seed=payload["seed"], device=parallel.device,
                      parallel=parallel)
    _save_rank0(parallel, payload["out"], model.cpu(), {"history": history})


def _select_on_rank(payload: dict, parallel) -> None:
    """One rank of a data-parallel Step 3 (`_fine_tune`)."""
    import torch

    from medsclean.model.training import progressive_select

    features, distilled = payload["features"], payload["distilled"]
    groups, _ = load_groups(features)
    classes = [row["class"] for row in features.manifest["images"]]
    model = load_model(distilled).train()
    base = distilled.tensors("maps.safetensors")
    result = progressive_select(model, groups, classes, base["maps"], payload["cfg"], payload["optim"],
                                seed=payload["seed"], device=parallel.device, parallel=parallel)
    _save_rank0(parallel, payload["out"], model.cpu(), {"rounds": result.rounds, "history": result.history},
                {"keep": torch.from_numpy(result.keep.astype(np.uint8)), "eta": torch.from_numpy(result.eta)})


def _drop_partial(partial: Path) -> None:
    import shutil

    shutil.rmtree(partial, ignore_errors=True)


def load_model(art: Artifact):
    """The reconstruction model stored in a distill or select artifact, strictly loaded, eval mode."""
    from medsclean.model.decoder import ModelConfig, ReconstructionModel

    model = ReconstructionModel(ModelConfig.from_dict(art.manifest["model"]), seed=0)
    model.load_state_dict(art.tensors("model.safetensors"), strict=True)
    return model.eval()


def select_key(features: Artifact, scores: Artifact, distilled: Artifact | None, cfg: SelectConfig,
               seed: int, world: int = 1) -> str:
    """The select key; as for `distill_key`, a data-parallel Step 3's world size is part of it."""
    world = world if cfg.method == "meds" else 1
    return digest({"features": features.key, "scores": scores.key,
                   "distill": distilled.key if distilled is not None else None, "select": asdict(cfg), "seed": seed,
                   **({"world": world} if world > 1 else {})})


def run_select(features: Artifact, scores: Artifact, distilled: Artifact | None, store: Store, cfg: SelectConfig, *,
               seed: int, device: str, force: bool = False, reporter: Reporter, trainer=None,
               world: int = 1) -> StageResult:
    """The final score η of every image: with method meds, Step 3 (fine-tuning the distilled model
    while re-selecting); otherwise the Step-1 image scores. The clean list is `run_cut`'s.
    `trainer`, `world`: as for `run_distill` (Step 3 only)."""
    t0 = time.perf_counter()
    key = select_key(features, scores, distilled, cfg, seed, world if trainer is not None else 1)
    if (art := store.cached("select", key, reporter, force=force)) is not None:
        return StageResult(art, True, time.perf_counter() - t0)
    images = features.manifest["images"]
    classes = [row["class"] for row in images]
    for name in sorted(set(classes)):
        if classes.count(name) < MIN_CLASS_SIZE:
            reporter.warn(f"class {name!r} has only {classes.count(name)} images: its threshold is "
                          f"unreliable; merge classes with --class-from none")
    memory_scores = scores.tensors("scores.safetensors", ["image_scores"])["image_scores"].double()
    import torch

    if cfg.method == "meds":
        _, eta, rounds, model, distilled_scores = _fine_tune(features, distilled, store, cfg, key, seed=seed,
                                                             device=device, reporter=reporter, trainer=trainer)
        files = {"model.safetensors": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}}
        model_cfg = model.config.to_dict()
        eta_tensors = {"distilled_score": torch.from_numpy(np.asarray(distilled_scores, dtype=np.float64)).float()}
    else:
        eta, files, model_cfg, eta_tensors = memory_scores.numpy(), {}, None, {}
        rounds = [{"t": 0, "alpha": 1.0, "final": True}]
    files["eta.safetensors"] = {"eta": torch.from_numpy(np.asarray(eta, dtype=np.float64)),
                                "memory_score": memory_scores.clone(), **eta_tensors}
    manifest = {"images": images, "config": asdict(cfg), "seed": seed, "model": model_cfg,
                "grid": features.manifest["encoder"]["grid"], "rounds": rounds,
                "parents": {"features": features.key, "scores": scores.key,
                            "distill": distilled.key if distilled is not None else None}}
    art = store.write_stage("select", key, files, manifest)
    _drop_partial(store.partial_dir("select", key))
    return StageResult(art, False, time.perf_counter() - t0)


def run_cut(selected: Artifact, store: Store, cfg: CutConfig, *, force: bool = False,
            reporter: Reporter | None = None) -> StageResult:
    """The clean list: the cut `cfg` of the stored final scores η, per class (no training)."""
    t0 = time.perf_counter()
    # the mixture rule's guards (thresholds.mixture_decision) changed its cuts: its old cuts are not reused
    key = digest({"select": selected.key, "cut": asdict(cfg), **({"mixture": 2} if cfg.rule == "mixture" else {})})
    if (art := store.cached("cut", key, reporter, force=force)) is not None:
        return StageResult(art, True, time.perf_counter() - t0)
    import torch

    images = selected.manifest["images"]
    classes = [row["class"] for row in images]
    scores = selected.tensors("eta.safetensors")
    eta = final_scores(scores, classes, cfg.score)
    keep, tau = final_cut(eta, classes, cfg, selected.manifest["config"]["k"])
    rounds = [dict(r) for r in selected.manifest["rounds"]]
    rules = final_cut_rules(eta, classes, cfg, selected.manifest["config"]["k"])
    rounds[-1].update(final_cut_record(keep, tau, classes, cfg), rules=rules)
    distilled = scores["distilled_score"].double().numpy() if "distilled_score" in scores else None
    text = {"clean.txt": "".join(r["path"] + "\n" for r, k in zip(images, keep) if k),
            "rejected.txt": "".join(r["path"] + "\n" for r, k in zip(images, keep) if not k),
            "scores.csv": selection_csv(images, scores["memory_score"].double().numpy(), distilled, eta, keep),
            "selection.json": to_json({"method": selected.manifest["config"]["method"], "rounds": rounds}) + "\n"}
    files = {"selection.safetensors": {"eta": torch.from_numpy(eta),
                                       "keep": torch.from_numpy(keep.astype(np.uint8))}}
    manifest = {"images": images, "config": asdict(cfg), "rule": cfg.describe(), "tau": tau, "rules": rules,
                "kept": int(keep.sum()), "rejected": int((~keep).sum()), "model": selected.manifest["model"],
                "method": selected.manifest["config"]["method"], "grid": selected.manifest["grid"],
                "parents": {**selected.manifest["parents"], "select": selected.key}}
    art = store.write_stage("cut", key, files, manifest, extra_files=text)
    return StageResult(art, False, time.perf_counter() - t0)


def final_scores(scores: dict, classes: list[str], score: str) -> np.ndarray:
    """(N,) float64 scores the cut reads: the stored η, or its combination with the Step-1 image
    score (`CutConfig.score`). `scores`: the select stage's eta.safetensors tensors."""
    from medsclean.choices import FinalScore
    from medsclean.selection.progressive import combine_class_scores

    eta = scores["eta"].double().numpy()
    if score == FinalScore.ETA:
        return eta
    return combine_class_scores([eta, scores["memory_score"].double().numpy()], classes)


def final_cut(eta, classes: list[str], cfg: CutConfig, select_k: float) -> tuple[np.ndarray, dict[str, float]]:
    """The clean set: per class, the images whose final score is below the cut (`cfg.rule` with
    margin `cfg.k`, else Step 3's `select_k`; or the top `cfg.reject_fraction`; or `cfg.threshold`)."""
    from medsclean.selection.cut_rules import cut_per_class

    x = np.asarray(eta, dtype=np.float64)
    if cfg.threshold is not None:
        return x < cfg.threshold, {c: float(cfg.threshold) for c in sorted(set(classes))}
    k = cfg.k if cfg.k is not None else select_k
    params = {"mad": {"k": k}, "mixture": {"k_fallback": k}, "otsu": {}}[cfg.rule]
    return cut_per_class(x, classes, cfg.rule, reject_fraction=cfg.reject_fraction, **params)


def final_cut_rules(eta, classes: list[str], cfg: CutConfig, select_k: float) -> dict[str, dict]:
    """Per class, the rule `final_cut` applied and why ({"rule", "why"}): the mixture falls back to
    mad on small or one-mode classes (`thresholds.mixture_decision`)."""
    from medsclean.selection.cut_rules import rules_used

    if cfg.threshold is not None:
        return {c: {"rule": f"threshold {cfg.threshold:g}", "why": "a fixed threshold was asked for"}
                for c in sorted(set(classes))}
    k = cfg.k if cfg.k is not None else select_k
    params = {"mad": {"k": k}, "mixture": {"k_fallback": k}, "otsu": {}}[cfg.rule]
    return rules_used(np.asarray(eta, dtype=np.float64), classes, cfg.rule, reject_fraction=cfg.reject_fraction,
                      **params)


def final_cut_record(keep: np.ndarray, tau: dict[str, float], classes: list[str], cfg: CutConfig) -> dict:
    labels = np.asarray(classes, dtype=object)
    return {"cut": cfg.describe(), "tau": tau, "kept": {c: int(keep[labels == c].sum()) for c in tau},
            "size": {c: int((labels == c).sum()) for c in tau}}


def _fine_tune(features: Artifact, distilled: Artifact, store: Store, cfg: SelectConfig, key: str, *, seed: int,
               device: str, reporter: Reporter, trainer=None):
    from medsclean.model.training import progressive_select

    model = load_model(distilled).train()
    base = distilled.tensors("maps.safetensors")
    partial = store.partial_dir("select", key)
    optim = DistillConfig(**distilled.manifest["config"])
    parallel = trainer() if trainer is not None else None
    if parallel is not None:
        reporter.info(f"select: data-parallel on {parallel.workers} Ray Train workers")
        payload = {"features": features, "distilled": distilled, "cfg": cfg, "optim": optim, "seed": seed,
                   "out": partial / PARALLEL_RESULT}
        state, extra = _run_on_ranks(parallel, _select_on_rank, payload)
        model.load_state_dict(state, strict=True)
        keep, eta = extra["keep"].numpy().astype(bool), extra["eta"].numpy()
        return keep, eta, extra["rounds"], model, base["image_scores"].double().numpy()
    groups, _ = load_groups(features)
    classes = [row["class"] for row in features.manifest["images"]]
    with reporter.task("select", total=cfg.iters) as task:
        result = progressive_select(model, groups, classes, base["maps"], cfg, optim, seed=seed, device=device,
                                    on_step=_progress_callback(task), checkpoint=_checkpointer(partial),
                                    resume=_resume_from(partial, reporter, "select"))
    return result.keep, result.eta, result.rounds, model, base["image_scores"].double().numpy()


def selection_csv(images: list[dict], memory_scores, distilled_scores, eta, keep) -> str:
    """One row per image in input order; rank_in_class 1 = most suspicious (highest final η)."""
    from medsclean.stages.scores import ranks_within_class

    classes = [row["class"] for row in images]
    ranks = ranks_within_class(eta, classes)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "class", "memory_score", "distilled_score", "final_eta", "kept", "rank_in_class"])
    for i, row in enumerate(images):
        distilled = "" if distilled_scores is None else f"{float(distilled_scores[i]):.6f}"
        writer.writerow([row["path"], row["class"], f"{float(memory_scores[i]):.6f}", distilled,
                         f"{float(eta[i]):.6f}", int(bool(keep[i])), ranks[i]])
    return buf.getvalue()


PROBE_STEPS = 8
SELECT_OVERHEAD = 1.0 / 3.0
"""Step 3 re-scores every image before each pass: about one forward per training batch, a third of
a training step (forward + backward + update)."""


def seconds_per_step(features: Artifact, cfg: DistillConfig, *, seed: int, device: str) -> float:
    """Measured seconds of one training step of this model on these features (median of the last
    steps of a short probe run on a throw-away model)."""
    import time as clock

    import torch

    from medsclean.model.decoder import ReconstructionModel
    from medsclean.model.training import distill

    groups, encoder = load_groups(features)
    n = min(len(groups[0]), 2 * cfg.batch_size)
    probe = [g[:n] for g in groups]
    model = ReconstructionModel(model_config_for(encoder, cfg), seed=seed)
    stamps: list[float] = []
    distill(model, probe, torch.zeros(n, probe[0].shape[1] - encoder["n_prefix"]),
            replace(cfg, iters=PROBE_STEPS, warmup=1, checkpoint_every=0),
            seed=seed, device=device, on_step=lambda step, record: stamps.append(clock.perf_counter()))
    return float(np.median(np.diff(stamps)[2:]))


def iterations_for_budget(seconds: float, step_seconds: float) -> int:
    """Steps of Step 2 and of Step 3 each (equal counts, multiples of 10, at least 10) that fit
    `seconds` of training: T * step * (1 + 1 + SELECT_OVERHEAD) <= seconds."""
    steps = seconds / (step_seconds * (2.0 + SELECT_OVERHEAD))
    return max(10, int(steps // 10) * 10)
