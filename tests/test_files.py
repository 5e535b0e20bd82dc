"""Atomic writing (medsclean.workdir.store): modes under the umask, strict JSON, folders that appear whole."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from medsclean.workdir import artifacts, atomic
from medsclean.errors import DataError
from medsclean.pages.report import overlay_png
from medsclean.workdir.store import Store


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    atomic.process_umask.cache_clear()
    try:
        yield request.param
    finally:
        os.umask(old)
        atomic.process_umask.cache_clear()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_and_folders_honour_the_umask(tmp_path, umask):
    file_mode, folder_mode = 0o666 & ~umask, 0o777 & ~umask
    atomic.write_text_atomic(tmp_path / "a.txt", "text\n")
    atomic.write_json_atomic(tmp_path / "a.json", {"x": 1})
    atomic.write_bytes_atomic(tmp_path / "a.bin", b"\x00")
    artifacts.save_tensors(tmp_path / "a.safetensors", {"t": torch.zeros(2)})
    overlay_png(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)), None, tmp_path / "pics" / "a.png")
    for name in ("a.txt", "a.json", "a.bin", "a.safetensors", "pics/a.png"):
        assert _mode(tmp_path / name) == file_mode, name

    art = Store(tmp_path / "work").write_stage("score", "k", {"s.safetensors": {"x": torch.ones(3)}}, {},
                                               extra_files={"s.csv": "a\n"})
    assert _mode(art.path) == folder_mode
    for name in ("s.safetensors", "s.csv", "manifest.json"):
        assert _mode(art.path / name) == file_mode, name

    with atomic.atomic_directory(tmp_path / "tree") as tmp:
        (tmp / "f.txt").write_text("x")
    assert _mode(tmp_path / "tree") == folder_mode


def test_atomic_writers_leave_no_temporary_and_keep_the_old_file_on_error(tmp_path):
    path = tmp_path / "a.txt"
    atomic.write_text_atomic(path, "old\n")
    with pytest.raises(RuntimeError), atomic.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


NON_FINITE = {
    "nan": float("nan"),
    "nested": [1.0, np.float32("nan"), {"inf": float("inf"), "minus": -np.inf, "ok": np.float32(1.5)}],
    "pair": (np.float64("-inf"), 2),
    "text": "ünïcode",
}
STRICT = {"nan": None, "nested": [1.0, None, {"inf": None, "minus": None, "ok": 1.5}], "pair": [None, 2],
          "text": "ünïcode"}


def _strict_loads(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_to_json_writes_non_finite_numbers_as_null():
    text = atomic.to_json(NON_FINITE)
    assert _strict_loads(text) == STRICT
    assert "ünïcode" in text and text == json.dumps(STRICT, indent=2, ensure_ascii=False)
    assert math.isnan(NON_FINITE["nan"])  # the input is left as it was
    assert _strict_loads(atomic.to_json(float("nan"))) is None


def test_json_files_are_strict(tmp_path):
    atomic.write_json_atomic(tmp_path / "p.json", NON_FINITE)
    text = (tmp_path / "p.json").read_text(encoding="utf-8")
    assert text.endswith("}\n") and _strict_loads(text) == STRICT
    art = Store(tmp_path / "work").write_stage("score", "k", {}, {"threshold": float("nan")})
    assert _strict_loads((art.path / "manifest.json").read_text())["threshold"] is None


def test_atomic_directory_refuses_or_replaces_an_occupied_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(DataError, match="not an empty folder"), atomic.atomic_directory(out):
        pass
    with atomic.atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    with pytest.raises(OSError), atomic.atomic_directory(out, overwrite=True) as tmp:
        (tmp / "half.txt").write_text("x")
        raise OSError("disk full")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
