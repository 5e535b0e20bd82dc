"""Work folders whose stage folders carry the names of 0.1.x (`features/`, `scores/`, `features-test/`)
are brought to today's names (`extract/`, `score/`, `extract-test/`) when opened, and reused as
they are: nothing is recomputed, the clean list is the same.

The old layout is made from a real run by renaming its folders and the stage names inside its
manifests and run records back by hand: that is all that differed."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from medsclean.cli import app
from medsclean.workdir.migrate import STAGE_RENAMES, migrate_work_folder
from medsclean.workdir.store import Store

from .helpers import make_mvtec

FAST = ["--resize", "64", "--crop", "64", "--num-workers", "0", "--banks", "10",
        "--distill-iters", "20", "--select-iters", "20", "--width", "16", "--depth", "2", "--heads", "2"]
STAGES = ("extract", "score", "distill", "select", "cut")
OLD_NAMES = {new: old for old, new in STAGE_RENAMES.items()}


def _select(images, work, out):
    res = CliRunner().invoke(app, ["select", str(images), "--work", str(work), "--out", str(out), "--json", *FAST])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), res.stderr


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny dataset and a work folder of today's layout with one `select` run (method meds)."""
    base = tmp_path_factory.mktemp("migrate")
    images = make_mvtec(base / "images", n_train=8, seed=0)
    summary, _ = _select(images, base / "work", base / "clean.txt")
    return images, base / "work", summary, (base / "clean.txt").read_bytes()


def _write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _to_old_names(work):
    """Turn a work folder of today's layout into one of 0.1.x's: the folders, each manifest's stage
    and parents, and the run records' artifact maps."""
    for manifest_path in work.glob("*/*/manifest.json"):
        manifest = json.loads(manifest_path.read_text())
        manifest["stage"] = OLD_NAMES.get(manifest["stage"], manifest["stage"])
        manifest["parents"] = {OLD_NAMES.get(s, s): k for s, k in manifest.get("parents", {}).items()}
        _write_json(manifest_path, manifest)
    for record_path in (work / "runs").glob("*.json"):
        record = json.loads(record_path.read_text())
        for run in record["runs"].values():
            run["artifacts"] = {OLD_NAMES.get(s, s): k for s, k in run["artifacts"].items()}
        _write_json(record_path, record)
    for new, old in OLD_NAMES.items():
        if (work / new).is_dir():
            (work / new).rename(work / old)


def _assert_todays_layout(work, summary):
    assert not any((work / old).exists() for old in STAGE_RENAMES)
    store = Store(work)
    for stage in STAGES:
        key = summary["stages"][stage]["path"].rsplit("/", 1)[1]
        art = store.load(stage, key)
        assert art is not None and art.path == work / stage / key and art.manifest["stage"] == stage
        assert not {"features", "scores"} & set(art.manifest.get("parents", {}))
    listing = json.loads(CliRunner().invoke(app, ["runs", "--work", str(work), "--json"]).stdout)
    (row,) = listing["runs"]
    assert row["run"] == summary["run"] and row["complete"]
    assert row["artifacts"] == {s: summary["stages"][s]["path"].rsplit("/", 1)[1] for s in STAGES}


def _assert_reused(images, work, tmp_path, made_summary, clean):
    again, log = _select(images, work, tmp_path / "again.txt")
    assert all(again["stages"][stage]["cached"] for stage in STAGES), again["stages"]
    assert not again["trained"] and "done in" not in log and "recomputing" not in log
    assert (tmp_path / "again.txt").read_bytes() == clean
    assert again["run"] == made_summary["run"]
    assert {s: again["stages"][s]["path"] for s in STAGES} == {
        s: str(work / s / made_summary["stages"][s]["path"].rsplit("/", 1)[1]) for s in STAGES}
    return again


def test_a_work_folder_with_the_old_stage_names_is_renamed_and_reused(made, tmp_path):
    images, original, summary, clean = made
    assert (original / "extract").is_dir() and (original / "score").is_dir()
    work = tmp_path / "work"
    shutil.copytree(original, work)
    _to_old_names(work)
    key = summary["stages"]["extract"]["path"].rsplit("/", 1)[1]
    (work / ".locks").mkdir(exist_ok=True)
    (work / ".locks" / f"features-{key}.lock").write_text("")
    assert (work / "features").is_dir() and not (work / "extract").exists()

    _assert_reused(images, work, tmp_path, summary, clean)
    _assert_todays_layout(work, summary)
    assert (work / "extract" / "LATEST").read_text() == f"{key}\n"
    assert not (work / ".locks" / f"features-{key}.lock").exists()  # stale: no process held it
    migrate_work_folder(work)  # a second time: nothing to do
    _assert_todays_layout(work, summary)


def test_an_interrupted_rename_is_finished_by_the_next_open(made, tmp_path):
    """Half done: `extract/` and `features/` both exist; the key in both keeps the new copy, the key
    only in `features/` moves over; `scores/` was not reached yet."""
    images, original, summary, clean = made
    work = tmp_path / "work"
    shutil.copytree(original, work)
    key = summary["stages"]["extract"]["path"].rsplit("/", 1)[1]
    new_copy = work / "extract" / key
    shutil.copytree(new_copy, tmp_path / "new-copy")
    _to_old_names(work)
    (work / "extract").mkdir()
    shutil.copytree(tmp_path / "new-copy", new_copy)  # already moved and rewritten
    (new_copy / "marker").write_text("the new copy")
    other = "feedfacefeedface"  # an artifact only the old folder holds
    shutil.copytree(work / "features" / key, work / "features" / other)
    manifest = json.loads((work / "features" / other / "manifest.json").read_text())
    _write_json(work / "features" / other / "manifest.json", {**manifest, "key": other})

    for _ in range(2):
        Store(work)
    assert (new_copy / "marker").read_text() == "the new copy"
    assert Store(work).load("extract", other).manifest["stage"] == "extract"
    assert (work / "extract" / "LATEST").read_text() == f"{key}\n"
    _assert_reused(images, work, tmp_path, summary, clean)
    _assert_todays_layout(work, summary)


def test_a_flat_work_folder_of_0_1_0_with_the_old_names_ends_up_in_todays_layout(made, tmp_path):
    """0.1.0: one artifact per stage folder (`features/manifest.json`) and the old names; both
    migrations run, in turn, on the first open."""
    images, original, summary, clean = made
    work = tmp_path / "work"
    shutil.copytree(original, work)
    _to_old_names(work)
    for stage in ("features", "scores", "distill", "select", "cut"):
        (key_folder,) = [p for p in (work / stage).iterdir() if p.is_dir()]
        (work / stage / "LATEST").unlink()
        key_folder.rename(tmp_path / "flat")
        (work / stage).rmdir()
        (tmp_path / "flat").rename(work / stage)
    assert (work / "features" / "manifest.json").is_file()

    _assert_reused(images, work, tmp_path, summary, clean)
    _assert_todays_layout(work, summary)
