"""`--executor ray`: Step 1's exact engine as Ray tasks on a private local instance.

Oracle: the exact engine in this process; the Ray tasks must give the same maps bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medsclean.cli import app
from medsclean.config import ClusterConfig
from medsclean.errors import ConfigError
from medsclean.config import ScoreConfig
from medsclean.step1.classes import score_classes
from medsclean.step1.runtime import Runtime
from medsclean.workdir.artifacts import load_tensors
from medsclean.workdir.store import Store

from .helpers import crops, require_ray, save_png, texture
from .test_memory import random_features

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    require_ray()
    from medsclean import distributed

    live = distributed.connect(ClusterConfig(executor="ray", workers=2), tmp_path_factory.mktemp("ray-work"))
    yield live
    distributed.shutdown()


@pytest.mark.parametrize("k,leave_self_out,per_class", [(1, True, True), (2, True, False), (1, False, True)])
def test_ray_tasks_give_the_local_maps_bit_for_bit(session, k, leave_self_out, per_class):
    features = torch.as_tensor(random_features(130, 16, 24, seed=k)).half()
    classes = ["a"] * 80 + ["b"] * 50
    cfg = ScoreConfig(banks=30, ratio=0.1, k=k, include_self=not leave_self_out, per_class=per_class, engine="exact",
                      seed=5)
    blocks = 1 << 20  # small blocks: several query blocks and key chunks
    local, local_banks = score_classes(features, classes, cfg, Runtime(max_block_bytes=blocks))
    on_ray, ray_banks = score_classes(features, classes, cfg, Runtime(max_block_bytes=blocks, executor=session))
    assert torch.equal(on_ray, local)
    assert all(torch.equal(ray_banks[c], local_banks[c]) for c in local_banks)


def test_tasks_on_ray_read_the_shards_themselves(session, tmp_path):
    """Tasks get the artifact's rows (paths), not the tensors, and give the same maps."""
    from .test_blocks import _write_features

    features = torch.as_tensor(random_features(90, 9, 16, seed=7)).half()
    art = _write_features(tmp_path, features, shard_size=20)
    cfg = ScoreConfig(banks=12, engine="exact", seed=1)
    local, _ = score_classes(features, ["a"] * 90, cfg, Runtime(max_block_bytes=1 << 18))
    on_ray, _ = score_classes(art.rows("memory"), ["a"] * 90, cfg, Runtime(max_block_bytes=1 << 18, executor=session))
    assert torch.equal(on_ray, local)


def test_the_work_folder_check_passes_on_a_node_that_sees_it(session, tmp_path):
    from medsclean.distributed.session import check_shared_work_folder

    check_shared_work_folder(tmp_path / "shared")  # raises DataError when a node cannot read the probe
    assert not list((tmp_path / "shared").glob(".cluster-probe-*"))


def test_cluster_options_are_checked_before_anything_runs(monkeypatch):
    with pytest.raises(ConfigError, match="option of executor ray"):
        ClusterConfig(address="auto")
    with pytest.raises(ConfigError, match="at least 1"):
        ClusterConfig(executor="ray", workers=0)
    from medsclean import config

    real = config.installed
    monkeypatch.setattr(config, "installed", lambda module: module != "ray" and real(module))
    with pytest.raises(ConfigError, match=r"pip install 'medsclean\[ray\]'"):
        ClusterConfig(executor="ray")
    res = CliRunner().invoke(app, ["score", ".", "--ray-address", "auto"])
    assert res.exit_code == 2 and "error: --ray-address is an option of executor ray; add --executor ray or drop --ray-address" in res.output


def _processes_marked(marker: str) -> list[str]:
    """Command names of the processes whose environment holds `marker` (a command's children inherit it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append((entry / "comm").read_text().strip())
            except OSError:
                continue
    return found


def test_score_cli_on_ray_equals_local_and_leaves_no_ray_process(tmp_path):
    require_ray()
    rng = np.random.default_rng(0)
    for name in ("brick", "gravel"):
        for i, image in enumerate(crops(texture(name), 12, 64, rng)):
            save_png(tmp_path / "images" / name / f"{i:02d}.png", image)
    encoder = [str(tmp_path / "images"), "--resize", "64", "--crop", "64", "--num-workers", "0", "--json", "--quiet"]
    common = ["score", *encoder, "--engine", "exact", "--banks", "20"]
    marker = f"MEDSCLEAN_TEST_RUN={uuid.uuid4().hex}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", marker.split("=")[0]: marker.split("=")[1]}
    outputs = {}
    for executor in ("local", "ray"):
        # The features of both come from the local executor: Ray's encoder actors run torch on one thread,
        # whose float16 features can differ from a 2-thread run's in the last bit (tests/test_distributed_extract.py).
        medsclean = [sys.executable, "-m", "medsclean"]
        extracted = subprocess.run([*medsclean, "extract", *encoder, "--work", str(tmp_path / executor)],
                                   capture_output=True, text=True, env=env, timeout=300)
        assert extracted.returncode == 0, extracted.stderr
        extra = ["--executor", "ray", "--ray-workers", "2"] if executor == "ray" else []
        done = subprocess.run([*medsclean, *common, "--work", str(tmp_path / executor), *extra],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs[executor] = json.loads(done.stdout)
    local, on_ray = (Store(tmp_path / e).load("score") for e in ("local", "ray"))
    assert local.key == on_ray.key  # the executor is not part of the cache key
    assert torch.equal(load_tensors(on_ray.file("scores.safetensors"))["maps"],
                       load_tensors(local.file("scores.safetensors"))["maps"])
    assert on_ray.text("scores.csv") == local.text("scores.csv")
    assert _processes_marked(marker) == []  # the private instance and its workers stopped with the command
