"""Step 1 against class size N: exact vs approximate (coreset) engine, on generated features.

No images: each class is N images of P = GRID x GRID unit patch features of width D, drawn
around a set of normal patch prototypes (the cluster structure of real patch features), and
a planted share of contaminant images with a tenth of their patches shifted along a random
direction of their own (a defect region). Every case runs in its own process, so that its peak resident
set (VmHWM from /proc/self/status) is its own.

Reported per case: Step-1 time (score_classes only), peak RSS of the process and the RSS
before scoring (features generated), the image-score AUROC against the planted labels, and for
the approximate engine its agreement with the exact one: the AUROC of its scores at finding
the exact engine's rejected set (the top `rate` share of the class) and the recall of that set
by its own top `rate` share (`rejected recall`). Exact runs above --exact-max are skipped
(their time is projected from the measured FLOP rate instead).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_scale.py --json /tmp/bench/scale.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_scale.py --sizes 20000 --exact-max 0 \\
        --max-memory 4GB --json /tmp/bench/scale-20k.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_scale.py --smoke --json /tmp/bench/scale-smoke.json

--smoke: one class of 60 images of 3 x 3 patches of width 8, the exact and approximate engines
(no Ray cases), in a temporary work folder unless --work is given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import smoke_mode  # noqa: E402

SMOKE = {"sizes": [60], "exact_max": 60, "random_max": 60, "ray_max": 0, "grid": 3, "dim": 8, "threads": 1}
WARM_UP_IMAGES = 100


def generate(n_images: int, grid: int, dim: int, rate: float, seed: int):
    """(N, P, D) float32 unit features and (N,) bool contaminant labels."""
    rng = np.random.default_rng(seed)
    n_patches = grid * grid
    prototypes = rng.standard_normal((32, dim)).astype(np.float32)
    # each image: a layout of prototypes per patch position, jittered per image
    layout = rng.integers(0, len(prototypes), size=n_patches)
    labels = np.zeros(n_images, dtype=bool)
    labels[rng.choice(n_images, size=int(round(rate * n_images)), replace=False)] = True
    features = np.empty((n_images, n_patches, dim), dtype=np.float32)
    for start in range(0, n_images, 1000):
        stop = min(n_images, start + 1000)
        swap = rng.random((stop - start, n_patches)) < 0.2  # some positions show another normal pattern
        pattern = np.where(swap, rng.integers(0, len(prototypes), size=(stop - start, n_patches)), layout)
        block = prototypes[pattern] + 0.6 * rng.standard_normal((stop - start, n_patches, dim), dtype=np.float32)
        for row in np.flatnonzero(labels[start:stop]):
            spot = rng.choice(n_patches, size=max(1, n_patches // 10), replace=False)  # a defect region
            block[row, spot] += 1.5 * rng.standard_normal(dim, dtype=np.float32)  # its own defect
        block /= np.linalg.norm(block, axis=-1, keepdims=True)
        features[start:stop] = block
    return features, labels


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def write_shards(args) -> None:
    """Child: the generated class as a features artifact (float16 shards of 500 images), as `extract` writes it."""
    import torch

    from medsclean.workdir.artifacts import save_tensors, tensor_specs
    from medsclean.workdir.store import Store

    features, labels = generate(args.n, args.grid, args.dim, args.rate, args.seed)
    store = Store(Path(args.out))
    shards, specs = [], {}
    with store.staged("extract") as staging:
        for start in range(0, args.n, 500):
            stop = min(args.n, start + 500)
            tensors = {"index": torch.arange(start, stop), "memory": torch.from_numpy(features[start:stop]).half()}
            name = f"part-{start:07d}.safetensors"
            save_tensors(staging / name, tensors)
            specs[name] = tensor_specs(tensors)
            shards.append({"file": name, "start": start, "end": stop, "rows": stop - start})
        store.commit("extract", f"bench{args.n:011d}", staging, {"shards": shards, "tensors": specs, "images": []})
    np.save(Path(args.out) / "labels.npy", labels)


def child(args) -> None:
    import torch

    from medsclean.values import parse_size
    from medsclean.config import ScoreConfig
    from medsclean.maps import image_scores
    from medsclean.step1.classes import score_classes
    from medsclean.step1.runtime import Runtime

    torch.set_num_threads(1 if args.child in ("exact-1thread", "exact-ray") else args.threads)
    if args.shards:  # read from the artifact's shards on disk, class by class or block by block
        from medsclean.workdir.store import Store

        features = Store(Path(args.shards)).load("extract").rows("memory")
        labels = np.load(Path(args.shards) / "labels.npy")
    else:
        features, labels = generate(args.n, args.grid, args.dim, args.rate, args.seed)
        features = torch.from_numpy(features)
    before = vm_kib("VmRSS")
    engine, method = (args.child.split("-") + ["greedy"])[:2]
    executor = None
    startup = None
    if method == "ray":
        from medsclean import distributed
        from medsclean.config import ClusterConfig

        t0 = time.perf_counter()
        executor = distributed.connect(ClusterConfig(executor="ray", workers=args.ray_workers), Path(args.out).parent)
        n_warm = min(WARM_UP_IMAGES, args.n)
        warm = features.subset(range(n_warm)) if args.shards else features[:n_warm]
        score_classes(warm, ["c"] * n_warm, ScoreConfig(engine="exact", seed=args.seed),
                      Runtime(executor=executor))  # workers up and warm
        startup = time.perf_counter() - t0
    if engine == "approx" and method == "random":  # the random-subsample variant, for the coreset choice
        from medsclean.step1.engines import approx

        original = approx.coreset_patches
        approx.coreset_patches = lambda *a, **kw: original(*a, **{**kw, "method": "random"})
    cfg = ScoreConfig(engine=engine, seed=args.seed, **({"coreset": args.coreset} if engine == "approx" else {}))
    t0 = time.perf_counter()
    maps, _ = score_classes(features, ["c"] * args.n, cfg,
                            Runtime(max_memory=parse_size(args.max_memory) if args.max_memory else None,
                                    executor=executor))
    seconds = time.perf_counter() - t0
    peak = vm_kib("VmHWM") / 1024
    if method == "ray":
        from medsclean import distributed

        distributed.shutdown()
    scores = image_scores(maps).numpy()
    np.savez(args.out, scores=scores, labels=labels, maps=maps.numpy())
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak, "rss_before_mib": before / 1024,
                      "startup_s": startup}))


def top_share(scores: np.ndarray, rate: float) -> np.ndarray:
    count = max(1, int(round(rate * len(scores))))
    mask = np.zeros(len(scores), dtype=bool)
    mask[np.argsort(-scores, kind="stable")[:count]] = True
    return mask


def run_case(case: str, n: int, args, workdir: Path) -> dict:
    out = workdir / f"{case}-{n}.npz"
    command = [sys.executable, __file__, "--child", case, "--n", str(n), "--out", str(out), "--grid", str(args.grid),
               "--dim", str(args.dim), "--rate", str(args.rate), "--seed", str(args.seed), "--coreset",
               str(args.coreset), "--threads", str(args.threads)]
    if args.max_memory:
        command += ["--max-memory", args.max_memory]
    if case == "exact-ray":
        command += ["--ray-workers", str(args.ray_workers)]
    if args.from_shards:
        shards = workdir / f"shards-{n}-{args.grid}-{args.dim}-{args.seed}"
        if not (shards / "labels.npy").is_file():
            subprocess.run([sys.executable, __file__, "--child", "write-shards", "--n", str(n), "--out", str(shards),
                            "--grid", str(args.grid), "--dim", str(args.dim), "--rate", str(args.rate), "--seed",
                            str(args.seed)], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        command += ["--shards", str(shards)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(done.stdout.strip().splitlines()[-1])
    data = np.load(out)
    result.update(case=case, n=n, scores=data["scores"], labels=data["labels"], maps=data["maps"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000, 4000, 8000])
    parser.add_argument("--exact-max", type=int, default=4000, help="largest N timed with the exact engine")
    parser.add_argument("--random-max", type=int, default=1000, help="largest N also run with a random-subsample "
                        "coreset (0: none)")
    parser.add_argument("--ray-max", type=int, default=4000, help="largest N also run on a private Ray instance "
                        "(exact-ray, --ray-workers workers of one thread) and with the local engine on one thread "
                        "(exact-1thread); 0: neither")
    parser.add_argument("--ray-workers", type=int, default=2)
    parser.add_argument("--from-shards", action="store_true", help="score from a features artifact on disk (float16 "
                        "shards, read class by class or, under --max-memory, block by block) instead of a tensor")
    parser.add_argument("--cases", nargs="+", default=None, help="run only these cases (e.g. exact approx)")
    parser.add_argument("--grid", type=int, default=6)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--rate", type=float, default=0.1, help="planted contamination rate")
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--max-memory", default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None, help="folder of the cases' outputs and the shards "
                        "(default: $TMPDIR/bench_scale, kept for reuse; under --smoke a temporary folder)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shards", default=None, help=argparse.SUPPRESS)
    args = smoke_mode.parse_args(parser, SMOKE)
    if args.child == "write-shards":
        return write_shards(args)
    if args.child:
        return child(args)
    work = args.work
    if work is None and not args.smoke:
        work = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_scale"
    with smoke_mode.work_folder(work, "bench-scale-") as workdir:
        run_cases(args, workdir)


def run_cases(args, workdir: Path) -> None:
    """Every (N, case) of the command line: a table row each on stdout, and the --json file."""
    from sklearn.metrics import roc_auc_score

    from medsclean.step1.plan import exact_flops

    n_patches = args.grid * args.grid
    rows = []
    print(f"P = {n_patches}, D = {args.dim}, rate = {args.rate}, coreset = {args.coreset}, "
          f"threads = {args.threads}, max_memory = {args.max_memory}", flush=True)
    header = ("| N | engine | Step-1 time (s) | GFLOP/s (exact products) | peak RSS (MiB) | RSS before (MiB) | "
              "AUROC vs planted | AUROC vs exact rejected | rejected recall vs exact | recall of planted | "
              "maps = exact |")
    print(header + "\n|" + "---|" * 11, flush=True)
    for n in args.sizes:
        cases = (["exact"] if n <= args.exact_max else []) + \
            (["exact-1thread", "exact-ray"] if n <= args.ray_max else []) + ["approx"] + \
            (["approx-random"] if n <= args.random_max else [])
        cases = [c for c in cases if args.cases is None or c in args.cases]
        exact = None
        for case in cases:
            r = run_case(case, n, args, workdir)
            flops = exact_flops(n, n_patches, args.dim)
            r["gflops"] = flops / r["seconds"] / 1e9 if case.startswith("exact") else None
            r["maps_equal_exact"] = None if exact is None or case == "exact" else bool(
                np.array_equal(r["maps"], exact["maps"]))
            r["auroc_planted"] = float(roc_auc_score(r["labels"], r["scores"]))
            r["recall_planted"] = float((top_share(r["scores"], args.rate) & r["labels"]).sum() / r["labels"].sum())
            if case == "exact":
                exact = r
            if exact is not None and case.startswith("approx"):
                rejected = top_share(exact["scores"], args.rate)
                r["auroc_vs_exact"] = float(roc_auc_score(rejected, r["scores"]))
                r["recall_vs_exact"] = float((top_share(r["scores"], args.rate) & rejected).sum() / rejected.sum())
            else:
                r["auroc_vs_exact"] = r["recall_vs_exact"] = None
            show = lambda v, f="{:.3f}": "–" if v is None else f.format(v)  # noqa: E731
            print(f"| {n} | {case} | {r['seconds']:.1f} | {show(r['gflops'], '{:.1f}')} | {r['peak_rss_mib']:.0f} | "
                  f"{r['rss_before_mib']:.0f} | {r['auroc_planted']:.3f} | {show(r['auroc_vs_exact'])} | "
                  f"{show(r['recall_vs_exact'])} | {r['recall_planted']:.3f} | "
                  f"{show(r['maps_equal_exact'], '{}')} |" + (f" (Ray start-up and warm-up {r['startup_s']:.1f} s, "
                                                             f"not counted)" if r.get("startup_s") else ""), flush=True)
            rows.append({k: v for k, v in r.items() if k not in ("scores", "labels", "maps")})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
