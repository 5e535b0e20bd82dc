"""Faults a crash, a concurrent run or a careless user can cause, each through the command line:
damaged work-folder files are reported and recomputed, concurrent runs share a work folder, bad
paths and values fail in one line, in-place edits are seen, lists go where their path leads, a
refused write is one line, and Ctrl-C names only what was kept."""

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medsclean.cli import app
from medsclean.workdir.store import Store

from .helpers import make_mvtec

FAST = ["--resize", "64", "--crop", "64", "--num-workers", "0", "--banks", "10", "--distill-iters", "20",
        "--select-iters", "20", "--width", "16", "--depth", "2", "--heads", "2"]
STAGES = ("extract", "score", "distill", "select", "cut")


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
    folder = _artifact(work, "score")
    (folder / "manifest.json").write_text("[]")
    res = CliRunner().invoke(app, ["select", str(data), "--work", str(work), *FAST, "--strict", "-q"])
    assert res.exit_code == 1
    assert res.output.strip() == f"error: score: the stored artifact {folder.name} is damaged (its manifest.json " \
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
    (["--seed", "-1"], 2, "--seed must be an integer from 0 to 2147483647, not -1"),
    (["--heads", "3"], 2, "--heads 3 must divide --width 64; try --heads 2"),  # the CPU preset's width
])
def test_bad_paths_and_values_fail_in_one_line_before_any_work(data, tmp_path, args, code, text):
    work = tmp_path / "work"
    cheap = ["--method", "memory", "--resize", "64", "--crop", "64", "--num-workers", "0"]
    res = CliRunner().invoke(app, ["select", str(data), "--work", str(work), *cheap, *args])
    assert res.exit_code == code, res.output
    assert text in res.output
    assert "Traceback" not in res.output
    assert not (work / "extract").exists()  # nothing was computed


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
    assert "extract: recomputing (1 changed since " in log, log
    assert "1 of 12 images extracted, 11 reused" in log


MEMORY = ["--method", "memory", "--resize", "64", "--crop", "64", "--num-workers", "0", "--banks", "10"]


def _invoke(data, work, *extra):
    return CliRunner().invoke(app, ["select", str(data), "--work", str(work), *MEMORY, "-q", *extra])


def _temp_files(*folders):
    return [p for folder in folders for p in Path(folder).rglob(".*.tmp-*")]


def test_a_list_through_a_symlink_replaces_the_target_and_keeps_the_link(data, tmp_path):
    work = tmp_path / "work"
    reference = _invoke(data, work, "--out", "-").stdout
    target = tmp_path / "lists" / "clean.txt"
    target.parent.mkdir()
    target.write_text("an older list\n")
    link = tmp_path / "clean-link.txt"
    link.symlink_to(target)
    res = _invoke(data, work, "--out", str(link))
    assert res.exit_code == 0, res.output
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == reference and reference
    assert not _temp_files(tmp_path / "lists", tmp_path)


def _memory_device(tmp_path, name, minor):
    """A node of the kernel's memory devices (major 1: 3 null, 7 full) made in `tmp_path` when this
    process may (root), so that a regression that renamed a file over it replaces a test file, not
    the system's /dev/<name>; a process that may not make one may not replace /dev/<name> either."""
    node = tmp_path / name
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except PermissionError:
        return Path("/dev") / name
    try:
        open(node, "rb").close()
    except PermissionError:
        pytest.skip("device nodes cannot be opened on this file system (nodev) and /dev is writable here")
    return node


def test_lists_are_written_into_devices_and_a_full_one_is_one_line(data, tmp_path):
    work = tmp_path / "work"
    null, full = _memory_device(tmp_path, "null", 3), _memory_device(tmp_path, "full", 7)
    res = _invoke(data, work, "--out", str(null), "--rejected", str(null))
    assert res.exit_code == 0, res.output
    res = _invoke(data, work, "--out", str(full))
    assert res.exit_code == 1
    assert res.output.strip() == f"error: {full}: No space left on device; free some space on its disk or write " \
                                 f"to another one"
    for node in (null, full):
        assert stat.S_ISCHR(os.stat(node).st_mode), f"{node} is no longer a device"
    assert not _temp_files(tmp_path)


def test_a_refused_list_write_is_one_line_and_keeps_the_old_list(data, tmp_path, monkeypatch):
    work = tmp_path / "work"
    assert _invoke(data, work).exit_code == 0
    out = tmp_path / "clean.txt"
    out.write_text("the old list\n")
    rename = os.replace

    def refuse(src, dst, *args, **kwargs):  # root may write anywhere: the OS's refusal, as a user meets it
        if Path(dst) == out:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src))
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refuse)
    res = _invoke(data, work, "--out", str(out))
    assert res.exit_code == 1
    assert res.output.strip() == f"error: {out}: Permission denied; choose a path you may write to, or change " \
                                 f"its permissions"
    assert out.read_text() == "the old list\n"
    assert not _temp_files(tmp_path)


def test_strict_fails_on_an_unreadable_image_with_a_warm_cache_as_with_a_fresh_one(tmp_path):
    root = make_mvtec(tmp_path / "data", n_train=6)
    (root / "brick" / "train" / "good" / "bad.png").write_bytes(b"not an image")
    fresh = _invoke(root, tmp_path / "fresh", "--strict")
    assert fresh.exit_code == 1
    assert fresh.output.strip().startswith(f"error: {root / 'brick' / 'train' / 'good' / 'bad.png'}: ")
    assert fresh.output.strip().endswith("or drop --strict") and len(fresh.output.strip().splitlines()) == 1
    warm = tmp_path / "warm"
    assert _invoke(root, warm).exit_code == 0  # without --strict: the image is skipped, features cached
    again = _invoke(root, warm, "--strict")
    assert again.exit_code == 1
    assert again.output == fresh.output


def test_heads_that_do_not_divide_a_cnn_decoder_fail_once_the_features_exist_before_any_score(data, tmp_path):
    from medsclean.config import ExtractConfig

    work = tmp_path / "work"
    res = CliRunner().invoke(app, ["select", str(data), "--work", str(work), "--preset", "paper", "--backbone",
                                   ExtractConfig.backbone, "--resize", "64", "--crop", "64", "--num-workers", "0",
                                   "--heads", "5", "-q"])
    assert res.exit_code == 2
    assert res.output.strip() == "error: --heads 5 must divide 128, the decoder's channels for a CNN encoder when " \
                                 "--width is unset; try --heads 4 or set --width"
    assert Store(work).latest_key("extract") is not None and not (work / "score").exists()


@pytest.mark.parametrize("left,expected", [
    ({}, "interrupted: nothing was kept; rerun the same command to start again"),
    ({"extract/LATEST": "0123\n", ".partial/distill-4567/": None},
     "interrupted: kept in {work}: extract; rerun the same command to resume (finished stages are reused)"),
    ({"extract/LATEST": "0123\n", ".partial/distill-4567/checkpoint.safetensors": "x"},
     "interrupted: kept in {work}: extract; checkpoints of distill in .partial; rerun the same command to resume "
     "(finished stages are reused, training continues from its last checkpoint)"),
    ({"image-features/89ab/cd/cdef.safetensors": "x"},
     "interrupted: kept in {work}: encoded images in image-features; rerun the same command to resume (extraction "
     "skips the images already encoded)"),
])
def test_ctrl_c_names_only_what_was_kept(tmp_path, monkeypatch, left, expected):
    from medsclean import pipeline

    work = tmp_path / "work"
    work.mkdir()
    for name, text in left.items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            path.mkdir()
        else:
            path.write_text(text)

    def interrupted(run, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "extract_stage", interrupted)
    res = CliRunner().invoke(app, ["extract", str(tmp_path), "--work", str(work), "--device", "cpu"])
    assert res.exit_code == 130
    assert res.output.strip() == expected.format(work=work)
