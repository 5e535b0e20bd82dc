"""`extract` on Ray (`run_extract(..., executor=session)`): the same cache entries, artifact and key as
the local executor, on one private 2-CPU Ray instance for the whole module."""

import json
import shutil

import numpy as np
import pytest
import torch

from medsclean.config import ClusterConfig, ExtractConfig
from medsclean.workdir.data import discover
from medsclean.errors import DataError
from medsclean.stages.features import run_extract
from medsclean.workdir.store import Store
from medsclean.ui import SilentReporter

from .helpers import crops, require_ray, save_png, texture

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")]

CFG = ExtractConfig(resize=64, crop=64, num_workers=0, batch_size=4, shard_size=4)  # as test_extract


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    require_ray()  # skips without ray, as test_distributed (fails instead under $MEDSCLEAN_REQUIRE_RAY)
    from medsclean.distributed import connect, shutdown

    yield connect(ClusterConfig(executor="ray", workers=2), tmp_path_factory.mktemp("ray-work"))
    shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(3)
    for i, img in enumerate(crops(texture("brick"), 10, 64, rng)):
        save_png(root / f"img {i:02d}.png", img)
    (root / "broken.png").write_bytes(b"not an image at all")
    return root


@pytest.fixture(scope="module")
def ray_run(session, folder, tmp_path_factory):
    """One Ray extract of `folder`, shared by the tests that only read it."""
    work = tmp_path_factory.mktemp("ray") / "work"
    return _extract(folder, work, executor=session), work


def _extract(folder, work, **kwargs):
    rep = SilentReporter()
    result = run_extract(discover(folder), Store(work), CFG, reporter=rep, **kwargs)
    return result, rep.messages


def _entries(work):
    return {p.stem: p for p in (work / "image-features").glob("*/??/*.safetensors")}


def _json(value):
    return json.loads(json.dumps(value))  # as in manifest.json: tuples become lists


def _assert_same(art, reference, exact=True):
    """Same key and manifest; the same tensors, bit for bit or (not `exact`) within float16 rounding
    (2 ulps, rtol 2e-3, and 1e-3 near zero)."""
    assert art.key == reference.key
    for field in ("images", "skipped", "shards", "tensors", "encoder", "image_cache_key"):
        assert _json(art.manifest[field]) == _json(reference.manifest[field]), field
    feats, ref = art.sharded_tensors(), reference.sharded_tensors()
    assert feats.keys() == ref.keys() == {"memory", "group0", "group1"}
    for name, tensor in ref.items():
        if exact:
            assert torch.equal(feats[name], tensor), name
        else:
            torch.testing.assert_close(feats[name].float(), tensor.float(), rtol=2e-3, atol=1e-3, msg=name)


def test_same_artifact_as_the_local_executor(ray_run, folder, tmp_path):
    """Bit-identical to the local executor run on one torch thread, as each Ray encoder actor runs.

    The forward pass's float rounding depends on the batch and on the thread count. Ray keeps the
    local executor's batches (`todo` cut every batch_size images); against the local default of
    2 threads, a few float16 values differ by 1-2 ulps (measured: 0.0078 at most in group0/1,
    1.2e-4 in memory), as between two local runs with different thread counts or batch sizes.
    """
    (result, messages), work = ray_run
    assert (result.n_images, result.n_skipped, result.n_extracted, result.n_reused) == (10, 1, 10, 0)
    assert "extract: 10 of 11 images extracted, 0 reused from the image cache, 1 unreadable" in messages
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local, _ = _extract(folder, tmp_path / "local")
    finally:
        torch.set_num_threads(threads)
    _assert_same(result.artifact, local.artifact)
    assert _entries(work).keys() == _entries(tmp_path / "local").keys()


def test_unreadable_image_is_skipped_or_fails_with_strict(ray_run, session, folder, tmp_path):
    (result, _), _ = ray_run
    [skipped] = result.artifact.manifest["skipped"]
    assert skipped["path"] == "broken.png" and "cannot decode image" in skipped["error"]
    with pytest.raises(DataError, match=r"broken\.png: cannot decode image .*or drop --strict"):
        _extract(folder, tmp_path / "strict", strict=True, executor=session)
    assert Store(tmp_path / "strict").load("extract") is None


def test_resume_encodes_only_the_images_without_an_entry(ray_run, session, folder, tmp_path):
    """An interrupted run leaves the entries of its finished batches; here half of them. The other
    half is encoded in other batches than in the full run, hence equal within float16 rounding."""
    (full, _), full_work = ray_run
    work = tmp_path / "work"
    entries = sorted(_entries(full_work).items())
    for sha, path in entries[::2]:
        target = work / path.relative_to(full_work)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    before = {sha: path.stat().st_mtime_ns for sha, path in _entries(work).items()}
    assert len(before) == 5
    resumed, messages = _extract(folder, work, executor=session)
    assert (resumed.n_extracted, resumed.n_reused, resumed.n_skipped) == (5, 5, 1)
    assert "extract: 5 of 11 images extracted, 5 reused from the image cache, 1 unreadable" in messages
    after = _entries(work)
    assert after.keys() == dict(entries).keys()
    assert {sha: after[sha].stat().st_mtime_ns for sha in before} == before  # not rewritten
    _assert_same(resumed.artifact, full.artifact, exact=False)


def test_an_actors_error_reaches_the_driver_as_itself():
    """What an encoder actor raises comes back pickled; one that does not unpickle as its plain
    base class, same message and exit code."""
    import pickle

    from medsclean.distributed.extract import _portable
    from medsclean.errors import ConfigError, UsageError, WeightsError

    weights = pickle.loads(_portable(WeightsError("w.pth: weights file not found")))
    assert type(weights) is WeightsError and str(weights) == "w.pth: weights file not found"
    usage = pickle.loads(_portable(ConfigError("crop", "crop must be at least 1 pixel")))
    assert type(usage) is UsageError and str(usage) == "crop must be at least 1 pixel" and usage.exit_code == 2
