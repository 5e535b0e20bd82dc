"""Wall time and peak memory of `medsclean select` on a 300-image folder, from an empty work folder.

The folder is built from the report part's generator (`suite_data.py`): the first four report
classes, 70 good images and 5 defective test images each, 256 px (300 images), written in the
folder layout a user has (`<class>/<image>.png`, no labels). The command runs in a fresh process
with every default (`medsclean select IMAGES --out clean.txt --work WORK`), under
`/usr/bin/time -v` when it exists (peak RSS), else with the peak RSS of the child from
`resource.getrusage`. Stage times are read from the command's own "done in" lines.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_select_time.py --work /tmp/sel300
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_select_time.py --smoke --work /tmp/sel-smoke
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite_data  # noqa: E402

from medsclean.seeding import rng as seeded_rng  # noqa: E402

CLASSES = ("tissue", "retina", "china", "flower")
SMOKE = {"n_good": 3, "n_defect": 1, "size": 64, "extra": ["--distill-iters", "2", "--select-iters", "2"]}


def build_folder(root: Path, n_good: int, n_defect: int, size: int, seed: int = 0) -> int:
    """Write `n_good` good and `n_defect` defective images per class into `root/<class>/`; returns the count."""
    count = 0
    for cls in CLASSES:
        kinds = suite_data.kinds_for(cls)
        for i in range(n_good + n_defect):
            rng = seeded_rng(seed, cls, "select-time", i)
            image = suite_data.render_good(cls, rng, size)
            if i >= n_good:
                image, _ = suite_data.make_defect(image, kinds[i % len(kinds)], rng)
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / cls / f"{cls}_{i:03d}.png")
            count += 1
    return count


def run_select(images: Path, work: Path, extra: list[str]) -> dict:
    """Run the command in a fresh process; wall seconds, peak RSS (GB), stage seconds, exit code."""
    medsclean = Path(sys.executable).with_name("medsclean")
    cmd = [str(medsclean), "select", str(images), "--out", str(work.parent / "clean.txt"), "--work", str(work), *extra]
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MEDSCLEAN_PROGRESS": "0"}
    start = time.perf_counter()
    proc = subprocess.run(timer + cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"select failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    rss_kb = int(match.group(1)) if match else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    stages = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w[\w-]*): done in ([\d.]+) s", proc.stderr,
                                                                   re.MULTILINE)}
    kept = len((work.parent / "clean.txt").read_text().splitlines())
    return {"wall": wall, "rss_gb": rss_kb * 1024 / 1e9, "stages": stages, "kept": kept}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="a scratch folder (images and the work folder)")
    p.add_argument("--smoke", action="store_true", help="12 tiny images and 2 + 2 iterations: checks that it runs")
    p.add_argument("extra", nargs="*", help="more select options, after --")
    args = p.parse_args(argv)
    n_good, n_defect, size, extra = 70, 5, 256, list(args.extra)
    if args.smoke:
        print("SMOKE RUN: sizes are tiny, numbers are meaningless", flush=True)
        n_good, n_defect, size, extra = SMOKE["n_good"], SMOKE["n_defect"], SMOKE["size"], SMOKE["extra"] + extra
    images, work = args.work / "images", args.work / "work"
    shutil.rmtree(args.work, ignore_errors=True)
    n = build_folder(images, n_good, n_defect, size)
    result = run_select(images, work, extra)
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in result["stages"].items())
    print(f"date: {datetime.date.today().isoformat()}; host: {platform.machine()}, {os.cpu_count()} cores")
    print(f"options: {' '.join(extra) or '(all defaults)'}")
    print()
    print("| images | wall | peak RSS | stages | kept |")
    print("|---|---|---|---|---|")
    print(f"| {n} | {result['wall'] / 60:.0f} min {result['wall'] % 60:04.1f} s | {result['rss_gb']:.2f} GB | "
          f"{stages} | {result['kept']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
