"""Corrections: `--keep FILE` / `--reject FILE` (`keep=` / `reject=`) override the cut for the images
they list, in `cut` and `select`; the paths are matched in every form a user has; the override is in
the cut's key, manifest, scores.csv (`decision`), the run record, the rows and the review page."""

import csv
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import medsclean
from medsclean.api.corrections import resolve_corrections
from medsclean.cli import app
from medsclean.errors import ConfigError
from medsclean.stages.cut import Corrections, apply_corrections

from .helpers import make_mvtec

FAST = ["--resize", "64", "--crop", "64", "--num-workers", "0", "--banks", "10", "--width", "16", "--depth", "2",
        "--heads", "2", "--distill-iters", "20", "--select-iters", "20"]
RELS = ["a/x.png", "a/y.png", "b/z.png", "b/deep/w.png"]


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """An image folder `images/` (contents never read by the resolver) seen from `tmp_path`."""
    root = tmp_path / "images"
    for rel in RELS:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    return root


def test_paths_are_matched_in_every_form_a_user_has(folder, tmp_path):
    (tmp_path / "link").symlink_to(folder)
    keep = tmp_path / "keep.txt"
    keep.write_text("# images to keep\n./images/a/x.png\n\n   images/a/y.png   \n"
                    f"{folder}/b/z.png\nb/deep/w.png\n./link/a/x.png\n")
    found = resolve_corrections(folder.resolve(), RELS, keep=keep)
    assert found == Corrections(keep=("a/x.png", "a/y.png", "b/deep/w.png", "b/z.png"))
    os.chdir(folder / "b")  # relative to the current folder, elsewhere than the folder's parent
    found = resolve_corrections(folder.resolve(), RELS, reject=["deep/w.png", "../a/y.png"])
    assert found == Corrections(reject=("a/y.png", "b/deep/w.png"))


def test_a_path_that_is_no_image_names_the_file_the_line_and_the_path(folder, tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("./images/a/x.png\n# fine\n./images/a/missing.png\n")
    with pytest.raises(ConfigError, match=rf"^keep: {keep}:3: ./images/a/missing.png is not an image of ") as caught:
        resolve_corrections(folder.resolve(), RELS, keep=keep)
    assert caught.value.param == "keep"
    with pytest.raises(ConfigError, match=r"^reject: reject\[1\]: nope.png is not an image"):
        resolve_corrections(folder.resolve(), RELS, reject=["a/x.png", "nope.png"])


def test_a_path_in_both_lists_is_refused_naming_it(folder, tmp_path):
    (tmp_path / "k.txt").write_text("a/x.png\nimages/b/z.png\n")
    (tmp_path / "r.txt").write_text("./images/b/z.png\n")
    with pytest.raises(ConfigError, match=r"^keep \(k.txt:2\) and reject \(r.txt:1\) both name b/z.png"):
        resolve_corrections(folder.resolve(), RELS, keep="k.txt", reject="r.txt")


def test_corrections_override_the_cut_either_way():
    images = [{"path": p} for p in ("p0", "p1", "p2", "p3")]
    keep, decisions = apply_corrections(np.array([True, False, True, False]), images,
                                        Corrections(keep=("p1",), reject=("p2",)))
    assert keep.tolist() == [True, True, False, False]
    assert decisions == ["auto", "kept by user", "rejected by user", "auto"]
    with pytest.raises(ConfigError, match="p9 is not an image of this selection"):
        apply_corrections(np.ones(4, bool), images, Corrections(reject=("p9",)))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    base = tmp_path_factory.mktemp("corrections")
    data = make_mvtec(base / "images", n_train=8)
    res = _invoke("select", data, "--work", base / "work", *FAST, "--reject-fraction", "0.25", "-q")
    assert res.exit_code == 0, res.output
    return base, data


def _scores(cut_dir: Path) -> list[dict]:
    with open(cut_dir / "scores.csv") as f:
        return list(csv.DictReader(f))


def test_a_corrected_cut_honours_the_overrides_everywhere(made, tmp_path, monkeypatch):
    base, data = made
    plain = medsclean.cut(str(data), work=base / "work", progress=False, reject_fraction=0.25)
    # no correction: the key a cut always had (select key and cut config, nothing else)
    from medsclean.config import CutConfig
    from medsclean.workdir.artifacts import digest

    cfg = CutConfig(rule="mixture", reject_fraction=0.25)  # the cpu preset's rule; a mixture cut is marked
    assert plain.run == digest({"select": plain.summary["select_key"], "cut": asdict(cfg), "mixture": 2})
    assert {r["decision"] for r in plain.rows} == {"auto"}
    rejected, kept = plain.rejected[0], plain.kept[0]
    (tmp_path / "keep.txt").write_text(f"# a false positive\n{rejected}\n")
    (tmp_path / "reject.txt").write_text(f"{Path(kept).relative_to(data)}\n")  # relative to the folder
    res = _invoke("cut", data, "--work", base / "work", "--reject-fraction", "0.25", "--keep", tmp_path / "keep.txt",
                  "--reject", tmp_path / "reject.txt", "--out", tmp_path / "clean.txt", "--rejected",
                  tmp_path / "rejected.txt", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    clean = (tmp_path / "clean.txt").read_text().splitlines()
    assert set(clean) == set(plain.kept) - {kept} | {rejected}
    assert set((tmp_path / "rejected.txt").read_text().splitlines()) == set(plain.rejected) - {rejected} | {kept}
    assert summary["run"] != plain.run and summary["kept"] == len(plain.kept)
    rel = {p: str(Path(p).relative_to(data)) for p in (kept, rejected)}
    assert summary["overrides"] == {"kept": [rel[rejected]], "rejected": [rel[kept]]}
    by_class = {c: sum(1 for p in clean if f"/{c}/" in p) for c in ("brick", "gravel")}
    assert {c: v["kept"] for c, v in summary["classes"].items()} == by_class

    cut_dir = Path(summary["cut_dir"])
    manifest = json.loads((cut_dir / "manifest.json").read_text())
    assert manifest["overrides"] == summary["overrides"]
    decisions = {r["path"]: r["decision"] for r in _scores(cut_dir)}
    assert decisions.pop(rel[rejected]) == "kept by user" and decisions.pop(rel[kept]) == "rejected by user"
    assert set(decisions.values()) == {"auto"}
    record = json.loads(next((base / "work" / "runs").glob("*.json")).read_text())
    assert record["latest"] == summary["run"]
    assert record["runs"][summary["run"]]["options"]["corrections"] == {"keep": [rel[rejected]],
                                                                        "reject": [rel[kept]]}

    # the API: the rows carry the decision, and the same correction gives the same cut
    again = medsclean.cut(str(data), work=base / "work", progress=False, reject_fraction=0.25, keep=[rejected],
                          reject=[kept])
    assert again.run == summary["run"] and again.kept == clean
    assert {r["path"]: r["decision"] for r in again.rows if r["decision"] != "auto"} == {
        rejected: "kept by user", kept: "rejected by user"}
    recut = again.recut(reject_fraction=0.5)  # a re-cut keeps the corrections
    assert {r["path"]: r["decision"] for r in recut.rows if r["decision"] != "auto"} == {
        rejected: "kept by user", kept: "rejected by user"}
    auto = medsclean.cut(str(data), work=base / "work", progress=False, reject_fraction=0.5)
    assert set(recut.rejected) == set(auto.rejected) - {rejected} | {kept}


def test_the_review_page_rows_carry_the_decision(made, monkeypatch):
    base, data = made
    import medsclean.pages.review

    seen = {}

    def capture(out_dir, *, rows, **kwargs):
        seen["rows"] = list(rows)
        out_dir.mkdir(parents=True, exist_ok=True)
        return out_dir / "report.html"

    monkeypatch.setattr(medsclean.pages.review, "write_review", capture)
    some = sorted(p.relative_to(data).as_posix() for p in data.glob("brick/train/good/*.png"))[:2]
    selection = medsclean.cut(str(data), work=base / "work", progress=False, cut="otsu", keep=[some[0]],
                              reject=[some[1]], report=base / "review-otsu")
    decisions = {r["path"]: r["decision"] for r in seen["rows"]}
    assert decisions == {r["path"].split(f"{data}/", 1)[1]: r["decision"] for r in selection.rows}
    assert decisions[some[0]] == "kept by user" and decisions[some[1]] == "rejected by user"


def test_select_takes_corrections_without_retraining_and_checks_them_first(made, tmp_path):
    base, data = made
    work = tmp_path / "work"
    shutil.copytree(base / "work", work)
    first = sorted(p.relative_to(data).as_posix() for p in data.glob("gravel/train/good/*.png"))[0]
    (tmp_path / "reject.txt").write_text(f"{data}/{first}\n")
    res = _invoke("select", data, "--work", work, *FAST, "--reject-fraction", "0.25", "--reject",
                  tmp_path / "reject.txt", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["recut"] and not summary["trained"] and summary["overrides"]["rejected"] == [first]
    assert next(r for r in _scores(Path(summary["cut_dir"])) if r["path"] == first)["decision"] == "rejected by user"

    (tmp_path / "bad.txt").write_text("\n# none yet\nimages/gravel/train/good/none.png\n")
    before = {stage: sorted(p.name for p in (work / stage).iterdir()) for stage in ("distill", "select", "cut")}
    res = _invoke("select", data, "--work", work, *FAST, "--distill-iters", "30", "--keep", tmp_path / "bad.txt")
    assert res.exit_code == 2
    assert res.stderr.startswith(f"error: --keep: {tmp_path / 'bad.txt'}:3: images/gravel/train/good/none.png is "
                                 f"not an image of {data}")
    assert "this trains" not in res.stderr  # refused before the warning and before any stage
    assert {stage: sorted(p.name for p in (work / stage).iterdir()) for stage in before} == before
