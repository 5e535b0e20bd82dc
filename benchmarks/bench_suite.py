"""Selection-quality suite: every cleaning method on contaminated sets, tuning part and report part.

Two parts that share neither image source nor defect generator:

  tuning  the demo generator (`medsclean.demo.synth`: scikit-image textures brick, grass, gravel and the
          coins photo) plus `benchmarks/tuning_data.py` (a scene of unaligned crops and an aligned
          object with logical defects); every default is chosen on this part;
  report  `benchmarks/suite_data.py` (scikit-image tissue and retina photos, scikit-learn china and
          flower photos, aligned objects from other photos; its own defects); the published numbers
          come from this part.

Each class is of one kind: a stationary texture, a scene (unaligned crops of a non-stationary
photo) or an aligned object (a fixed camera); the tables are given per kind as well.

A cell is (noise ratio r, seed, unique or repeated defects). Its training set holds, per class,
the good training images plus min(int(r * N_good), available) defective test images; with
repeated defects each picked defect image comes with its two shifted and rotated copies (the
SoftPatch+ protocol), so a third as many distinct defects fill the same count.

Methods are the `select --method` values with the preset's defaults (knn, iterative, memory,
meds), the combined score `meds+memory` (the geometric mean of MeDS's eta and the memory
ensemble's score, each over its class median) and the `oracle` ceiling (each image against a
full memory of only the truly clean images of its class, leave-self-out: what these features
allow). Cleaning metrics on the
training set: ranking AUROC of the final scores (per class, then the mean), and pooled recall /
precision of the rejected images; per class kind and per defect kind too. Detector after
cleaning: a full-bank kNN detector (PatchCore without coreset, k = 1) on each method's kept
images, plus MeDS's own fine-tuned model, on the test set (with and without the injected images).

The encoder runs once per part; every class's patch-to-image nearest-distance table is computed
once (`medsclean.step1.reduce.nearest_table`, stored and used as float16 whether fresh or cached) and
each cell's Step-1 scores come from it through the same reduction the exact engine uses, so a
cell costs only its MeDS training.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_suite.py --part tuning
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_suite.py --part report --json report.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_suite.py --smoke --part report --work /tmp/s
"""

from __future__ import annotations

import argparse
import json
import math
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
import suite_tables  # noqa: E402
import tuning_data  # noqa: E402

from medsclean.config import CutConfig, DistillConfig, ExtractConfig, ScoreConfig, SelectConfig
from medsclean.presets import CPU, Preset
from medsclean.values import resolve_device
from medsclean.workdir.data import Dataset, ImageRecord, discover, image_id  # noqa: E402
from medsclean.stages.evaluate import EvalConfig, MapSet, detector_metrics, postprocess  # noqa: E402
from medsclean.stages.features import run_extract  # noqa: E402
from medsclean.maps import AGGREGATE_RATIOS, image_scores  # noqa: E402
from medsclean.step1.reduce import nearest_table  # noqa: E402
from medsclean.metrics import image_auroc_score, selection_metrics  # noqa: E402
from medsclean.model.decoder import ReconstructionModel, pool_tokens, upsample_map  # noqa: E402
from medsclean.stages.scores import step1_maps  # noqa: E402
from medsclean.seeding import rng as seeded_rng  # noqa: E402
from medsclean.workdir.artifacts import digest, load_tensors, save_tensors
from medsclean.workdir.atomic import write_text_atomic
from medsclean.workdir.store import Store  # noqa: E402
from medsclean.demo.good_images import DEFAULT_CATEGORIES, SOURCES  # noqa: E402
from medsclean.demo.synth import generate_dataset  # noqa: E402
from medsclean.model.loop import TrainContext  # noqa: E402
from medsclean.model.training import compute_maps, distill, progressive_select  # noqa: E402
from medsclean.stages.common import model_config_for  # noqa: E402
from medsclean.stages.cut import final_cut, final_scores  # noqa: E402
from medsclean.ui import SilentReporter  # noqa: E402

METHODS = ("knn", "iterative", "memory", "meds")
DERIVED = ("meds+memory", "oracle")  # computed from the others' scores / the labels, no training
COPIES = 2  # repeated defects: each picked defect image plus this many shifted/rotated copies
SMOKE = dict(n_train=5, n_test_good=2, n_test_defect=3, size=64, ratios=[0.4], seeds=[0], defects=["repeated"],
             threads=1, banks=4, distill_iters=2, iters=2)
SMOKE_CLASSES = {"tuning": ["brick", "chelsea"], "report": ["tissue", "rocket"]}  # a texture and an object


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ data


def part_classes(part: str) -> dict[str, str]:
    """{class: kind} of a part, kind one of texture / scene / object."""
    if part == "tuning":
        synth = {c: SOURCES[c].kind for c in DEFAULT_CATEGORIES}
        return {**synth, **tuning_data.CLASS_KIND}
    return {c: suite_data.CLASS_KIND[c] for c in suite_data.CATEGORIES}


def prepare_data(part: str, work: Path, args) -> tuple[Path, dict, dict]:
    """The clean base dataset of a part plus its repeated copies (regenerated when the spec changes).

    Returns the root, {copy path: original test image path} and the data spec.
    """
    classes = list(args.classes or part_classes(part))
    spec = {"part": part, "n_train": args.n_train, "n_test_good": args.n_test_good,
            "n_test_defect": args.n_test_defect, "size": args.size, "seed": args.data_seed, "copies": COPIES,
            "classes": classes, "generators": [suite_data.GENERATOR, tuning_data.GENERATOR]}
    root, stamp = work / f"{part}-data", work / f"{part}-data.json"
    if stamp.is_file() and root.is_dir() and json.loads(stamp.read_text())["spec"] == spec:
        return root, json.loads(stamp.read_text())["repeats"], spec
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    counts = dict(n_train=args.n_train, n_test_good=args.n_test_good, n_test_defect=args.n_test_defect,
                  size=args.size, seed=args.data_seed)
    if part == "tuning":
        synth = [c for c in classes if c in DEFAULT_CATEGORIES]
        extra = [c for c in classes if c in tuning_data.CATEGORIES]
        if synth:
            generate_dataset(root, categories=synth, **counts)
        if extra:
            tuning_data.generate(root, categories=extra, **counts)
    else:
        suite_data.generate(root, categories=classes, **counts)
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


def pool_memory(memory: torch.Tensor, pool: int) -> torch.Tensor:
    """(N, H*W, D) L2-normalised patch features averaged over pool x pool windows and normalised
    again: (N, H*W / pool^2, D), as float16 like the stored features."""
    if pool == 1:
        return memory
    pooled = pool_tokens(memory.float(), 0, pool)
    return torch.nn.functional.normalize(pooled, dim=-1).half()


def extract(dataset: Dataset, store: Store, cfg: ExtractConfig, stage: str, step1_pool: int = 1) -> Features:
    result = run_extract(dataset, store, cfg, stage=stage, reporter=SilentReporter())
    art = result.artifact
    log(f"{stage}: {result.n_images} images ({'cached' if result.cached else f'{result.seconds:.0f} s'})")
    encoder = dict(art.manifest["encoder"])
    names = [f"group{g}" for g in range(len(encoder["group_dims"]))]
    tensors = art.sharded_tensors(["index", "memory", *names])
    by_path = {r.rel_path: r for r in dataset.records}
    encoder["step1_grid"] = [side // step1_pool for side in encoder["grid"]]
    return Features([by_path[row["path"]] for row in art.manifest["images"]],
                    pool_memory(tensors["memory"], step1_pool), [tensors[n] for n in names], encoder)


@dataclass
class ClassBase:
    """One class: the candidate training rows (good, defective, copies) and their nearest tables."""

    rows: list[ImageRecord]      # good train images, then defective test images, then copies
    origin: list[str]            # the test image each row stands for ("" for good images)
    memory: torch.Tensor         # (Nb, P, D)
    groups: list[torch.Tensor]
    table: torch.Tensor          # (Nb, P, Nb, k) nearest distances among the rows (float16 values)
    test_table: torch.Tensor     # (Nt, P, Nb, k) nearest distances of the class's test images to the rows
    test_index: np.ndarray       # positions of the class's test images in the test Features


def build_classes(train: Features, test: Features, repeats: Features, mapping: dict,
                  work: Path, device: str, k: int = 1) -> dict[str, ClassBase]:
    """Each class's rows and tables. The tables are kept at float16 precision whether computed now
    or read back, so a cell's result never depends on whether the cache was warm."""
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
        key = digest({"rows": [r.rel_path for r in rows], "encoder": train.encoder, "n": len(test_index),
                      "k": k})[:16]
        path = work / "tables" / f"{cls}-{key}.safetensors"
        if not path.is_file():
            t0 = time.perf_counter()
            table = nearest_table(memory, k=k, device=device)
            test_table = nearest_table(memory, queries=test.memory[test_index], k=k, device=device)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors(path, {"table": table.half(), "test_table": test_table.half()})
            log(f"tables {cls}: {len(rows)} rows, {len(test_index)} test images in {time.perf_counter() - t0:.0f} s")
        saved = load_tensors(path)
        table, test_table = saved["table"].float(), saved["test_table"].float()
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
    defect_kinds: list[str]         # (N,) the defect kind of each row, "" for good images
    injected_origins: set[str]      # test images (rel paths) whose defect is in the training set

    def rid(self) -> str:
        return f"r={self.ratio:g},seed={self.seed},{'repeated' if self.repeated else 'unique'}"


def defect_kind(record: ImageRecord) -> str:
    """The defect kind of a row from its path (`<cls>/test/<kind>/…` or `<cls>/repeats/<kind>/…`)."""
    parts = record.rel_path.split("/")
    return parts[2] if record.label == 1 else ""


def make_cell(bases: dict[str, ClassBase], ratio: float, seed: int, repeated: bool) -> Cell:
    index, contaminated, classes, kinds, origins = {}, [], [], [], set()
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
        kinds += [defect_kind(base.rows[i]) for i in goods + chosen]
        origins |= {base.origin[i] for i in chosen}
    return Cell(ratio, seed, repeated, index, np.array(contaminated), classes, kinds, origins)


def cell_features(bases: dict[str, ClassBase], cell: Cell):
    memory = torch.cat([bases[c].memory[i] for c, i in cell.index.items()])
    n_groups = len(next(iter(bases.values())).groups)
    groups = [torch.cat([bases[c].groups[g][i] for c, i in cell.index.items()]) for g in range(n_groups)]
    tables = {c: bases[c].table[i][:, :, i] for c, i in cell.index.items()}
    return memory, groups, tables


# ------------------------------------------------------------------------------------ methods


@dataclass
class Outcome:
    eta: np.ndarray           # (N,) final scores
    keep: np.ndarray          # (N,) bool
    seconds: float
    model: ReconstructionModel | None = None
    memory_eta: np.ndarray | None = None  # meds: the Step-1 image scores it was taught by
    distilled_eta: np.ndarray | None = None  # meds: the distilled model's image scores (Step 3's start)


@dataclass(frozen=True)
class Settings:
    preset: Preset
    device: str
    step1_pool: int = 1   # Step 1 on features pooled over pool x pool windows (2: the stride-16 grid)


def cut(eta: np.ndarray, classes: list[str], s: Settings) -> np.ndarray:
    """The preset's final cut, as `select` applies it."""
    keep, _ = final_cut(eta, classes, s.preset.build(CutConfig), s.preset.build(SelectConfig).k)
    return keep


def step1_targets(maps: torch.Tensor, s: Settings) -> torch.Tensor:
    """Step-1 maps on the decoder's input grid: maps of a pooled Step 1 are resized back (bilinear)."""
    return upsample_map(maps, s.step1_pool)


def run_method(method: str, cell: Cell, memory, groups, tables, encoder: dict, s: Settings) -> Outcome:
    t0 = time.perf_counter()
    select_cfg = s.preset.build(SelectConfig, method=method)
    score_cfg = select_cfg.step1(s.preset.build(ScoreConfig, seed=cell.seed))
    maps, _ = step1_maps(memory, cell.classes, score_cfg, device=s.device, tables=tables)
    step1_eta = image_scores(maps, ratio=AGGREGATE_RATIOS[score_cfg.aggregate]).double().numpy()
    if method != "meds":
        return Outcome(step1_eta, cut(step1_eta, cell.classes, s), time.perf_counter() - t0)
    distill_cfg = s.preset.build(DistillConfig, checkpoint_every=0)
    model = ReconstructionModel(model_config_for(encoder, distill_cfg), seed=cell.seed)
    distill(model, groups, step1_targets(maps, s), distill_cfg, TrainContext(seed=cell.seed, device=s.device))
    base_maps = compute_maps(model, groups, device=s.device)
    result = progressive_select(model, groups, cell.classes, base_maps, select_cfg, distill_cfg,
                                TrainContext(seed=cell.seed, device=s.device))
    distilled_eta = image_scores(base_maps, ratio=AGGREGATE_RATIOS[score_cfg.aggregate]).double().numpy()
    return Outcome(result.eta, cut(result.eta, cell.classes, s), time.perf_counter() - t0, model, step1_eta,
                   distilled_eta)


def saved_outcome(row: dict | None) -> Outcome | None:
    """A MeDS row read back from the results file (None: not run yet)."""
    if row is None or "memory_eta" not in row:
        return None
    return Outcome(np.array(row["eta"]), np.array(row["keep"], bool), row["seconds"],
                   memory_eta=np.array(row["memory_eta"]))


def combined(cell: Cell, meds: Outcome, s: Settings) -> Outcome:
    """`meds+memory`: the geometric mean of MeDS's eta and the memory ensemble's score, each divided
    by its class median, as `select --final-score eta+memory` (`stages.cut.final_scores`)."""
    stored = {"eta": torch.from_numpy(meds.eta), "memory_score": torch.from_numpy(meds.memory_eta)}
    eta = final_scores(stored, cell.classes, "eta+memory")
    return Outcome(eta, cut(eta, cell.classes, s), 0.0)


def oracle(cell: Cell, tables: dict, s: Settings) -> Outcome:
    """The ceiling: each image against a full memory of only the truly clean images of its class
    (itself left out), nearest distance per patch, the same image score as Step 1."""
    t0 = time.perf_counter()
    eta = np.zeros(len(cell.classes))
    classes = np.array(cell.classes)
    aggregate = s.preset.build(ScoreConfig).aggregate
    for cls, table in tables.items():
        members = np.flatnonzero(classes == cls)
        clean = ~cell.contaminated[members]
        nearest = table[..., 0].clone()                     # (n, P, n)
        nearest[:, :, torch.from_numpy(~clean)] = math.inf  # only clean images in the memory
        diagonal = torch.arange(len(members))
        nearest[diagonal, :, diagonal] = math.inf          # leave self out
        eta[members] = image_scores(nearest.amin(dim=2), ratio=AGGREGATE_RATIOS[aggregate]).double().numpy()
    return Outcome(eta, cut(eta, cell.classes, s), time.perf_counter() - t0)


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


def detector_row(test: Features, token_maps: np.ndarray, cell: Cell | None, grid: tuple[int, int]) -> dict:
    """I-AUROC, P-AP, P-AUPRO (mean over classes) with overlap and, for a cell, without it."""
    cfg = EvalConfig()
    maps = postprocess(test.records, token_maps, tuple(grid), test.encoder["preprocess"], cfg)
    keys = ("image_auroc", "pixel_ap", "aupro")
    row = {f"overlap_{k}": v for k, v in detector_metrics(maps, cfg)[-1].items() if k in keys}
    if cell is not None:
        sel = np.array([r.rel_path not in cell.injected_origins for r in test.records])
        sub = MapSet([r for r, s in zip(maps.records, sel) if s], maps.maps[sel], maps.scores[sel], maps.masks[sel])
        row.update({f"no_overlap_{k}": v for k, v in detector_metrics(sub, cfg)[-1].items() if k in keys})
    return row


# ------------------------------------------------------------------------------------ driver

PRESET_FLAGS = {  # flag -> (stage, field, type)
    "resize": ("extract", "resize", int), "crop": ("extract", "crop", int), "backbone": ("extract", "backbone", str),
    "stages": ("extract", "stages", str),
    "banks": ("score", "banks", int), "rho": ("score", "ratio", float), "score-k": ("score", "k", int),
    "min-bank": ("score", "min_bank", int),
    "width": ("distill", "width", int), "depth": ("distill", "depth", int), "heads": ("distill", "heads", int),
    "distill-iters": ("distill", "iters", int), "lr": ("distill", "lr", float),
    "final-lr": ("distill", "final_lr", float), "token-pool": ("distill", "token_pool", int),
    "iters": ("select", "iters", int), "cut": ("cut", "rule", str), "final-score": ("cut", "score", str),
}


def settings_from(args) -> Settings:
    """The CPU preset with the command line's overrides laid on top (every stage of it kept)."""
    layers = {stage: dict(values) for stage, values in CPU.overlays.items()}
    for flag, (stage, name, _) in PRESET_FLAGS.items():
        value = getattr(args, flag.replace("-", "_"))
        if value is not None:
            layers.setdefault(stage, {})[name] = value
    return Settings(Preset(name="cpu+", overlays=layers), resolve_device(args.device), args.step1_pool)


def run_cell(cell: Cell, bases, test: Features, encoder: dict, s: Settings, methods, detector: bool,
             saved: dict) -> dict:
    """Run `methods` on one cell; `saved` holds the rows of methods run earlier (the combination
    reads MeDS's saved scores from there when MeDS is not run now)."""
    memory, groups, tables = cell_features(bases, cell)
    out = {"n_train": len(cell.classes), "n_injected": int(cell.contaminated.sum()), "methods": {}}
    outcomes = {}
    for method in methods:
        if method == "meds+memory":
            meds = outcomes.get("meds") or saved_outcome(saved.get("meds"))
            if meds is None:
                continue
            outcome = combined(cell, meds, s)
        elif method == "oracle":
            outcome = oracle(cell, tables, s)
        else:
            outcome = run_method(method, cell, memory, groups, tables, encoder, s)
        outcomes[method] = outcome
        row = cleaning_row(cell, outcome)
        if outcome.memory_eta is not None:
            row["memory_eta"], row["distilled_eta"] = outcome.memory_eta.tolist(), outcome.distilled_eta.tolist()
        if detector:
            row["detector"] = detector_row(
                test, knn_detector_maps(bases, cell, outcome.keep, len(test.records)), cell, encoder["step1_grid"])
            if outcome.model is not None:
                own = compute_maps(outcome.model, test.groups, device=s.device).numpy()
                out["methods"]["meds (own model)"] = {"detector": detector_row(test, own, cell, encoder["grid"])}
        out["methods"][method] = row
        log(f"  {cell.rid()} {method}: ranking AUROC {row['ranking_auroc']:.3f}, recall {row['recall']:.2f}, "
            f"precision {row['precision']:.2f} ({row['seconds']:.0f} s)")
    if detector:
        for name, keep in (("no cleaning", np.ones(len(cell.classes), bool)), ("clean bound", ~cell.contaminated)):
            out["methods"][name] = {"detector": detector_row(
                test, knn_detector_maps(bases, cell, keep, len(test.records)), cell, encoder["step1_grid"])}
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("tuning", "report"), required=True)
    p.add_argument("--smoke", action="store_true",
                   help="tiny data and training (numbers meaningless): checks that the suite runs end to end")
    p.add_argument("--ratios", type=lambda v: [float(x) for x in v.split(",")], default=[0.1, 0.2, 0.4])
    p.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1])
    p.add_argument("--defects", type=lambda v: v.split(","), default=["unique", "repeated"],
                   help="unique, repeated or both (comma-separated)")
    p.add_argument("--methods", type=lambda v: v.split(","), default=[*METHODS, *DERIVED])
    p.add_argument("--classes", type=lambda v: v.split(","), help="only these classes of the part")
    p.add_argument("--no-detector", action="store_true", help="skip the detector after cleaning")
    p.add_argument("--n-train", type=int, default=70, help="good training images per class")
    p.add_argument("--n-test-good", type=int, default=20)
    p.add_argument("--n-test-defect", type=int, default=30)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--data-seed", type=int, default=0)
    for flag, (stage, name, kind) in PRESET_FLAGS.items():
        p.add_argument(f"--{flag}", type=kind, help=f"override the CPU preset's {stage} {name}")
    p.add_argument("--step1-pool", type=int, default=1,
                   help="Step 1 (and the kNN baselines and detector) on features pooled over N x N windows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "medsclean-suite")
    p.add_argument("--fresh", action="store_true", help="ignore saved results")
    p.add_argument("--json", type=Path, help="also write all results here")
    args = p.parse_args(argv)
    if args.smoke:  # tiny sizes; the stage options a caller gives still win
        for name, value in SMOKE.items():
            if name in ("banks", "distill_iters", "iters"):
                value = getattr(args, name) or value
            setattr(args, name, value)
        args.classes = args.classes or SMOKE_CLASSES[args.part]
    return args


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
    train = extract(discover(root, layout="mvtec", split="train"), store, extract_cfg, "extract", s.step1_pool)
    test = extract(discover(root, layout="mvtec", split="test"), store, extract_cfg, "extract-test", s.step1_pool)
    repeats = extract(_repeat_dataset(root), store, extract_cfg, "extract-repeats", s.step1_pool)
    k = s.preset.build(ScoreConfig).k
    bases = build_classes(train, test, repeats, mapping, work / f"pool{s.step1_pool}", s.device, k)

    key = digest({"data": spec, "preset": repr(s.preset), "device": s.device, "step1_pool": s.step1_pool})
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
                fresh = run_cell(cell, bases, test, train.encoder, s, todo, not args.no_detector, saved["methods"])
                saved.update({k: v for k, v in fresh.items() if k != "methods"})
                saved["methods"].update(fresh["methods"])
                saved["classes"], saved["contaminated"] = cell.classes, cell.contaminated.astype(int).tolist()
                saved["defect_kinds"] = cell.defect_kinds
                results[cell.rid()] = saved
                write_text_atomic(results_path, json.dumps(results, default=float))
    class_kinds = {c: part_classes(args.part)[c] for c in bases}
    default_row = "meds+memory" if s.preset.build(CutConfig).score == "eta+memory" else "meds"
    payload = {"settings": repr(s.preset), "step1_pool": s.step1_pool, "part": args.part,
               "class_kinds": class_kinds, "default_row": default_row, "results": results}
    if args.json:
        args.json.write_text(json.dumps(payload, default=float))
    header = suite_tables.header(sys.argv[1:], args, s.preset, s.device, time.perf_counter() - started)
    if args.smoke:
        print("SMOKE RUN: sizes are tiny, numbers are meaningless")
    print(suite_tables.report(header, payload, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
