"""Progress and log lines on stderr, so stdout carries only results.

Library code takes a `Reporter`; the CLI passes a rich one, tests a silent one.

How progress shows (`progress_mode`): bars on a terminal; without one (stderr to a file or a pipe:
CI, nohup, a pipeline), plain lines, one when a task starts, one each time it passes another tenth
of its total or 30 s after the last line, and one when it ends (`ProgressLines`). The environment
variable `MEDSCLEAN_PROGRESS` overrides the choice: `bars` (or `1`), `lines`, `off` (or `0`);
`auto` or unset picks by the terminal. `--quiet` (`progress=False`) shows no progress at all.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Protocol

PROGRESS_ENV = "MEDSCLEAN_PROGRESS"
"""The environment variable that chooses how progress shows: bars, lines, off or auto."""

LINE_STEP = 0.1
"""A progress line each time a task passes another tenth of its total..."""

LINE_INTERVAL_S = 30.0
"""...or when this many seconds have passed since the last line, whichever comes first."""

_MODES = {"bars": "bars", "1": "bars", "lines": "lines", "off": "off", "0": "off", "auto": "auto", "": "auto"}


class Task(Protocol):
    def advance(self, n: int = 1) -> None: ...

    def update(self, *, completed: int | None = None, total: int | None = None,
               description: str | None = None) -> None: ...


class Reporter(Protocol):
    def info(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def task(self, description: str, total: int | None) -> contextlib.AbstractContextManager[Task]: ...


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass

    def update(self, *, completed=None, total=None, description=None) -> None:
        pass


class SilentReporter:
    """Collects messages instead of printing them (tests, library use)."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def info(self, message: str) -> None:
        self.messages.append(message)

    def warn(self, message: str) -> None:
        self.messages.append("warning: " + message)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        yield _NullTask()


class _RichTask:
    def __init__(self, progress, task_id) -> None:
        self._progress, self._id = progress, task_id

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._id, n)

    def update(self, *, completed=None, total=None, description=None) -> None:
        kwargs = {k: v for k, v in dict(completed=completed, total=total, description=description).items()
                  if v is not None}
        self._progress.update(self._id, **kwargs)


def progress_mode(setting: str | None, terminal: bool) -> str:
    """How progress shows, "bars", "lines" or "off", from `MEDSCLEAN_PROGRESS` (`setting`) and whether
    stderr is a terminal; a value that is none of bars, lines, off, 1, 0, auto counts as auto."""
    mode = _MODES.get((setting or "").strip().lower(), "auto")
    if mode == "auto":
        return "bars" if terminal else "lines"
    return mode


def _duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `1 h 20 min`."""
    whole = max(0, int(round(seconds)))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole // 60 % 60:02d} min"


class ProgressLines:
    """What one task prints without a terminal: pure, the time of each event is passed in.

    `start(now)` gives the first line; `update(now, completed)` a line when the count passes another
    `step` of the total (10 %, 20 %, ...) or `interval` seconds have passed since the last line, else
    None; `end(now)` the last line. The total and the description may change as the task goes."""

    def __init__(self, description: str, total: int | None, *, step: float = LINE_STEP,
                 interval: float = LINE_INTERVAL_S) -> None:
        self.name = self.description = description  # the end line names the task as it started
        self.total = total
        self.step, self.interval = step, interval
        self.completed = 0
        self._started = self._last_time = 0.0
        self._last_mark = 0

    def start(self, now: float) -> str:
        self._started = self._last_time = now
        if self.total is None:
            return f"{self.description}: started"
        return f"{self.description}: 0/{self.total}"

    def update(self, now: float, completed: int, *, total: int | None = None,
               description: str | None = None) -> str | None:
        self.completed = completed
        if total is not None:
            self.total = total
        if description is not None:
            self.description = description
        mark = self._mark(completed)
        finished = self.total is not None and completed >= self.total  # the end line says it
        if finished or (mark <= self._last_mark and now - self._last_time < self.interval):
            return None
        self._last_mark, self._last_time = max(mark, self._last_mark), now
        return self._line(now)

    def end(self, now: float) -> str:
        done = f"{self.completed}" if self.total is None else f"{self.completed}/{self.total}"
        return f"{self.name}: {done} done in {_duration(now - self._started)}"

    def _mark(self, completed: int) -> int:
        """How many steps of the total `completed` has passed (0 when the total is unknown)."""
        if not self.total:
            return 0
        return math.floor(completed / self.total / self.step + 1e-9)

    def _line(self, now: float) -> str:
        elapsed = now - self._started
        if not self.total:
            return f"{self.description}: {self.completed}, {_duration(elapsed)} elapsed"
        share = self.completed / self.total
        eta = f", ETA {_duration(elapsed * (1 - share) / share)}" if self.completed > 0 else ""
        return (f"{self.description}: {self.completed}/{self.total} ({math.floor(100 * share)} %), "
                f"{_duration(elapsed)} elapsed{eta}")


class _LineTask:
    """A task that prints `ProgressLines`' lines through `write`, reading the time from `clock`."""

    def __init__(self, lines: ProgressLines, write: Callable[[str], None], clock: Callable[[], float]) -> None:
        self._lines, self._write, self._clock = lines, write, clock
        self._write(lines.start(clock()))

    def advance(self, n: int = 1) -> None:
        self._emit(self._lines.update(self._clock(), self._lines.completed + n))

    def update(self, *, completed=None, total=None, description=None) -> None:
        done = self._lines.completed if completed is None else completed
        self._emit(self._lines.update(self._clock(), done, total=total, description=description))

    def end(self) -> None:
        self._write(self._lines.end(self._clock()))

    def _emit(self, line: str | None) -> None:
        if line is not None:
            self._write(line)


class RichReporter:
    """Log lines and progress on stderr (bars, lines or none: `progress_mode`); quiet mode keeps
    warnings only and shows no progress."""

    def __init__(self, quiet: bool = False, *, clock: Callable[[], float] = time.monotonic) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.quiet = quiet
        self.clock = clock

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        self.console.print(f"[bold yellow]warning:[/] {_escape(message)}", soft_wrap=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        mode = "off" if self.quiet else progress_mode(os.environ.get(PROGRESS_ENV), self.console.is_terminal)
        if mode == "off":
            yield _NullTask()
            return
        if mode == "lines":
            task = _LineTask(ProgressLines(description, total), self.info, self.clock)
            yield task
            task.end()  # not after an error: the error is the last word
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False) as progress:
            yield _RichTask(progress, progress.add_task(description, total=total))


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
