"""Projected wall time and cost of `extract` + Step 1 for large datasets on G GPUs, from measured rates
and stated assumptions (every input is a flag; the table says which are measured).

Measured (from `bench_scale.py --json`): the exact engine's FLOP rate on this machine and the
scaling efficiency of the Ray executor (time on one local thread / time on W Ray workers / W).
Assumed: the sustained float32 matmul rate of one GPU, the encoder's images per second per GPU,
and the price of a GPU-hour. Step 1 of a class is spread over all G GPUs as block tasks (the
`--executor ray` path with `--device cuda`), classes one after another; `extract` runs on all
G GPUs at once. Training (`distill`, `select`, data-parallel with `--train-workers`) is not
included: its cost is a fixed number of iterations, independent of N.

    .venv/bin/python benchmarks/project_scale.py --scale-json /tmp/bench/scale-ray.json
    .venv/bin/python benchmarks/project_scale.py --smoke

--smoke: projects from a made-up `bench_scale.py --json` file (written to a temporary folder, the
shape of a real one with the four cases it reads) instead of a measured one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import smoke_mode

DATASETS = {  # name: (classes, images per class)
    "Real-IAD-sized (150k images, 30 classes × 5k)": (30, 5000),
    "10⁶ images (30 classes × 33.3k)": (30, 33_334),
}
PRESETS = {  # name: (patches P, dim D, encoder GFLOP per image)
    "cpu preset (Lite0 at 256 px, P = 32×32 = 1024, D = 152)": (1024, 152, 0.6),
    "paper preset (ViT-B/14 at 392 px, P = 28×28 = 784, D = 768)": (784, 768, 165.0),
}


def measured(scale_json: Path) -> dict:
    rows = json.loads(scale_json.read_text())["rows"]
    largest = max(r["n"] for r in rows if r["case"] == "exact-ray")
    at = {r["case"]: r for r in rows if r["n"] == largest}
    workers = int(json.loads(scale_json.read_text())["args"].get("ray_workers", "2"))
    speedup = at["exact-1thread"]["seconds"] / at["exact-ray"]["seconds"]
    return {"n": largest, "cpu_gflops": at["exact"]["gflops"], "ray_speedup": speedup, "workers": workers,
            "efficiency": min(1.0, speedup / workers), "approx_ratio": at["approx"]["seconds"] / at["exact"]["seconds"]}


def made_up_scale_json(folder: Path) -> Path:
    """A `bench_scale.py --json` file of invented timings at one N, for --smoke."""
    timings = {"exact": (10.0, 2.0), "exact-1thread": (19.0, 1.05), "exact-ray": (10.5, 1.9), "approx": (3.0, None)}
    rows = [{"case": case, "n": 100, "seconds": seconds, "gflops": gflops}
            for case, (seconds, gflops) in timings.items()]
    path = folder / "scale-smoke.json"
    path.write_text(json.dumps({"args": {"ray_workers": "2", "smoke": "True"}, "rows": rows}))
    return path


def hours(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale-json", type=Path, help="bench_scale.py --json output (measured; required "
                        "unless --smoke)")
    parser.add_argument("--gpu-tflops", type=float, default=20.0, help="assumed sustained fp32 matmul TFLOP/s per GPU")
    parser.add_argument("--decode-per-gpu", type=float, default=1000.0,
                        help="assumed images/s one GPU's share of CPU cores decodes (8 cores at ~125 images/s)")
    parser.add_argument("--encoder-efficiency", type=float, default=0.5,
                        help="assumed share of --gpu-tflops the encoder's forward pass reaches")
    parser.add_argument("--usd-per-gpu-hour", type=float, default=2.5, help="assumed price of one GPU-hour")
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    args = smoke_mode.parse_args(parser, {})
    if args.scale_json is None and not args.smoke:
        parser.error("--scale-json is required (or --smoke)")
    if args.scale_json is None:
        with tempfile.TemporaryDirectory(prefix="project-scale-") as tmp:
            print_projection(args, measured(made_up_scale_json(Path(tmp))))
    else:
        print_projection(args, measured(args.scale_json))


def print_projection(args, m: dict) -> None:
    """The measured and assumed inputs, then the projection table."""
    print(f"measured: exact engine {m['cpu_gflops']:.1f} GFLOP/s on 2 threads; Ray scaling efficiency "
          f"{m['efficiency']:.2f} ({m['ray_speedup']:.2f}x on {m['workers']} workers over one thread, N = {m['n']})")
    print(f"assumed: {args.gpu_tflops} TFLOP/s per GPU for the products, encoder at {args.encoder_efficiency:.0%} of it, "
          f"decode {args.decode_per_gpu:.0f} images/s per GPU, ${args.usd_per_gpu_hour}/GPU-hour; approx = "
          f"coreset {args.coreset} of the exact products\n")
    print("| dataset | features | GPUs | extract | Step 1 exact | Step 1 approx | total exact (cost) | total approx (cost) |")
    print("|---|---|---|---|---|---|---|---|")
    for dataset, (classes, per_class) in DATASETS.items():
        for preset, (patches, dim, encoder_gflop) in PRESETS.items():
            flops = classes * 2.0 * per_class**2 * patches**2 * dim
            for gpus in args.gpus:
                rate = gpus * args.gpu_tflops * 1e12 * m["efficiency"]
                per_gpu = min(args.decode_per_gpu, args.gpu_tflops * 1e3 * args.encoder_efficiency / encoder_gflop)
                extract = classes * per_class / (gpus * per_gpu)
                exact, approx = flops / rate, args.coreset * flops / rate
                cost = lambda s: gpus * s / 3600 * args.usd_per_gpu_hour  # noqa: E731
                print(f"| {dataset} | {preset} | {gpus} | {hours(extract)} | {hours(exact)} | {hours(approx)} | "
                      f"{hours(extract + exact)} (${cost(extract + exact):,.0f}) | "
                      f"{hours(extract + approx)} (${cost(extract + approx):,.0f}) |")


if __name__ == "__main__":
    main()
