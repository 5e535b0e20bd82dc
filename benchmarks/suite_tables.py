"""Markdown tables of a selection-quality suite run (`bench_suite.py`), from its results.

Also a script: prints every table of a saved `bench_suite.py --json` file, so a published table
can be rebuilt without rerunning anything; given several files (one per setting of a lever, on
the same cells), prints one comparison row per file instead.

    .venv/bin/python benchmarks/suite_tables.py /tmp/medsclean-suite/report.json
    .venv/bin/python benchmarks/suite_tables.py a.json b.json --labels "width 64,width 128"
    .venv/bin/python benchmarks/suite_tables.py --smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import warnings
from pathlib import Path

import numpy as np

METHOD_ORDER = ("knn", "iterative", "memory", "meds", "meds+memory", "oracle")
KIND_ORDER = ("texture", "scene", "object")


def _mean(values) -> str:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return f"{float(np.mean(finite)):.3f}" if finite else "–"


def _methods(results: dict) -> list[str]:
    present = {m for cell in results.values() for m in cell["methods"] if "eta" in cell["methods"][m]}
    return [m for m in METHOD_ORDER if m in present]


def _cell_ids(results: dict) -> tuple[list[float], list[str], list[int]]:
    ratios, kinds, seeds = set(), set(), set()
    for rid in results:
        r, seed, kind = rid.split(",")
        ratios.add(float(r[2:]))
        seeds.add(int(seed[5:]))
        kinds.add(kind)
    return sorted(ratios), [k for k in ("unique", "repeated") if k in kinds], sorted(seeds)


def _cells(results: dict, ratio=None, kind=None) -> list[dict]:
    out = []
    for rid, cell in results.items():
        r, _, k = rid.split(",")
        if (ratio is None or float(r[2:]) == ratio) and (kind is None or k == kind):
            out.append(cell)
    return out


def cleaning_table(results: dict) -> str:
    """Ranking AUROC / recall / precision per (r, defects) and method, mean over seeds."""
    methods = _methods(results)
    ratios, kinds, _ = _cell_ids(results)
    head = "| r | defects | true share | " + " | ".join(f"{m}: rank AUROC / recall / precision" for m in methods)
    lines = [head + " |", "|---|---|---|" + "---|" * len(methods)]
    for ratio in ratios:
        for kind in kinds:
            cells = _cells(results, ratio, kind)
            if not cells:
                continue
            share = _mean([c["n_injected"] / c["n_train"] for c in cells])
            parts = []
            for m in methods:
                rows = [c["methods"][m] for c in cells if m in c["methods"]]
                parts.append(" / ".join(_mean([r[k] for r in rows]) for k in ("ranking_auroc", "recall", "precision")))
            lines.append(f"| {ratio:g} | {kind} | {share} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def class_kind_auroc(results: dict, class_kinds: dict, method: str, kind: str | None, defects: str | None) -> float:
    """Mean ranking AUROC of `method` over the cells with `defects` and the classes of class kind `kind`."""
    values = []
    for cell in _cells(results, kind=defects):
        row = cell["methods"].get(method)
        if row is None or "ranking_auroc_per_class" not in row:
            continue
        values += [v for c, v in row["ranking_auroc_per_class"].items()
                   if (kind is None or class_kinds.get(c) == kind) and v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def summary_table(results: dict, class_kinds: dict) -> str:
    """Mean ranking AUROC over every cell, per method: all classes, then per class kind, unique and
    repeated defects apart."""
    methods = _methods(results)
    _, defects, _ = _cell_ids(results)
    kinds = [k for k in KIND_ORDER if k in set(class_kinds.values())]
    cols = [(None, d) for d in defects] + [(k, d) for k in kinds for d in defects]
    head = "| method | " + " | ".join(f"{k or 'all classes'}, {d}" for k, d in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    for m in methods:
        values = [class_kind_auroc(results, class_kinds, m, k, d) for k, d in cols]
        lines.append(f"| {m} | " + " | ".join("–" if math.isnan(v) else f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines)


def defect_kind_auroc(results: dict, method: str) -> dict[str, float]:
    """{defect kind: mean ranking AUROC of that kind's contaminants against the good images of their
    class}, mean over classes and cells."""
    from medsclean.metrics import image_auroc_score

    values: dict[str, list[float]] = {}
    for cell in results.values():
        row = cell["methods"].get(method)
        if row is None or "eta" not in row or "defect_kinds" not in cell:
            continue
        eta, classes, kinds = np.array(row["eta"]), np.array(cell["classes"]), np.array(cell["defect_kinds"])
        for cls in set(cell["classes"]):
            good = (classes == cls) & (kinds == "")
            for kind in set(kinds[(classes == cls) & (kinds != "")].tolist()):
                bad = (classes == cls) & (kinds == kind)
                sel = good | bad
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    values.setdefault(kind, []).append(image_auroc_score(bad[sel].astype(int), eta[sel]))
    return {k: float(np.nanmean(v)) for k, v in sorted(values.items())}


def defect_kind_table(results: dict) -> str:
    """Ranking AUROC per defect kind and method (every cell)."""
    methods = _methods(results)
    per = {m: defect_kind_auroc(results, m) for m in methods}
    kinds = sorted({k for v in per.values() for k in v})
    lines = ["| method | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{per[m][k]:.2f}" if k in per[m] else "–" for k in kinds) + " |")
    return "\n".join(lines)


def _final_candidates(row: dict, classes: list[str]) -> dict[str, np.ndarray]:
    """The scores a MeDS run could end on, from its saved row: Step 3's eta, the distilled model's,
    the memory ensemble's, and the combinations `--final-score eta+memory` makes."""
    from medsclean.selection.progressive import combine_class_scores

    eta, memory = np.array(row["eta"]), np.array(row["memory_eta"])
    out = {"eta (paper)": eta, "memory": memory, "eta+memory": combine_class_scores([eta, memory], classes)}
    if "distilled_eta" in row:
        distilled = np.array(row["distilled_eta"])
        out["distilled"] = distilled
        out["distilled+memory"] = combine_class_scores([distilled, memory], classes)
    return out


def final_score_table(results: dict, class_kinds: dict) -> str:
    """Mean ranking AUROC of each score a MeDS run could end on (same runs, no retraining), with
    unique and repeated defects, over all classes and per class kind."""
    from medsclean.metrics import image_auroc_score

    _, defects, _ = _cell_ids(results)
    kinds = [k for k in KIND_ORDER if k in set(class_kinds.values())]
    cols = [(None, d) for d in defects] + [(k, d) for k in kinds for d in defects]
    values: dict[str, dict[tuple, list[float]]] = {}
    for rid, cell in results.items():
        row = cell["methods"].get("meds")
        if row is None or "memory_eta" not in row:
            continue
        defect = rid.split(",")[2]
        labels, classes = np.array(cell["contaminated"]), np.array(cell["classes"])
        for name, score in _final_candidates(row, cell["classes"]).items():
            for cls in set(cell["classes"]):
                sel = classes == cls
                auc = image_auroc_score(labels[sel], score[sel])
                for col in ((None, defect), (class_kinds.get(cls), defect)):
                    values.setdefault(name, {}).setdefault(col, []).append(auc)
    if not values:
        return "(no MeDS run with saved Step-1 scores)"
    lines = ["| final score | " + " | ".join(f"{k or 'all classes'}, {d}" for k, d in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, by_col in values.items():
        lines.append(f"| {name} | " + " | ".join(_mean(by_col.get(c, [])) for c in cols) + " |")
    return "\n".join(lines)


def kind_recall_precision(results: dict, class_kinds: dict, method: str, ratio: float, kind: str) -> tuple:
    """Pooled recall and precision of `method`'s rejected images over the classes of class kind
    `kind` and every cell at `ratio` (both defect settings, every seed)."""
    tp = fp = fn = 0
    for cell in _cells(results, ratio):
        row = cell["methods"].get(method)
        if row is None or "keep" not in row:
            continue
        on = np.array([class_kinds.get(c) == kind for c in cell["classes"]])
        bad, rejected = np.array(cell["contaminated"], bool)[on], ~np.array(row["keep"], bool)[on]
        tp, fp, fn = tp + int((bad & rejected).sum()), fp + int((~bad & rejected).sum()), fn + int((bad & ~rejected).sum())
    return (tp / (tp + fn) if tp + fn else math.nan), (tp / (tp + fp) if tp + fp else math.nan)


def targets_table(results: dict, class_kinds: dict, method: str) -> str:
    """The acceptance targets of the accuracy work, measured for `method` (the default's row)."""
    auc = {(m, d): class_kind_auroc(results, class_kinds, m, None, d)
           for m in ("knn", "memory", "oracle", method) for d in ("unique", "repeated")}
    lines = ["| target | measured | verdict |", "|---|---|---|"]

    def add(text: str, measured: str, ok: bool) -> None:
        lines.append(f"| {text} | {measured} | {'met' if ok else '**missed**'} |")

    u, r = auc[(method, "unique")], auc[(method, "repeated")]
    add("ranking AUROC ≥ memory + 0.03, unique", f"{u:.3f} vs {auc[('memory', 'unique')]:.3f} "
        f"({u - auc[('memory', 'unique')]:+.3f})", u >= auc[("memory", "unique")] + 0.03)
    add("ranking AUROC ≥ kNN + 0.02, unique", f"{u:.3f} vs {auc[('knn', 'unique')]:.3f} "
        f"({u - auc[('knn', 'unique')]:+.3f})", u >= auc[("knn", "unique")] + 0.02)
    add("ranking AUROC ≥ memory + 0.02, repeated", f"{r:.3f} vs {auc[('memory', 'repeated')]:.3f} "
        f"({r - auc[('memory', 'repeated')]:+.3f})", r >= auc[("memory", "repeated")] + 0.02)
    add("within 0.03 of the clean-memory oracle, unique", f"{u:.3f} vs {auc[('oracle', 'unique')]:.3f} "
        f"({u - auc[('oracle', 'unique')]:+.3f})", u >= auc[("oracle", "unique")] - 0.03)
    ratios, _, _ = _cell_ids(results)
    for ratio in [x for x in ratios if x in (0.2, 0.4)]:
        rec, prec = kind_recall_precision(results, class_kinds, method, ratio, "object")
        add(f"aligned objects, r = {ratio:g}: rejected recall ≥ 0.8 at precision ≥ 0.8", f"{rec:.2f} / {prec:.2f}",
            rec >= 0.8 and prec >= 0.8)
    return "\n".join(lines).replace("nan", "–")


def detector_table(results: dict) -> str:
    names = ["no cleaning", *_methods(results), "meds (own model)", "clean bound"]
    ratios, kinds, _ = _cell_ids(results)
    cols = [(r, kind) for r in ratios for kind in kinds]
    head = "| detector | " + " | ".join(f"r={r:g} {k}: I-AUROC ov / no-ov, P-AP ov" for r, k in cols)
    lines = [head + " |", "|---|" + "---|" * len(cols)]
    for name in names:
        parts = []
        for r, kind in cols:
            ds = [c["methods"][name]["detector"] for c in _cells(results, r, kind)
                  if name in c["methods"] and "detector" in c["methods"][name]]
            parts.append(" / ".join(_mean([d[k] for d in ds]) for k in ("overlap_image_auroc", "no_overlap_image_auroc"))
                         + ", " + _mean([d["overlap_pixel_ap"] for d in ds]))
        if any(p != "– / –, –" for p in parts):
            lines.append(f"| {name} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def time_table(results: dict) -> str:
    lines = ["| method | seconds per cell (mean) |", "|---|---|"]
    for m in _methods(results):
        secs = [c["methods"][m]["seconds"] for c in results.values() if m in c["methods"]]
        lines.append(f"| {m} | {np.mean(secs):.1f} |")
    return "\n".join(lines)


def header(argv: list[str], args, preset, device: str, wall: float) -> str:
    import torch

    from medsclean.config import DistillConfig, ExtractConfig, ScoreConfig, SelectConfig

    e, sc, d, se = (preset.build(c) for c in (ExtractConfig, ScoreConfig, DistillConfig, SelectConfig))
    cut = preset.overlays.get("cut", {}).get("rule", "mad")
    return "\n".join([
        f"command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_suite.py {' '.join(argv)}`",
        f"date: {datetime.date.today().isoformat()}; host: {platform.machine()}, torch {torch.__version__}, "
        f"threads {args.threads}, device {device}; wall {wall / 60:.1f} min (saved cells reused)",
        f"settings: {e.backbone} {e.resize or 'native'}/{e.crop or 'native'} px, Step 1 B = {sc.banks}, "
        f"rho = {sc.ratio:g}, k = {sc.k}, min bank {sc.min_bank}, Step-1 pool {args.step1_pool}; decoder width "
        f"{d.width} depth {d.depth}, token pool {d.token_pool}, lr {d.lr:g}, {d.iters} + {se.iters} iterations; "
        f"cut {cut}"])


def _target_method(payload: dict) -> str | None:
    """The row that stands for the default `select` (the preset's final score), when it and the
    baselines were run."""
    methods = _methods(payload["results"])
    row = payload.get("default_row", "meds")
    return row if row in methods and "knn" in methods and "memory" in methods else None


def report(head: str, payload: dict, args=None) -> str:
    results, kinds = payload["results"], payload.get("class_kinds", {})
    part = payload.get("part", "?")
    return "\n".join([
        head, "", f"Cleaning ({part} part; ranking AUROC per class then the mean; recall / precision pooled; "
        "mean over seeds):", "", cleaning_table(results), "",
        "Mean ranking AUROC over all cells, per class kind:", "", summary_table(results, kinds), "",
        "What a MeDS run could end on (the same runs' scores; ranking AUROC, mean over classes and cells):", "",
        final_score_table(results, kinds), "",
        "Per defect kind (ranking AUROC of the kind's contaminants against the good images of their class):", "",
        defect_kind_table(results), "",
        *([f"Targets, for the {target} row:", "", targets_table(results, kinds, target), ""]
          if (target := _target_method(payload)) else []),
        "Detector after cleaning (kNN detector on the kept images; MeDS's own model; mean over classes and seeds):",
        "", detector_table(results), "", time_table(results)])


COMPARED = ("knn", "memory", "oracle", "meds", "meds+memory")


def compare_table(payloads: list[dict], labels: list[str]) -> str:
    """One row per run: mean ranking AUROC of each method with unique and repeated defects, per
    class kind, and MeDS's seconds per cell, over the cells every run holds (listed below the table)."""
    common = set.intersection(*(set(p["results"]) for p in payloads))
    if not common:
        raise SystemExit("the runs share no cell; compare runs of the same --ratios/--seeds/--defects")
    payloads = [{**p, "results": {c: p["results"][c] for c in sorted(common)}} for p in payloads]
    kinds = [k for k in KIND_ORDER if k in set(payloads[0].get("class_kinds", {}).values())]
    head = ["setting", *[f"{m} {d}" for m in COMPARED for d in ("unique", "repeated")],
            *[f"meds {k} u/r" for k in kinds], "meds s/cell"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label, payload in zip(labels, payloads):
        results, ck = payload["results"], payload.get("class_kinds", {})
        row = [label]
        for m in COMPARED:
            row += [f"{class_kind_auroc(results, ck, m, None, d):.3f}" for d in ("unique", "repeated")]
        for k in kinds:
            row.append(" / ".join(f"{class_kind_auroc(results, ck, 'meds', k, d):.3f}" for d in ("unique", "repeated")))
        secs = [c["methods"]["meds"]["seconds"] for c in results.values() if "meds" in c["methods"]]
        row.append(f"{np.mean(secs):.0f}" if secs else "–")
        lines.append("| " + " | ".join(row).replace("nan", "–") + " |")
    lines += ["", f"cells: {'; '.join(sorted(common))}"]
    return "\n".join(lines)


def smoke_payload(rng: np.random.Generator) -> dict:
    """A tiny made-up results file of the shape bench_suite.py writes (two classes, two cells)."""
    results = {}
    for rid in ("r=0.2,seed=0,unique", "r=0.2,seed=0,repeated"):
        contaminated = np.array([0, 0, 0, 1, 0, 0, 0, 1])
        classes = ["a"] * 4 + ["b"] * 4
        kinds = ["", "", "", "crack", "", "", "", "stain"]
        methods = {}
        for m in METHOD_ORDER:
            eta = rng.random(8) + contaminated
            methods[m] = {"eta": eta.tolist(), "keep": (eta < 1).astype(int).tolist(), "seconds": 1.0,
                          "memory_eta": (eta + 0.5).tolist(), "distilled_eta": (eta + 1.0).tolist(),
                          "ranking_auroc": 1.0, "ranking_auroc_per_class": {"a": 1.0, "b": 1.0},
                          "recall": 1.0, "precision": 1.0}
        results[rid] = {"n_train": 8, "n_injected": 2, "classes": classes, "contaminated": contaminated.tolist(),
                        "defect_kinds": kinds, "methods": methods}
    return {"settings": "smoke", "part": "smoke", "class_kinds": {"a": "texture", "b": "object"}, "results": results}


def only_classes(payload: dict, keep_classes: list[str]) -> dict:
    """The payload restricted to some classes: every cleaning row recomputed from the saved scores
    and cuts of those classes' images (the detector rows, means over all classes, are dropped)."""
    from medsclean.metrics import image_auroc_score

    results = {}
    for rid, cell in payload["results"].items():
        on = np.array([c in keep_classes for c in cell["classes"]])
        labels = np.array(cell["contaminated"], bool)[on]
        classes = [c for c in cell["classes"] if c in keep_classes]
        sub = {"n_train": int(on.sum()), "n_injected": int(labels.sum()), "classes": classes,
               "contaminated": labels.astype(int).tolist(), "methods": {}}
        if "defect_kinds" in cell:
            sub["defect_kinds"] = [k for k, o in zip(cell["defect_kinds"], on) if o]
        for name, row in cell["methods"].items():
            if "eta" not in row:
                continue
            eta, rejected = np.array(row["eta"])[on], ~np.array(row["keep"], bool)[on]
            per_class = {c: image_auroc_score(labels[np.array(classes) == c], eta[np.array(classes) == c])
                         for c in sorted(set(classes))}
            tp, fp = int((labels & rejected).sum()), int((~labels & rejected).sum())
            new = {k: (np.array(v)[on].tolist() if isinstance(v, list) else v) for k, v in row.items()
                   if k not in ("detector",)}
            new.update({"ranking_auroc": float(np.nanmean(list(per_class.values()))),
                        "ranking_auroc_per_class": per_class, "recall": tp / max(1, int(labels.sum())),
                        "precision": tp / (tp + fp) if tp + fp else math.nan})
            sub["methods"][name] = new
        results[rid] = sub
    kinds = {c: k for c, k in payload.get("class_kinds", {}).items() if c in keep_classes}
    return {**payload, "class_kinds": kinds, "results": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path, nargs="*", help="files written by bench_suite.py --json")
    p.add_argument("--labels", type=lambda v: v.split(","), help="one label per file (default: the file names)")
    p.add_argument("--classes", type=lambda v: v.split(","),
                   help="tables of these classes only (cleaning rows recomputed; no detector rows)")
    p.add_argument("--smoke", action="store_true", help="tables of a tiny made-up results file")
    args = p.parse_args(argv)
    if args.smoke:
        print("SMOKE RUN: sizes are tiny, numbers are meaningless")
        payload = smoke_payload(np.random.default_rng(0))
        print(report("tables of a made-up results file", payload))
        print()
        print(compare_table([payload, only_classes(payload, ["a"])], ["first", "class a only"]))
        return 0
    if not args.json:
        p.error("give at least one results file, or --smoke")
    payloads = [json.loads(path.read_text()) for path in args.json]
    if args.classes:
        payloads = [only_classes(p, args.classes) for p in payloads]
    if len(payloads) == 1:
        print(report(f"tables of {args.json[0]} (settings: {payloads[0].get('settings')})", payloads[0]))
        return 0
    labels = args.labels or [path.stem for path in args.json]
    if len(labels) != len(payloads):
        p.error(f"{len(labels)} labels for {len(payloads)} files")
    print(compare_table(payloads, labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
