"""Runs that coexist in one work folder, re-cutting without retraining, lists on stdout, and `eval`
of a recorded run (real Lite0 features of small generated datasets)."""

import csv
import json
import math
import os
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from medsclean.cli import app
from medsclean.demo.noisy import make_noisy
from medsclean.workdir.store import Store
from medsclean.demo.synth import generate_dataset

from .helpers import make_mvtec

FAST = ["--resize", "64", "--crop", "64", "--num-workers", "0", "--banks", "10"]
TRAIN = ["--distill-iters", "20", "--select-iters", "20", "--width", "16", "--depth", "2", "--heads", "2"]


def _select(*args):
    res = CliRunner().invoke(app, ["select", *args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), res


def _rows(cut_dir):
    with open(f"{cut_dir}/scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def _artifacts(work):
    return {stage: sorted(Store(work).keys(stage)) for stage in ("extract", "score", "distill", "select", "cut")}


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    make_mvtec(base / "a", n_train=8, seed=0)
    make_mvtec(base / "b", n_train=8, seed=1)
    return base


def test_runs_of_two_datasets_coexist_and_remove_frees_only_unshared_artifacts(two_sets):
    work = two_sets / "work-coexist"
    first, _ = _select(str(two_sets / "a"), "--work", str(work), "--method", "memory", *FAST)
    second, _ = _select(str(two_sets / "b"), "--work", str(work), "--method", "memory", *FAST)
    third, _ = _select(str(two_sets / "a"), "--work", str(work), "--method", "memory", "--cut", "otsu", *FAST)
    assert len({first["run"], second["run"], third["run"]}) == 3
    stored = _artifacts(work)
    assert len(stored["extract"]) == 2 and len(stored["cut"]) == 3 and len(stored["select"]) == 2
    assert (Store(work).load("cut", first["run"])) is not None  # the later runs replaced nothing

    listing = json.loads(CliRunner().invoke(app, ["runs", "--work", str(work), "--json"]).stdout)
    assert listing["schema"] == "medsclean.runs/1"
    rows = {r["run"]: r for r in listing["runs"]}
    assert set(rows) == {first["run"], second["run"], third["run"]}
    assert rows[third["run"]]["latest"] and not rows[first["run"]]["latest"] and rows[second["run"]]["latest"]
    assert rows[third["run"]]["cut"] == "otsu" and all(r["bytes"] > 0 for r in rows.values())
    pointers = sorted(p.name for p in (work / "runs").glob("*.json"))
    assert len(pointers) == 2 and pointers[0].startswith("a-") and pointers[1].startswith("b-")

    res = CliRunner().invoke(app, ["runs", "--work", str(work), "--remove", second["run"][:8], "--yes"])
    assert res.exit_code == 0, res.output
    after = _artifacts(work)
    assert after["extract"] == [k for k in stored["extract"] if k != second["stages"]["extract"]["path"][-16:]]
    assert len(after["cut"]) == 2 and len(after["select"]) == 1  # a's runs share their select and features
    res = CliRunner().invoke(app, ["runs", "--work", str(work), "--remove", first["run"]])
    assert _artifacts(work)["select"] == after["select"]  # still used by the third run
    assert _artifacts(work)["cut"] == [third["run"]]
    res = CliRunner().invoke(app, ["runs", "--work", str(work), "--remove", "ffffffff"])
    assert res.exit_code == 2 and "--run" not in res.output and "ffffffff" in res.output


def _runs(work, *args):
    return CliRunner().invoke(app, ["runs", "--work", str(work), *args])


def test_runs_has_a_header_and_each_runs_kept_and_rejected_counts(two_sets):
    work = two_sets / "work-table"
    first, _ = _select(str(two_sets / "a"), "--work", str(work), "--method", "memory", *FAST)
    second, _ = _select(str(two_sets / "a"), "--work", str(work), "--method", "memory", *FAST,
                        "--reject-fraction", "0.25")
    counts = {}  # from the lists each run wrote: the oracle of the counts
    for made in (first, second):
        with open(f"{made['cut_dir']}/clean.txt") as kept, open(f"{made['cut_dir']}/rejected.txt") as rejected:
            counts[made["run"]] = (len(kept.read().splitlines()), len(rejected.read().splitlines()))
    assert counts[second["run"]] == (12, 4)  # 2 of 8 rejected in each of the two classes

    listing = json.loads(_runs(work, "--json").stdout)
    assert {r["run"]: (r["kept"], r["rejected"]) for r in listing["runs"]} == counts

    lines = _runs(work).stdout.splitlines()
    header = lines[0]
    assert header.split() == ["run", "latest", "created", "method", "cut", "kept", "rejected", "size", "images"]
    assert len(lines) == 3 and {line[:16] for line in lines[1:]} == set(counts)
    for line in lines[1:]:
        kept, rejected = counts[line[:16]]
        assert (line[header.index("latest")] == "*") == (line[:16] == second["run"])
        found = re.search(rf" (?P<kept>{kept}) +(?P<rejected>{rejected}) +[0-9.]+ MB  (?P<images>.+)$", line)
        assert found and found["images"] == str((two_sets / "a").resolve()), line
        for column in ("kept", "rejected"):  # right-aligned under its heading
            assert found.end(column) == header.index(column) + len(column), (line, header)
    empty = two_sets / "work-none"
    assert _runs(empty).stdout.strip() == f"no runs in {empty.resolve()}"


def test_runs_remove_takes_the_full_key_or_a_prefix_with_yes(two_sets):
    work = two_sets / "work-remove"
    made = [_select(str(two_sets / "a"), "--work", str(work), "--method", "memory", *FAST, "--cut", cut)[0]
            for cut in ("mixture", "otsu", "mad")]
    keys = [m["run"] for m in made]
    before = _artifacts(work)

    refused = _runs(work, "--remove", keys[0][:6])
    assert refused.exit_code == 2 and refused.stdout == ""
    assert refused.stderr.strip() == (f"error: --remove {keys[0][:6]} is only a prefix of {keys[0]}; pass the full "
                                      f"key, or --yes to remove by prefix")
    assert _artifacts(work) == before  # nothing removed
    assert len(json.loads(_runs(work, "--json").stdout)["runs"]) == 3

    res = _runs(work, "--remove", keys[1])  # the full key: no --yes needed
    assert res.exit_code == 0 and res.stdout.split() == [keys[1]], res.output
    res = _runs(work, "--remove", keys[2][:6], "--yes")
    assert res.exit_code == 0 and res.stdout.split() == [keys[2]], res.output
    assert [r["run"] for r in json.loads(_runs(work, "--json").stdout)["runs"]] == [keys[0]]
    assert _artifacts(work)["cut"] == [keys[0]]


def test_a_new_cut_reuses_the_trained_scores(two_sets):
    work = two_sets / "work-recut"
    root = str(two_sets / "a")
    trained, _ = _select(root, "--work", str(work), *FAST, *TRAIN)
    assert trained["trained"] and not trained["recut"]
    rows = _rows(trained["cut_dir"])

    recut, res = _select(root, "--work", str(work), *FAST, *TRAIN, "--reject-fraction", "0.25")
    assert not recut["trained"] and recut["recut"] and recut["select_key"] == trained["select_key"]
    assert "re-cut" in res.stderr and "no retraining" in res.stderr
    assert recut["stages"]["select"]["cached"] and not recut["stages"]["cut"]["cached"]
    got = _rows(recut["cut_dir"])
    assert [r["final_eta"] for r in got] == [r["final_eta"] for r in rows]  # the same stored scores
    for cls in ("brick", "gravel"):
        members = [r for r in got if r["class"] == cls]
        eta = np.array([float(r["final_eta"]) for r in members])
        rejected = {r["path"] for r in members if r["kept"] == "0"}
        n_reject = math.floor(0.25 * len(members) + 0.5)  # 8 images: 2
        assert len(rejected) == n_reject
        assert rejected == {members[i]["path"] for i in np.argsort(-eta)[:n_reject]}

    etas = sorted(float(r["final_eta"]) for r in rows)
    threshold = (etas[5] + etas[6]) / 2
    fixed, _ = _select(root, "--work", str(work), *FAST, *TRAIN, "--threshold", f"{threshold:.9f}")
    assert not fixed["trained"] and fixed["cut"].startswith("eta < ")
    assert {r["path"] for r in _rows(fixed["cut_dir"]) if r["kept"] == "1"} == \
        {r["path"] for r in rows if float(r["final_eta"]) < float(f"{threshold:.9f}")}

    retrained, _ = _select(root, "--work", str(work), *FAST, *TRAIN, "--mad-k", "2")
    assert retrained["trained"] and retrained["select_key"] != trained["select_key"]


def test_clean_list_on_stdout_and_rejected_list_share_one_path_convention(two_sets, tmp_path):
    work = two_sets / "work-stdout"
    root = two_sets / "a"
    rejected = tmp_path / "rejected.txt"
    res = CliRunner().invoke(app, ["select", str(root), "--work", str(work), "--method", "memory", *FAST,
                                   "--out", "-", "--rejected", str(rejected)])
    assert res.exit_code == 0, res.output
    kept = res.stdout.splitlines()
    assert kept and all(line.startswith(f"{root}/") and line.endswith(".png") for line in kept)
    assert "medsclean select" in res.stderr  # the table went to stderr
    dropped = rejected.read_text().splitlines()
    assert dropped and not set(kept) & set(dropped)
    every = sorted(str(p) for p in root.glob("*/train/good/*.png"))
    assert sorted(kept + dropped) == every
    res = CliRunner().invoke(app, ["select", str(root), "--work", str(work), "--out", "-", "--json"])
    assert res.exit_code == 2


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    base = tmp_path_factory.mktemp("evalrun")
    generate_dataset(base / "data", categories=("brick",), n_train=10, n_test_good=3, n_test_defect=3, size=64,
                     seed=0)
    make_noisy(base / "data", base / "noisy", ratio=0.3, seed=0)
    return base


def test_eval_measures_the_latest_run_with_its_own_options_and_recomputes_nothing(noisy):
    work = noisy / "work"
    root = str(noisy / "noisy")
    made, _ = _select(root, "--work", str(work), *FAST, *TRAIN, "--knn", "2", "--class-from", "parent")
    before = _artifacts(work)
    res = CliRunner().invoke(app, ["eval", root, "--work", str(work), "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["run"]["key"] == made["run"] and payload["run"]["backbone"] == "tf_efficientnet_lite0"
    assert payload["run"]["seed"] == 0 and "torch" in payload["run"]["versions"]
    assert _artifacts(work) == before  # nothing recomputed, nothing overwritten
    saved = json.loads((work / "eval" / "metrics.json").read_text())
    assert saved["run"]["key"] == made["run"] and saved["run"]["artifacts"]["select"] == made["select_key"]

    by_key = CliRunner().invoke(app, ["eval", root, "--work", str(work), "--run", made["run"][:6], "--json"])
    assert by_key.exit_code == 0 and json.loads(by_key.stdout)["run"]["key"] == made["run"]
    mixed = CliRunner().invoke(app, ["eval", root, "--work", str(work), "--run", made["run"], "--knn", "3"])
    assert mixed.exit_code == 2 and "--knn" in mixed.output


def test_a_flat_work_folder_of_0_1_0_is_adopted_under_todays_stage_name(tmp_path):
    legacy = tmp_path / "work" / "scores"
    legacy.mkdir(parents=True)
    (legacy / "manifest.json").write_text(json.dumps({"format": "medsclean-artifact/1", "stage": "scores",
                                                      "key": "0123456789abcdef", "files": ["scores.csv"]}))
    (legacy / "scores.csv").write_text("path\n")
    store = Store(tmp_path / "work")
    art = store.load("score", "0123456789abcdef")
    assert art is not None and (art.path / "scores.csv").read_text() == "path\n"
    assert art.path == tmp_path / "work" / "score" / "0123456789abcdef" and art.manifest["stage"] == "score"
    assert store.load("score").key == "0123456789abcdef" and not legacy.exists()


def test_select_writes_a_review_and_exports_a_trainer_ready_tree(noisy, tmp_path):
    work = noisy / "work-review"
    root = noisy / "noisy"
    summary, res = _select(str(root), "--work", str(work), "--method", "memory", *FAST,
                           "--export", str(tmp_path / "clean-set"))
    review = summary["review"]
    assert review.startswith(summary["cut_dir"]) and f"review: {review}" in res.stderr
    html = open(review, encoding="utf-8").read()
    rows = _rows(summary["cut_dir"])
    rejected = [r["path"] for r in rows if r["kept"] == "0"]
    assert rejected and all(path in html for path in rejected)
    assert html.count("<script") == 1 and "<script src" not in html and "https://" not in html   # its own script only
    assert "data:image/" in html
    assert "Metrics" in html  # the contaminants are known here (make-noisy), so the page measures the cut

    tree = tmp_path / "clean-set"
    good = sorted(tree.glob("brick/train/good/*"))
    dropped = sorted(tree.glob("_rejected/brick/*"))
    assert len(good) == summary["kept"] and len(dropped) == summary["rejected"]
    assert sorted(p.name for p in tree.iterdir()) == ["_rejected", "brick", "clean.txt", "medsclean-export.json",
                                                      "rejected.txt"]
    assert [p.name for p in (tree / "brick").iterdir()] == ["train"]  # nothing beside train/good in a class
    assert not any(p.is_symlink() for p in good + dropped)  # hard links (the tree is on the images' disk)
    inodes = {p.stat().st_ino for p in good}
    assert inodes == {(root / r["path"]).stat().st_ino for r in rows if r["kept"] == "1"}
    assert {p.stat().st_ino for p in dropped} == {(root / r["path"]).stat().st_ino for r in rows if r["kept"] == "0"}
    lists = (tree / "clean.txt").read_text().splitlines()  # relative to the tree
    assert sorted(lists) == sorted(p.relative_to(tree).as_posix() for p in good)
    assert sorted((tree / "rejected.txt").read_text().splitlines()) == sorted(
        p.relative_to(tree).as_posix() for p in dropped)
    manifest = json.loads((tree / "medsclean-export.json").read_text())
    assert manifest["run"] == summary["run"] and manifest["classes"]["brick"]["rejected"] == summary["rejected"]
    assert manifest["links"] == {"hardlink": len(rows)}
    assert f"export: {summary['kept']} kept and {summary['rejected']} rejected images in {tree} (hard links)" in res.stderr

    again, res = _select(str(root), "--work", str(work), "--method", "memory", *FAST, "--copy",
                         "--export", str(tmp_path / "copies"), "--report", str(tmp_path / "review"))
    copies = sorted((tmp_path / "copies").glob("brick/train/good/*"))
    assert copies and not any(p.is_symlink() or p.stat().st_ino in inodes for p in copies)
    assert "--copy is deprecated" in res.stderr and "(copies)" in res.stderr
    _, res = _select(str(root), "--work", str(work), "--method", "memory", *FAST, "--link", "symlink",
                     "--export", str(tmp_path / "links"))
    links = sorted((tmp_path / "links").glob("brick/train/good/*"))
    assert links and all(p.is_symlink() and os.path.isabs(os.readlink(p)) for p in links)
    both = CliRunner().invoke(app, ["select", str(root), "--work", str(work), "--method", "memory", *FAST, "--copy",
                                    "--link", "hardlink", "--export", str(tmp_path / "both")])
    assert both.exit_code == 2 and "--copy" in both.output and "--link" in both.output
    assert not (tmp_path / "both").exists()
    assert (tmp_path / "review" / "report.html").is_file() and again["review"] == str(tmp_path / "review" / "report.html")
    busy = CliRunner().invoke(app, ["select", str(root), "--work", str(work), "--method", "memory", *FAST,
                                    "--export", str(tmp_path / "copies")])
    assert busy.exit_code == 2 and "--export" in busy.output and "already exists" in busy.output
    inside = CliRunner().invoke(app, ["select", str(root), "--work", str(work), "--method", "memory", *FAST,
                                      "--export", str(root / "exported")])
    assert inside.exit_code == 2 and "--export" in inside.output and not (root / "exported").exists()
