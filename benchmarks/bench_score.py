"""Speed and memory of the Step-1 memory-ensemble engines, side by side in one run.

One class of N images with P patches of D random unit features, B banks of ratio rho:
  exact  - medsclean.step1.engines.exact.memory_scores_exact, all B banks (timed in full);
  faiss  - medsclean.step1.engines.faiss.memory_scores_faiss, flat index, timed on --faiss-banks banks
           and extrapolated linearly to B (its cost is linear in the bank count);
  naive  - the oracle of tests/memory_oracle.py in float32 (one memory per bank, every image
           searched against it), timed on --naive-banks banks and extrapolated linearly to B;
  matmul - plain torch.matmul over the same block shapes as exact, without the reductions:
           the FLOP rate exact should approach.
Plus: an agreement check of the three on a small class, the recall of the approximate IVF
index against flat search (random and clustered features), and a FLOP and memory projection
for the paper's MVTec AD 40 % setting.

Peak memory is the peak resident set size (RSS, sampled every 2 ms from /proc/self/statm)
above the RSS just before the call, so it counts torch, numpy and FAISS allocations alike.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_score.py --images 300 --grid 16 --dim 384
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_score.py --smoke --json /tmp/score.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import smoke_mode  # noqa: E402
from medsclean.step1 import faiss_index as knn  # noqa: E402
from medsclean.step1.banks import bank_size, draw_banks  # noqa: E402
from medsclean.maps import image_scores  # noqa: E402
from medsclean.step1.engines.exact import memory_scores_exact  # noqa: E402
from medsclean.step1.engines.faiss import memory_scores_faiss  # noqa: E402
from medsclean.step1.plan import bank_flops, exact_flops, plan_exact_blocks  # noqa: E402
from tests.memory_oracle import naive_memory_scores  # noqa: E402

# MVTec AD train/good counts and test anomaly counts per class (for the projection).
MVTEC_GOOD = dict(bottle=209, cable=224, capsule=219, carpet=280, grid=264, hazelnut=391, leather=245,
                  metal_nut=220, pill=267, screw=320, tile=230, toothbrush=60, transistor=213, wood=247,
                  zipper=240)
MVTEC_TEST_ANOMALIES = dict(bottle=63, cable=92, capsule=109, carpet=89, grid=57, hazelnut=70, leather=92,
                            metal_nut=93, pill=141, screw=119, tile=84, toothbrush=30, transistor=40, wood=60,
                            zipper=119)
SMOKE = {"images": 20, "grid": 4, "dim": 16, "banks": 4, "naive_banks": 2, "faiss_banks": 2, "ivf_banks": 1,
         "check_images": 10, "threads": 1}


# ---------------------------------------------------------------------------
# Measuring


class PeakRss:
    """Context manager: peak RSS above the entry RSS, in bytes, sampled by a thread."""

    _page = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak_bytes = 0

    @classmethod
    def rss(cls) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * cls._page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self.rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        release_freed_memory()
        self._start = self._peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self.rss())
        self.peak_bytes = self._peak - self._start


def release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(function, *args, **kwargs) -> tuple[object, float, int]:
    """(result, seconds, peak RSS delta in bytes) of one call."""
    with PeakRss() as peak:
        start = time.perf_counter()
        result = function(*args, **kwargs)
        seconds = time.perf_counter() - start
    return result, seconds, peak.peak_bytes


# ---------------------------------------------------------------------------
# Data


def unit(array: np.ndarray) -> np.ndarray:
    return (array / np.linalg.norm(array, axis=-1, keepdims=True)).astype(np.float32)


def random_features(n_images: int, n_patches: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    return unit(rng.standard_normal((n_images, n_patches, dim), dtype=np.float32))


def clustered_features(n_images: int, n_patches: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Patches near one of 256 shared prototypes, like the repeated textures of a product class."""
    prototypes = unit(rng.standard_normal((256, dim), dtype=np.float32))
    chosen = prototypes[rng.integers(0, 256, size=(n_images, n_patches))]
    noise = rng.standard_normal((n_images, n_patches, dim), dtype=np.float32) * (0.6 / np.sqrt(dim))
    return unit(chosen + noise)


# ---------------------------------------------------------------------------
# Parts of the run


def agreement_check(args, rng: np.random.Generator) -> dict:
    """Max |difference| of exact and faiss maps from the float64 naive oracle on a small class."""
    features = random_features(args.check_images, args.grid**2, args.dim, rng)
    banks = draw_banks(args.check_images, args.banks, args.ratio, generator=rng)
    reference = naive_memory_scores(features, banks)
    exact = memory_scores_exact(features, banks).numpy()
    via_faiss = memory_scores_faiss(features, banks).numpy()
    return {"images": args.check_images, "exact_max_abs_error": float(np.abs(exact - reference).max()),
            "faiss_max_abs_error": float(np.abs(via_faiss - reference).max())}


def matmul_rate(features: np.ndarray, plan, seconds_target: float) -> float:
    """FLOP/s of torch.matmul over the exact engine's block shapes, products only."""
    tensor = torch.from_numpy(features)
    n_images, n_patches, dim = tensor.shape
    queries = tensor[: plan.query_images].reshape(-1, dim)
    rows = queries.shape[0]
    out = torch.empty(rows * plan.database_images * n_patches)
    flops, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds_target:
        for first in range(0, n_images, plan.database_images):
            block = tensor[first : first + plan.database_images].reshape(-1, dim)
            torch.matmul(queries, block.T, out=out[: rows * block.shape[0]].view(rows, block.shape[0]))
            flops += 2.0 * rows * block.shape[0] * dim
    return flops / (time.perf_counter() - start)


def ivf_quality(features: np.ndarray, banks: np.ndarray, nprobe_factors: list[int]) -> list[dict]:
    """Recall@1 of IVF against flat search on the first bank, and map error over ``banks``."""
    n_images, n_patches, dim = features.shape
    members = np.unique(banks[0])
    database = features[members].reshape(-1, dim)
    queries = features[np.setdiff1d(np.arange(n_images), members)].reshape(-1, dim)
    flat_sims, flat_ids = knn.search_inner_product(knn.build_inner_product_index(database, use_gpu=False), queries)
    flat_maps, flat_s, _ = measure(memory_scores_faiss, features, banks, search=knn.IndexOptions(use_gpu=False))
    nlist = knn.default_nlist(len(database))
    rows = []
    for factor in nprobe_factors:
        nprobe = min(nlist, knn.default_nprobe(nlist) * factor)
        ivf = knn.IndexOptions("ivf", use_gpu=False, nprobe=nprobe)
        ivf_sims, ivf_ids = knn.search_inner_product(ivf.build(database), queries)
        ivf_maps, ivf_s, _ = measure(memory_scores_faiss, features, banks, search=ivf)
        map_error = (ivf_maps - flat_maps).abs()
        rows.append({
            "nlist": nlist, "nprobe": nprobe,
            "recall_at_1": float((ivf_ids[:, 0] == flat_ids[:, 0]).mean()),
            "mean_distance_excess": float((flat_sims[:, 0] - ivf_sims[:, 0]).mean()),
            "map_max_abs_error": float(map_error.max()), "map_mean_abs_error": float(map_error.mean()),
            "image_score_max_abs_error": float((image_scores(ivf_maps) - image_scores(flat_maps)).abs().max()),
            "flat_s_per_bank": flat_s / len(banks), "ivf_s_per_bank": ivf_s / len(banks),
        })
    return rows


def mvtec_projection(n_patches: int, dim: int, n_banks: int, ratio: float, noise: float, block_bytes: int) -> dict:
    """FLOPs and memory of Step 1 for MVTec AD with injected anomalies, per class and in total."""
    classes = {}
    for name, good in MVTEC_GOOD.items():
        n_images = good + min(int(noise * good), MVTEC_TEST_ANOMALIES[name])
        width = bank_size(n_images, ratio)
        plan = plan_exact_blocks(n_images, n_patches, k=1, n_banks=n_banks, bank_width=width,
                                 max_block_bytes=block_bytes)
        classes[name] = {
            "images": n_images,
            "exact_flops": exact_flops(n_images, n_patches, dim),
            "naive_flops": bank_flops(n_images, n_patches, dim, n_banks=n_banks, ratio=ratio),
            "features_fp16_bytes": n_images * n_patches * dim * 2,
            "exact_device_bytes": n_images * n_patches * dim * 4
            + plan.peak_bytes(n_images, n_patches, 1, n_banks, width),
        }
    total = {key: sum(c[key] for c in classes.values()) for key in ("images", "exact_flops", "naive_flops",
                                                                    "features_fp16_bytes")}
    total["exact_device_bytes_max"] = max(c["exact_device_bytes"] for c in classes.values())
    return {"classes": classes, "total": total}


# ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="N, images in the one class")
    parser.add_argument("--grid", type=int, default=16, help="token grid side; P = grid^2")
    parser.add_argument("--dim", type=int, default=384, help="D, feature width")
    parser.add_argument("--banks", type=int, default=100, help="B")
    parser.add_argument("--ratio", type=float, default=0.1, help="rho")
    parser.add_argument("--naive-banks", type=int, default=4, help="banks the naive oracle is timed on")
    parser.add_argument("--faiss-banks", type=int, default=8, help="banks the faiss engine is timed on")
    parser.add_argument("--ivf-banks", type=int, default=3, help="banks the IVF map error is measured on")
    parser.add_argument("--check-images", type=int, default=40, help="N of the agreement check")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-tflops", type=float, default=40.0,
                        help="assumed sustained FP32 TFLOP/s of one GPU for the projection (not measured)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = smoke_mode.parse_args(parser, SMOKE)

    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    n, p, d = args.images, args.grid**2, args.dim
    results = {"config": vars(args) | {"json": str(args.json), "patches": p},
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                          f"faiss {faiss.__version__}, {args.threads} threads"}
    print(results["machine"])

    results["agreement"] = agreement_check(args, rng)
    print("agreement with the float64 oracle:", results["agreement"])

    features = random_features(n, p, d, rng)
    banks = draw_banks(n, args.banks, args.ratio, generator=rng)
    width = bank_size(n, args.ratio)
    plan = plan_exact_blocks(n, p, k=1, n_banks=args.banks, bank_width=width)

    _, exact_s, exact_mem = measure(memory_scores_exact, features, banks)
    _, naive_s, naive_mem = measure(naive_memory_scores, features, banks[: args.naive_banks], dtype=np.float32)
    _, faiss_s, faiss_mem = measure(memory_scores_faiss, features, banks[: args.faiss_banks],
                                     search=knn.IndexOptions(use_gpu=False))
    naive_full = naive_s * args.banks / args.naive_banks
    faiss_full = faiss_s * args.banks / args.faiss_banks
    exact_rate = exact_flops(n, p, d) / exact_s
    plain_rate = matmul_rate(features, plan, seconds_target=min(10.0, exact_s / 2))
    results["timing"] = {
        "plan": vars(plan),
        "exact_s": exact_s, "exact_peak_rss_bytes": exact_mem,
        "faiss_s_extrapolated": faiss_full, "faiss_s_measured": faiss_s, "faiss_peak_rss_bytes": faiss_mem,
        "naive_s_extrapolated": naive_full, "naive_s_measured": naive_s, "naive_peak_rss_bytes": naive_mem,
        "exact_gflops": exact_rate / 1e9, "matmul_gflops": plain_rate / 1e9,
        "speedup_exact_vs_naive": naive_full / exact_s, "speedup_exact_vs_faiss": faiss_full / exact_s,
        "exact_over_matmul_rate": exact_rate / plain_rate,
    }
    for key, value in results["timing"].items():
        print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")

    ivf_banks = banks[: args.ivf_banks]
    results["ivf"] = {
        "random": ivf_quality(features, ivf_banks, [1, 4]),
        "clustered": ivf_quality(clustered_features(n, p, d, rng), ivf_banks, [1, 4]),
    }
    for kind, rows in results["ivf"].items():
        for row in rows:
            print(f"ivf {kind}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()))

    # The paper's setting whatever the command line: B = 100, rho = 0.1, 2 GiB blocks on the GPU.
    projection = mvtec_projection(784, 768, n_banks=100, ratio=0.1, noise=0.4, block_bytes=2 * 2**30)
    total = projection["total"]
    projection["exact_gpu_s_assumed"] = total["exact_flops"] / (args.gpu_tflops * 1e12)
    projection["naive_gpu_s_assumed"] = total["naive_flops"] / (args.gpu_tflops * 1e12)
    projection["exact_cpu_s_at_measured_rate"] = total["exact_flops"] / exact_rate
    results["mvtec_projection"] = projection
    print("MVTec 40 % projection (ViT-B/14 at 392: P=784, D=768):",
          {k: f"{v:.4g}" for k, v in total.items()},
          f"exact on GPU at {args.gpu_tflops} TFLOP/s: {projection['exact_gpu_s_assumed']:.1f} s,",
          f"naive: {projection['naive_gpu_s_assumed']:.1f} s,",
          f"exact on this CPU: {projection['exact_cpu_s_at_measured_rate'] / 3600:.2f} h")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
