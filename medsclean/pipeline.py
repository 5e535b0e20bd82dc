"""Stages wired together: each stage function runs its missing or stale predecessors first.

The CLI builds one `Run` from its options and calls one function here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsclean.config import (ClusterConfig, CutConfig, DataConfig, DistillConfig, EvalConfig, ExtractConfig, ScoreConfig, SelectConfig)
from medsclean.presets import DEFAULT_PRESET, DEFAULT_SEED, Preset, resolve_preset
from medsclean.values import check_seed, resolve_device
from medsclean.workdir.data import Dataset, discover
from medsclean.stages.features import ExtractResult, run_extract
from medsclean.workdir.store import Store
from medsclean.ui import Reporter, RichReporter


METRICS_SCHEMA = "medsclean.metrics/1"


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

    def training_ranks(self) -> dict:
        """`trainer` and `world` for the training stages: with `--train-workers N` (N > 1), a function
        returning the Ray Train data-parallel trainer of N ranks; otherwise training stays here."""
        if self.cluster.train_workers < 2:
            return {}

        def trainer():
            from medsclean.distributed.train import DataParallelTrainer

            return DataParallelTrainer(self.executor(), self.cluster.train_workers,
                                       use_gpu=self.device.startswith("cuda"),
                                       storage=self.work / ".partial" / "ray-train")

        return {"trainer": trainer, "world": self.cluster.train_workers}

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
              data: Mapping[str, Any] | None = None, extract: Mapping[str, Any] | None = None,
              quiet: bool = False, reporter: Reporter | None = None, wait: bool = True,
              cluster: Mapping[str, Any] | None = None) -> Run:
    """Resolve the device and the preset into a frozen `Run`.

    Args:
        images: the image folder or dataset root.
        work: the work folder.
        preset: "auto" (paper on a GPU, cpu otherwise), "cpu" or "paper".
        data, extract, cluster: `DataConfig` / `ExtractConfig` / `ClusterConfig` field values; None
            values are unset.
    """
    check_seed(seed)
    extract_given = _given(extract)
    device = resolve_device(extract_given.get("device", ExtractConfig.device))
    chosen = resolve_preset(preset, cuda=device.startswith("cuda"))
    if extract_given.get("weights") is not None:
        extract_given["weights"] = Path(extract_given["weights"]).expanduser().resolve()
    extract_cfg = chosen.build(ExtractConfig, **{**extract_given, "device": device})
    data_cfg = DataConfig(images=Path(images).expanduser().resolve(), **_given(data))
    return Run(data=data_cfg, extract=extract_cfg, preset=chosen, work=Path(work).expanduser().resolve(),
               seed=seed, device=device, reporter=reporter or RichReporter(quiet=quiet), wait=wait,
               cluster=ClusterConfig(**_given(cluster)))


def extract_stage(run: Run, *, force: bool = False, stage: str = "features") -> ExtractResult:
    """Stage `features` for the run's images."""
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
    return {"stage": "features", "path": str(result.artifact.path), "cached": result.cached,
            "images": result.n_images, "skipped": m["skipped"], "backbone": m["encoder"]["name"],
            "seconds": round(result.seconds, 3), "key": result.artifact.key}


def score_stage(run: Run, cfg: ScoreConfig, *, force: bool = False, features: ExtractResult | None = None) -> dict:
    """Stage `scores`, after `features` (`features`: that stage's result, when the caller ran it).
    Returns {"features": ..., "scores": ...} stage results."""
    from medsclean.stages.scores import run_score

    results = {"features": features or extract_stage(run)}
    art = results["features"].artifact
    results["scores"] = run_score(art, run.store(), cfg, device=run.device, force=force, reporter=run.reporter,
                                  executor=run.executor)
    _log_stage(run, "scores", results["scores"])
    return results


def distill_stage(run: Run, score_cfg: ScoreConfig, cfg: DistillConfig, *, force: bool = False) -> dict:
    """Stage `distill`, after `features` and `scores`."""
    from medsclean.stages.training import check_model_shape, run_distill

    features = extract_stage(run)
    check_model_shape(features.artifact.manifest["encoder"], cfg)  # before the scores, not after
    results = score_stage(run, score_cfg, features=features)
    results["distill"] = run_distill(results["features"].artifact, results["scores"].artifact, run.store(), cfg,
                                     seed=run.seed, device=run.device, force=force, reporter=run.reporter,
                                     **run.training_ranks())
    _log_stage(run, "distill", results["distill"])
    return results


def select_stage(run: Run, score_cfg: ScoreConfig, distill_cfg: DistillConfig, cfg: SelectConfig,
                 cut_cfg: CutConfig, *, force: bool = False) -> dict:
    """Stages `select` (the final scores η) and `cut` (the clean list), after every stage they need
    (`distill` only for method meds). A changed cut reuses the stored η: no retraining."""
    from medsclean.stages.training import run_cut, run_select

    if cfg.method == "meds":
        results = distill_stage(run, score_cfg, distill_cfg)
        distilled = results["distill"].artifact
    else:
        results, distilled = score_stage(run, cfg.step1(score_cfg)), None
    results["select"] = run_select(results["features"].artifact, results["scores"].artifact, distilled, run.store(),
                                   cfg, seed=run.seed, device=run.device, force=force, reporter=run.reporter,
                                   **run.training_ranks())
    _log_stage(run, "select", results["select"])
    results["cut"] = run_cut(results["select"].artifact, run.store(), cut_cfg, force=force, reporter=run.reporter)
    _log_stage(run, "cut", results["cut"])
    _record(run, results, {"data": run.data, "extract": run.extract, "score": cfg.step1(score_cfg),
                           **({"distill": distill_cfg} if cfg.method == "meds" else {}), "select": cfg, "cut": cut_cfg})
    if results["select"].cached and not results["cut"].cached:
        run.reporter.info(f"re-cut: the stored final scores of select {results['select'].artifact.key} cut by "
                          f"{results['cut'].artifact.manifest['rule']} (no retraining)")
    return results


def _record(run: Run, results: dict, configs: dict) -> None:
    from medsclean.workdir.runs import record_run

    chain = {stage: (results[stage].artifact.key if stage in results else None)
             for stage in ("features", "scores", "distill", "select", "cut")}
    record_run(run.store(), run.data.images, chain, configs, preset=run.preset.name, seed=run.seed)


def recorded_run(key: str | None, images: Path, work: Path, *, device: str | None = None, quiet: bool = False,
                 reporter: Reporter | None = None) -> tuple[Run, dict] | None:
    """The run `key` (a prefix is enough; by default the latest run of `images`) rebuilt with the options
    recorded when it was made, and its artifacts as stage results; None when `images` has no run yet."""
    from medsclean.workdir.runs import find_run, latest_run
    from medsclean.stages.training import StageResult

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
    else:
        key, record, root = find_run(store, key)
        if Path(root).resolve() != Path(images).expanduser().resolve():
            from medsclean.errors import ConfigError

            raise ConfigError("run", f"run {key} was made from {root}, not {images}")
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
    built.reporter.info(f"eval: run {key} ({options['select']['method']}, cut "
                        f"{results['cut'].artifact.manifest['rule']}, made {record['created']}) with its recorded options")
    return built, results


def apply_budget(run: Run, distill_cfg: DistillConfig, select_cfg: SelectConfig, seconds: float):
    """Step-2 and Step-3 configs whose iteration counts fit `seconds` of training on this machine.

    The step time is measured on the run's own features and model (a short probe); the counts
    are logged so that a rerun can fix them.
    """
    from dataclasses import replace

    from medsclean.stages.training import check_model_shape, iterations_for_budget, seconds_per_step

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


def stage_times(results: dict) -> dict:
    return {name: {"seconds": round(r.seconds, 2), "cached": r.cached, "path": str(r.artifact.path)}
            for name, r in results.items()}


def user_paths(images_arg: Path, rows: list[dict]) -> list[str]:
    """The paths users get in every list: the image folder as they typed it joined with each image's
    path inside it, so a relative folder gives paths relative to the current directory, like `find`."""
    prefix = Path(images_arg)
    return [(prefix / row["path"]).as_posix() for row in rows]


def kept_flags(results: dict) -> list[bool]:
    """One flag per image of the run's cut, in its manifest's order: True for a kept image."""
    return results["cut"].artifact.tensors("selection.safetensors", ["keep"])["keep"].bool().tolist()


def user_list(images_arg: Path, results: dict, *, kept: bool) -> str:
    """The kept (or rejected) images of the run's cut, one user path per line."""
    paths = user_paths(images_arg, results["cut"].artifact.manifest["images"])
    return "".join(f"{p}\n" for p, k in zip(paths, kept_flags(results)) if k == kept)


def select_summary(run: Run, results: dict, images_arg: Path, out: Path | None,
                   rejected_out: Path | None = None) -> dict:
    """Per-class counts, stage times and output paths; writes the clean list to `out` and the
    rejected list to `rejected_out` (`store.write_text_through`: a file atomically, a device, FIFO
    or descriptor in place; `-` for stdout is the CLI's business)."""
    from medsclean.workdir.atomic import write_text_through

    art = results["cut"].artifact
    images = art.manifest["images"]
    per_class: dict[str, dict] = {}
    for row, kept in zip(images, kept_flags(results)):
        c = per_class.setdefault(row["class"], {"images": 0, "kept": 0, "rejected": 0})
        c["images"] += 1
        c["kept" if kept else "rejected"] += 1
    for target, wanted in ((out, True), (rejected_out, False)):
        if target is not None:
            write_text_through(Path(target), user_list(images_arg, results, kept=wanted))
    selected = results["select"]
    return {"clean_list": _shown_path(out), "rejected_list": _shown_path(rejected_out),
            "run": art.key, "select_key": selected.artifact.key,
            "trained": not selected.cached and art.manifest["method"] == "meds",
            "recut": selected.cached and not results["cut"].cached,
            "cut_dir": str(art.path), "method": art.manifest["method"], "cut": art.manifest["rule"],
            "classes": per_class, "kept": art.manifest["kept"], "rejected": art.manifest["rejected"],
            "tau": art.manifest["tau"], "stages": stage_times(results)}


def _shown_path(path: Path | None) -> str | None:
    """Where a list went, as the summary names it: a file's real path; a device, FIFO or descriptor
    link as given (resolving /dev/stdout would name a `pipe:[…]` that is no path)."""
    from medsclean.workdir.atomic import writes_through

    if path is None:
        return None
    path = Path(path).expanduser()
    return str(path.absolute() if writes_through(path) else path.resolve())


def select_review(run: Run, results: dict, report_dir: Path | None = None) -> Path:
    """The review page of a selection: per class the score histogram with the cut, the rejected and
    the borderline kept images with their anomaly maps. Written into `report_dir`, by default into
    the run's cut folder (reused there when it exists); returns the page's path."""
    from medsclean.stages import evaluate as ev
    from medsclean.pages.review import write_review
    from medsclean.stages.scores import ranks_within_class

    cut = results["cut"].artifact
    target = Path(report_dir) if report_dir is not None else cut.path / "review"
    if report_dir is None and (target / "report.html").is_file():
        return target / "report.html"
    dataset = run.dataset()
    records = _records_in_order(dataset, cut)
    encoder = results["features"].artifact.manifest["encoder"]
    grid, preprocess = tuple(encoder["grid"]), encoder["preprocess"]
    eval_cfg = run.eval_config()
    tokens = _train_tokens(run, results)  # (N, P): small; full-size maps are made only for pictured images
    selection = cut.tensors("selection.safetensors")
    eta, keep = selection["eta"].double().numpy(), selection["keep"].bool().numpy()
    memory = results["select"].artifact.tensors("eta.safetensors", ["memory_score"])["memory_score"].double().numpy()
    classes = [r.cls for r in records]
    ranks = ranks_within_class(eta, classes)
    rows = [{"path": r.rel_path, "class": r.cls, "eta": float(eta[i]), "kept": bool(keep[i]), "rank_in_class": ranks[i],
             "memory_score": float(memory[i]), "label": r.label} for i, r in enumerate(records)]
    labelled = any(r.label is not None for r in records)
    metrics = ev.cleaning_metrics(dataset, cut, None, eval_cfg) if any(r.label == 1 for r in records) else []

    def picture(i: int):
        one = ev.postprocess([records[i]], tokens[i:i + 1], grid, preprocess, eval_cfg)
        mask = one.masks[0] if one.masks is not None and records[i].mask is not None else None
        return ev.display_image(records[i], preprocess, eval_cfg.size), one.maps[0], mask

    settings = {"run": cut.key, "images": str(dataset.root), "method": cut.manifest["method"],
                "cut": cut.manifest["rule"], "backbone": encoder["name"], "seed": run.seed}
    rules = cut.manifest.get("rules", {})  # the rule each class used (mixture may fall back to mad)
    engines = results["scores"].artifact.manifest.get("engines", {}) if "scores" in results else {}
    cuts = {c: {"tau": t, "rule": cut.manifest["rule"], "used": rules.get(c),
                "engine": engines.get(c, engines.get("<all>"))} for c, t in cut.manifest["tau"].items()}
    return write_review(target, title=f"medsclean select: {dataset.root}", rows=rows, cuts=cuts,
                        picture=picture, metrics_rows=metrics if labelled else (), settings=settings)


def select_export(run: Run, results: dict, images_arg: Path, out: Path, *, copy: bool) -> dict:
    """`--export DIR`: the kept and rejected images as an MVTec-layout tree (see `medsclean.workdir.export`)."""
    from medsclean.workdir.export import export_tree

    cut = results["cut"].artifact
    rows = cut.manifest["images"]
    return export_tree(out, run.data.images, rows, kept_flags(results), user_paths(images_arg, rows), copy=copy,
                       run=cut.key)


def print_select_table(summary: dict, *, stderr: bool = False) -> None:
    """The human summary of `select` on stdout (stderr when stdout carries the clean list)."""
    from rich.table import Table

    console = _stdout_console(stderr=stderr)
    table = Table(title=f"medsclean select ({summary['method']}, cut {summary['cut']})", title_justify="left")
    for col in ("class", "images", "kept", "rejected", "tau"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, c in summary["classes"].items():
        table.add_row(name, str(c["images"]), str(c["kept"]), str(c["rejected"]), f"{summary['tau'][name]:.4f}")
    total = sum(c["images"] for c in summary["classes"].values())
    table.add_row("all", str(total), str(summary["kept"]), str(summary["rejected"]), "", style="bold")
    console.print(table)
    times = ", ".join(f"{name} " + ("cached" if v["cached"] else f"{v['seconds']:.1f} s")
                      for name, v in summary["stages"].items())
    console.print(f"stages: {times}")
    if summary["clean_list"]:
        console.print(f"clean list: {summary['clean_list']}")
    console.print(f"run: {summary['run']} ({'Step 3 trained' if summary['trained'] else 'training reused'}"
                  f"{', re-cut without retraining' if summary['recut'] else ''})")
    console.print(f"details: {summary['cut_dir']} (rejected.txt, scores.csv, selection.json)")
    if summary.get("review"):
        console.print(f"review: {summary['review']}")
    if summary.get("export"):
        console.print(f"export: {summary['export']}")


def eval_stage(run: Run, score_cfg: ScoreConfig, distill_cfg: DistillConfig, select_cfg: SelectConfig,
               cut_cfg: CutConfig, eval_cfg: EvalConfig, *, out_dir: Path, report_dir: Path | None = None,
               test_dir: Path | None = None, test_masks: Path | None = None, results: dict | None = None) -> dict:
    """Evaluate the detector on the test split and, where contaminants are known, the cleaning.

    `results`: the stage results of a recorded run (`recorded_run`) to evaluate as they are; without
    it, the stages the model needs are run (or reused) with the given configs. Writes `metrics.json`
    and `metrics.csv` into `out_dir` and, with `report_dir`, the HTML report.
    """

    from medsclean.stages import evaluate as ev
    from medsclean.workdir.atomic import write_json_atomic, write_text_atomic

    if results is not None:
        if eval_cfg.model == "distill" and "distill" not in results:
            from medsclean.errors import ConfigError

            raise ConfigError("model", f"model {eval_cfg.model}: this run has no distilled model (method "
                              f"{results['select'].artifact.manifest['config']['method']}); use select or memory")
    elif eval_cfg.model == "memory":
        results = score_stage(run, score_cfg)
    elif eval_cfg.model == "distill":
        results = distill_stage(run, score_cfg, distill_cfg)
    else:
        results = select_stage(run, score_cfg, distill_cfg, select_cfg, cut_cfg)
    features = results["features"].artifact
    encoder = features.manifest["encoder"]
    grid, preprocess = tuple(encoder["grid"]), encoder["preprocess"]
    payload: dict = {"model": eval_cfg.model, "run": None,
                     "protocol": ev.protocol_settings(eval_cfg, preprocess), "stages": stage_times(results)}
    sections: dict[str, list[dict]] = {}
    test_maps = None
    train_ds = run.dataset()
    test_ds = _test_dataset(run, train_ds, test_dir, test_masks)
    if test_ds is not None:
        test_features = run_extract(test_ds, run.store(), run.extract, stage="features-test",
                                    strict=run.data.strict, reporter=run.reporter, executor=run.executor)
        _log_extract(run.reporter, test_features)
        test_maps = _test_maps(run, test_ds, test_features.artifact, results, eval_cfg, grid, preprocess)
        sections["detector"] = ev.detector_metrics(test_maps, eval_cfg)
    train_maps = None
    if "select" in results and any(r.label == 1 for r in train_ds.records):
        train_maps = _train_maps(run, train_ds, results, eval_cfg, grid, preprocess)
        sections["cleaning"] = ev.cleaning_metrics(train_ds, results["cut"].artifact, train_maps, eval_cfg)
    if not sections:
        from medsclean.errors import DataError

        raise DataError(f"{train_ds.root}: nothing to evaluate: no labelled test split (MVTec layout with test/ and "
                        f"ground_truth/) and no known contaminants in the training set (medsclean make-noisy)")
    payload.update(sections)
    payload["run"] = _run_identity(run, results)  # after the test features: their libraries are loaded
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / "metrics.json", {"schema": METRICS_SCHEMA, **payload})
    write_text_atomic(out_dir / "metrics.csv", ev.rows_to_csv(sections))
    payload["files"] = {"metrics_json": str(out_dir / "metrics.json"), "metrics_csv": str(out_dir / "metrics.csv")}
    if report_dir is not None:
        selection = results["cut"].artifact if "cut" in results and train_maps is not None else None
        payload["files"]["report"] = str(ev.build_report(report_dir, selection, train_maps, test_maps, sections,
                                                         payload["protocol"], top=eval_cfg.report_top))
    return payload


def _run_identity(run: Run, results: dict) -> dict:
    """What metrics.json needs to say which run it measured."""
    from medsclean.workdir.artifacts import versions

    encoder = results["features"].artifact.manifest["encoder"]
    return {"key": results["cut"].artifact.key if "cut" in results else None,
            "artifacts": {stage: r.artifact.key for stage, r in results.items()},
            "backbone": encoder["name"], "weights_sha256": encoder.get("weights_sha256"), "seed": run.seed,
            "preset": run.preset.name, "versions": versions()}


def _test_dataset(run: Run, train_ds: Dataset, test_dir: Path | None, test_masks: Path | None) -> Dataset | None:
    """The labelled test set: `--test DIR --test-masks DIR`, else the MVTec root's test split, else none."""
    from medsclean.workdir.data import mvtec_categories
    from medsclean.errors import ConfigError

    if test_dir is not None:
        if test_masks is None:
            raise ConfigError(("test_dir", "test_masks"), "test images need a folder of masks: they are labelled by their masks "
                             "(an image without a non-empty mask is normal)")
        return discover(test_dir, layout="folder", masks=test_masks, class_from=run.data.class_from)
    if train_ds.layout == "mvtec" and any((c / "test").is_dir() for c in mvtec_categories(train_ds.root)):
        return discover(train_ds.root, layout="mvtec", split="test")
    return None


def _records_in_order(dataset: Dataset, art) -> list:
    by_path = {r.rel_path: r for r in dataset.records}
    return [by_path[row["path"]] for row in art.manifest["images"]]


def _test_maps(run: Run, test_ds: Dataset, test_art, results: dict, cfg, grid, preprocess):
    from medsclean.stages import evaluate as ev
    from medsclean.stages.training import load_groups

    records = _records_in_order(test_ds, test_art)
    memory_selection = cfg.model == "select" and results["select"].artifact.manifest["model"] is None
    if cfg.model == "memory" or memory_selection:  # `select --method memory` trains no model
        memory = test_art.sharded_tensors(["index", "memory"])["memory"]
        tokens = ev.token_maps_from_memory(results["features"].artifact, results["scores"].artifact, memory,
                                           [r.cls for r in records], device=run.device)
    else:
        groups, _ = load_groups(test_art)
        tokens = ev.token_maps_from_model(results[cfg.model].artifact, groups, device=run.device)
    return ev.postprocess(records, tokens, grid, preprocess, cfg)


def _train_maps(run: Run, train_ds: Dataset, results: dict, cfg, grid, preprocess):
    """Training-image maps of the selection's model (method meds) or the Step-1 maps (method memory)."""
    from medsclean.stages import evaluate as ev

    records = _records_in_order(train_ds, results["select"].artifact)
    return ev.postprocess(records, _train_tokens(run, results), grid, preprocess, cfg)


def _train_tokens(run: Run, results: dict):
    """(N, P) token maps of the training images: the fine-tuned model's, or Step 1's without a model."""
    from medsclean.stages import evaluate as ev
    from medsclean.stages.training import load_groups

    select_art = results["select"].artifact
    if select_art.manifest["model"] is None:
        return results["scores"].artifact.tensors("scores.safetensors", ["maps"])["maps"].numpy()
    groups, _ = load_groups(results["features"].artifact)
    return ev.token_maps_from_model(select_art, groups, device=run.device)


def print_metrics_tables(payload: dict) -> None:
    """Rich tables of `eval` on stdout: one per target, a row per class and the mean, in percent."""
    import math

    from rich.table import Table

    console = _stdout_console()
    columns = {"detector": ["image_auroc", "image_ap", "aupro", "pixel_ap", "pixel_auroc"],
               "cleaning": ["precision", "recall", "f1", "ranking_auroc", "ranking_auprc", "inspection_depth",
                            "train_aupro", "train_pixel_ap"]}
    labels = {"image_auroc": "I-AUROC", "image_ap": "I-AP", "aupro": "P-AUPRO", "pixel_ap": "P-AP",
              "pixel_auroc": "P-AUROC", "precision": "prec", "recall": "recall", "f1": "F1",
              "ranking_auroc": "rank AUROC", "ranking_auprc": "rank AUPRC", "inspection_depth": "insp. depth",
              "train_aupro": "train P-AUPRO", "train_pixel_ap": "train P-AP"}
    for section, rows in payload.items():
        if section not in columns:
            continue
        cols = [c for c in columns[section] if any(c in r for r in rows)]
        table = Table(title=f"{section} ({payload['model']} model)" if section == "detector" else section,
                      title_justify="left")
        table.add_column("class")
        table.add_column("images", justify="right")
        for c in cols:
            table.add_column(labels[c], justify="right")
        for row in rows:
            cells = [("n/a" if row.get(c) is None or math.isnan(row[c]) else f"{100 * row[c]:.2f}") for c in cols]
            table.add_row(str(row["class"]), str(row["images"]), *cells,
                          style="bold" if row["class"] in ("mean", "all (pooled)") else None)
        console.print(table)
    console.print("metrics: " + payload["files"]["metrics_json"])
    if "report" in payload["files"]:
        console.print("report: " + payload["files"]["report"])


def _stdout_console(stderr: bool = False):
    """A rich console on stdout (or stderr); piped output gets a wide fixed width so tables are not truncated."""
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(highlight=False, soft_wrap=True, width=None if stream.isatty() else 160, stderr=stderr)
