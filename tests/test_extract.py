import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medsclean.stages import features as extract_mod
from medsclean.cli import app
from medsclean.config import ExtractConfig
from medsclean.workdir.data import discover
from medsclean.stages.features import run_extract
from medsclean.workdir.artifacts import file_sha256, load_tensors
from medsclean.workdir.store import Store
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
    feats = Store(work).load("extract").sharded_tensors()
    assert feats["memory"].dtype == torch.float16 and feats["memory"].shape[:2] == (10, 64)  # 8×8 grid at 64 px
    assert torch.allclose(feats["memory"].float().norm(dim=-1), torch.ones(10, 64), atol=2e-3)
    assert [feats[f"group{g}"].shape[-1] for g in (0, 1)] == [40, 112]
    again = runner.invoke(app, ["extract", str(folder), "--work", str(work), "--json", *SMALL])
    assert json.loads(again.stdout)["cached"] is True


def test_deeper_stages_are_other_features_and_the_default_pair_keeps_the_old_key(folder, tmp_path):
    work = tmp_path / "work"
    base = ["extract", str(folder), "--work", str(work), "--json", *SMALL]
    assert json.loads(runner.invoke(app, base).stdout)["cached"] is False
    deeper = runner.invoke(app, [*base, "--stages", "16,32"])
    assert deeper.exit_code == 0, deeper.output
    assert json.loads(deeper.stdout)["cached"] is False
    assert len(Store(work).keys("extract")) == 2  # both runs' features coexist
    feats = Store(work).load("extract").sharded_tensors()  # the latest: the deeper stages
    assert feats["memory"].shape[:2] == (10, 16)  # 4×4 grid at 64 px: stride 16
    assert [feats[f"group{g}"].shape[-1] for g in (0, 1)] == [112, 320]
    assert ExtractConfig(stages=(8, 16)).key_fields() == ExtractConfig().key_fields()
    assert json.loads(runner.invoke(app, [*base, "--stages", "8,16"]).stdout)["cached"] is True


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


class _CountingEncoder:
    """Wraps an encoder: counts the images it encodes and raises KeyboardInterrupt once
    `log["fail_after"]` batches are done."""

    def __init__(self, encoder, log):
        self._encoder, self._log = encoder, log

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def __call__(self, x):
        if self._log["fail_after"] is not None and self._log["batches"] >= self._log["fail_after"]:
            raise KeyboardInterrupt
        self._log["batches"] += 1
        self._log["images"] += x.shape[0]
        return self._encoder(x)


@pytest.fixture()
def encoded(monkeypatch):
    """Counts of encoder loads, batches and images encoded by `run_extract` (reset with `.clear()`)."""
    from medsclean.model import encoder as backbone

    real_load = backbone.load_encoder
    log = {}

    def clear():
        log.update(loads=0, batches=0, images=0, fail_after=None)

    def load(*args, **kwargs):
        log["loads"] += 1
        return _CountingEncoder(real_load(*args, **kwargs), log)

    clear()
    log["clear"] = clear
    monkeypatch.setattr(backbone, "load_encoder", load)
    return log


CFG = ExtractConfig(resize=64, crop=64, num_workers=0, batch_size=4, shard_size=4)


def _extract(folder, work, cfg=CFG, **kwargs):
    rep = SilentReporter()
    result = run_extract(discover(folder), Store(work), cfg, reporter=rep, **kwargs)
    return result, rep.messages


def _assert_same_features(art, reference):
    assert [r["path"] for r in art.manifest["images"]] == [r["path"] for r in reference.manifest["images"]]
    assert art.manifest["skipped"] == reference.manifest["skipped"]
    assert art.manifest["shards"] == reference.manifest["shards"]
    feats, ref = art.sharded_tensors(), reference.sharded_tensors()
    assert feats.keys() == ref.keys() == {"memory", "group0", "group1"}
    for name, tensor in ref.items():
        assert feats[name].dtype == torch.float16 and feats[name].shape == tensor.shape, name
        assert torch.allclose(feats[name].float(), tensor.float(), rtol=1e-3, atol=1e-3), name


def _entries(work):
    return sorted(p.stem for p in (work / "image-features").glob("*/??/*.safetensors"))


def test_image_cache_layout_and_manifest(folder, tmp_path, encoded):
    work = tmp_path / "work"
    result, messages = _extract(folder, work)
    assert (result.n_extracted, result.n_reused, result.n_skipped) == (10, 0, 1)
    assert encoded["images"] == 10
    assert "extract: 10 of 11 images extracted, 0 reused from the image cache, 1 unreadable" in messages
    m = result.artifact.manifest
    shas = [r["sha256"] for r in m["images"]]
    assert shas == [file_sha256(folder / r["path"]) for r in m["images"]]
    assert _entries(work) == sorted(shas)
    entry = work / "image-features" / m["image_cache_key"] / shas[0][:2] / f"{shas[0]}.safetensors"
    tensors = load_tensors(entry)
    assert tensors["memory"].shape == (64, m["encoder"]["memory_dim"]) and tensors["memory"].dtype == torch.float16
    assert [tensors[f"group{g}"].shape[-1] for g in (0, 1)] == [40, 112]
    assert m["image_cache_key"] == extract_mod.encoder_key(CFG)
    assert not (work / ".partial").exists() or not any((work / ".partial").iterdir())


def test_adding_images_extracts_only_them(folder, tmp_path, encoded):
    work = tmp_path / "work"
    first, _ = _extract(folder, work)
    rng = np.random.default_rng(11)
    for i, img in enumerate(crops(texture("gravel"), 2, 64, rng)):
        save_png(folder / f"new {i}.png", img)
    encoded["clear"]()
    second, messages = _extract(folder, work)
    assert encoded["images"] == 2 and not second.cached and second.artifact.key != first.artifact.key
    assert (second.n_extracted, second.n_reused) == (2, 10)
    assert "extract: 2 of 13 images extracted, 10 reused from the image cache, 1 unreadable" in messages
    assert "extract: recomputing (2 images added since " + first.artifact.key + ")" in messages
    fresh, _ = _extract(folder, tmp_path / "fresh")
    _assert_same_features(second.artifact, fresh.artifact)


def test_removing_an_image_extracts_none_and_loads_no_encoder(folder, tmp_path, encoded):
    work = tmp_path / "work"
    _extract(folder, work)
    (folder / "img 04.png").unlink()
    encoded["clear"]()
    result, messages = _extract(folder, work)
    assert encoded["images"] == 0 and encoded["loads"] == 0 and not result.cached
    assert result.n_images == 9 and sum(s["rows"] for s in result.artifact.manifest["shards"]) == 9
    assert any("recomputing (1 removed since" in m for m in messages)
    fresh, _ = _extract(folder, tmp_path / "fresh")
    _assert_same_features(result.artifact, fresh.artifact)


def test_in_place_edit_with_same_size_and_mtime_is_seen(folder, tmp_path, encoded):
    """An edit that keeps the size and restores the mtime changes the content hash, hence the key."""
    target = folder / "img 03.png"
    rng = np.random.default_rng(5)
    before_img, after_img = crops(texture("gravel"), 2, 64, rng)
    Image.fromarray(before_img).save(target, compress_level=0)
    work = tmp_path / "work"
    first, _ = _extract(folder, work)
    stat = target.stat()
    Image.fromarray(after_img).save(target, compress_level=0)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert [r for r in discover(folder).table() if r["path"] == "img 03.png"] == [
        {k: v for k, v in r.items() if k != "sha256"} for r in first.artifact.manifest["images"]
        if r["path"] == "img 03.png"]
    encoded["clear"]()
    second, messages = _extract(folder, work)
    assert encoded["images"] == 1 and not second.cached and second.artifact.key != first.artifact.key
    assert any("recomputing (1 changed since" in m for m in messages)
    fresh, _ = _extract(folder, tmp_path / "fresh")
    _assert_same_features(second.artifact, fresh.artifact)
    assert not torch.equal(first.artifact.sharded_tensors()["memory"][3], second.artifact.sharded_tensors()["memory"][3])


def test_interrupted_extract_resumes_per_image(folder, tmp_path, encoded):
    cfg = ExtractConfig(resize=64, crop=64, num_workers=0, batch_size=2, shard_size=4)
    work = tmp_path / "work"
    encoded["fail_after"] = 1
    with pytest.raises(KeyboardInterrupt):
        _extract(folder, work, cfg)
    assert Store(work).load("extract") is None  # nothing that looks valid
    assert len(_entries(work)) == 1  # the first batch: broken.png and one image
    encoded["clear"]()
    resumed, messages = _extract(folder, work, cfg)
    assert encoded["images"] == 9 and (resumed.n_extracted, resumed.n_reused) == (9, 1)
    assert "extract: 9 of 11 images extracted, 1 reused from the image cache, 1 unreadable" in messages
    fresh, _ = _extract(folder, tmp_path / "fresh", cfg)
    _assert_same_features(resumed.artifact, fresh.artifact)


def test_force_reencodes_every_image(folder, tmp_path, encoded):
    work = tmp_path / "work"
    first, _ = _extract(folder, work)
    encoded["clear"]()
    again, messages = _extract(folder, work, force=True)
    assert encoded["images"] == 10 and not again.cached and again.artifact.key == first.artifact.key
    assert "extract: recomputing (--force)" in messages


def test_prune_image_cache_keeps_referenced_entries(folder, tmp_path):
    work = tmp_path / "work"
    other = tmp_path / "other"
    rng = np.random.default_rng(8)
    for i, img in enumerate(crops(texture("gravel"), 3, 64, rng)):
        save_png(other / f"g{i}.png", img)
    shutil.copy(folder / "img 00.png", other / "shared.png")
    kept, _ = _extract(folder, work)
    dropped, _ = _extract(other, work)
    store = Store(work)
    assert extract_mod.prune_image_cache(store) == (0, 0)
    only_dropped = {r["sha256"] for r in dropped.artifact.manifest["images"]} - {
        r["sha256"] for r in kept.artifact.manifest["images"]}
    assert len(only_dropped) == 3
    sizes = sum((work / "image-features").rglob(f"{sha}.safetensors").__next__().stat().st_size
                for sha in only_dropped)
    store.remove("extract", dropped.artifact.key)
    hh = next((work / "image-features").glob("*/??"))
    stale, fresh = hh / ".x.safetensors.tmp-aaaa", hh / ".y.safetensors.tmp-bbbb"  # left by killed writers
    stale.write_bytes(b"12"), fresh.write_bytes(b"345")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert extract_mod.prune_image_cache(store) == (4, sizes + 2)
    assert fresh.is_file() and not stale.exists()
    fresh.unlink()
    assert _entries(work) == sorted(r["sha256"] for r in kept.artifact.manifest["images"])
    assert _extract(folder, work)[0].cached
    store.remove("extract", kept.artifact.key)
    assert extract_mod.prune_image_cache(store)[0] == 10
    assert not (work / "image-features").exists() or not any((work / "image-features").iterdir())


def test_random_init_weights_are_the_same_in_every_run(folder, tmp_path):
    """Entries of one image-cache key must come from one set of weights, random ones included."""
    cfg = ExtractConfig(backbone="test_resnet", random_init=True, resize=32, crop=32, num_workers=0)
    with pytest.warns(UserWarning, match="RANDOM"):
        first, _ = _extract(folder, tmp_path / "a", cfg)
        second, _ = _extract(folder, tmp_path / "b", cfg)
    for name, tensor in first.artifact.sharded_tensors().items():
        assert torch.equal(second.artifact.sharded_tensors()[name], tensor), name


def test_help_does_not_import_torch():
    """`--help` stays fast because torch is imported only inside commands (timing: benchmarks/README)."""
    code = ("import sys; from typer.testing import CliRunner; import medsclean.cli as c; "
            "r = CliRunner().invoke(c.app, ['extract', '--help']); assert r.exit_code == 0, r.output; "
            "assert '--num-workers' in r.output; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
