"""Detector accuracy on contaminated training sets: MeDS against three baselines, side by side.

For every noise ratio r and seed, the MeDS protocol (`medsclean.demo.noisy.make_noisy`, test set
unchanged) injects anomalous test images into the training set, and four detectors are
trained on it and scored on the TEST set (I-AUROC, I-AP, P-AUPRO, P-AP per class, then the
mean over classes), with the selection's precision/recall on the TRAINING set:

  no cleaning       a reconstruction detector trained from scratch on every training image;
  memory selection  the Step-1 memory-ensemble scores, the tau rule at t = T (`select
                    --method memory`), then a detector trained from scratch on the kept images;
  MeDS              distillation + progressive selection; the fine-tuned model is the detector;
  clean upper bound a detector trained from scratch on the truly normal training images only
                    (the same set at every r, so it is trained once per seed).

The three from-scratch detectors use `train_detector` (detector_baseline.py) with Dinomaly's own
hard-mining share p_final = 0.9 and the same number of iterations as MeDS's Step 3 (which starts from the
distilled model); --baseline-iters gives them another count, e.g. Step 2 + Step 3. Model sizes are the CPU preset's; iterations default to a third of it
(100 + 100, see DEFAULT_ITERS) so that the default run fits in about 40 minutes on 2 cores.

The encoder runs once: the features of every image of the clean base dataset (train and
test) are extracted with the preset's backbone through the `features` stage, and each noisy
training set is assembled from those rows through the noisy manifest (an injected image maps
back to its test-set origin). Results are saved after every (ratio, seed) in the work folder
and reused by a rerun with the same settings.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_accuracy.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_accuracy.py --root /data/mvtec --device cuda
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_accuracy.py --smoke --json /tmp/accuracy-smoke.json

--smoke: one generated class (brick) of 4 + 2 + 3 images at 64 px, r = 0.4, seeds 0 and 1, a
decoder of width 16 trained for 4 + 4 iterations, in a temporary work folder unless --work is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

import smoke_mode
from medsclean.config import DistillConfig, ExtractConfig, ScoreConfig, SelectConfig
from medsclean.presets import CPU
from medsclean.values import resolve_device
from medsclean.workdir.data import ImageRecord, discover
from medsclean.stages.evaluate import EvalConfig, detector_metrics, postprocess
from medsclean.stages.features import run_extract
from medsclean.maps import AGGREGATE_RATIOS, image_scores
from medsclean.step1.classes import score_classes
from medsclean.step1.runtime import Runtime
from medsclean.metrics import selection_metrics
from medsclean.model.decoder import ReconstructionModel
from medsclean.demo.noisy import make_noisy
from medsclean.selection.progressive import select_per_class
from medsclean.workdir.artifacts import digest
from medsclean.workdir.atomic import write_text_atomic
from medsclean.workdir.store import Store
from medsclean.demo.good_images import DEFAULT_CATEGORIES
from medsclean.demo.synth import generate_dataset
from medsclean.model.loop import TrainContext
from medsclean.model.training import compute_maps, distill, progressive_select
from medsclean.stages.common import model_config_for
from detector_baseline import train_detector
from medsclean.ui import SilentReporter

METHODS = ("no cleaning", "memory selection", "MeDS", "clean upper bound")
METRICS = {"image_auroc": "I-AUROC", "image_ap": "I-AP", "aupro": "P-AUPRO", "pixel_ap": "P-AP"}
DINOMALY_P_FINAL = 0.9
RESULTS_NAME = "results.json"
# A third of the CPU preset's 300 + 300: the default run (4 ratios x 2 seeds) then takes about
# 40 minutes on a shared 2-core CPU; --iters 300 --distill-iters 300 is the preset itself.
DEFAULT_ITERS = 100
DEFAULT_WORK = Path(tempfile.gettempdir()) / "medsclean-bench-accuracy"
SMOKE = {"categories": ["brick"], "n_train": 4, "n_test_good": 2, "n_test_defect": 3, "size": 64, "ratios": [0.4],
         "seeds": [0, 1], "iters": 4, "distill_iters": 4, "resize": 64, "crop": 64, "width": 16, "depth": 2,
         "heads": 2}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ features


@dataclass
class FeatureTable:
    """Stored features of one split of the base dataset, with a row per image path."""

    memory: torch.Tensor        # (N, P, D) float16
    groups: list[torch.Tensor]  # G tensors (N, L, C_g) float16
    paths: list[str]            # N paths relative to the dataset root
    records: list[ImageRecord]  # N records (class, label, mask) in row order
    encoder: dict               # the features manifest's encoder description

    def row(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.paths)}


def extract_split(root: Path, store: Store, cfg: ExtractConfig, split: str, categories: list[str]) -> FeatureTable:
    """Features of one split of the chosen categories via the `features` stage (cached in the store)."""
    dataset = discover(root, layout="mvtec", split=split)
    dataset = replace(dataset, records=tuple(r for r in dataset.records if r.cls in categories))
    stage = "extract" if split == "train" else "extract-test"
    result = run_extract(dataset, store, cfg, stage=stage, reporter=SilentReporter())
    art = result.artifact
    state = "cached" if result.cached else f"{result.seconds:.0f} s"
    log(f"features {split}: {result.n_images} images ({state}), {result.n_skipped} skipped")
    encoder = art.manifest["encoder"]
    names = ["memory", *(f"group{g}" for g in range(len(encoder["group_dims"])))]
    tensors = art.sharded_tensors(["index", *names])
    by_path = {r.rel_path: r for r in dataset.records}
    paths = [row["path"] for row in art.manifest["images"]]
    return FeatureTable(tensors["memory"], [tensors[n] for n in names[1:]], paths, [by_path[p] for p in paths],
                        encoder)


@dataclass
class NoisySet:
    """A contaminated training set assembled from stored feature rows."""

    memory: torch.Tensor
    groups: list[torch.Tensor]
    classes: list[str]
    contaminated: np.ndarray  # (N,) bool, True for injected images
    true_fraction: float


def assemble_noisy_set(manifest: dict, train: FeatureTable, test: FeatureTable) -> NoisySet:
    """Rows of the noisy training set in the order `medsclean select` would see (sorted path).

    A training image of the noisy tree maps back through the manifest to its source path:
    an original training image or, for an injected one, an anomalous test image.
    """
    entries = sorted(manifest["train"], key=lambda e: e["train_path"])
    train_row, test_row = train.row(), test.row()
    index = []
    for e in entries:
        table, offset = (test_row, len(train.paths)) if e["injected"] else (train_row, 0)
        if e["origin"] not in table:
            raise SystemExit(f"{e['origin']}: in the noisy manifest but has no stored features (unreadable?)")
        index.append(offset + table[e["origin"]])
    rows = torch.tensor(index)
    memory = torch.cat([train.memory, test.memory])[rows]
    groups = [torch.cat([a, b])[rows] for a, b in zip(train.groups, test.groups)]
    return NoisySet(memory, groups, [e["class"] for e in entries],
                    np.array([bool(e["injected"]) for e in entries]), float(manifest["true_fraction"]))


# ------------------------------------------------------------------------------------ methods


@dataclass(frozen=True)
class Settings:
    """Everything the numbers depend on (the cache key of saved results)."""

    data: dict
    backbone: str
    resize: int
    crop: int
    width: int
    depth: int
    heads: int
    distill_iters: int
    iters: int
    baseline_iters: int
    k: float
    baseline_p_final: float
    device: str


def distill_config(s: Settings) -> DistillConfig:
    return CPU.build(DistillConfig, iters=s.distill_iters, width=s.width, depth=s.depth, heads=s.heads,
                     checkpoint_every=0)


def fresh_model(encoder: dict, s: Settings, seed: int) -> ReconstructionModel:
    return ReconstructionModel(model_config_for(encoder, distill_config(s)), seed=seed)


def baseline_train_config(s: Settings) -> SelectConfig:
    """Dinomaly from scratch: Step 3's schedule (warm-up, p ramp) with p_final 0.9."""
    return SelectConfig(iters=s.baseline_iters, k=s.k, p_final=s.baseline_p_final)


def train_from_scratch(data: NoisySet | FeatureTable, subset: np.ndarray, encoder: dict, s: Settings,
                       seed: int) -> ReconstructionModel:
    model = fresh_model(encoder, s, seed)
    train_detector(model, data.groups, subset, baseline_train_config(s), distill_config(s), seed=seed,
                   device=s.device)
    return model


def step1_scores(data: NoisySet, seed: int, device: str) -> tuple[torch.Tensor, np.ndarray]:
    """Memory-ensemble maps (N, P) and image scores (N,) with the `score` stage's defaults."""
    cfg = ScoreConfig(seed=seed)
    maps, _ = score_classes(data.memory, data.classes, cfg, Runtime(device=device))
    return maps, image_scores(maps, ratio=AGGREGATE_RATIOS[cfg.aggregate]).double().numpy()


def run_meds(data: NoisySet, maps: torch.Tensor, encoder: dict, s: Settings, seed: int):
    """Steps 2 and 3 with the settings the `distill` and `select` stages use."""
    dcfg = distill_config(s)
    model = fresh_model(encoder, s, seed)
    distill(model, data.groups, maps, dcfg, TrainContext(seed=seed, device=s.device))
    base_maps = compute_maps(model, data.groups, device=s.device)
    scfg = SelectConfig(iters=s.iters, k=s.k)
    result = progressive_select(model, data.groups, data.classes, base_maps, scfg, dcfg,
                                TrainContext(seed=seed, device=s.device))
    return model, result


# ------------------------------------------------------------------------------------ scoring


def detector_scores(model: ReconstructionModel, test: FeatureTable, device: str) -> dict:
    """Mean over classes (and the per-class rows) of the detector on the test set, eval protocol."""
    cfg = EvalConfig()
    tokens = compute_maps(model, test.groups, device=device).numpy()
    maps = postprocess(test.records, tokens, tuple(test.encoder["grid"]), test.encoder["preprocess"], cfg)
    rows = detector_metrics(maps, cfg)
    return {**{k: rows[-1][k] for k in METRICS}, "per_class": rows[:-1]}


def cleaning_metrics(contaminated: np.ndarray, keep: np.ndarray, suspicion: np.ndarray) -> dict:
    """Pooled precision/recall of the rejected images as contaminant detector, on the training set."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = selection_metrics(contaminated, ~keep, suspicion)
    return {"precision": m["precision"], "recall": m["recall"], "ranking_auroc": m["ranking_auroc"],
            "rejected": int((~keep).sum()), "rejected_clean": int((~keep & ~contaminated).sum())}


def evaluate_ratio(root: Path, work: Path, ratio: float, seed: int, train: FeatureTable, test: FeatureTable,
                   s: Settings, categories: list[str]) -> dict:
    """The three ratio-dependent methods on one contaminated training set."""
    noisy_dir = work / f"noisy-r{ratio:g}-s{seed}"
    shutil.rmtree(noisy_dir, ignore_errors=True)
    manifest = make_noisy(root, noisy_dir, ratio=ratio, seed=seed, overlap=True, categories=categories)
    data = assemble_noisy_set(manifest, train, test)
    n = len(data.classes)
    log(f"r={ratio:g} seed {seed}: {n} training images, {int(data.contaminated.sum())} injected "
        f"(true fraction {data.true_fraction:.3f})")
    out = {"ratio": ratio, "seed": seed, "n_train": n, "n_injected": int(data.contaminated.sum()),
           "true_fraction": data.true_fraction, "methods": {}, "seconds": {}}

    t0 = time.perf_counter()
    model = train_from_scratch(data, np.ones(n, dtype=bool), train.encoder, s, seed)
    out["methods"]["no cleaning"] = {**detector_scores(model, test, s.device),
                                     **cleaning_metrics(data.contaminated, np.ones(n, bool), np.zeros(n))}
    out["seconds"]["no cleaning"] = time.perf_counter() - t0
    log(f"  no cleaning: {_brief(out['methods']['no cleaning'])} ({out['seconds']['no cleaning']:.0f} s)")

    t0 = time.perf_counter()
    maps, memory_scores = step1_scores(data, seed, s.device)
    out["seconds"]["step 1"] = time.perf_counter() - t0
    keep, _ = select_per_class(memory_scores, data.classes, 1, 1, s.k)
    model = train_from_scratch(data, keep, train.encoder, s, seed)
    out["methods"]["memory selection"] = {**detector_scores(model, test, s.device),
                                          **cleaning_metrics(data.contaminated, keep, memory_scores)}
    out["seconds"]["memory selection"] = time.perf_counter() - t0
    log(f"  memory selection: {_brief(out['methods']['memory selection'])} "
        f"({out['seconds']['memory selection']:.0f} s incl. Step 1 {out['seconds']['step 1']:.0f} s)")

    t0 = time.perf_counter()
    model, result = run_meds(data, maps, train.encoder, s, seed)
    out["methods"]["MeDS"] = {**detector_scores(model, test, s.device),
                              **cleaning_metrics(data.contaminated, result.keep, result.eta),
                              "rounds": len(result.rounds)}
    out["seconds"]["MeDS"] = time.perf_counter() - t0 + out["seconds"]["step 1"]
    log(f"  MeDS: {_brief(out['methods']['MeDS'])} ({out['seconds']['MeDS']:.0f} s incl. Step 1)")
    shutil.rmtree(noisy_dir, ignore_errors=True)
    return out


def evaluate_clean(seed: int, train: FeatureTable, test: FeatureTable, s: Settings) -> dict:
    """The clean upper bound: every original (truly normal) training image, no injection."""
    t0 = time.perf_counter()
    n = len(train.paths)
    model = train_from_scratch(train, np.ones(n, dtype=bool), train.encoder, s, seed)
    metrics = detector_scores(model, test, s.device)
    seconds = time.perf_counter() - t0
    log(f"clean upper bound seed {seed}: {_brief(metrics)} ({seconds:.0f} s)")
    return {"seed": seed, "n_train": n, "metrics": metrics, "seconds": seconds}


def _brief(m: dict) -> str:
    return " ".join(f"{label} {100 * m[k]:.1f}" for k, label in METRICS.items())


# ------------------------------------------------------------------------------------ tables


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return "–"
    mean = scale * float(np.mean(finite))
    if len(finite) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * float(np.std(finite, ddof=1)):.{digits}f}"


def method_values(results: dict, method: str, ratio: float, key: str, seeds: list[int]) -> list[float]:
    if method == "clean upper bound":
        return [results["clean"][str(s)]["metrics"][key] for s in seeds]
    return [results["runs"][run_id(ratio, s)]["methods"][method][key] for s in seeds]


def accuracy_table(results: dict, ratios: list[float], seeds: list[int]) -> str:
    """Rows = methods; column groups = metric × ratio; mean ± std (ddof 1) over seeds, in %."""
    head = ["method", *(f"{label} r={r:g}" for label in METRICS.values() for r in ratios)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in METHODS:
        cells = [_mean_std(method_values(results, method, r, k, seeds)) for k in METRICS for r in ratios]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cleaning_table(results: dict, ratios: list[float], seeds: list[int]) -> str:
    """True contamination and the selections' pooled precision/recall per ratio."""
    lines = ["| r | injected / train images | true fraction | method | precision | recall | rejected "
             "(of them clean) | ranking AUROC |", "|---|---|---|---|---|---|---|---|"]
    for r in ratios:
        runs = [results["runs"][run_id(r, s)] for s in seeds]
        counts = ", ".join(f"{x['n_injected']}/{x['n_train']}" for x in runs)
        fraction = _mean_std([x["true_fraction"] for x in runs])
        for method in ("memory selection", "MeDS"):
            m = [x["methods"][method] for x in runs]
            rejected = ", ".join(f"{x['rejected']} ({x['rejected_clean']})" for x in m)
            lines.append(f"| {r:g} | {counts} | {fraction} % | {method} | "
                         f"{_mean_std([x['precision'] for x in m])} | {_mean_std([x['recall'] for x in m])} | "
                         f"{rejected} | {_mean_std([x['ranking_auroc'] for x in m])} |")
    return "\n".join(lines)


def time_table(results: dict, ratios: list[float], seeds: list[int]) -> str:
    lines = ["| part | seconds per run, mean over ratios and seeds |", "|---|---|"]
    runs = [results["runs"][run_id(r, s)] for r in ratios for s in seeds]
    for part in ("no cleaning", "step 1", "memory selection", "MeDS"):
        lines.append(f"| {part} | {np.mean([x['seconds'][part] for x in runs]):.0f} |")
    clean = [results["clean"][str(s)]["seconds"] for s in seeds]
    lines.append(f"| clean upper bound | {np.mean(clean):.0f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ driver


def run_id(ratio: float, seed: int) -> str:
    return f"r={ratio:g},seed={seed}"


def prepare_data(args, work: Path) -> tuple[Path, list[str], dict]:
    """The clean base dataset: --root as given, or the demo generator's data (reused when identical)."""
    if args.root is not None:
        root = Path(args.root).expanduser().resolve()
        categories = args.categories or sorted(d.name for d in root.iterdir()
                                               if (d / "train" / "good").is_dir() and (d / "test").is_dir())
        return root, categories, {"root": str(root), "categories": categories}
    categories = args.categories or list(DEFAULT_CATEGORIES)
    # "medsclean.synth" is the stamp existing data folders carry (the module is medsclean.demo.synth now)
    spec = {"generator": "medsclean.synth", "categories": categories, "n_train": args.n_train,
            "n_test_good": args.n_test_good, "n_test_defect": args.n_test_defect, "size": args.size,
            "seed": args.data_seed}
    root, stamp = work / "data", work / "data-spec.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == spec and root.is_dir()):
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        generate_dataset(root, categories=categories, n_train=args.n_train, n_test_good=args.n_test_good,
                         n_test_defect=args.n_test_defect, size=args.size, seed=args.data_seed)
        stamp.write_text(json.dumps(spec))
        log(f"generated {root} in {time.perf_counter() - t0:.0f} s")
    return root, categories, spec


def load_results(path: Path, key: str, *, fresh: bool) -> dict:
    """Results saved by an earlier run with the same settings, or an empty record."""
    if path.is_file() and not fresh:
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved
    return {"key": key, "runs": {}, "clean": {}}


def save_results(path: Path, results: dict) -> None:
    write_text_atomic(path, json.dumps(results, indent=1, default=float))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, help="clean MVTec-layout dataset (MVTec AD, VisA); default: generated")
    p.add_argument("--categories", type=lambda v: v.split(","), help="comma-separated categories [all / default]")
    p.add_argument("--n-train", type=int, default=30, help="generated: good training images per category")
    p.add_argument("--n-test-good", type=int, default=10, help="generated: good test images per category")
    p.add_argument("--n-test-defect", type=int, default=18, help="generated: defective test images per category")
    p.add_argument("--size", type=int, default=256, help="generated: image side in pixels")
    p.add_argument("--data-seed", type=int, default=0, help="generated: dataset seed")
    p.add_argument("--ratios", type=lambda v: [float(x) for x in v.split(",")], default=[0.0, 0.1, 0.2, 0.4])
    p.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1])
    p.add_argument("--iters", type=int, default=DEFAULT_ITERS,
                   help=f"detector training iterations: MeDS Step 3 and every from-scratch baseline "
                        f"(CPU preset: {CPU.value(SelectConfig, 'iters')})")
    p.add_argument("--distill-iters", type=int, default=DEFAULT_ITERS,
                   help=f"MeDS Step 2 iterations (CPU preset: {CPU.value(DistillConfig, 'iters')})")
    p.add_argument("--baseline-iters", type=int,
                   help="iterations of the from-scratch detectors instead of --iters (e.g. Step 2 + Step 3 "
                        "for an equal-compute comparison)")
    p.add_argument("--k", type=float, default=3.0, help="selection margin in MADs at t = T")
    p.add_argument("--baseline-p-final", type=float, default=DINOMALY_P_FINAL,
                   help="hard-mining share of the from-scratch detectors (Dinomaly: 0.9)")
    p.add_argument("--backbone", default=CPU.value(ExtractConfig, "backbone"))
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--width", type=int, default=CPU.value(DistillConfig, "width"))
    p.add_argument("--depth", type=int, default=CPU.value(DistillConfig, "depth"))
    p.add_argument("--heads", type=int, default=CPU.value(DistillConfig, "heads"))
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest on a 2-core machine shared with other work")
    p.add_argument("--work", type=Path, default=None,
                   help=f"work folder: generated data, features, saved results (default {DEFAULT_WORK}; under "
                        f"--smoke a temporary folder, removed at the end)")
    p.add_argument("--fresh", action="store_true", help="ignore saved results of an earlier run")
    p.add_argument("--json", type=Path, help="also write all results here")
    args = smoke_mode.parse_args(p, SMOKE, argv)
    if args.work is None and not args.smoke:
        args.work = DEFAULT_WORK
    if len(args.seeds) < 2:
        p.error("--seeds: give at least 2 seeds (mean ± std needs two)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    given = args.work.expanduser().resolve() if args.work is not None else None
    with smoke_mode.work_folder(given, "bench-accuracy-") as work:
        return run(args, work)


def run(args, work: Path) -> int:
    """Every (ratio, seed) of the command line in `work`, saved results reused; prints the report."""
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    root, categories, data_spec = prepare_data(args, work)
    s = Settings(data=data_spec, backbone=args.backbone, resize=args.resize, crop=args.crop, width=args.width,
                 depth=args.depth, heads=args.heads, distill_iters=args.distill_iters, iters=args.iters,
                 baseline_iters=args.baseline_iters or args.iters, k=args.k,
                 baseline_p_final=args.baseline_p_final, device=device)
    store = Store(work / "store", images_root=root)
    extract_cfg = ExtractConfig(backbone=s.backbone, resize=s.resize, crop=s.crop, device=device)
    train, test = (extract_split(root, store, extract_cfg, split, categories) for split in ("train", "test"))

    results_path = work / RESULTS_NAME
    results = load_results(results_path, digest(asdict(s)), fresh=args.fresh)
    results["settings"] = asdict(s)
    for seed in args.seeds:
        if str(seed) not in results["clean"]:
            results["clean"][str(seed)] = evaluate_clean(seed, train, test, s)
            save_results(results_path, results)
        for ratio in args.ratios:
            if run_id(ratio, seed) in results["runs"]:
                log(f"{run_id(ratio, seed)}: saved result reused")
                continue
            results["runs"][run_id(ratio, seed)] = evaluate_ratio(root, work, ratio, seed, train, test, s,
                                                                  categories)
            save_results(results_path, results)

    wall = time.perf_counter() - started
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=float))
    print(report(args, s, results, categories, wall))
    return 0


def report(args, s: Settings, results: dict, categories: list[str], wall: float) -> str:
    ratios, seeds = args.ratios, args.seeds
    command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_accuracy.py " + " ".join(sys.argv[1:])
    data = (f"--root {s.data['root']}" if "root" in s.data else
            f"generated ({', '.join(categories)}; {args.n_train} train / {args.n_test_good} good test / "
            f"{args.n_test_defect} defective test per category, {args.size} px, data seed {args.data_seed})")
    parts = [
        f"command: `{command.strip()}`",
        f"date: {datetime.date.today().isoformat()}; host: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, threads: {args.threads}, device: {s.device}",
        f"data: {data}",
        f"encoder: {s.backbone} at {s.resize}/{s.crop} px; decoder width {s.width}, depth {s.depth}, heads {s.heads}; "
        f"MeDS {s.distill_iters} + {s.iters} iterations; from-scratch detectors {s.baseline_iters} iterations, "
        f"p_final {s.baseline_p_final}; k = {s.k}",
        f"wall time of this invocation: {wall / 60:.1f} min (saved results reused: see the log)",
        "",
        "Test set, mean over classes, % (mean ± std over seeds " + ", ".join(map(str, seeds)) + "):",
        "",
        accuracy_table(results, ratios, seeds),
        "",
        "Training set: contamination and selection (pooled over classes):",
        "",
        cleaning_table(results, ratios, seeds),
        "",
        time_table(results, ratios, seeds),
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
