"""Throughput of `extract` with the local executor against the Ray executor, on the same images.

Each run is `run_extract` into a fresh work folder (every image encoded), in its own subprocess:
  local - this process decodes in `--num-workers` DataLoader workers and encodes on torch's
          default threads (the CLI's default executor);
  ray   - a private Ray instance of `--ray-workers` CPUs: decoding in Ray Data tasks, encoding in
          an actor pool of one single-threaded encoder per worker. The instance's start-up
          (`distributed.connect`) is timed apart from the stage and reported separately.
images/s is the stage's images over `ExtractResult.seconds` (hashing, decoding, encoding, the
cache entries and the artifact); the Ray stage also pays its actors' start (imports and encoder
loading), which the local stage pays in-process. The encoder is the project's default,
EfficientNet-Lite0 with its packaged ImageNet weights, when they load offline; otherwise a tiny
random-init model (`--fallback`), and the output says which.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_extract_ray.py --n 300 --json /tmp/bench/extract-ray.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_extract_ray.py --images /data/folder
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_extract_ray.py --smoke --json /tmp/bench/extract-ray-smoke.json

--smoke: 4 generated images of 64 px, one run of each executor (a private Ray instance of --ray-workers 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import smoke_mode  # noqa: E402

SMOKE = {"n": 4, "size": 64, "resize": 64, "crop": 64, "batch_size": 4, "repeats": 1}
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GOMP_SPINCOUNT", "2000")  # the CLI's setting (cli.limit_openmp_spinning), for both sides


def child(args) -> None:
    """One run, in this (fresh) process: print a JSON line."""
    from medsclean.config import ClusterConfig, ExtractConfig
    from medsclean.workdir.data import discover
    from medsclean.stages.features import run_extract
    from medsclean.workdir.store import Store
    from medsclean.ui import SilentReporter

    cfg = ExtractConfig(**json.loads(args.cfg))
    dataset = discover(Path(args.images))
    executor, startup = None, None
    if args.child == "ray":
        from medsclean import distributed

        t0 = time.perf_counter()
        executor = distributed.connect(ClusterConfig(executor="ray", workers=args.ray_workers), Path(args.work))
        startup = time.perf_counter() - t0
    result = run_extract(dataset, Store(Path(args.work)), cfg, reporter=SilentReporter(), executor=executor)
    stop = None
    if executor is not None:
        from medsclean import distributed

        t0 = time.perf_counter()
        distributed.shutdown()
        stop = time.perf_counter() - t0
    encoder = result.artifact.manifest["encoder"]
    print(json.dumps({"images": result.n_images, "extracted": result.n_extracted, "skipped": result.n_skipped,
                      "stage_s": result.seconds, "startup_s": startup, "shutdown_s": stop,
                      "key": result.artifact.key, "encoder": encoder["name"],
                      "weights": encoder["weights_source"]}))


def choose_encoder(args) -> tuple[dict, str]:
    """ExtractConfig fields of the encoder to time, and a note on it: the default backbone with its
    real weights if they load here offline, else the tiny random-init fallback."""
    from medsclean.model.encoder import load_encoder
    from medsclean.errors import MedscleanError

    fields = {"resize": args.resize, "crop": args.crop, "batch_size": args.batch_size,
              "num_workers": args.num_workers, "device": "cpu"}
    try:
        load_encoder(args.backbone, resize=args.resize, crop=args.crop)
        return {"backbone": args.backbone, **fields}, f"{args.backbone}, real weights"
    except MedscleanError as exc:
        note = f"{args.fallback}, RANDOM weights ({args.backbone} did not load offline: {exc})"
        return {"backbone": args.fallback, "random_init": True, **fields}, note


def run(executor: str, folder: Path, work: Path, cfg: dict, args) -> dict:
    command = [sys.executable, __file__, "--child", executor, "--images", str(folder), "--work", str(work),
               "--cfg", json.dumps(cfg), "--ray-workers", str(args.ray_workers)]
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{executor} run failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    stderr = [line for line in done.stderr.splitlines() if line.strip()]
    result.update(executor=executor, wall_s=wall, images_per_s=result["images"] / result["stage_s"],
                  stderr_lines=len(stderr), stderr=stderr[:20])
    return result


def make_folder(folder: Path, n: int, size: int, seed: int) -> None:
    from bench_extract import make_images  # scikit-image's CC0 textures, as the tests' images

    folder.mkdir(parents=True)
    make_images(folder, n, size, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=None, help="an image folder (default: generate --n images)")
    parser.add_argument("--n", type=int, default=300, help="images to generate")
    parser.add_argument("--size", type=int, default=256, help="side of the generated PNGs")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--fallback", default="test_resnet", help="tiny model used (random-init) when --backbone "
                        "has no weights offline")
    parser.add_argument("--resize", type=int, default=None, help="default: the backbone's (256 for CNNs)")
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2, help="loader workers of the local executor")
    parser.add_argument("--ray-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each executor, alternating; medians")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cfg", default=None, help=argparse.SUPPRESS)
    args = smoke_mode.parse_args(parser, SMOKE)
    if args.child:
        child(args)
        return
    cfg, encoder_note = choose_encoder(args)
    with tempfile.TemporaryDirectory(prefix="bench-extract-ray-") as tmp:
        folder = args.images
        if folder is None:
            folder = Path(tmp) / "images"
            make_folder(folder, args.n, args.size, args.seed)
        runs: dict[str, list[dict]] = {"local": [], "ray": []}
        for r in range(args.repeats):
            for executor in runs:
                runs[executor].append(run(executor, folder, Path(tmp) / f"work-{executor}-{r}", cfg, args))
    keys = {res["key"] for results in runs.values() for res in results}
    summary = {name: {k: statistics.median(res[k] for res in results) for k in ("images_per_s", "stage_s", "wall_s")}
               for name, results in runs.items()}
    summary["ray"]["startup_s"] = statistics.median(res["startup_s"] for res in runs["ray"])
    summary["ray"]["shutdown_s"] = statistics.median(res["shutdown_s"] for res in runs["ray"])
    ratio = summary["ray"]["images_per_s"] / summary["local"]["images_per_s"]
    payload = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "encoder": encoder_note, "cfg": cfg, "images": runs["local"][0]["images"],
               "folder": str(args.images) if args.images else f"generated: {args.n} PNGs of {args.size} px",
               "same_key": len(keys) == 1, "summary": summary, "ratio_ray_over_local": ratio, "runs": runs}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1))
    print(f"{payload['date']}, {payload['machine']}; {payload['images']} images ({payload['folder']}); "
          f"encoder {encoder_note}; batch {args.batch_size}; local: {args.num_workers} loader workers; "
          f"ray: {args.ray_workers} workers, private instance; medians of {args.repeats}")
    print("| executor | stage (s) | images/s | instance start-up (s) | shutdown (s) | process wall (s) |")
    print("|---|---|---|---|---|---|")
    for name, row in summary.items():
        up = f"{row['startup_s']:.1f}" if "startup_s" in row else "-"
        down = f"{row['shutdown_s']:.1f}" if "shutdown_s" in row else "-"
        print(f"| {name} | {row['stage_s']:.1f} | {row['images_per_s']:.1f} | {up} | {down} | {row['wall_s']:.1f} |")
    print(f"ray/local images/s: {ratio:.2f}; same artifact key: {payload['same_key']}; "
          f"stderr lines of the ray run: {runs['ray'][0]['stderr_lines']}")


if __name__ == "__main__":
    main()
