"""The approximate engine (`--engine approx`) against the exact one on real encoder features.

Images: good images of one scikit-image photograph per category (medsclean.demo.synth, the demo data)
with every tenth image given one painted defect (`--rate` 0.1). Features: EfficientNet-Lite0 with
its packaged ImageNet weights, the CPU preset's encoder, at `--image-size` 256 px (the preset's
32 x 32 = 1024 patches of width 152). One class per category; for each size N the class is the
first N images, so a smaller class is a subset of a larger one.

The exact engine's maps come from one `step1.reduce.nearest_table` of the largest class (timed: that
is one exact pass at N max), reduced to each subset and its banks by `step1.reduce.scores_from_table`,
which equals `memory_scores_exact` (tests/test_memory.py). The approximate engine runs through
`step1.classes.score_classes` with engine approx at each N (timed). Both draw the same banks (seed 0).

Reported per (category, N), with the top `--rate` share of the class as "rejected":
  rejected recall vs exact: the share of the exact engine's rejected set that approx also rejects;
  AUROC vs exact rejected: approx image scores at finding the exact engine's rejected set;
  Spearman: rank correlation of the two engines' image scores;
  recall of planted (exact / approx): the share of painted images in each engine's rejected set.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_approx_real.py --json /tmp/bench/approx-real.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_approx_real.py --smoke

--smoke: one category, N = 12 and 24 of 64 px images, 10 banks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import smoke_mode  # noqa: E402

SMOKE = {"categories": ["gravel"], "sizes": [12, 24], "image_size": 64, "banks": 10}


def class_images(category: str, n_images: int, size: int, rate: float, seed: int):
    """(N, size, size, 3) uint8 images and (N,) bool labels: image i is painted when
    floor((i + 1) * rate) > floor(i * rate), so every prefix holds its share of defects."""
    from medsclean.demo import defects, good_images

    images, labels = [], []
    for i in range(n_images):
        painted = int((i + 1) * rate) > int(i * rate)
        good = good_images.make_good(category, size, good_images.image_rng(seed, category, "train/good", i))
        if painted:
            rng = good_images.image_rng(seed, category, "test/defect", i)
            good, _ = defects.make_defect(good, defects.DEFECTS[i % len(defects.DEFECTS)], rng, category=category)
        images.append(good)
        labels.append(painted)
    return np.stack(images), np.asarray(labels)


def encode(images: np.ndarray, size: int, batch: int = 16):
    """(N, P, D) float32 unit memory features of the CPU preset's encoder, and its description."""
    import torch

    from medsclean.model.encoder import load_encoder
    from medsclean.model.weights import LITE0_NAME
    from medsclean.workdir.images import normalise

    encoder = load_encoder(LITE0_NAME, resize=size, crop=size)
    parts = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(normalise(images[start:start + batch], encoder.preprocess))
            parts.append(encoder(x).memory)
    return torch.cat(parts), encoder.describe()


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, scores)) if 0 < positive.sum() < len(positive) else float("nan")


def top_share(scores: np.ndarray, rate: float) -> np.ndarray:
    """(N,) bool: the round(rate * N) highest scores (at least one)."""
    mask = np.zeros(len(scores), dtype=bool)
    mask[np.argsort(-scores, kind="stable")[:max(1, int(round(rate * len(scores))))]] = True
    return mask


def measure(category: str, args) -> list[dict]:
    import torch
    from scipy.stats import spearmanr

    from medsclean.config import ScoreConfig
    from medsclean.maps import image_scores
    from medsclean.step1.classes import score_classes
    from medsclean.step1.reduce import nearest_table
    from medsclean.step1.runtime import Runtime

    images, labels = class_images(category, max(args.sizes), args.image_size, args.rate, args.seed)
    t0 = time.perf_counter()
    features, encoder = encode(images, args.image_size)
    encode_s = time.perf_counter() - t0
    n_max, n_patches, dim = features.shape
    t0 = time.perf_counter()
    table = nearest_table(features)  # (N, P, N, 1): one exact pass over the largest class
    exact_s = time.perf_counter() - t0
    options = dict(banks=args.banks, ratio=0.1, seed=args.seed)
    rows = []
    for n in sorted(args.sizes):
        classes = [category] * n
        sub = table[:n, :, :n]
        exact_maps, _ = score_classes(features[:n], classes, ScoreConfig(engine="exact", **options),
                                      Runtime(tables={category: sub}))
        t0 = time.perf_counter()
        approx_maps, _ = score_classes(features[:n], classes,
                                       ScoreConfig(engine="approx", coreset=args.coreset, **options))
        approx_s = time.perf_counter() - t0
        exact, approx = image_scores(exact_maps).numpy(), image_scores(approx_maps).numpy()
        rejected_exact, rejected_approx = top_share(exact, args.rate), top_share(approx, args.rate)
        planted = labels[:n]
        rows.append({
            "category": category, "n": n, "patches": n_patches, "dim": dim, "coreset": args.coreset,
            "rejected_recall_vs_exact": float((rejected_exact & rejected_approx).sum() / rejected_exact.sum()),
            "auroc_vs_exact_rejected": auroc(approx, rejected_exact),
            "spearman": float(spearmanr(exact, approx).statistic),
            "recall_planted_exact": float((rejected_exact & planted).sum() / max(1, planted.sum())),
            "recall_planted_approx": float((rejected_approx & planted).sum() / max(1, planted.sum())),
            "maps_ge_exact": bool((approx_maps >= exact_maps - 1e-5).all()),
            "approx_s": approx_s, "exact_table_s_at_n_max": exact_s if n == n_max else None,
            "encode_s": encode_s, "encoder": encoder["name"], "grid": encoder["grid"],
        })
        del exact_maps, approx_maps
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", nargs="+", default=["gravel", "coffee"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--rate", type=float, default=0.1, help="share of painted images, and of the class rejected")
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--banks", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = smoke_mode.parse_args(parser, SMOKE)
    import torch

    torch.set_num_threads(args.threads)
    rows = [row for category in args.categories for row in measure(category, args)]
    print("| category | N | P × D | rejected recall vs exact | AUROC vs exact rejected | Spearman | "
          "recall of planted: exact / approx | approx maps ≥ exact | approx (s) | exact pass at N max (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        exact_s = "–" if r["exact_table_s_at_n_max"] is None else f"{r['exact_table_s_at_n_max']:.0f}"
        print(f"| {r['category']} | {r['n']} | {r['patches']} × {r['dim']} | {r['rejected_recall_vs_exact']:.3f} | "
              f"{r['auroc_vs_exact_rejected']:.3f} | {r['spearman']:.3f} | {r['recall_planted_exact']:.2f} / "
              f"{r['recall_planted_approx']:.2f} | {r['maps_ge_exact']} | {r['approx_s']:.1f} | {exact_s} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
