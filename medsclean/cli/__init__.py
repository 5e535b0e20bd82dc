"""The `medsclean` command line: parse options, build the configs, call one library function.

Exit codes: 0 success, 1 runtime or data error, 2 usage error, 130 interrupted. stdout carries
only results (paths, tables, JSON); progress and logs go to stderr. Options are declared once in
`cli_options`; torch is imported inside commands so that `--help` and choice errors stay fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from medsclean.cli import options as opts
from medsclean.cli.options import Given, argument, build_command
from medsclean.presets import DEFAULT_PRESET, DEFAULT_SEED
from medsclean.errors import ConfigError, MedscleanError

app = typer.Typer(
    name="medsclean",
    help="Find the defective images hidden in an anomaly-detection training set (MeDS).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

IMAGES = argument("images", "Image folder or MVTec-layout dataset root.", "IMAGES")
STAGE_GROUPS = {
    "extract": (opts.RUN, opts.FORCE, opts.DATA, opts.EXTRACT, opts.CLUSTER),
    "score": (opts.RUN, opts.FORCE, opts.DATA, opts.EXTRACT, opts.CLUSTER, opts.SCORE),
    "distill": (opts.RUN, opts.FORCE, opts.DATA, opts.EXTRACT, opts.CLUSTER, opts.SCORE, opts.DISTILL),
    "select": (opts.RUN, opts.FORCE, opts.DATA, opts.EXTRACT, opts.CLUSTER, opts.SCORE, opts.DISTILL, opts.SELECT,
               opts.LISTS, opts.REPORT, opts.EXPORT, opts.COPY),
    "eval": (opts.RUN, opts.DATA, opts.EXTRACT, opts.CLUSTER, opts.SCORE, opts.DISTILL, opts.SELECT, opts.EVAL,
             opts.REPORT),
    "runs": (tuple(o for o in opts.RUN if o.name in ("work", "as_json")), opts.RUNS),
    "demo": (opts.RUN, opts.EXTRACT, opts.SCORE, opts.DISTILL, opts.SELECT, opts.NOISE, opts.DEMO),
    "make-noisy": (opts.NOISE, opts.MAKE_NOISY, opts.COPY, tuple(o for o in opts.RUN
                                                                      if o.name in ("seed", "as_json"))),
}


def _version(value: bool) -> None:
    if value:
        from medsclean import __version__

        typer.echo(f"medsclean {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Find the defective images hidden in an anomaly-detection training set (MeDS).

    Stages cache their results in the work folder; each stage runs the ones it needs first.
    """


def limit_openmp_spinning() -> None:
    """Bound how long idle OpenMP threads spin before sleeping (must run before torch is imported).

    With the default (long) spinning, torch ran up to 40x slower whenever another process held a
    core; a 2000-iteration spin keeps idle-machine speed and most of passive waiting's robustness
    (measured in docs/benchmarks.md). A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "2000")


def main() -> None:
    """Console-script entry point (also `python -m medsclean`)."""
    limit_openmp_spinning()
    app(prog_name="medsclean")


# ---------------------------------------------------------------------------------------------
# The edge: validation before anything heavy, domain errors to exit codes, Ctrl-C
# ---------------------------------------------------------------------------------------------

def _error_line(exc: MedscleanError) -> str:
    """One line; a ConfigError's library parameter names become the user's flags."""
    import re

    message = str(exc)
    if not isinstance(exc, ConfigError):
        return f"error: {message}"
    flags = [opts.flag_for(p, exc.stage) for p in exc.params]
    named = message
    for param, flag in zip(exc.params, flags):
        named = re.sub(rf"(?<![\w-]){re.escape(param)}(?![\w-])", flag, named)
    if named == message:
        return f"error: {', '.join(flags)}: {message}"
    return f"error: {named}"


def _validate(given: Given) -> None:
    """Build every config from the user's values alone (defaults for the rest), so that a bad value
    fails before torch is imported; the real configs add the preset later."""
    from medsclean.config import STAGE_CONFIGS, check_self_out
    from medsclean.values import check_seed, parse_duration

    for stage, cls in STAGE_CONFIGS.items():
        values = _fields_of(stage, given.stage(stage))
        if values:
            cls(**({"images": Path(".")} if stage == "data" else {}), **values)
    if given.get("seed") is not None:
        check_seed(given.seed)
    check_self_out(given.get("method", "meds"), bool(given.get("include_self")))
    on_stdout = [name for name in ("out", "rejected_out") if _is_stdout(given.get(name))]
    if on_stdout and given.get("as_json"):
        raise ConfigError((on_stdout[0], "json"), f"{on_stdout[0]} {given.get(on_stdout[0])} and json both write to "
                          f"stdout; pass only one")
    if len(on_stdout) == 2:
        raise ConfigError(("out", "rejected_out"), "out and rejected_out both write to stdout; pass only one")
    if given.get("budget") is not None:
        parse_duration(given.budget)
        if given.get("select_iters") is not None or given.get("distill_iters") is not None:
            raise ConfigError(("budget", "iters"), "budget and iters contradict each other (a time limit chooses "
                              "the iteration counts); pass only one", stage="select")


def _is_stdout(value) -> bool:
    """Whether a list path means this process's stdout: `-`, or the file stdout is open on
    (`/dev/stdout`, `/dev/fd/1`, or the file the shell redirected stdout to)."""
    if value is None:
        return False
    if str(value) == "-":
        return True
    try:
        ours = os.fstat(sys.stdout.fileno())
        theirs = os.stat(Path(value).expanduser())
    except (OSError, ValueError, AttributeError):  # no such path, or a stdout without a descriptor
        return False
    return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)


def _writable_ancestor(path: Path) -> Path:
    for folder in (path, *path.parents):
        if folder.exists():
            return folder
    return Path("/")


def _check_paths(given: Given) -> None:
    """Every path the user passed, checked before any work: one-line errors naming the flag."""
    from medsclean.errors import DataError

    for name in ("images", "root"):
        value = given.get(name)
        if value is not None and not Path(value).is_dir():
            raise DataError(f"{value}: no such folder; pass the folder that holds your images")
    from medsclean.workdir.atomic import writes_through

    for param, name in (("out", "out"), ("rejected_out", "rejected_out")):
        value = given.get(name)
        if value is None or _is_stdout(value):
            continue
        path = Path(value).expanduser()
        if path.is_dir():
            raise ConfigError(param, f"{param} {value} is a folder; give a file path, e.g. {path / 'clean.txt'}")
        if writes_through(path):  # a device, FIFO or descriptor: written in place, so it must be writable itself
            if not path.exists():
                raise ConfigError(param, f"{param} {value}: no such file or open descriptor")
            if not os.access(path, os.W_OK):
                raise ConfigError(param, f"{param} {value} is not writable")
            continue
        target = Path(os.path.realpath(path))  # through a symlink, the target is replaced: its folder counts
        _require_writable(param, value, target.parent, must_exist=True)
    for param, name in (("work", "work"), ("report_dir", "report"), ("metrics_dir", "metrics_dir"),
                        ("export", "export")):
        value = given.get(name)
        if value is None:
            continue
        path = Path(value).expanduser()
        if path.exists() and not path.is_dir():
            raise ConfigError(param, f"{param} {value} is a file; give a folder")
        if param == "export" and path.is_dir() and any(path.iterdir()):
            raise ConfigError(param, f"{param} {value} already exists and is not empty; choose a new folder or "
                              f"remove it first")
        _require_writable(param, value, _writable_ancestor(path.resolve()), must_exist=False)


def _require_writable(param: str, value, folder: Path, *, must_exist: bool) -> None:
    if must_exist and not folder.is_dir():
        raise ConfigError(param, f"{param} {value}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(param, f"{param} {value}: {folder} is not writable")


def _interrupted(work: Path | None) -> str:
    """What an interrupted run leaves behind and how to go on, naming only what is there: finished
    stages, training checkpoints, encoded images of the image cache."""
    from medsclean.workdir.image_cache import IMAGE_CACHE
    from medsclean.stages.training import CHECKPOINT

    kept, resume = [], []
    if work is not None and work.is_dir():
        stages = sorted(p.name for p in work.iterdir() if (p / "LATEST").is_file())
        if stages:
            kept.append(", ".join(stages))
            resume.append("finished stages are reused")
        trained = sorted({p.parent.name.rsplit("-", 1)[0] for p in (work / ".partial").glob(f"*/{CHECKPOINT}")})
        if trained:
            kept.append(f"checkpoints of {', '.join(trained)} in .partial")
            resume.append("training continues from its last checkpoint")
        if next((work / IMAGE_CACHE).glob("*/??/*.safetensors"), None) is not None:
            kept.append(f"encoded images in {IMAGE_CACHE}")
            resume.append("extraction skips the images already encoded")
    if not kept:
        return "interrupted: nothing was kept; rerun the same command to start again"
    return (f"interrupted: kept in {work}: {'; '.join(kept)}; rerun the same command to resume "
            f"({', '.join(resume)})")


def _execute(body, given: Given) -> None:
    try:
        _validate(given)
        _check_paths(given)
        body(given)
    except MedscleanError as exc:
        typer.echo(_error_line(exc), err=True)
        raise typer.Exit(code=exc.exit_code) from None
    except OSError as exc:  # the disk or the system refused: one line, no traceback
        from medsclean.errors import write_error

        typer.echo(f"error: {write_error(exc.filename, exc) if exc.filename else exc.strerror or exc}", err=True)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        work = given.get("work")
        typer.echo(_interrupted(Path(work or opts.BY_NAME["work"].default).resolve()), err=True)
        raise typer.Exit(code=130) from None
    finally:
        if "medsclean.distributed.session" in sys.modules:  # a Ray instance this command started stops here
            sys.modules["medsclean.distributed.session"].shutdown()
        if "medsclean.workdir.store" in sys.modules:  # the artifacts this command used may be removed from now on
            sys.modules["medsclean.workdir.store"].release_uses()


def command(name: str, *arguments):
    """Register a command body under `name` with its option groups, behind `_execute`."""
    def register(body):
        def wrapped(given: Given) -> None:
            _execute(body, given)

        wrapped.__doc__, wrapped.__name__ = body.__doc__, body.__name__
        build_command(app, name, wrapped, STAGE_GROUPS[name], arguments)
        return body

    return register


def _emit(name: str, payload: dict, as_json: bool | None, text: str) -> None:
    """The command's result on stdout: strict JSON with a schema version, or `text`."""
    if as_json:
        from medsclean.workdir.atomic import to_json

        typer.echo(to_json({"schema": f"medsclean.{name}/1", **payload}))
    elif text:
        typer.echo(text)


def _run(given: Given, images: Path):
    from medsclean import pipeline

    return pipeline.build_run(images, _work(given),
                              preset=given.get("preset", DEFAULT_PRESET), seed=given.get("seed", DEFAULT_SEED),
                              data=given.stage("data"), extract=given.stage("extract"), quiet=bool(given.quiet),
                              wait=not given.get("no_wait"), cluster=given.stage("cluster"))


def _configs(run, given: Given) -> dict[str, Any]:
    """The score, distill and select configs of a run: preset overlay, then the user's values;
    with --budget the iteration counts are measured and chosen."""
    from medsclean import pipeline
    from medsclean.values import parse_duration

    select = run.select_config(**given.stage("select"))
    cfgs = {"score": run.score_config(**given.stage("score")), "distill": run.distill_config(**given.stage("distill")),
            "select": select, "cut": run.cut_config(**given.stage("cut"))}
    if given.get("budget") is not None and select.method == "meds":
        cfgs["distill"], cfgs["select"] = pipeline.apply_budget(run, cfgs["distill"], select,
                                                                parse_duration(given.budget))
    return cfgs


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

@command("extract", IMAGES)
def extract(given: Given) -> None:
    """Run the frozen backbone over the images and cache their features."""
    from medsclean import pipeline

    run = _run(given, given.images)
    result = pipeline.extract_stage(run, force=bool(given.force))
    _emit("extract", pipeline.extract_summary(result), given.as_json, str(result.artifact.path))


@command("score", IMAGES)
def score(given: Given) -> None:
    """Step 1: score every patch against an ensemble of random memories (higher = more anomalous)."""
    from medsclean import pipeline

    run = _run(given, given.images)
    results = pipeline.score_stage(run, run.score_config(**given.stage("score")), force=bool(given.force))
    art = results["scores"].artifact
    _emit("score", {"stage": "scores", "csv": str(art.file("scores.csv")), "engine": art.manifest["engine"],
                    "stages": pipeline.stage_times(results)}, given.as_json, str(art.file("scores.csv")))


@command("distill", IMAGES)
def distill(given: Given) -> None:
    """Step 2: distil the memory scores into a reconstruction model trained on stored features."""
    from medsclean import pipeline

    run = _run(given, given.images)
    results = pipeline.distill_stage(run, run.score_config(**given.stage("score")),
                                     run.distill_config(**given.stage("distill")), force=bool(given.force))
    art = results["distill"].artifact
    _emit("distill", {"stage": "distill", "model": str(art.file("model.safetensors")),
                      "final_loss": art.manifest["final_loss"], "stages": pipeline.stage_times(results)},
          given.as_json, str(art.file("model.safetensors")))


@command("select", IMAGES)
def select(given: Given) -> None:
    """Step 3: select the clean images (running any missing stage first) and write the clean list."""
    from medsclean import pipeline

    run = _run(given, given.images)
    cfgs = _configs(run, given)
    results = pipeline.select_stage(run, cfgs["score"], cfgs["distill"], cfgs["select"], cfgs["cut"],
                                    force=bool(given.force))
    to_stdout, rejected_to_stdout = _is_stdout(given.out), _is_stdout(given.rejected_out)
    summary = pipeline.select_summary(run, results, given.images, None if to_stdout else given.out,
                                      None if rejected_to_stdout else given.rejected_out)
    summary["review"] = str(pipeline.select_review(run, results, given.get("report")))
    run.reporter.info(f"review: {summary['review']}")
    if given.get("export") is not None:
        exported = pipeline.select_export(run, results, given.images, given.export, copy=bool(given.copy))
        summary["export"] = str(Path(given.export).expanduser().resolve())
        run.reporter.info(f"export: {exported['kept']} kept and {exported['rejected']} rejected images in "
                          f"{summary['export']} ({'copies' if given.copy else 'symlinks'})")
    for listed, kept, field in ((to_stdout, True, "clean_list"), (rejected_to_stdout, False, "rejected_list")):
        if listed:
            typer.echo(pipeline.user_list(given.images, results, kept=kept), nl=False)
            summary[field] = "-"
    if given.as_json:
        _emit("select", summary, True, "")
    else:
        pipeline.print_select_table(summary, stderr=to_stdout or rejected_to_stdout)


RUN_STAGES = ("data", "extract", "score", "distill", "select", "cut")


def _stage_options_given(given: Given) -> list[str]:
    """Flags of the data/encoder/stage options set on the command line (the device aside)."""
    names = [o for o in opts.ALL_OPTS if o.target[0] in RUN_STAGES and o.name != "device"]
    return [o.flag for o in names if given.get(o.name) is not None]


@command("eval", IMAGES)
def evaluate(given: Given) -> None:
    """Measure the detector on the labelled test split and the cleaning on known contaminants.

    Evaluates the latest run of IMAGES (or --run KEY) with the options it was made with; with
    stage options and no --run, runs or reuses the stages those options describe."""
    from medsclean import pipeline

    places = given.stage("eval")
    chosen = _stage_options_given(given)
    if given.get("run") is not None and chosen:
        raise ConfigError(("run",), f"run evaluates a recorded run with its own options; drop {', '.join(chosen)}",
                          stage="eval")
    recorded = None
    if not chosen:
        recorded = pipeline.recorded_run(given.get("run"), given.images, _work(given), device=given.get("device"),
                                         quiet=bool(given.quiet))
    if recorded is not None:
        run, results = recorded
        cfgs = {"score": None, "distill": None, "select": None, "cut": None}
    else:
        run, results = _run(given, given.images), None
        cfgs = _configs(run, given)
    payload = pipeline.eval_stage(
        run, cfgs["score"], cfgs["distill"], cfgs["select"], cfgs["cut"], run.eval_config(**_fields_of("eval", places)),
        out_dir=places.get("metrics_dir", run.work / "eval"), report_dir=given.get("report"),
        test_dir=places.get("test_dir"), test_masks=places.get("test_masks"), results=results)
    _emit_metrics("eval", payload, given.as_json)


def _work(given: Given) -> Path:
    return Path(given.get("work", opts.BY_NAME["work"].default))


@command("runs")
def runs(given: Given) -> None:
    """List the runs kept in the work folder (dataset, method, cut, date, size) or remove some."""
    from medsclean.workdir.runs import list_runs, remove_runs
    from medsclean.workdir.store import Store

    store = Store(_work(given))
    if given.get("remove"):
        result = remove_runs(store, list(given.remove))
        typer.echo(f"removed {len(result['removed'])} run(s), {result['bytes'] / 1e6:.1f} MB freed", err=True)
        _emit("runs", result, given.as_json, "\n".join(result["removed"]))
        return
    rows = list_runs(store)
    text = "\n".join(f"{r['run']}  {'*' if r['latest'] else ' '} {r['created']}  {r['method']:<9} "
                     f"{str(r['cut']):<12} {r['bytes'] / 1e6:8.1f} MB  {r['images']}" for r in rows)
    _emit("runs", {"work": str(store.work), "runs": rows}, given.as_json,
          text or f"no runs in {store.work}")


@command("demo")
def demo(given: Given) -> None:
    """Generate a contaminated demo dataset from real images, clean it with MeDS, and evaluate."""
    from dataclasses import replace

    from medsclean import pipeline
    from medsclean.config import DemoConfig
    from medsclean.demo.prepare import prepare_demo_data
    from medsclean.ui import RichReporter

    cfg = replace(DemoConfig(**given.stage("demo")), seed=given.get("seed", DemoConfig.seed),
                  **({"noise_ratio": given.noise_ratio} if given.get("noise_ratio") is not None else {}))
    work = Path(given.get("work", opts.BY_NAME["work"].default)).resolve()
    noisy = prepare_demo_data(work, cfg, RichReporter(quiet=bool(given.quiet)))
    run = _run(given, noisy)
    cfgs = _configs(run, given)
    payload = pipeline.eval_stage(run, cfgs["score"], cfgs["distill"], cfgs["select"], cfgs["cut"], run.eval_config(),
                                  out_dir=run.work / "demo" / "eval", report_dir=run.work / "demo" / "report")
    _emit_metrics("demo", payload, given.as_json)


MAKE_NOISY_ARGS = (argument("root", "MVTec-layout dataset root (never modified).", "ROOT"),
                   argument("out", "Folder to create with the contaminated dataset.", "OUT"))


@command("make-noisy", *MAKE_NOISY_ARGS)
def make_noisy(given: Given) -> None:
    """Build a contaminated training set: inject anomalous test images into train (MeDS/SoftPatch protocol)."""
    from medsclean.config import NoiseConfig
    from medsclean.demo.noisy import make_noisy as build

    cfg = NoiseConfig(**given.stage("noise"))
    seed = given.get("seed", DEFAULT_SEED)
    manifest = build(given.root, given.out, ratio=cfg.ratio, seed=seed, overlap=cfg.overlap, copy=bool(given.copy))
    out = str(Path(given.out).resolve())
    summary = {"out": out, "ratio": cfg.ratio, "seed": seed, "overlap": cfg.overlap,
               "true_fraction": manifest["true_fraction"],
               "classes": {c: {k: v[k] for k in ("n_good", "n_injected", "true_fraction")}
                           for c, v in manifest["classes"].items()}}
    lines = [f"{c}: {v['n_injected']} injected into {v['n_good']} good (true fraction {v['true_fraction']:.3f})"
             for c, v in manifest["classes"].items()]
    typer.echo(f"injected {len(manifest['injected'])} images, true contamination {manifest['true_fraction']:.3f}",
               err=True)
    _emit("make-noisy", summary, given.as_json, "\n".join([out, *lines]))


def _fields_of(stage: str, values: dict) -> dict:
    from dataclasses import fields

    from medsclean.config import STAGE_CONFIGS

    known = {f.name for f in fields(STAGE_CONFIGS[stage])}
    return {k: v for k, v in values.items() if k in known}


def _emit_metrics(name: str, payload: dict, as_json: bool | None) -> None:
    from medsclean import pipeline

    if as_json:
        _emit(name, payload, True, "")
    else:
        pipeline.print_metrics_tables(payload)


if __name__ == "__main__":  # pragma: no cover
    main()
