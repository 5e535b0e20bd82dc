"""Pixel metrics (AUROC, step-wise AP, AUPRO@0.3): medsclean vs references, side by side, one run.

    .venv/bin/python benchmarks/bench_metrics.py [--images 200] [--size 256] [--seed 0]
    .venv/bin/python benchmarks/bench_metrics.py --smoke     # 12 maps of 64 x 64: checks that it runs

References:
* scikit-learn ``roc_auc_score`` / ``average_precision_score`` on all pixels of the full set;
* a brute-force AUPRO (PRO and FPR evaluated separately at every distinct threshold) on a
  subsample (10 maps at 64 x 64), since it is quadratic;
* the 200 min-max-threshold AUPRO with FPR rescaling (the approximation used by several research
  repositories) on 50 maps, to show its bias.

Memory: ``tracemalloc`` peak of Python/numpy allocations during the call (numpy reports its
buffers to tracemalloc), and the process ``ru_maxrss`` before and after.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.pixel_accumulator

import argparse  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

import smoke_mode  # noqa: E402
from medsclean.metrics import pixel_metrics  # noqa: E402
from tests.pixel_accumulator import PixelMetricAccumulator  # noqa: E402

SMOKE = {"images": 12, "size": 64}


def synthetic_test_set(rng: np.random.Generator, n_images: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Half good images; the others hold 1-4 irregular blobs. Maps: smooth noise plus a blurred,
    partly missed defect signal, as a real detector's maps look."""
    masks = np.zeros((n_images, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for image in range(n_images // 2, n_images):
        for _ in range(rng.integers(1, 5)):
            cy, cx = rng.uniform(0.1, 0.9, 2) * size
            ry, rx = rng.uniform(0.01, 0.12, 2) * size
            angle = rng.uniform(0, np.pi)
            u = ((yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)) / ry
            v = (-(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)) / rx
            wobble = 1 + 0.3 * ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 32)
            masks[image] |= u**2 + v**2 < wobble
    scale = size / 128  # blur widths in pixels grow with the map so statistics do not depend on size
    noise = ndimage.gaussian_filter(rng.standard_normal(masks.shape), sigma=(0, 4 * scale, 4 * scale))
    hot_spots = np.zeros(masks.shape, dtype=np.float32)  # false alarms on every image
    for image in range(n_images):
        for _ in range(rng.integers(0, 4)):
            y, x = rng.integers(0, size, 2)
            hot_spots[image, y, x] = rng.uniform(0.5, 2.0) * 40 * scale**2
    hot_spots = ndimage.gaussian_filter(hot_spots, sigma=(0, 5 * scale, 5 * scale))
    strength = rng.uniform(0.15, 1.0, (n_images, 1, 1))
    signal = ndimage.gaussian_filter(masks.astype(np.float32), sigma=(0, 3 * scale, 3 * scale)) * strength
    maps = (0.3 + 0.8 * scale * noise + hot_spots + signal).astype(np.float32)
    return masks, maps


def brute_force_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Evaluates FPR and PRO at every distinct threshold with no cumulative sums."""
    labels = np.zeros(masks.shape, dtype=np.int64)
    n_regions = 0
    for i, mask in enumerate(masks):
        lab, count = ndimage.label(mask, structure=np.ones((3, 3)))
        labels[i] = np.where(lab > 0, lab + n_regions, 0)
        n_regions += count
    sizes = np.bincount(labels.ravel(), minlength=n_regions + 1)[1:]
    ok = ~masks
    xs, ys = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        above = maps >= threshold
        xs.append(np.count_nonzero(above & ok) / np.count_nonzero(ok))
        covered = np.bincount(labels[above], minlength=n_regions + 1)[1:]
        ys.append(float(np.mean(covered / sizes)))
    xs, ys = np.array(xs), np.array(ys)
    stop = int(np.searchsorted(xs, fpr_limit, side="right"))
    area = np.sum((xs[1:stop] - xs[:stop - 1]) * (ys[1:stop] + ys[:stop - 1]) / 2)
    if stop < len(xs) and xs[stop - 1] < fpr_limit:
        y_limit = ys[stop - 1] + (ys[stop] - ys[stop - 1]) * (fpr_limit - xs[stop - 1]) / (xs[stop] - xs[stop - 1])
        area += (fpr_limit - xs[stop - 1]) * (ys[stop - 1] + y_limit) / 2
    return float(area / fpr_limit)


def minmax_200_aupro(masks: np.ndarray, maps: np.ndarray) -> float:
    """The approximation medsclean does not use: 200 thresholds evenly spaced between the min and
    max score, points with FPR < 0.3 kept, FPR rescaled by its largest kept value, trapezoid."""
    regions = []
    for i, mask in enumerate(masks):
        lab, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, count + 1)]
    ok = ~masks
    fprs, pros = [], []
    lo, hi = float(maps.min()), float(maps.max())
    for threshold in np.arange(lo, hi, (hi - lo) / 200):
        above = maps > threshold
        fprs.append(np.count_nonzero(above & ok) / np.count_nonzero(ok))
        pros.append(np.mean([np.count_nonzero(above[i] & r) / np.count_nonzero(r) for i, r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < 0.3
    x, y = fprs[keep] / fprs[keep].max(), pros[keep]
    order = np.argsort(x)
    x, y = x[order], y[order]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = smoke_mode.parse_args(parser, SMOKE)
    rng = np.random.default_rng(args.seed)
    masks, maps = synthetic_test_set(rng, args.images, args.size)
    n_pixels = maps.size
    print(f"test set: {args.images} maps of {args.size}x{args.size} = {n_pixels / 1e6:.1f} M pixels, "
          f"{masks.mean():.2%} defect pixels, {np.count_nonzero(masks.any(axis=(1, 2)))} anomalous images")

    exact, exact_s = timed(pixel_metrics, masks, maps)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    pixel_metrics(masks, maps)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def stream():
        accumulator = PixelMetricAccumulator(score_range=(float(maps.min()), float(maps.max())))
        for start in range(0, len(maps), 16):
            accumulator.update(masks[start:start + 16], maps[start:start + 16])
        return accumulator.compute()
    streamed, stream_s = timed(stream)

    from sklearn.metrics import average_precision_score, roc_auc_score
    flat_masks, flat_maps = masks.ravel(), maps.ravel()
    sk_auroc, sk_auroc_s = timed(roc_auc_score, flat_masks, flat_maps)
    sk_ap, sk_ap_s = timed(average_precision_score, flat_masks, flat_maps)

    sub_masks, sub_maps = masks[-10:, ::4, ::4], np.ascontiguousarray(maps[-10:, ::4, ::4])
    sub_exact, sub_exact_s = timed(pixel_metrics, sub_masks, sub_maps)
    brute, brute_s = timed(brute_force_aupro, sub_masks, sub_maps)
    half = slice(args.images // 2 - 25, args.images // 2 + 25)  # 25 good + 25 anomalous
    mid_exact = pixel_metrics(masks[half], maps[half])["aupro"]
    minmax, minmax_s = timed(minmax_200_aupro, masks[half], maps[half])

    print("\n| quantity | medsclean | reference | abs. difference | medsclean s | reference s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    print(f"| pixel AUROC (full set, sklearn) | {exact['pixel_auroc']:.6f} | {sk_auroc:.6f} | "
          f"{abs(exact['pixel_auroc'] - sk_auroc):.1e} | {exact_s:.2f} (all three) | {sk_auroc_s:.2f} | "
          f"{(sk_auroc_s + sk_ap_s) / exact_s:.1f}x (both sklearn calls) |")
    print(f"| pixel AP (full set, sklearn) | {exact['pixel_ap']:.6f} | {sk_ap:.6f} | "
          f"{abs(exact['pixel_ap'] - sk_ap):.1e} | | {sk_ap_s:.2f} | |")
    sub_label = f"{len(sub_maps)} maps {sub_maps.shape[1]}x{sub_maps.shape[2]}"
    print(f"| AUPRO@0.3 ({sub_label}, brute force) | {sub_exact['aupro']:.6f} | {brute:.6f} | "
          f"{abs(sub_exact['aupro'] - brute):.1e} | {sub_exact_s:.3f} | {brute_s:.2f} | "
          f"{brute_s / sub_exact_s:.0f}x |")
    for key in ("pixel_auroc", "pixel_ap", "aupro"):
        print(f"| {key}: streaming (2^16 bins) vs exact, full set | {streamed[key]:.6f} | {exact[key]:.6f} | "
              f"{abs(streamed[key] - exact[key]):.1e} | {stream_s:.2f} (all three) | {exact_s:.2f} | |")
    print(f"| AUPRO@0.3: 200 min-max thresholds + FPR rescaling vs exact ({len(maps[half])} maps) | {minmax:.6f} | "
          f"{mid_exact:.6f} | {minmax - mid_exact:+.4f} (bias) | {minmax_s:.2f} | | |")
    print(f"\nexact path on the full set: {exact_s:.2f} s; tracemalloc peak {peak / 1e6:.0f} MB = "
          f"{peak / n_pixels:.1f} bytes/pixel (inputs: {(maps.nbytes + masks.nbytes) / n_pixels:.0f} bytes/pixel, "
          f"not counted); ru_maxrss {rss_before / 1024:.0f} MiB before, {rss_after / 1024:.0f} MiB after")


if __name__ == "__main__":
    main()
