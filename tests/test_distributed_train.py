"""`--train-workers N`: distill and select data-parallel on Ray Train (CPU ranks, Gloo).

Oracles: without dropout, two ranks that each train on their share of every batch (7 images: 4
and 3) in DistributedDataParallel, each loss weighted by its share, make the single-process update
on the whole batch (the loss is a mean over images); and a fixed world size gives the same weights
twice. The library's side without Ray (and the devices of the collectives) is in
tests/test_distributed_ddp.py.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from medsclean import pipeline
from medsclean.config import ClusterConfig, DistillConfig, SelectConfig
from medsclean.workdir.store import Store
from medsclean.stages.common import TrainingSetup, load_model
from medsclean.stages.distill import run_distill
from medsclean.stages.select import run_select
from medsclean.ui import SilentReporter

from .helpers import crops, require_ray, save_png, texture

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Features and Step-1 scores of 24 small images, and a session with a 2-rank trainer."""
    require_ray()
    from medsclean import distributed
    from medsclean.distributed.train import DataParallelTrainer

    root = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    for name in ("brick", "gravel"):
        for i, image in enumerate(crops(texture(name), 12, 64, rng)):
            save_png(root / "images" / name / f"{i:02d}.png", image)
    run = pipeline.build_run(root / "images", root / "work", preset="cpu", seed=0, reporter=SilentReporter(),
                             options={"extract": {"resize": 64, "crop": 64, "num_workers": 0}})
    results = pipeline.score_stage(run, run.score_config(engine="exact", banks=10))
    session = distributed.connect(ClusterConfig(executor="ray", workers=2), root / "work")
    trainer = DataParallelTrainer(session, 2, use_gpu=False, storage=root / "work" / ".partial" / "ray-train")
    yield results["extract"].artifact, results["score"].artifact, Store(root / "work"), trainer
    distributed.shutdown()


def _weights(artifact):
    return load_model(artifact).state_dict()


def test_two_ranks_without_dropout_make_the_whole_batch_update_on_an_uneven_batch(stages):
    features, scores, store, trainer = stages
    cfg = DistillConfig(iters=3, width=16, depth=2, heads=2, batch_size=7, dropout=0.0, checkpoint_every=0)
    here = TrainingSetup(seed=3, device="cpu", reporter=SilentReporter())
    one = run_distill(features, scores, store, cfg, here)
    two = run_distill(features, scores, store, cfg, replace(here, trainer=lambda: trainer, world=2))
    assert one.artifact.key != two.artifact.key  # the world size is part of the key
    for name, value in _weights(one.artifact).items():
        assert torch.allclose(value, _weights(two.artifact)[name], atol=2e-5, rtol=1e-4), name
    fresh = run_distill(features, scores, store, replace(cfg, iters=1), here)
    moved = [n for n, v in _weights(fresh.artifact).items() if not torch.allclose(v, _weights(one.artifact)[n])]
    assert moved  # three updates moved the weights: the comparison above is not of untrained models
    assert two.artifact.manifest["final_loss"] == pytest.approx(one.artifact.manifest["final_loss"], rel=1e-4)
    leftover = store.work / ".partial" / "ray-train"
    assert not leftover.exists() or not any(leftover.iterdir())  # Ray Train's run folder is removed


def test_a_fixed_world_size_gives_the_same_weights_twice(stages):
    features, scores, store, trainer = stages
    cfg = DistillConfig(iters=3, width=16, depth=2, heads=2, batch_size=8, checkpoint_every=0)  # dropout on
    ranks = TrainingSetup(seed=4, device="cpu", reporter=SilentReporter(), trainer=lambda: trainer, world=2)
    first = run_distill(features, scores, store, cfg, ranks)
    again = run_distill(features, scores, store, cfg, ranks, force=True)
    assert all(torch.equal(v, _weights(again.artifact)[k]) for k, v in _weights(first.artifact).items())


@pytest.mark.slow
def test_data_parallel_step3_gives_the_same_selection_twice(stages):
    features, scores, store, trainer = stages
    cfg = DistillConfig(iters=3, width=16, depth=2, heads=2, batch_size=8, checkpoint_every=0)
    ranks = TrainingSetup(seed=4, device="cpu", reporter=SilentReporter(), trainer=lambda: trainer, world=2)
    distilled = run_distill(features, scores, store, cfg, ranks).artifact
    chosen = run_select(features, scores, distilled, store, SelectConfig(iters=4), ranks)
    repeated = run_select(features, scores, distilled, store, SelectConfig(iters=4), ranks, force=True)
    eta, eta_again = (r.artifact.tensors("eta.safetensors")["eta"] for r in (chosen, repeated))
    assert torch.equal(eta, eta_again) and torch.isfinite(eta).all()
    assert len(chosen.artifact.manifest["rounds"]) >= 2


def test_train_workers_needs_the_ray_executor(monkeypatch):
    from medsclean import config
    from medsclean.errors import ConfigError

    real = config.installed
    monkeypatch.setattr(config, "installed", lambda module: module == "ray" or real(module))  # with or without ray
    with pytest.raises(ConfigError, match="option of executor ray"):
        ClusterConfig(train_workers=2)
    assert ClusterConfig(executor="ray", train_workers=2).train_workers == 2


def test_cuda_ranks_beyond_the_gpus_of_a_private_instance_are_refused(stages):
    """NCCL puts one rank on each GPU: on a private instance with fewer GPUs than ranks Ray Train
    would wait for GPUs that never come; the run stops at once, naming the options."""
    from medsclean.distributed.extract import _pool_size
    from medsclean.distributed.train import DataParallelTrainer
    from medsclean.errors import DataError

    import ray

    session = stages[3].session
    gpus = int(ray.cluster_resources().get("GPU", 0))
    trainer = DataParallelTrainer(session, gpus + 1, use_gpu=True, storage=stages[2].work / ".partial" / "ray-train")
    with pytest.raises(DataError, match=rf"--train-workers {gpus + 1} --device cuda needs {gpus + 1} GPUs"):
        trainer.run(lambda payload, parallel: None, {})
    if gpus == 0:  # Ray Data's encoder actors on CUDA: none to place
        with pytest.raises(DataError, match="the Ray cluster offers no GPU"):
            _pool_size(ray, session, cuda=True)


def test_a_cpu_rank_trains_on_the_cpu_on_one_thread(monkeypatch):
    from medsclean.distributed.train import _rank

    monkeypatch.setattr(torch, "set_num_threads", lambda n: threads.append(n))
    threads = []
    parallel = _rank(1, 3, use_gpu=False)
    assert (parallel.rank, parallel.world, parallel.device, threads) == (1, 3, "cpu", [1])
