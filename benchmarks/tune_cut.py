"""Compare final-cut rules on the scores a suite run saved, without rerunning any method.

Reads the JSON of `bench_suite.py --json` (each cell keeps every method's final scores and the
contamination labels) and applies each rule of `medsclean.selection.cut_rules` per class, as `select`
does, printing pooled rejected-set recall / precision per ratio and method.

    .venv/bin/python benchmarks/tune_cut.py /tmp/suite/tune.json --methods meds,memory
    .venv/bin/python benchmarks/tune_cut.py --smoke

--smoke: replays the rules on a made-up suite file (written to a temporary folder, the shape of
`bench_suite.py --json`: two classes, two ratios, contaminants scoring higher) instead of a real one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

import smoke_mode
from medsclean.metrics import selection_metrics
from medsclean.selection.cut_rules import cut_per_class

RULES = {"mad k=3": ("mad", {"k": 3.0}), "mad k=2": ("mad", {"k": 2.0}), "mad k=1": ("mad", {"k": 1.0}),
         "mixture": ("mixture", {}), "otsu": ("otsu", {})}


def recall_precision(labels: np.ndarray, keep: np.ndarray) -> tuple[float, float, float]:
    """Pooled recall and precision of the rejected images, and the share rejected."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = selection_metrics(labels, ~keep, np.zeros(len(keep)))
    return m["recall"], m["precision"], float((~keep).mean())


def made_up_cell(rng: np.random.Generator, ratio: float, methods: list[str]) -> dict:
    """One suite cell of two classes of 20 good images plus int(ratio * 20) contaminants each; every
    method's eta is noise with the contaminants shifted up."""
    classes, contaminated = [], []
    for cls in ("a", "b"):
        n_bad = int(ratio * 20)
        classes += [cls] * (20 + n_bad)
        contaminated += [0] * 20 + [1] * n_bad
    labels = np.array(contaminated)
    scores = {m: rng.random(len(labels)) + 1.5 * labels for m in methods}
    return {"classes": classes, "contaminated": contaminated,
            "methods": {m: {"eta": eta.tolist(), "keep": (eta < 1).astype(int).tolist()} for m, eta in scores.items()}}


def made_up_suite_json(folder: Path, methods: list[str]) -> Path:
    """A `bench_suite.py --json` file of made-up cells (r 0.1 and 0.4, one seed, both defect kinds)."""
    rng = np.random.default_rng(0)
    results = {f"r={ratio:g},seed=0,{kind}": made_up_cell(rng, ratio, methods)
               for ratio in (0.1, 0.4) for kind in ("unique", "repeated")}
    path = folder / "suite-smoke.json"
    path.write_text(json.dumps({"settings": "smoke", "results": results}))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path, nargs="*", help="files written by bench_suite.py --json")
    p.add_argument("--methods", type=lambda v: v.split(","), default=["knn", "iterative", "memory", "meds"])
    args = smoke_mode.parse_args(p, {}, argv)
    if args.json:
        print_rules_table(load_cells(args.json), args.methods)
    elif args.smoke:
        with tempfile.TemporaryDirectory(prefix="tune-cut-") as tmp:
            print_rules_table(load_cells([made_up_suite_json(Path(tmp), args.methods)]), args.methods)
    else:
        p.error("give at least one results file, or --smoke")
    return 0


def load_cells(paths: list[Path]) -> dict:
    """The cells of every file, by cell id."""
    cells = {}
    for path in paths:
        cells.update(json.loads(path.read_text())["results"])
    return cells


def print_rules_table(cells: dict, methods: list[str]) -> None:
    """Pooled recall / precision / rejected share per method, rule and ratio, as a markdown table."""
    rows: dict[tuple, list] = {}
    for rid, cell in cells.items():
        ratio = rid.split(",")[0]
        labels = np.array(cell["contaminated"], bool)
        for method in methods:
            if method not in cell["methods"]:
                continue
            eta = np.array(cell["methods"][method]["eta"])
            for name, (rule, params) in RULES.items():
                keep, _ = cut_per_class(eta, cell["classes"], rule, **params)
                rows.setdefault((method, name, ratio), []).append(recall_precision(labels, keep))
    ratios = sorted({k[2] for k in rows}, key=lambda r: float(r[2:]))
    print("| method | rule | " + " | ".join(f"{r}: recall / precision / rejected" for r in ratios) + " |")
    print("|---|---|" + "---|" * len(ratios))
    for method in methods:
        for name in RULES:
            cells_text = []
            for r in ratios:
                values = np.array(rows.get((method, name, r), [(np.nan,) * 3]), dtype=float)
                cells_text.append(" / ".join(f"{np.nanmean(values[:, i]):.2f}" for i in range(3)))
            print(f"| {method} | {name} | " + " | ".join(cells_text) + " |")


if __name__ == "__main__":
    sys.exit(main())
