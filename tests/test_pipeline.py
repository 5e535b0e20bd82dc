"""End-to-end through the CLI on a small generated contaminated dataset with real Lite0 features."""

import csv
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from typer.testing import CliRunner

from medsclean.cli import app
from medsclean.metrics import image_auroc_score
from medsclean.demo.noisy import make_noisy
from medsclean.demo.synth import generate_dataset

runner = CliRunner()
FAST = ["--resize", "128", "--crop", "128", "--num-workers", "0", "--batch-size", "16", "--banks", "20"]
TRAIN = ["--distill-iters", "40", "--select-iters", "40", "--width", "32", "--depth", "2", "--heads", "2"]


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    generate_dataset(base / "data", categories=("brick", "gravel"), n_train=16, n_test_good=4, n_test_defect=6,
                     size=128, seed=0)
    make_noisy(base / "data", base / "noisy", ratio=0.25, seed=0)  # 4 contaminants per class
    return base


def _invoke(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res


def _labels(root):
    manifest = json.loads((root / "medsclean-noisy.json").read_text())
    return {item["train_path"] for item in manifest["injected"]}


def _score_args(noisy, work):
    return ["score", str(noisy / "noisy"), "--work", str(work), *[a for a in FAST if a not in ("--banks", "20")],
            "--banks", "20"]


def test_score_ranks_contaminants_first(noisy):
    work = noisy / "work-score"
    payload = json.loads(_invoke([*_score_args(noisy, work), "--json"]).stdout)
    with open(payload["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    injected = _labels(noisy / "noisy")
    labels = np.array([r["path"] in injected for r in rows])
    scores = np.array([float(r["anomaly_score"]) for r in rows])
    for cls in ("brick", "gravel"):
        sel = np.array([r["class"] == cls for r in rows])
        ranks = np.array([int(r["rank_in_class"]) for r in rows])[sel]
        assert sorted(ranks) == list(range(1, sel.sum() + 1))
        assert ranks[np.argmax(scores[sel])] == 1
    assert image_auroc_score(labels, scores) > 0.8
    again = json.loads(_invoke([*_score_args(noisy, work), "--json"]).stdout)
    assert again["stages"]["score"]["cached"] and again["stages"]["extract"]["cached"]


def test_score_is_deterministic_per_seed(noisy):
    outs = []
    for work, seed in (("w-a", "3"), ("w-b", "3"), ("w-c", "4")):
        payload = json.loads(_invoke([*_score_args(noisy, noisy / work), "--seed", seed, "--json"]).stdout)
        outs.append(open(payload["csv"]).read())
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_select_memory_method_and_meds_end_to_end(noisy, tmp_path):
    work = noisy / "work-select"
    clean = tmp_path / "clean.txt"
    root = noisy / "noisy"
    res = _invoke(["select", str(root), "--work", str(work), "--out", str(clean), "--method", "memory", *FAST,
                   "--json"])
    summary = json.loads(res.stdout)
    assert summary["method"] == "memory" and summary["kept"] + summary["rejected"] == 40
    kept = clean.read_text().splitlines()
    assert all(line.startswith(str(root)) for line in kept)

    res = _invoke(["select", str(root), "--work", str(work), "--out", str(clean), *FAST, *TRAIN, "--json"])
    summary = json.loads(res.stdout)
    sel_dir = summary["cut_dir"]
    kept = [line[len(str(root)) + 1:] for line in clean.read_text().splitlines()]
    rejected = open(f"{sel_dir}/rejected.txt").read().splitlines()
    assert sorted(kept + rejected) == sorted(set(kept + rejected)) and len(kept) + len(rejected) == 40
    assert kept == sorted(kept)  # input order
    with open(f"{sel_dir}/scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"path", "class", "memory_score", "distilled_score", "final_eta", "kept", "rank_in_class",
                            "decision"}
    assert {r["decision"] for r in rows} == {"auto"}  # no correction
    injected = _labels(root)
    # the most suspicious image of each class is a planted contaminant, and it is rejected
    for cls in ("brick", "gravel"):
        top = next(r for r in rows if r["class"] == cls and r["rank_in_class"] == "1")
        assert top["path"] in injected and top["kept"] == "0"
    rounds = json.load(open(f"{sel_dir}/selection.json"))["rounds"]
    assert rounds[0]["t"] == 0 and rounds[-1]["final"] is True
    assert set(summary["stages"]) == {"extract", "score", "distill", "select", "cut"}


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_eval_end_to_end_json_and_report(noisy, tmp_path):
    work = noisy / "work-eval"
    report = tmp_path / "report"
    res = _invoke(["eval", str(noisy / "noisy"), "--work", str(work), "--report", str(report), "--report-top", "5",
                   "--resize", "128", "--crop", "128", "--num-workers", "0", "--banks", "20",
                   "--distill-iters", "30", "--select-iters", "30", "--width", "32", "--depth", "2", "--heads", "2",
                   "--json"])
    payload = json.loads(res.stdout)
    assert {r["class"] for r in payload["detector"]} == {"brick", "gravel", "mean"}
    assert all(0.0 <= r["image_auroc"] <= 1.0 and 0.0 <= r["aupro"] <= 1.0 for r in payload["detector"])
    assert payload["detector"][0]["images"] == 10 and payload["detector"][0]["anomalous"] == 6
    assert payload["protocol"]["size"] == 256 and payload["protocol"]["mask_threshold"] == 0.5
    pooled = payload["cleaning"][-1]
    assert pooled["contaminants"] == 8 and 0.0 <= pooled["recall"] <= 1.0
    assert payload["schema"] == "medsclean.eval/1"

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    saved = json.loads((work / "eval" / "metrics.json").read_text(), parse_constant=refuse)
    assert saved["schema"] == "medsclean.metrics/1"
    assert saved["detector"] == payload["detector"]
    assert (work / "eval" / "metrics.csv").read_text().startswith("section,class,images")
    html = (report / "report.html").read_text()
    parser = _Collect()
    parser.feed(html)
    imgs = [a for t, a in parser.tags if t == "img"]
    assert len(imgs) == 5 and all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    assert "http://" not in html and "https://" not in html
    assert len(list((report / "overlays").glob("*.png"))) == 5


def test_eval_memory_model_on_folder_without_test_split_is_a_clear_error(tmp_path):
    from .helpers import crops, save_png, texture

    rng = np.random.default_rng(0)
    for i, img in enumerate(crops(texture("brick"), 4, 64, rng)):
        save_png(tmp_path / "imgs" / f"{i}.png", img)
    res = runner.invoke(app, ["eval", str(tmp_path / "imgs"), "--work", str(tmp_path / "w"), "--model", "memory",
                              "--resize", "64", "--crop", "64", "--num-workers", "0", "--banks", "4"])
    assert res.exit_code == 1 and "nothing to evaluate" in res.output


def test_eval_memory_ensemble_and_memory_selection(noisy):
    """Test images meet the training memories of their own class (banks are stored as set positions)."""
    work = noisy / "work-eval-memory"
    common = ["--work", str(work), "--resize", "128", "--crop", "128", "--num-workers", "0", "--banks", "20",
              "--json", "-q"]
    detector = json.loads(_invoke(["eval", str(noisy / "noisy"), "--model", "memory", *common]).stdout)["detector"]
    assert [r["class"] for r in detector] == ["brick", "gravel", "mean"]
    assert all(r["image_auroc"] > 0.7 for r in detector)
    payload = json.loads(_invoke(["eval", str(noisy / "noisy"), "--method", "memory", *common]).stdout)
    assert payload["detector"][:2] == detector[:2]  # a memory selection has no model: the ensemble scores
    assert payload["cleaning"][-1]["contaminants"] == 8 and payload["stages"]["select"]["cached"] is False


def test_eval_on_a_plain_test_folder_with_masks(noisy, tmp_path):
    import shutil

    data = noisy / "data"
    for i, src in enumerate(sorted((data / "brick" / "train" / "good").glob("*.png"))):
        (tmp_path / "train" / "brick").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, tmp_path / "train" / "brick" / f"t{i:02d}.png")
    (tmp_path / "test" / "brick").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    for i, src in enumerate(sorted((data / "brick" / "test").glob("*/*.png"))):
        shutil.copy(src, tmp_path / "test" / "brick" / f"q{i:02d}.png")
        mask = data / "brick" / "ground_truth" / src.parent.name / f"{src.stem}_mask.png"
        if mask.is_file():
            shutil.copy(mask, tmp_path / "masks" / f"q{i:02d}_mask.png")
    common = ["--work", str(tmp_path / "w"), "--resize", "128", "--crop", "128", "--num-workers", "0",
              "--banks", "20", "--model", "memory", "--json", "-q"]
    res = runner.invoke(app, ["eval", str(tmp_path / "train"), "--test", str(tmp_path / "test"), *common])
    assert res.exit_code == 2 and "--test-masks" in res.output
    payload = json.loads(_invoke(["eval", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
                                  "--test-masks", str(tmp_path / "masks"), *common]).stdout)
    brick = payload["detector"][0]
    assert brick["class"] == "brick" and brick["images"] == 10 and brick["anomalous"] == 6
    assert brick["image_auroc"] > 0.7 and 0.0 < brick["aupro"] <= 1.0
