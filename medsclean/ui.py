"""Progress and log lines on stderr, so stdout carries only results.

Library code takes a `Reporter`; the CLI passes a rich one, tests a silent one.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Protocol


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


class RichReporter:
    """Log lines and progress bars on stderr; quiet mode keeps warnings only."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        self.console.print(f"[bold yellow]warning:[/] {_escape(message)}", soft_wrap=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        if self.quiet or not (self.console.is_terminal or _force_progress()):
            yield _NullTask()
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False) as progress:
            yield _RichTask(progress, progress.add_task(description, total=total))


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _force_progress() -> bool:
    import os

    return os.environ.get("MEDSCLEAN_PROGRESS", "") == "1" or (sys.stderr.isatty())
