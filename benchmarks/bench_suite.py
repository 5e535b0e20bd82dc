"""Selection-quality suite: every cleaning method on contaminated sets, tuning part and report part.

Two parts that share neither image source nor defect generator:

  tuning  images and defects of the demo generator (`medsclean.synth`: scikit-image textures
          brick, grass, gravel and the coins photo); every default is chosen on this part;
  report  images and defects of `benchmarks/suite_data.py` (scikit-image tissue and retina
          photos, scikit-learn china and flower photos; thin scratches, cracks, low-contrast
          stains, missing and extra material, local blur, colour shifts, defects touching the
          border); the published numbers come from this part.

A cell is (noise ratio r, seed, unique or repeated defects). Its training set holds, per class,
the good training images plus min(int(r * N_good), available) defective test images; with
repeated defects each picked defect image comes with its two shifted and rotated copies (the
SoftPatch+ protocol), so a third as many distinct defects fill the same count.

Methods are the `select --method` values with the preset's defaults: knn, iterative, memory,
meds. Cleaning metrics on the training set: ranking AUROC of the final scores (per class, then
the mean), and pooled recall / precision of the rejected images. Detector after cleaning: a
full-bank kNN detector (PatchCore without coreset, k = 1) on each method's kept images, plus
MeDS's own fine-tuned model, scored on the test set with the evaluation protocol, both with the
injected images left in the test set (overlap, MeDS) and removed (no overlap, SoftPatch);
"no cleaning" and "clean bound" rows use all training images and only the good ones.

The encoder runs once per part; every class's patch-to-image nearest-distance table is computed
once (`medsclean.memory.nearest_table`) and each cell's Step-1 scores come from it through the
same reduction the exact engine uses, so a cell costs only its MeDS training.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_suite.py --part tuning
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_suite.py --part report --json report.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite_data  # noqa: E402

from medsclean.config import (CPU, DistillConfig, ExtractConfig, Preset, ScoreConfig, SelectConfig,  # noqa: E402
                              resolve_device)
from medsclean.data import Dataset, ImageRecord, discover, image_id  # noqa: E402
from medsclean.evaluate import EvalConfig, MapSet, detector_metrics, postprocess  # noqa: E402
from medsclean.extract import run_extract  # noqa: E402
from medsclean.memory import image_scores, nearest_table  # noqa: E402
from medsclean.metrics import image_auroc_score, selection_metrics  # noqa: E402
from medsclean.model import ReconstructionModel  # noqa: E402
from medsclean.score import step1_maps  # noqa: E402
from medsclean.seeding import rng as seeded_rng  # noqa: E402
from medsclean.store import Store, digest, load_tensors, save_tensors, write_text_atomic  # noqa: E402
from medsclean.synth import DEFAULT_CATEGORIES, generate_dataset  # noqa: E402
from medsclean.training import compute_maps, distill, progressive_select  # noqa: E402
from medsclean.training_stages import final_cut, model_config_for  # noqa: E402
from medsclean.ui import SilentReporter  # noqa: E402

METHODS = ("knn", "iterative", "memory", "meds")
COPIES = 2  # repeated defects: each picked defect image plus this many shifted/rotated copies


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ data


def prepare_data(part: str, work: Path, args) -> tuple[Path, dict, dict]:
    """The clean base dataset of a part plus its repeated copies (regenerated when the spec changes).

    Returns the root, {copy path: original test image path} and the data spec.
    """
    spec = {"part": part, "n_train": args.n_train, "n_test_good": args.n_test_good,
            "n_test_defect": args.n_test_defect, "size": args.size, "seed": args.data_seed, "copies": COPIES}
    root, stamp = work / f"{part}-data", work / f"{part}-data.json"
    if stamp.is_file() and root.is_dir() and json.loads(stamp.read_text())["spec"] == spec:
        return root, json.loads(stamp.read_text())["repeats"], spec
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    counts = dict(n_train=args.n_train, n_test_good=args.n_test_good, n_test_defect=args.n_test_defect,
                  size=args.size, seed=args.data_seed)
    if part == "tuning":
        generate_dataset(root, categories=DEFAULT_CATEGORIES, **counts)
    else:
        suite_data.generate(root, categories=suite_data.CATEGORIES, **counts)
    mapping = suite_data.write_repeats(root, copies=COPIES, seed=args.data_seed)
    stamp.write_text(json.dumps({"spec": spec, "repeats": mapping}))
    return root, mapping, spec


@dataclass
class Features:
    """Stored features of a list of images (one split, or the repeated copies)."""

    records: list[ImageRecord]
    memory: torch.Tensor        # (N, P, D) float16
    groups: list[torch.Tensor]  # G x (N, L, C_g) float16
    encoder: dict


def _repeat_dataset(root: Path) -> Dataset:
    records = []
    for path in sorted(root.glob("*/repeats/*/*.png")):
        rel = path.relative_to(root).as_posix()
        records.append(ImageRecord(id=image_id(rel), rel_path=rel, path=path, cls=rel.split("/")[0], label=1))
    return Dataset(root=root, layout="folder", split="train", records=tuple(records))


def extract(dataset: Dataset, store: Store, cfg: ExtractConfig, stage: str) -> Features:
    result = run_extract(dataset, store, cfg, stage=stage, reporter=SilentReporter())
    art = result.artifact
    log(f"{stage}: {result.n_images} images ({'cached' if result.cached else f'{result.seconds:.0f} s'})")
    encoder = art.manifest["encoder"]
    names = [f"group{g}" for g in range(len(encoder["group_dims"]))]
    tensors = art.sharded_tensors(["index", "memory", *names])
    by_path = {r.rel_path: r for r in dataset.records}
    return Features([by_path[row["path"]] for row in art.manifest["images"]], tensors["memory"],
                    [tensors[n] for n in names], encoder)


@dataclass
class ClassBase:
    """One class: the candidate training rows (good, defective, copies) and their nearest tables."""

    rows: list[ImageRecord]      # good train images, then defective test images, then copies
    origin: list[str]            # the test image each row stands for ("" for good images)
    memory: torch.Tensor         # (Nb, P, D)
    groups: list[torch.Tensor]
    table: torch.Tensor          # (Nb, P, Nb, 1) nearest distances among the rows
    test_table: torch.Tensor     # (Nt, P, Nb, 1) nearest distances of the class's test images to the rows
    test_index: np.ndarray       # positions of the class's test images in the test Features


def build_classes(root: Path, train: Features, test: Features, repeats: Features, mapping: dict,
                  work: Path, device: str) -> dict[str, ClassBase]:
    classes = {}
    for cls in sorted({r.cls for r in train.records}):
        pick = {"train": [i for i, r in enumerate(train.records) if r.cls == cls],
                "defect": [i for i, r in enumerate(test.records) if r.cls == cls and r.label == 1],
                "copy": [i for i, r in enumerate(repeats.records) if r.cls == cls]}
        sources = [("train", train), ("defect", test), ("copy", repeats)]
        rows = [f.records[i] for name, f in sources for i in pick[name]]
        origin = ["" if r.label == 0 else mapping.get(r.rel_path, r.rel_path) for r in rows]
        memory = torch.cat([f.memory[pick[name]] for name, f in sources])
        groups = [torch.cat([f.groups[g][pick[name]] for name, f in sources]) for g in range(len(train.groups))]
        test_index = np.array([i for i, r in enumerate(test.records) if r.cls == cls])
        key = digest({"rows": [r.rel_path for r in rows], "encoder": train.encoder, "n": len(test_index)})[:16]
        path = work / "tables" / f"{cls}-{key}.safetensors"
        if path.is_file():
            saved = load_tensors(path)
            table, test_table = saved["table"].float(), saved["test_table"].float()
        else:
            t0 = time.perf_counter()
            table = nearest_table(memory, device=device)
            test_table = nearest_table(memory, queries=test.memory[test_index], device=device)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors(path, {"table": table.half(), "test_table": test_table.half()})
            log(f"tables {cls}: {len(rows)} rows, {len(test_index)} test images in {time.perf_counter() - t0:.0f} s")
        classes[cls] = ClassBase(rows, origin, memory, groups, table, test_table, test_index)
    return classes


# ------------------------------------------------------------------------------------ cells


@dataclass
class Cell:
    """A contaminated training set assembled from class rows."""

    ratio: float
    seed: int
    repeated: bool
    index: dict[str, np.ndarray]    # class -> chosen rows of its ClassBase
    contaminated: np.ndarray        # (N,) bool over the concatenated classes
    classes: list[str]
    injected_origins: set[str]      # test images (rel paths) whose defect is in the training set

    def rid(self) -> str:
        return f"r={self.ratio:g},seed={self.seed},{'repeated' if self.repeated else 'unique'}"


def make_cell(bases: dict[str, ClassBase], ratio: float, seed: int, repeated: bool) -> Cell:
    index, contaminated, classes, origins = {}, [], [], set()
    for cls, base in bases.items():
        goods = [i for i, r in enumerate(base.rows) if r.label == 0]
        defects = [i for i, r in enumerate(base.rows) if r.label == 1 and r.rel_path == base.origin[i]]
        count = min(int(ratio * len(goods)), len(defects))
        rng = seeded_rng(seed, cls, round(ratio * 1000), int(repeated))
        if repeated:
            picked = rng.choice(len(defects), math.ceil(count / (COPIES + 1)), replace=False)
            chosen = []
            for p in sorted(picked):
                name = base.rows[defects[p]].rel_path
                chosen += [defects[p]] + [i for i, o in enumerate(base.origin)
                                          if o == name and i != defects[p]][:COPIES]
            chosen = chosen[:count]
        else:
            chosen = [defects[p] for p in sorted(rng.choice(len(defects), count, replace=False))]
        index[cls] = np.array(goods + chosen)
        contaminated += [False] * len(goods) + [True] * len(chosen)
        classes += [cls] * (len(goods) + len(chosen))
        origins |= {base.origin[i] for i in chosen}
    return Cell(ratio, seed, repeated, index, np.array(contaminated), classes, origins)


def cell_features(bases: dict[str, ClassBase], cell: Cell):
    memory = torch.cat([bases[c].memory[i] for c, i in cell.index.items()])
    groups = [torch.cat([bases[c].groups[g][i] for c, i in cell.index.items()]) for g in range(2)]
    tables = {c: bases[c].table[i][:, :, i] for c, i in cell.index.items()}
    return memory, groups, tables


# ------------------------------------------------------------------------------------ methods


@dataclass
class Outcome:
    eta: np.ndarray           # (N,) final scores
    keep: np.ndarray          # (N,) bool
    seconds: float
    model: ReconstructionModel | None = None


def run_method(method: str, cell: Cell, memory, groups, tables, encoder: dict, s) -> Outcome:
    t0 = time.perf_counter()
    select_cfg = s.preset.build(SelectConfig, method=method)
    score_cfg = select_cfg.step1(s.preset.build(ScoreConfig, seed=cell.seed))
    maps, _ = step1_maps(memory, cell.classes, score_cfg, device=s.device, tables=tables)
    if method != "meds":
        eta = image_scores(maps, aggregate=score_cfg.aggregate).double().numpy()
        keep, _ = final_cut(eta, cell.classes, select_cfg)
        return Outcome(eta, keep, time.perf_counter() - t0)
    distill_cfg = s.preset.build(DistillConfig, checkpoint_every=0)
    model = ReconstructionModel(model_config_for(encoder, distill_cfg), seed=cell.seed)
    distill(model, groups, maps, distill_cfg, seed=cell.seed, device=s.device)
    base_maps = compute_maps(model, groups, device=s.device)
    result = progressive_select(model, groups, cell.classes, base_maps, select_cfg, distill_cfg,
                                seed=cell.seed, device=s.device)
    keep, _ = final_cut(result.eta, cell.classes, select_cfg)
    return Outcome(result.eta, keep, time.perf_counter() - t0, model)


def cleaning_row(cell: Cell, out: Outcome) -> dict:
    labels, classes = cell.contaminated, np.array(cell.classes)
    per_class = {c: image_auroc_score(labels[classes == c], out.eta[classes == c]) for c in cell.index}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pooled = selection_metrics(labels, ~out.keep, out.eta)
    return {"ranking_auroc": float(np.nanmean(list(per_class.values()))), "ranking_auroc_per_class": per_class,
            "recall": pooled["recall"], "precision": pooled["precision"], "rejected": int((~out.keep).sum()),
            "seconds": out.seconds, "eta": out.eta.tolist(), "keep": out.keep.astype(int).tolist()}


# ------------------------------------------------------------------------------------ detector


def knn_detector_maps(bases: dict[str, ClassBase], cell: Cell, keep: np.ndarray, n_test: int) -> np.ndarray:
    """(N_test, P) maps of a full-bank kNN detector whose memory is the kept training images."""
    maps = None
    offset = 0
    for cls, rows in cell.index.items():
        base = bases[cls]
        kept_rows = rows[keep[offset:offset + len(rows)]]
        offset += len(rows)
        class_maps = base.test_table[:, :, torch.from_numpy(kept_rows), 0].float().amin(dim=2)
        if maps is None:
            maps = np.zeros((n_test, class_maps.shape[1]), np.float32)
        maps[base.test_index] = class_maps.numpy()
    return maps


def detector_row(test: Features, token_maps: np.ndarray, cell: Cell | None) -> dict:
    """I-AUROC, P-AP, P-AUPRO (mean over classes) with overlap and, for a cell, without it."""
    cfg = EvalConfig()
    maps = postprocess(test.records, token_maps, tuple(test.encoder["grid"]), test.encoder["preprocess"], cfg)
    keys = ("image_auroc", "pixel_ap", "aupro")
    row = {f"overlap_{k}": v for k, v in detector_metrics(maps, cfg)[-1].items() if k in keys}
    if cell is not None:
        sel = np.array([r.rel_path not in cell.injected_origins for r in test.records])
        sub = MapSet([r for r, s in zip(maps.records, sel) if s], maps.maps[sel], maps.scores[sel], maps.masks[sel])
        row.update({f"no_overlap_{k}": v for k, v in detector_metrics(sub, cfg)[-1].items() if k in keys})
    return row


# ------------------------------------------------------------------------------------ driver


@dataclass(frozen=True)
class Settings:
    preset: object
    device: str


def settings_from(args) -> Settings:
    overrides = {"extract": {"resize": args.resize, "crop": args.crop}, "score": {"min_bank": args.min_bank},
                 "distill": {"width": args.width, "depth": args.depth, "iters": args.distill_iters},
                 "select": {"cut": args.cut, "iters": args.iters}}
    layers = {stage: {**CPU.overlays.get(stage, {}), **{k: v for k, v in values.items() if v is not None}}
              for stage, values in overrides.items()}
    preset = Preset(name="cpu+", overlays=layers)
    return Settings(preset, resolve_device(args.device))


def run_cell(cell: Cell, bases, test: Features, encoder: dict, s: Settings, methods, detector: bool) -> dict:
    memory, groups, tables = cell_features(bases, cell)
    out = {"n_train": len(cell.classes), "n_injected": int(cell.contaminated.sum()), "methods": {}}
    for method in methods:
        outcome = run_method(method, cell, memory, groups, tables, encoder, s)
        row = cleaning_row(cell, outcome)
        if detector:
            row["detector"] = detector_row(test, knn_detector_maps(bases, cell, outcome.keep, len(test.records)),
                                           cell)
            if outcome.model is not None:
                own = compute_maps(outcome.model, test.groups, device=s.device).numpy()
                out["methods"]["meds (own model)"] = {"detector": detector_row(test, own, cell)}
        out["methods"][method] = row
        log(f"  {cell.rid()} {method}: ranking AUROC {row['ranking_auroc']:.3f}, recall {row['recall']:.2f}, "
            f"precision {row['precision']:.2f} ({row['seconds']:.0f} s)")
    if detector:
        everything = np.ones(len(cell.classes), bool)
        out["methods"]["no cleaning"] = {"detector": detector_row(
            test, knn_detector_maps(bases, cell, everything, len(test.records)), cell)}
        out["methods"]["clean bound"] = {"detector": detector_row(
            test, knn_detector_maps(bases, cell, ~cell.contaminated, len(test.records)), cell)}
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("tuning", "report"), required=True)
    p.add_argument("--ratios", type=lambda v: [float(x) for x in v.split(",")], default=[0.1, 0.2, 0.4])
    p.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1])
    p.add_argument("--defects", type=lambda v: v.split(","), default=["unique", "repeated"],
                   help="unique, repeated or both (comma-separated)")
    p.add_argument("--methods", type=lambda v: v.split(","), default=list(METHODS))
    p.add_argument("--no-detector", action="store_true", help="skip the detector after cleaning")
    p.add_argument("--n-train", type=int, default=70, help="good training images per class")
    p.add_argument("--n-test-good", type=int, default=20)
    p.add_argument("--n-test-defect", type=int, default=30)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--data-seed", type=int, default=0)
    for name in ("resize", "crop", "min-bank", "width", "depth", "distill-iters", "iters"):
        p.add_argument(f"--{name}", type=int, help="override the CPU preset")
    p.add_argument("--cut", help="override the CPU preset's final cut")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "medsclean-suite")
    p.add_argument("--fresh", action="store_true", help="ignore saved results")
    p.add_argument("--json", type=Path, help="also write all results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    s = settings_from(args)
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    root, mapping, spec = prepare_data(args.part, work, args)
    store = Store(work / "store", images_root=root)
    extract_cfg = s.preset.build(ExtractConfig, device=s.device)
    train = extract(discover(root, layout="mvtec", split="train"), store, extract_cfg, "features")
    test = extract(discover(root, layout="mvtec", split="test"), store, extract_cfg, "features-test")
    repeats = extract(_repeat_dataset(root), store, extract_cfg, "features-repeats")
    bases = build_classes(root, train, test, repeats, mapping, work, s.device)

    key = digest({"data": spec, "preset": repr(s.preset), "device": s.device})
    results_path = work / f"results-{args.part}-{key[:12]}.json"
    results = {} if args.fresh or not results_path.is_file() else json.loads(results_path.read_text())
    for ratio in args.ratios:
        for seed in args.seeds:
            for kind in args.defects:
                cell = make_cell(bases, ratio, seed, kind == "repeated")
                saved = results.get(cell.rid(), {"methods": {}})
                todo = [m for m in args.methods if m not in saved["methods"]]
                if not todo and (args.no_detector or "clean bound" in saved["methods"]):
                    continue
                log(f"{cell.rid()}: {len(cell.classes)} training images, {int(cell.contaminated.sum())} injected")
                fresh = run_cell(cell, bases, test, train.encoder, s, todo, not args.no_detector)
                saved.update({k: v for k, v in fresh.items() if k != "methods"})
                saved["methods"].update(fresh["methods"])
                saved["classes"], saved["contaminated"] = cell.classes, cell.contaminated.astype(int).tolist()
                results[cell.rid()] = saved
                write_text_atomic(results_path, json.dumps(results, default=float))
    if args.json:
        args.json.write_text(json.dumps({"settings": repr(s.preset), "results": results}, default=float))
    print(report(args, s, results, time.perf_counter() - started))
    return 0


# ------------------------------------------------------------------------------------ tables


def _mean(values) -> str:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return f"{float(np.mean(finite)):.3f}" if finite else "–"


def _cells(results, ratio, kind, seeds):
    ids = [f"r={ratio:g},seed={seed},{kind}" for seed in seeds]
    return [results[i] for i in ids if i in results]


def cleaning_table(results: dict, args) -> str:
    methods = [m for m in METHODS if m in args.methods]
    head = "| r | defects | true share | " + " | ".join(f"{m}: rank AUROC / recall / precision" for m in methods)
    lines = [head + " |", "|---|---|---|" + "---|" * len(methods)]
    for ratio in args.ratios:
        for kind in args.defects:
            cells = _cells(results, ratio, kind, args.seeds)
            if not cells:
                continue
            share = _mean([c["n_injected"] / c["n_train"] for c in cells])
            parts = []
            for m in methods:
                rows = [c["methods"][m] for c in cells if m in c["methods"]]
                parts.append(" / ".join(_mean([r[k] for r in rows]) for k in ("ranking_auroc", "recall", "precision")))
            lines.append(f"| {ratio:g} | {kind} | {share} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def detector_table(results: dict, args) -> str:
    rows = ["no cleaning", *[m for m in METHODS if m in args.methods], "meds (own model)", "clean bound"]
    cols = [(r, kind) for r in args.ratios for kind in args.defects]
    head = "| detector | " + " | ".join(f"r={r:g} {k}: I-AUROC ov / no-ov, P-AP ov" for r, k in cols)
    lines = [head + " |", "|---|" + "---|" * len(cols)]
    for name in rows:
        parts = []
        for r, kind in cols:
            ds = [c["methods"][name]["detector"] for c in _cells(results, r, kind, args.seeds)
                  if name in c["methods"] and "detector" in c["methods"][name]]
            parts.append(" / ".join(_mean([d[k] for d in ds]) for k in
                                    ("overlap_image_auroc", "no_overlap_image_auroc")) +
                         ", " + _mean([d["overlap_pixel_ap"] for d in ds]))
        lines.append(f"| {name} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def time_table(results: dict, args) -> str:
    lines = ["| method | seconds per cell (mean) |", "|---|---|"]
    for m in METHODS:
        secs = [c["methods"][m]["seconds"] for c in results.values() if m in c["methods"]]
        if secs:
            lines.append(f"| {m} | {np.mean(secs):.1f} |")
    return "\n".join(lines)


def report(args, s: Settings, results: dict, wall: float) -> str:
    e, sc, d, se = (s.preset.build(c) for c in (ExtractConfig, ScoreConfig, DistillConfig, SelectConfig))
    return "\n".join([
        f"command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_suite.py {' '.join(sys.argv[1:])}`",
        f"date: {datetime.date.today().isoformat()}; host: {platform.machine()}, torch {torch.__version__}, "
        f"threads {args.threads}, device {s.device}; wall {wall / 60:.1f} min (saved cells reused)",
        f"preset: {e.backbone} {e.resize or 'native'}/{e.crop or 'native'} px, min bank {sc.min_bank}, cut {se.cut}, "
        f"decoder width {d.width} depth {d.depth}, {d.iters} + {se.iters} iterations",
        "", f"Cleaning ({args.part} part; mean over seeds {args.seeds}):", "", cleaning_table(results, args), "",
        "Detector after cleaning (kNN detector on the kept images; MeDS's own model; mean over classes and seeds):",
        "", detector_table(results, args), "", time_table(results, args)])


if __name__ == "__main__":
    sys.exit(main())
