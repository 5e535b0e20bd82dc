"""What `select` hands the user besides its artifacts: the lists, the summary, the review page, the export.

The lists name images in the user path convention (`user_paths`: the image folder as typed, joined
with each image's path inside it); `select_summary` writes them and counts the cut per class;
`select_review` writes the review page (`pages.review`); `select_export` the MVTec-layout tree of
kept and rejected images (`workdir.export`). `run` is the `pipeline.Run` the stages ran with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from medsclean.stages.common import stage_times
from medsclean.workdir.atomic import write_text_through, writes_through

if TYPE_CHECKING:
    from medsclean.pipeline import Run


def user_paths(images_arg: str | os.PathLike, rows: list[dict]) -> list[str]:
    """The paths users get in every list: the image folder as they typed it joined with each image's
    path inside it, exactly as `find IMAGES -type f` prints them (`./images` gives `./images/a.png`,
    `images/` gives `images/a.png`, an absolute folder absolute paths). A `Path` argument has already
    lost a leading `./`; pass the string the user typed to keep it."""
    typed = os.fspath(images_arg)
    prefix = typed if typed.endswith("/") else typed + "/"
    return [prefix + row["path"] for row in rows]


def kept_flags(results: dict) -> list[bool]:
    """One flag per image of the run's cut, in its manifest's order: True for a kept image."""
    return results["cut"].artifact.tensors("selection.safetensors", ["keep"])["keep"].bool().tolist()


def user_list(images_arg: str | os.PathLike, results: dict, *, kept: bool) -> str:
    """The kept (or rejected) images of the run's cut, one user path per line."""
    paths = user_paths(images_arg, results["cut"].artifact.manifest["images"])
    return "".join(f"{p}\n" for p, k in zip(paths, kept_flags(results)) if k == kept)


def select_summary(run: Run, results: dict, images_arg: str | os.PathLike, out: Path | None,
                   rejected_out: Path | None = None) -> dict:
    """Per-class counts, stage times and output paths; writes the clean list to `out` and the
    rejected list to `rejected_out` (`store.write_text_through`: a file atomically, a device, FIFO
    or descriptor in place; `-` for stdout is the CLI's business)."""
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
    if path is None:
        return None
    path = Path(path).expanduser()
    return str(path.absolute() if writes_through(path) else path.resolve())


def select_review(run: Run, results: dict, report_dir: Path | None = None,
                  images_arg: str | os.PathLike | None = None) -> Path:
    """The review page of a selection: per class the score histogram with the cut, the rejected and
    the borderline kept images with their anomaly maps, the paths to copy (as `user_paths` writes
    them for `images_arg`, the folder as the user typed it; by default the run's folder), the full
    list and every setting of the run. Written into `report_dir`, by default into the run's cut
    folder (reused there when it exists); returns the page's path."""
    from medsclean.pages.review import write_review
    from medsclean.stages import evaluate as ev
    from medsclean.stages.cut import decisions_of
    from medsclean.stages.scores import ranks_within_class

    cut = results["cut"].artifact
    target = Path(report_dir) if report_dir is not None else cut.path / "review"
    if report_dir is None and (target / "report.html").is_file():
        return target / "report.html"
    dataset = run.dataset()
    records = ev.records_in_order(dataset, cut)
    encoder = results["extract"].artifact.manifest["encoder"]
    grid, preprocess = tuple(encoder["grid"]), encoder["preprocess"]
    eval_cfg = run.eval_config()
    tokens = ev.train_tokens(results, device=run.device)  # (N, P): small; full-size maps are made only for pictured images
    selection = cut.tensors("selection.safetensors")
    eta, keep = selection["eta"].double().numpy(), selection["keep"].bool().numpy()
    memory = results["select"].artifact.tensors("eta.safetensors", ["memory_score"])["memory_score"].double().numpy()
    classes = [r.cls for r in records]
    ranks = ranks_within_class(eta, classes)
    shown = user_paths(run.data.images if images_arg is None else images_arg, cut.manifest["images"])
    decisions = decisions_of(cut.manifest)  # auto, or the user's correction ("kept by user", ...)
    rows = [{"path": r.rel_path, "class": r.cls, "eta": float(eta[i]), "kept": bool(keep[i]), "rank_in_class": ranks[i],
             "memory_score": float(memory[i]), "label": r.label, "file": str(r.path), "user_path": shown[i],
             "decision": decisions[i]} for i, r in enumerate(records)]
    labelled = any(r.label is not None for r in records)
    metrics = ev.cleaning_metrics(dataset, cut, None, eval_cfg) if any(r.label == 1 for r in records) else []

    def picture(i: int):
        one = ev.postprocess([records[i]], tokens[i:i + 1], grid, preprocess, eval_cfg)
        mask = one.masks[0] if one.masks is not None and records[i].mask is not None else None
        return ev.display_image(records[i], preprocess, eval_cfg.size), one.maps[0], mask

    settings = run_settings(run, results)
    rules = cut.manifest.get("rules", {})  # the rule each class used (mixture may fall back to mad)
    engines = results["score"].artifact.manifest.get("engines", {}) if "score" in results else {}
    cuts = {c: {"tau": t, "rule": cut.manifest["rule"], "used": rules.get(c),
                "engine": engines.get(c, engines.get("<all>"))} for c, t in cut.manifest["tau"].items()}
    return write_review(target, title=f"medsclean select: {dataset.root}", rows=rows, cuts=cuts,
                        picture=picture, metrics_rows=metrics if labelled else (), settings=settings)


def run_settings(run: Run, results: dict) -> dict:
    """Every option of a run, by stage, as its artifacts recorded them (each manifest's "config"):
    {"run": {...}, "data": {...}, "extract": {...}, "score": ..., "distill" (method meds), "select", "cut"};
    a setting is named by its command-line flag where one sets it (`--distill-iters`), else by its field."""
    from dataclasses import asdict

    from medsclean.options import ALL_OPTS

    flags: dict[tuple[str, str], str] = {}
    for opt in ALL_OPTS:
        flags.setdefault(opt.target, opt.flag)
    cut = results["cut"].artifact
    groups: dict[str, dict] = {
        "run": {"run": cut.key, "method": cut.manifest["method"], "cut": cut.manifest["rule"],
                "--preset": run.preset.name, "--seed": run.seed, "device": run.device},
        "data": {flags.get(("data", k), k): (str(v) if isinstance(v, Path) else v) for k, v in asdict(run.data).items()}}
    for stage in ("extract", "score", "distill", "select", "cut"):
        if stage in results:
            config = results[stage].artifact.manifest.get("config", {})
            groups[stage] = {flags.get((stage, k), k): v for k, v in config.items()}
    return groups


def select_export(run: Run, results: dict, out: Path, *, link: str | None = None, copy: bool = False) -> dict:
    """`--export DIR`: the kept and rejected images as a tree anomalib loads (see `medsclean.workdir.export`);
    says on stderr where it went and how the files were placed (`copy`: deprecated, as `link="copy"`)."""
    from medsclean.workdir.export import export_tree, link_mode, placed

    mode = link_mode(link, copy)
    if copy:
        run.reporter.warn("--copy is deprecated for the export: use --link copy (copy=True: link='copy')")
    cut = results["cut"].artifact
    manifest = export_tree(out, run.data.images, cut.manifest["images"], kept_flags(results), link=mode, run=cut.key)
    run.reporter.info(f"export: {manifest['kept']} kept and {manifest['rejected']} rejected images in "
                      f"{Path(out).expanduser().resolve()} ({placed(manifest)})")
    return manifest
