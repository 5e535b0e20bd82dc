"""Start-up cost of the command line: `--help` and a rejected choice, side by side with another tree.

    .venv/bin/python benchmarks/bench_cli.py [--other /path/to/older/checkout] [--repeats 7]
    .venv/bin/python benchmarks/bench_cli.py --smoke     # one repeat: checks that it runs

Each case runs `python -m medsclean ...` in a fresh process (the same interpreter, with the tree
on PYTHONPATH) and reports the median wall time; with --other the same cases run on that tree
in the same loop, alternating, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import smoke_mode

SMOKE = {"repeats": 1}
CASES = {
    "--help": ["--help"],
    "select --help": ["select", "--help"],
    "select --method bogus (exit 2)": ["select", ".", "--method", "bogus"],
}


def timed(tree: Path, args: list[str]) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from medsclean.cli import main; main()", *args], env=env,
                          capture_output=True, cwd="/tmp")
    return time.perf_counter() - start, proc.returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, help="another checkout to compare with")
    parser.add_argument("--repeats", type=int, default=7)
    args = smoke_mode.parse_args(parser, SMOKE, argv)
    trees = {"this": Path(__file__).resolve().parents[1]}
    if args.other:
        trees["other"] = args.other.resolve()
    print(f"| case | {' | '.join(f'{n} (s)' for n in trees)} | exit codes |")
    print("|---|" + "---|" * (len(trees) + 1))
    for name, case in CASES.items():
        times: dict[str, list[float]] = {n: [] for n in trees}
        codes: dict[str, int] = {}
        for _ in range(args.repeats):
            for tree_name, tree in trees.items():
                seconds, code = timed(tree, case)
                times[tree_name].append(seconds)
                codes[tree_name] = code
        cells = " | ".join(f"{statistics.median(v):.2f}" for v in times.values())
        print(f"| `{name}` | {cells} | {', '.join(f'{n} {c}' for n, c in codes.items())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
