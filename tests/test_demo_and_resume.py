"""Resuming interrupted training stages, and the demo end to end (slow)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from medsclean.stages import distill as distill_stage
from medsclean.cli import app
from medsclean.config import DistillConfig, ExtractConfig, ScoreConfig
from medsclean.workdir.data import discover
from medsclean.stages.features import run_extract
from medsclean.demo.noisy import make_noisy
from medsclean.stages.scores import run_score
from medsclean.workdir.store import Store
from medsclean.demo.synth import generate_dataset
from medsclean.stages.common import TrainingSetup
from medsclean.ui import SilentReporter


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    generate_dataset(base / "data", categories=("gravel",), n_train=12, n_test_good=0, n_test_defect=3, size=96)
    make_noisy(base / "data", base / "noisy", ratio=0.25, seed=0)
    store = Store(base / "work")
    features = run_extract(discover(base / "noisy"), store, ExtractConfig(resize=96, crop=96, num_workers=0),
                           reporter=SilentReporter()).artifact
    scores = run_score(features, store, ScoreConfig(banks=10), device="cpu", reporter=SilentReporter()).artifact
    return base, features, scores


CFG = DistillConfig(iters=30, width=16, depth=2, heads=2, checkpoint_every=10)


def _setup(seed=1, reporter=None):
    return TrainingSetup(seed=seed, device="cpu", reporter=reporter or SilentReporter())


def _weights(art):
    return art.tensors("model.safetensors")


def test_interrupted_distill_resumes_to_the_same_model(stages, monkeypatch):
    base, features, scores = stages
    reference = distill_stage.run_distill(features, scores, Store(base / "ref"), CFG, _setup()).artifact
    real = distill_stage.progress_callback

    def interrupting(task):
        def on_step(step, record):
            if step == 25:
                raise KeyboardInterrupt
        return on_step

    store = Store(base / "work-a")
    monkeypatch.setattr(distill_stage, "progress_callback", interrupting)
    with pytest.raises(KeyboardInterrupt):
        distill_stage.run_distill(features, scores, store, CFG, _setup())
    assert store.load("distill") is None
    monkeypatch.setattr(distill_stage, "progress_callback", real)
    rep = SilentReporter()
    resumed = distill_stage.run_distill(features, scores, store, CFG, _setup(reporter=rep)).artifact
    assert any("resuming from the checkpoint at iteration 20" in m for m in rep.messages)
    ref_w, got_w = _weights(reference), _weights(resumed)
    assert ref_w.keys() == got_w.keys()
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    assert not list((base / "work-a" / ".partial").glob("distill-*"))  # checkpoint removed once done


def test_changed_option_recomputes_distill(stages):
    base, features, scores = stages
    store = Store(base / "work-b")
    first = distill_stage.run_distill(features, scores, store, CFG, _setup())
    again = distill_stage.run_distill(features, scores, store, CFG, _setup())
    other = distill_stage.run_distill(features, scores, store, CFG, _setup(seed=2))
    assert not first.cached and again.cached and not other.cached
    assert other.artifact.key != first.artifact.key


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    args = ["demo", "--work", str(tmp_path / "work"), "--n-train", "10", "--n-test-good", "3", "--n-test-defect", "6",
            "--image-size", "128", "--noise-ratio", "0.3", "--distill-iters", "20", "--select-iters", "20", "--json", "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert {r["class"] for r in payload["detector"]} == {"brick", "grass", "gravel", "coins", "mean"}
    assert payload["cleaning"][-1]["contaminants"] == 12
    assert (tmp_path / "work" / "demo" / "report" / "report.html").is_file()
    again = json.loads(CliRunner().invoke(app, args).stdout)
    assert all(stage["cached"] for stage in again["stages"].values())
