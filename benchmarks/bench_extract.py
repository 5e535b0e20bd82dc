"""Throughput of `medsclean extract` against the raw backbone forward on the same images.

Both run in one invocation, one after the other, so the ratio is meaningful on a noisy machine:
  raw      - images decoded and preprocessed beforehand (not timed), then only encoder(x) timed;
  extract  - the full `medsclean extract` command in a subprocess: discovery, parallel decoding in
             loader workers, the forward pass, float16 shards on disk, the manifest.
Peak memory: ru_maxrss of the extract subprocess, and of this process for the raw loop.

    .venv/bin/python benchmarks/bench_extract.py --images 96 --size 256 --num-workers 2
    .venv/bin/python benchmarks/bench_extract.py --smoke     # 4 images of 64 px: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import smoke_mode

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the CLI's setting, for both sides of the comparison
SMOKE = {"images": 4, "size": 64, "resize": 64, "crop": 64, "batch_size": 4}


def make_images(folder: Path, n: int, size: int, seed: int) -> None:
    from skimage import data

    bases = [data.brick(), data.grass(), data.gravel()]
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = bases[i % 3]
        y, x = rng.integers(0, base.shape[0] - 300, size=2)
        patch = np.stack([base[y:y + 300, x:x + 300]] * 3, axis=-1)
        Image.fromarray(patch).resize((size, size)).save(folder / f"{i:04d}.png")


def raw_forward(folder: Path, args) -> dict:
    import torch

    from medsclean.model.encoder import load_encoder
    from medsclean.workdir.images import decode_image, normalise, resize_crop

    encoder = load_encoder(args.backbone, resize=args.resize, crop=args.crop)
    paths = sorted(folder.glob("*.png"))
    x = torch.from_numpy(np.stack([normalise(resize_crop(decode_image(p), encoder.preprocess), encoder.preprocess) for p in paths]))
    with torch.inference_mode():
        encoder(x[: args.batch_size])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(x), args.batch_size):
            encoder(x[i:i + args.batch_size])
        seconds = time.perf_counter() - t0
    return {"images": len(paths), "seconds": seconds, "images_per_s": len(paths) / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def cli_extract(folder: Path, work: Path, args) -> dict:
    cmd = [sys.executable, "-m", "medsclean", "extract", str(folder), "--work", str(work), "--json",
           "--backbone", args.backbone, "--resize", str(args.resize), "--crop", str(args.crop),
           "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers), "--force", "-q"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    payload = json.loads(out.stdout)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"images": payload["images"], "wall_s": wall, "stage_s": payload["seconds"],
            "images_per_s_stage": payload["images"] / payload["seconds"], "images_per_s_wall": payload["images"] / wall,
            "peak_rss_mb": max(peak, before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=256, help="side of the generated PNGs")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = smoke_mode.parse_args(parser, SMOKE)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        make_images(folder, args.images, args.size, args.seed)
        extract = cli_extract(folder, Path(tmp) / "work", args)
        raw = raw_forward(folder, args)
    ratio = extract["images_per_s_stage"] / raw["images_per_s"]
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                      "torch_threads": torch.get_num_threads(), "args": vars(args), "raw": raw, "extract": extract,
                      "ratio_extract_over_raw": ratio}, indent=2))
    print(f"\nraw forward {raw['images_per_s']:.1f} images/s; medsclean extract {extract['images_per_s_stage']:.1f} "
          f"images/s in the stage ({extract['images_per_s_wall']:.1f} with process start); ratio {ratio:.2f} "
          f"(target >= 0.9); peak RSS extract {extract['peak_rss_mb']:.0f} MB, raw {raw['peak_rss_mb']:.0f} MB",
          file=sys.stderr)


if __name__ == "__main__":
    main()
