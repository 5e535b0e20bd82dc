"""The `medsclean` command line: parse options, build a frozen config, call one library function.

Exit codes: 0 success, 1 runtime or data error, 2 usage error. stdout carries only results
(paths, tables, JSON); progress and logs go to stderr. torch is imported inside commands so
that `medsclean --help` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import MedscleanError

app = typer.Typer(
    name="medsclean",
    help="Find the defective images hidden in an anomaly-detection training set (MeDS).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

ImagesArg = Annotated[Path, typer.Argument(help="Image folder or MVTec-layout dataset root.", show_default=False,
                                          metavar="IMAGES")]
WorkOpt = Annotated[Path, typer.Option("--work", help="Work folder for cached stages (never inside the images).")]
BackboneOpt = Annotated[Optional[str], typer.Option("--backbone", help="timm model name [default: from the preset].")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="Local .safetensors/.pth backbone weights, loaded strictly.")]
RandomInitOpt = Annotated[bool, typer.Option("--random-init", help="Random backbone weights (plumbing tests only).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for every random choice.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Recompute this stage even if a valid cache exists.")]
LayoutOpt = Annotated[str, typer.Option("--layout", help="auto, folder or mvtec.")]
MasksOpt = Annotated[Optional[Path], typer.Option("--masks", help="Folder of masks paired with images by file stem.")]
ClassFromOpt = Annotated[str, typer.Option("--class-from", help="Class of plain-folder images: top, parent or none.")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Fail on an unreadable image instead of skipping it.")]
PresetOpt = Annotated[str, typer.Option("--preset", help="auto (paper on GPU, cpu otherwise), cpu or paper.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Images per encoder batch.")]
WorkersOpt = Annotated[int, typer.Option("--num-workers", help="Image-decoding worker processes.")]
ResizeOpt = Annotated[Optional[int], typer.Option("--resize", help="Square resize before the crop [default: preset].")]
CropOpt = Annotated[Optional[int], typer.Option("--crop", help="Centre-crop side [default: preset].")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")]

BanksOpt = Annotated[int, typer.Option("--banks", help="Number of random memories B.")]
RatioOpt = Annotated[float, typer.Option("--ratio", help="Share of a class's images in each memory (rho).")]
ReplaceOpt = Annotated[bool, typer.Option("--with-replacement/--without-replacement",
                                          help="Draw memory images with replacement (paper) or without.")]
PerClassOpt = Annotated[bool, typer.Option("--per-class/--all-classes", help="Memories per class or across all.")]
IncludeSelfOpt = Annotated[bool, typer.Option("--include-self",
                                              help="Match an image against its own patches (reference code).")]
EngineOpt = Annotated[str, typer.Option("--engine", help="auto, exact, faiss, or ivf (approximate).")]
AggregateOpt = Annotated[str, typer.Option("--aggregate", help="Image score: top1pct (mean of top 1%) or max.")]
MinBankOpt = Annotated[Optional[int], typer.Option(
    "--min-bank", help="Floor on the images per memory, for small classes [default: preset].")]
DistillItersOpt = Annotated[Optional[int], typer.Option("--distill-iters", help="Step-2 iterations [default: preset].")]
LossOpt = Annotated[str, typer.Option("--loss", help="Step-2 loss: mse or l1 (times 10).")]
WidthOpt = Annotated[Optional[int], typer.Option("--width", help="Decoder width [default: preset].")]
DepthOpt = Annotated[Optional[int], typer.Option("--depth", help="Decoder blocks [default: preset].")]
HeadsOpt = Annotated[Optional[int], typer.Option("--heads", help="Decoder heads for CNN backbones [default: preset].")]

DEFAULT_WORK = Path("medsclean-work")


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"medsclean {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
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
    """Console-script entry point."""
    limit_openmp_spinning()
    try:
        app(standalone_mode=True)
    except KeyboardInterrupt:
        typer.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(130)


def _fail(exc: MedscleanError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code=exc.exit_code)


def _emit(payload: dict, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str) if as_json else text)


@app.command()
def extract(
    images: ImagesArg,
    work: WorkOpt = DEFAULT_WORK,
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    preset: PresetOpt = "auto",
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    batch_size: BatchOpt = None,
    num_workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    layout: LayoutOpt = "auto",
    split: Annotated[str, typer.Option(help="MVTec split to read: train or test.")] = "train",
    masks: MasksOpt = None,
    class_from: ClassFromOpt = "top",
    strict: StrictOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the frozen backbone over the images and cache their features."""
    from . import pipeline

    try:
        run = pipeline.build_run(images=images, work=work, backbone=backbone, weights=weights,
                                 random_init=random_init, preset=preset, resize=resize, crop=crop,
                                 batch_size=batch_size, num_workers=num_workers, device=device, seed=seed,
                                 layout=layout, split=split, masks=masks, class_from=class_from,
                                 strict=strict, quiet=quiet)
        result = pipeline.extract_stage(run, force=force)
    except MedscleanError as exc:
        raise _fail(exc) from None
    summary = pipeline.extract_summary(result)
    _emit(summary, as_json, str(result.artifact.path))


def _run(images, work, backbone, weights, random_init, preset, device, seed, quiet, batch_size=None, num_workers=2,
         layout="auto", masks=None, class_from="top", strict=False, split="train", resize=None, crop=None):
    from . import pipeline

    return pipeline.build_run(images=images, work=work, backbone=backbone, weights=weights, random_init=random_init,
                              preset=preset, resize=resize, crop=crop, batch_size=batch_size, num_workers=num_workers, device=device,
                              seed=seed, layout=layout, split=split, masks=masks, class_from=class_from,
                              strict=strict, quiet=quiet)


def _score_cfg(run, banks, ratio, k, replace, per_class, include_self, engine, aggregate, seed, min_bank=None):
    return run.preset.score_config(banks=banks, ratio=ratio, k=k, replace=replace, per_class=per_class,
                                   include_self=include_self, engine=engine, aggregate=aggregate, seed=seed,
                                   min_bank=min_bank)


def _distill_cfg(run, iters, loss, width, depth, heads):
    return run.preset.distill_config(iters=iters, loss=loss, width=width, depth=depth, heads=heads)


@app.command()
def score(
    images: ImagesArg,
    work: WorkOpt = DEFAULT_WORK,
    banks: BanksOpt = 100,
    ratio: RatioOpt = 0.1,
    k: Annotated[int, typer.Option("--k", help="Nearest neighbours averaged per patch.")] = 1,
    replace: ReplaceOpt = True,
    per_class: PerClassOpt = True,
    include_self: IncludeSelfOpt = False,
    engine: EngineOpt = "auto",
    aggregate: AggregateOpt = "top1pct",
    min_bank: MinBankOpt = None,
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    preset: PresetOpt = "auto",
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    batch_size: BatchOpt = None,
    num_workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    layout: LayoutOpt = "auto",
    masks: MasksOpt = None,
    class_from: ClassFromOpt = "top",
    strict: StrictOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Step 1: score every patch against an ensemble of random memories (higher = more anomalous)."""
    from . import pipeline

    try:
        run = _run(images, work, backbone, weights, random_init, preset, device, seed, quiet, batch_size,
                   num_workers, layout, masks, class_from, strict, resize=resize, crop=crop)
        results = pipeline.score_stage(run, _score_cfg(run, banks, ratio, k, replace, per_class, include_self, engine,
                                                       aggregate, seed, min_bank), force=force)
    except MedscleanError as exc:
        raise _fail(exc) from None
    art = results["scores"].artifact
    _emit({"stage": "scores", "csv": str(art.file("scores.csv")), "engine": art.manifest["engine"],
           "stages": pipeline.stage_times(results)}, as_json, str(art.file("scores.csv")))


@app.command()
def distill(
    images: ImagesArg,
    work: WorkOpt = DEFAULT_WORK,
    iters: Annotated[Optional[int], typer.Option("--iters", help="Iterations [default: preset].")] = None,
    loss: LossOpt = "mse",
    width: WidthOpt = None,
    depth: DepthOpt = None,
    heads: HeadsOpt = None,
    banks: BanksOpt = 100,
    ratio: RatioOpt = 0.1,
    knn: Annotated[int, typer.Option("--knn", help="Step-1 nearest neighbours per patch.")] = 1,
    replace: ReplaceOpt = True,
    per_class: PerClassOpt = True,
    include_self: IncludeSelfOpt = False,
    engine: EngineOpt = "auto",
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    preset: PresetOpt = "auto",
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    batch_size: BatchOpt = None,
    num_workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    layout: LayoutOpt = "auto",
    masks: MasksOpt = None,
    class_from: ClassFromOpt = "top",
    strict: StrictOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Step 2: distil the memory scores into a reconstruction model trained on stored features."""
    from . import pipeline

    try:
        run = _run(images, work, backbone, weights, random_init, preset, device, seed, quiet, batch_size,
                   num_workers, layout, masks, class_from, strict, resize=resize, crop=crop)
        results = pipeline.distill_stage(
            run, _score_cfg(run, banks, ratio, knn, replace, per_class, include_self, engine, "top1pct", seed),
            _distill_cfg(run, iters, loss, width, depth, heads), force=force)
    except MedscleanError as exc:
        raise _fail(exc) from None
    art = results["distill"].artifact
    _emit({"stage": "distill", "model": str(art.file("model.safetensors")), "final_loss": art.manifest["final_loss"],
           "stages": pipeline.stage_times(results)}, as_json, str(art.file("model.safetensors")))


@app.command()
def select(
    images: ImagesArg,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the clean list here (one path per line).")] = None,
    work: WorkOpt = DEFAULT_WORK,
    method: Annotated[str, typer.Option("--method", help="meds (Steps 1-3), memory (Step-1 ensemble only), knn "
                                        "(full-bank nearest neighbour) or iterative (kNN with a shrinking memory).")] = "meds",
    k: Annotated[float, typer.Option("--k", help="Threshold margin in median absolute deviations at t = T.")] = 3.0,
    cut: Annotated[Optional[str], typer.Option("--cut", help="Final cut on the scores per class: mixture (two-component "
                                               "fit, MAD fallback), mad (median + k MAD) or otsu [default: preset].")] = None,
    reject_fraction: Annotated[Optional[float], typer.Option(
        "--reject-fraction", help="Reject exactly this share of each class (the most suspicious), instead of --cut.")] = None,
    min_bank: MinBankOpt = None,
    iters: Annotated[Optional[int], typer.Option("--iters", help="Step-3 iterations T [default: preset].")] = None,
    distill_iters: DistillItersOpt = None,
    budget: Annotated[Optional[str], typer.Option(
        "--budget", help="Wall-clock time for Steps 2-3 training (e.g. 90s, 10m, 1h): the iteration counts "
                         "are chosen from a measured step time and printed.")] = None,
    loss: LossOpt = "mse",
    width: WidthOpt = None,
    depth: DepthOpt = None,
    heads: HeadsOpt = None,
    banks: BanksOpt = 100,
    ratio: RatioOpt = 0.1,
    knn: Annotated[int, typer.Option("--knn", help="Step-1 nearest neighbours per patch.")] = 1,
    replace: ReplaceOpt = True,
    per_class: PerClassOpt = True,
    include_self: IncludeSelfOpt = False,
    engine: EngineOpt = "auto",
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    preset: PresetOpt = "auto",
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    batch_size: BatchOpt = None,
    num_workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    layout: LayoutOpt = "auto",
    masks: MasksOpt = None,
    class_from: ClassFromOpt = "top",
    strict: StrictOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Step 3: select the clean images (running any missing stage first) and write the clean list."""
    from . import pipeline

    try:
        run = _run(images, work, backbone, weights, random_init, preset, device, seed, quiet, batch_size,
                   num_workers, layout, masks, class_from, strict, resize=resize, crop=crop)
        select_cfg = run.preset.select_config(method=method, iters=iters, k=k, cut=cut,
                                              reject_fraction=reject_fraction)
        distill_cfg = _distill_cfg(run, distill_iters, loss, width, depth, heads)
        if budget is not None:
            from .config import parse_duration
            from .errors import UsageError

            if iters is not None or distill_iters is not None:
                raise UsageError("--budget chooses the iteration counts: drop --iters/--distill-iters or --budget")
            seconds = parse_duration(budget)
            if method == "meds":
                distill_cfg, select_cfg = pipeline.apply_budget(run, distill_cfg, select_cfg, seconds)
        results = pipeline.select_stage(
            run, _score_cfg(run, banks, ratio, knn, replace, per_class, include_self, engine, "top1pct", seed,
                            min_bank), distill_cfg, select_cfg, force=force)
        summary = pipeline.select_summary(run, results, images, out)
    except MedscleanError as exc:
        raise _fail(exc) from None
    if as_json:
        _emit(summary, True, "")
    else:
        pipeline.print_select_table(summary)


@app.command("eval")
def evaluate(
    images: ImagesArg,
    work: WorkOpt = DEFAULT_WORK,
    model: Annotated[str, typer.Option("--model", help="select (fine-tuned), distill, or memory (ensemble).")] = "select",
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for metrics.json and metrics.csv "
                                                "[default: WORK/eval].")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write PNG overlays and report.html here.")] = None,
    report_top: Annotated[int, typer.Option("--report-top", help="Most suspicious images pictured.")] = 24,
    test: Annotated[Optional[Path], typer.Option("--test", help="Folder of labelled test images (default: "
                                                 "the MVTec root's test split).")] = None,
    test_masks: Annotated[Optional[Path], typer.Option("--test-masks", help="Masks of the --test images, "
                                                       "paired by file stem.")] = None,
    size: Annotated[int, typer.Option("--size", help="Side of the evaluation maps.")] = 256,
    sigma: Annotated[float, typer.Option("--sigma", help="Gaussian blur sigma (0 = none).")] = 4.0,
    kernel: Annotated[int, typer.Option("--kernel", help="Gaussian blur support (odd).")] = 5,
    top_ratio: Annotated[float, typer.Option("--top-ratio", help="Image score: mean of this top share "
                                             "of pixels (0 = max).")] = 0.01,
    mask_threshold: Annotated[float, typer.Option("--mask-threshold", help="GT binarisation: mask > this "
                                                  "(0 reproduces the reference's > 0).")] = 0.5,
    fpr_limit: Annotated[float, typer.Option("--fpr-limit", help="AUPRO integration limit.")] = 0.3,
    method: Annotated[str, typer.Option("--method", help="Selection method when select must run: meds, "
                                        "memory, knn or iterative.")] = "meds",
    k: Annotated[float, typer.Option("--k", help="Selection threshold margin in MADs.")] = 3.0,
    iters: Annotated[Optional[int], typer.Option("--iters", help="Step-3 iterations [default: preset].")] = None,
    distill_iters: DistillItersOpt = None,
    width: WidthOpt = None,
    depth: DepthOpt = None,
    heads: HeadsOpt = None,
    banks: BanksOpt = 100,
    ratio: RatioOpt = 0.1,
    engine: EngineOpt = "auto",
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    preset: PresetOpt = "auto",
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    batch_size: BatchOpt = None,
    num_workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    strict: StrictOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure the detector on the labelled test split and the cleaning on known contaminants."""
    from . import pipeline
    from .evaluate import EvalConfig

    try:
        run = _run(images, work, backbone, weights, random_init, preset, device, seed, quiet, batch_size,
                   num_workers, "auto", None, "top", strict, resize=resize, crop=crop)
        eval_cfg = EvalConfig(model=model, size=size, sigma=sigma, kernel=kernel, top_ratio=top_ratio,
                              mask_threshold=mask_threshold, fpr_limit=fpr_limit)
        select_cfg = run.preset.select_config(method=method, iters=iters, k=k)
        payload = pipeline.eval_stage(
            run, _score_cfg(run, banks, ratio, 1, True, True, False, engine, "top1pct", seed),
            _distill_cfg(run, distill_iters, "mse", width, depth, heads), select_cfg, eval_cfg,
            out_dir=out or run.work / "eval", report_dir=report, report_top=report_top, test_dir=test,
            test_masks=test_masks)
    except MedscleanError as exc:
        raise _fail(exc) from None
    if as_json:
        _emit(payload, True, "")
    else:
        pipeline.print_metrics_tables(payload)

@app.command()
def demo(
    work: WorkOpt = DEFAULT_WORK,
    ratio: Annotated[float, typer.Option("--ratio", help="Contamination ratio r of the demo training set.")] = 0.2,
    n_train: Annotated[int, typer.Option("--n-train", help="Good training images per category.")] = 40,
    n_test_good: Annotated[int, typer.Option("--n-test-good", help="Good test images per category.")] = 10,
    n_test_defect: Annotated[int, typer.Option("--n-test-defect", help="Defective test images per category.")] = 18,
    size: Annotated[int, typer.Option("--size", help="Side of the generated images.")] = 256,
    iters: Annotated[Optional[int], typer.Option("--iters", help="Step-3 iterations [default: preset].")] = None,
    distill_iters: DistillItersOpt = None,
    preset: PresetOpt = "auto",
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate a contaminated demo dataset from real images, clean it with MeDS, and evaluate."""
    from . import pipeline
    from .demo import DemoConfig, prepare_demo_data
    from .evaluate import EvalConfig

    try:
        from .ui import RichReporter

        cfg = DemoConfig(n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect, size=size,
                         noise_ratio=ratio, seed=seed)
        noisy = prepare_demo_data(Path(work).resolve(), cfg, RichReporter(quiet=quiet))
        run = _run(noisy, work, None, None, False, preset, device, seed, quiet)
        report = run.work / "demo" / "report"
        payload = pipeline.eval_stage(
            run, _score_cfg(run, 100, 0.1, 1, True, True, False, "auto", "top1pct", seed),
            _distill_cfg(run, distill_iters, "mse", None, None, None),
            run.preset.select_config(iters=iters),
            EvalConfig(), out_dir=run.work / "demo" / "eval", report_dir=report)
    except MedscleanError as exc:
        raise _fail(exc) from None
    if as_json:
        _emit(payload, True, "")
    else:
        pipeline.print_metrics_tables(payload)

@app.command("make-noisy")
def make_noisy(
    root: Annotated[Path, typer.Argument(help="MVTec-layout dataset root (never modified).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Folder to create with the contaminated dataset.",
                                      show_default=False)],
    ratio: Annotated[float, typer.Option("--ratio", help="Noise ratio r relative to the good training images.")] = 0.1,
    seed: SeedOpt = 0,
    overlap: Annotated[bool, typer.Option("--overlap/--no-overlap",
                                          help="Keep injected images in the test set (MeDS) or remove them "
                                               "(SoftPatch).")] = True,
    copy: Annotated[bool, typer.Option("--copy", help="Copy files instead of symlinking them.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build a contaminated training set: inject anomalous test images into train (MeDS/SoftPatch protocol)."""
    from .noisy import make_noisy as build

    try:
        manifest = build(root, out, ratio=ratio, seed=seed, overlap=overlap, copy=copy)
    except MedscleanError as exc:
        raise _fail(exc) from None
    summary = {"out": str(Path(out).resolve()), "ratio": ratio, "seed": seed, "overlap": overlap,
               "true_fraction": manifest["true_fraction"],
               "classes": {c: {k: v[k] for k in ("n_good", "n_injected", "true_fraction")}
                           for c, v in manifest["classes"].items()}}
    lines = [f"{c}: {v['n_injected']} injected into {v['n_good']} good (true fraction {v['true_fraction']:.3f})"
             for c, v in manifest["classes"].items()]
    typer.echo(f"injected {len(manifest['injected'])} images, true contamination {manifest['true_fraction']:.3f}",
               err=True)
    _emit(summary, as_json, "\n".join([str(Path(out).resolve()), *lines]) if not as_json else "")


if __name__ == "__main__":  # pragma: no cover
    main()
