"""Stages wired together: each stage function runs its missing or stale predecessors first.

The Python API (`medsclean.api`, and through it the CLI) builds one `Run` from its options and calls
one function here. The stages themselves live in `medsclean.stages` (one module each); what
`select` hands the user besides its artifacts is `stages.outputs`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsclean.config import (ClusterConfig, CutConfig, DataConfig, DistillConfig, EvalConfig, ExtractConfig,
                              ScoreConfig, SelectConfig)
from medsclean.presets import DEFAULT_PRESET, DEFAULT_SEED, Preset, resolve_preset
from medsclean.values import check_seed, resolve_device
from medsclean.workdir.data import Dataset, discover
from medsclean.stages.common import StageResult, TrainingSetup, check_model_shape
from medsclean.stages.features import ExtractResult, run_extract
from medsclean.workdir.store import Store
from medsclean.ui import Reporter, RichReporter


@dataclass(frozen=True)
class Run:
    """Everything a command needs: data, encoder set-up, preset, work folder, seed, device.

    The stage configs of a run are built here, from the preset's overlay and the caller's values
    (`score_config(...)` etc.; a None value means unset).
    """

    data: DataConfig
    extract: ExtractConfig
    preset: Preset
    work: Path
    seed: int
    device: str
    reporter: Reporter = field(compare=False, repr=False)
    wait: bool = True
    cluster: ClusterConfig = ClusterConfig()

    def executor(self):
        """The Ray session of `--executor ray` (started on first use), or None to run here."""
        if self.cluster.executor != "ray":
            return None
        from medsclean import distributed

        return distributed.connect(self.cluster, self.work, self.reporter)

    def training(self) -> TrainingSetup:
        """How the training stages train: the run's seed, device and reporter and, with
        `--train-workers N` (N > 1), a function returning the Ray Train data-parallel trainer of N
        ranks; otherwise training stays here."""
        if self.cluster.train_workers < 2:
            return TrainingSetup(self.seed, self.device, self.reporter)

        def trainer():
            from medsclean.distributed.train import DataParallelTrainer

            return DataParallelTrainer(self.executor(), self.cluster.train_workers,
                                       use_gpu=self.device.startswith("cuda"),
                                       storage=self.work / ".partial" / "ray-train")

        return TrainingSetup(self.seed, self.device, self.reporter, trainer, self.cluster.train_workers)

    def dataset(self) -> Dataset:
        return discover(self.data.images, layout=self.data.layout, split=self.data.split,
                        masks=self.data.masks, class_from=self.data.class_from)

    def store(self) -> Store:
        return Store(self.work, images_root=self.data.images, wait=self.wait, strict=self.data.strict)

    def score_config(self, **given) -> ScoreConfig:
        return self.preset.build(ScoreConfig, **given, seed=self.seed)

    def distill_config(self, **given) -> DistillConfig:
        return self.preset.build(DistillConfig, **given)

    def select_config(self, **given) -> SelectConfig:
        return self.preset.build(SelectConfig, **given)

    def cut_config(self, **given) -> CutConfig:
        return self.preset.build(CutConfig, **given)

    def eval_config(self, **given) -> EvalConfig:
        return self.preset.build(EvalConfig, **given)


def _given(values: Mapping[str, Any] | None) -> dict:
    return {k: v for k, v in (values or {}).items() if v is not None}


def build_run(images: Path, work: Path, *, preset: str = DEFAULT_PRESET, seed: int = DEFAULT_SEED,
              options: Mapping[str, Mapping[str, Any] | None] | None = None, quiet: bool = False,
              reporter: Reporter | None = None, wait: bool = True) -> Run:
    """Resolve the device and the preset into a frozen `Run`.

    Args:
        images: the image folder or dataset root.
        work: the work folder.
        preset: "auto" (paper on a GPU, cpu otherwise), "cpu" or "paper".
        seed: the run seed.
        options: field values of the run's `DataConfig`, `ExtractConfig` and `ClusterConfig` by
            stage name ("data", "extract", "cluster"); None values are unset.
        quiet: the default reporter shows warnings only; `reporter` replaces it.
        wait: wait for another run computing the same stage instead of failing (`--no-wait` fails).
    """
    check_seed(seed)
    options = options or {}
    extract_given = _given(options.get("extract"))
    device = resolve_device(extract_given.get("device", ExtractConfig.device))
    chosen = resolve_preset(preset, cuda=device.startswith("cuda"))
    if extract_given.get("weights") is not None:
        extract_given["weights"] = Path(extract_given["weights"]).expanduser().resolve()
    extract_cfg = chosen.build(ExtractConfig, **{**extract_given, "device": device})
    data_cfg = DataConfig(images=Path(images).expanduser().resolve(), **_given(options.get("data")))
    return Run(data=data_cfg, extract=extract_cfg, preset=chosen, work=Path(work).expanduser().resolve(),
               seed=seed, device=device, reporter=reporter or RichReporter(quiet=quiet), wait=wait,
               cluster=ClusterConfig(**_given(options.get("cluster"))))


def extract_stage(run: Run, *, force: bool = False, stage: str = "extract") -> ExtractResult:
    """Stage `extract` for the run's images."""
    dataset = run.dataset()
    result = run_extract(dataset, run.store(), run.extract, stage=stage, force=force, strict=run.data.strict,
                         reporter=run.reporter, executor=run.executor)
    _log_extract(run.reporter, result)
    return result


def _log_extract(reporter: Reporter, result: ExtractResult) -> None:
    m = result.artifact.manifest
    if result.cached:
        reporter.info(f"{m['stage']}: cached ({result.n_images} images, {m['encoder']['name']}) at {result.artifact.path}")
        if m["skipped"]:
            names = ", ".join(row["path"] for row in m["skipped"][:3]) + (", ..." if len(m["skipped"]) > 3 else "")
            reporter.warn(f"{m['stage']}: {len(m['skipped'])} unreadable image(s) left out, as when the features were "
                          f"made: {names} (the manifest lists them)")
        return
    rate = result.n_extracted / result.seconds if result.seconds > 0 else float("nan")
    reporter.info(f"{m['stage']}: done in {result.seconds:.1f} s with {m['encoder']['name']} ({rate:.1f} images/s "
                  f"encoded), {result.n_skipped} skipped → {result.artifact.path}")
    for row in m["skipped"]:
        reporter.warn(f"skipped {row['path']}: {row['error']}")


def extract_summary(result: ExtractResult) -> dict:
    m = result.artifact.manifest
    return {"stage": "extract", "path": str(result.artifact.path), "cached": result.cached,
            "images": result.n_images, "skipped": m["skipped"], "backbone": m["encoder"]["name"],
            "seconds": round(result.seconds, 3), "key": result.artifact.key}


def score_stage(run: Run, cfg: ScoreConfig, *, force: bool = False, features: ExtractResult | None = None) -> dict:
    """Stage `score`, after `extract` (`features`: that stage's result, when the caller ran it).
    Returns {"extract": ..., "score": ...} stage results."""
    from medsclean.stages.scores import run_score

    results = {"extract": features or extract_stage(run)}
    art = results["extract"].artifact
    results["score"] = run_score(art, run.store(), cfg, device=run.device, force=force, reporter=run.reporter,
                                  executor=run.executor)
    _log_stage(run, "score", results["score"])
    return results


def distill_stage(run: Run, score_cfg: ScoreConfig, cfg: DistillConfig, *, force: bool = False) -> dict:
    """Stage `distill`, after `extract` and `score`."""
    from medsclean.stages.distill import run_distill

    features = extract_stage(run)
    check_model_shape(features.artifact.manifest["encoder"], cfg)  # before the scores, not after
    results = score_stage(run, score_cfg, features=features)
    results["distill"] = run_distill(results["extract"].artifact, results["score"].artifact, run.store(), cfg,
                                     run.training(), force=force)
    _log_stage(run, "distill", results["distill"])
    return results


def select_stage(run: Run, score_cfg: ScoreConfig, distill_cfg: DistillConfig, cfg: SelectConfig,
                 cut_cfg: CutConfig, *, force: bool = False, corrections=None) -> dict:
    """Stages `select` (the final scores η) and `cut` (the clean list, with the user's
    `corrections`, a `stages.cut.Corrections`), after every stage they need (`distill` only for
    method meds). A changed cut reuses the stored η: no retraining."""
    from medsclean.stages.cut import run_cut
    from medsclean.stages.select import run_select

    if cfg.method == "meds":
        results = distill_stage(run, score_cfg, distill_cfg)
        distilled = results["distill"].artifact
    else:
        results, distilled = score_stage(run, cfg.step1(score_cfg)), None
    results["select"] = run_select(results["extract"].artifact, results["score"].artifact, distilled, run.store(),
                                   cfg, run.training(), force=force)
    _log_stage(run, "select", results["select"])
    results["cut"] = run_cut(results["select"].artifact, run.store(), cut_cfg, corrections=corrections, force=force,
                             reporter=run.reporter)
    _log_stage(run, "cut", results["cut"])
    _record(run, results, {"data": run.data, "extract": run.extract, "score": cfg.step1(score_cfg),
                           **({"distill": distill_cfg} if cfg.method == "meds" else {}), "select": cfg, "cut": cut_cfg,
                           **({"corrections": corrections} if corrections else {})})
    if results["select"].cached and not results["cut"].cached:
        run.reporter.info(f"re-cut: the stored final scores of select {results['select'].artifact.key} cut by "
                          f"{results['cut'].artifact.manifest['rule']} (no retraining)")
    return results


def _record(run: Run, results: dict, configs: dict) -> None:
    from medsclean.workdir.runs import record_run

    chain = {stage: (results[stage].artifact.key if stage in results else None)
             for stage in ("extract", "score", "distill", "select", "cut")}
    record_run(run.store(), run.data.images, chain, configs, preset=run.preset.name, seed=run.seed)


def recorded_run(key: str | None, images: Path, work: Path, *, device: str | None = None, quiet: bool = False,
                 reporter: Reporter | None = None, command: str = "eval") -> tuple[Run, dict] | None:
    """The run `key` (a prefix is enough; by default the latest run of `images`) rebuilt with the options
    recorded when it was made, and its artifacts as stage results; None when `images` has no run yet.
    `command` names the command in its log line and errors."""
    found = _recorded(key, images, work, command)
    if found is None:
        return None
    key, record, store = found
    options = record["options"]
    data = DataConfig(**{**options["data"], "images": Path(options["data"]["images"]),
                         "masks": Path(options["data"]["masks"]) if options["data"]["masks"] else None})
    extract_opts = {**options["extract"], "device": device or ExtractConfig.device}
    if extract_opts.get("weights"):
        extract_opts["weights"] = Path(extract_opts["weights"])
    resolved = resolve_device(extract_opts["device"])
    extract = ExtractConfig(**{**extract_opts, "device": resolved})
    preset = resolve_preset(record["preset"], cuda=resolved.startswith("cuda"))
    built = Run(data=data, extract=extract, preset=preset, work=store.work, seed=record["seed"], device=resolved,
                reporter=reporter or RichReporter(quiet=quiet))
    for stage, k in record["artifacts"].items():
        if k:
            store.use(stage, k)
    results = {stage: StageResult(store.load(stage, k), True, 0.0) for stage, k in record["artifacts"].items() if k}
    built.reporter.info(f"{command}: run {key} ({options['select']['method']}, cut "
                        f"{results['cut'].artifact.manifest['rule']}, made {record['created']}) with its recorded options")
    return built, results


def _recorded(key: str | None, images: Path, work: Path, command: str) -> tuple[str, dict, Store] | None:
    """(key, run record, store) of the run `key`, or of the latest run of `images`; None without one."""
    from medsclean.workdir.runs import find_run, latest_run

    store = Store(work, images_root=images)
    if key is None:
        found = latest_run(store, images)
        if found is None:
            return None
        key, record = found
        if record is None:
            from medsclean.errors import DataError

            raise DataError(f"{images}: its latest run {key} lost artifacts in {store.work}; rerun `medsclean "
                            f"select`, or pass --run with another key from `medsclean runs`")
        return key, record, store
    key, record, root = find_run(store, key)  # a run with all its artifacts
    if Path(root).resolve() != Path(images).expanduser().resolve():
        from medsclean.errors import ConfigError

        raise ConfigError("run", f"run {key} was made from {root}, not {images}", stage=command)
    return key, record, store


def cut_stage(run: Run, results: dict, cut_cfg: CutConfig, corrections=None) -> dict:
    """Stage `cut` alone on a recorded run's artifacts (`recorded_run`): `cut_cfg` and the user's
    `corrections` applied to its stored final scores, recorded as the latest run of its folder with
    the run's other options. Never trains. Returns the results with the new cut."""
    from medsclean.stages.cut import run_cut
    from medsclean.workdir.runs import find_run

    store = run.store()
    recorded = find_run(store, results["cut"].artifact.key, stage="cut")[1]  # a run's key is its cut's key
    results = {**results, "cut": run_cut(results["select"].artifact, store, cut_cfg, corrections=corrections,
                                         reporter=run.reporter)}
    _log_stage(run, "cut", results["cut"])
    options = {k: v for k, v in recorded["options"].items() if k not in ("cut", "corrections")}
    _record(run, results, {**options, "cut": cut_cfg, **({"corrections": corrections} if corrections else {})})
    return results


def training_changes(run: Run, configs: Mapping[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """Why a `select` with `configs` ("score", "distill", "select") would train a new run of the image
    folder: (stage, field, recorded, new) of each setting that makes the trained stages and differs
    from the folder's latest run ("run", "seed" for the seed). Empty when nothing trains: no run yet,
    a method without training, or the training settings of the latest run or of another complete one.
    Compares the configs with the run records, not the artifacts (the images are not read)."""
    from dataclasses import asdict

    from medsclean.workdir.runs import folder_runs, latest_run

    store = run.store()
    found = latest_run(store, run.data.images)
    if configs["select"].method != "meds" or found is None or found[1] is None:
        return []
    new = _training_fields(asdict(run.data), run.extract, configs["select"].step1(configs["score"]), configs["distill"],
                           configs["select"], run.seed)

    def changes(record: dict) -> list[tuple[str, str, Any, Any]]:
        old = _recorded_training_fields(record)
        return [(*k, old[k], v) for k, v in new.items() if k in old and old[k] != v]

    if any(not changes(r) for r in folder_runs(store, run.data.images).values()):
        return []
    return changes(found[1])


def _training_fields(data, extract, score, distill, select, seed) -> dict[tuple[str, str], Any]:
    """{(stage, field): value} of the settings that make the trained stages (speed-only ones left out);
    `data`: the data config's fields."""
    from dataclasses import asdict

    out = {("data", k): (None if data.get(k) is None else str(data[k]))
           for k in ("layout", "split", "masks", "class_from")}
    out.update({("extract", k): v for k, v in extract.key_fields().items()})
    out.update({("score", k): v for k, v in score.key_fields().items() if k != "seed"})
    for stage, cfg in (("distill", distill), ("select", select)):
        out.update({(stage, k): v for k, v in asdict(cfg).items()} if cfg is not None else {})
    out[("run", "seed")] = seed
    return out


def _recorded_training_fields(record: dict) -> dict[tuple[str, str], Any]:
    """`_training_fields` of a run record (empty when its options no longer make configs)."""
    from dataclasses import fields

    options = record["options"]

    def build(cls, stage):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options[stage].items() if k in known}) if stage in options else None

    try:
        return _training_fields(options["data"], build(ExtractConfig, "extract"), build(ScoreConfig, "score"),
                                build(DistillConfig, "distill"), build(SelectConfig, "select"), record["seed"])
    except (KeyError, TypeError, ValueError):
        return {}


def apply_budget(run: Run, distill_cfg: DistillConfig, select_cfg: SelectConfig, seconds: float):
    """Step-2 and Step-3 configs whose iteration counts fit `seconds` of training on this machine.

    The step time is measured on the run's own features and model (a short probe); the counts
    are logged so that a rerun can fix them.
    """
    from dataclasses import replace

    from medsclean.stages.distill import iterations_for_budget, seconds_per_step

    features = extract_stage(run).artifact
    check_model_shape(features.manifest["encoder"], distill_cfg)
    step = seconds_per_step(features, distill_cfg, seed=run.seed, device=run.device)
    iters = iterations_for_budget(seconds, step)
    run.reporter.info(f"budget {seconds:g} s: {step:.2f} s per step measured -> {iters} + {iters} iterations "
                      f"(rerun with --distill-iters {iters} --select-iters {iters} to reproduce)")
    return replace(distill_cfg, iters=iters), replace(select_cfg, iters=iters)


def _log_stage(run: Run, name: str, result) -> None:
    state = "cached" if result.cached else f"done in {result.seconds:.1f} s"
    why = None if result.cached else _changed_since_last_run(run, name, result.artifact)
    run.reporter.info(f"{name}: {state}{f' (recomputed: {why})' if why else ''} → {result.artifact.path}")


def _changed_since_last_run(run: Run, stage: str, art) -> str | None:
    """What differs from the same stage of the image folder's latest recorded run: the options that
    changed (old → new) and the inputs that changed; None when there is no earlier run to compare."""
    from medsclean.workdir.runs import latest_run

    store = run.store()
    found = latest_run(store, run.data.images)
    previous_key = found[1]["artifacts"].get(stage) if found and found[1] else None
    old = store.load(stage, previous_key) if previous_key and previous_key != art.key else None
    if old is None:
        return None
    old_cfg, new_cfg = old.manifest.get("config", {}), art.manifest.get("config", {})
    parts = [f"{k} {old_cfg.get(k)} → {v}" for k, v in new_cfg.items() if old_cfg.get(k) != v]
    if old.manifest.get("seed") != art.manifest.get("seed"):
        parts.append(f"seed {old.manifest.get('seed')} → {art.manifest.get('seed')}")
    old_parents = old.manifest.get("parents", {})
    parts += [f"{p} changed" for p, k in art.manifest.get("parents", {}).items() if old_parents.get(p) != k]
    return ", ".join(parts) or None


def eval_stage(run: Run, configs: Mapping[str, Any], *, out_dir: Path, report_dir: Path | None = None,
               test_dir: Path | None = None, test_masks: Path | None = None, results: dict | None = None) -> dict:
    """Stage `eval`: the detector on the test split and, where contaminants are known, the cleaning
    (`stages.evaluate.run_eval`), after the stages the evaluated model needs.

    Args:
        configs: the run's stage configs by stage name: "eval" and, without `results`, "score",
            "distill", "select" and "cut".
        out_dir: where metrics.json and metrics.csv go; `report_dir`: the HTML report's folder, if any.
        test_dir, test_masks: a labelled test set (`--test`, `--test-masks`); by default an MVTec
            root's test split.
        results: the stage results of a recorded run (`recorded_run`) to evaluate as they are;
            without it, the stages the model needs are run (or reused) with `configs`.
    """
    from medsclean.stages import evaluate as ev

    eval_cfg = configs["eval"]
    results = _results_to_evaluate(run, configs, results)
    train = run.dataset()
    test = ev.labelled_test_set(train, test_dir, test_masks, run.data.class_from)
    test_features = None
    if test is not None:
        extracted = run_extract(test, run.store(), run.extract, stage="extract-test", strict=run.data.strict,
                                reporter=run.reporter, executor=run.executor)
        _log_extract(run.reporter, extracted)
        test_features = extracted.artifact
    inputs = ev.EvalInputs(results=results, train=train, test=test, test_features=test_features, device=run.device,
                           seed=run.seed, preset=run.preset.name)
    return ev.run_eval(inputs, eval_cfg, Path(out_dir), report_dir)


def _results_to_evaluate(run: Run, configs: Mapping[str, Any], results: dict | None) -> dict:
    """A recorded run's results, checked against the model to evaluate, or the results of the stages
    that model needs (run or reused)."""
    model = configs["eval"].model
    if results is not None:
        if model == "distill" and "distill" not in results:
            from medsclean.errors import ConfigError

            raise ConfigError("model", f"model {model}: this run has no distilled model (method "
                              f"{results['select'].artifact.manifest['config']['method']}); use select or memory")
        return results
    if model == "memory":
        return score_stage(run, configs["score"])
    if model == "distill":
        return distill_stage(run, configs["score"], configs["distill"])
    return select_stage(run, configs["score"], configs["distill"], configs["select"], configs["cut"])
