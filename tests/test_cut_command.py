"""`medsclean cut`: a new cut of a stored run that never trains, with the lists, the review page and
the run record that `select` would write; and `select`'s one warning before it retrains a folder
that has a run."""

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import medsclean
from medsclean.cli import app

from .helpers import make_mvtec

FAST = ["--resize", "64", "--crop", "64", "--num-workers", "0", "--banks", "10", "--width", "16", "--depth", "2",
        "--heads", "2", "--seed", "0"]
ITERS = ["--distill-iters", "20", "--select-iters", "20"]


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A folder with one `select` run (mixture cut, the cpu preset's default) in its work folder."""
    base = tmp_path_factory.mktemp("cut")
    data = make_mvtec(base / "images", n_train=8)
    res = _invoke("select", data, "--work", base / "work", *FAST, *ITERS, "-q")
    assert res.exit_code == 0, res.output
    return base, data


def _runs(work: Path) -> dict:
    res = _invoke("runs", "--work", work, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _snapshot(work: Path, stages=("extract", "score", "distill", "select")) -> dict:
    return {str(p.relative_to(work)): (p.stat().st_mtime_ns, p.stat().st_size)
            for stage in stages for p in sorted((work / stage).rglob("*")) if p.is_file()}


def test_cut_and_select_give_byte_identical_lists(made, tmp_path):
    base, data = made
    # select in a copy of the work folder: its own cut of the same stored scores, not the cut's artifact
    shutil.copytree(base / "work", tmp_path / "work-copy")
    sel = _invoke("select", data, "--work", tmp_path / "work-copy", *FAST, *ITERS, "--reject-fraction", "0.25",
                  "--out", tmp_path / "sel-clean.txt", "--rejected", tmp_path / "sel-rejected.txt", "-q")
    assert sel.exit_code == 0, sel.output
    cut = _invoke("cut", data, "--work", base / "work", "--reject-fraction", "0.25", "--out",
                  tmp_path / "cut-clean.txt", "--rejected", tmp_path / "cut-rejected.txt", "--json")
    assert cut.exit_code == 0, cut.output
    assert (tmp_path / "cut-clean.txt").read_bytes() == (tmp_path / "sel-clean.txt").read_bytes()
    assert (tmp_path / "cut-rejected.txt").read_bytes() == (tmp_path / "sel-rejected.txt").read_bytes()

    # the oracle: the two highest final scores of each class of 8 (the first run's scores.csv) are rejected
    summary = json.loads(cut.stdout)
    assert summary["schema"] == "medsclean.cut/1" and summary["cut"] == "top 0.25" and summary["recut"]
    first = next(r for r in _runs(base / "work")["runs"] if r["cut"] == "mixture")
    with open(base / "work" / "cut" / first["run"] / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    expected = set()
    for cls in ("brick", "gravel"):
        ranked = sorted((r for r in rows if r["class"] == cls), key=lambda r: -float(r["final_eta"]))
        expected |= {f"{data}/{r['path']}" for r in ranked[:2]}
    assert set((tmp_path / "cut-rejected.txt").read_text().splitlines()) == expected

    # the new cut is the folder's latest run, with its review page in its own folder
    latest = [r for r in _runs(base / "work")["runs"] if r["latest"]]
    assert [r["run"] for r in latest] == [summary["run"]] and latest[0]["cut"] == "top 0.25"
    assert Path(summary["review"]) == base / "work" / "cut" / summary["run"] / "review" / "report.html"
    assert Path(summary["review"]).is_file()


def test_cut_runs_no_training_stage_and_leaves_their_artifacts(made, monkeypatch, tmp_path):
    base, data = made
    import medsclean.pipeline
    import medsclean.stages.distill
    import medsclean.stages.features
    import medsclean.stages.scores
    import medsclean.stages.select

    def forbidden(*args, **kwargs):
        raise AssertionError("cut ran a stage it must not run")

    for module, name in ((medsclean.stages.distill, "run_distill"), (medsclean.stages.select, "run_select"),
                         (medsclean.stages.features, "run_extract"), (medsclean.pipeline, "run_extract"),
                         (medsclean.stages.scores, "run_score"), (medsclean.stages.distill, "seconds_per_step")):
        monkeypatch.setattr(module, name, forbidden)
    before = _snapshot(base / "work")
    selection = medsclean.cut(str(data), work=base / "work", progress=False, threshold=0.5,
                              out=tmp_path / "clean.txt")
    assert _snapshot(base / "work") == before and before
    assert selection.summary["cut"] == "eta < 0.5" and not selection.summary["trained"]
    assert all(selection.summary["stages"][s]["cached"] for s in ("extract", "score", "distill", "select"))
    # the threshold is applied to the stored final scores: kept iff final_eta < 0.5
    assert {r["path"] for r in selection.rows if r["final_eta"] < 0.5} == set(selection.kept)
    assert (tmp_path / "clean.txt").read_text() == "".join(f"{p}\n" for p in selection.kept)


def test_cut_takes_a_run_by_key_prefix(made, tmp_path):
    base, data = made
    first = next(r for r in _runs(base / "work")["runs"] if r["cut"] == "mixture")
    res = _invoke("cut", data, "--work", base / "work", "--run", first["run"][:6], "--cut", "otsu", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["cut"] == "otsu" and summary["select_key"] == first["artifacts"]["select"]
    res = _invoke("cut", data, "--work", base / "work", "--run", "ffffffffff")
    assert res.exit_code == 2 and res.stderr.startswith("error: --run ffffffffff is not in")


def test_cut_of_a_folder_without_a_run_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    make_mvtec(tmp_path / "images", n_train=2, categories=("brick",))
    monkeypatch.chdir(tmp_path)
    res = _invoke("cut", "./images", "--reject-fraction", "0.1")
    assert res.exit_code == 1
    assert res.stderr == "error: ./images has no run in medsclean-work; run `medsclean select ./images` first\n"
    assert not (tmp_path / "medsclean-work").exists()
    (tmp_path / "other-work" / "runs").mkdir(parents=True)  # a work folder, but no run of this folder
    res = _invoke("cut", "./images", "--work", "other-work")
    assert res.exit_code == 1 and res.stderr.startswith("error: ./images has no run in other-work;")


def test_cut_help_lists_only_the_options_a_cut_uses():
    import typer

    res = _invoke("cut", "--help")
    assert res.exit_code == 0, res.output
    flags = {f for p in typer.main.get_command(app).commands["cut"].params if p.param_type_name == "option"
             for f in p.opts}
    wanted = {"--work", "--device", "--json", "--no-wait", "--quiet", "-q", "--run", "--cut", "--final-score",
              "--cut-k", "--reject-fraction", "--threshold", "--keep", "--reject", "--out", "--rejected",
              "--report", "--export"}
    assert wanted <= flags
    assert not flags & {"--preset", "--seed", "--distill-iters", "--select-iters", "--method", "--backbone",
                        "--banks", "--budget", "--mad-k", "--force", "--executor", "--layout"}
    assert flags - wanted <= {"--link", "--copy", "--help"}  # the export's own options
    for flag in wanted:
        assert f" {flag} " in res.stdout, flag


def test_select_warns_once_before_it_retrains_and_not_when_only_the_cut_changes(made, tmp_path):
    base, data = made
    work = tmp_path / "work"
    shutil.copytree(base / "work", work)
    res = _invoke("select", data, "--work", work, *FAST, *ITERS, "--reject-fraction", "0.25")
    assert res.exit_code == 0, res.output
    assert "this trains" not in res.stderr  # only the cut changed: nothing trains

    res = _invoke("select", data, "--work", work, *FAST, "--distill-iters", "25", "--select-iters", "30",
                  "--reject-fraction", "0.25")
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    warned = [i for i, line in enumerate(lines) if "this trains" in line]
    assert len(warned) == 1
    assert lines[warned[0]] == (f"warning: this trains a new run: distill_iters 20 → 25, select_iters 20 → 30; to "
                                f"re-cut the latest run instead: medsclean cut {data} --work {work} "
                                f"--reject-fraction 0.25")
    first_stage = next(i for i, line in enumerate(lines) if line.startswith(("extract:", "distill:")))
    assert warned[0] < first_stage  # before any stage ran
    assert json.loads(_invoke("runs", "--work", work, "--json").stdout)  # the new run was made

    # back to the first run's options: its artifacts are there, nothing trains, no line
    res = _invoke("select", data, "--work", work, *FAST, *ITERS)
    assert res.exit_code == 0, res.output
    assert "this trains" not in res.stderr and "distill: cached" in res.stderr
