"""Progress on stderr: bars on a terminal, plain lines without one (every tenth of the total or 30 s,
with the ETA), nothing with --quiet; `MEDSCLEAN_PROGRESS` chooses. The expected lines are worked out
by hand from the (time, count) sequences fed in."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from medsclean import ui
from medsclean.ui import ProgressLines, RichReporter, progress_mode

from .helpers import crops, save_png, texture


def _feed(lines: ProgressLines, events) -> list[str]:
    """The lines printed for `events`: ("start", t), (t, count) updates, ("end", t)."""
    out = []
    for event in events:
        if event[0] == "start":
            out.append(lines.start(event[1]))
        elif event[0] == "end":
            out.append(lines.end(event[1]))
        else:
            line = lines.update(*event)
            if line is not None:
                out.append(line)
    return out


def test_a_line_at_each_tenth_or_after_30_s_whichever_comes_first():
    events = [("start", 0.0),
              (5.0, 40),     # 7.5 %: no tenth passed, 5 s since the start
              (10.0, 53),    # 10 %: the first tenth -> a line; ETA 10 s * 0.9 / 0.1 = 90 s
              (20.0, 100),   # 18.9 %, 10 s since the last line
              (41.0, 101),   # still below 20 %, but 31 s since the last line -> a line; ETA 41 * 429 / 101 = 174 s
              (44.0, 212),   # 40 %: passes 20 % and 30 % at once -> one line; ETA 44 * 0.6 / 0.4 = 66 s
              (46.0, 250),   # 47 %: same tenth as the last line
              (50.0, 530),   # the total: the end line says it
              ("end", 52.0)]
    assert _feed(ProgressLines("extract", 530), events) == [
        "extract: 0/530",
        "extract: 53/530 (10 %), 10 s elapsed, ETA 1 min 30 s",
        "extract: 101/530 (19 %), 41 s elapsed, ETA 2 min 54 s",
        "extract: 212/530 (40 %), 44 s elapsed, ETA 1 min 06 s",
        "extract: 530/530 done in 52 s",
    ]


def test_a_task_of_unknown_total_prints_its_count_and_elapsed_time_every_30_s():
    events = [("start", 100.0), (110.0, 5), (131.0, 9), (140.0, 12), (162.0, 12), ("end", 170.0)]
    assert _feed(ProgressLines("score", None), events) == [
        "score: started", "score: 9, 31 s elapsed", "score: 12, 1 min 02 s elapsed", "score: 12 done in 1 min 10 s"]


def test_lines_follow_a_changed_description_and_total_and_the_end_line_names_the_task():
    lines = ProgressLines("score", 20)
    assert lines.start(0.0) == "score: 0/20"
    assert lines.update(1.0, 1, description="score brick") is None
    assert lines.update(2.0, 10, description="score brick") == "score brick: 10/20 (50 %), 2 s elapsed, ETA 2 s"
    assert lines.update(3.0, 10, total=40, description="score gravel") is None  # 25 %: a tenth already shown
    assert lines.update(4.0, 24) == "score gravel: 24/40 (60 %), 4 s elapsed, ETA 3 s"  # 4 * 16 / 24 = 2.67
    assert lines.end(7200.0) == "score: 24/40 done in 2 h 00 min"


@pytest.mark.parametrize("setting,terminal,mode", [
    (None, True, "bars"), (None, False, "lines"), ("", False, "lines"), ("auto", True, "bars"),
    ("1", False, "bars"), ("bars", False, "bars"), ("BARS", False, "bars"), ("lines", True, "lines"),
    ("off", True, "off"), ("0", True, "off"), ("sometimes", False, "lines"), ("sometimes", True, "bars")])
def test_medsclean_progress_chooses_bars_lines_or_off(setting, terminal, mode):
    assert progress_mode(setting, terminal) == mode


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run_task(reporter: RichReporter, clock: _Clock) -> None:
    with reporter.task("distill", total=4) as task:
        for _ in range(4):
            clock.now += 2.0
            task.advance()
    clock.now += 1.0


def test_the_reporter_prints_the_lines_on_stderr_and_quiet_or_off_prints_none(monkeypatch, capsys):
    monkeypatch.setenv(ui.PROGRESS_ENV, "lines")
    clock = _Clock()
    _run_task(RichReporter(clock=clock), clock)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["distill: 0/4", "distill: 1/4 (25 %), 2 s elapsed, ETA 6 s",
                                "distill: 2/4 (50 %), 4 s elapsed, ETA 4 s", "distill: 3/4 (75 %), 6 s elapsed, ETA 2 s",
                                "distill: 4/4 done in 8 s"]
    _run_task(RichReporter(quiet=True, clock=clock), clock)
    monkeypatch.setenv(ui.PROGRESS_ENV, "off")
    _run_task(RichReporter(clock=clock), clock)
    assert capsys.readouterr() == ("", "")


def test_an_interrupted_task_prints_no_end_line(monkeypatch, capsys):
    monkeypatch.setenv(ui.PROGRESS_ENV, "lines")
    with pytest.raises(KeyboardInterrupt):
        with RichReporter(clock=_Clock()).task("select", total=10) as task:
            task.update(completed=3)
            raise KeyboardInterrupt
    assert capsys.readouterr().err.splitlines() == ["select: 0/10", "select: 3/10 (30 %), 0 s elapsed, ETA 0 s"]


def test_a_command_with_stderr_to_a_pipe_prints_progress_lines_and_quiet_silences_them(tmp_path):
    rng = np.random.default_rng(0)
    for i, image in enumerate(crops(texture("brick"), 12, 64, rng)):
        save_png(tmp_path / "images" / f"{i:03d}.png", image)
    env = {k: v for k, v in os.environ.items() if k != ui.PROGRESS_ENV}  # the default: auto
    command = [sys.executable, "-m", "medsclean", "extract", str(tmp_path / "images"), "--work", str(tmp_path / "w"),
               "--resize", "64", "--crop", "64", "--num-workers", "0", "--batch-size", "4"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    progress = [line for line in done.stderr.splitlines() if line.startswith("extract tf_efficientnet_lite0:")]
    assert [line.split(",")[0] for line in progress[:3]] == [
        "extract tf_efficientnet_lite0: 0/12", "extract tf_efficientnet_lite0: 4/12 (33 %)",
        "extract tf_efficientnet_lite0: 8/12 (66 %)"]
    assert len(progress) == 4 and progress[3].startswith("extract tf_efficientnet_lite0: 12/12 done in ")
    assert "ETA" in progress[1] and "\x1b[" not in done.stderr  # plain text, no terminal codes
    quiet = subprocess.run([*command, "--force", "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-2000:]
