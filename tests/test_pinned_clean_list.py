"""The same seed gives the same clean list across releases.

The expected lists were recorded with medsclean 0.1.0 (before the CLI and configuration redesign)
on a small demo-generator dataset, with the real EfficientNet-Lite0 weights and a small training
budget; a refactor that changes any of them changed the method's behaviour.
"""

import pytest
from typer.testing import CliRunner

from medsclean.cli import app
from medsclean.demo.noisy import make_noisy
from medsclean.demo.synth import generate_dataset

PINNED_REJECTED = {
    "meds": ["brick/train/good/48d1d5d86776.png", "brick/train/good/5a2981e7efdb.png",
             "gravel/train/good/727cade6111e.png", "gravel/train/good/8965bb435c41.png"],
    "knn": ["brick/train/good/19283ef1a3a1.png", "brick/train/good/48d1d5d86776.png",
            "brick/train/good/5a2981e7efdb.png", "gravel/train/good/55601c50b0e0.png",
            "gravel/train/good/727cade6111e.png", "gravel/train/good/8965bb435c41.png"],
    "memory": ["brick/train/good/19283ef1a3a1.png", "brick/train/good/48d1d5d86776.png",
               "brick/train/good/5a2981e7efdb.png", "gravel/train/good/55601c50b0e0.png",
               "gravel/train/good/727cade6111e.png", "gravel/train/good/8965bb435c41.png"],
}
RUNS = {
    "meds": ["--distill-iters", "20", "--select-iters", "20", "--token-pool", "1", "--lr", "2e-3"],
    "knn": ["--method", "knn", "--cut", "mad"],
    "memory": ["--method", "memory", "--reject-fraction", "0.2"],
}


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    base = tmp_path_factory.mktemp("pinned")
    generate_dataset(base / "data", categories=("brick", "gravel"), n_train=14, n_test_good=0, n_test_defect=4,
                     size=128, seed=0)
    make_noisy(base / "data", base / "noisy", ratio=0.25, seed=0)
    return base


@pytest.mark.parametrize("method", sorted(RUNS))
def test_clean_list_is_pinned(noisy, method):
    out = noisy / f"clean-{method}.txt"
    args = ["select", str(noisy / "noisy"), "--work", str(noisy / "work"), "--preset", "cpu", "--seed", "0",
            "--out", str(out), "-q", *RUNS[method]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    kept = {line.split("/noisy/", 1)[1] for line in out.read_text().splitlines()}
    every = {f"{c}/train/good/{p.name}" for c in ("brick", "gravel")
             for p in (noisy / "noisy" / c / "train" / "good").iterdir()}
    assert len(every) == 34
    assert sorted(every - kept) == PINNED_REJECTED[method]
