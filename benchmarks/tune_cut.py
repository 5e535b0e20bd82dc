"""Compare final-cut rules on the scores a suite run saved, without rerunning any method.

Reads the JSON of `bench_suite.py --json` (each cell keeps every method's final scores and the
contamination labels) and applies each rule of `medsclean.thresholds` per class, as `select`
does, printing pooled rejected-set recall / precision per ratio and method.

    .venv/bin/python benchmarks/tune_cut.py /tmp/suite/tune.json --methods meds,memory
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from medsclean.metrics import selection_metrics
from medsclean.thresholds import cut_per_class

RULES = {"mad k=3": ("mad", {"k": 3.0}), "mad k=2": ("mad", {"k": 2.0}), "mad k=1": ("mad", {"k": 1.0}),
         "mixture": ("mixture", {}), "otsu": ("otsu", {})}


def recall_precision(labels: np.ndarray, keep: np.ndarray) -> tuple[float, float, float]:
    """Pooled recall and precision of the rejected images, and the share rejected."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = selection_metrics(labels, ~keep, np.zeros(len(keep)))
    return m["recall"], m["precision"], float((~keep).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path, nargs="+")
    p.add_argument("--methods", type=lambda v: v.split(","), default=["knn", "iterative", "memory", "meds"])
    args = p.parse_args(argv)
    cells = {}
    for path in args.json:
        cells.update(json.loads(path.read_text())["results"])
    rows: dict[tuple, list] = {}
    for rid, cell in cells.items():
        ratio = rid.split(",")[0]
        labels = np.array(cell["contaminated"], bool)
        for method in args.methods:
            if method not in cell["methods"]:
                continue
            eta = np.array(cell["methods"][method]["eta"])
            for name, (rule, params) in RULES.items():
                keep, _ = cut_per_class(eta, cell["classes"], rule, **params)
                rows.setdefault((method, name, ratio), []).append(recall_precision(labels, keep))
    ratios = sorted({k[2] for k in rows}, key=lambda r: float(r[2:]))
    print("| method | rule | " + " | ".join(f"{r}: recall / precision / rejected" for r in ratios) + " |")
    print("|---|---|" + "---|" * len(ratios))
    for method in args.methods:
        for name in RULES:
            cells_text = []
            for r in ratios:
                values = np.array(rows.get((method, name, r), [(np.nan,) * 3]), dtype=float)
                cells_text.append(" / ".join(f"{np.nanmean(values[:, i]):.2f}" for i in range(3)))
            print(f"| {method} | {name} | " + " | ".join(cells_text) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
