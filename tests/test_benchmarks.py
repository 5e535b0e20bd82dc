"""Every script in benchmarks/ runs end to end in its `--smoke` mode and prints what it publishes.

A smoke run takes the script's real code path on tiny sizes (see benchmarks/smoke_mode.py), so an
API change that breaks a benchmark fails here instead of silently breaking published numbers.
Each script runs as a subprocess from a temporary folder (all of them started together in two
lanes, see `SmokeRuns`), with its work folder and output files
under pytest's tmp_path; the checks are on the shape of its output (the first line marking the
run as a smoke run, the markdown table's columns and rows, the JSON file's keys) and on the few
facts a benchmark asserts itself (exit codes, identical artifacts), never on timings or scores,
which mean nothing at these sizes. Scripts that start Ray are marked `ray` and skipped
without it, unless $MEDSCLEAN_REQUIRE_RAY is set (as in tests/test_distributed*.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .helpers import require_ray

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SMOKE_LINE = "SMOKE RUN: sizes are tiny, numbers are meaningless"
MODULES = {"detector_baseline.py", "smoke_mode.py", "suite_data.py", "tuning_data.py"}  # imported by the scripts, not run
TIMEOUT_S = 300


# ------------------------------------------------------------------------------------ reading output


def table_rows(stdout: str, header_start: str) -> list[list[str]]:
    """The cells of the markdown table whose header line starts with `header_start`, header first
    (the separator line left out)."""
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(header_start)]
    assert starts, f"no table with a header starting {header_start!r} in:\n{stdout}"
    rows = []
    for line in lines[starts[0]:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not all(set(cell) <= {"-"} for cell in cells):
            rows.append(cells)
    return rows


def first_cells(stdout: str, header_start: str) -> list[str]:
    """The first cell of every body row of that table."""
    return [row[0] for row in table_rows(stdout, header_start)[1:]]


def any_table_first_cells(stdout: str) -> set[str]:
    """The first cell of every markdown row in the output, whatever its table."""
    return {line.strip().strip("|").split("|")[0].strip() for line in stdout.splitlines() if line.startswith("|")}


def stdout_json(stdout: str) -> dict:
    """The JSON document a script prints after the smoke line."""
    return json.loads(stdout.split("\n", 1)[1])


def read_json(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------ checks per script


def check_accuracy(stdout: str, tmp: Path) -> None:
    header = table_rows(stdout, "| method | I-AUROC")[0]
    assert header[1:] == ["I-AUROC r=0.4", "I-AP r=0.4", "P-AUPRO r=0.4", "P-AP r=0.4"]
    assert first_cells(stdout, "| method | I-AUROC") == ["no cleaning", "memory selection", "MeDS", "clean upper bound"]
    assert first_cells(stdout, "| r | injected") == ["0.4", "0.4"]
    results = read_json(tmp / "accuracy.json")
    assert set(results["runs"]) == {"r=0.4,seed=0", "r=0.4,seed=1"} and set(results["clean"]) == {"0", "1"}
    for run in results["runs"].values():
        assert set(run["methods"]) == {"no cleaning", "memory selection", "MeDS"}
        assert {"image_auroc", "image_ap", "aupro", "pixel_ap", "precision", "recall"} <= set(run["methods"]["MeDS"])


def check_cli(stdout: str, tmp: Path) -> None:
    rows = table_rows(stdout, "| case |")
    assert rows[0] == ["case", "this (s)", "exit codes"]
    codes = {row[0]: row[2] for row in rows[1:]}
    assert codes == {"`--help`": "this 0", "`select --help`": "this 0", "`select --method bogus (exit 2)`": "this 2"}


def check_extract(stdout: str, tmp: Path) -> None:
    payload = stdout_json(stdout)
    assert {"raw", "extract", "ratio_extract_over_raw", "args"} <= set(payload)
    assert payload["raw"]["images"] == payload["extract"]["images"] == 4
    assert {"images_per_s_stage", "stage_s", "wall_s", "peak_rss_mb"} <= set(payload["extract"])


def check_extract_ray(stdout: str, tmp: Path) -> None:
    header = table_rows(stdout, "| executor |")[0]
    assert header == ["executor", "stage (s)", "images/s", "instance start-up (s)", "shutdown (s)", "process wall (s)"]
    assert first_cells(stdout, "| executor |") == ["local", "ray"]
    payload = read_json(tmp / "extract-ray.json")
    assert payload["same_key"] is True  # both executors made the same artifact
    assert set(payload["summary"]) == {"local", "ray"} and payload["images"] == 4


def check_gpu(stdout: str, tmp: Path) -> None:
    rows = table_rows(stdout, "| check | device |")
    assert rows[0] == ["check", "device", "time (s)", "result"]
    results = {(row[0], row[1]): row[3] for row in rows[1:]}
    assert len(results) == 10 and results[("extract", "cpu")].startswith("ok: ")
    faiss = importlib.util.find_spec("faiss") is not None
    if not faiss:
        assert results.pop(("Step 1 faiss-gpu", "cuda")) == "skipped: faiss is not installed"
    cuda = [result for (_, device), result in results.items() if device == "cuda"]
    assert all(result.startswith("skipped: no GPU") for result in cuda)  # none failed
    ran_here = [result for result in cuda if "its code ran on the CPU: ok" in result]
    assert len(ran_here) == 4 + faiss  # extract, the Step-1 engines, distill + select, the one-rank group
    assert [row["check"] for row in read_json(tmp / "gpu.json")["rows"]] == [row[0] for row in rows[1:]]


def check_metrics(stdout: str, tmp: Path) -> None:
    header = table_rows(stdout, "| quantity |")[0]
    assert header == ["quantity", "medsclean", "reference", "abs. difference", "medsclean s", "reference s", "speed-up"]
    names = first_cells(stdout, "| quantity |")
    assert len(names) == 7 and names[0].startswith("pixel AUROC") and names[-1].startswith("AUPRO@0.3: 200 min-max")


def check_scale(stdout: str, tmp: Path) -> None:
    header = table_rows(stdout, "| N | engine |")[0]
    assert header[:3] == ["N", "engine", "Step-1 time (s)"] and header[-1] == "maps = exact"
    assert [row[1] for row in table_rows(stdout, "| N | engine |")[1:]] == ["exact", "approx", "approx-random"]
    rows = read_json(tmp / "scale.json")["rows"]
    assert [r["case"] for r in rows] == ["exact", "approx", "approx-random"]
    assert {"seconds", "peak_rss_mib", "auroc_planted", "auroc_vs_exact", "gflops"} <= set(rows[0])


def check_score(stdout: str, tmp: Path) -> None:
    results = read_json(tmp / "score.json")
    assert {"config", "machine", "agreement", "timing", "ivf", "mvtec_projection"} <= set(results)
    assert {"exact_s", "exact_gflops", "speedup_exact_vs_naive", "exact_over_matmul_rate"} <= set(results["timing"])
    assert set(results["ivf"]) == {"random", "clustered"}
    assert {"exact_gpu_s_assumed", "total"} <= set(results["mvtec_projection"])


def check_select_time(stdout: str, tmp: Path) -> None:
    rows = table_rows(stdout, "| images |")
    assert rows[0] == ["images", "wall", "peak RSS", "stages", "kept"] and len(rows) == 2
    assert rows[1][0] == "16"  # 4 classes of 3 good + 1 defective images


def check_suite(stdout: str, tmp: Path) -> None:
    assert {"knn", "memory", "meds", "oracle"} <= any_table_first_cells(stdout)
    assert "results" in read_json(tmp / "s.json")


def check_suite_tables(stdout: str, tmp: Path) -> None:
    assert {"knn", "memory", "meds"} <= any_table_first_cells(stdout)


def check_train(stdout: str, tmp: Path) -> None:
    report = stdout_json(stdout)
    assert {"decoders", "encoder", "learn"} <= set(report)
    assert len(report["decoders"]) == 2 and {"distill", "select", "eval_images_per_s"} <= set(report["decoders"][0])
    assert {"stored_steps_per_s", "encoder_steps_per_s", "speedup_stored_over_encoder"} <= set(report["encoder"])
    assert {"auroc_step1", "auroc_distilled", "auroc_selected_eta", "seconds"} <= set(report["learn"])


def check_train_ray(stdout: str, tmp: Path) -> None:
    header = table_rows(stdout, "| training |")[0]
    assert header == ["training", "per step (s)", "fixed cost (s)", "total for the long run (s)"]
    assert first_cells(stdout, "| training |") == ["local", "ray-2"]
    rows = read_json(tmp / "train-ray.json")["rows"]
    assert set(rows) == {"local", "ray-2"} and {"per_step_s", "fixed_s", "seconds"} <= set(rows["local"])


def check_approx_real(stdout: str, tmp: Path) -> None:
    rows = table_rows(stdout, "| category | N |")
    assert rows[0][2:5] == ["P × D", "rejected recall vs exact", "AUROC vs exact rejected"]
    assert [row[:2] for row in rows[1:]] == [["gravel", "12"], ["gravel", "24"]]
    assert all(row[7] == "True" for row in rows[1:])  # approx maps >= exact maps, patch by patch
    results = read_json(tmp / "approx-real.json")["rows"]
    assert {"rejected_recall_vs_exact", "auroc_vs_exact_rejected", "spearman", "approx_s"} <= set(results[0])


def check_project_scale(stdout: str, tmp: Path) -> None:
    rows = table_rows(stdout, "| dataset |")
    assert rows[0][:3] == ["dataset", "features", "GPUs"] and len(rows) == 1 + 2 * 2 * 2
    assert {row[2] for row in rows[1:]} == {"8", "64"}


def check_tune_cut(stdout: str, tmp: Path) -> None:
    rows = table_rows(stdout, "| method | rule |")
    assert rows[0][2:] == ["r=0.1: recall / precision / rejected", "r=0.4: recall / precision / rejected"]
    assert {row[0] for row in rows[1:]} == {"knn", "iterative", "memory", "meds"} and len(rows) == 1 + 4 * 5


def check_corrections(stdout: str, tmp: Path) -> None:
    rows = table_rows(stdout, "| defects | method |")
    assert [r[:2] for r in rows[1:]] == [["repeated", "memory"], ["repeated", "meds"]]
    saved = read_json(tmp / "corrections.json")
    for cell in saved["results"].values():
        for row in cell.values():
            assert row["confirmed"] >= 0 and {"auroc", "recall", "precision"} <= set(row["after"])


# ------------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    """One smoke run: the script, its arguments after --smoke ({tmp} is the test's tmp_path) and the
    check of its output."""

    script: str
    check: Callable[[str, Path], None]
    args: tuple[str, ...] = ()
    ray: bool = False
    needs: tuple[str, ...] = field(default=())  # modules the script cannot run without

    @property
    def id(self) -> str:
        """The script and its arguments, less the temporary paths and the options naming them."""
        shown = [a for i, a in enumerate(self.args)
                 if "{tmp}" not in a and (i + 1 == len(self.args) or "{tmp}" not in self.args[i + 1])]
        return " ".join([self.script, *shown])


CASES = [
    Case("bench_approx_real.py", check_approx_real, ("--json", "{tmp}/approx-real.json")),
    Case("bench_accuracy.py", check_accuracy, ("--work", "{tmp}/work", "--json", "{tmp}/accuracy.json")),
    Case("bench_cli.py", check_cli),
    Case("bench_corrections.py", check_corrections, ("--work", "{tmp}/work", "--json", "{tmp}/corrections.json")),
    Case("bench_extract.py", check_extract),
    Case("bench_extract_ray.py", check_extract_ray, ("--json", "{tmp}/extract-ray.json"), ray=True),
    Case("bench_metrics.py", check_metrics),
    Case("gpu_check.py", check_gpu, ("--json", "{tmp}/gpu.json")),
    Case("bench_scale.py", check_scale, ("--work", "{tmp}/work", "--json", "{tmp}/scale.json")),
    Case("bench_score.py", check_score, ("--json", "{tmp}/score.json"), needs=("faiss",)),
    Case("bench_select_time.py", check_select_time, ("--work", "{tmp}/work")),
    Case("bench_suite.py", check_suite, ("--part", "tuning", "--work", "{tmp}/work", "--json", "{tmp}/s.json")),
    Case("bench_suite.py", check_suite, ("--part", "report", "--work", "{tmp}/work", "--json", "{tmp}/s.json")),
    Case("bench_train.py", check_train),
    Case("bench_train_ray.py", check_train_ray, ("--work", "{tmp}/work", "--json", "{tmp}/train-ray.json"), ray=True),
    Case("project_scale.py", check_project_scale),
    Case("suite_tables.py", check_suite_tables),
    Case("tune_cut.py", check_tune_cut),
]


def _params():
    """The cases as pytest parameters, the Ray ones marked `ray`."""
    return [pytest.param(case, id=case.id, marks=[pytest.mark.ray] if case.ray else []) for case in CASES]


def _repo_listing() -> set[str]:
    """The repository's top-level names and every path under benchmarks/ (where a script could
    drop files by mistake)."""
    return {p.name for p in ROOT.iterdir()} | {str(p.relative_to(ROOT)) for p in BENCHMARKS.rglob("*")}


def _run(case: Case, tmp: Path) -> subprocess.CompletedProcess:
    """`python benchmarks/<script> --smoke <args>` from `tmp`, offline, writing no bytecode."""
    args = [a.replace("{tmp}", str(tmp)) for a in case.args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, str(BENCHMARKS / case.script), "--smoke", *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _missing(case: Case) -> list[str]:
    """The optional modules the case needs that are not installed (ray for the Ray cases)."""
    return [m for m in case.needs + (("ray",) if case.ray else ()) if importlib.util.find_spec(m) is None]


@dataclass
class SmokeRuns:
    """All runnable cases started at once in two lanes, each lane one subprocess at a time: the Ray
    scripts (two Ray instances at once would compete for the same ports) and the others. The Ray
    lane spends most of its time waiting for workers to start, so the two lanes together take about
    as long as the longer one. `futures[case.id]` -> (CompletedProcess, the case's tmp folder)."""

    futures: dict
    before: set[str]


def _selected(session) -> set[str]:
    """The ids of the cases this pytest run selected (`-k` and node ids deselect some); all when none."""
    ids = {item.callspec.params["case"].id for item in session.items
           if item.originalname == "test_smoke_run_prints_its_table"}
    return ids or {case.id for case in CASES}


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory):
    before = _repo_listing()
    selected = _selected(request.session)
    runnable = [case for case in CASES if case.id in selected and not _missing(case)]
    lanes = [[c for c in runnable if c.ray], [c for c in runnable if not c.ray]]
    pools = [ThreadPoolExecutor(max_workers=1) for _ in lanes]
    futures = {}
    for pool, lane in zip(pools, lanes):
        for case in lane:
            tmp = tmp_path_factory.mktemp(case.script.removesuffix(".py"))
            futures[case.id] = pool.submit(lambda c=case, t=tmp: (_run(c, t), t))
    yield SmokeRuns(futures, before)
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("case", _params())
def test_smoke_run_prints_its_table(case: Case, smoke_runs):
    """Exit 0, the smoke line first, the expected table / JSON."""
    if case.ray:
        require_ray()  # fails instead of skipping when CI requires Ray
    if _missing(case):
        pytest.skip(f"{case.script} needs {', '.join(_missing(case))}")
    done, tmp = smoke_runs.futures[case.id].result()
    assert done.returncode == 0, (f"exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n"
                                  f"--- stderr\n{done.stderr[-3000:]}")
    assert done.stdout.splitlines()[0] == SMOKE_LINE, done.stdout[:500]
    case.check(done.stdout, tmp)


def test_smoke_runs_write_nothing_into_the_repository(smoke_runs):
    """Every script keeps its files in its work folder or the given paths (checked once all have run)."""
    for future in smoke_runs.futures.values():
        future.result()
    assert _repo_listing() == smoke_runs.before, f"written into the repository: {_repo_listing() ^ smoke_runs.before}"


def test_every_script_has_a_smoke_case():
    """A new script in benchmarks/ needs a `--smoke` mode and a case above (or is a module)."""
    scripts = {p.name for p in BENCHMARKS.glob("*.py")} - MODULES
    assert scripts == {case.script for case in CASES}
