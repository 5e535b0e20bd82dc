"""The lists' one path convention: each image as `find IMAGES -type f` prints it, with the folder
exactly as the user typed it (`./images/...` stays `./images/...`). The oracle is GNU find itself."""

import subprocess
import sys

import numpy as np
import pytest

from medsclean.stages.outputs import user_paths
from medsclean.workdir.data import discover

from .helpers import crops, save_png, texture


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A plain folder `images/` with two class folders, one of them nested, in a fresh directory."""
    base = tmp_path_factory.mktemp("lists")
    rng = np.random.default_rng(0)
    for i, img in enumerate(crops(texture("brick"), 6, 64, rng)):
        save_png(base / "images" / "brick" / f"b{i}.png", img)
    for i, img in enumerate(crops(texture("gravel"), 6, 64, rng)):
        save_png(base / "images" / "gravel" / "lot 2" / f"g{i}.png", img)
    return base


def _find(base, typed: str) -> list[str]:
    done = subprocess.run(["find", typed, "-type", "f", "-name", "*.png"], cwd=base, capture_output=True,
                          text=True, check=True)
    return sorted(done.stdout.splitlines())


@pytest.mark.parametrize("typed", ["./images", "images", "images/", "./images/", "ABSOLUTE"])
def test_user_paths_are_what_find_prints_for_the_folder_as_typed(site, typed):
    typed = str(site / "images") if typed == "ABSOLUTE" else typed
    rows = [{"path": r.rel_path} for r in discover(site / "images").records]
    assert sorted(user_paths(typed, rows)) == _find(site, typed)


def test_select_writes_the_lists_under_the_folder_as_typed(site, tmp_path):
    command = [sys.executable, "-m", "medsclean", "select", "./images", "--work", str(tmp_path / "work"),
               "--method", "memory", "--banks", "4", "--resize", "64", "--crop", "64", "--num-workers", "0",
               "--out", str(tmp_path / "clean.txt"), "--rejected", str(tmp_path / "rejected.txt"), "-q"]
    done = subprocess.run(command, cwd=site, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    kept = (tmp_path / "clean.txt").read_text().splitlines()
    rejected = (tmp_path / "rejected.txt").read_text().splitlines()
    assert kept and all(p.startswith("./images/") for p in kept + rejected)
    assert sorted(kept + rejected) == _find(site, "./images")
