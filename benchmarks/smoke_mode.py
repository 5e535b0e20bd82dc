"""The `--smoke` flag the benchmark scripts share (a helper module, not a script).

A smoke run takes the same code path as a real run on tiny sizes, so that a refactor that breaks
a benchmark fails `tests/test_benchmarks.py` instead of the next person who wants a number. Its
numbers mean nothing; the first line on stdout says so.

A script declares its tiny sizes as argparse defaults for smoke mode; a value given on the
command line still wins (`--smoke --work /tmp/w` keeps that work folder).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

SMOKE_LINE = "SMOKE RUN: sizes are tiny, numbers are meaningless"
SMOKE_HELP = "tiny sizes, same code path: checks that the benchmark still runs (its numbers mean nothing)"


def add_smoke_flag(parser: argparse.ArgumentParser) -> None:
    """Add `--smoke` to a script's parser."""
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)


def parse_args(parser: argparse.ArgumentParser, smoke_defaults: Mapping[str, Any],
               argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; under `--smoke`, parse again with `smoke_defaults` as the defaults
    (explicit options still win) and print the smoke line first on stdout."""
    add_smoke_flag(parser)
    args = parser.parse_args(argv)
    if not args.smoke:
        return args
    parser.set_defaults(**smoke_defaults)
    args = parser.parse_args(argv)
    announce()
    return args


def announce() -> None:
    """Print the line that marks a smoke run's output, before anything else."""
    print(SMOKE_LINE, flush=True)


@contextlib.contextmanager
def work_folder(given: Path | None, prefix: str) -> Iterator[Path]:
    """`given` as is (kept), or a fresh temporary folder removed on exit."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
