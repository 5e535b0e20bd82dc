"""`select --budget`: durations, the iteration arithmetic, and the measured step time."""

import pytest
from typer.testing import CliRunner

from medsclean.cli import app
from medsclean.values import parse_duration
from medsclean.errors import UsageError
from medsclean.stages.distill import SELECT_OVERHEAD, iterations_for_budget


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("10m", 600), ("1.5h", 5400), ("45", 45), (" 2m ", 120)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "0m", "-5s", "3d", "1m30s"])
def test_parse_duration_rejects(text):
    with pytest.raises(UsageError, match="^budget must be a positive duration"):
        parse_duration(text)


def test_iterations_for_budget_fill_the_time_and_round_down():
    # 600 s at 0.45 s per step: 600 / (0.45 * 7/3) = 571.4 -> 570 steps each for Steps 2 and 3.
    assert iterations_for_budget(600, 0.45) == 570
    assert 570 * 0.45 * (2 + SELECT_OVERHEAD) <= 600 < 580 * 0.45 * (2 + SELECT_OVERHEAD)
    assert iterations_for_budget(1, 10.0) == 10  # never fewer than 10


def test_budget_conflicts_with_explicit_iterations(tmp_path):
    res = CliRunner().invoke(app, ["select", str(tmp_path), "--budget", "1m", "--select-iters", "100"])
    assert res.exit_code == 2
    assert "--budget" in res.output and "--select-iters" in res.output


def test_budget_picks_and_reports_iterations(tmp_path):
    from .helpers import make_mvtec

    root = make_mvtec(tmp_path / "data", n_train=8, size=64)
    res = CliRunner().invoke(app, ["select", str(root), "--work", str(tmp_path / "w"), "--budget", "4s",
                                   "--resize", "64", "--crop", "64", "--num-workers", "0", "--width", "16",
                                   "--depth", "2", "--heads", "2", "--json"])
    assert res.exit_code == 0, res.output
    import json
    import re

    line = next(line for line in res.stderr.splitlines() if line.startswith("budget"))
    iters = int(re.search(r"-> (\d+) \+", line).group(1))
    key = json.loads(res.stdout)["select_key"]
    manifest = json.loads((tmp_path / "w" / "select" / key / "manifest.json").read_text())
    assert manifest["config"]["iters"] == iters and iters % 10 == 0 and iters >= 10
