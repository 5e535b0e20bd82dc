import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medsclean import extract as extract_mod
from medsclean.cli import app
from medsclean.config import ExtractConfig
from medsclean.data import discover
from medsclean.extract import run_extract
from medsclean.store import Store
from medsclean.ui import SilentReporter

from .helpers import crops, save_png, texture

runner = CliRunner()
SMALL = ["--resize", "64", "--crop", "64", "--num-workers", "0", "--batch-size", "4"]


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "imgs"
    for i, img in enumerate(crops(texture("brick"), 10, 64, rng)):
        save_png(root / f"img {i:02d}.png", img)
    (root / "broken.png").write_bytes(b"not an image at all")
    return root


def test_extract_cli_end_to_end_with_json_and_cache(folder, tmp_path):
    work = tmp_path / "work"
    res = runner.invoke(app, ["extract", str(folder), "--work", str(work), "--json", *SMALL])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["images"] == 10 and payload["cached"] is False
    assert [s["path"] for s in payload["skipped"]] == ["broken.png"]
    feats = Store(work).load("features").sharded_tensors()
    assert feats["memory"].dtype == torch.float16 and feats["memory"].shape[:2] == (10, 64)  # 8×8 grid at 64 px
    assert torch.allclose(feats["memory"].float().norm(dim=-1), torch.ones(10, 64), atol=2e-3)
    assert [feats[f"group{g}"].shape[-1] for g in (0, 1)] == [40, 112]
    again = runner.invoke(app, ["extract", str(folder), "--work", str(work), "--json", *SMALL])
    assert json.loads(again.stdout)["cached"] is True


def test_extract_strict_fails_on_corrupt_image(folder, tmp_path):
    res = runner.invoke(app, ["extract", str(folder), "--work", str(tmp_path / "w"), "--strict", *SMALL])
    assert res.exit_code == 1
    assert "broken.png" in res.output and "cannot decode" in res.output


def test_usage_errors_exit_2(folder, tmp_path):
    res = runner.invoke(app, ["extract", str(folder), "--work", str(folder / "w"), *SMALL])
    assert res.exit_code == 2 and "inside the image folder" in res.output
    res = runner.invoke(app, ["extract", str(folder), "--work", str(tmp_path / "w"), "--backbone", "resnet_nope"])
    assert res.exit_code == 2 and "unknown backbone" in res.output
    res = runner.invoke(app, ["extract", str(tmp_path / "missing"), "--work", str(tmp_path / "w")])
    assert res.exit_code == 1 and "no such folder" in res.output


def test_changed_image_makes_features_stale(folder, tmp_path):
    work = tmp_path / "work"
    cfg = ExtractConfig(resize=64, crop=64, num_workers=0, batch_size=4)
    first = run_extract(discover(folder), Store(work), cfg, reporter=SilentReporter())
    target = folder / "img 03.png"
    save_png(target, np.zeros((64, 64, 3), np.uint8))
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = run_extract(discover(folder), Store(work), cfg, reporter=SilentReporter())
    assert not second.cached and second.artifact.key != first.artifact.key
    third = run_extract(discover(folder), Store(work), cfg, reporter=SilentReporter())
    assert third.cached


def test_interrupted_extract_resumes_and_matches_uninterrupted(folder, tmp_path, monkeypatch):
    cfg = ExtractConfig(resize=64, crop=64, num_workers=0, batch_size=2, shard_size=4)
    reference = run_extract(discover(folder), Store(tmp_path / "ref"), cfg,
                            reporter=SilentReporter()).artifact.sharded_tensors()
    real_write = extract_mod._write_shard
    written = []

    def interrupt_after_first(path, *args, **kwargs):
        if written:
            raise KeyboardInterrupt
        real_write(path, *args, **kwargs)
        written.append(path)

    monkeypatch.setattr(extract_mod, "_write_shard", interrupt_after_first)
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        run_extract(discover(folder), Store(work), cfg, reporter=SilentReporter())
    assert Store(work).load("features") is None  # nothing that looks valid
    monkeypatch.setattr(extract_mod, "_write_shard", real_write)
    rep = SilentReporter()
    resumed = run_extract(discover(folder), Store(work), cfg, reporter=rep)
    assert any("resuming features: 1 of 3 shards" in m for m in rep.messages)
    feats = resumed.artifact.sharded_tensors()
    for name, tensor in reference.items():
        assert torch.equal(feats[name], tensor), name


def test_help_does_not_import_torch():
    """`--help` stays fast because torch is imported only inside commands (timing: benchmarks/README)."""
    code = ("import sys; from typer.testing import CliRunner; import medsclean.cli as c; "
            "r = CliRunner().invoke(c.app, ['extract', '--help']); assert r.exit_code == 0, r.output; "
            "assert '--num-workers' in r.output; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
