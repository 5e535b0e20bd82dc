"""The `medsclean` command line: parse options, call one function of the Python API, print.

Exit codes: 0 success, 1 runtime or data error, 2 usage error, 130 interrupted. stdout carries
only results (paths, tables, JSON); progress and logs go to stderr. Options are declared once in
`medsclean.options` (the API takes the same names); torch is imported inside the API's functions,
so that `--help` and choice errors stay fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from medsclean import api
from medsclean.api import checks
from medsclean.cli.options import argument, build_command
from medsclean.cli.output import emit, emit_metrics, print_select_table, runs_table
from medsclean.errors import ConfigError, MedscleanError
from medsclean.options import CLI_ONLY, Given, flag_for

app = typer.Typer(
    name="medsclean",
    help="Find the defective images hidden in an anomaly-detection training set (MeDS).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

IMAGES = argument("images", "Image folder or MVTec-layout dataset root.", "IMAGES", typed=True)


def _version(value: bool) -> None:
    if value:
        from medsclean.version import __version__

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
# The edge: stdout conflicts, domain errors to exit codes, Ctrl-C
# ---------------------------------------------------------------------------------------------

def _error_line(exc: MedscleanError) -> str:
    """One line; a ConfigError's parameter names (library fields or API options) become the flags."""
    if not isinstance(exc, ConfigError):
        return f"error: {exc}"
    return f"error: {exc.naming([flag_for(p, exc.stage) for p in exc.params])}"


def _refuse_two_stdout_writers(given: Given) -> None:
    """`--out -`, `--rejected -` and `--json` all write to stdout: only one of them may."""
    on_stdout = [name for name in ("out", "rejected_out") if _is_stdout(given.get(name))]
    if on_stdout and given.get("as_json"):
        raise ConfigError((on_stdout[0], "json"), f"{on_stdout[0]} {given.get(on_stdout[0])} and json both write to "
                          f"stdout; pass only one")
    if len(on_stdout) == 2:
        raise ConfigError(("out", "rejected_out"), "out and rejected_out both write to stdout; pass only one")


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


def _interrupted(work: Path | None) -> str:
    """What an interrupted run leaves behind and how to go on, naming only what is there: finished
    stages, training checkpoints, encoded images of the image cache."""
    from medsclean.stages.common import CHECKPOINT
    from medsclean.workdir.image_cache import IMAGE_CACHE

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
        _refuse_two_stdout_writers(given)
        body(given)
    except MedscleanError as exc:
        typer.echo(_error_line(exc), err=True)
        raise typer.Exit(code=exc.exit_code) from None
    except OSError as exc:  # the disk or the system refused: one line, no traceback
        from medsclean.errors import write_error

        typer.echo(f"error: {write_error(exc.filename, exc) if exc.filename else exc.strerror or exc}", err=True)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        typer.echo(_interrupted(given.work_folder().resolve()), err=True)
        raise typer.Exit(code=130) from None
    finally:
        checks.release()  # what `runs` and `make-noisy` hold; the API's calls release their own


def command(name: str, *arguments):
    """Register a command body under `name` with the option groups `options.COMMANDS[name]`, behind `_execute`."""
    def register(body):
        def wrapped(given: Given) -> None:
            _execute(body, given)

        wrapped.__doc__, wrapped.__name__ = body.__doc__, body.__name__
        build_command(app, name, wrapped, arguments)
        return body

    return register


def _keywords(given: Given, **overrides: Any) -> dict[str, Any]:
    """The API call of a command: the options set on the command line (the CLI's own left out) as
    keywords, `progress` from --quiet, and `overrides` on top."""
    values = {k: v for k, v in given.values_set().items() if k not in (*CLI_ONLY, "images")}
    return {**values, "progress": not given.get("quiet"), **overrides}


# ---------------------------------------------------------------------------------------------
# Commands: each one API call, then what it prints
# ---------------------------------------------------------------------------------------------

@command("extract", IMAGES)
def extract(given: Given) -> None:
    """Run the frozen backbone over the images and cache their features."""
    result = api.extract(given.images, **_keywords(given))
    emit("extract", result.summary, given.as_json, str(result.file))


@command("score", IMAGES)
def score(given: Given) -> None:
    """Step 1: score every patch against an ensemble of random memories (higher = more anomalous)."""
    result = api.score(given.images, **_keywords(given))
    emit("score", result.summary, given.as_json, str(result.file))


@command("distill", IMAGES)
def distill(given: Given) -> None:
    """Step 2: distil the memory scores into a reconstruction model trained on stored features."""
    result = api.distill(given.images, **_keywords(given))
    emit("distill", result.summary, given.as_json, str(result.file))


@command("select", IMAGES)
def select(given: Given) -> None:
    """Step 3: select the clean images (running any missing stage first) and write the clean list."""
    _selection_command(given, api.select, "select")


@command("cut", IMAGES)
def cut(given: Given) -> None:
    """Re-cut the latest run of IMAGES (or --run KEY) with a new cut and corrections, never training:
    rewrites the lists, the review page and the export as select does, in seconds.

    Cut options not given take their defaults, as in select: `cut IMAGES --reject-fraction 0.1` gives
    the lists of `select IMAGES --reject-fraction 0.1` with the run's other options."""
    _selection_command(given, api.cut, "cut")


def _selection_command(given: Given, function, name: str) -> None:
    """`select` or `cut`: the API call with the lists that go to stdout printed here, then the table
    (or the JSON summary)."""
    to_stdout, rejected_to_stdout = _is_stdout(given.out), _is_stdout(given.rejected_out)
    selection = function(given.images, **_keywords(given, out=None if to_stdout else given.out,
                                                    rejected_out=None if rejected_to_stdout else given.rejected_out))
    summary = selection.summary
    for listed, paths, field in ((to_stdout, selection.kept, "clean_list"),
                                 (rejected_to_stdout, selection.rejected, "rejected_list")):
        if listed:
            typer.echo("".join(f"{p}\n" for p in paths), nl=False)
            summary[field] = "-"
    if given.as_json:
        emit(name, summary, True, "")
    else:
        print_select_table(summary, stderr=to_stdout or rejected_to_stdout, command=name)


@command("eval", IMAGES)
def evaluate(given: Given) -> None:
    """Measure the detector on the labelled test split and the cleaning on known contaminants.

    Evaluates the latest run of IMAGES (or --run KEY) with the options it was made with; with
    stage options and no --run, runs or reuses the stages those options describe."""
    evaluation = api.evaluate(given.images, **_keywords(given))
    emit_metrics("eval", evaluation.summary, given.as_json)


@command("demo")
def demo(given: Given) -> None:
    """Generate a contaminated demo dataset from real images, clean it with MeDS, and evaluate."""
    evaluation = api.run_demo(**_keywords(given))
    emit_metrics("demo", evaluation.summary, given.as_json)


@command("runs")
def runs(given: Given) -> None:
    """List the runs kept in the work folder (key, date, method, cut, kept and rejected, size, images) or remove some."""
    from medsclean.workdir.runs import list_runs, remove_runs
    from medsclean.workdir.store import Store

    checks.check_paths(given)
    store = Store(given.work_folder())
    if given.get("remove"):
        result = remove_runs(store, list(given.remove), prefix=bool(given.get("yes")))
        typer.echo(f"removed {len(result['removed'])} run(s), {result['bytes'] / 1e6:.1f} MB freed", err=True)
        emit("runs", result, given.as_json, "\n".join(result["removed"]))
        return
    rows = list_runs(store)
    emit("runs", {"work": str(store.work), "runs": rows}, given.as_json,
         runs_table(rows) if rows else f"no runs in {store.work}")


MAKE_NOISY_ARGS = (argument("root", "MVTec-layout dataset root (never modified).", "ROOT"),
                   argument("out", "Folder to create with the contaminated dataset.", "OUT"))


@command("make-noisy", *MAKE_NOISY_ARGS)
def make_noisy(given: Given) -> None:
    """Build a contaminated training set: inject anomalous test images into train (MeDS/SoftPatch protocol)."""
    from medsclean.config import NoiseConfig
    from medsclean.demo.noisy import make_noisy as build
    from medsclean.presets import DEFAULT_SEED

    checks.validate(given)
    checks.check_paths(given)
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
    emit("make-noisy", summary, given.as_json, "\n".join([out, *lines]))


if __name__ == "__main__":  # pragma: no cover
    main()
