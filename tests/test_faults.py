"""Faults a crash, a concurrent run or a careless user can cause, each through the command line:
damaged work-folder files are reported and recomputed, concurrent runs share a work folder, bad
paths and values fail in one line, and in-place edits are seen."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medsclean.cli import app
from medsclean.store import Store

from .helpers import make_mvtec

FAST = ["--resize", "64", "--crop", "64", "--num-workers", "0", "--banks", "10", "--distill-iters", "20",
        "--select-iters", "20", "--width", "16", "--depth", "2", "--heads", "2"]
STAGES = ("features", "scores", "distill", "select", "cut")


def _select(root, work, *extra):
    res = CliRunner().invoke(app, ["select", str(root), "--work", str(work), *FAST, "--out", "-", *extra])
    assert res.exit_code == 0, res.output
    return res.stdout, res.stderr


def _artifact(work, stage):
    store = Store(work)
    return store.stage_path(stage, store.latest_key(stage))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("faults") / "data", n_train=8)


@pytest.mark.parametrize("damage", ["binary", "list", "truncated-tensor", "missing-file"])
def test_damaged_artifacts_are_reported_and_recomputed(data, tmp_path, damage):
    work = tmp_path / "work"
    reference, _ = _select(data, work)
    for stage in STAGES:
        folder = _artifact(work, stage)
        if damage == "binary":
            (folder / "manifest.json").write_bytes(bytes(range(256)) * 4)
        elif damage == "list":
            (folder / "manifest.json").write_text("[1, 2, 3]")
        elif damage == "truncated-tensor":
            tensor = sorted(folder.glob("*.safetensors"))[0]
            tensor.write_bytes(tensor.read_bytes()[:-7])
        else:
            listed = json.loads((folder / "manifest.json").read_text())
            victims = listed.get("files") or sorted(listed["tensors"])
            (folder / victims[0]).unlink()
        again, log = _select(data, work)
        assert again == reference, stage  # the same clean list after the repair
        assert f"{stage}: the stored artifact {folder.name} is damaged" in log, (stage, log)
        assert "Traceback" not in log


def test_strict_refuses_a_damaged_artifact_and_names_the_fix(data, tmp_path):
    work = tmp_path / "work"
    _select(data, work)
    folder = _artifact(work, "scores")
    (folder / "manifest.json").write_text("[]")
    res = CliRunner().invoke(app, ["select", str(data), "--work", str(work), *FAST, "--strict", "-q"])
    assert res.exit_code == 1
    assert res.output.strip() == f"error: scores: the stored artifact {folder.name} is damaged (its manifest.json " \
                                 f"is missing or not a medsclean manifest); remove it with `rm -r {folder}` (or " \
                                 f"rerun without --strict to recompute it)"


def test_garbage_pointers_and_run_records_are_ignored(data, tmp_path):
    work = tmp_path / "work"
    reference, _ = _select(data, work)
    for stage in STAGES:
        (work / stage / "LATEST").write_bytes(b"\xff\xfe\x00garbage")
    for record in (work / "runs").glob("*.json"):
        record.write_bytes(b"\x00\x01[not json")
    again, log = _select(data, work)
    assert again == reference and "Traceback" not in log
    listing = CliRunner().invoke(app, ["runs", "--work", str(work), "--json"])
    assert listing.exit_code == 0 and len(json.loads(listing.stdout)["runs"]) == 1


def test_two_concurrent_selects_on_one_work_folder_both_succeed(data, tmp_path):
    work = tmp_path / "work"
    command = [sys.executable, "-m", "medsclean", "select", str(data), "--work", str(work), *FAST, "--out", "-"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in outputs]
    assert outputs[0][0] == outputs[1][0] and outputs[0][0]
    assert all("Traceback" not in err for _, err in outputs)
    assert not list((work / ".partial").glob("*/*")) if (work / ".partial").exists() else True


def test_no_wait_fails_at_once_while_another_run_holds_the_stage(data, tmp_path):
    work = tmp_path / "work"
    _select(data, work)
    holder = Store(work)
    key = holder.latest_key("select")
    holder.cached("select", key, force=True)  # takes the lock, as a run recomputing that stage would
    res = CliRunner().invoke(app, ["select", str(data), "--work", str(work), *FAST, "--no-wait", "--force", "-q"])
    holder.release("select", key)
    assert res.exit_code == 1
    assert res.output.strip() == f"error: select: another run is computing the same select in {work} now; wait " \
                                 f"for it or rerun without --no-wait"


@pytest.mark.parametrize("args,code,text", [
    (["--weights", "/nonexistent/w.safetensors"], 2, "--weights"),
    (["--weights", "/tmp"], 2, "--weights"),
    (["--out", "/tmp"], 2, "--out /tmp is a folder"),
    (["--out", "/nonexistent-dir/clean.txt"], 2, "does not exist"),
    (["--rejected", "/etc/hostname/rejected.txt"], 2, "does not exist"),
    (["--work", "/etc/hostname"], 2, "--work /etc/hostname is a file"),
    (["--report", "/etc/hostname"], 2, "--report /etc/hostname is a file"),
    (["--num-workers", "-1"], 2, "--num-workers must be 0 or more"),
    (["--select-iters", "0"], 2, "--select-iters must be at least 1"),
    (["--distill-iters", "0"], 2, "--distill-iters must be at least 1"),
    (["--depth", "0"], 2, "--depth must be at least 1"),
    (["--width", "0"], 2, "--width must be at least 1"),
    (["--batch-size", "0"], 2, "--batch-size must be at least 1"),
    (["--banks", "0"], 2, "--banks must be at least 1"),
    (["--masks", "/nonexistent"], 2, "--masks"),
])
def test_bad_paths_and_values_fail_in_one_line_before_any_work(data, tmp_path, args, code, text):
    work = tmp_path / "work"
    cheap = ["--method", "memory", "--resize", "64", "--crop", "64", "--num-workers", "0"]
    res = CliRunner().invoke(app, ["select", str(data), "--work", str(work), *cheap, *args])
    assert res.exit_code == code, res.output
    assert text in res.output
    assert "Traceback" not in res.output
    assert not (work / "features").exists()  # nothing was computed


def test_missing_image_folder_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["select", str(tmp_path / "nope"), "--work", str(tmp_path / "w")])
    assert res.exit_code == 1 and res.output.strip() == f"error: {tmp_path / 'nope'}: no such folder; pass the " \
                                                       f"folder that holds your images"


def test_an_in_place_edit_with_the_same_size_and_mtime_is_seen(tmp_path):
    root = make_mvtec(tmp_path / "data", n_train=6)
    work = tmp_path / "work"
    victim = root / "brick" / "train" / "good" / "002.png"
    pixels = np.asarray(Image.open(victim).convert("RGB")).copy()
    Image.fromarray(pixels).save(victim, compress_level=0)  # uncompressed: an edit keeps the size
    before, _ = _select(root, work)
    stat = victim.stat()
    pixels[10:30, 10:30] = (255, 0, 255)
    Image.fromarray(pixels).save(victim, compress_level=0)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert victim.stat().st_size == stat.st_size and victim.stat().st_mtime_ns == stat.st_mtime_ns
    _, log = _select(root, work)
    assert "features: recomputing (1 changed since " in log, log
    assert "1 of 12 images extracted, 11 reused" in log
