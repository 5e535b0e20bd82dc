"""The export loads in anomalib: `MVTecADDataset`, the `MVTecAD` datamodule and `Folder(normal_dir="train/good")`
find exactly the kept images of each class and none of the rejected ones.

anomalib lives in its own virtual environment (`make anomalib-venv` builds `.venv-anomalib`; it pulls
lightning and more, which medsclean's own environment must not get). tests/anomalib_load.py runs there
and reports what the loaders found; the oracle is the keep vector. The tests skip without that
environment, unless $MEDSCLEAN_REQUIRE_ANOMALIB is set (CI sets it), which makes its absence a failure.
"""

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medsclean.cli import app
from medsclean.workdir.export import export_tree

from .helpers import crops, save_png, texture

REPO = Path(__file__).resolve().parents[1]
ANOMALIB_PYTHON = "MEDSCLEAN_ANOMALIB_PYTHON"
REQUIRE_ANOMALIB = "MEDSCLEAN_REQUIRE_ANOMALIB"
DEFAULT_PYTHON = REPO / ".venv-anomalib" / "bin" / "python"
LOADER = Path(__file__).with_name("anomalib_load.py")


def require_anomalib() -> Path:
    """The python of the anomalib environment ($MEDSCLEAN_ANOMALIB_PYTHON, else .venv-anomalib/bin/python);
    skips the test without one, unless $MEDSCLEAN_REQUIRE_ANOMALIB is set, in which case the test fails."""
    python = Path(os.environ.get(ANOMALIB_PYTHON) or DEFAULT_PYTHON)
    if python.is_file() and subprocess.run([str(python), "-c", "import anomalib"], capture_output=True).returncode == 0:
        return python
    if os.environ.get(REQUIRE_ANOMALIB):
        pytest.fail(f"{REQUIRE_ANOMALIB} is set but {python} cannot import anomalib; run `make anomalib-venv`")
    pytest.skip(f"needs anomalib in {python} (`make anomalib-venv`; set {REQUIRE_ANOMALIB}=1 to make its absence "
                f"a failure)")


def load_in_anomalib(tree: Path, classes) -> dict:
    """What anomalib's loaders find in `tree` for each class folder (see tests/anomalib_load.py)."""
    done = subprocess.run([str(require_anomalib()), str(LOADER), str(tree), *classes], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_missing_anomalib_skips_unless_required(monkeypatch, tmp_path):
    monkeypatch.setenv(ANOMALIB_PYTHON, str(tmp_path / "no-python"))
    monkeypatch.delenv(REQUIRE_ANOMALIB, raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_anomalib()
    monkeypatch.setenv(REQUIRE_ANOMALIB, "1")
    with pytest.raises(pytest.fail.Exception, match=REQUIRE_ANOMALIB):
        require_anomalib()
    monkeypatch.setenv(ANOMALIB_PYTHON, sys.executable)  # a python without anomalib (medsclean's own) fails too
    with pytest.raises(pytest.fail.Exception, match=REQUIRE_ANOMALIB):
        require_anomalib()


def _folder(root: Path, files: dict[str, str]) -> None:
    """Writes each image `files` names (path -> texture) as a small PNG crop."""
    rng = np.random.default_rng(0)
    for path, name in files.items():
        save_png(root / path, crops(texture(name), 1, 32, rng)[0])


# A plain folder with a nested class and a class named like the rejected folder, and a keep vector by hand.
FILES = {"brick/0.png": "brick", "brick/1.png": "brick", "brick/2.png": "brick", "brick/3.png": "brick",
         "gravel/sub/0.png": "gravel", "gravel/sub/1.png": "gravel", "gravel/sub/2.png": "gravel",
         "_rejected/0.png": "grass", "_rejected/1.png": "grass"}
CLASSES = {"brick/0.png": "brick", "brick/1.png": "brick", "brick/2.png": "brick", "brick/3.png": "brick",
           "gravel/sub/0.png": "gravel/sub", "gravel/sub/1.png": "gravel/sub", "gravel/sub/2.png": "gravel/sub",
           "_rejected/0.png": "_rejected", "_rejected/1.png": "_rejected"}
KEEP = {"brick/0.png": True, "brick/1.png": False, "brick/2.png": True, "brick/3.png": True,
        "gravel/sub/0.png": False, "gravel/sub/1.png": True, "gravel/sub/2.png": True,
        "_rejected/0.png": True, "_rejected/1.png": False}
FOLDERS = {"brick": "brick", "gravel/sub": "gravel__sub", "_rejected": "_rejected"}


def test_anomalib_loads_exactly_the_kept_images_of_each_class(tmp_path):
    require_anomalib()
    _folder(tmp_path / "images", FILES)
    rows = [{"path": p, "class": CLASSES[p]} for p in FILES]
    keep = [KEEP[p] for p in FILES]
    export_tree(tmp_path / "tree", tmp_path / "images", rows, keep, run="k")
    export_tree(tmp_path / "links", tmp_path / "images", rows, keep, link="symlink", run="k")
    found = load_in_anomalib(tmp_path / "tree", FOLDERS.values())
    for cls, folder in FOLDERS.items():
        kept = [p for p in FILES if CLASSES[p] == cls and KEEP[p]]
        rejected = {p for p in FILES if CLASSES[p] == cls and not KEEP[p]}
        for loader in ("dataset", "mvtec", "folder"):
            paths = found[folder][loader]
            assert isinstance(paths, list) and len(paths) == len(kept), (cls, loader, paths)
            assert all(p.startswith(f"{folder}/train/good/") for p in paths), (cls, loader, paths)
            sources = {q for q in FILES if any(os.path.samefile(tmp_path / "tree" / p, tmp_path / "images" / q)
                                               for p in paths)}
            assert sources == set(kept) and not sources & rejected, (cls, loader)
        assert found[folder]["batch"] == len(kept)  # the hard-linked files decode

    links = load_in_anomalib(tmp_path / "links", ["brick"])["brick"]  # what `--link symlink`'s help says
    assert "Found 0 images" in links["mvtec"] and "Found 0 images" in links["dataset"]
    assert len(links["folder"]) == 3


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_select_export_loads_in_anomalib(tmp_path):
    require_anomalib()
    _folder(tmp_path / "images", {f"{cls}/{i}.png": cls for cls in ("brick", "gravel") for i in range(8)})
    res = CliRunner().invoke(app, ["select", str(tmp_path / "images"), "--work", str(tmp_path / "work"), "--json",
                                   "--method", "memory", "--random-init", "--resize", "32", "--crop", "32",
                                   "--num-workers", "0", "--banks", "4", "--reject-fraction", "0.25",
                                   "--export", str(tmp_path / "tree")])
    assert res.exit_code == 0, res.output
    with open(Path(json.loads(res.stdout)["cut_dir"]) / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))  # the run's keep vector: the oracle
    kept = Counter(r["class"] for r in rows if r["kept"] == "1")
    assert set(kept) == {"brick", "gravel"} and sum(kept.values()) < len(rows)
    found = load_in_anomalib(tmp_path / "tree", kept)
    rejected = (tmp_path / "tree" / "rejected.txt").read_text().splitlines()
    for cls, n in kept.items():
        for loader in ("dataset", "mvtec", "folder"):
            paths = found[cls][loader]
            assert isinstance(paths, list) and len(paths) == n and not set(paths) & set(rejected), (cls, loader)
            assert {(tmp_path / "tree" / p).stat().st_ino for p in paths} == {
                (tmp_path / "images" / r["path"]).stat().st_ino for r in rows if r["class"] == cls and r["kept"] == "1"}
