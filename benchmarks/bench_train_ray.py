"""`distill` in this process against data-parallel ranks on Ray Train (`--train-workers N`), on the CPU.

Features and Step-1 maps are made once (CPU preset: EfficientNet-Lite0 at 256 px, decoder width
64, depth 4, heads 4, batch 16). Then `run_distill` trains for `--short` and `--long` iterations
each way, so that (long - short) / (iterations between) is the time per step and the rest is the
fixed cost (model set-up; for Ray Train, starting its ranks and the process group). Local training
uses torch's default threads (all cores); each Ray rank one thread.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train_ray.py --json /tmp/bench/train-ray.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train_ray.py --smoke --json /tmp/bench/train-ray-smoke.json

--smoke: 8 images of 64 px read at 64 px, 1 and 2 iterations, still 2 ranks (each Ray Train run
starts its ranks anew: most of its time is that start).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import smoke_mode  # noqa: E402

SMOKE = {"n": 8, "size": 64, "crop": 64, "short": 1, "long": 2}


def make_stages(args, root: Path):
    """The run, and the features and Step-1 scores of `args.n` generated images under `root`."""
    from bench_extract import make_images

    from medsclean import pipeline
    from medsclean.ui import SilentReporter

    (root / "images").mkdir(exist_ok=True)
    make_images(root / "images", args.n, args.size, 0)
    extract = {"resize": args.crop, "crop": args.crop} if args.crop else None
    run = pipeline.build_run(root / "images", root / "work", preset="cpu", seed=0, reporter=SilentReporter(),
                             options={"extract": extract})
    results = pipeline.score_stage(run, run.score_config())
    return run, results["extract"].artifact, results["score"].artifact


def time_distill(run, features, scores, base, iters: int, extra: dict) -> float:
    """Seconds of one `run_distill` of `iters` iterations (trained afresh)."""
    from medsclean.stages.common import TrainingSetup
    from medsclean.stages.distill import run_distill
    from medsclean.ui import SilentReporter

    t0 = time.perf_counter()
    run_distill(features, scores, run.store(), replace(base, iters=iters),
                TrainingSetup(seed=0, device="cpu", reporter=SilentReporter(), **extra), force=True)
    return time.perf_counter() - t0


def measure(args, run, features, scores, base) -> dict:
    """Per-step and fixed cost of local training and of `args.ranks` Ray Train ranks."""
    from medsclean import distributed
    from medsclean.config import ClusterConfig
    from medsclean.distributed.train import DataParallelTrainer

    session = distributed.connect(ClusterConfig(executor="ray", workers=args.ranks), run.work)
    try:
        trainer = DataParallelTrainer(session, args.ranks, use_gpu=False, storage=run.work / ".partial" / "ray-train")
        rows = {}
        for name, extra in (("local", {}), (f"ray-{args.ranks}", {"trainer": lambda: trainer, "world": args.ranks})):
            times = {n: time_distill(run, features, scores, base, n, extra) for n in (args.short, args.long)}
            step = (times[args.long] - times[args.short]) / (args.long - args.short)
            rows[name] = {"seconds": times, "per_step_s": step, "fixed_s": times[args.short] - args.short * step}
        return rows
    finally:
        distributed.shutdown()


def report(args, base, rows: dict) -> None:
    """The table on stdout, and the --json file."""
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores; {args.n} images, "
          f"CPU preset decoder, batch {base.batch_size}")
    print("| training | per step (s) | fixed cost (s) | total for the long run (s) |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['per_step_s']:.3f} | {r['fixed_s']:.1f} | {r['seconds'][args.long]:.1f} |")
    ratio = rows["local"]["per_step_s"] / rows[f"ray-{args.ranks}"]["per_step_s"]
    print(f"per-step speed of {args.ranks} Ray ranks over local: {ratio:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="generated images")
    parser.add_argument("--size", type=int, default=256, help="side of the generated PNGs")
    parser.add_argument("--crop", type=int, default=None, help="encoder input side (default: the preset's)")
    parser.add_argument("--short", type=int, default=20)
    parser.add_argument("--long", type=int, default=80)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="folder of the images and the work folder "
                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--json", type=Path, default=None)
    args = smoke_mode.parse_args(parser, SMOKE)
    if args.long <= args.short:
        parser.error("--long must exceed --short (the time per step is their difference)")
    with smoke_mode.work_folder(args.work, "bench-train-ray-") as root:
        run, features, scores = make_stages(args, root)
        base = run.distill_config(checkpoint_every=0)
        report(args, base, measure(args, run, features, scores, base))


if __name__ == "__main__":
    main()
