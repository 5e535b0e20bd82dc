"""The Python API: `medsclean.select(...)` and the other stage functions take the command line's
options, share its cache, give the same lists byte for byte, name keywords in errors, import no
torch until called; the README's example runs as written."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import medsclean
from medsclean.cli import app

from .helpers import crops, make_mvtec, save_png, texture

ROOT = Path(__file__).resolve().parents[1]
FAST_CLI = ["--resize", "64", "--crop", "64", "--num-workers", "0", "--banks", "10", "--distill-iters", "20",
            "--select-iters", "20", "--width", "16", "--depth", "2", "--heads", "2"]
FAST = {"resize": 64, "crop": 64, "num_workers": 0, "banks": 10, "distill_iters": 20, "select_iters": 20,
        "width": 16, "depth": 2, "heads": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("api") / "data", n_train=8)


@pytest.fixture(scope="module")
def cli_run(data, tmp_path_factory):
    """One CLI `select` (the lists in files), in its own work folder."""
    base = tmp_path_factory.mktemp("cli-run")
    res = CliRunner().invoke(app, ["select", str(data), "--work", str(base / "work"), *FAST_CLI, "--out",
                                   str(base / "clean.txt"), "--rejected", str(base / "rejected.txt"), "-q"])
    assert res.exit_code == 0, res.output
    return base


@pytest.fixture(scope="module")
def api_run(data, tmp_path_factory):
    """The same selection through the API, in another work folder."""
    work = tmp_path_factory.mktemp("api-run") / "work"
    return medsclean.select(str(data), work=work, progress=False, **FAST), work


def test_import_medsclean_imports_no_torch_and_is_fast():
    code = ("import sys, time; t = time.perf_counter(); import medsclean; dt = time.perf_counter() - t; "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "assert 'numpy' not in sys.modules, 'numpy was imported'; print(dt)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) < 1.0


def test_version_is_the_packages_and_the_commands():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert medsclean.__version__ == declared == "0.2.0"
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"medsclean {declared}"


def test_cli_and_api_give_byte_identical_lists(cli_run, api_run):
    selection, _ = api_run
    assert (cli_run / "clean.txt").read_text() == "".join(f"{p}\n" for p in selection.kept)
    assert (cli_run / "rejected.txt").read_text() == "".join(f"{p}\n" for p in selection.rejected)
    assert selection.kept and len(selection.kept) + len(selection.rejected) == 16


def test_the_api_reuses_a_cli_run_and_the_cli_an_api_run(data, cli_run, api_run, tmp_path):
    selection, api_work = api_run
    reused = medsclean.select(str(data), work=cli_run / "work", progress=False, **FAST)
    assert all(stage["cached"] for stage in reused.summary["stages"].values())
    assert reused.run == selection.run and reused.kept == selection.kept
    res = CliRunner().invoke(app, ["select", str(data), "--work", str(api_work), *FAST_CLI, "--json",
                                   "--out", str(tmp_path / "clean.txt")])
    assert res.exit_code == 0, res.output
    assert '"cached":false' not in res.stdout.replace(" ", "")
    assert (tmp_path / "clean.txt").read_text() == "".join(f"{p}\n" for p in selection.kept)


def test_selection_rows_recut_csv_and_pandas(data, cli_run, api_run, tmp_path):
    selection, _ = api_run
    assert [r["path"] for r in selection.rows] == sorted(selection.kept + selection.rejected,
                                                          key=[r["path"] for r in selection.rows].index)
    first = selection.rows[0]
    assert list(first) == ["path", "class", "memory_score", "distilled_score", "final_eta", "kept", "rank_in_class",
                           "decision"]
    assert {r["decision"] for r in selection.rows} == {"auto"}  # no correction
    assert first["path"].startswith(str(data)) and isinstance(first["distilled_score"], float)
    assert {r["path"] for r in selection.rows if r["kept"]} == set(selection.kept)
    assert selection.review.is_file() and set(selection.artifacts) == {"extract", "score", "distill", "select",
                                                                         "cut"}
    # the CSV is the cut's scores.csv with the lists' paths
    stored = (selection.artifacts["cut"] / "scores.csv").read_text().splitlines()
    written = selection.to_csv(tmp_path / "rows.csv").read_text().splitlines()
    assert written[0] == stored[0] and len(written) == len(stored)
    assert [line.split(",", 1)[1] for line in written[1:]] == [line.split(",", 1)[1] for line in stored[1:]]
    assert selection.to_pandas().shape == (16, 8)

    recut = selection.recut(reject_fraction=0.25)
    assert recut.summary["recut"] and not recut.summary["trained"]
    assert len(recut.rejected) == 4 and recut.run != selection.run
    res = CliRunner().invoke(app, ["select", str(data), "--work", str(cli_run / "work"), *FAST_CLI,
                                   "--reject-fraction", "0.25", "--rejected", "-", "-q"])
    assert res.exit_code == 0, res.output
    assert res.stdout == "".join(f"{p}\n" for p in recut.rejected)
    with pytest.raises(medsclean.ConfigError, match="recut\\(\\) takes only the cut options.*not distill_iters"):
        selection.recut(distill_iters=5)


@pytest.mark.parametrize("options,expected", [
    ({"bank_ratio": 2.0}, r"^bank_ratio must be in \(0, 1\], not 2.0"),
    ({"distill_iters": 0}, "^distill_iters must be at least 1, not 0"),
    ({"knn": 0}, "^knn must be at least 1, not 0"),
    ({"width": 64, "heads": 3}, "^heads 3 must divide width 64; try heads 2"),
    ({"budget": "10s", "select_iters": 5}, "^budget and select_iters contradict each other"),
    ({"method": "bogus"}, "^method must be one of meds, memory, knn, iterative, not 'bogus'"),
    ({"banks": 2.5}, "^banks must be an integer, not 2.5"),
    ({"reject_fraction": 0.1, "threshold": 0.5}, "^reject_fraction and threshold contradict each other"),
    ({"bank_ration": 0.1}, r"^select\(\) has no option bank_ration; did you mean bank_ratio\?"),
    ({"as_json": True}, r"^select\(\) has no option as_json"),
])
def test_errors_name_the_keyword_before_any_work(tmp_path, options, expected):
    with pytest.raises(medsclean.ConfigError, match=expected) as exc:
        medsclean.select(tmp_path, work=tmp_path / "work", **options)
    assert "--" not in str(exc.value)
    assert not (tmp_path / "work").exists()


def test_errors_import_no_torch_and_the_folder_is_checked(tmp_path):
    code = ("import sys, medsclean\ntry:\n    medsclean.select('.', bank_ratio=2)\nexcept medsclean.ConfigError as e:\n"
            "    assert e.params == ('bank_ratio',), e.params\nassert 'torch' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(medsclean.DataError, match="no such folder"):
        medsclean.extract(tmp_path / "missing", work=tmp_path / "work")
    with pytest.raises(medsclean.ConfigError, match="^evaluate\\(\\) has no option out"):
        medsclean.evaluate(tmp_path, out="x.txt")


def test_progress_goes_to_stderr_and_progress_false_silences_it(data, cli_run, capfd):
    medsclean.score(str(data), work=cli_run / "work", **{k: FAST[k] for k in ("resize", "crop", "num_workers", "banks")})
    out, err = capfd.readouterr()
    assert out == "" and "score: cached" in err
    result = medsclean.score(str(data), work=cli_run / "work", progress=False,
                             **{k: FAST[k] for k in ("resize", "crop", "num_workers", "banks")})
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert result.cached and result.stage == "score" and result.file.name == "scores.csv"


def test_evaluate_measures_the_latest_run(data, cli_run):
    evaluation = medsclean.evaluate(str(data), work=cli_run / "work", progress=False)
    assert evaluation.model == "select" and evaluation.detector
    assert {"class", "image_auroc"} <= set(evaluation.detector[-1])
    assert evaluation.files["metrics_json"].is_file()


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(tmp_path):
    rng = np.random.default_rng(0)
    for i, image in enumerate(crops(texture("brick"), 8, 64, rng)):
        save_png(tmp_path / "imgs" / f"{i:03d}.png", image)
    proc = subprocess.run([sys.executable, "-c", _readme_example()], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "2 rejected; review page:" in proc.stdout
    assert (tmp_path / "scores.csv").read_text().startswith("path,class,memory_score")
