"""`medsclean eval`: the detector on a labelled test set, and the cleaning on a labelled training set.

Detector: anomaly maps of the test images from the fine-tuned model (`select`), the distilled
model (`distill`) or the memory ensemble of the training features (`memory`), post-processed as
the paper's protocol (bilinear to the crop, resize to 256, 5×5 Gaussian σ 4, image score = mean of
the top 1 % pixels), scored per class with I-AUROC, I-AP, P-AUROC, P-AP and P-AUPRO.
Cleaning: precision/recall/F1 of the rejected set, ranking AUROC/AUPRC and inspection depth of
the selection scores, and pixel metrics of the training maps against the contaminants' masks.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsclean.config import EvalConfig
from medsclean.workdir.data import Dataset, ImageRecord, discover, mvtec_categories
from medsclean.errors import ConfigError, DataError
from medsclean.workdir.images import read_mask
from medsclean.stages.common import load_groups, load_model, stage_times
from medsclean.workdir.artifacts import Artifact

IMAGE_KEYS = ("image_auroc", "image_ap")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "aupro")
SELECTION_KEYS = ("precision", "recall", "f1", "ranking_auroc", "ranking_auprc", "inspection_depth")
METRICS_SCHEMA = "medsclean.metrics/1"


@dataclass(frozen=True)
class EvalInputs:
    """What the eval stage measures: a run's stage results and its images.

    Attributes:
        results: the run's stage results by stage name: extract, score and, as the model needs,
            distill, select and cut.
        train: the training images.
        test: the labelled test images (`labelled_test_set`), or None.
        test_features: the extract artifact of `test` (None without a test set).
        device: where the models run.
        seed: the run's seed, and `preset` its preset's name (recorded in metrics.json).
    """

    results: dict
    train: Dataset
    test: Dataset | None
    test_features: Artifact | None
    device: str
    seed: int
    preset: str


@dataclass
class MapSet:
    """Post-processed maps of a set of images, with what is needed to score and picture them."""

    records: list[ImageRecord]
    maps: np.ndarray          # (N, size, size) float32
    scores: np.ndarray        # (N,) float32 image scores
    masks: np.ndarray | None  # (N, size, size) bool, None when no image has a mask


def token_maps_from_model(art: Artifact, groups: list, *, device: str) -> np.ndarray:
    """(N, H·W) maps of a stored reconstruction model on stored groups."""
    from medsclean.model.training import compute_maps

    return compute_maps(load_model(art), groups, device=device).numpy()


def token_maps_from_memory(train_features: Artifact, scores: Artifact, test_memory, test_classes: list[str], *,
                           device: str) -> np.ndarray:
    """(N_test, H·W) memory-ensemble maps of test images against the training set's memories.

    Each class reuses the exact banks of the Step-1 run (stored as positions in the whole
    training set), so the test images meet the same memories as the training images did.
    """
    import torch

    from medsclean.step1.engines.exact import memory_scores_exact

    train_memory = train_features.sharded_tensors(["index", "memory"])["memory"]
    train_classes = [row["class"] for row in train_features.manifest["images"]]
    per_class = scores.manifest["config"]["per_class"]
    banks = scores.tensors("banks.safetensors")
    out = np.zeros((len(test_classes), test_memory.shape[1]), np.float32)
    for cls in sorted(set(test_classes)):
        key = cls if per_class else next(iter(k[len("banks/"):] for k in banks))
        if f"banks/{key}" not in banks:
            raise DataError(f"class {cls!r} of the test set has no training images; evaluate with a model "
                            f"(--model select or distill) or add training images of that class")
        train_idx = [i for i, c in enumerate(train_classes) if c == cls or not per_class]
        test_idx = [i for i, c in enumerate(test_classes) if c == cls]
        local = np.full(len(train_classes), -1, np.int64)  # stored banks hold positions in the whole set
        local[train_idx] = np.arange(len(train_idx))
        class_banks = local[banks[f"banks/{key}"].numpy()]
        both = torch.cat([train_memory[train_idx], test_memory[test_idx]])
        maps = memory_scores_exact(both, class_banks, leave_self_out=False, device=device)
        out[test_idx] = maps[len(train_idx):].numpy()
    return out


def postprocess(records: list[ImageRecord], token_maps: np.ndarray, grid: tuple[int, int], preprocess: dict,
                cfg: EvalConfig) -> MapSet:
    """Token maps → evaluation maps and image scores; masks cropped and resized the same way."""
    import torch

    from medsclean.maps import crop_masks, image_scores, postprocess_maps, resize_masks

    maps = postprocess_maps(torch.from_numpy(token_maps).reshape(-1, *grid), crop=preprocess["crop"],
                            size=cfg.size, sigma=cfg.sigma, kernel=cfg.kernel)
    scores = image_scores(maps, ratio=cfg.top_ratio).numpy()
    masks = None
    if any(r.mask is not None for r in records):
        masks = np.zeros((len(records), cfg.size, cfg.size), bool)
        for i, r in enumerate(records):
            if r.mask is None:
                continue
            from PIL import Image

            with Image.open(r.path) as img:
                size = img.size
            m = torch.from_numpy(read_mask(r.mask, size))[None]
            m = crop_masks(m, resize=preprocess["resize"], crop=preprocess["crop"])
            masks[i] = resize_masks(m, size=cfg.size, threshold=cfg.mask_threshold)[0].numpy()
    return MapSet(records=records, maps=maps.numpy(), scores=scores, masks=masks)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def detector_metrics(maps: MapSet, cfg: EvalConfig) -> list[dict]:
    """Per-class I-AUROC, I-AP, P-AUROC, P-AP, P-AUPRO, then their mean over classes."""
    from medsclean.metrics import image_ap_score, image_auroc_score, pixel_metrics

    rows = []
    classes = np.array([r.cls for r in maps.records])
    labels = np.array([r.label if r.label is not None else -1 for r in maps.records])
    if (labels < 0).any():
        raise DataError("some test images have no label; use the MVTec layout or --masks so every test image "
                        "is labelled")
    for cls in sorted(set(classes.tolist())):
        sel = classes == cls
        row = {"class": cls, "images": int(sel.sum()), "anomalous": int(labels[sel].sum())}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row["image_auroc"] = image_auroc_score(labels[sel], maps.scores[sel])
            row["image_ap"] = image_ap_score(labels[sel], maps.scores[sel])
            if maps.masks is not None:
                row.update(pixel_metrics(maps.masks[sel], maps.maps[sel], fpr_limit=cfg.fpr_limit))
            else:
                row.update({k: float("nan") for k in PIXEL_KEYS})
        rows.append(row)
    return rows + [_mean_row(rows, IMAGE_KEYS + PIXEL_KEYS)]


def _mean_row(rows: list[dict], keys: tuple[str, ...]) -> dict:
    mean = {"class": "mean", "images": sum(r["images"] for r in rows)}
    if "anomalous" in rows[0]:
        mean["anomalous"] = sum(r["anomalous"] for r in rows)
    mean.update({k: _nanmean([r.get(k, float("nan")) for r in rows]) for k in keys})
    return mean


def cleaning_metrics(dataset: Dataset, selection: Artifact, train_maps: MapSet | None, cfg: EvalConfig) -> list[dict]:
    """Per-class selection metrics of a cleaned training set whose contaminants are known."""
    from medsclean.metrics import pixel_metrics, selection_metrics

    by_path = {r.rel_path: r for r in dataset.records}
    images = selection.manifest["images"]
    missing = [row["path"] for row in images if row["path"] not in by_path]
    if missing:
        raise DataError(f"{missing[0]}: in the selection but not in {dataset.root}; rerun `medsclean select`")
    labels = np.array([by_path[row["path"]].label or 0 for row in images], dtype=bool)
    classes = np.array([row["class"] for row in images])
    tensors = selection.tensors("selection.safetensors")
    keep, eta = tensors["keep"].numpy().astype(bool), tensors["eta"].double().numpy()
    rows = []
    for cls in sorted(set(classes.tolist())):
        sel = classes == cls
        row = {"class": cls, "images": int(sel.sum()), "contaminants": int(labels[sel].sum()),
               "rejected": int((~keep[sel]).sum())}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row.update(selection_metrics(labels[sel], ~keep[sel], eta[sel]))
            if train_maps is not None and train_maps.masks is not None:
                px = pixel_metrics(train_maps.masks[sel], train_maps.maps[sel], fpr_limit=cfg.fpr_limit)
                row.update({f"train_{k}": v for k, v in px.items()})
        rows.append(row)
    keys = SELECTION_KEYS + tuple(f"train_{k}" for k in PIXEL_KEYS if train_maps is not None)
    mean = _mean_row(rows, keys)
    mean["contaminants"] = int(labels.sum())
    mean["rejected"] = int((~keep).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        overall = selection_metrics(labels, ~keep, eta)
    return rows + [mean, {"class": "all (pooled)", "images": len(images), "contaminants": int(labels.sum()),
                          "rejected": int((~keep).sum()), **overall}]


def rows_to_csv(sections: dict[str, list[dict]]) -> str:
    """One CSV for several tables: a `section` column, then the union of the tables' columns."""
    keys: list[str] = []
    for rows in sections.values():
        for row in rows:
            keys.extend(k for k in row if k not in keys)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["section", *keys])
    for section, rows in sections.items():
        for row in rows:
            writer.writerow([section, *(f"{row[k]:.6f}" if isinstance(row.get(k), float) else row.get(k, "")
                                        for k in keys)])
    return buf.getvalue()


def protocol_settings(cfg: EvalConfig, preprocess: dict) -> dict:
    return {**cfg.protocol(), "resize": preprocess["resize"], "crop": preprocess["crop"],
            "map_upsampling": "bilinear (align_corners) to the crop, bilinear to size",
            "blur": f"{cfg.kernel}x{cfg.kernel} Gaussian sigma {cfg.sigma}, zero padding",
            "image_score": f"mean of the top {cfg.top_ratio:.0%} pixels",
            "gt": f"masks resized like the images, nearest to {cfg.size}, binarised > {cfg.mask_threshold}",
            "aupro": f"exact, 8-connected regions, integrated to FPR {cfg.fpr_limit} and normalised",
            "ap": "step-wise (as scikit-learn average_precision_score)"}


def display_image(record: ImageRecord, preprocess: dict, size: int) -> np.ndarray:
    """The image as the model saw it (resize, centre crop), at the evaluation size: uint8 (size, size, 3)."""
    from PIL import Image

    from medsclean.workdir.images import decode_image

    img = decode_image(record.path).resize((preprocess["resize"], preprocess["resize"]), Image.Resampling.BILINEAR)
    off = (preprocess["resize"] - preprocess["crop"]) // 2
    img = img.crop((off, off, off + preprocess["crop"], off + preprocess["crop"]))
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))


def build_report(report_dir: Path, selection: Artifact | None, train_maps: MapSet | None, test_maps: MapSet | None,
                 sections: dict[str, list[dict]], protocol: dict, *, top: int = 24) -> Path:
    """Overlays of the most suspicious images and the self-contained `report.html`.

    With a selection, the gallery ranks the training images by their final selection score η
    and the histograms show kept against rejected images with each class's threshold τ;
    otherwise it ranks the test images by their image score.
    """
    from medsclean.pages.report import overlay_png, write_html_report

    report_dir = Path(report_dir)
    (report_dir / "overlays").mkdir(parents=True, exist_ok=True)
    preprocess = {"resize": protocol["resize"], "crop": protocol["crop"]}
    if selection is not None and train_maps is not None:
        tensors = selection.tensors("selection.safetensors")
        suspicion, keep = tensors["eta"].double().numpy(), tensors["keep"].numpy().astype(bool)
        maps, threshold, title = train_maps, selection.manifest["tau"], "medsclean: training-set cleaning"
    else:
        maps, threshold, title = test_maps, None, "medsclean: detector on the test set"
        suspicion, keep = maps.scores.astype(np.float64), None
    order = np.argsort(-suspicion, kind="stable")[:top]
    heat_range = (float(np.percentile(maps.maps, 1)), float(np.percentile(maps.maps, 99.9)))
    overlays = {}
    for rank, i in enumerate(order, start=1):
        rec = maps.records[i]
        mask = maps.masks[i] if maps.masks is not None and rec.mask is not None else None
        path = report_dir / "overlays" / f"{rank:03d}-{rec.id}.png"
        overlay_png(display_image(rec, preprocess, maps.maps.shape[-1]), maps.maps[i], mask, path,
                    caption=f"#{rank} {rec.rel_path}  score {suspicion[i]:.4f}", heat_range=heat_range)
        overlays[i] = path.relative_to(report_dir).as_posix()
    score_rows = [{"path": r.rel_path, "class": r.cls, "score": float(suspicion[i]),
                   "kept": None if keep is None else bool(keep[i]), "label": r.label, "overlay_png": overlays.get(i)}
                  for i, r in enumerate(maps.records)]
    metrics_rows = [{"section": name, **row} for name, rows in sections.items() for row in rows]
    return write_html_report(report_dir, title=title, metrics_rows=metrics_rows, score_rows=score_rows,
                             threshold=threshold, settings=protocol)


def run_eval(inputs: EvalInputs, cfg: EvalConfig, out_dir: Path, report_dir: Path | None = None) -> dict:
    """Evaluate the detector on the test set and, where contaminants are known, the cleaning.

    Writes `metrics.json` and `metrics.csv` into `out_dir` and, with `report_dir`, the HTML report;
    returns the payload of metrics.json with "files" (the paths written) added.

    Raises:
        DataError: neither a labelled test set nor known contaminants in the training set.
    """
    from medsclean.workdir.atomic import write_json_atomic, write_text_atomic

    results = inputs.results
    preprocess = results["extract"].artifact.manifest["encoder"]["preprocess"]
    payload: dict = {"model": cfg.model, "run": None, "protocol": protocol_settings(cfg, preprocess),
                     "stages": stage_times(results)}
    sections: dict[str, list[dict]] = {}
    test_maps = train_maps = None
    if inputs.test is not None:
        test_maps = _test_maps(inputs, cfg)
        sections["detector"] = detector_metrics(test_maps, cfg)
    if "select" in results and any(r.label == 1 for r in inputs.train.records):
        train_maps = _train_maps(inputs, cfg)
        sections["cleaning"] = cleaning_metrics(inputs.train, results["cut"].artifact, train_maps, cfg)
    if not sections:
        raise DataError(f"{inputs.train.root}: nothing to evaluate: no labelled test split (MVTec layout with test/ "
                        f"and ground_truth/) and no known contaminants in the training set (medsclean make-noisy)")
    payload.update(sections)
    payload["run"] = _run_identity(inputs)  # after the test features: their libraries are loaded
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / "metrics.json", {"schema": METRICS_SCHEMA, **payload})
    write_text_atomic(out_dir / "metrics.csv", rows_to_csv(sections))
    payload["files"] = {"metrics_json": str(out_dir / "metrics.json"), "metrics_csv": str(out_dir / "metrics.csv")}
    if report_dir is not None:
        selection = results["cut"].artifact if "cut" in results and train_maps is not None else None
        payload["files"]["report"] = str(build_report(report_dir, selection, train_maps, test_maps, sections,
                                                      payload["protocol"], top=cfg.report_top))
    return payload


def _run_identity(inputs: EvalInputs) -> dict:
    """What metrics.json needs to say which run it measured."""
    from medsclean.workdir.artifacts import versions

    results = inputs.results
    encoder = results["extract"].artifact.manifest["encoder"]
    return {"key": results["cut"].artifact.key if "cut" in results else None,
            "artifacts": {stage: r.artifact.key for stage, r in results.items()},
            "backbone": encoder["name"], "weights_sha256": encoder.get("weights_sha256"), "seed": inputs.seed,
            "preset": inputs.preset, "versions": versions()}


def labelled_test_set(train: Dataset, test_dir: Path | None, test_masks: Path | None,
                      class_from: str) -> Dataset | None:
    """The labelled test set: `--test DIR --test-masks DIR` (classes named as `class_from` says),
    else the MVTec root's test split, else none."""
    if test_dir is not None:
        if test_masks is None:
            raise ConfigError(("test_dir", "test_masks"), "test images need a folder of masks: they are labelled by "
                              "their masks (an image without a non-empty mask is normal)")
        return discover(test_dir, layout="folder", masks=test_masks, class_from=class_from)
    if train.layout == "mvtec" and any((c / "test").is_dir() for c in mvtec_categories(train.root)):
        return discover(train.root, layout="mvtec", split="test")
    return None


def records_in_order(dataset: Dataset, art: Artifact) -> list[ImageRecord]:
    """The dataset's records in the order of an artifact's images."""
    by_path = {r.rel_path: r for r in dataset.records}
    return [by_path[row["path"]] for row in art.manifest["images"]]


def _test_maps(inputs: EvalInputs, cfg: EvalConfig) -> MapSet:
    """Test-image maps of the model `cfg.model` names, or of the memory ensemble."""
    results, test_art = inputs.results, inputs.test_features
    encoder = results["extract"].artifact.manifest["encoder"]
    records = records_in_order(inputs.test, test_art)
    memory_selection = cfg.model == "select" and results["select"].artifact.manifest["model"] is None
    if cfg.model == "memory" or memory_selection:  # `select --method memory` trains no model
        memory = test_art.sharded_tensors(["index", "memory"])["memory"]
        tokens = token_maps_from_memory(results["extract"].artifact, results["score"].artifact, memory,
                                        [r.cls for r in records], device=inputs.device)
    else:
        groups, _ = load_groups(test_art)
        tokens = token_maps_from_model(results[cfg.model].artifact, groups, device=inputs.device)
    return postprocess(records, tokens, tuple(encoder["grid"]), encoder["preprocess"], cfg)


def _train_maps(inputs: EvalInputs, cfg: EvalConfig) -> MapSet:
    """Training-image maps of the selection's model (method meds) or the Step-1 maps (method memory)."""
    encoder = inputs.results["extract"].artifact.manifest["encoder"]
    records = records_in_order(inputs.train, inputs.results["select"].artifact)
    return postprocess(records, train_tokens(inputs.results, device=inputs.device), tuple(encoder["grid"]),
                       encoder["preprocess"], cfg)


def train_tokens(results: dict, *, device: str) -> np.ndarray:
    """(N, P) token maps of the training images: the fine-tuned model's, or Step 1's without a model."""
    select_art = results["select"].artifact
    if select_art.manifest["model"] is None:
        return results["score"].artifact.tensors("scores.safetensors", ["maps"])["maps"].numpy()
    groups, _ = load_groups(results["extract"].artifact)
    return token_maps_from_model(select_art, groups, device=device)
