"""Do a handful of user corrections raise recall on the images the user did not look at?

The loop it measures (`select --reject FILE --rescore`): a user opens the review page, looks at the
`--review` most suspicious images of each class, and confirms the true defects among them (the
oracle: the cell's labels). The confirmed images are then left out of every Step-1 memory
(`step1.banks.without_members`) and the training set is scored again; they stay rejected.

Everything is measured on the images the user did NOT confirm (held out from the corrections):
the ranking AUROC per class (mean over classes), and the pooled recall / precision of the preset's
cut, before and after. The cells and data are the selection suite's (`bench_suite.py`): report part
by default, which no default was chosen on; unique and repeated defects are reported apart, since
leaving a confirmed defect out of the memories can only help the images that resemble it.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_corrections.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_corrections.py --methods memory,knn,meds --ratios 0.2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_corrections.py --smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_suite as suite  # noqa: E402
import smoke_mode  # noqa: E402

from medsclean.config import DistillConfig, ExtractConfig, ScoreConfig, SelectConfig  # noqa: E402
from medsclean.maps import AGGREGATE_RATIOS, image_scores  # noqa: E402
from medsclean.metrics import image_auroc_score, selection_metrics  # noqa: E402
from medsclean.model.decoder import ReconstructionModel  # noqa: E402
from medsclean.model.loop import TrainContext  # noqa: E402
from medsclean.model.training import compute_maps, distill, progressive_select  # noqa: E402
from medsclean.presets import CPU  # noqa: E402
from medsclean.stages.common import model_config_for  # noqa: E402
from medsclean.stages.scores import step1_maps  # noqa: E402
from medsclean.values import resolve_device  # noqa: E402
from medsclean.workdir.data import discover  # noqa: E402
from medsclean.workdir.store import Store  # noqa: E402

SMOKE = dict(n_train=5, n_test_good=2, n_test_defect=3, size=64, ratios=[0.4], seeds=[0], defects=["repeated"],
             classes=["tissue", "rocket"], banks=4, iters=2, review=1, methods=["memory", "meds"])


def scores(method: str, cell, features, encoder: dict, s, args, exclude=()) -> np.ndarray:
    """(N,) final scores of `method` on a cell, with the `exclude` positions out of every memory."""
    memory, groups, tables = features
    select_cfg = s.preset.build(SelectConfig, method=method, **({"iters": args.iters} if args.iters else {}))
    score_cfg = select_cfg.step1(s.preset.build(ScoreConfig, seed=cell.seed,
                                                **({"banks": args.banks} if args.banks else {})))
    maps, _ = step1_maps(memory, cell.classes, score_cfg, device=s.device, tables=tables, exclude=exclude)
    if method != "meds":
        return image_scores(maps, ratio=AGGREGATE_RATIOS[score_cfg.aggregate]).double().numpy()
    distill_cfg = s.preset.build(DistillConfig, checkpoint_every=0, **({"iters": args.iters} if args.iters else {}))
    model = ReconstructionModel(model_config_for(encoder, distill_cfg), seed=cell.seed)
    context = TrainContext(seed=cell.seed, device=s.device)
    distill(model, groups, suite.step1_targets(maps, s), distill_cfg, context)
    result = progressive_select(model, groups, cell.classes, compute_maps(model, groups, device=s.device),
                                select_cfg, distill_cfg, TrainContext(seed=cell.seed, device=s.device))
    return result.eta


def confirmed(eta: np.ndarray, cell, review: int) -> np.ndarray:
    """Positions a user confirms: the true defects among the `review` highest scores of each class."""
    classes = np.array(cell.classes)
    picked = []
    for cls in cell.index:
        members = np.flatnonzero(classes == cls)
        top = members[np.argsort(-eta[members], kind="stable")[:review]]
        picked += [i for i in top if cell.contaminated[i]]
    return np.array(sorted(picked), dtype=np.int64)


def held_out_row(eta: np.ndarray, cell, s, rejected_by_user: np.ndarray) -> dict:
    """Ranking AUROC (per class, mean) and the cut's recall / precision on the images not confirmed."""
    keep = suite.cut(eta, cell.classes, s)
    keep[rejected_by_user] = False
    rest = np.ones(len(eta), bool)
    rest[rejected_by_user] = False
    labels, classes = cell.contaminated, np.array(cell.classes)
    per_class = [image_auroc_score(labels[rest & (classes == c)], eta[rest & (classes == c)]) for c in cell.index]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pooled = selection_metrics(labels[rest], ~keep[rest], eta[rest])
    return {"auroc": float(np.nanmean(per_class)), "recall": float(pooled["recall"]),
            "precision": float(pooled["precision"])}


def run_cell(cell, bases, encoder: dict, s, args) -> dict:
    features = suite.cell_features(bases, cell)
    out = {}
    for method in args.methods:
        t0 = time.perf_counter()
        before = scores(method, cell, features, encoder, s, args)
        chosen = confirmed(before, cell, args.review)
        after = scores(method, cell, features, encoder, s, args, exclude=chosen)
        row = {"confirmed": int(len(chosen)), "held_out_defects": int(cell.contaminated.sum() - len(chosen)),
               "before": held_out_row(before, cell, s, chosen), "after": held_out_row(after, cell, s, chosen),
               "seconds": time.perf_counter() - t0}
        out[method] = row
        suite.log(f"  {cell.rid()} {method}: {row['confirmed']} confirmed; held-out AUROC "
                  f"{row['before']['auroc']:.3f} -> {row['after']['auroc']:.3f}, recall "
                  f"{row['before']['recall']:.2f} -> {row['after']['recall']:.2f}")
    return out


def table(results: dict, methods) -> str:
    lines = ["| defects | method | confirmed per cell | held-out defects | AUROC before → after | "
             "recall before → after | precision before → after |", "|---|---|---|---|---|---|---|"]
    for kind in ("unique", "repeated"):
        cells = [r for rid, r in results.items() if rid.endswith(kind)]
        for method in methods:
            rows = [c[method] for c in cells if method in c]
            if not rows:
                continue

            def mean(part, metric):
                return float(np.nanmean([r[part][metric] for r in rows]))

            lines.append(f"| {kind} | {method} | {np.mean([r['confirmed'] for r in rows]):.1f} | "
                         f"{np.mean([r['held_out_defects'] for r in rows]):.1f} | "
                         + " | ".join(f"{mean('before', m):.3f} → {mean('after', m):.3f} "
                                      f"({mean('after', m) - mean('before', m):+.3f})"
                                      for m in ("auroc", "recall", "precision")) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("tuning", "report"), default="report")
    p.add_argument("--ratios", type=lambda v: [float(x) for x in v.split(",")], default=[0.1, 0.2, 0.4])
    p.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1])
    p.add_argument("--defects", type=lambda v: v.split(","), default=["unique", "repeated"])
    p.add_argument("--methods", type=lambda v: v.split(","), default=["memory", "knn"])
    p.add_argument("--review", type=int, default=5, help="images per class the user looks at (the most suspicious)")
    p.add_argument("--classes", type=lambda v: v.split(","), help="only these classes of the part")
    p.add_argument("--n-train", type=int, default=70)
    p.add_argument("--n-test-good", type=int, default=20)
    p.add_argument("--n-test-defect", type=int, default=30)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--banks", type=int, help="override the preset's Step-1 memories")
    p.add_argument("--iters", type=int, help="override the preset's Step-2 and Step-3 iterations (meds)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "medsclean-suite")
    p.add_argument("--json", type=Path, help="also write the results here")
    return smoke_mode.parse_args(p, SMOKE, argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("ignore")  # a smoke cell's classes may have no held-out defect (AUROC undefined)
    torch.set_num_threads(args.threads)
    s = suite.Settings(CPU, resolve_device(args.device))
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    root, mapping, _ = suite.prepare_data(args.part, work, args)
    store = Store(work / "store", images_root=root)
    extract_cfg = s.preset.build(ExtractConfig, device=s.device)
    train = suite.extract(discover(root, layout="mvtec", split="train"), store, extract_cfg, "extract")
    test = suite.extract(discover(root, layout="mvtec", split="test"), store, extract_cfg, "extract-test")
    repeats = suite.extract(suite._repeat_dataset(root), store, extract_cfg, "extract-repeats")
    bases = suite.build_classes(train, test, repeats, mapping, work / "pool1", s.device,
                                s.preset.build(ScoreConfig).k)
    results = {}
    for ratio in args.ratios:
        for seed in args.seeds:
            for kind in args.defects:
                cell = suite.make_cell(bases, ratio, seed, kind == "repeated")
                results[cell.rid()] = run_cell(cell, bases, train.encoder, s, args)
    if args.json:
        args.json.write_text(json.dumps({"part": args.part, "review": args.review, "results": results}))
    print(f"corrections: {args.part} part, classes {', '.join(bases)}, ratios {args.ratios}, seeds {args.seeds}; "
          f"the user confirms the defects among the {args.review} most suspicious images per class")
    print(table(results, args.methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
