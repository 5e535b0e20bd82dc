"""The Python API: the functions every `medsclean` command calls.

    import medsclean
    selection = medsclean.select("images/", work="medsclean-work", method="meds", cut="mixture")
    selection.kept, selection.rows[0], selection.recut(reject_fraction=0.1).rejected

Every function takes the command's options as keywords with the flag's name in snake_case
(`--bank-ratio` is `bank_ratio=`, `--rejected` is `rejected_out=`), the same defaults and presets,
and the same work folder and cache: a run made on the command line is reused here and vice versa.
Errors are the package's exceptions (`medsclean.errors`) naming the keyword; progress and log lines
go to stderr, `progress=False` keeps only the warnings. torch is imported on the first call.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from medsclean.api.checks import api_call, check_paths, fields_of, given_for, validate
from medsclean.api.results import CUT_OPTIONS, Evaluation, Selection, StageOutput
from medsclean.presets import DEFAULT_PRESET, DEFAULT_SEED
from medsclean.errors import ConfigError, DataError
from medsclean.options import BY_NAME, DEFAULT_WORK, Given

PathLike = str | os.PathLike


def extract(images: PathLike, *, work: PathLike = DEFAULT_WORK, progress: bool = True, **options: Any) -> StageOutput:
    """Run the frozen backbone over the images and cache their features (`medsclean extract`)."""
    with api_call():
        given = _prepare("extract", "extract", images, work, options)
        from medsclean import pipeline

        result = pipeline.extract_stage(_run(given, progress), force=bool(given.get("force")))
        art = result.artifact
        return StageOutput("extract", art.key, art.path, art.path, result.cached, pipeline.extract_summary(result))


def score(images: PathLike, *, work: PathLike = DEFAULT_WORK, progress: bool = True, **options: Any) -> StageOutput:
    """Step 1: score every patch against an ensemble of random memories (`medsclean score`)."""
    with api_call():
        given = _prepare("score", "score", images, work, options)
        from medsclean import pipeline
        from medsclean.stages.common import stage_times

        run = _run(given, progress)
        results = pipeline.score_stage(run, run.score_config(**given.stage("score")), force=bool(given.get("force")))
        art = results["score"].artifact
        summary = {"stage": "score", "csv": str(art.file("scores.csv")), "engine": art.manifest["engine"],
                   "stages": stage_times(results)}
        return StageOutput("score", art.key, art.path, art.file("scores.csv"), results["score"].cached, summary)


def distill(images: PathLike, *, work: PathLike = DEFAULT_WORK, progress: bool = True, **options: Any) -> StageOutput:
    """Step 2: distil the memory scores into a reconstruction model (`medsclean distill`)."""
    with api_call():
        given = _prepare("distill", "distill", images, work, options)
        from medsclean import pipeline
        from medsclean.stages.common import stage_times

        run = _run(given, progress)
        results = pipeline.distill_stage(run, run.score_config(**given.stage("score")),
                                         run.distill_config(**given.stage("distill")), force=bool(given.get("force")))
        art = results["distill"].artifact
        summary = {"stage": "distill", "model": str(art.file("model.safetensors")),
                   "final_loss": art.manifest["final_loss"], "stages": stage_times(results)}
        return StageOutput("distill", art.key, art.path, art.file("model.safetensors"), results["distill"].cached,
                           summary)


def select(images: PathLike, *, work: PathLike = DEFAULT_WORK, progress: bool = True, **options: Any) -> Selection:
    """Step 3 and the cut: the clean images, running any missing stage first (`medsclean select`).

    `out` / `rejected_out` write the lists to files, `report` puts the review page in a folder of
    your choice, `export` writes the cleaned dataset tree (`link`: hard links, copies or symlinks).
    Returns the kept and rejected paths and the per-image scores; `Selection.recut(...)` re-cuts
    without retraining.
    """
    with api_call():
        given = _prepare("select", "select", images, work, options)
        from medsclean import pipeline

        run = _run(given, progress)
        cfgs = _configs(run, given)
        corrections = _corrections(given, run.data.images, lambda: [r.rel_path for r in run.dataset().records])
        _warn_retraining(run, cfgs, given, images)
        results = pipeline.select_stage(run, cfgs["score"], cfgs["distill"], cfgs["select"], cfgs["cut"],
                                        force=bool(given.get("force")), corrections=corrections)
        summary = _write_outputs(run, results, images, given)
        upstream = _upstream_options(given, cfgs)

        def redo(**cut: Any) -> Selection:
            return select(images, work=work, progress=progress, **upstream, **cut)

        return _selection(results, images, summary, redo)


def cut(images: PathLike, *, work: PathLike = DEFAULT_WORK, run: str | None = None, progress: bool = True,
        **options: Any) -> Selection:
    """Re-cut a run's stored final scores and write its lists, review page and export as `select`
    does, never training (`medsclean cut`): the latest run of `images`, or `run` (a key from
    `medsclean runs`; a prefix is enough). The cut options not passed take their defaults, as in
    `select` (not the run's recorded cut), so `cut(images, reject_fraction=0.1)` gives the lists of
    `select(images, reject_fraction=0.1, <the run's options>)`; `keep` / `reject` correct the cut
    for the images they list. The new cut becomes the folder's latest run.

    Raises:
        DataError: `images` has no run in `work`.
    """
    with api_call():
        given = _prepare("cut", "cut", images, work, {**options, "run": run})
        from medsclean import pipeline

        recorded = None
        if given.work_folder().is_dir():
            recorded = pipeline.recorded_run(given.get("run"), Path(images), given.work_folder(),
                                             device=given.get("device"), quiet=not progress, command="cut")
        if recorded is None:
            typed = os.fspath(images)
            raise DataError(f"{typed} has no run in {os.fspath(given.work_folder())}; run `medsclean select {typed}` "
                            f"first")
        built, results = recorded
        selected = results["select"].artifact
        corrections = _corrections(given, built.data.images,
                                   lambda: [row["path"] for row in selected.manifest["images"]])
        results = pipeline.cut_stage(built, results, built.cut_config(**given.stage("cut")), corrections)
        summary = _write_outputs(built, results, images, given)
        again = {k: v for k, v in given.values_set().items() if k not in (*ONE_OFF, *CUT_OPTIONS, "run")}

        def redo(**cut_options: Any) -> Selection:
            return cut(images, work=work, run=results["cut"].artifact.key, progress=progress, **again, **cut_options)

        return _selection(results, images, summary, redo)


def evaluate(images: PathLike, *, work: PathLike = DEFAULT_WORK, progress: bool = True, **options: Any) -> Evaluation:
    """Measure the detector on the labelled test split and the cleaning on known contaminants
    (`medsclean eval`): the latest run of `images` (or `run=KEY`) with the options it was made with;
    with stage options and no `run`, the run those options describe (made or reused)."""
    with api_call():
        given = _prepare("eval", "evaluate", images, work, options)
        from medsclean import pipeline

        chosen = given.stage_options_set()
        if given.get("run") is not None and chosen:
            raise ConfigError(("run", *chosen), f"run evaluates a recorded run with its own options; drop "
                              f"{', '.join(chosen)}", stage="eval")
        recorded = None
        if not chosen:
            recorded = pipeline.recorded_run(given.get("run"), Path(images), given.work_folder(),
                                             device=given.get("device"), quiet=not progress)
        if recorded is not None:
            run, results = recorded
            cfgs = dict.fromkeys(("score", "distill", "select", "cut"))
        else:
            run, results = _run(given, progress), None
            cfgs = _configs(run, given)
        places = given.stage("eval")
        payload = pipeline.eval_stage(
            run, {**cfgs, "eval": run.eval_config(**fields_of("eval", places))},
            out_dir=places.get("metrics_dir", run.work / "eval"), report_dir=given.get("report"),
            test_dir=places.get("test_dir"), test_masks=places.get("test_masks"), results=results)
        return Evaluation.from_payload(payload)


def run_demo(*, work: PathLike = DEFAULT_WORK, progress: bool = True, **options: Any) -> Evaluation:
    """Generate a contaminated demo dataset in `work`, clean it with MeDS and evaluate (`medsclean demo`)."""
    with api_call():
        given = _prepare("demo", "run_demo", None, work, options)
        from medsclean import pipeline
        from medsclean.config import DemoConfig
        from medsclean.demo.prepare import prepare_demo_data
        from medsclean.ui import RichReporter

        cfg = replace(DemoConfig(**given.stage("demo")), seed=given.get("seed", DemoConfig.seed),
                      **({"noise_ratio": given.noise_ratio} if given.get("noise_ratio") is not None else {}))
        noisy = prepare_demo_data(given.work_folder().resolve(), cfg, RichReporter(quiet=not progress))
        run = _run(given, progress, images=noisy)
        cfgs = _configs(run, given)
        payload = pipeline.eval_stage(run, {**cfgs, "eval": run.eval_config()}, out_dir=run.work / "demo" / "eval",
                                      report_dir=run.work / "demo" / "report")
        return Evaluation.from_payload(payload)


def _prepare(command: str, function: str, images: PathLike | None, work: PathLike, options: dict) -> Given:
    """The call's options checked and validated, its paths checked: before anything heavy."""
    arguments = {"images": Path(images)} if images is not None else {}
    given = given_for(command, function, {**options, "work": work}, **arguments)
    validate(given)
    check_paths(given)
    return given


def _run(given: Given, progress: bool, images: Path | None = None):
    from medsclean import pipeline

    return pipeline.build_run(images if images is not None else given.images, given.work_folder(),
                              preset=given.get("preset", DEFAULT_PRESET), seed=given.get("seed", DEFAULT_SEED),
                              options={stage: given.stage(stage) for stage in ("data", "extract", "cluster")},
                              quiet=not progress, wait=not given.get("no_wait"))


def _configs(run, given: Given) -> dict[str, Any]:
    """The score, distill, select and cut configs of a run: preset overlay, then the caller's values;
    with `budget` the iteration counts are measured and chosen."""
    from medsclean import pipeline
    from medsclean.values import parse_duration

    select_cfg = run.select_config(**given.stage("select"))
    cfgs = {"score": run.score_config(**given.stage("score")), "distill": run.distill_config(**given.stage("distill")),
            "select": select_cfg, "cut": run.cut_config(**given.stage("cut"))}
    if given.get("budget") is not None and select_cfg.method == "meds":
        cfgs["distill"], cfgs["select"] = pipeline.apply_budget(run, cfgs["distill"], select_cfg,
                                                                parse_duration(given.budget))
    return cfgs


def _write_outputs(run, results: dict, images: PathLike, given: Given) -> dict:
    """What `select` and `cut` write once the cut is made: the lists (`out`, `rejected_out`), the
    review page (`report`, by default the cut's folder) and the export (`export`); returns the summary."""
    from medsclean.stages import outputs

    summary = outputs.select_summary(run, results, images, given.get("out"), given.get("rejected_out"))
    summary["overrides"] = results["cut"].artifact.manifest.get("overrides", {"kept": [], "rejected": []})
    summary["review"] = str(outputs.select_review(run, results, given.get("report"), images_arg=images))
    run.reporter.info(f"review: {summary['review']}")
    if given.get("export") is not None:
        outputs.select_export(run, results, given.export, link=given.get("link"), copy=bool(given.get("copy")))
        summary["export"] = str(Path(given.export).expanduser().resolve())
    return summary


def _corrections(given: Given, root: Path, image_paths):
    """The `stages.cut.Corrections` of the call's `keep` and `reject` among the images `image_paths()`
    lists (paths inside `root`), or None without them; checked before any stage runs."""
    if given.get("keep") is None and given.get("reject") is None:
        return None
    from medsclean.api.corrections import resolve_corrections

    return resolve_corrections(root, image_paths(), given.get("keep"), given.get("reject"))


def _warn_retraining(run, cfgs: dict, given: Given, images: PathLike) -> None:
    """One warning before a `select` that trains a new run of a folder that has one: the training
    options that differ from its latest run (old → new), and the `cut` command that re-cuts that run."""
    import shlex

    from medsclean import pipeline
    from medsclean.options import CUT, option_for

    changes = pipeline.training_changes(run, cfgs)
    if not changes:
        return
    named = ", ".join(f"{option_for(field, stage)} {old} → {new}" for stage, field, old, new in changes)
    words = ["medsclean", "cut", os.fspath(images)]
    for name in ("work", *(o.name for o in CUT), "keep", "reject"):
        value = given.get(name)
        if name == "work" and os.fspath(value) == DEFAULT_WORK:
            continue
        if value is not None and not isinstance(value, tuple):
            words += [BY_NAME[name].flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    command = " ".join(shlex.quote(w) for w in words)
    run.reporter.warn(f"this trains a new run: {named}; to re-cut the latest run instead: {command}")


ONE_OFF = ("force", "out", "rejected_out", "report", "export", "link", "copy", "work", "images")
"""Options of one `select` call that a re-cut does not repeat."""


def _upstream_options(given: Given, cfgs: dict) -> dict[str, Any]:
    """The call's options that made the scores, for a re-cut: the cut and one-off outputs left out,
    a `budget` replaced by the iteration counts it chose (a re-cut must not measure again)."""
    upstream = {k: v for k, v in given.values_set().items() if k not in ONE_OFF and k not in CUT_OPTIONS}
    if upstream.pop("budget", None) is not None and cfgs["select"].method == "meds":
        upstream.update(distill_iters=cfgs["distill"].iters, select_iters=cfgs["select"].iters)
    return upstream


def _selection(results: dict, images: PathLike, summary: dict, redo) -> Selection:
    """The `Selection` of a run's stage results."""
    from medsclean.stages.cut import decisions_of
    from medsclean.stages.outputs import user_paths
    from medsclean.stages.scores import ranks_within_class

    cut = results["cut"].artifact
    listed = cut.manifest["images"]
    paths = user_paths(images, listed)
    chosen = cut.tensors("selection.safetensors")
    final, keep = chosen["eta"].double().tolist(), chosen["keep"].bool().tolist()
    stored = results["select"].artifact.tensors("eta.safetensors")
    memory = stored["memory_score"].double().tolist()
    distilled = stored["distilled_score"].double().tolist() if "distilled_score" in stored else [None] * len(paths)
    ranks = ranks_within_class(final, [row["class"] for row in listed])
    rows = [{"path": p, "class": row["class"], "memory_score": m, "distilled_score": d, "final_eta": f,
             "kept": k, "rank_in_class": r, "decision": c}
            for p, row, m, d, f, k, r, c in zip(paths, listed, memory, distilled, final, keep, ranks,
                                                decisions_of(cut.manifest))]
    return Selection(kept=[p for p, k in zip(paths, keep) if k], rejected=[p for p, k in zip(paths, keep) if not k],
                     rows=rows, run=cut.key, review=Path(summary["review"]),
                     artifacts={stage: r.artifact.path for stage, r in results.items()}, summary=summary, redo=redo)


__all__ = ["Evaluation", "Selection", "StageOutput", "cut", "distill", "evaluate", "extract", "run_demo", "score",
           "select"]
